"""The BM25 pre-filters saved with an index (`IndexBuildArguments.bm25_passages`): written by a build once the
corpus is tokenized, and again by every edit, so that they always describe the index they sit in."""

from pathlib import Path

import numpy as np

from ..inference.compact_tokens import load_token_arrays
from ..inference.index_files import DOCUMENT_OFFSETS_FILE, DOCUMENTS_FILE, DocumentStore
from ..inference.prefilter import BM25PassageRetriever, CorpusText, bm25_files


def bm25_file_names(passages: list) -> set[str]:
    """Every file name the BM25 pre-filters of `passages` may write."""
    return {name for passage in passages for name in bm25_files(passage).values()}


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
