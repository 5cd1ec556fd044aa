"""Passage pre-filters: pick a few blocks of the index before exact NPM scoring of their tokens.

BM25 over blocks is the paper's restricted open-set mode (method §3.3: top-3 blocks, query = the input with the
mask replaced by "_____"); it runs on `bm25s`. The dense pre-filter compares the mean-pooled, normalised encoder
states of the query with those of each block (the sentence embedding MiniLM-style encoders are trained for), read off
the stored token vectors, so it costs no extra encoding.
"""

import numpy as np
import torch

from .corpus import SPECIAL


class BM25BlockRetriever:
    """BM25 over the blocks of an [`NPMIndex`]; built in memory from the index's documents on first use."""

    def __init__(self, index, k1: float = 1.5, b: float = 0.75):
        try:
            import bm25s
        except ImportError:
            raise ImportError("The BM25 pre-filter needs the bm25s package: pip install bm25s") from None

        self.index = index
        self._bm25s = bm25s
        self._retriever = bm25s.BM25(k1=k1, b=b)
        tokens = bm25s.tokenize(block_texts(index), stopwords="en", show_progress=False)
        self._retriever.index(tokens, show_progress=False)

    def top_blocks(self, queries: list[str], n: int = 3) -> list[np.ndarray]:
        """The `n` best-scoring block ids per query, best first (blocks sharing no word with the query included
        when fewer than `n` match: BM25 scores them 0)."""
        if n < 1:
            raise ValueError(f"The number of pre-filter blocks must be >= 1, got {n}.")
        n = min(n, self.num_blocks)
        tokens = self._bm25s.tokenize(list(queries), stopwords="en", show_progress=False)
        blocks, _ = self._retriever.retrieve(tokens, k=n, show_progress=False)
        return [np.asarray(row, dtype=np.int64) for row in blocks]

    @property
    def num_blocks(self) -> int:
        return -(-self.index.num_tokens // self.index.block_size)


class DenseBlockRetriever:
    """Cosine similarity between a query embedding and each block's mean stored token vector."""

    _CHUNK = 65_536

    def __init__(self, index):
        self.index = index
        num_blocks = -(-index.num_tokens // index.block_size)
        sums = torch.zeros(num_blocks, index.manifest.hidden_size)
        counts = torch.zeros(num_blocks)
        for lo in range(0, index.num_indexed, self._CHUNK):
            blocks = torch.from_numpy(np.asarray(index.positions[lo : lo + self._CHUNK]) // index.block_size)
            sums.index_add_(0, blocks, torch.from_numpy(index.vectors_for_rows(np.arange(lo, lo + len(blocks)))))
            counts.index_add_(0, blocks, torch.ones(len(blocks)))
        self.embeddings = torch.nn.functional.normalize(sums / counts.clamp(min=1)[:, None], dim=1)

    def top_blocks(self, query_embeddings: np.ndarray, n: int = 3) -> list[np.ndarray]:
        if n < 1:
            raise ValueError(f"The number of pre-filter blocks must be >= 1, got {n}.")
        queries = torch.nn.functional.normalize(torch.as_tensor(np.atleast_2d(query_embeddings), dtype=torch.float32),
                                                dim=1)
        top = torch.topk(queries @ self.embeddings.T, k=min(n, len(self.embeddings)), dim=1).indices
        return [row.numpy().astype(np.int64) for row in top]


def make_block_retriever(method: str, index):
    """The pre-filter named `method` ("bm25" or "dense") over `index`."""
    if method == "bm25":
        return BM25BlockRetriever(index)
    if method == "dense":
        return DenseBlockRetriever(index)
    raise ValueError(f"Unknown pre-filter {method!r}; use 'none', 'bm25' or 'dense'.")


def block_texts(index) -> list[str]:
    """The corpus text of each block: the stretch of each document its tokens cover, documents joined by a newline."""
    flags, docs, offsets = (np.asarray(a) for a in (index.token_flags, index.token_docs, index.token_offsets))
    texts = []
    for block in range(-(-index.num_tokens // index.block_size)):
        lo, hi = index.block_range(block)
        real = np.flatnonzero((flags[lo:hi] & SPECIAL) == 0) + lo
        parts = []
        for doc in dict.fromkeys(docs[real].tolist()):  # documents in block order
            mine = real[docs[real] == doc]
            parts.append(index.documents[doc]["text"][int(offsets[mine, 0].min()) : int(offsets[mine, 1].max())])
        texts.append("\n".join(parts))
    return texts


def block_positions(index, blocks: np.ndarray) -> np.ndarray:
    """Every non-special corpus position in the given blocks, sorted."""
    spans = [np.arange(*index.block_range(int(block))) for block in np.unique(blocks)]
    positions = np.concatenate(spans) if spans else np.zeros(0, dtype=np.int64)
    return positions[(np.asarray(index.token_flags[positions]) & SPECIAL) == 0]


def bm25_query(text: str, mask_token: str) -> str:
    """The BM25 query for a cloze input, as in the official code: the mask becomes "_____"."""
    return text.replace(mask_token, " _____ ")
