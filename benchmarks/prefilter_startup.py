"""Child process of figure P7 (benchmarks/run.py): the start-up of a fill-mask pipeline over an index in a process
of its own (index load, pipeline, first answer), with one pre-filter setting.

    python benchmarks/prefilter_startup.py MODEL_DIR INDEX_DIR SETTING QUERY

SETTING: none, bm25 or bm25-in-memory (the start-up), or bm25-cost / bm25-in-memory-cost (the pre-filter alone).

The model is loaded before the clock starts (its cost is the same for every setting). Prints one JSON object: the
seconds from opening the index to the first answer; or, for "-cost", after a first unfiltered answer, the seconds
and resident memory (RSS, memory-mapped pages read included) of the pre-filter's first use (opening or indexing it,
and one query).
"bm25-in-memory" ignores the BM25 index saved with the index and indexes every passage text at start-up (how
npm_hf did before it saved one).
"""

import dataclasses
import json
import sys
import time
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def rss_bytes() -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def main() -> None:
    import bm25s  # noqa: F401 - imported in every setting: the difference in memory is the pre-filter's data
    from transformers import AutoTokenizer
    from transformers.utils import logging

    from npm_hf import NonparametricFillMaskPipeline, NPMIndex, NPMModel

    logging.set_verbosity_error()
    model_dir, index_dir, prefilter, query = sys.argv[1:5]
    if prefilter not in ("none", "bm25", "bm25-in-memory", "bm25-cost", "bm25-in-memory-cost"):
        raise SystemExit(f"unknown setting {prefilter!r}")
    model, tokenizer = NPMModel.from_pretrained(model_dir), AutoTokenizer.from_pretrained(model_dir)
    setting = prefilter.removesuffix("-cost")
    started = time.perf_counter()
    index = NPMIndex.load(index_dir)
    if setting == "bm25-in-memory":
        index.manifest = dataclasses.replace(index.manifest, bm25_passages=[])
    fill = NonparametricFillMaskPipeline(model=model, tokenizer=tokenizer, index=index)
    if not prefilter.endswith("-cost"):
        answers = fill(query, prefilter="none" if setting == "none" else "bm25")
        print(json.dumps({"seconds": time.perf_counter() - started, "rss": rss_bytes(), "answers": len(answers)}))
        return
    # the pre-filter alone: its first use (opening or indexing it, one query) after an unfiltered answer
    fill(query, prefilter="none")
    before, started = rss_bytes(), time.perf_counter()
    candidates = fill.prefilters.candidates(fill.decoding.update(prefilter="bm25"), query, None, tokenizer.mask_token)
    seconds = time.perf_counter() - started
    print(json.dumps({"seconds": seconds, "rss": rss_bytes() - before, "candidates": len(candidates.positions)}))


if __name__ == "__main__":
    main()
