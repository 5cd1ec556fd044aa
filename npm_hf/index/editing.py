"""Knowledge editing of a built index: add and delete documents without re-encoding, or rewriting, the rest.

* Adding tokenizes and encodes only the new documents, into an append segment (`npm_hf.inference.segments`): new
  files beside the index's, whose blocks start at the next block boundary (the tokens up to it are padding: special,
  never indexed), so every block still holds exactly what was encoded together. A flat FAISS index stores nothing
  for it (filled from the vectors at load); any other gets a copy of the trained index holding the new vectors only.
  The saved BM25 pre-filters get a BM25 index of the segment's passages, scored with the index's own statistics.
* Deleting writes a new tombstone file listing every deleted document: their rows leave every search, their tokens
  are masked at load (special, id 0, no offsets), so no search, span or evidence can reach them again; their
  documents read as `{"id", "title": "", "text": "", "deleted": true}`. Their vectors and text stay on disk until
  compaction.
* `compact` rewrites the index as a build would have written it from what is left: one set of token arrays,
  vectors and FAISS index, without the rows, vectors and text of deleted documents, BM25 indexed again.

Every edit writes its new files into a staging copy of the directory (unchanged files are hard links, never written
to), hashes the new files into the manifest and swaps the copy in like a build: an interrupted edit leaves the old
index, or (killed between the two renames) no index at the path and the old one beside it, never a directory that
loads wrongly. The manifest, written last, is what makes the new files part of the index.
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
from ..inference.faiss_io import add_vectors, extract_ivf, is_flat, is_on_disk, read_faiss_index
from ..inference.compact_tokens import COMPACT_TOKENS_FORMAT_VERSION
from ..inference.index_files import (COMPACT_MARKER_FILE, DOCUMENT_OFFSETS_FILE, DOCUMENTS_FILE, EDITS_FORMAT_VERSION,
                                     FAISS_FILE, MANIFEST_FILE, NPMIndexError, read_manifest)
from ..inference.segments import (SEGMENT_NAME, TOMBSTONE_FILE, edit_file_names, segment_file, segments,
                                  tombstone_file)
from ..inference.tokens import SPECIAL
from ..inference.vector_shards import (DEFAULT_MAX_SHARD_SIZE, create_vector_shards, layout_format_version,
                                       parse_shard_size, shard_layout, vector_layout)
from ..inference.vector_codes import NO_VECTORS
from .arguments import IndexBuildArguments
from .coded_build import append_codes, copy_codes
from .encoding import encode_into, index_rule, indexed_token_mask, pad_token_id
from .faiss_build import load_lists_into_memory, write_index_atomically, write_on_disk
from .passages import bm25_file_names, dense_file_names, save_bm25_passages, save_dense_passages, save_segment_bm25
from .writing import library_versions, publish, save_token_arrays


logger = logging.get_logger(__name__)

_COPY_ROWS = 1 << 16  # vectors copied per chunk (bounded memory)


# --------------------------------------------------------------------------------------------------- adding
def add_documents(index, model, tokenizer, documents, batch_size: int = 16, show_progress_bar: bool = False) -> None:
    """Append `documents` to the index directory of `index` as a new segment (see the module docstring); `index` is
    not reloaded."""
    _check_compatible(index, model, tokenizer)
    m = index.manifest
    ids = _live_ids(index)
    new_documents, records, stats = _tokenize_new(index, tokenizer, documents, ids)
    start = -(-m.num_tokens // m.block_size) * m.block_size  # new documents begin a block
    tokens = _segment_tokens(records, start - m.num_tokens, pad_token_id(model))
    keep = indexed_token_mask(tokens["id"], tokens["flags"], **index_rule(m, tokenizer))  # the index's own rule
    positions = m.num_tokens + np.flatnonzero(keep)
    args = IndexBuildArguments(block_size=m.block_size, batch_size=batch_size, show_progress_bar=show_progress_bar)
    edits = dict(m.edits or {})
    number = int(edits.get("next_segment", 1))
    name = SEGMENT_NAME.format(number)
    segment = {"name": name, "first_token": m.num_tokens, "num_tokens": len(tokens["id"]),
               "first_row": m.num_indexed_tokens, "num_rows": len(positions), "first_document": m.num_documents,
               "num_documents": len(new_documents), "faiss": not is_flat(_base_faiss(index)),
               "codes": m.vector_dtype == NO_VECTORS}

    def write(staging: Path):
        for part, array in (("token_ids", tokens["id"]), ("token_flags", tokens["flags"]),
                            ("token_docs", tokens["doc"]), ("token_offsets", tokens["offsets"]),
                            ("positions", positions)):
            np.save(staging / segment_file(name, part), np.ascontiguousarray(array))
        # an index without float16 vectors keeps the segment's rows as codes of its coder, as it keeps the base's
        target = staging / (".new-vectors.npy" if segment["codes"] else segment_file(name, "vectors"))
        vectors = np.lib.format.open_memmap(target, mode="w+", dtype=np.float16, shape=(len(positions), m.hidden_size))
        skip = start - m.num_tokens  # the padding up to the block boundary: encoding starts at a block
        encode_into(vectors, 0, model, tokens["id"][skip:], tokens["flags"][skip:], keep[skip:], args)
        vectors.flush()
        if segment["faiss"]:  # FAISS gets the exact vectors, as at build time
            segment_index = _empty_copy(index)
            add_vectors(segment_index, vectors)
            write_index_atomically(segment_index, staging / segment_file(name, "faiss"))
        if segment["codes"]:
            codec = index.vectors.codec
            codes = np.lib.format.open_memmap(staging / segment_file(name, "codes"), mode="w+", dtype=np.uint8,
                                              shape=(len(positions), codec.sa_code_size()))
            append_codes(codes, codec, 0, vectors)
            codes.flush()
            del codes
        del vectors
        if segment["codes"]:
            target.unlink()
        _write_documents(staging / segment_file(name, "documents"), staging / segment_file(name, "document_offsets"),
                         new_documents)
        segment["bm25_files"] = save_segment_bm25(index, staging, name, m.num_tokens, tokens, new_documents,
                                                   m.num_documents)
        edits.update(segments=[*segments(m), segment], next_segment=number + 1)
        return dataclasses.replace(
            m, edits=edits, format_version=max(m.format_version, EDITS_FORMAT_VERSION),
            num_documents=m.num_documents + stats.num_documents,
            num_skipped_empty_documents=m.num_skipped_empty_documents + stats.num_skipped_empty,
            num_tokens=m.num_tokens + len(tokens["id"]), num_indexed_tokens=m.num_indexed_tokens + len(positions),
            num_blocks=-(-(m.num_tokens + len(tokens["id"])) // m.block_size), versions=library_versions(),
        ), set()

    manifest = _edit(index, write)
    for i, document in enumerate(new_documents):
        ids.setdefault(document["id"], []).append(m.num_documents + i)
    _remember_ids(index.path, manifest, ids)
    logger.info(f"Added {stats.num_documents} documents ({len(positions)} token vectors) to {index.path} "
                f"(segment {name}).")


def _tokenize_new(index, tokenizer, documents, live: dict):
    """The new documents and their token records; ids must be new (to the index and among themselves)."""
    taken = set(live)
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


def _segment_tokens(records: np.ndarray, padding: int, pad_id: int) -> dict:
    """A segment's token arrays: `padding` special tokens up to the block boundary, then `records`."""
    dtypes = {"id": records["id"].dtype, "flags": records["flags"].dtype, "doc": records["doc"].dtype,
              "offsets": records["start"].dtype}
    pad = {"id": np.full(padding, pad_id), "flags": np.full(padding, SPECIAL), "doc": np.full(padding, -1),
           "offsets": np.zeros((padding, 2))}
    new = {"id": records["id"], "flags": records["flags"], "doc": records["doc"],
           "offsets": np.stack([records["start"], records["end"]], axis=1)}
    return {name: np.concatenate([pad[name].astype(dtypes[name]), new[name].astype(dtypes[name])]) for name in new}


def _write_documents(path: Path, offsets_path: Path, documents: list[dict]) -> None:
    offsets = [0]
    with open(path, "wb") as handle:
        for document in documents:
            line = _document_line(document)
            handle.write(line)
            offsets.append(offsets[-1] + len(line))
    np.save(offsets_path, np.asarray(offsets, dtype=np.int64))


def _base_faiss(index):
    return getattr(index, "base_faiss_index", None) or index.faiss_index


def _empty_copy(index):
    """The index's trained FAISS index without vectors, read from its index.faiss: for IVF indexes its coarse
    quantizer and codec with empty lists in memory (nothing of the stored lists is read), else a copy in memory,
    emptied (`reset`)."""
    path = index.path / FAISS_FILE
    faiss_index = read_faiss_index(path)  # lists mapped (or on disk): not read
    ivf = extract_ivf(faiss_index)
    if ivf is None:
        faiss_index = read_faiss_index(path, mapped=False)
        faiss_index.reset()
        return faiss_index
    lists = faiss.ArrayInvertedLists(ivf.nlist, ivf.code_size)
    ivf.replace_invlists(lists, True)
    lists.this.disown()
    wrapper = faiss.downcast_index(faiss_index)
    while True:  # the IVF index and every wrapper above it (OPQ, PCA) count no vector now
        wrapper.ntotal = 0
        if not isinstance(wrapper, faiss.IndexPreTransform):
            break
        wrapper = faiss.downcast_index(wrapper.index)
    return faiss_index


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
    m = index.manifest
    old = tombstone_file(m)
    deleted = np.union1d(np.load(index.path / old) if old else np.zeros(0, dtype=np.int64), doomed).astype(np.int64)
    edits = dict(m.edits or {})
    number = int(edits.get("next_tombstones", 1))
    name = TOMBSTONE_FILE.format(number)
    rows = int(np.isin(np.asarray(index.token_docs)[np.asarray(index.positions)], doomed).sum())

    def write(staging: Path):
        np.save(staging / name, deleted)
        edits.update(tombstones=name, next_tombstones=number + 1)
        return dataclasses.replace(m, edits=edits, format_version=max(m.format_version, EDITS_FORMAT_VERSION),
                                   versions=library_versions(),
                                   num_deleted_documents=m.num_deleted_documents + len(doomed)), {old} - {None}

    manifest = _edit(index, write)
    for doc_id in set(doc_ids):
        live.pop(doc_id)
    _remember_ids(index.path, manifest, live)
    logger.info(f"Deleted {len(doomed)} documents ({rows} token vectors) from {index.path}.")


# ----------------------------------------------------------------------------------------------- compacting
def compact(index) -> None:
    """Rewrite the index directory of `index` without its edits (see the module docstring): the token arrays of
    the base and its segments in one set of files, the rows of live documents only (vectors in shards cut by the
    index's own rule), one FAISS index (a flat one stored empty; others emptied with `reset()`, which keeps their
    training, and refilled), documents.jsonl with the records of deleted documents emptied, BM25 indexed again."""
    m = index.manifest
    deleted_rows = index.deleted_rows
    keep_rows = np.arange(index.num_indexed) if deleted_rows is None else np.flatnonzero(~deleted_rows)
    dropped = edit_file_names(m) | {s["file"] for s in vector_layout(m)} | dense_file_names(m.dense_passages)

    def write(staging: Path):
        tokens = {"id": index.token_ids, "flags": index.token_flags, "doc": index.token_docs,
                  "offsets": index.token_offsets}
        save_token_arrays(staging, tokens, np.asarray(index.positions)[keep_rows], m.block_size, _compact(index))
        if m.vector_dtype == NO_VECTORS:  # FAISS is refilled from the kept rows' decoded codes
            codes, vectors, layout = copy_codes(index, staging, keep_rows, 0, _max_shard_bytes(m))
            codes.flush()
        else:
            vectors, layout = _copy_vectors(index, staging, keep_rows)
            vectors.flush()
        if not is_flat(_base_faiss(index)):
            _write_faiss(index, staging, vectors)
        dense = save_dense_passages(staging, m.block_size, vectors, m.hidden_size, m.dense_passages)
        del vectors
        _write_documents(staging / DOCUMENTS_FILE, staging / DOCUMENT_OFFSETS_FILE,
                         (index.documents[i] for i in range(len(index.documents))))
        return dataclasses.replace(m, **_layout_fields(m, layout), edits={}, num_indexed_tokens=len(keep_rows),
                                   dense_passages=dense, versions=library_versions()), dropped

    manifest = _edit(index, write, rebuild_bm25=True)
    logger.info(f"Compacted {index.path}: {len(segments(m))} segments merged, {index.num_indexed - len(keep_rows)} "
                f"vectors of deleted documents dropped ({manifest.num_indexed_tokens} left).")


def _compact(index) -> bool:
    """Whether the index stores format 3's compact token files (`npm_hf.inference.compact_tokens`)."""
    return COMPACT_MARKER_FILE in index.manifest.files


def _copy_vectors(index, staging: Path, rows: np.ndarray):
    """New vector shards holding `index.vectors[rows]`, cut by the index's shard rule; returned open, with their
    layout."""
    m = index.manifest
    layout = shard_layout(len(rows), m.hidden_size, _max_shard_bytes(m))
    vectors = create_vector_shards(staging, layout, m.hidden_size)
    for lo in range(0, len(rows), _COPY_ROWS):
        chunk = rows[lo : lo + _COPY_ROWS]
        vectors[lo : lo + len(chunk)] = index.vectors[chunk]
    return vectors, layout


def _max_shard_bytes(manifest) -> int:
    return manifest.max_shard_bytes or parse_shard_size(DEFAULT_MAX_SHARD_SIZE)  # format 1: the default rule


def _layout_fields(manifest, layout: list[dict]) -> dict:
    version = COMPACT_TOKENS_FORMAT_VERSION if COMPACT_MARKER_FILE in manifest.files else layout_format_version(layout)
    return {"vector_shards": layout, "format_version": version,
            "max_shard_bytes": _max_shard_bytes(manifest)}


def _write_faiss(index, staging: Path, vectors) -> None:
    """The index's FAISS index read from disk, emptied (keeping its training), plus all of `vectors`. An index
    merged on disk is rebuilt in memory (never in its live index.ivfdata) and written on disk again."""
    faiss_index = read_faiss_index(index.path / FAISS_FILE, mapped=False)  # grows: in memory
    on_disk = is_on_disk(faiss_index)
    if on_disk:
        load_lists_into_memory(faiss_index)
    faiss_index.reset()
    add_vectors(faiss_index, vectors)
    if on_disk:
        write_on_disk(faiss_index, staging)
    else:
        faiss.write_index(faiss_index, str(staging / FAISS_FILE))


# ------------------------------------------------------------------------------------------------- shared
# Document id -> indices of its live documents, per index directory and version of its document files: an edit
# reads the ids once, later edits of the same index use (and update) that map instead of reading every record.
_ID_MAPS: dict = {}
_ID_MAPS_KEPT = 4


def _ids_key(path: Path, manifest) -> tuple:
    files = manifest.files
    parts = [DOCUMENTS_FILE, *(segment_file(s["name"], "documents") for s in segments(manifest)),
             tombstone_file(manifest)]
    return (str(Path(path).resolve()), manifest.num_documents, manifest.num_deleted_documents,
            tuple(json.dumps(files.get(name), sort_keys=True) for name in parts if name))


def _remember_ids(path: Path, manifest, ids: dict) -> None:
    _ID_MAPS[_ids_key(path, manifest)] = ids
    while len(_ID_MAPS) > _ID_MAPS_KEPT:
        _ID_MAPS.pop(next(iter(_ID_MAPS)))


def _live_ids(index) -> dict[str, list[int]]:
    """Document id -> positions in the documents, for documents not deleted (a copy: the caller may change it)."""
    known = _ID_MAPS.get(_ids_key(index.path, index.manifest))
    if known is not None:
        return {doc_id: list(places) for doc_id, places in known.items()}
    live = {}
    for i in range(len(index.documents)):
        record = index.documents[i]
        if not record.get("deleted"):
            live.setdefault(record["id"], []).append(i)
    return live


_COMPATIBLE: dict = {}  # (index path, model, tokenizer) -> the state they were found compatible in


def _check_compatible(index, model, tokenizer) -> None:
    """`index.check_compatible(model, tokenizer)`, skipped when this model and tokenizer passed it for this index
    and no weight changed since (every in-place change of a tensor bumps its version; a new tensor has a new
    address). Fingerprinting MiniLM's weights and tokenizer costs about as much as encoding a block."""
    state = (index.manifest.encoder_fingerprint, index.manifest.tokenizer_fingerprint, len(tokenizer),
             tuple((name, tensor.data_ptr(), tensor._version) for name, tensor in model.state_dict().items()))
    key = (str(index.path), id(model), id(tokenizer))
    if _COMPATIBLE.get(key) == state:
        return
    index.check_compatible(model, tokenizer)
    _COMPATIBLE.clear()  # one entry: the model and tokenizer of the latest edits
    _COMPATIBLE[key] = state


def _document_line(document: dict) -> bytes:
    record = {key: document[key] for key in ("id", "title", "text")}
    if document.get("deleted"):
        record["deleted"] = True
    return json.dumps(record, ensure_ascii=False).encode("utf-8") + b"\n"


def _edit(index, write, rebuild_bm25: bool = False):
    """Run `write(staging)` on a staging directory (it writes the new files and returns the new manifest and the
    names of old files it replaces), link the other files in, record sizes and checksums, and swap the staging
    directory into place; all under the index's writer lock, and only if nobody changed the index since `index`
    was loaded. Returns the new manifest."""
    path = index.path
    with DirectoryLock(path, "index edit"):
        recover(path, MANIFEST_FILE)
        _check_unchanged_since_loaded(index)
        staging = staging_path(path)
        staging.mkdir()
        try:
            manifest, dropped = write(staging)
            changed = set(os.listdir(staging))
            if manifest.num_indexed_tokens == 0:  # nothing left to pre-filter
                manifest = dataclasses.replace(manifest, bm25_passages=[])
            rewritten = changed | (bm25_file_names(index.manifest.bm25_passages) if rebuild_bm25 else set())
            for name in set(index.manifest.files) - rewritten - dropped - {MANIFEST_FILE}:
                link_or_copy(path / name, staging / name)
            if rebuild_bm25:
                save_bm25_passages(staging, manifest.block_size, manifest.bm25_passages)
            unchanged = {name: entry for name, entry in index.manifest.files.items() if name not in rewritten}
            publish(staging, path, manifest, known_files=unchanged)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    return manifest


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
