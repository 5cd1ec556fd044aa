"""Child process of figure M2 (benchmarks/run.py) and of the long-document measurement (docs/benchmarks.md): the
peak resident memory of reading a corpus, in a process of its own.

    python benchmarks/corpus_memory.py blocks   TOKENIZER_DIR CORPUS.jsonl WORK_DIR [RUNS]
    python benchmarks/corpus_memory.py tokenize TOKENIZER_DIR CORPUS.jsonl WORK_DIR [RUNS]
    python benchmarks/corpus_memory.py long-document SOURCE.jsonl TARGET.jsonl MEGABYTES

`blocks` runs `prepare_training_blocks` (block 256, group 16, its Arrow file in WORK_DIR) on the corpus file,
streamed from disk. `tokenize` runs the tokenizing stage of an index build (`write_corpus` + `write_positions`, what
held a 50 MB one-line document's 11.8 GB; encoding is bounded by its batches). `long-document` only writes a
corpus of one single-line document of MEGABYTES MB made of SOURCE's texts (in its own process, so that `tokenize`
then starts clean).

The peak is VmHWM, reset (/proc/self/clear_refs) once the libraries and the tokenizer are loaded, and again before
each of RUNS runs (default 1) of the same call: it counts what the call adds. The first run also pays one-time
costs (lazy imports, the tokenizer's thread pool, allocator arenas), a second one only what the corpus costs.
Prints one JSON object: the last run's resident bytes before the call, the peak during it (VmHWM), the sampled peak
of anonymous memory (RssAnon every 5 ms), seconds and a count; the corpus's text bytes (UTF-8); and every run.
"""

import json
import sys
import tempfile
import time
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from build_memory import AnonymousPeak, status_bytes  # noqa: E402


def text_bytes(path: Path) -> int:
    with open(path, encoding="utf-8") as handle:
        return sum(len(json.loads(line)["text"].encode("utf-8")) for line in handle if line.strip())


def write_long_document(source: Path, target: Path, megabytes: float) -> None:
    """One document of one line: SOURCE's texts, newlines turned into spaces, repeated up to the size."""
    with open(source, encoding="utf-8") as handle:
        texts = [" ".join(json.loads(line)["text"].split()) for line in handle if line.strip()]
    size, parts, i, total = int(megabytes * 1e6), [], 0, 0
    while total < size:
        parts.append(texts[i % len(texts)])
        total += len(parts[-1]) + 1
        i += 1
    with open(target, "w", encoding="utf-8") as out:
        out.write(json.dumps({"id": "long", "title": "", "text": " ".join(parts)[:size]}, ensure_ascii=False) + "\n")


def main(mode: str, tokenizer_dir: str, corpus: str, work: str, repeats: str = "1") -> None:
    import numpy as np
    import transformers
    from transformers import AutoTokenizer

    import npm_hf
    from npm_hf.index import IndexBuildArguments
    from npm_hf.index.encoding import index_rule
    from npm_hf.index.writing import write_corpus, write_positions
    from npm_hf.inference.index_files import TOKEN_FILES

    transformers.utils.logging.set_verbosity_error()
    work_dir = Path(tempfile.mkdtemp(dir=work))
    corpus = Path(corpus)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    size = text_bytes(corpus)

    def run(number: int):
        if mode == "blocks":
            return len(npm_hf.prepare_training_blocks(str(corpus), tokenizer, block_size=256, group_size=16,
                                                      cache_dir=work_dir / f"blocks-{number}"))
        if mode == "tokenize":
            args = IndexBuildArguments(block_size=256, show_progress_bar=False)
            index_dir = work_dir / f"index-{number}"
            index_dir.mkdir()
            stats = write_corpus(index_dir, str(corpus), tokenizer, args)
            write_positions(index_dir, np.load(index_dir / TOKEN_FILES["token_ids"], mmap_mode="r"),
                            np.load(index_dir / TOKEN_FILES["token_flags"], mmap_mode="r"),
                            index_rule(args, tokenizer))
            return stats.num_tokens
        raise SystemExit(f"unknown mode {mode!r}: use blocks, tokenize or long-document")

    runs = []
    for number in range(int(repeats)):  # the first run also pays one-time costs (lazy imports, thread pools)
        with open("/proc/self/clear_refs", "w") as handle:  # VmHWM := VmRSS: the peak counts from here
            handle.write("5")
        before, before_anonymous = status_bytes("VmRSS"), status_bytes("RssAnon")
        sampler = AnonymousPeak()
        sampler.start()
        started = time.perf_counter()
        count = run(number)
        seconds = time.perf_counter() - started
        runs.append({"before": before, "peak": status_bytes("VmHWM"), "before_anonymous": before_anonymous,
                     "peak_anonymous": sampler.stop(), "seconds": round(seconds, 1), "count": count})
    print(json.dumps({**runs[-1], "text_bytes": size, "runs": runs}))

if __name__ == "__main__":
    if sys.argv[1] == "long-document":
        write_long_document(Path(sys.argv[2]), Path(sys.argv[3]), float(sys.argv[4]))
    else:
        main(*sys.argv[1:6])
