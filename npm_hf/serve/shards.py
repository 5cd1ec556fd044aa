"""One shard of an index: the vector rows [lo, hi) of an index directory, searched by the index's own code.

A `ShardSearcher` opens the index with `NPMIndex.load` (everything memory-mapped, checked as any load) and searches
a reader restricted to its rows, so that what the local path does (exact flat search, streamed search of large flat
indexes, IVF candidates re-scored from the float16 vectors, search knobs) is what a shard does:

* flat (exact) indexes: a reader over the rows' slice of the vectors, filled into a FAISS flat index of its own
  (or streamed, past `FLAT_FILL_MAX_VECTORS` rows) — only the shard's rows are read;
* IVF indexes (any coarse quantizer or code, OPQ/PCA in front): the IVF lists' entries with ids in [lo, hi) copied
  into lists of their own, over the same quantizer, candidates re-scored by the reader as locally;
* anything else (HNSW, PQ without IVF, ...) is refused with an error naming a factory that can be served.

No Ray here: the Ray actors (`npm_hf.serve.actors`) wrap this class, and tests can run it in-process.
"""

import dataclasses
import json

import faiss
import numpy as np
from transformers.utils import logging

from ..index import NPMIndex, NPMIndexError, ShardedArray
from ..inference.faiss_io import FLAT_FILL_MAX_VECTORS, add_vectors, extract_ivf, read_faiss_index
from ..inference.index_files import FAISS_FILE, manifest_checksum


logger = logging.get_logger(__name__)

# What a shard reports about itself (`ShardSearcher.describe`), as JSON: the client checks every key.
DESCRIPTION_KEYS = ("identity", "lo", "hi", "num_indexed", "path", "factory")


class ShardServingError(NPMIndexError):
    """A sharded index cannot be served or answered: a shard failed to load, serves another index, or is gone."""


def index_identity(reader) -> str:
    """What names one version of one index: the checksum of its manifest (counts, fingerprints, every file's
    checksum). Two shards with the same identity serve the same rows."""
    return manifest_checksum(dataclasses.asdict(reader.manifest))


def shard_bounds(num_rows: int, num_shards: int) -> list[tuple[int, int]]:
    """`num_shards` contiguous row ranges [lo, hi) covering 0..num_rows, as even as possible."""
    if isinstance(num_shards, bool) or not isinstance(num_shards, (int, np.integer)) or num_shards < 1:
        raise ValueError(f"num_shards must be a positive integer, got {num_shards!r}.")
    if num_shards > max(num_rows, 1):
        raise ValueError(f"num_shards={num_shards} is more than the {num_rows} indexed tokens (rows) of the index; "
                         f"use num_shards <= {max(num_rows, 1)}.")
    edges = np.linspace(0, num_rows, num_shards + 1).round().astype(np.int64)
    return [(int(lo), int(hi)) for lo, hi in zip(edges[:-1], edges[1:])]


def rows_of(array, lo: int, hi: int):
    """Rows [lo, hi) of the vectors (a `ShardedArray` of memory-mapped files) without reading them: a
    `ShardedArray` over the slices of the files they lie in."""
    if not isinstance(array, ShardedArray):
        return array[lo:hi]
    parts = [shard[max(lo - start, 0) : min(hi - start, len(shard))]
             for shard, start in zip(array.shards, array.bounds) if start < hi and lo < start + len(shard)]
    return ShardedArray(parts or [array.shards[0][:0]])


class ShardSearcher:
    """Searches the vector rows [lo, hi) of the index at `path`; rows come back numbered as in the whole index."""

    def __init__(self, path: str, lo: int, hi: int, verify: str = "fast"):
        self.index = NPMIndex.load(path, verify=verify)
        num_indexed = self.index.num_indexed
        if not (isinstance(lo, int) and isinstance(hi, int) and 0 <= lo <= hi <= num_indexed):
            raise ShardServingError(f"Rows {lo}:{hi} are not a range of the {num_indexed} rows of the index at {path}; "
                                    "the shards were cut for another version of the index: start them again.")
        self.lo, self.hi = lo, hi
        self.identity = index_identity(self.index)
        self.reader, self.offset = self._restricted_reader()

    def _restricted_reader(self):
        """A reader over this shard's rows only, and what its row numbers add to give the whole index's."""
        index, lo, hi = self.index, self.lo, self.hi
        if index.exact_search:
            vectors = rows_of(index.vectors, lo, hi)
            flat = faiss.IndexFlat(index.faiss_index.d, index.faiss_index.metric_type)
            if hi - lo <= FLAT_FILL_MAX_VECTORS:
                add_vectors(flat, vectors)  # else left empty: the reader streams over the memory-mapped rows
            manifest = dataclasses.replace(index.manifest, num_indexed_tokens=hi - lo)
            return type(index)(index.path, manifest, self._token_arrays(), index.positions[lo:hi], vectors, flat,
                               index.documents), lo
        ivf = extract_ivf(index.faiss_index)
        if ivf is None:
            raise ShardServingError(
                f"The index at {index.path} is {index.manifest.faiss_factory!r}, which cannot be cut into row shards "
                "(only flat and IVF indexes can: their entries carry their row). Rebuild it with an IVF factory, e.g. "
                "`npm-hf build-index --faiss-factory IVF1024,SQ8`, or serve it from one process (no Ray).")
        if index.faiss_index.ntotal != index.num_indexed:
            raise ShardServingError(
                f"The FAISS index of {index.path} holds {index.faiss_index.ntotal} rows but the index has "
                f"{index.num_indexed} (rows outside its main FAISS index, e.g. appended segments, cannot be served "
                "in shards yet): rewrite it into one index first (`npm-hf index compact`, or rebuild it).")
        restricted = read_faiss_index(index.path / FAISS_FILE)  # memory-mapped: only the quantizer is read
        sub = extract_ivf(restricted)
        lists = faiss.ArrayInvertedLists(sub.nlist, sub.code_size)
        sub.replace_invlists(lists, True)
        lists.this.disown()  # owned by `sub` now
        sub.ntotal = 0
        ivf.copy_subset_to(sub, faiss.InvertedLists.SUBSET_TYPE_ID_RANGE, lo, hi)
        restricted.ntotal = sub.ntotal  # an OPQ/PCA wrapper counts the rows of the IVF it wraps
        return type(index)(index.path, index.manifest, self._token_arrays(), index.positions, index.vectors,
                           restricted, index.documents), 0

    def _token_arrays(self) -> dict:
        return {name: getattr(self.index, name) for name in ("token_ids", "token_flags", "token_docs", "token_offsets")}

    def describe(self) -> str:
        """What this shard serves, as JSON (plain values only; the client validates them)."""
        return json.dumps({"identity": self.identity, "lo": self.lo, "hi": self.hi,
                           "num_indexed": self.index.num_indexed, "path": str(self.index.path),
                           "factory": self.index.manifest.faiss_factory})

    def search(self, queries: np.ndarray, k: int, nprobe: int = 0, ef_search: int = 0,
               many: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """Top-k (float32 scores, int64 rows of the whole index) of `queries` among this shard's rows, best first;
        `nprobe` / `ef_search` 0: FAISS's default; `many`: the reader's `search_many`."""
        if self.hi == self.lo:
            empty = (len(queries), 0)
            return np.zeros(empty, dtype=np.float32), np.zeros(empty, dtype=np.int64)
        search = self.reader.search_many if many else self.reader.search
        scores, rows = search(np.asarray(queries, dtype=np.float32), int(k), nprobe=int(nprobe) or None,
                              ef_search=int(ef_search) or None)
        rows = np.asarray(rows, dtype=np.int64)
        rows = np.where(rows >= 0, rows + self.offset, -1)
        return np.ascontiguousarray(scores, dtype=np.float32), np.ascontiguousarray(rows)
