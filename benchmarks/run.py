"""Performance figures of npm_hf, each a ratio measured side by side in one run (the machine may be noisy).

    python benchmarks/run.py [--quick] [--figures P1,P3]   (--figures RSS1k: that figure alone)

Prints one JSON object per line on stdout, `{"figure", "value", "goal", "detail"}`; progress goes to stderr.

    P2  index-build tokens/s (the whole NPMIndex.build: tokenization, encoding, FAISS, manifest, reload)
        / bare encoder forward tokens/s over exactly the same forward passes (blocks, batches, lengths). goal >= 0.9
    P1  fill-mask pipeline seconds per query / (bare encoder forward of the same query with the mask duplicated,
        as span mode does, + raw FAISS search of its 2 query vectors with the same k).         goal <= 1.2
    B   bytes of the index directory per indexed token, with a per-file breakdown.             report
    P7  start-up (index load, pipeline, first answer) of a fill-mask pipeline with prefilter="bm25" (its BM25
        index saved with the index, memory-mapped) / with prefilter="none", fresh processes, best of 3; the
        detail gives the pre-filter's memory (Python heap it keeps + pages of the memory-mapped index files it
        read) / the block texts' size (goal <= 0.1).                                            goal <= 1.1
    P5  NPMTrainer tokens/s / stock Trainer + DataCollatorForLanguageModeling + AutoModelForMaskedLM of the same
        encoder, batch and length (median step times, first step skipped).                     goal >= 0.5
    P5c NPMSpanCollator seconds per batch / NPMTrainer seconds per step.                        goal <= 0.05
    P3  quality/size of approximate FAISS indexes over the P1 index's vectors (Flat fp16, SQ8, IVF-PQ 64, 32 and
        16 bytes, HNSW32): top-1 agreement with exact search after exact re-scoring (ties count) and with FAISS's
        own scores only, bytes per indexed token on disk and in RAM, median search latency per query of 2 token
        vectors of a real sentence encoded on its own. One line per index (value: the agreement at k=4096), then
        "P3": the in-RAM bytes per token of the smallest index with >= 95 % agreement.           goal <= 64
    P3d indexes without float16 vectors (vectors="none": candidates re-scored from refine codes), made from the P1
        index's vectors (benchmarks/compact_index.py, which also plots them): top-1 agreement with exact search,
        identical fill-mask answers, bytes on disk per indexed token (every file), latency; "P3d": the bytes/token
        of the smallest one with >= 95 % on both. Opt-in (--figures P3d; minutes per index).  goal <= 64
    P6  fill-mask queries per second of `fill(texts, batch_size=32)` / one text at a time, same 32 texts, alternating
        rounds; the detail splits both into forward, search and answers (spans, phrases, evidence).  goal >= 5
    P6l fill-mask queries per second of `fill(texts, batch_size=32)` / the bare floor of the same work: one padded
        encoder forward of the 32 texts and one `search_many` of their query vectors.            goal >= 0.85
    PM  NPM fill-mask seconds per query with prefilter="bm25" / the stock FillMaskPipeline of a BertForMaskedLM of
        the encoder's shape, same queries, alternating; the detail adds NPM over the whole index.  report
    RSS1k resident memory (RSS) of the process after 1,000 fill-mask pipeline calls / after 100 calls (one query at
        a time, 50 cloze queries in turn, over the P1 index; gc.collect() before each reading): a leak per call
        shows as growth. Not in --quick unless named (about 8 minutes).                          goal <= 1.05
    PE  seconds of NPMIndex.add_documents of 1 document to the P1 index (an append segment: tokenize, encode,
        write, reload; a copy of the index by hard links) / the bare encoder forward of that document's blocks
        alone, alternating, a new document each round; median of the rounds' ratios (the first add, which also
        reads every document id and fingerprints the model once, in the detail).                  goal <= 2
    P1q fill-mask pipeline seconds per query with the candidate search in a Qdrant collection (qdrant-client's
        local mode, `npm_hf.vector_store.QdrantSearchIndex`) / with the default FAISS Flat index, same queries and
        index, alternating rounds. Opt-in (--figures P1q); skipped with a note without qdrant-client.      report
    P1r fill-mask pipeline seconds per query with the search in Ray actors (`npm_hf.serve.RayShardedIndex`, 2 row
        shards of the P1 index on a local Ray instance) / with the local index, same queries, alternating rounds;
        the detail says whether every answer was identical. Not in --quick unless named: starting Ray and its
        actors (each imports torch and npm_hf) adds ~30 s to CI on 2 cores, and the cluster tests (-m ray)
        already check the answers. Skipped with a note without ray.                             goal <= 1.5

    M   peak resident memory (VmHWM) of an NPMIndex.build run in a process of its own with --max-memory, over
        a slice of the corpus with an IVF index trained on a capped sample / that budget.         goal <= 1
    M2  peak resident memory that `prepare_training_blocks` adds (VmHWM, reset once the libraries and tokenizer are
        loaded) in a process of its own, on the P1 corpus (10^6 tokens in the full run) read from a .jsonl file,
        blocks of 256 in groups of 16 / the UTF-8 bytes of the corpus's text.                  goal <= 1
    P4  p50 latency of NPMIndex.search (one query of 2 vectors, k=4096, nprobe=16) over a synthetic 10^7-vector
        IVF-SQ8 index / over the same construction at 10^5 (10^4 and 10^5 with --quick), each opened in a fresh
        process; the detail gives the memory NPMIndex.load took beside the index's size. The synthetic indexes
        (benchmarks/synthetic_index.py; 10^7 vectors take ~12 GB and ~6 minutes to write once) are cached in
        $NPM_HF_BENCH_CACHE (default ~/.cache/npm_hf_bench). Opt-in (--figures P4).              goal <= 3

Encoder: the offline MiniLM (`npm_hf.demo.minilm_path()`), wrapped with `npm_hf.convert_encoder`. Text: the
Wikipedia sample at <repo>/../shared/offline_data/enwiki_sample/enwiki_sample.jsonl (647k tokens), followed by the
BBC News articles of ../shared/offline_data/bbc_news, so that the full run's P1 index holds 10^6 tokens (the quick
one 10^5). Baseline and candidate are measured alternately, for a number of rounds set by a time budget. P2 is
the median of the rounds' ratios, P1 the ratio of per-query best-of-N times (noise on a shared machine only adds time); each detail also gives the other
estimate and the CPU load of other processes during the measurements.
"""

import argparse
import dataclasses
import gc
import json
import logging
import os
import re
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


OFFLINE_DATA = Path(__file__).resolve().parents[2] / "shared" / "offline_data"
CORPUS = OFFLINE_DATA / "enwiki_sample" / "enwiki_sample.jsonl"
# Appended after the Wikipedia sample so that the full run's P1 index reaches 10^6 tokens (BBC News 2004-05,
# research use only: read from ../shared, never shipped).
EXTRA_CORPUS = OFFLINE_DATA / "bbc_news" / "bbc_news.jsonl"

# Token ranges (min, max) of the P2 corpus and the P1 index (None: every document), number of P1 queries, and
# rounds per figure: (min, max, seconds) = at least min rounds, then more until the seconds are spent, at most max.
SETTINGS = {
    "quick": {"p2_tokens": (30_000, 40_000), "p2_rounds": (3, 8, 75), "p1_tokens": (100_000, 130_000),
              "p1_queries": 20, "p1_rounds": (3, 10, 45), "p5_block": 128, "p5_group": 8, "p5_steps": 4,
              "p5_rounds": 2, "p3_queries": 40, "p3_nlist": 64, "p3_train": 10_000, "m_tokens": (20_000, 25_000),
              "p4_sizes": (10_000, 100_000), "p4_queries": 100},
    "full": {"p2_tokens": (150_000, 200_000), "p2_rounds": (3, 8, 300), "p1_tokens": (1_000_000, 1_100_000),
             "p1_queries": 20,
             "p1_rounds": (5, 12, 120), "p5_block": 256, "p5_group": 16, "p5_steps": 5, "p5_rounds": 3,
             "p3_queries": 100, "p3_nlist": 1024, "p3_train": 100_000, "m_tokens": (100_000, 120_000),
             "p4_sizes": (100_000, 10_000_000), "p4_queries": 200},
}
FIGURES = ("P2", "P1", "B", "PE", "P7", "P3", "P6", "P6L", "PM", "RSS1K", "P1R", "P5", "M", "M2")
OPT_IN_FIGURES = ("P1Q", "P4", "P3D")  # not in the default run (names are upper-cased when parsed)
# Left out of --quick unless named: RSS1k's 1,000 pipeline calls take ~8 minutes (2 calls/s over the quick P1 index,
# k=4096, 2-core AMD EPYC with 1.5 cores of other load), far above the quick run's budget.
NOT_QUICK = ("RSS1K", "P1R")  # P1r: Ray's start-up (see the docstring)
P1R_SHARDS = 2
# M: the build's budget and index. 1.2 GB is ~0.6 GB of process (interpreter, torch, the model) + ~0.25 GB of
# encoding activations + room for FAISS; with "full"'s 100k vectors the 1M-vector training sample gets capped.
M_BUDGET = "1.2GB"
M_FACTORY = "IVF256,SQ8"
P4_NPROBE = 16
P4_K = 4096  # NPMConfig's default k
P4_ROUNDS = 3
# P3: the approximate indexes compared with exact search, their nprobe, and the k of its agreement/latency columns.
P3_NPROBES = (16, 64, 256)  # IVF: tried in turn until the index reaches 95 % agreement
P3_KS = (10, 4096)
BLOCK_SIZE = 256
BATCH_SIZE = 16

log = logging.getLogger("npm_hf.benchmarks")


def emit(figure: str, value: float, goal: str, detail: str) -> None:
    print(json.dumps({"figure": figure, "value": round(float(value), 4), "goal": goal, "detail": detail}), flush=True)


# ---------------------------------------------------------------------------------------------------- setup
def quiet_libraries() -> None:
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    try:
        import datasets

        datasets.utils.logging.set_verbosity_error()
        datasets.utils.logging.disable_progress_bar()
    except ImportError:
        pass


def load_corpus() -> list[dict]:
    if not CORPUS.is_file():
        raise SystemExit(
            f"error: the benchmark corpus {CORPUS} is missing. It is expected in shared/offline_data/enwiki_sample/ "
            "next to the repository (a JSONL file of {id, title, text} Wikipedia articles)."
        )
    documents = []
    for path in (CORPUS, EXTRA_CORPUS):
        if path.is_file():
            with open(path, encoding="utf-8") as handle:
                documents += [{key: record[key] for key in ("id", "title", "text")}
                              for record in map(json.loads, filter(str.strip, handle))]
    return documents


def make_model(workdir: Path):
    """The MiniLM encoder wrapped as an NPM directory, loaded back as (model, tokenizer)."""
    import npm_hf
    from npm_hf.demo import minilm_path

    model_dir = workdir / "npm-minilm"
    npm_hf.convert_encoder(minilm_path(), model_dir)
    model, tokenizer = npm_hf.load_npm(model_dir)
    model.eval()
    return model, tokenizer


def token_counts(documents: list[dict], tokenizer) -> list[int]:
    encoded = tokenizer([d["text"] for d in documents], add_special_tokens=True, return_attention_mask=False,
                        return_token_type_ids=False, verbose=False)
    return [len(ids) for ids in encoded["input_ids"]]


def take_documents(documents: list[dict], counts: list[int], bounds: tuple[int, int] | None) -> list[dict]:
    """Whole documents in corpus order, skipping any that would pass `bounds[1]` tokens, until at least
    `bounds[0]` tokens (every document for None)."""
    if bounds is None:
        return list(documents)
    low, high = bounds
    chosen, total = [], 0
    for document, count in zip(documents, counts):
        if not document["text"].strip() or total + count > high:
            continue
        chosen.append(document)
        total += count
        if total >= low:
            break
    return chosen


def cloze_queries(documents: list[dict], mask_token: str | None, count: int) -> list[str]:
    """Real sentences of the indexed documents with one capitalised word (not the first) replaced by the mask
    (kept with mask_token=None), taken round-robin over the documents."""
    per_document = []
    for document in documents:
        found = []
        for sentence in re.split(r"(?<=[.!?])\s+", document["text"]):
            words = sentence.split()
            if not 8 <= len(words) <= 30 or any("|" in w or w.startswith("*") for w in words):
                continue
            candidates = [i for i, w in enumerate(words[1:], start=1) if re.fullmatch(r"[A-Z][a-z]{3,}", w)]
            if candidates:
                if mask_token is not None:
                    words[candidates[len(candidates) // 2]] = mask_token
                found.append(" ".join(words))
        per_document.append(found)
    queries, depth = [], 0
    while len(queries) < count and any(len(f) > depth for f in per_document):
        for found in per_document:
            if depth < len(found) and len(queries) < count:
                queries.append(found[depth])
        depth += 1
    if not queries:
        raise RuntimeError("No cloze query could be made from the benchmark corpus.")
    return queries


class OtherLoad:
    """CPU cores that other processes (and the hypervisor, as steal time) used while a measurement ran: the
    machine's busy time from /proc/stat minus this process's own CPU time. None where /proc is missing."""

    def __init__(self):
        self.started = self._sample()

    @staticmethod
    def _sample():
        try:
            with open("/proc/stat") as handle:
                fields = [int(x) for x in handle.readline().split()[1:9]]
        except (OSError, ValueError):
            return None
        busy = sum(fields) - fields[3] - fields[4]  # all but idle and iowait (guest time is inside user)
        own = os.times()
        return time.perf_counter(), busy / os.sysconf("SC_CLK_TCK"), own.user + own.system

    def cores(self) -> float | None:
        now = self._sample()
        if now is None or self.started is None or now[0] <= self.started[0]:
            return None
        wall, busy, own = (b - a for a, b in zip(self.started, now))
        return round(max(0.0, (busy - own) / wall), 2)


def directory_bytes(path: Path) -> dict[str, int]:
    return {p.relative_to(path).as_posix(): p.stat().st_size for p in sorted(path.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------------------------------------------- P2
def pack_batches(ids: np.ndarray, flags: np.ndarray, pad_id: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The forward passes NPMIndex.build runs over the index's tokens (`npm_hf.index.encoding_plan`: its blocks of
    packed paragraphs, sorted by length within a work unit, BATCH_SIZE per pass, each pass trimmed to its longest)."""
    from npm_hf import IndexBuildArguments
    from npm_hf.index import encoding_plan, padded_blocks

    args = IndexBuildArguments(block_size=BLOCK_SIZE, batch_size=BATCH_SIZE)
    blocks, attend = padded_blocks(ids, flags, BLOCK_SIZE, pad_id)
    return [(torch.from_numpy(blocks[members, :length]), torch.from_numpy(attend[members, :length]))
            for unit in encoding_plan(flags, args) for members, length in unit]


def bare_forward_seconds(model, batches) -> float:
    started = time.perf_counter()
    with torch.inference_mode():
        for input_ids, attention_mask in batches:
            model(input_ids=input_ids, attention_mask=attention_mask)
    return time.perf_counter() - started


def build_seconds(model, tokenizer, documents, out_dir: Path):
    from npm_hf import IndexBuildArguments, NPMIndex

    args = IndexBuildArguments(block_size=BLOCK_SIZE, batch_size=BATCH_SIZE, show_progress_bar=False, overwrite=True)
    gc.collect()
    started = time.perf_counter()
    index = NPMIndex.build(model, tokenizer, documents, out_dir, args)
    return time.perf_counter() - started, index


def round_numbers(rounds: tuple[int, int, float]):
    """0, 1, 2, ...: at least `rounds[0]`, then more while under `rounds[2]` seconds, at most `rounds[1]`."""
    low, high, seconds = rounds
    started = time.perf_counter()
    r = 0
    while r < high and (r < low or time.perf_counter() - started < seconds):
        yield r
        r += 1


def figure_p2(model, tokenizer, documents, workdir: Path, rounds: tuple[int, int, float]) -> None:
    import faiss  # noqa: F401  (imported by the build; import it outside the timed region)

    pad_id = model.config.encoder.pad_token_id or 0
    warmup = torch.full((BATCH_SIZE, BLOCK_SIZE), tokenizer.unk_token_id or 100, dtype=torch.long)
    bare_forward_seconds(model, [(warmup, torch.ones_like(warmup))])
    # Round 0 builds first; its index gives the exact token ids that the bare forward packs into blocks.
    batches, num_tokens = None, None
    build_times, bare_times, build_load, bare_load = [], [], [], []
    for r in round_numbers(rounds):
        out_dir = workdir / f"p2-{r}"
        order = ("build", "bare") if r % 2 == 0 else ("bare", "build")
        for what in order:
            if what == "build":
                load = OtherLoad()
                seconds, index = build_seconds(model, tokenizer, documents, out_dir)
                build_load.append(load.cores())
                if batches is None:
                    num_tokens = index.manifest.num_tokens
                    batches = pack_batches(np.asarray(index.token_ids, dtype=np.int64),
                                           np.asarray(index.token_flags), pad_id)
                assert index.manifest.num_tokens == num_tokens
                del index
                shutil.rmtree(out_dir, ignore_errors=True)
                build_times.append(seconds)
            else:
                gc.collect()
                load = OtherLoad()
                bare_times.append(bare_forward_seconds(model, batches))
                bare_load.append(load.cores())
        log.info(f"P2 round {r}: build {build_times[-1]:.2f}s, bare forward {bare_times[-1]:.2f}s")
    # The value is the median over rounds of each round's ratio: a build and the bare forward next to it share the
    # machine's load (which here comes in bursts of tens of seconds), so the ratio of one round is fair even when
    # both are slowed; the median drops rounds where the load changed in between. Best-of-N is in the detail.
    round_ratios = [bare / build for build, bare in zip(build_times, bare_times)]
    build_tps, bare_tps = num_tokens / min(build_times), num_tokens / min(bare_times)
    emit("P2", statistics.median(round_ratios), ">= 0.9",
         f"{num_tokens} tokens, {len(documents)} docs, {len(batches)} forward passes of <= {BATCH_SIZE}x{BLOCK_SIZE} "
         f"({sum(int(a.sum()) for _, a in batches)} attended tokens); "
         f"median of {len(round_ratios)} alternating rounds' ratios {[round(x, 3) for x in round_ratios]}; "
         f"best-of: build {build_tps:.0f} tok/s ({min(build_times):.2f}s), bare forward {bare_tps:.0f} tok/s "
         f"({min(bare_times):.2f}s), ratio {build_tps / bare_tps:.3f}; build s {[round(t, 2) for t in build_times]}, "
         f"bare s {[round(t, 2) for t in bare_times]}; other processes' load in cores: build {build_load}, "
         f"bare {bare_load}")


# ------------------------------------------------------------------------------------------------------- P1
def baseline_inputs(tokenizer, queries: list[str]):
    """Per query: encoder ids with the single mask duplicated (span mode) and the positions of the 2 queries."""
    mask_id = tokenizer.mask_token_id
    prepared = []
    for query in queries:
        ids = tokenizer(query)["input_ids"]
        at = ids.index(mask_id)
        ids = ids[:at] + [mask_id] + ids[at:]
        input_ids = torch.tensor([ids])
        prepared.append((input_ids, torch.ones_like(input_ids), [at, at + 1]))
    return prepared


def bare_query_seconds(model, faiss_index, k: int, prepared) -> float:
    input_ids, attention_mask, positions = prepared
    started = time.perf_counter()
    with torch.inference_mode():
        hidden = model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state[0]
        vectors = np.ascontiguousarray(hidden[positions].float().numpy())
    faiss_index.search(vectors, k)
    return time.perf_counter() - started


def pipeline_seconds(fill, query: str) -> float:
    started = time.perf_counter()
    answers = fill(query)
    seconds = time.perf_counter() - started
    assert answers is not None
    return seconds


def figure_p1(model, tokenizer, index, queries: list[str], rounds: tuple[int, int, float]) -> None:
    from npm_hf import NonparametricFillMaskPipeline

    assert model.config.mode == "span", "P1's baseline models span mode (2 query vectors per mask)"
    fill = NonparametricFillMaskPipeline(model=model, tokenizer=tokenizer, index=index)
    k = min(int(fill.decoding.k), index.num_indexed)
    prepared = baseline_inputs(tokenizer, queries)
    for query, inputs in list(zip(queries, prepared))[:3]:  # warm-up (lazy tables, allocator, page cache)
        pipeline_seconds(fill, query)
        bare_query_seconds(model, index.faiss_index, k, inputs)
    pipe = np.zeros((rounds[1], len(queries)))
    bare = np.zeros((rounds[1], len(queries)))
    # Each round times every query through one path, then through the other (the order alternates between rounds),
    # back to back as in real use, after a short pause: a path's after-effects (e.g. BLAS worker threads still
    # spinning after the pipeline's numpy matmuls, which compete for the 2 cores) then slow only that path's own
    # next queries, never the other path's measurements.
    done, loads = 0, {"pipeline": [], "bare": []}
    for r in round_numbers(rounds):
        for path in (("pipeline", "bare") if r % 2 == 0 else ("bare", "pipeline")):
            gc.collect()
            time.sleep(0.2)
            load = OtherLoad()
            for q, (query, inputs) in enumerate(zip(queries, prepared)):
                if path == "pipeline":
                    pipe[r, q] = pipeline_seconds(fill, query)
                else:
                    bare[r, q] = bare_query_seconds(model, index.faiss_index, k, inputs)
            loads[path].append(load.cores())
        done = r + 1
        log.info(f"P1 round {r}: pipeline {pipe[r].mean() * 1e3:.1f} ms/query, "
                 f"baseline {bare[r].mean() * 1e3:.1f} ms/query")
    pipe, bare = pipe[:done], bare[:done]
    pipe_median = np.median(pipe, axis=0).mean()
    bare_median = np.median(bare, axis=0).mean()
    pipe_best = pipe.min(axis=0).mean()
    bare_best = bare.min(axis=0).mean()
    lengths = [int(p[0].shape[1]) for p in prepared]
    m = index.manifest
    # Per query best-of-N (noise only adds time), averaged over queries; medians in the detail.
    emit("P1", pipe_best / bare_best, "<= 1.2",
         f"index {m.num_tokens} tokens ({m.num_indexed_tokens} indexed, {m.num_documents} docs, {m.faiss_factory}, "
         f"{sum(directory_bytes(index.path).values()) / 2**20:.0f} MiB), "
         f"k={k}, mode={model.config.mode}, {len(queries)} queries of {min(lengths)}-{max(lengths)} encoder tokens, "
         f"{done} alternating rounds; per-query best-of-{done}: pipeline {pipe_best * 1e3:.1f} ms, "
         f"forward+search {bare_best * 1e3:.1f} ms; per-query medians: pipeline {pipe_median * 1e3:.1f} ms, "
         f"forward+search {bare_median * 1e3:.1f} ms (ratio {pipe_median / bare_median:.3f}); round means ms: "
         f"pipeline {[round(x * 1e3) for x in pipe.mean(axis=1)]}, forward+search "
         f"{[round(x * 1e3) for x in bare.mean(axis=1)]}; other processes' load in cores: pipeline "
         f"{loads['pipeline']}, forward+search {loads['bare']}")


def figure_rss1k(model, tokenizer, index, queries: list[str], readings: tuple[int, int] = (100, 1000)) -> None:
    """RSS after `readings[1]` pipeline calls over RSS after `readings[0]`: memory that grows with the number of
    calls (caches without bound, leaked buffers) shows as a ratio above 1."""
    from npm_hf import NonparametricFillMaskPipeline
    from npm_hf.index import process_resident_bytes

    fill = NonparametricFillMaskPipeline(model=model, tokenizer=tokenizer, index=index)
    resident, seconds = {}, {}
    load = OtherLoad()
    started = time.perf_counter()
    for call in range(1, readings[1] + 1):
        assert fill(queries[call % len(queries)])
        if call in readings:
            gc.collect()
            resident[call], seconds[call] = process_resident_bytes(), time.perf_counter() - started
            log.info(f"RSS1k: {resident[call] / 2**20:.1f} MiB resident after {call} calls")
    first, last = readings
    calls_per_second = (last - first) / (seconds[last] - seconds[first])
    emit("RSS1k", resident[last] / resident[first], "<= 1.05",
         f"RSS {resident[first] / 2**20:.1f} MiB after {first} fill-mask calls, {resident[last] / 2**20:.1f} MiB "
         f"after {last} (+{(resident[last] - resident[first]) / 2**10:.0f} KiB); {len(queries)} cloze queries in "
         f"turn, one at a time, index {index.manifest.num_tokens} tokens ({index.manifest.faiss_factory}), "
         f"{calls_per_second:.0f} calls/s, {seconds[last]:.0f}s in all; other processes' load {load.cores()} cores")


def figure_p1q(model, tokenizer, index, queries: list[str], rounds: tuple[int, int, float]) -> None:
    """The same pipeline and queries with the candidate search in Qdrant (local mode) and in FAISS, alternating."""
    from npm_hf import NonparametricFillMaskPipeline

    try:
        import qdrant_client
    except ImportError:
        log.info("P1q skipped: qdrant-client is not installed (pip install 'npm-hf[qdrant]').")
        return
    import importlib.metadata
    import warnings

    from npm_hf.vector_store import QdrantSearchIndex, upload_index

    client = qdrant_client.QdrantClient(":memory:")
    started = time.perf_counter()
    with warnings.catch_warnings():  # the local mode warns that it is not meant for collections this large
        warnings.simplefilter("ignore")
        upload_index(index, client, show_progress_bar=False)
    upload = time.perf_counter() - started
    fills = {"faiss": NonparametricFillMaskPipeline(model=model, tokenizer=tokenizer, index=index),
             "qdrant": NonparametricFillMaskPipeline(model=model, tokenizer=tokenizer,
                                                     index=QdrantSearchIndex(index, client))}
    for query in queries[:3]:  # warm-up
        for fill in fills.values():
            pipeline_seconds(fill, query)
    times = {name: np.zeros((rounds[1], len(queries))) for name in fills}
    done = 0
    for r in round_numbers(rounds):
        for name in (("qdrant", "faiss") if r % 2 == 0 else ("faiss", "qdrant")):
            gc.collect()
            time.sleep(0.2)
            for q, query in enumerate(queries):
                times[name][r, q] = pipeline_seconds(fills[name], query)
        done = r + 1
        log.info(f"P1q round {r}: qdrant {times['qdrant'][r].mean() * 1e3:.1f} ms/query, "
                 f"faiss {times['faiss'][r].mean() * 1e3:.1f} ms/query")
    best = {name: t[:done].min(axis=0).mean() for name, t in times.items()}
    median = {name: np.median(t[:done], axis=0).mean() for name, t in times.items()}
    client.close()
    emit("P1q", best["qdrant"] / best["faiss"], "report",
         f"index {index.manifest.num_indexed_tokens} indexed tokens, d={index.manifest.hidden_size}, "
         f"k={min(int(fills['faiss'].decoding.k), index.num_indexed)}, {len(queries)} queries, {done} alternating "
         "rounds; "
         f"per-query best-of: Qdrant local mode {best['qdrant'] * 1e3:.1f} ms, FAISS Flat {best['faiss'] * 1e3:.1f}"
         f" ms; medians {median['qdrant'] * 1e3:.1f} / {median['faiss'] * 1e3:.1f} ms (ratio "
         f"{median['qdrant'] / median['faiss']:.2f}); upload {upload:.1f}s (qdrant-client "
         f"{importlib.metadata.version('qdrant-client')})")


def figure_p1r(model, tokenizer, index, queries: list[str], rounds: tuple[int, int, float]) -> None:
    """The same pipeline and queries with the search in P1R_SHARDS Ray shard actors and in the local index."""
    from npm_hf import NonparametricFillMaskPipeline

    try:
        import ray
    except ImportError:
        log.info("P1r skipped: ray is not installed (pip install 'npm-hf[ray]').")
        return
    from npm_hf.serve import RayShardedIndex

    started = time.perf_counter()
    ray.init(address="local", num_cpus=P1R_SHARDS, include_dashboard=False, log_to_driver=False,
             logging_level="warning")
    try:
        with RayShardedIndex(index.path, num_shards=P1R_SHARDS) as sharded:
            start_up = time.perf_counter() - started
            fills = {"local": NonparametricFillMaskPipeline(model=model, tokenizer=tokenizer, index=index),
                     "ray": NonparametricFillMaskPipeline(model=model, tokenizer=tokenizer, index=sharded)}
            identical = sum(fills["ray"](query) == fills["local"](query) for query in queries)  # also a warm-up
            times = {name: np.zeros((rounds[1], len(queries))) for name in fills}
            done, loads = 0, {name: [] for name in fills}
            for r in round_numbers(rounds):
                for name in (("ray", "local") if r % 2 == 0 else ("local", "ray")):
                    gc.collect()
                    time.sleep(0.2)
                    load = OtherLoad()
                    for q, query in enumerate(queries):
                        times[name][r, q] = pipeline_seconds(fills[name], query)
                    loads[name].append(load.cores())
                done = r + 1
                log.info(f"P1r round {r}: ray {times['ray'][r].mean() * 1e3:.1f} ms/query, "
                         f"local {times['local'][r].mean() * 1e3:.1f} ms/query")
    finally:
        ray.shutdown()
    best = {name: t[:done].min(axis=0).mean() for name, t in times.items()}
    median = {name: np.median(t[:done], axis=0).mean() for name, t in times.items()}
    m = index.manifest
    emit("P1r", best["ray"] / best["local"], "<= 1.5",
         f"index {m.num_tokens} tokens ({m.num_indexed_tokens} indexed, {m.faiss_factory}), {P1R_SHARDS} shards "
         f"on a local Ray {ray.__version__} instance, k={min(int(fills['local'].decoding.k), index.num_indexed)}, "
         f"{len(queries)} queries, {done} alternating rounds; answers identical to the local index for {identical}"
         f"/{len(queries)} queries; per-query best-of: ray {best['ray'] * 1e3:.1f} ms, local "
         f"{best['local'] * 1e3:.1f} ms; medians {median['ray'] * 1e3:.1f} / {median['local'] * 1e3:.1f} ms (ratio "
         f"{median['ray'] / median['local']:.2f}); Ray start-up with the shards {start_up:.1f}s; other processes' "
         f"load in cores (the shard actors count as other processes): ray {loads['ray']}, local {loads['local']}")


# -------------------------------------------------------------------------------------------------------- B
def figure_p6(model, tokenizer, index, queries: list[str], rounds: tuple[int, int, float], batch: int = 32) -> None:
    """Queries per second of `fill(texts, batch_size=32)` (forward passes in length groups, one search) over one
    text at a time, the same texts, alternating the two paths round by round; the detail splits both into stages."""
    from npm_hf import NonparametricFillMaskPipeline

    fill = NonparametricFillMaskPipeline(model=model, tokenizer=tokenizer, index=index)
    texts = (queries * (batch // max(len(queries), 1) + 1))[:batch]
    fill(texts[:2], top_k=5, batch_size=2)  # warm-up
    times = {"batched": [], "single": []}
    for r in round_numbers(rounds):
        for path in (("batched", "single") if r % 2 == 0 else ("single", "batched")):
            gc.collect()
            started = time.perf_counter()
            if path == "batched":
                fill(texts, top_k=5, batch_size=batch)
            else:
                for text in texts:
                    fill(text, top_k=5)
            times[path].append(time.perf_counter() - started)
    best = {path: min(values) for path, values in times.items()}
    stages = p6_stages(fill, texts)
    breakdown = ", ".join(f"{name} {stages['batched'][name]:.1f} vs {stages['single'][name]:.1f}"
                          for name in stages["batched"])
    emit("P6", best["single"] / best["batched"], ">= 5",
         f"{batch} cloze queries, index {index.manifest.num_tokens} tokens, "
         f"k={min(fill.decoding.k, index.num_indexed)};"
         f" best of {len(times['single'])} rounds: batched {batch / best['batched']:.1f} queries/s, one at a time "
         f"{batch / best['single']:.1f} queries/s; ms per query by stage, batched vs one at a time (best of 3): "
         f"{breakdown}")


def figure_p6l(model, tokenizer, index, queries: list[str], rounds: tuple[int, int, float], batch: int = 32) -> None:
    """Queries per second of `fill(texts, batch_size=32)` over the bare floor of the same work: one padded encoder
    forward of the 32 texts (span mode's duplicated mask) and one `search_many` of their query vectors."""
    from npm_hf import NonparametricFillMaskPipeline

    fill = NonparametricFillMaskPipeline(model=model, tokenizer=tokenizer, index=index)
    k = min(int(fill.decoding.k), index.num_indexed)
    texts = (queries * (batch // max(len(queries), 1) + 1))[:batch]
    prepared = baseline_inputs(tokenizer, texts)
    width = max(ids.shape[1] for ids, _, _ in prepared)
    input_ids = torch.full((batch, width), tokenizer.pad_token_id or 0)
    attention = torch.zeros_like(input_ids)
    for row, (ids, _, _) in enumerate(prepared):
        input_ids[row, : ids.shape[1]], attention[row, : ids.shape[1]] = ids[0], 1

    def bare() -> None:
        with torch.inference_mode():
            hidden = model(input_ids=input_ids, attention_mask=attention).last_hidden_state
        vectors = np.concatenate([hidden[row, positions].float().numpy() for row, (_, _, positions)
                                  in enumerate(prepared)])
        index.search_many(vectors, k)

    fill(texts[:2], top_k=5, batch_size=2)  # warm-up
    bare()
    times = {"pipeline": [], "bare": []}
    for r in round_numbers(rounds):
        for path in (("pipeline", "bare") if r % 2 == 0 else ("bare", "pipeline")):
            gc.collect()
            started = time.perf_counter()
            fill(texts, top_k=5, batch_size=batch) if path == "pipeline" else bare()
            times[path].append(time.perf_counter() - started)
    best = {path: min(values) for path, values in times.items()}
    emit("P6l", best["bare"] / best["pipeline"], ">= 0.85",
         f"{batch} cloze queries, index {index.manifest.num_tokens} tokens, k={k}; best of "
         f"{len(times['pipeline'])} alternating rounds: fill(texts, batch_size={batch}) {batch / best['pipeline']:.1f} "
         f"queries/s, one padded forward ({width} tokens) + search_many {batch / best['bare']:.1f} queries/s")


def figure_pm(model, tokenizer, index, queries: list[str], rounds: tuple[int, int, float]) -> None:
    """NPM fill-mask seconds per query (with the BM25 pre-filter, and over the whole index) / the stock
    parametric fill-mask pipeline of a BertForMaskedLM of the same encoder shape, same queries, alternating."""
    from transformers import BertConfig, BertForMaskedLM, FillMaskPipeline

    from npm_hf import NonparametricFillMaskPipeline

    encoder = model.config.encoder
    config = BertConfig(**{key: getattr(encoder, key) for key in (
        "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
        "max_position_embeddings")})
    stock = FillMaskPipeline(model=BertForMaskedLM(config).eval(), tokenizer=tokenizer)
    paths = {"bm25": NonparametricFillMaskPipeline(model=model, tokenizer=tokenizer, index=index, prefilter="bm25"),
             "whole index": NonparametricFillMaskPipeline(model=model, tokenizer=tokenizer, index=index,
                                                          prefilter="none"),
             "stock": stock}
    for fill in paths.values():  # warm-up
        fill(queries[0], top_k=5)
    best = {name: np.full(len(queries), np.inf) for name in paths}
    names = list(paths)
    for r in round_numbers(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            gc.collect()
            for q, query in enumerate(queries):
                started = time.perf_counter()
                paths[name](query, top_k=5)
                best[name][q] = min(best[name][q], time.perf_counter() - started)
    ms = {name: values.mean() * 1e3 for name, values in best.items()}
    emit("PM", ms["bm25"] / ms["stock"], "report",
         f"ms per query (per-query best of the rounds, {len(queries)} cloze queries): NPM with prefilter='bm25' "
         f"{ms['bm25']:.1f}, NPM over the whole index ({index.manifest.num_tokens} tokens, "
         f"{index.manifest.faiss_factory}) {ms['whole index']:.1f} (ratio {ms['whole index'] / ms['stock']:.2f}), "
         f"stock FillMaskPipeline of a BertForMaskedLM of the same shape ({config.num_hidden_layers} layers, "
         f"{config.hidden_size} wide, vocabulary {config.vocab_size}) {ms['stock']:.1f}")


def p6_stages(fill, texts: list[str], repeats: int = 3) -> dict[str, dict[str, float]]:
    """Milliseconds per query of the pipeline's stages (encoder forward, search, answers: spans, phrases, decoding,
    evidence), for the whole batch at once and for batches of one text, best of `repeats`."""
    prepared = [fill.preprocess(text) for text in texts]
    stages = {path: {"forward": np.inf, "search": np.inf, "answers": np.inf} for path in ("batched", "single")}
    for _ in range(repeats):
        for path, groups in (("batched", [prepared]), ("single", [[item] for item in prepared])):
            spent = dict.fromkeys(stages[path], 0.0)
            for group in groups:
                started = time.perf_counter()
                outputs = fill.forward_batch(group)
                searched = time.perf_counter()
                fill.search_batch(outputs)
                answering = time.perf_counter()
                for output in outputs:
                    fill.postprocess(output, top_k=5)
                finished = time.perf_counter()
                for name, seconds in (("forward", searched - started), ("search", answering - searched),
                                      ("answers", finished - answering)):
                    spent[name] += seconds
            for name, seconds in spent.items():
                stages[path][name] = min(stages[path][name], seconds / len(texts) * 1e3)
    return stages


def figure_bytes(index) -> None:
    files = directory_bytes(index.path)
    shards = [s["file"] for s in index.manifest.vector_shards if s["file"] in files]
    if len(shards) > 1:  # one entry for the vectors, however many shards hold them
        files[f"vectors ({len(shards)} shards)"] = sum(files.pop(name) for name in shards)
    indexed = index.manifest.num_indexed_tokens
    total = sum(files.values())
    per_file = ", ".join(f"{name} {size / indexed:.2f}" for name, size in sorted(files.items(), key=lambda x: -x[1]))
    emit("B", total / indexed, "report",
         f"{total} bytes / {indexed} indexed tokens ({index.manifest.num_tokens} tokens, hidden "
         f"{index.manifest.hidden_size}, {index.manifest.faiss_factory}); bytes/token per file: {per_file}")


# ------------------------------------------------------------------------------------------------------- P3
def p3_factories(nlist: int, hidden: int) -> list[tuple[str, str, dict]]:
    """(label, factory, search knobs) of the compared indexes; Flat is the exact reference."""
    return [("Flat fp16", "Flat", {}), ("SQ8", "SQ8", {}),
            (f"IVF{nlist}-PQ64", f"IVF{nlist},PQ64np", {"nprobe": P3_NPROBES[0]}),  # np: no polysemous training
            (f"IVF{nlist}-PQ32", f"IVF{nlist},PQ32np", {"nprobe": P3_NPROBES[0]}),
            (f"IVF{nlist}-PQ16", f"IVF{nlist},PQ16np", {"nprobe": P3_NPROBES[0]}), ("HNSW32", "HNSW32", {})]


def approximate_index(exact, factory: str, train_size: int, path: Path):
    """An NPMIndex over the same files as `exact` with another FAISS index (trained on a sample of its vectors,
    written to `path`): the same re-scoring code path as a built index, without encoding the corpus again."""
    import faiss

    from npm_hf import NPMIndex

    index = faiss.index_factory(exact.manifest.hidden_size, factory, faiss.METRIC_INNER_PRODUCT)
    vectors = exact.vectors
    if not index.is_trained:
        sample = np.sort(np.random.default_rng(0).choice(len(vectors), min(train_size, len(vectors)), replace=False))
        index.train(np.asarray(vectors[sample], dtype=np.float32))
    for lo in range(0, len(vectors), 65536):
        index.add(np.asarray(vectors[lo : lo + 65536], dtype=np.float32))
    faiss.write_index(index, str(path))
    arrays = {"token_ids": exact.token_ids, "token_flags": exact.token_flags, "token_docs": exact.token_docs,
              "token_offsets": exact.token_offsets}
    manifest = dataclasses.replace(exact.manifest, faiss_factory=factory)
    return NPMIndex(exact.path, manifest, arrays, exact.positions, vectors, index, exact.documents)


def p3_queries(model, tokenizer, sentences: list[str]) -> np.ndarray:
    """Query vectors from real text: each sentence encoded on its own (another context than its block in the
    index, so its tokens are near, not equal, to indexed ones) gives the states of 2 tokens at 1/3 and 2/3 of it.
    (MiniLM's mask states are not NPM-trained: nearly all share the same few nearest tokens, so they would make a
    degenerate test.) Shape (num_sentences, 2, hidden)."""
    vectors = []
    with torch.inference_mode():
        for sentence in sentences:
            input_ids = torch.tensor([tokenizer(sentence, truncation=True)["input_ids"]])
            hidden = model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids)).last_hidden_state[0]
            inner = input_ids.shape[1] - 2  # without [CLS] and [SEP]
            vectors.append(hidden[[1 + inner // 3, 1 + 2 * inner // 3]].float().numpy())
    return np.stack(vectors)


def top1_agrees(approximate: tuple[np.ndarray, np.ndarray], exact: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """Whether each query's approximate top-1 is an exact top-1 (the same row, or a tie in exact score)."""
    (scores, rows), (exact_scores, exact_rows) = approximate, exact
    return (rows[:, 0] == exact_rows[:, 0]) | np.isclose(scores[:, 0], exact_scores[:, 0], rtol=1e-6, atol=0)


def faiss_only_agreement(index, query_vectors: np.ndarray, reference: list, k: int, knobs: dict) -> float:
    """Top-1 agreement of FAISS's own (approximate) scores, without the exact re-scoring from vectors.npy: what an
    index that kept only its compressed codes would answer."""
    agrees = []
    for q, want in zip(query_vectors, reference):
        rows = index.candidate_rows(q, k, **knobs)
        scores, _ = index.rescore(q, rows[:, :1])  # the exact score of FAISS's top-1, for the tie rule
        agrees.append(top1_agrees((scores, rows[:, :1]), want))
    return float(np.concatenate(agrees).mean())


def p3_measure(index, query_vectors: np.ndarray, reference: dict, knobs: dict) -> tuple[dict, dict]:
    """Top-1 agreement with exact search and median search milliseconds per query, for each k of `reference`."""
    agreement, latency = {}, {}
    for k, wanted in reference.items():
        index.search(query_vectors[0], k, **knobs)  # warm-up
        times, agrees = [], []
        for q, want in zip(query_vectors, wanted):
            began = time.perf_counter()
            got = index.search(q, k, **knobs)
            times.append(time.perf_counter() - began)
            agrees.append(top1_agrees(got, want))
        agreement[k] = float(np.concatenate(agrees).mean())
        latency[k] = statistics.median(times) * 1e3
    return agreement, latency


def p3_knob_choices(index, knobs: dict) -> list[dict]:
    """The search settings tried in turn (IVF: growing nprobe, up to the number of lists)."""
    if "nprobe" not in knobs:
        return [knobs]
    nlist = faiss_ivf_lists(index)
    return [{"nprobe": n} for n in P3_NPROBES if n <= nlist] or [{"nprobe": nlist}]


def faiss_ivf_lists(index) -> int:
    import faiss

    return faiss.extract_index_ivf(index.faiss_index).nlist


def figure_p3(model, tokenizer, exact, sentences: list[str], workdir: Path, settings: dict) -> None:
    query_vectors = p3_queries(model, tokenizer, sentences)
    smallest = None  # (FAISS bytes/token, label, agreement, knobs) of the smallest index with >= 95 % agreement
    ks = [min(k, exact.num_indexed) for k in P3_KS]
    reference = {k: [exact.search(q, k) for q in query_vectors] for k in ks}
    files = directory_bytes(exact.path)
    shared = sum(size for name, size in files.items() if name != "index.faiss")  # everything but FAISS's file
    indexed, hidden = exact.num_indexed, exact.manifest.hidden_size
    for label, factory, knobs in p3_factories(settings["p3_nlist"], hidden):
        started = time.perf_counter()
        path = workdir / f"p3-{label.replace(' ', '_')}.faiss"
        index = exact if factory == "Flat" else approximate_index(exact, factory, settings["p3_train"], path)
        faiss_bytes = files["index.faiss"] if factory == "Flat" else path.stat().st_size
        build = time.perf_counter() - started
        tried = []  # IVF: the smallest nprobe that reaches 95 % agreement at the largest k, else the largest tried
        for knobs in p3_knob_choices(index, knobs):
            agreement, latency = p3_measure(index, query_vectors, reference, knobs)
            tried.append(f"{knobs['nprobe']}: {agreement[ks[-1]]:.3f}" if knobs else "")
            if agreement[ks[-1]] >= 0.95:
                break
        ram = 4 * hidden if factory == "Flat" else faiss_bytes / indexed  # Flat holds float32 copies in RAM
        codes_only = "" if factory == "Flat" else (
            f"; without re-scoring (codes only) k={ks[-1]}: "
            f"{faiss_only_agreement(index, query_vectors, reference[ks[-1]], ks[-1], knobs):.3f}")
        if factory != "Flat" and agreement[ks[-1]] >= 0.95 and (smallest is None or ram < smallest[0]):
            smallest = (ram, label, agreement[ks[-1]], knobs)
        emit(f"P3 {label}", agreement[ks[-1]], "report",
             "top-1 agreement with exact search (after exact re-scoring) "
             + ", ".join(f"k={k}: {agreement[k]:.3f}" for k in ks) + codes_only
             + f"; disk bytes/indexed token {(shared + faiss_bytes) / indexed:.1f} (FAISS file "
             f"{faiss_bytes / indexed:.1f}, FAISS in RAM ~{ram:.1f}); median search ms per query (2 vectors) "
             + ", ".join(f"k={k}: {latency[k]:.2f}" for k in ks)
             + f"; {factory}{' nprobe=' + str(knobs['nprobe']) if knobs else ''}"
             + (f" (agreement at k={ks[-1]} by nprobe {', '.join(tried)})" if knobs else "")
             + f", {indexed} vectors of {hidden} dims, {len(query_vectors)} sentences x 2 token vectors, trained on "
             f"<= {settings['p3_train']} and filled in {build:.1f}s")
        del index
        gc.collect()
    if smallest is not None:
        emit("P3", smallest[0], "<= 64",
             f"bytes per indexed token of the smallest search index with >= 95 % top-1 agreement at k={ks[-1]}: "
             f"{smallest[1]} {smallest[3] or ''} ({smallest[2]:.3f}), the FAISS file (codes, 8-byte ids, centroids) "
             f"that sits in RAM; the float16 vectors used for the exact re-scoring ({2 * hidden} bytes/token) stay on "
             "disk, memory-mapped, and only the candidates' rows are read")
    else:
        emit("P3", float("nan"), "<= 64", "no approximate index reached 95 % top-1 agreement")


def figure_p3d(model, tokenizer, index, documents: list[dict], workdir: Path, settings: dict) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import compact_index

    compact_index.measure(model, tokenizer, index, documents, settings, None, settings["p3_queries"], workdir)


# ------------------------------------------------------------------------------------------------------- P5
def step_seconds(trainer) -> list[float]:
    """Train and return the wall time of every optimisation step but the first (warm-up)."""
    from transformers import TrainerCallback
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.times, self.began = [], None

        def on_step_begin(self, args, state, control, **kwargs):
            self.began = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.times.append(time.perf_counter() - self.began)

    timer = StepTimer()
    trainer.add_callback(timer)
    for printer in (PrinterCallback, ProgressCallback):  # stdout carries the JSON lines only
        trainer.remove_callback(printer)
    gc.collect()
    trainer.train()
    return timer.times[1:]


def figure_p5(documents, workdir: Path, settings: dict) -> None:
    from transformers import (AutoModelForMaskedLM, AutoTokenizer, DataCollatorForLanguageModeling, Trainer,
                              TrainingArguments)

    from npm_hf import NPMModel, NPMTrainer, NPMTrainingArguments, prepare_training_blocks
    from npm_hf.demo import minilm_path

    encoder = minilm_path()
    tokenizer = AutoTokenizer.from_pretrained(encoder)
    block, group, steps = settings["p5_block"], settings["p5_group"], settings["p5_steps"]
    blocks = prepare_training_blocks(documents, tokenizer, block_size=block, group_size=group)
    common = dict(max_steps=steps, per_device_train_batch_size=group, use_cpu=True, report_to="none",
                  save_strategy="no", disable_tqdm=True, logging_steps=10_000, seed=0)
    npm_times, stock_times = [], []
    for r in range(settings["p5_rounds"]):
        npm = NPMTrainer(model=NPMModel.from_encoder(encoder), train_dataset=blocks, processing_class=tokenizer,
                         args=NPMTrainingArguments(output_dir=str(workdir / "p5-npm"), **common))
        npm_times += step_seconds(npm)
        stock = Trainer(model=AutoModelForMaskedLM.from_pretrained(encoder),
                        train_dataset=blocks.select_columns(["input_ids"]),
                        data_collator=DataCollatorForLanguageModeling(tokenizer, mlm_probability=0.15),
                        args=TrainingArguments(output_dir=str(workdir / "p5-stock"), **common))
        stock_times += step_seconds(stock)
        log.info(f"P5 round {r}: NPM step {statistics.median(npm_times):.2f}s, "
                 f"stock {statistics.median(stock_times):.2f}s")
    npm_step, stock_step = statistics.median(npm_times), statistics.median(stock_times)
    tokens = group * block
    emit("P5", stock_step / npm_step, ">= 0.5",
         f"MiniLM, batch {group} x {block} tokens, {len(npm_times)} NPM and {len(stock_times)} stock steps (first of "
         f"each run skipped); median step NPM {npm_step:.2f}s ({tokens / npm_step:.0f} tok/s), stock MLM "
         f"{stock_step:.2f}s ({tokens / stock_step:.0f} tok/s); NPM runs two encoder passes (masked queries and "
         f"unmasked keys, both with gradients)")
    collator = npm.data_collator
    features = [blocks[i] for i in range(group)]
    collate_times = []
    for _ in range(10):
        started = time.perf_counter()
        collator(features)
        collate_times.append(time.perf_counter() - started)
    collate = statistics.median(collate_times)
    emit("P5c", collate / npm_step, "<= 0.05",
         f"NPMSpanCollator {collate * 1e3:.1f} ms per batch of {group} x {block} (median of 10) / NPM step "
         f"{npm_step:.2f}s")


# -------------------------------------------------------------------------------------------------------- M
def _child(script: str, *args) -> dict:
    """Run a benchmarks/ script in a process of its own; its last stdout line is a JSON object."""
    import subprocess

    result = subprocess.run([sys.executable, str(Path(__file__).with_name(script)), *map(str, args)],
                            capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{script} failed: {result.stderr[-2000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def _mb(size: float) -> str:
    return f"{size / 1e6:.0f} MB" if abs(size) >= 1e7 else f"{size / 1e6:.1f} MB"


def figure_m(documents: list[dict], workdir: Path) -> None:
    corpus = workdir / "m-corpus.jsonl"
    with open(corpus, "w", encoding="utf-8") as handle:
        for document in documents:
            handle.write(json.dumps(document, ensure_ascii=False) + "\n")
    try:
        got = _child("build_memory.py", workdir / "npm-minilm", corpus, workdir / "m-index", M_BUDGET, M_FACTORY)
    except RuntimeError as error:  # e.g. the budget refused on a machine whose libraries take more memory
        emit("M", float("nan"), "<= 1", f"build failed under --max-memory {M_BUDGET}: {error}")
        return
    plan = got["plan"]
    capped = min(got["num_indexed"], 1_000_000) > got["train_sample_fits"]
    emit("M", got["peak_rss"] / got["budget"], "<= 1",
         f"peak RSS {_mb(got['peak_rss'])} (VmHWM; peak anonymous {_mb(got['peak_anonymous'])}, sampled) / "
         f"--max-memory {M_BUDGET}; {got['num_indexed']} vectors, {got['factory']}, training sample "
         f"{'capped to ' + str(got['train_sample_fits']) if capped else 'not capped'}, {got['seconds']}s. Process "
         f"after imports {_mb(got['after_imports'])}, model alone +{_mb(got['after_model'] - got['after_imports'])}; "
         f"the build's plan: resident at start {_mb(plan['baseline'])} + encoding {_mb(plan['encoding'])} + "
         f"{_mb(plan['available_for_faiss'])} left for FAISS; vectors on disk {_mb(got['vectors_bytes'])}")


def figure_m2(documents: list[dict], workdir: Path) -> None:
    corpus = workdir / "m2-corpus.jsonl"
    with open(corpus, "w", encoding="utf-8") as handle:
        for document in documents:
            handle.write(json.dumps(document, ensure_ascii=False) + "\n")
    got = _child("corpus_memory.py", "blocks", workdir / "npm-minilm", corpus, workdir, 2)
    first, second = got["runs"]
    added, again = first["peak"] - first["before"], second["peak"] - second["before"]
    emit("M2", added / got["text_bytes"], "<= 1",
         f"the first prepare_training_blocks call of the process added {_mb(added)} at its peak (VmHWM "
         f"{_mb(first['peak'])} - {_mb(first['before'])} resident before; anonymous "
         f"+{_mb(first['peak_anonymous'] - first['before_anonymous'])}, sampled) / {_mb(got['text_bytes'])} of text "
         f"in {len(documents)} documents ({corpus.stat().st_size / 1e6:.1f} MB of .jsonl, read as it streams); "
         f"{first['count']} blocks of 256 tokens in groups of 16 into a memory-mapped Arrow file, "
         f"{first['seconds']}s. The same call again in that process: +{_mb(again)} "
         f"({again / got['text_bytes']:.2f} of the text; {second['seconds']}s): the first call's extra is a one-time "
         "cost (lazy imports, the tokenizer's thread pool, allocator arenas), not the corpus's")


# ------------------------------------------------------------------------------------------------------- P4
def bench_cache() -> Path:
    return Path(os.environ.get("NPM_HF_BENCH_CACHE", Path.home() / ".cache" / "npm_hf_bench"))


def figure_p4(settings: dict) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import synthetic_index

    small, large = settings["p4_sizes"]
    directories, stats, rounds = {}, {}, {small: [], large: []}
    for size in (small, large):
        directories[size] = bench_cache() / f"synthetic-{size:.0e}".replace("+0", "").replace("+", "")
        log.info(f"P4: synthetic index of {size} vectors at {directories[size]} (written once, then cached)")
        stats[size] = synthetic_index.ensure(directories[size], size)
    for _ in range(P4_ROUNDS):  # alternating, each in a fresh process; the best p50 of each (noise only adds time)
        for size in (small, large):
            rounds[size].append(_child("search_scaling.py", directories[size], P4_NPROBE, P4_K,
                                       settings["p4_queries"]))
    results = {size: min(runs, key=lambda run: run["p50_seconds"]) for size, runs in rounds.items()}
    big = results[large]
    grew = {name: big["memory_after_load"][name] - big["memory_before_load"][name] for name in ("VmRSS", "RssAnon")}
    data = sum(big["index_bytes"].values())
    emit("P4", big["p50_seconds"] / results[small]["p50_seconds"], "<= 3",
         f"p50 NPMIndex.search {big['p50_seconds'] * 1e3:.1f} ms at {large} vectors ({big['factory']}) / "
         f"{results[small]['p50_seconds'] * 1e3:.1f} ms at {small} ({results[small]['factory']}); nprobe "
         f"{P4_NPROBE}, k {P4_K}, query of 2 vectors, {big['num_queries']} queries after 10 warm-up (p90 "
         f"{big['p90_seconds'] * 1e3:.1f} / {results[small]['p90_seconds'] * 1e3:.1f} ms; first query "
         f"{big['first_query_seconds'] * 1e3:.0f} / {results[small]['first_query_seconds'] * 1e3:.0f} ms; best of "
         f"{P4_ROUNDS} alternating rounds, p50s ms {[round(r['p50_seconds'] * 1e3, 1) for r in rounds[large]]} / "
         f"{[round(r['p50_seconds'] * 1e3, 1) for r in rounds[small]]}). "
         f"NPMIndex.load of {large}: {big['load_seconds']}s, RSS +{_mb(grew['VmRSS'])} (anonymous "
         f"+{_mb(grew['RssAnon'])}) for {_mb(data)} on disk (vectors {_mb(big['index_bytes']['vectors.npy'])}, "
         f"index.faiss {_mb(big['index_bytes']['index.faiss'])}); after the searches RSS "
         f"{_mb(big['memory_after_search']['VmRSS'])}, of which mapped file pages "
         f"{_mb(big['memory_after_search']['RssFile'])} (page cache, reclaimable). Synthetic clustered vectors, "
         f"IVF centroids = generating centres (agreement with FAISS's assignment on a sample: "
         f"{stats[large]['assignment_agreement']:.3f})")


# ------------------------------------------------------------------------------------------------------- PE
def figure_pe(model, tokenizer, index, spare: list[dict], workdir: Path, rounds: tuple[int, int, float],
              token_range: tuple[int, int] = (200, 600)) -> None:
    """Adding one document to the index (append segment) / encoding that document's blocks alone."""
    from npm_hf import NPMIndex
    from npm_hf.corpus import CorpusStats, tokenize_documents

    copy = workdir / "pe-index"
    shutil.copytree(index.path, copy, copy_function=os.link)  # edits never write in place: the P1 index is safe
    edited = NPMIndex.load(copy, verify="none")
    pad_id = model.config.encoder.pad_token_id or 0
    counts = token_counts(spare, tokenizer)
    chosen = [d for d, c in zip(spare, counts) if token_range[0] <= c <= token_range[1] and d["text"].strip()]
    warmup = torch.full((1, BLOCK_SIZE), tokenizer.unk_token_id or 100, dtype=torch.long)
    bare_forward_seconds(model, [(warmup, torch.ones_like(warmup))])
    add_times, bare_times, loads, sizes = [], [], [], []
    for r in round_numbers((rounds[0] + 1, rounds[1] + 1, rounds[2])):
        document = dict(chosen[r % len(chosen)], id=f"pe-{r}")
        ((_, records),) = list(tokenize_documents([document], tokenizer, CorpusStats(), block_size=BLOCK_SIZE))
        batches = pack_batches(records["id"].astype(np.int64), records["flags"], pad_id)
        load = OtherLoad()
        for what in (("add", "bare") if r % 2 == 0 else ("bare", "add")):
            gc.collect()
            if what == "add":
                started = time.perf_counter()
                edited.add_documents(model, tokenizer, [document], batch_size=BATCH_SIZE)
                add_times.append(time.perf_counter() - started)
            else:
                bare_times.append(bare_forward_seconds(model, batches))
        loads.append(load.cores())
        sizes.append(len(records))
        log.info(f"PE round {r}: add {add_times[-1]:.3f}s, bare forward {bare_times[-1]:.3f}s ({len(records)} tokens)")
    ratios = [add / bare for add, bare in zip(add_times, bare_times)]
    emit("PE", statistics.median(ratios[1:]), "<= 2",
         f"1 document of {min(sizes[1:])}-{max(sizes[1:])} tokens added to an index of {index.manifest.num_tokens} "
         f"tokens ({index.manifest.faiss_factory}), median of {len(ratios) - 1} alternating rounds' ratios "
         f"{[round(x, 2) for x in ratios[1:]]} (add s {[round(t, 3) for t in add_times[1:]]}, bare forward s "
         f"{[round(t, 3) for t in bare_times[1:]]}); the first add {add_times[0]:.3f}s / {bare_times[0]:.3f}s = "
         f"{ratios[0]:.2f} (reads every document id and fingerprints the model once); other processes' load in "
         f"cores {loads}")
    del edited
    shutil.rmtree(copy, ignore_errors=True)


# ------------------------------------------------------------------------------------------------------- P7
def figure_p7(index, model_dir: Path, query: str, repeats: int = 3) -> None:
    """Start-up of a BM25 pre-filtered pipeline (the BM25 index saved with the index, memory-mapped) / without a
    pre-filter, each in fresh processes (best of `repeats`); the detail adds the start-up when every passage is
    indexed at start-up instead, and the pre-filter's own first use (time; memory: the Python heap it keeps plus
    the pages of the memory-mapped index files it read, / the block texts)."""
    from npm_hf.inference.prefilter import passage_ranges, passage_texts

    settings = ("none", "bm25", "bm25-in-memory", "bm25-cost", "bm25-in-memory-cost")
    runs = {name: [] for name in settings}
    for _ in range(repeats):  # alternating
        for name in settings:
            runs[name].append(_child("prefilter_startup.py", model_dir, index.path, name, query))
    heap = {name: _child("prefilter_startup.py", model_dir, index.path, f"{name}-heap", query)
            for name in ("bm25", "bm25-in-memory")}
    best = {name: min(run["seconds"] for run in got) for name, got in runs.items()}
    parts = ("rss", "rss_anonymous", "rss_index_files", "rss_other_files")
    least = {name: {key: min(run[key] for run in runs[f"{name}-cost"]) for key in parts}
             for name in ("bm25", "bm25-in-memory")}
    memory = {name: heap[name]["heap"] + least[name]["rss_index_files"] for name in heap}
    texts = sum(len(text.encode("utf-8")) for text in passage_texts(index, passage_ranges(index)))
    by_file = min(runs["bm25-cost"], key=lambda run: run["rss_index_files"])["index_pages_by_file"]
    by_file = ", ".join(f"{name} +{size / 1e3:.0f} kB" for name, size in sorted(by_file.items(), key=lambda x: -x[1]))

    def costs(name: str) -> str:
        return (f"{best[name + '-cost']:.3f}s, heap kept +{_mb(heap[name]['heap'])} "
                f"(peak {_mb(heap[name]['heap_peak'])}) + index pages read +{_mb(least[name]['rss_index_files'])} = {_mb(memory[name])}, "
                f"{memory[name] / texts:.3f} of the block texts (RSS +{_mb(least[name]['rss'])}: anonymous "
                f"+{_mb(least[name]['rss_anonymous'])}, other files first touched such as libraries "
                f"+{_mb(least[name]['rss_other_files'])})")

    emit("P7", best["bm25"] / best["none"], "<= 1.1 (and <= 2 s; pre-filter memory <= 0.1 of the block texts)",
         f"start-up (index load, pipeline, first answer; best of {repeats} fresh processes) with prefilter='bm25' "
         f"{best['bm25']:.2f}s / prefilter='none' {best['none']:.2f}s, {index.manifest.num_tokens} tokens "
         f"({index.num_indexed} vectors, {index.manifest.faiss_factory}); with every passage indexed at start-up "
         f"instead (before the BM25 index was saved) {best['bm25-in-memory']:.2f}s. The pre-filter's first use "
         f"alone (after an unfiltered answer), block texts {_mb(texts)}: saved and memory-mapped {costs('bm25')}; "
         f"indexed in memory {costs('bm25-in-memory')}. Index pages the saved one read, by file: {by_file}")


# ----------------------------------------------------------------------------------------------------- main
def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="Smaller corpora and fewer rounds (< 5 minutes).")
    parser.add_argument("--figures", default=None,
                        help=f"Comma-separated figures to measure (default: all of {','.join(FIGURES)}, with "
                             f"--quick all but {','.join(NOT_QUICK)}; opt-in: P1q, P4).")
    args = parser.parse_args(argv)
    settings = SETTINGS["quick" if args.quick else "full"]
    default = [name for name in FIGURES if not (args.quick and name in NOT_QUICK)]
    chosen = args.figures if args.figures is not None else ",".join(default)
    figures = {name.strip().upper() for name in chosen.split(",") if name.strip()}
    if not figures or figures - set(FIGURES) - set(OPT_IN_FIGURES):
        parser.error(f"--figures takes names among {', '.join(FIGURES + OPT_IN_FIGURES)}; got {chosen!r}.")

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
    quiet_libraries()

    started = time.perf_counter()
    documents = load_corpus()
    with tempfile.TemporaryDirectory(prefix="npm_hf-bench-") as tmp:
        workdir = Path(tmp)
        model, tokenizer = make_model(workdir)
        counts = token_counts(documents, tokenizer)
        log.info(f"Corpus: {len(documents)} documents, {sum(counts)} tokens; torch threads {torch.get_num_threads()}")

        if "P2" in figures:
            figure_p2(model, tokenizer, take_documents(documents, counts, settings["p2_tokens"]), workdir,
                      settings["p2_rounds"])

        if figures & {"P1", "B", "P3", "P6", "P1Q", "P7", "P6L", "PM", "RSS1K", "P1R", "PE", "P3D"}:
            p1_documents = take_documents(documents, counts, settings["p1_tokens"])
            seconds, index = build_seconds(model, tokenizer, p1_documents, workdir / "p1-index")
            log.info(f"P1 index: {index.manifest.num_tokens} tokens built in {seconds:.1f}s")
            if "P1" in figures:
                queries = cloze_queries(p1_documents, tokenizer.mask_token, settings["p1_queries"])
                figure_p1(model, tokenizer, index, queries, settings["p1_rounds"])
            if "P1Q" in figures:
                figure_p1q(model, tokenizer, index, cloze_queries(p1_documents, tokenizer.mask_token,
                                                                  settings["p1_queries"]), settings["p1_rounds"])
            if "P1R" in figures:
                figure_p1r(model, tokenizer, index, cloze_queries(p1_documents, tokenizer.mask_token,
                                                                  settings["p1_queries"]), settings["p1_rounds"])
            if "B" in figures:
                figure_bytes(index)
            if "PE" in figures:
                taken = {d["id"] for d in p1_documents}
                figure_pe(model, tokenizer, index, [d for d in documents if d["id"] not in taken], workdir,
                          settings["p1_rounds"])
            if "P7" in figures:
                figure_p7(index, workdir / "npm-minilm", cloze_queries(p1_documents, tokenizer.mask_token, 1)[0])
            if "RSS1K" in figures:
                figure_rss1k(model, tokenizer, index, cloze_queries(p1_documents, tokenizer.mask_token, 50))
            if "P6" in figures:
                figure_p6(model, tokenizer, index, cloze_queries(p1_documents, tokenizer.mask_token, 32),
                          settings["p1_rounds"])
            if "P6L" in figures:
                figure_p6l(model, tokenizer, index, cloze_queries(p1_documents, tokenizer.mask_token, 32),
                           settings["p1_rounds"])
            if "PM" in figures:
                figure_pm(model, tokenizer, index, cloze_queries(p1_documents, tokenizer.mask_token,
                                                                 settings["p1_queries"]), settings["p1_rounds"])
            if "P3" in figures:
                started_p3 = time.perf_counter()
                sentences = cloze_queries(p1_documents, None, settings["p3_queries"])
                figure_p3(model, tokenizer, index, sentences, workdir, settings)
                log.info(f"P3 took {time.perf_counter() - started_p3:.0f}s")
            if "P3D" in figures:
                figure_p3d(model, tokenizer, index, p1_documents, workdir, settings)
            del index
            gc.collect()
        if "P5" in figures:
            figure_p5(take_documents(documents, counts, settings["p2_tokens"]), workdir, settings)
        if "M" in figures:
            figure_m(take_documents(documents, counts, settings["m_tokens"]), workdir)
        if "M2" in figures:
            figure_m2(take_documents(documents, counts, settings["p1_tokens"]), workdir)
        if "P4" in figures:
            figure_p4(settings)
    log.info(f"Done in {time.perf_counter() - started:.0f}s")


if __name__ == "__main__":
    main()
