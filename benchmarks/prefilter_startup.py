"""Child process of figure P7 (benchmarks/run.py): the start-up of a fill-mask pipeline over an index in a process
of its own (index load, pipeline, first answer), with one pre-filter setting.

    python benchmarks/prefilter_startup.py MODEL_DIR INDEX_DIR SETTING QUERY

SETTING: none, bm25 or bm25-in-memory (the start-up), or bm25-cost / bm25-in-memory-cost (the pre-filter alone), or
bm25-heap / bm25-in-memory-heap (the Python heap the pre-filter keeps).

The model is loaded before the clock starts (its cost is the same for every setting). Prints one JSON object: the
seconds from opening the index to the first answer; or, for "-cost", after a first unfiltered answer, the seconds
and resident memory (RSS: anonymous, pages of the memory-mapped index files read, and pages of other files such as
libraries first touched) of the pre-filter's first use (opening or indexing it, and one query); for "-heap", the Python heap (tracemalloc) still allocated after that first use, and
its peak during it (the RSS alone understates it: the anonymous pages reuse heap the unfiltered answer freed).
"bm25-in-memory" ignores the BM25 index saved with the index and indexes every passage text at start-up (how
npm_hf did before it saved one).
"""

import dataclasses
import gc
import json
import sys
import time
import tracemalloc
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def rss_bytes() -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def rss_parts(index_dir: str) -> dict:
    """Resident bytes of the process: anonymous, and file-backed pages of the files in `index_dir` (memory-mapped
    index files) and of other files (libraries and code first touched), from /proc/self/smaps."""
    parts = {"anonymous": 0, "index_files": 0, "other_files": 0}
    inside = str(Path(index_dir).resolve()) + "/"
    mapping = ""
    with open("/proc/self/smaps") as handle:
        for line in handle:
            fields = line.split()
            if not fields[0].endswith(":"):  # a mapping's header: address perms offset dev inode [path]
                mapping = fields[5] if len(fields) > 5 else ""
            elif fields[0] == "Anonymous:":
                parts["anonymous"] += int(fields[1]) * 1024
            elif fields[0] == "Rss:" and mapping.startswith("/"):
                size = int(fields[1]) * 1024
                if mapping.startswith(inside):
                    parts["index_files"] += size
                    name = "file:" + mapping[len(inside):]
                    parts[name] = parts.get(name, 0) + size
                else:
                    parts["other_files"] += size
    return parts


def main() -> None:
    import bm25s  # noqa: F401 - imported in every setting: the difference in memory is the pre-filter's data
    from transformers import AutoTokenizer
    from transformers.utils import logging

    from npm_hf import NonparametricFillMaskPipeline, NPMIndex, NPMModel

    logging.set_verbosity_error()
    model_dir, index_dir, prefilter, query = sys.argv[1:5]
    setting = prefilter.removesuffix("-cost").removesuffix("-heap")
    if prefilter not in ("none", "bm25", "bm25-in-memory") and setting not in ("bm25", "bm25-in-memory"):
        raise SystemExit(f"unknown setting {prefilter!r}")
    model, tokenizer = NPMModel.from_pretrained(model_dir), AutoTokenizer.from_pretrained(model_dir)
    started = time.perf_counter()
    index = NPMIndex.load(index_dir)
    if setting == "bm25-in-memory":
        index.manifest = dataclasses.replace(index.manifest, bm25_passages=[])
    fill = NonparametricFillMaskPipeline(model=model, tokenizer=tokenizer, index=index)
    if setting == prefilter:
        answers = fill(query, prefilter="none" if setting == "none" else "bm25")
        print(json.dumps({"seconds": time.perf_counter() - started, "rss": rss_bytes(), "answers": len(answers)}))
        return
    # the pre-filter alone: its first use (opening or indexing it, one query) after an unfiltered answer
    fill(query, prefilter="none")
    gc.collect()
    heap = prefilter.endswith("-heap")
    if heap:
        tracemalloc.start()
    before, started = rss_parts(index_dir), time.perf_counter()
    candidates = fill.prefilters.candidates(fill.decoding.update(prefilter="bm25"), query, None, tokenizer.mask_token)
    seconds = time.perf_counter() - started
    result = {"seconds": seconds, "candidates": len(candidates.positions)}
    if heap:
        gc.collect()
        result["heap"], result["heap_peak"] = tracemalloc.get_traced_memory()
    else:
        after = rss_parts(index_dir)
        result.update({f"rss_{name}": after[name] - before.get(name, 0) for name in after
                       if not name.startswith("file:")})
        result["rss"] = sum(result[f"rss_{name}"] for name in ("anonymous", "index_files", "other_files"))
        result["index_pages_by_file"] = {name[5:]: after[name] - before.get(name, 0) for name in after
                                         if name.startswith("file:") and after[name] > before.get(name, 0)}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
