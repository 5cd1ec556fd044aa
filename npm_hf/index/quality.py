"""How well an approximate index finds what exact search finds: the agreement the model card reports."""

import numpy as np

from ..inference.faiss_io import streamed_exact_search
from ..inference.vector_codes import NO_VECTORS


# exact search over more vectors than this, for the agreement's reference, takes too long to do at every build
AGREEMENT_MAX_VECTORS = 1 << 22


def top1_agreement(index, num_queries: int = 64, k: int = 4096, nprobe: int | None = None,
                   ef_search: int | None = None, seed: int = 0) -> dict | None:
    """Top-1 agreement of `index.search` (FAISS candidates, re-scored exactly) with exact search, on `num_queries`
    stored vectors drawn at random and used as queries (a tie with the exact best score counts as agreement).
    Returns the card facts `top1_agreement` and `agreement_measured_on`, or None for an exact index (nothing to
    measure) or one of more than AGREEMENT_MAX_VECTORS vectors."""
    codes = index.manifest.vector_codes
    if index.manifest.vector_dtype == NO_VECTORS and "top1_agreement" in codes:  # measured at build, against the
        return {name: codes[name] for name in ("top1_agreement", "agreement_measured_on")}  # float16 vectors
    if index.exact_search or not 0 < index.num_indexed <= AGREEMENT_MAX_VECTORS:
        return None
    if num_queries < 1 or k < 1:
        raise ValueError(f"num_queries and k must be >= 1, got {num_queries} and {k}.")
    rows = np.random.default_rng(seed).choice(index.num_indexed, size=min(num_queries, index.num_indexed),
                                              replace=False)
    queries = index.vectors_for_rows(np.sort(rows))
    best, _ = streamed_exact_search(index.vectors, queries, 1)
    found, _ = index.search(queries, k, nprobe=nprobe, ef_search=ef_search)
    agree = found[:, 0] >= best[:, 0] - 1e-5 * np.maximum(np.abs(best[:, 0]), 1.0)
    knobs = "".join(f", {name}={value}" for name, value in (("nprobe", nprobe), ("ef_search", ef_search)) if value)
    return {"top1_agreement": round(float(agree.mean()), 3),
            "agreement_measured_on": f"{len(queries)} stored vectors as queries, k={k}{knobs}"}
