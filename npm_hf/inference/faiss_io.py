"""Reading and searching the FAISS index of an NPM index: memory-mapped codes, IVF lists merged on disk, the search
knobs (`nprobe`, `ef_search`) and exact search streamed over float16 vectors too large to fill into FAISS."""

from pathlib import Path

import faiss
import numpy as np

from .index_files import IVFDATA_FILE
from .validation import FLAT_FOURCCS


FAISS_ADD_CHUNK = 65536  # vectors added to FAISS at a time (a float32 copy of each chunk)
# Flat (exact) indexes up to this many vectors are filled into FAISS when loaded (a float32 copy in RAM, 1.5 GiB at
# d=384: fast searches); larger ones are searched chunk by chunk over the memory-mapped float16 vectors instead.
FLAT_FILL_MAX_VECTORS = 1 << 20
STREAM_CHUNK_ROWS = 1 << 16


def is_flat(index) -> bool:
    return isinstance(faiss.downcast_index(index), faiss.IndexFlat)


def add_vectors(index, vectors: np.ndarray, start: int = 0) -> None:
    """Add `vectors[start:]` (float16, memory-mapped) to a FAISS index, a float32 chunk at a time. A non-finite
    value (a flipped bit in the file, an encoder that overflowed) raises ValueError naming its row: FAISS would
    rank it silently."""
    for lo in range(start, len(vectors), FAISS_ADD_CHUNK):
        chunk = np.asarray(vectors[lo : lo + FAISS_ADD_CHUNK], dtype=np.float32)
        check_finite_rows(chunk, lo)
        index.add(chunk)


def check_finite_rows(rows: np.ndarray, first_row: int = 0) -> None:
    """Raise ValueError naming the first row of `rows` (numbered from `first_row`) that holds a NaN or inf."""
    finite = np.isfinite(rows).all(axis=tuple(range(1, rows.ndim)))
    if not finite.all():
        raise ValueError(f"vector row {first_row + int(np.argmin(finite))} holds non-finite values (NaN or inf)")


def read_faiss_index(path: Path, mapped: bool = True):
    """Read index.faiss with its codes and inverted lists memory-mapped from the files, not copied into RAM: a
    10^7-vector IVF index opens in milliseconds and only the lists a search visits are paged in. An IVF index merged
    on disk (see `npm_hf.index.build`) maps the index.ivfdata beside it, read-only, wherever the directory has moved.
    `mapped=False` reads the codes of other indexes into memory, where they can grow (edits)."""
    on_disk = _read_on_disk_ivf(Path(path))
    if on_disk is not None:
        return on_disk
    with open(path, "rb") as handle:  # flat indexes are stored empty and filled at load: read plainly, growable
        fourcc = handle.read(4)
    flags = 0 if fourcc in FLAT_FOURCCS or not mapped else faiss.IO_FLAG_MMAP_IFC | faiss.IO_FLAG_READ_ONLY
    return faiss.read_index(str(path), flags)


def streamed_exact_search(vectors, queries: np.ndarray, k: int,
                          chunk_rows: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k inner products of `queries` with all `vectors` (float16 rows, e.g. memory-mapped shards),
    chunk by chunk with a running top-k, as FAISS's IndexFlatIP would return them (best first) without a float32
    copy of the vectors in memory."""
    chunk_rows = chunk_rows or STREAM_CHUNK_ROWS
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    best_scores = np.full((len(queries), 0), -np.inf, dtype=np.float32)
    best_rows = np.zeros((len(queries), 0), dtype=np.int64)
    for lo in range(0, len(vectors), chunk_rows):
        chunk = np.asarray(vectors[lo : lo + chunk_rows], dtype=np.float32)
        chunk_scores = queries @ chunk.T
        if not np.isfinite(chunk_scores).all():  # (finite queries:) a non-finite vector; name it
            check_finite_rows(chunk, lo)
        scores = np.concatenate([best_scores, chunk_scores], axis=1)
        rows = np.concatenate([best_rows, np.broadcast_to(np.arange(lo, lo + len(chunk)), (len(queries), len(chunk)))],
                              axis=1)
        if scores.shape[1] > k:
            keep = np.argpartition(-scores, k - 1, axis=1)[:, :k]
            scores, rows = np.take_along_axis(scores, keep, axis=1), np.take_along_axis(rows, keep, axis=1)
        best_scores, best_rows = scores, rows
    order = np.lexsort((best_rows, -best_scores), axis=1)  # best first; ties by row, as FAISS
    return np.take_along_axis(best_scores, order, axis=1), np.take_along_axis(best_rows, order, axis=1)


def _read_on_disk_ivf(path: Path):
    """The IVF index at `path` with its lists mapped from the index.ivfdata beside it; None for other indexes."""
    ivfdata = path.parent / IVFDATA_FILE
    if not ivfdata.is_file():
        return None
    # Not IO_FLAG_ONDISK_SAME_DIR: it does the same, but prints to stdout (e.g. into `fill-mask --json`).
    index = faiss.read_index(str(path), faiss.IO_FLAG_SKIP_IVF_DATA)
    ivf = extract_ivf(index)
    lists = None if ivf is None else faiss.downcast_InvertedLists(ivf.invlists)
    if not isinstance(lists, faiss.OnDiskInvertedLists):
        return None
    lists.filename = str(ivfdata)
    lists.read_only = True
    lists.do_mmap()
    return index


def core_index(index):
    """The index under pre-transforms (OPQ, PCA) and id maps, downcast to its concrete type."""
    index = faiss.downcast_index(index)
    while isinstance(index, (faiss.IndexPreTransform, faiss.IndexIDMap)):
        index = faiss.downcast_index(index.index)
    return index


def extract_ivf(index):
    """The IVF index inside `index` (None: not an IVF index); of an edited index's IndexShards, the base's."""
    joined = faiss.downcast_index(index)
    if isinstance(joined, faiss.IndexShards):
        index = joined.at(0)
    try:
        return faiss.downcast_index(faiss.extract_index_ivf(index))
    except RuntimeError:  # not an IVF index
        return None


def is_on_disk(faiss_index) -> bool:
    """Whether `faiss_index` is an IVF index whose inverted lists are mapped from an index.ivfdata file."""
    ivf = extract_ivf(faiss_index)
    return ivf is not None and isinstance(faiss.downcast_InvertedLists(ivf.invlists), faiss.OnDiskInvertedLists)


def search_parameter_names(index) -> dict:
    """Which FAISS ParameterSpace names `nprobe` and `ef_search` map to for `index` (absent: not applicable)."""
    names = {}
    ivf = extract_ivf(index)
    if ivf is not None:
        names["nprobe"] = "nprobe"
        if hasattr(core_index(ivf.quantizer), "hnsw"):
            names["ef_search"] = "quantizer_efSearch"
    elif hasattr(core_index(index), "hnsw"):
        names["ef_search"] = "efSearch"
    return names


def current_search_parameters(index) -> dict:
    """FAISS's own values of the tunable search parameters of `index` (restored when a call sets none)."""
    values = {}
    ivf = extract_ivf(index)
    names = search_parameter_names(index)
    if "nprobe" in names:
        values["nprobe"] = ivf.nprobe
    if names.get("ef_search") == "quantizer_efSearch":
        values["ef_search"] = core_index(ivf.quantizer).hnsw.efSearch
    elif "ef_search" in names:
        values["ef_search"] = core_index(index).hnsw.efSearch
    return values


def check_positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}.")
