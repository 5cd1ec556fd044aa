"""Child process of figure P4 (benchmarks/run.py): open a synthetic index (benchmarks/synthetic_index.py) in a fresh
process, report the memory its load took, and time `NPMIndex.search` query by query.

    python benchmarks/search_scaling.py INDEX_DIR NPROBE K NUM_QUERIES

Each query is 2 vectors (NPM's span mode searches a start and an end vector per mask) drawn like the indexed ones
but not among them. Prints one JSON object: resident and anonymous bytes before and after `NPMIndex.load`, after
the searches, load seconds, and search latencies (warm-up queries excluded, the first one reported apart).
"""

import json
import statistics
import sys
import time
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
WARM_UP = 10


def memory() -> dict:
    values = {}
    with open("/proc/self/status") as handle:
        for line in handle:
            name, _, rest = line.partition(":")
            if name in ("VmRSS", "RssAnon", "RssFile"):
                values[name] = int(rest.split()[0]) * 1024
    return values


def main(directory: str, nprobe: int, k: int, num_queries: int) -> None:
    import importlib

    import numpy as np

    importlib.import_module("faiss")  # loaded before the baseline: the library is not the index

    import synthetic_index
    from npm_hf.index import NPMIndex

    before = memory()
    started = time.perf_counter()
    index = NPMIndex.load(directory, verify="none")
    load_seconds = time.perf_counter() - started
    after_load = memory()
    nlist = int(index.manifest.faiss_factory.split(",")[0][3:])
    centres = synthetic_index._centres(nlist, seed=0)
    queries, _ = synthetic_index._chunk_vectors(centres, 10**12, 10**12 + 2 * (num_queries + WARM_UP), seed=0)
    queries = queries.astype(np.float32).reshape(-1, 2, queries.shape[1])
    times = []
    for pair in queries:
        started = time.perf_counter()
        scores, rows = index.search(pair, k, nprobe=nprobe)
        times.append(time.perf_counter() - started)
        assert rows.shape == (2, min(k, index.num_indexed))
    measured = times[WARM_UP:]
    print(json.dumps({
        "num_vectors": index.num_indexed, "factory": index.manifest.faiss_factory, "nprobe": nprobe, "k": k,
        "memory_before_load": before, "memory_after_load": after_load, "memory_after_search": memory(),
        "load_seconds": round(load_seconds, 3), "first_query_seconds": round(times[0], 4),
        "p50_seconds": statistics.median(measured), "p90_seconds": float(np.percentile(measured, 90)),
        "num_queries": len(measured),
        "index_bytes": {p.name: p.stat().st_size for p in Path(directory).iterdir()},
    }))


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))
