"""Passage vectors of the dense pre-filter: the mean of the token vectors of each passage, normalised.

A build stores them (`IndexManifest.dense_passages`) in a FAISS scalar-quantiser file per passage setting,
`dense-blocks.faiss` or `dense-<N>tok.faiss`: one byte per dimension (384 B a passage for MiniLM: about 2 B per
indexed token over blocks and 14 B over 64-token windows, which overlap by half), instead of reading every token
vector of the index when a dense pre-filter is first used (a full pass over the float16 vectors, or decoding every
code of an index built with `vectors="none"`). The means are computed from the exact vectors at build time.

What the stored file does not cover is averaged from the token vectors at first use, as every index did before:
the passages of append segments (edits, `segments`) and passages holding a deleted row (their mean is of their
live rows only).
"""

from pathlib import Path

import faiss
import numpy as np
import torch

from .index_files import NPMIndexError


ROWS_PER_CHUNK = 65_536


def dense_passage_file(passage_tokens: int | None) -> str:
    """The file name of the stored passage vectors over blocks (None) or windows of `passage_tokens` tokens."""
    return f"dense-{'blocks' if passage_tokens is None else f'{passage_tokens}tok'}.faiss"


def passage_means(positions, vectors, ranges: np.ndarray, hidden_size: int, deleted=None) -> torch.Tensor:
    """The mean vector (float32, not normalised) of the indexed tokens of each passage `ranges[i] = [lo, hi)` (corpus
    positions); rows flagged in `deleted` are left out, a passage without a row gets zeros. `positions` (ascending)
    and `vectors` are the index's rows, e.g. memory-mapped: only the rows inside the passages are read, a chunk at a
    time. Overlapping passages share the sums of the pieces between consecutive passage edges."""
    ranges = np.asarray(ranges, dtype=np.int64).reshape(-1, 2)
    if len(ranges) == 0:
        return torch.zeros(0, hidden_size)
    positions = np.asarray(positions)
    edges = np.unique(ranges)
    first, end = np.searchsorted(edges, ranges[:, 0]), np.searchsorted(edges, ranges[:, 1])
    covered = np.zeros(len(edges) + 1, dtype=np.int64)  # which pieces [edges[j], edges[j+1]) a passage covers
    np.add.at(covered, first, 1)
    np.add.at(covered, end, -1)
    pieces = np.flatnonzero(np.cumsum(covered)[: len(edges) - 1] > 0)
    row_lo = np.searchsorted(positions, edges[pieces])
    row_hi = np.searchsorted(positions, edges[pieces + 1])
    sums, counts = torch.zeros(len(edges), hidden_size), torch.zeros(len(edges))
    rows = _concatenated_ranges(row_lo, row_hi)
    for lo in range(0, len(rows), ROWS_PER_CHUNK):
        chunk = rows[lo : lo + ROWS_PER_CHUNK]
        if deleted is not None:
            chunk = chunk[~np.asarray(deleted[chunk])]
        if len(chunk) == 0:
            continue
        piece = torch.from_numpy(np.searchsorted(edges, positions[chunk], side="right") - 1)
        sums.index_add_(0, piece, torch.from_numpy(np.asarray(vectors[chunk], dtype=np.float32)))
        counts.index_add_(0, piece, torch.ones(len(chunk)))
    passage_sums, passage_counts = torch.zeros(len(ranges), hidden_size), torch.zeros(len(ranges))
    for step in range(int((end - first).max(initial=0))):  # a passage is a run of a few pieces
        inside = torch.from_numpy(first + step < end)
        piece = torch.from_numpy(np.minimum(first + step, len(edges) - 1))
        passage_sums += torch.where(inside[:, None], sums[piece], 0.0)
        passage_counts += torch.where(inside, counts[piece], 0.0)
    return passage_sums / passage_counts.clamp(min=1)[:, None]


def _concatenated_ranges(lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """`np.concatenate([np.arange(a, b) for a, b in zip(lo, hi)])` without the Python loop."""
    lengths = hi - lo
    if lengths.sum() == 0:
        return np.zeros(0, dtype=np.int64)
    starts = np.repeat(lo - np.concatenate([[0], np.cumsum(lengths)[:-1]]), lengths)
    return starts + np.arange(int(lengths.sum()))


def new_passage_coder(hidden_size: int):
    """The scalar quantiser passage vectors are stored with: one byte per dimension, inner product."""
    return faiss.IndexScalarQuantizer(hidden_size, faiss.ScalarQuantizer.QT_8bit, faiss.METRIC_INNER_PRODUCT)


def read_passage_vectors(path: Path, num_passages: int, hidden_size: int) -> torch.Tensor:
    """The normalised passage vectors stored at `path` (float32), checked against the passages they must cover."""
    try:
        coder = faiss.read_index(str(path))
    except RuntimeError as error:
        raise NPMIndexError(f"{path} is not a readable FAISS file ({error}); rebuild the index.") from None
    if not isinstance(faiss.downcast_index(coder), faiss.IndexScalarQuantizer) or coder.d != hidden_size:
        raise NPMIndexError(f"{path} does not hold {hidden_size}-dimensional scalar-quantised passage vectors; "
                            "rebuild the index.")
    if coder.ntotal != num_passages:
        raise NPMIndexError(f"{path} holds {coder.ntotal} passage vectors, but the index cuts {num_passages} such "
                            "passages; rebuild the index (or compact it: npm-hf index compact).")
    vectors = torch.from_numpy(coder.reconstruct_n(0, coder.ntotal)) if coder.ntotal else torch.zeros(0, hidden_size)
    return torch.nn.functional.normalize(vectors, dim=1)
