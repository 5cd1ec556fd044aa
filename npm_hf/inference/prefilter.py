"""Passage pre-filters: pick a few passages of the index before exact NPM scoring of their tokens.

BM25 over blocks is the paper's restricted open-set mode (method §3.3: top-3 blocks, query = the input with the
mask replaced by "_____"); it runs on `bm25s`. The dense pre-filter compares the mean-pooled, normalised encoder
states of the query with those of each passage (the sentence embedding MiniLM-style encoders are trained for): the
means of the passages' token vectors, stored by the build (`passage_vectors`) or averaged at first use, so it costs
no extra encoding.

Passages are the index's blocks, or (`passage_tokens`) windows of that many tokens overlapping by half inside each
block: spans never cross a block, and small windows point at the sentences that match the query rather than at a
block full of distractors.

An edited index (`segments`) keeps a saved BM25 index per append segment beside the base's: each segment's passages
are scored with the statistics (passage count, mean length, document frequencies) of the base plus its own, so that
scores compare across parts; the top passages of all parts are merged by score. Passages of deleted documents are
never returned. A saved BM25 index's vocabulary and score columns are read from disk per query word
(`bm25_vocabulary`), never loaded: bm25s's dict of the vocabulary would cost several times the block texts in
memory, and mapping the files would bring the pages around every word read into the process.
"""

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .bm25_vocabulary import DiskPostings, DiskVocabulary, vocabulary_files, write_vocabulary
from .passage_vectors import dense_passage_file, passage_means, read_passage_vectors
from .retrieval import Candidates
from .segments import segments
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


def bm25_stem(passage_tokens: int | None, prefix: str = "") -> str:
    """What the file names of the BM25 pre-filter over blocks (None) or windows of `passage_tokens` tokens begin
    with (`prefix`: an append segment's, "append-00001.")."""
    return f"{prefix}bm25-{'blocks' if passage_tokens is None else f'{passage_tokens}tok'}"


def bm25_files(passage_tokens: int | None, prefix: str = "") -> dict[str, str]:
    """The bm25s files of a BM25 pre-filter (`bm25_stem`), as the keyword arguments of `bm25s.BM25.save` / `load`
    that name them. Indexes saved by this version have no `vocab_name` file: their vocabulary is in
    `bm25_vocabulary_files`."""
    parts = {"data_name": "data.npy", "indices_name": "indices.npy", "indptr_name": "indptr.npy",
             "vocab_name": "vocab.json", "params_name": "params.json", "nnoc_name": "nonoccurrence.npy"}
    return {argument: f"{bm25_stem(passage_tokens, prefix)}.{part}" for argument, part in parts.items()}


def bm25_vocabulary_files(passage_tokens: int | None, prefix: str = "") -> tuple[str, str]:
    """The files of a saved BM25 pre-filter's vocabulary, looked up on disk (`bm25_vocabulary`)."""
    return vocabulary_files(bm25_stem(passage_tokens, prefix))


def bm25_stats_file(passage_tokens: int | None, prefix: str = "") -> str:
    """The file of a saved BM25 index's statistics that bm25s does not keep: {"num_passages", "total_length"} (the
    passage lengths in BM25 tokens), what the BM25 of an append segment is scored with."""
    return f"{bm25_stem(passage_tokens, prefix)}.stats.json"


@dataclass
class SavedBM25:
    """A BM25 index as a query uses it: bm25s's score matrix (`retriever`), the word → column mapping
    (`vocabulary`: a dict, or a `DiskVocabulary` for a saved index) and, for a saved index, its matrix's columns
    read per query word (`postings`, a `DiskPostings`; None: bm25s scores from the matrix it holds)."""

    retriever: object
    vocabulary: object
    postings: object = None

    def scores(self, words: list[str]) -> np.ndarray:
        """The BM25 score of every passage for a query of `words` (what bm25s's `retrieve` computes: words not in
        the vocabulary are left out; no word at all scores every passage 0)."""
        if not words:
            return np.zeros(int(self.retriever.scores["num_docs"]), dtype=np.float32)
        ids = [column for column in (self.vocabulary.get(word) for word in words) if column is not None]
        if self.postings is None:
            return self.retriever.get_scores_from_ids(ids)
        scores = self.postings.scores(ids, int(self.retriever.scores["num_docs"]), np.dtype(self.retriever.dtype))
        if self.retriever.nonoccurrence_array is not None:  # bm25s's variants that score absent words (not lucene)
            scores += self.retriever.nonoccurrence_array[np.asarray(ids, dtype=np.int64)].sum()
        return scores

    def save(self, directory, passage_tokens: int | None, prefix: str = "") -> list[str]:
        """Write it into `directory` as the files `bm25_files` and `bm25_vocabulary_files` name, the vocabulary
        only once (as the lookup files); returns the names written."""
        names = bm25_files(passage_tokens, prefix)
        self.retriever.save(str(directory), show_progress=False, **names)
        (Path(directory) / names["vocab_name"]).unlink()
        written = write_vocabulary(dict(self.vocabulary.items()), directory, bm25_stem(passage_tokens, prefix))
        return sorted(written + [name for key, name in names.items()
                                 if key != "vocab_name" and (Path(directory) / name).exists()])


class BM25PassageRetriever:
    """BM25 over the passages of an [`NPMIndex`]: memory-mapped from the index's own files where the build saved
    it for these passages (`IndexManifest.bm25_passages`), else built in memory from the passage texts."""

    def __init__(self, index, passage_tokens: int | None = None, k1: float = BM25_K1, b: float = BM25_B):
        bm25s = _import_bm25s()
        self.index = index
        self.passage_tokens = passage_tokens
        self.ranges = passage_ranges(index, passage_tokens)
        self._bm25s = bm25s
        self._total_length = None
        manifest = getattr(index, "manifest", None)
        saved = getattr(manifest, "bm25_passages", None) or []
        parts = segments(manifest) if manifest is not None else []
        if (passage_tokens in saved and (k1, b) == (BM25_K1, BM25_B)  # saved indexes use the defaults
                and all(_saved_in(segment, passage_tokens) for segment in parts)):
            # (first passage, retriever) of the base, then of each segment (which starts at a block boundary)
            self._parts = [(0, load_bm25(index.path, passage_tokens))]
            for segment in parts:
                start = -(-int(segment["first_token"]) // index.block_size) * index.block_size
                self._parts.append((int(np.searchsorted(self.ranges[:, 0], start)),
                                    load_bm25(index.path, passage_tokens, f"{segment['name']}.")))
        else:
            retriever = bm25s.BM25(k1=k1, b=b)
            tokens = bm25s.tokenize(passage_texts(index, self.ranges), stopwords="en", show_progress=False)
            retriever.index(tokens, show_progress=False)
            self._total_length = sum(len(ids) for ids in tokens.ids)
            self._parts = [(0, SavedBM25(retriever, retriever.vocab_dict))]
        self._dead = dead_passages(index, self.ranges)

    def save(self, directory, prefix: str = "") -> list[str]:
        """Write this BM25 index into an index directory (`SavedBM25.save`, and its statistics); returns the names
        of the files written."""
        if len(self._parts) > 1 or self._total_length is None:
            raise ValueError("Only a BM25 index built in memory over all passages can be saved.")
        names = self._parts[0][1].save(directory, self.passage_tokens, prefix)
        stats = {"num_passages": len(self.ranges), "total_length": int(self._total_length)}
        (Path(directory) / bm25_stats_file(self.passage_tokens, prefix)).write_text(json.dumps(stats))
        return sorted([*names, bm25_stats_file(self.passage_tokens, prefix)])

    def top_passages(self, queries: list[str], n: int = 3) -> list[tuple[np.ndarray, np.ndarray]]:
        """The `n` best passage ids per query, best first, with their scores (passages sharing no word with the
        query are included, with score 0, when fewer than `n` match; passages of deleted documents never)."""
        _check_count(n)
        tokens = self._bm25s.tokenize(list(queries), stopwords="en", show_progress=False)
        words = {column: word for word, column in tokens.vocab.items()}
        results = []
        for query in tokens.ids:
            query = [words[column] for column in query]
            # every part's scores use the statistics of the whole index, so they compare
            scores = np.concatenate([np.asarray(part.scores(query), dtype=np.float64) for _, part in self._parts])
            if self._dead is not None:
                scores[self._dead] = -np.inf
            ids = _top(scores, n)
            ids = ids[np.isfinite(scores[ids])]
            results.append((ids, scores[ids]))
        return results


def _top(scores: np.ndarray, n: int) -> np.ndarray:
    """The `n` best of `scores` (all where fewer), best first, ties by position."""
    if n < len(scores):
        kth = np.partition(scores, len(scores) - n)[len(scores) - n]
        candidates = np.flatnonzero(scores >= kth)
    else:
        candidates = np.arange(len(scores))
    return candidates[np.lexsort((candidates, -scores[candidates]))[:n]]


def load_bm25(directory, passage_tokens: int | None, prefix: str = "") -> SavedBM25:
    """A BM25 index saved in an index directory (`bm25_files`): its vocabulary and the columns of its score matrix
    read from disk per query word (indexes saved before the vocabulary files existed: vocabulary loaded from
    bm25s's `vocab.json`, scores from bm25s's memory-mapped matrix)."""
    stem, names = bm25_stem(passage_tokens, prefix), bm25_files(passage_tokens, prefix)
    on_disk = all((Path(directory) / name).is_file() for name in vocabulary_files(stem))
    retriever = _import_bm25s().BM25.load(str(directory), mmap=True, show_progress=False, load_vocab=not on_disk,
                                          **names)
    if not on_disk:
        return SavedBM25(retriever, retriever.vocab_dict)
    postings = DiskPostings(directory, names["data_name"], names["indices_name"], names["indptr_name"])
    return SavedBM25(retriever, DiskVocabulary(directory, stem), postings)


def _saved_in(segment: dict, passage_tokens: int | None) -> bool:
    return bm25_files(passage_tokens, f"{segment['name']}.")["data_name"] in segment.get("bm25_files", [])


def dead_passages(index, ranges: np.ndarray) -> np.ndarray | None:
    """Which passages hold no live token (all of their documents deleted), or None where nothing was deleted."""
    if getattr(index, "deleted_rows", None) is None:
        return None
    text = np.concatenate([[0], np.cumsum((np.asarray(index.token_flags) & SPECIAL) == 0)])
    return text[ranges[:, 1]] - text[ranges[:, 0]] == 0


def bm25_with_stats(texts: list[str], base, base_total_length: int | None, k1: float = BM25_K1, b: float = BM25_B):
    """A bm25s BM25 index of `texts` whose scores are those of the BM25 index of `base`'s passages plus `texts`
    (its passage count, mean passage length and document frequencies: bm25s's "lucene" scoring,
    idf = ln(1 + (N - df + 0.5) / (df + 0.5)), tf / (tf + k1 (1 - b + b len / avg len))), so that the top passages
    of both compare by score. `base`: a `SavedBM25` (None: no base, the plain BM25 of `texts`);
    `base_total_length`: the summed length of its passages (None: unknown, the mean length of `texts` is used)."""
    bm25s = _import_bm25s()
    import scipy.sparse

    tokens = bm25s.tokenize(texts, stopwords="en", show_progress=False)
    lengths = np.asarray([len(ids) for ids in tokens.ids], dtype=np.float64)
    base_count = 0 if base is None else int(base.retriever.scores["num_docs"])
    count = base_count + len(texts)
    if base is None:
        total = lengths.sum()
    elif base_total_length is None:
        total = lengths.mean(initial=0.0) * count if len(lengths) else 0.0
    else:
        total = base_total_length + lengths.sum()
    mean_length = total / count if count else 1.0
    rows, cols, tfs = [], [], []
    for doc, ids in enumerate(tokens.ids):
        for word, tf in Counter(ids).items():
            rows.append(doc)
            cols.append(word)
            tfs.append(tf)
    rows, cols, tfs = np.asarray(rows, dtype=np.int64), np.asarray(cols, dtype=np.int64), np.asarray(tfs, float)
    df = np.bincount(cols, minlength=len(tokens.vocab)).astype(np.float64)
    if base is not None:
        base_indptr = np.asarray(base.retriever.scores["indptr"])
        for word, i in tokens.vocab.items():
            j = base.vocabulary.get(word)
            if j is not None:
                df[i] += base_indptr[j + 1] - base_indptr[j]
    idf = np.log(1 + (count - df + 0.5) / (df + 0.5))
    scores = idf[cols] * tfs / (tfs + k1 * (1 - b + b * lengths[rows] / mean_length))
    matrix = scipy.sparse.csc_matrix((scores.astype(np.float32), (rows, cols)), shape=(len(texts), len(tokens.vocab)),
                                     dtype=np.float32)
    retriever = bm25s.BM25(k1=k1, b=b)
    retriever.scores = {"data": matrix.data, "indices": matrix.indices, "indptr": matrix.indptr,
                        "num_docs": len(texts)}
    retriever.vocab_dict = dict(tokens.vocab)
    retriever.nonoccurrence_array = None
    return SavedBM25(retriever, retriever.vocab_dict), int(lengths.sum())


class DensePassageRetriever:
    """Cosine similarity between a query embedding and each passage's mean token vector (held in memory: passages ×
    hidden size × 4 bytes): read from the vectors the build stored for these passages (`passage_vectors`), else, and
    for what they do not cover (append segments, passages with deleted rows), averaged from the token vectors."""

    def __init__(self, index, passage_tokens: int | None = None):
        self.index = index
        self.ranges = passage_ranges(index, passage_tokens)
        hidden_size = index.manifest.hidden_size
        positions = np.asarray(index.positions)
        deleted = getattr(index, "deleted_rows", None)
        stored = self._stored(index, passage_tokens, hidden_size)
        rows = np.searchsorted(positions, self.ranges)  # [first, end) row of each passage
        embeddings = torch.zeros(len(self.ranges), hidden_size)
        embeddings[: len(stored)] = stored
        redo = np.arange(len(stored), len(self.ranges))  # passages of append segments
        if deleted is not None and len(stored):
            touched = np.concatenate([[0], np.cumsum(deleted)])  # deleted rows before each row
            base = rows[: len(stored)]
            redo = np.concatenate([np.flatnonzero(touched[base[:, 1]] > touched[base[:, 0]]), redo])
        if len(redo):
            means = passage_means(positions, index.vectors, self.ranges[redo], hidden_size, deleted)
            embeddings[torch.from_numpy(redo)] = torch.nn.functional.normalize(means, dim=1)
        embeddings[torch.from_numpy(rows[:, 1] == rows[:, 0])] = 0.0  # no indexed token: matches nothing
        self.embeddings = embeddings
        dead = dead_passages(index, self.ranges)
        self._dead = None if dead is None else torch.from_numpy(dead)

    def _stored(self, index, passage_tokens: int | None, hidden_size: int) -> torch.Tensor:
        """The stored vectors of the base's passages, or none where the build stored none for this setting."""
        manifest = index.manifest
        if passage_tokens not in (getattr(manifest, "dense_passages", None) or []):
            return torch.zeros(0, hidden_size)
        parts = segments(manifest)
        num_base = len(self.ranges)
        if parts:  # a segment starts at a block boundary
            start = -(-int(parts[0]["first_token"]) // index.block_size) * index.block_size
            num_base = int(np.searchsorted(self.ranges[:, 0], start))
        return read_passage_vectors(index.path / dense_passage_file(passage_tokens), num_base, hidden_size)

    def top_passages(self, query_embeddings: np.ndarray, n: int = 3) -> list[tuple[np.ndarray, np.ndarray]]:
        _check_count(n)
        queries = torch.nn.functional.normalize(torch.as_tensor(np.atleast_2d(query_embeddings), dtype=torch.float32),
                                                dim=1)
        similarity = queries @ self.embeddings.T
        live = len(self.embeddings)
        if self._dead is not None:  # passages of deleted documents are never returned
            similarity[:, self._dead] = -torch.inf
            live -= int(self._dead.sum())
        top = torch.topk(similarity, k=max(min(n, live), 1), dim=1)
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
        self.index.check_searchable()  # every document deleted: a clear error, not an empty answer
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
