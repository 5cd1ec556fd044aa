"""Knowledge editing of a built index: add and delete documents without re-encoding the rest of the corpus.

* Adding tokenizes and encodes only the new documents, into new blocks that start at the next block boundary
  (the tokens up to it are padding: special, never indexed), so every block still holds exactly what was encoded
  together. Their rows are appended to the vectors, positions.npy and the FAISS index.
* Deleting removes a document's rows from the vectors, positions.npy and the FAISS index (a flat index is stored
  empty anyway; others are emptied with `reset()`, which keeps their training, and refilled from the vectors) and
  turns its tokens into padding (special, id 0, no offsets): no search, span or evidence can reach them again.
  Its documents.jsonl record keeps the id, loses title and text, and says `"deleted": true`.

Every edit writes a staging copy of the directory (unchanged files are hard links, never written to), hashes the
new files into the manifest and swaps the copy in like a build: an interrupted edit leaves the old index, or (killed
between the two renames) no index at the path and the old one beside it, never a directory that loads wrongly.
The vectors are rewritten in shards cut by the index's own rule (`shard_layout`, by its
manifest's max_shard_bytes).
"""

import dataclasses
import json
import os
import shutil
from pathlib import Path

import faiss
import numpy as np
from transformers.utils import logging

from ..corpus import CorpusStats, iter_documents, tokenize_documents
from ..inference.directory_swap import DirectoryLock, link_or_copy, recover, staging_path
from ..inference.faiss_io import add_vectors, is_flat, is_on_disk, read_faiss_index
from ..inference.index_files import (COMPACT_MARKER_FILE, DOCUMENT_OFFSETS_FILE, DOCUMENTS_FILE, FAISS_FILE,
                                     FORMAT_VERSION, MANIFEST_FILE, NPMIndexError, read_manifest)
from ..inference.tokens import SPECIAL
from ..inference.vector_shards import (DEFAULT_MAX_SHARD_SIZE, create_vector_shards, layout_format_version,
                                       parse_shard_size, shard_layout, vector_layout)
from .arguments import IndexBuildArguments
from .encoding import encode_into, index_rule, indexed_token_mask, pad_token_id
from .faiss_build import load_lists_into_memory, write_on_disk
from .passages import bm25_file_names, save_bm25_passages
from .writing import library_versions, publish, save_token_arrays


logger = logging.get_logger(__name__)

_COPY_ROWS = 1 << 16  # vectors copied per chunk (bounded memory)


# --------------------------------------------------------------------------------------------------- adding
def add_documents(index, model, tokenizer, documents, batch_size: int = 16, show_progress_bar: bool = False) -> None:
    """Append `documents` to the index directory of `index` (see the module docstring); `index` is not reloaded."""
    index.check_compatible(model, tokenizer)
    m = index.manifest
    new_documents, records, stats = _tokenize_new(index, tokenizer, documents)
    start = -(-m.num_tokens // m.block_size) * m.block_size  # new documents begin a block
    tokens = _padded_tokens(index, records, start - m.num_tokens, pad_token_id(model))
    keep = indexed_token_mask(records["id"], records["flags"], **index_rule(m, tokenizer))  # the index's own rule
    new_positions = start + np.flatnonzero(keep)
    positions = np.concatenate([np.asarray(index.positions), new_positions]).astype(np.int64)
    args = IndexBuildArguments(block_size=m.block_size, batch_size=batch_size, show_progress_bar=show_progress_bar)

    def write(staging: Path):
        save_token_arrays(staging, tokens, positions, m.block_size, _compact(index))
        vectors, layout = _copy_vectors(index, staging, np.arange(index.num_indexed), extra_rows=len(new_positions))
        encode_into(vectors, index.num_indexed, model, records["id"], records["flags"], keep, args)
        vectors.flush()
        if not is_flat(index.faiss_index):  # a flat index is stored empty and filled on load
            _write_faiss(index, staging, vectors, start=index.num_indexed, reset=False)
        del vectors
        _append_documents(index, staging, new_documents)
        return dataclasses.replace(
            m, **_layout_fields(m, layout), num_documents=m.num_documents + stats.num_documents,
            num_skipped_empty_documents=m.num_skipped_empty_documents + stats.num_skipped_empty,
            num_tokens=len(tokens["id"]), num_indexed_tokens=len(positions),
            num_blocks=-(-len(tokens["id"]) // m.block_size), versions=library_versions(),
        )

    _edit(index, write)
    logger.info(f"Added {stats.num_documents} documents ({len(new_positions)} token vectors) to {index.path}.")


def _tokenize_new(index, tokenizer, documents):
    """The new documents and their token records; ids must be new (to the index and among themselves)."""
    taken = set(_live_ids(index))
    stats = CorpusStats()
    new_documents, chunks = [], []
    block_size = index.manifest.block_size if index.manifest.paragraph_blocks else None  # as the index was built
    for document, records in tokenize_documents(iter_documents(documents), tokenizer, stats, block_size=block_size):
        if document["id"] in taken:
            raise NPMIndexError(
                f"A document with id {document['id']!r} is already in the index at {index.path}. Delete it first "
                "(`npm-hf index delete --ids ...`) to replace it, or give the new document another 'id'."
            )
        taken.add(document["id"])
        records["doc"] = index.manifest.num_documents + len(new_documents)
        new_documents.append(document)
        chunks.append(records)
    if not new_documents:
        raise ValueError(f"No non-empty document to add ({stats.num_skipped_empty} empty ones skipped).")
    return new_documents, np.concatenate(chunks), stats


def _padded_tokens(index, records: np.ndarray, padding: int, pad_id: int) -> dict:
    """The token arrays of the index, then `padding` special tokens up to the block boundary, then `records`."""
    pad = {"id": np.full(padding, pad_id), "flags": np.full(padding, SPECIAL), "doc": np.full(padding, -1),
           "offsets": np.zeros((padding, 2))}
    new = {"id": records["id"], "flags": records["flags"], "doc": records["doc"],
           "offsets": np.stack([records["start"], records["end"]], axis=1)}
    old = {"id": index.token_ids, "flags": index.token_flags, "doc": index.token_docs, "offsets": index.token_offsets}
    return {name: np.concatenate([old[name], pad[name].astype(old[name].dtype), new[name].astype(old[name].dtype)])
            for name in old}


def _append_documents(index, staging: Path, documents: list[dict]) -> None:
    shutil.copyfile(index.path / DOCUMENTS_FILE, staging / DOCUMENTS_FILE)
    offsets = list(np.load(index.path / DOCUMENT_OFFSETS_FILE))
    with open(staging / DOCUMENTS_FILE, "ab") as handle:
        for document in documents:
            line = _document_line(document)
            handle.write(line)
            offsets.append(offsets[-1] + len(line))
    np.save(staging / DOCUMENT_OFFSETS_FILE, np.asarray(offsets, dtype=np.int64))


# ------------------------------------------------------------------------------------------------- deleting
def delete_documents(index, doc_ids) -> None:
    """Delete the documents with ids `doc_ids` from the index directory of `index` (see the module docstring)."""
    doc_ids = [doc_ids] if isinstance(doc_ids, str) else [str(doc_id) for doc_id in doc_ids]
    if not doc_ids:
        raise ValueError("No document id to delete was given.")
    live = _live_ids(index)
    unknown = [doc_id for doc_id in doc_ids if doc_id not in live]
    if unknown:
        raise NPMIndexError(
            f"No document with id {unknown[0]!r} in the index at {index.path}"
            + (f" (nor {unknown[1:]})" if len(unknown) > 1 else "")
            + "; nothing was deleted. Ids are the corpus 'id' fields (line numbers from 0 for .txt corpora)."
        )
    doomed = np.asarray(sorted(i for doc_id in set(doc_ids) for i in live[doc_id]), dtype=np.int64)
    dead = np.isin(index.token_docs, doomed)
    keep_rows = np.flatnonzero(~dead[index.positions])
    m = index.manifest

    def write(staging: Path):
        # token_docs stay: the doc indices of the text-less records keep documents.jsonl aligned
        tokens = {"id": np.where(dead, 0, index.token_ids).astype(index.token_ids.dtype),
                  "flags": np.where(dead, SPECIAL, index.token_flags).astype(index.token_flags.dtype),
                  "offsets": np.where(dead[:, None], 0, index.token_offsets).astype(index.token_offsets.dtype)}
        if _compact(index):  # format 3 writes every token file again (the plain format keeps token_docs.npy)
            tokens["doc"] = index.token_docs
        save_token_arrays(staging, tokens, np.asarray(index.positions)[keep_rows], m.block_size, _compact(index))
        vectors, layout = _copy_vectors(index, staging, keep_rows)
        vectors.flush()
        if not is_flat(index.faiss_index):
            _write_faiss(index, staging, vectors, start=0, reset=True)
        del vectors
        _rewrite_documents(index, staging, set(doomed.tolist()))
        return dataclasses.replace(m, **_layout_fields(m, layout), num_indexed_tokens=len(keep_rows),
                                   versions=library_versions(),
                                   num_deleted_documents=m.num_deleted_documents + len(doomed))

    _edit(index, write)
    logger.info(f"Deleted {len(doomed)} documents ({index.num_indexed - len(keep_rows)} token vectors) from "
                f"{index.path}.")


def _rewrite_documents(index, staging: Path, doomed: set[int]) -> None:
    """documents.jsonl with the records of `doomed` documents replaced by text-less ones marked deleted."""
    old_offsets = np.load(index.path / DOCUMENT_OFFSETS_FILE)
    offsets = [0]
    with open(index.path / DOCUMENTS_FILE, "rb") as source, open(staging / DOCUMENTS_FILE, "wb") as target:
        for i in range(len(old_offsets) - 1):
            line = source.read(int(old_offsets[i + 1] - old_offsets[i]))
            if i in doomed:
                line = _document_line({"id": json.loads(line)["id"], "title": "", "text": "", "deleted": True})
            target.write(line)
            offsets.append(offsets[-1] + len(line))
    np.save(staging / DOCUMENT_OFFSETS_FILE, np.asarray(offsets, dtype=np.int64))


# ------------------------------------------------------------------------------------------------- shared
def _live_ids(index) -> dict[str, list[int]]:
    """Document id -> positions in documents.jsonl, for documents not deleted."""
    live = {}
    with open(index.path / DOCUMENTS_FILE, "rb") as handle:
        for i, line in enumerate(handle):
            record = json.loads(line)
            if not record.get("deleted"):
                live.setdefault(record["id"], []).append(i)
    return live


def _document_line(document: dict) -> bytes:
    record = {key: document[key] for key in ("id", "title", "text")}
    if document.get("deleted"):
        record["deleted"] = True
    return json.dumps(record, ensure_ascii=False).encode("utf-8") + b"\n"


def _compact(index) -> bool:
    """Whether the index stores format 3's compact token files (`npm_hf.inference.compact_tokens`)."""
    return COMPACT_MARKER_FILE in index.manifest.files


def _copy_vectors(index, staging: Path, rows: np.ndarray, extra_rows: int = 0):
    """New vector shards holding `index.vectors[rows]`, then `extra_rows` rows to fill, cut by the index's shard
    rule; returned open (writable), with their layout."""
    m = index.manifest
    layout = shard_layout(len(rows) + extra_rows, m.hidden_size, _max_shard_bytes(m))
    vectors = create_vector_shards(staging, layout, m.hidden_size)
    for lo in range(0, len(rows), _COPY_ROWS):
        chunk = rows[lo : lo + _COPY_ROWS]
        vectors[lo : lo + len(chunk)] = index.vectors[chunk]
    return vectors, layout


def _max_shard_bytes(manifest) -> int:
    return manifest.max_shard_bytes or parse_shard_size(DEFAULT_MAX_SHARD_SIZE)  # format 1: the default rule


def _layout_fields(manifest, layout: list[dict]) -> dict:
    version = FORMAT_VERSION if COMPACT_MARKER_FILE in manifest.files else layout_format_version(layout)
    return {"vector_shards": layout, "format_version": version,
            "max_shard_bytes": _max_shard_bytes(manifest)}


def _write_faiss(index, staging: Path, vectors, start: int, reset: bool) -> None:
    """The index's FAISS index read from disk, emptied (keeping its training) if `reset`, plus `vectors[start:]`.
    An index merged on disk is edited in memory (never in its live index.ivfdata) and written on disk again."""
    faiss_index = read_faiss_index(index.path / FAISS_FILE, mapped=False)  # grows: in memory
    on_disk = is_on_disk(faiss_index)
    if on_disk:
        load_lists_into_memory(faiss_index)
    if reset:
        faiss_index.reset()
    add_vectors(faiss_index, vectors, start)
    if on_disk:
        write_on_disk(faiss_index, staging)
    else:
        faiss.write_index(faiss_index, str(staging / FAISS_FILE))


def _edit(index, write) -> None:
    """Run `write(staging)` on a staging directory (it writes the changed files and returns the new manifest),
    link the unchanged files in, record sizes and checksums, and swap the staging directory into place; all under
    the index's writer lock, and only if nobody changed the index since `index` was loaded."""
    path = index.path
    with DirectoryLock(path, "index edit"):
        recover(path, MANIFEST_FILE)
        _check_unchanged_since_loaded(index)
        staging = staging_path(path)
        staging.mkdir()
        try:
            manifest = write(staging)
            changed = set(os.listdir(staging))
            # vector shards of the old layout that the new one does not name are gone, not unchanged
            dropped = ({s["file"] for s in vector_layout(index.manifest)}
                       - {s["file"] for s in vector_layout(manifest)})
            if manifest.num_indexed_tokens == 0:  # nothing left to pre-filter
                manifest = dataclasses.replace(manifest, bm25_passages=[])
            rewritten = changed | bm25_file_names(index.manifest.bm25_passages)  # BM25: indexed again below
            for name in set(index.manifest.files) - rewritten - dropped - {MANIFEST_FILE}:
                link_or_copy(path / name, staging / name)
            save_bm25_passages(staging, manifest.block_size, manifest.bm25_passages)
            unchanged = {name: entry for name, entry in index.manifest.files.items() if name not in rewritten}
            publish(staging, path, manifest, known_files=unchanged)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise


def _check_unchanged_since_loaded(index) -> None:
    """Refuse to edit from a stale view: another edit since `index` was loaded would be undone by this one."""
    try:
        on_disk = read_manifest(index.path / MANIFEST_FILE)
    except (OSError, NPMIndexError):
        on_disk = None
    if on_disk != index.manifest:
        raise NPMIndexError(
            f"The index at {index.path} changed on disk since it was loaded (another edit or build); this edit "
            "would undo that one. Load the index again (NPMIndex.load) and repeat the edit."
        )
