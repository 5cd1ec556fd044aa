"""Passage pre-filters: pick a few passages of the index before exact NPM scoring of their tokens.

BM25 over blocks is the paper's restricted open-set mode (method §3.3: top-3 blocks, query = the input with the
mask replaced by "_____"); it runs on `bm25s`. The dense pre-filter compares the mean-pooled, normalised encoder
states of the query with those of each passage (the sentence embedding MiniLM-style encoders are trained for), read
off the stored token vectors, so it costs no extra encoding.

Passages are the index's blocks, or (`passage_tokens`) windows of that many tokens overlapping by half inside each
block: spans never cross a block, and small windows point at the sentences that match the query rather than at a
block full of distractors.
"""

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .retrieval import Candidates
from .tokens import SPECIAL


def passage_ranges(index, passage_tokens: int | None = None) -> np.ndarray:
    """`[lo, hi)` corpus positions of each passage: the blocks, or windows of `passage_tokens` tokens every
    `passage_tokens // 2` tokens inside each block (the last one ending at the block's end)."""
    num_blocks = -(-index.num_tokens // index.block_size)
    if passage_tokens is not None and passage_tokens < 2:
        raise ValueError(f"Pre-filter passages need at least 2 tokens, got passage_tokens={passage_tokens}.")
    ranges = []
    for block in range(num_blocks):
        lo, hi = index.block_range(block)
        if passage_tokens is None or passage_tokens >= hi - lo:
            ranges.append((lo, hi))
            continue
        starts = list(range(lo, hi - passage_tokens + 1, passage_tokens // 2))
        if starts[-1] + passage_tokens < hi:
            starts.append(hi - passage_tokens)
        ranges.extend((start, start + passage_tokens) for start in starts)
    return np.asarray(ranges, dtype=np.int64).reshape(-1, 2)


@dataclass
class CorpusText:
    """What passages are cut from: the token arrays, the documents and the block size of an index (an
    `NPMIndexReader` has the same attributes), e.g. of an index directory being written."""

    token_flags: np.ndarray
    token_docs: np.ndarray
    token_offsets: np.ndarray
    documents: object
    block_size: int

    @property
    def num_tokens(self) -> int:
        return len(self.token_flags)

    def block_range(self, block: int) -> tuple[int, int]:
        return block * self.block_size, min((block + 1) * self.block_size, self.num_tokens)


BM25_K1, BM25_B = 1.5, 0.75  # BM25's term-frequency saturation and length normalisation (what builds save)


def bm25_files(passage_tokens: int | None) -> dict[str, str]:
    """The index files of the BM25 pre-filter over blocks (None) or windows of `passage_tokens` tokens, as the
    keyword arguments of `bm25s.BM25.save` / `load` that name them."""
    key = "blocks" if passage_tokens is None else f"{passage_tokens}tok"
    parts = {"data_name": "data.npy", "indices_name": "indices.npy", "indptr_name": "indptr.npy",
             "vocab_name": "vocab.json", "params_name": "params.json", "nnoc_name": "nonoccurrence.npy"}
    return {argument: f"bm25-{key}.{part}" for argument, part in parts.items()}


class BM25PassageRetriever:
    """BM25 over the passages of an [`NPMIndex`]: memory-mapped from the index's own files where the build saved
    it for these passages (`IndexManifest.bm25_passages`), else built in memory from the passage texts."""

    def __init__(self, index, passage_tokens: int | None = None, k1: float = BM25_K1, b: float = BM25_B):
        bm25s = _import_bm25s()
        self.index = index
        self.passage_tokens = passage_tokens
        self.ranges = passage_ranges(index, passage_tokens)
        self._bm25s = bm25s
        saved = getattr(getattr(index, "manifest", None), "bm25_passages", None) or []
        names = bm25_files(passage_tokens)
        if passage_tokens in saved and (k1, b) == (BM25_K1, BM25_B):  # saved indexes use the defaults
            self._retriever = bm25s.BM25.load(index.path, mmap=True, show_progress=False, **names)
        else:
            self._retriever = bm25s.BM25(k1=k1, b=b)
            tokens = bm25s.tokenize(passage_texts(index, self.ranges), stopwords="en", show_progress=False)
            self._retriever.index(tokens, show_progress=False)

    def save(self, directory) -> list[str]:
        """Write this BM25 index into an index directory (the files `bm25_files` names); returns their names."""
        names = bm25_files(self.passage_tokens)
        self._retriever.save(str(directory), show_progress=False, **names)
        return sorted(name for name in names.values() if (Path(directory) / name).exists())

    def top_passages(self, queries: list[str], n: int = 3) -> list[tuple[np.ndarray, np.ndarray]]:
        """The `n` best passage ids per query, best first, with their scores (passages sharing no word with the
        query are included, with score 0, when fewer than `n` match)."""
        _check_count(n)
        tokens = self._bm25s.tokenize(list(queries), stopwords="en", show_progress=False)
        ids, scores = self._retriever.retrieve(tokens, k=min(n, len(self.ranges)), show_progress=False)
        return [(np.asarray(row, dtype=np.int64), np.asarray(score, dtype=np.float64))
                for row, score in zip(ids, scores)]


class DensePassageRetriever:
    """Cosine similarity between a query embedding and each passage's mean stored token vector (held in memory:
    passages × hidden size × 4 bytes)."""

    _CHUNK = 65_536

    def __init__(self, index, passage_tokens: int | None = None):
        self.index = index
        self.ranges = passage_ranges(index, passage_tokens)
        # Sum the vectors per piece between consecutive passage edges; a passage is a run of a few pieces.
        edges = np.unique(self.ranges)
        sums = torch.zeros(len(edges), index.manifest.hidden_size)
        counts = torch.zeros(len(edges))
        for lo in range(0, index.num_indexed, self._CHUNK):
            positions = np.asarray(index.positions[lo : lo + self._CHUNK])
            pieces = torch.from_numpy(np.searchsorted(edges, positions, side="right") - 1)
            sums.index_add_(0, pieces, torch.from_numpy(index.vectors_for_rows(np.arange(lo, lo + len(positions)))))
            counts.index_add_(0, pieces, torch.ones(len(positions)))
        first, end = np.searchsorted(edges, self.ranges[:, 0]), np.searchsorted(edges, self.ranges[:, 1])
        passage_sums, passage_counts = torch.zeros(len(self.ranges), sums.shape[1]), torch.zeros(len(self.ranges))
        for step in range(int((end - first).max(initial=0))):
            inside = torch.from_numpy(first + step < end)
            piece = torch.from_numpy(np.minimum(first + step, len(edges) - 1))
            passage_sums += torch.where(inside[:, None], sums[piece], 0.0)
            passage_counts += torch.where(inside, counts[piece], 0.0)
        means = passage_sums / passage_counts.clamp(min=1)[:, None]
        self.embeddings = torch.nn.functional.normalize(means, dim=1)

    def top_passages(self, query_embeddings: np.ndarray, n: int = 3) -> list[tuple[np.ndarray, np.ndarray]]:
        _check_count(n)
        queries = torch.nn.functional.normalize(torch.as_tensor(np.atleast_2d(query_embeddings), dtype=torch.float32),
                                                dim=1)
        top = torch.topk(queries @ self.embeddings.T, k=min(n, len(self.embeddings)), dim=1)
        return [(ids.numpy().astype(np.int64), scores.double().numpy()) for ids, scores in zip(top.indices, top.values)]


def make_passage_retriever(method: str, index, passage_tokens: int | None = None):
    """The pre-filter named `method` ("bm25" or "dense") over `index`'s passages."""
    if method == "bm25":
        return BM25PassageRetriever(index, passage_tokens)
    if method == "dense":
        return DensePassageRetriever(index, passage_tokens)
    raise ValueError(f"Unknown pre-filter {method!r}; use 'none', 'bm25' or 'dense'.")


def passage_texts(index, ranges: np.ndarray) -> list[str]:
    """The corpus text of each passage: the stretch of each document its tokens cover, widened to whole words (a
    passage may begin or end inside a word), documents joined by a newline."""
    flags, docs, offsets = (np.asarray(a) for a in (index.token_flags, index.token_docs, index.token_offsets))
    texts = []
    for lo, hi in ranges.tolist():
        real = np.flatnonzero((flags[lo:hi] & SPECIAL) == 0) + lo
        parts = []
        for doc in dict.fromkeys(docs[real].tolist()):  # documents in passage order
            mine = real[docs[real] == doc]
            text = index.documents[doc]["text"]
            start, end = int(offsets[mine, 0].min()), int(offsets[mine, 1].max())
            while start > 0 and text[start - 1].isalnum() and text[start].isalnum():
                start -= 1
            while end < len(text) and text[end].isalnum() and text[end - 1].isalnum():
                end += 1
            parts.append(text[start:end])
        texts.append("\n".join(parts))
    return texts


def passage_positions(index, ranges: np.ndarray, passages: np.ndarray, scores: np.ndarray | None = None,
                      weight: float = 0.0) -> tuple[np.ndarray, np.ndarray | None]:
    """Every indexed corpus position (a token with a vector) of the given passages, sorted, and (with `weight` > 0)
    each one's logit bias: `weight` times the best score among its passages divided by the query's top score (the
    top passage gets `weight`, a passage half as relevant half of it). No bias (None) without a weight or a
    positive top score."""
    spans = [np.arange(*ranges[int(p)]) for p in passages]
    positions = np.concatenate(spans) if spans else np.zeros(0, dtype=np.int64)
    keep = (np.asarray(index.token_flags[positions]) & SPECIAL) == 0
    if keep.any():
        keep[keep] = index.rows_for_positions(positions[keep])[1]
    if not weight or scores is None or len(scores) == 0 or max(scores) <= 0:
        return np.unique(positions[keep]), None
    relevance = np.repeat(np.asarray(scores, dtype=np.float64) / max(scores), [len(s) for s in spans])
    positions, relevance = positions[keep], relevance[keep]
    order = np.lexsort((-relevance, positions))  # by position, the most relevant passage first
    positions, relevance = positions[order], relevance[order]
    positions, first = np.unique(positions, return_index=True)
    return positions, weight * relevance[first]


class Prefilters:
    """The pre-filters of one index, each built once on first use per method and passage size: what a pipeline
    asks for the candidates of one input."""

    def __init__(self, index):
        self.index = index
        self._retrievers = {}

    def candidates(self, decoding, text: str, query_embedding: np.ndarray, mask_token: str) -> Candidates | None:
        """The tokens of the passages `decoding.prefilter` keeps for this input (with their logit bias at
        `decoding.prefilter_weight` > 0), or None without a pre-filter (the whole index is searched)."""
        method = decoding.prefilter
        if method == "none":
            return None
        if self.index.num_indexed == 0:  # nothing to pre-filter (every document deleted): no candidate
            return Candidates.among(np.zeros(0, dtype=np.int64))
        key = (method, decoding.prefilter_passage_tokens)
        cached = self._retrievers.get(key)
        if cached is None or cached[1] is not self.index.manifest:  # first use, or the index was edited since
            self._retrievers[key] = (make_passage_retriever(method, self.index, decoding.prefilter_passage_tokens),
                                     self.index.manifest)
        retriever = self._retrievers[key][0]
        query = [bm25_query(text, mask_token)] if method == "bm25" else query_embedding
        ((passages, scores),) = retriever.top_passages(query, decoding.prefilter_blocks)
        return Candidates.among(*passage_positions(self.index, retriever.ranges, passages, scores,
                                                   decoding.prefilter_weight))


def bm25_query(text: str, mask_token: str) -> str:
    """The BM25 query for a cloze input, as in the official code: the mask becomes "_____"."""
    return text.replace(mask_token, " _____ ")


def _import_bm25s():
    try:
        import bm25s
    except ImportError:
        raise ImportError("The BM25 pre-filter needs the bm25s package: pip install bm25s") from None
    return bm25s


def _check_count(n: int) -> None:
    if n < 1:
        raise ValueError(f"The number of pre-filter passages must be >= 1, got {n}.")
