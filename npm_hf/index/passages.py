"""The pre-filters saved with an index. BM25 (`IndexBuildArguments.bm25_passages`): written by a build once the
corpus is tokenized, by every compaction, and for the passages of each append segment by the edit that adds it, so
that they always describe the index they sit in. Dense passage vectors (`IndexBuildArguments.dense_passages`,
`npm_hf.inference.passage_vectors`): written by a build once the vectors are encoded and by every compaction; what
they do not cover (segments, passages with deleted rows) is averaged at first use."""

import json
from pathlib import Path

import numpy as np
import torch

from ..inference.compact_tokens import load_token_arrays
from ..inference.index_files import DOCUMENT_OFFSETS_FILE, DOCUMENTS_FILE, DocumentStore
from ..inference.passage_vectors import dense_passage_file, new_passage_coder, passage_means
from ..inference.prefilter import (BM25PassageRetriever, CorpusText, bm25_files, bm25_stats_file,
                                   bm25_vocabulary_files, bm25_with_stats, load_bm25, passage_ranges, passage_texts)
from .faiss_build import write_index_atomically


DENSE_TRAIN_PASSAGES = 65_536  # passages the scalar quantiser's ranges are fitted on (an even sample)
DENSE_CHUNK_PASSAGES = 65_536  # passages averaged at a time


def bm25_file_names(passages: list, prefix: str = "") -> set[str]:
    """Every file name the BM25 pre-filters of `passages` may write (and those of older versions)."""
    return {name for passage in passages
            for name in [*bm25_files(passage, prefix).values(), *bm25_vocabulary_files(passage, prefix),
                         bm25_stats_file(passage, prefix)]}


def save_bm25_passages(directory: Path, block_size: int, passages: list) -> None:
    """Index the passages of the index files in `directory` with BM25, once per setting of `passages`, and save
    each beside them."""
    if not passages:
        return
    directory = Path(directory)
    arrays, _ = load_token_arrays(directory, block_size)
    documents = DocumentStore(directory / DOCUMENTS_FILE, np.load(directory / DOCUMENT_OFFSETS_FILE))
    text = CorpusText(arrays["token_flags"], arrays["token_docs"], arrays["token_offsets"], documents, block_size)
    for passage in passages:
        BM25PassageRetriever(text, passage).save(directory)


class _ShiftedDocuments:
    """The new documents of a segment by their index in the whole index."""

    def __init__(self, documents: list[dict], first: int):
        self._documents, self._first = documents, first

    def __getitem__(self, i: int) -> dict:
        return self._documents[int(i) - self._first]


def save_segment_bm25(index, staging: Path, name: str, first_token: int, tokens: dict, documents: list[dict],
                      first_document: int) -> list[str]:
    """BM25 indexes of the passages of a new append segment (`tokens`, from corpus position `first_token`), one per
    BM25 pre-filter saved with `index`, scored with the base's statistics plus the segment's
    (`prefilter.bm25_with_stats`); returns the names of the files written into `staging`."""
    passages = index.manifest.bm25_passages
    if not passages:
        return []
    block = index.block_size
    skip = -(-first_token // block) * block - first_token  # the padding up to the block boundary
    text = CorpusText(tokens["flags"][skip:], tokens["doc"][skip:], tokens["offsets"][skip:],
                      _ShiftedDocuments(documents, first_document), block)
    written = []
    for passage in passages:
        base = load_bm25(index.path, passage)
        stats_file = index.path / bm25_stats_file(passage)
        total = json.loads(stats_file.read_text())["total_length"] if stats_file.is_file() else None
        retriever, _ = bm25_with_stats(passage_texts(text, passage_ranges(text, passage)), base, total)
        written += retriever.save(staging, passage, f"{name}.")
    return sorted(written)


def save_dense_passages(directory: Path, block_size: int, vectors, hidden_size: int, passages: list) -> list:
    """Store the normalised mean vector of every passage of the index files in `directory`, once per setting of
    `passages`, from `vectors` (the vectors of the rows its positions name, in order); returns the settings stored
    (an index without a passage stores none)."""
    if not passages:
        return []
    directory = Path(directory)
    arrays, positions = load_token_arrays(directory, block_size)
    text = CorpusText(arrays["token_flags"], arrays["token_docs"], arrays["token_offsets"], None, block_size)
    positions = np.asarray(positions)
    stored = []
    for passage in passages:
        ranges = passage_ranges(text, passage)
        if len(positions) == 0 or len(ranges) == 0:
            continue
        coder = new_passage_coder(hidden_size)
        sample = ranges[:: max(len(ranges) // DENSE_TRAIN_PASSAGES, 1)][:DENSE_TRAIN_PASSAGES]
        coder.train(_normalised_means(positions, vectors, sample, hidden_size))
        for lo in range(0, len(ranges), DENSE_CHUNK_PASSAGES):
            coder.add(_normalised_means(positions, vectors, ranges[lo : lo + DENSE_CHUNK_PASSAGES], hidden_size))
        write_index_atomically(coder, directory / dense_passage_file(passage))
        stored.append(passage)
    return stored


def _normalised_means(positions, vectors, ranges: np.ndarray, hidden_size: int) -> np.ndarray:
    means = passage_means(positions, vectors, ranges, hidden_size)
    return np.ascontiguousarray(torch.nn.functional.normalize(means, dim=1).numpy())


def dense_file_names(passages: list) -> set[str]:
    """Every file name the dense passage vectors of `passages` write."""
    return {dense_passage_file(passage) for passage in passages}
