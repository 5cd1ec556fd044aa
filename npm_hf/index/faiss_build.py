"""Choosing, training, filling and writing the FAISS index of a build or an edit: factory choice, training-size
checks, and IVF inverted lists merged on disk."""

import os
from pathlib import Path

import faiss
import numpy as np
from faiss.contrib import ondisk
from transformers.utils import logging

from ..inference.faiss_io import core_index, extract_ivf
from ..inference.index_files import FAISS_FILE, IVFDATA_FILE, NPMIndexError


logger = logging.get_logger(__name__)

# FAISS's k-means asks for this many training points per centroid (it warns below); fewer than 1 per centroid fails.
POINTS_PER_CENTROID = 39
# suggest_faiss_factory: exact search up to this many vectors (FAISS's own guideline for IndexFlat is ~1M).
_FLAT_MAX_VECTORS = 1_000_000


def new_faiss_index(hidden_size: int, factory: str):
    try:
        return faiss.index_factory(hidden_size, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as error:
        raise ValueError(f"Invalid FAISS factory string {factory!r}: {error}") from None


def ivf_lists(num_vectors: int) -> int:
    """A power of two near 4·sqrt(n) (FAISS's guideline is 4-16·sqrt(n)), with >= 39 training points per list."""
    wanted = 4 * num_vectors**0.5
    nlist = 1 << max(0, round(np.log2(wanted)))
    while nlist > 1 and nlist * POINTS_PER_CENTROID > num_vectors:
        nlist //= 2
    return nlist


def suggest_faiss_factory(num_vectors: int, hidden_size: int, memory_budget_bytes: int | None = None) -> str:
    """A FAISS factory string for `num_vectors` token vectors of `hidden_size` dimensions.

    Exact `Flat` (4·d bytes per vector in RAM) up to a million vectors when it fits the budget; above, an IVF index
    with about 4·sqrt(n) lists and 1-byte scalar quantization (`IVF{n},SQ8`, d bytes per vector), or, when that
    does not fit `memory_budget_bytes`, product quantization with the largest code that does (`IVF{n},PQ{m}np`, m
    bytes). Approximate candidates are re-scored exactly from the stored vectors, memory-mapped and not counted.
    """
    if num_vectors < 1 or hidden_size < 1:
        raise ValueError(f"Need num_vectors >= 1 and hidden_size >= 1, got {num_vectors} and {hidden_size}.")
    flat_bytes = 4 * hidden_size * num_vectors
    fits = lambda size: memory_budget_bytes is None or size <= memory_budget_bytes  # noqa: E731
    if num_vectors <= _FLAT_MAX_VECTORS and fits(flat_bytes):
        return "Flat"
    nlist = ivf_lists(num_vectors)
    codes = [(hidden_size, "SQ8")] if nlist >= 2 else []
    if num_vectors >= 256 * POINTS_PER_CENTROID:  # enough to train 256 PQ centroids well
        # "np": no polysemous training, which only serves Hamming pre-filtering (candidates are re-scored exactly
        # here instead) and takes minutes.
        codes += [(m, f"PQ{m}np") for m in (64, 48, 32, 24, 16, 8) if hidden_size % m == 0 and m < hidden_size]
    for code_bytes, codec in codes:
        if fits(num_vectors * (code_bytes + 8) + 4 * hidden_size * nlist):  # + 8-byte ids, + the centroids
            return f"IVF{nlist},{codec}"
    if not codes and fits(flat_bytes):
        return "Flat"  # too few vectors to train any quantizer
    raise ValueError(
        f"No FAISS index over {num_vectors} vectors of dimension {hidden_size} fits {memory_budget_bytes} bytes "
        f"(exact search needs {flat_bytes}); raise the budget (--max-memory)."
    )


def faiss_training_minimum(index) -> tuple[int, int, str]:
    """(fewest training vectors FAISS accepts, fewest it trains well on, what needs them) for an untrained index;
    (0, 0, "") when it needs no training."""
    if index.is_trained:
        return 0, 0, ""
    needs = []  # (clusters, what)
    top = faiss.downcast_index(index)
    if isinstance(top, faiss.IndexPreTransform):
        for j in range(top.chain.size()):
            if isinstance(faiss.downcast_VectorTransform(top.chain.at(j)), faiss.OPQMatrix):
                needs.append((256, "OPQ rotation: 256 centroids per sub-quantizer"))
    core = extract_ivf(index) or core_index(index)
    if hasattr(core, "nlist"):
        needs.append((core.nlist, f"IVF{core.nlist}: one k-means centroid per list"))
    storage = faiss.downcast_index(core.storage) if hasattr(core, "storage") else core  # HNSW over PQ codes
    pq = getattr(storage, "pq", None)
    if pq is not None:
        needs.append((1 << pq.nbits, f"PQ{pq.M}x{pq.nbits}: {1 << pq.nbits} centroids per sub-quantizer"))
    if not needs:
        return 1, 1, "training"
    clusters, what = max(needs)
    return clusters, clusters * POINTS_PER_CENTROID, what


def check_training_size(index, factory: str, num_vectors: int, train_sample_size: int) -> None:
    """Raise NPMIndexError before any training when FAISS could not train `index` on the vectors available."""
    minimum, recommended, what = faiss_training_minimum(index)
    available = min(num_vectors, train_sample_size)
    if available >= recommended:
        return
    limit = f" (train_sample_size={train_sample_size})" if train_sample_size < num_vectors else ""
    if available >= minimum:
        logger.warning(f"Training FAISS {factory!r} on {available} vectors{limit}; {what} trains well from "
                       f"{recommended} vectors on (FAISS warns below). Results may be poor: consider fewer lists.")
        return
    hint = f"'IVF{ivf_lists(num_vectors)},SQ8'" if num_vectors >= 2 * POINTS_PER_CENTROID else "nothing but Flat"
    raise NPMIndexError(
        f"The FAISS factory {factory!r} needs at least {minimum} training vectors ({what}), but only {available} "
        f"are available{limit} ({num_vectors} indexed tokens). Use fewer IVF lists or a smaller PQ (this corpus "
        f"fits {hint}), 'Flat' (exact search, best for small corpora), or faiss_factory='auto' "
        "(CLI: --faiss-factory auto)."
    )


def write_index_atomically(faiss_index, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    faiss.write_index(faiss_index, str(tmp))
    os.replace(tmp, path)


def load_lists_into_memory(faiss_index) -> None:
    """Replace the on-disk inverted lists of `faiss_index` by an in-memory copy (edits never touch the file)."""
    ivf = extract_ivf(faiss_index)
    source = ivf.invlists
    lists = faiss.ArrayInvertedLists(ivf.nlist, ivf.code_size)
    for i in range(ivf.nlist):
        size = source.list_size(i)
        if size:
            lists.add_entries(i, size, source.get_ids(i), source.get_codes(i))
    ivf.replace_invlists(lists, True)
    lists.this.disown()


def write_on_disk(faiss_index, directory: Path) -> None:
    """Write `faiss_index` (IVF, in memory) to `directory` as index.faiss + index.ivfdata."""
    part = directory / "part.tmp.faiss"
    faiss.write_index(faiss_index, str(part))
    empty = faiss.clone_index(faiss_index)
    empty.reset()
    merge_on_disk(empty, [part], directory)
    part.unlink()


def merge_on_disk(empty_index, parts: list[Path], directory: Path) -> None:
    """Merge the inverted lists of the IVF index files `parts` into `directory`/index.ivfdata, with `empty_index`
    (trained, no vectors) written as `directory`/index.faiss pointing at them."""
    ondisk.merge_ondisk(empty_index, [str(p) for p in parts], str(directory / IVFDATA_FILE))
    # FAISS records the lists' file by the path it was merged at (this build's folder, on this machine): store the
    # bare name instead, so that no local path travels with the index and identical builds give identical bytes.
    # `read_faiss_index` maps the index.ivfdata beside index.faiss wherever the directory is.
    faiss.downcast_InvertedLists(extract_ivf(empty_index).invlists).filename = IVFDATA_FILE
    faiss.write_index(empty_index, str(directory / FAISS_FILE))
