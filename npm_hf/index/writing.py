"""Writing an index directory: the corpus files (documents, token arrays, positions), then the manifest with every
file's size and checksum, and the atomic swap into place."""

import contextlib
import hashlib
import json
import os
import shutil
from pathlib import Path

import faiss
import numpy as np
import torch
import transformers
from tqdm.auto import tqdm
from transformers.utils import logging

from ..corpus import TOKENIZE_WINDOW_CHARS, CorpusStats, iter_documents, tokenize_documents
from ..inference.compact_tokens import COMPACT_TOKEN_FILES, write_compact_tokens
from ..inference.directory_swap import swap_into_place
from ..inference.index_files import (DOCUMENT_OFFSETS_FILE, DOCUMENTS_FILE, MANIFEST_FILE, POSITIONS_FILE, TOKEN_FILES,
                                     IndexManifest, sha256_file)
from ..inference.tokens import TOKEN_DTYPE
from ..inference.vector_shards import parse_memory_size
from ..version import __version__
from .arguments import IndexBuildArguments
from .encoding import indexed_token_mask
from .memory import check_document_fits


logger = logging.get_logger(__name__)

_WRITE_CHUNK = 1 << 20  # tokens written to the column files at a time


def write_corpus(staging: Path, corpus, tokenizer, args: IndexBuildArguments) -> CorpusStats:
    """Tokenize every document; write documents.jsonl, its offsets and the per-token arrays. Token records stream
    to raw files as documents are tokenized (memory stays flat whatever the corpus size) and become .npy files at
    the end, byte for byte what `np.save` writes."""
    stats = CorpusStats()
    offsets, id_hashes = [0], []
    raw = {name: staging / f".{file}.raw" for name, file in TOKEN_FILES.items()}
    with open(staging / DOCUMENTS_FILE, "wb") as handle, contextlib.ExitStack() as stack:
        columns = {name: stack.enter_context(open(path, "wb")) for name, path in raw.items()}
        budget = None if args.max_memory is None else parse_memory_size(args.max_memory)
        documents = tqdm(_within_budget(iter_documents(corpus), budget), desc="Tokenizing corpus", unit="doc",
                         disable=not args.show_progress_bar)
        for document, records in tokenize_documents(documents, tokenizer, stats, block_size=args.block_size):
            for lo in range(0, len(records), _WRITE_CHUNK):  # in slices: a long document's copies stay small
                part = records[lo : lo + _WRITE_CHUNK]
                columns["token_ids"].write(part["id"].tobytes())
                columns["token_flags"].write(part["flags"].tobytes())
                columns["token_docs"].write(np.full(len(part), stats.num_documents - 1, np.int32).tobytes())
                columns["token_offsets"].write(np.stack([part["start"], part["end"]], axis=1).tobytes())
            del records, part
            line = json.dumps({"id": document["id"], "title": document["title"], "text": document["text"]},
                              ensure_ascii=False).encode("utf-8") + b"\n"
            handle.write(line)
            offsets.append(offsets[-1] + len(line))
            id_hashes.append(_id_hash(document["id"]))
    _refuse_duplicate_ids(staging / DOCUMENTS_FILE, offsets, np.asarray(id_hashes, dtype=np.uint64))
    if stats.num_skipped_empty:
        logger.warning(f"Skipped {stats.num_skipped_empty} empty or whitespace-only documents.")
    if stats.num_skipped_paragraphs:
        logger.warning(f"Skipped {stats.num_skipped_paragraphs} paragraphs that contain the mask token "
                       f"{tokenizer.mask_token!r} (as the official code does): a query could retrieve them.")
    if stats.num_documents == 0:
        raise ValueError(
            "The corpus has no non-empty document"
            + (f" ({stats.num_skipped_empty} empty ones skipped)" if stats.num_skipped_empty else "")
            + "; an index needs at least one document with text."
        )
    row_shapes = {"token_ids": (), "token_flags": (), "token_docs": (), "token_offsets": (2,)}
    for name, file in TOKEN_FILES.items():
        dtype = TOKEN_DTYPE[_TOKEN_FIELDS[name]]
        _raw_to_npy(raw[name], staging / file, dtype, (stats.num_tokens, *row_shapes[name]))
    np.save(staging / DOCUMENT_OFFSETS_FILE, np.asarray(offsets, dtype=np.int64))
    return stats


def _id_hash(doc_id) -> int:
    return int.from_bytes(hashlib.blake2b(str(doc_id).encode("utf-8"), digest_size=8).digest(), "little")


def _refuse_duplicate_ids(documents: Path, offsets: list[int], id_hashes: np.ndarray) -> None:
    """Raise ValueError naming the document ids that occur more than once (deleting one such id would delete every
    document with it, and `index add` refuses a taken id: one rule everywhere). Ids are compared by 8-byte hashes
    (memory stays small), and the candidates confirmed on their records."""
    values, counts = np.unique(id_hashes, return_counts=True)
    suspects = set(values[counts > 1].tolist())
    if not suspects:
        return
    seen, duplicates = {}, []
    with open(documents, "rb") as handle:
        for i in np.flatnonzero(np.isin(id_hashes, list(suspects))):
            handle.seek(offsets[i])
            doc_id = json.loads(handle.read(offsets[i + 1] - offsets[i]))["id"]
            seen[doc_id] = seen.get(doc_id, 0) + 1
            if seen[doc_id] == 2:
                duplicates.append(doc_id)
    if duplicates:
        shown = ", ".join(repr(d) for d in duplicates[:10]) + (f" and {len(duplicates) - 10} more"
                                                                 if len(duplicates) > 10 else "")
        raise ValueError(f"The corpus has {len(duplicates)} document ids that occur more than once: {shown}. Give "
                         "every document its own 'id' (or leave 'id' out to number them).")


def _within_budget(documents, budget: int | None):
    """The documents, each checked against the memory budget before it is tokenized (long ones only: the check
    reads /proc)."""
    for document in documents:
        if budget is not None and len(document["text"]) > TOKENIZE_WINDOW_CHARS:
            check_document_fits(document, budget)
        yield document


# the TOKEN_DTYPE field each token file stores (token_offsets: start and end)
_TOKEN_FIELDS = {"token_ids": "id", "token_flags": "flags", "token_docs": "doc", "token_offsets": "start"}


def _raw_to_npy(raw: Path, npy: Path, dtype: np.dtype, shape: tuple) -> None:
    """Turn a file of raw C-order `dtype` values into the .npy file `np.save` would write, without reading it
    into memory (a header, then the bytes); the raw file is removed."""
    expected = int(np.prod(shape)) * dtype.itemsize
    if raw.stat().st_size != expected:  # a bug, not bad input: the columns were written in step
        raise RuntimeError(f"{raw} holds {raw.stat().st_size} bytes, expected {expected} for {shape} {dtype}.")
    with open(npy, "wb") as out, open(raw, "rb") as source:
        np.lib.format.write_array_header_1_0(out, {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)),
                                                   "fortran_order": False, "shape": tuple(shape)})
        shutil.copyfileobj(source, out, 1 << 22)
    raw.unlink()


def write_positions(staging: Path, ids: np.ndarray, flags: np.ndarray, rule: dict, chunk: int = 1 << 22) -> None:
    """positions.npy: the corpus position of every indexed token (`indexed_token_mask`), computed chunk by chunk."""
    raw = staging / f".{POSITIONS_FILE}.raw"
    count = 0
    with open(raw, "wb") as out:
        for lo in range(0, len(flags), chunk):
            keep = indexed_token_mask(ids[lo : lo + chunk], flags[lo : lo + chunk], **rule)
            rows = np.flatnonzero(keep).astype(np.int64) + lo
            out.write(rows.tobytes())
            count += len(rows)
    _raw_to_npy(raw, staging / POSITIONS_FILE, np.dtype(np.int64), (count,))


def compact_token_files(directory: Path, block_size: int) -> None:
    """Turn the format 1/2 token files and positions.npy of `directory` into format 3's (`compact_tokens`); the
    old files are removed once the new ones are complete (a conversion cut short is done again from them)."""
    directory = Path(directory)
    classic = {name: np.load(directory / file, mmap_mode="r", allow_pickle=False) for name, file in TOKEN_FILES.items()}
    positions = np.load(directory / POSITIONS_FILE, mmap_mode="r", allow_pickle=False)
    write_compact_tokens(directory, classic["token_ids"], classic["token_flags"], classic["token_docs"],
                         classic["token_offsets"], positions, block_size)
    del classic, positions
    for file in {*TOKEN_FILES.values(), POSITIONS_FILE} - set(COMPACT_TOKEN_FILES.values()):
        (directory / file).unlink()


def save_token_arrays(directory: Path, tokens: dict, positions: np.ndarray, block_size: int,
                      compact: bool) -> None:
    """Write an edited index's token arrays (`{"id", "flags", "doc", "offsets"}`) and positions, in format 3's
    files (`compact`) or formats 1 and 2's."""
    if compact:
        write_compact_tokens(directory, tokens["id"], tokens["flags"], tokens["doc"], tokens["offsets"], positions,
                             block_size)
        return
    names = {"id": "token_ids", "flags": "token_flags", "doc": "token_docs", "offsets": "token_offsets"}
    for name, array in tokens.items():
        np.save(directory / TOKEN_FILES[names[name]], np.ascontiguousarray(array))
    np.save(directory / POSITIONS_FILE, np.asarray(positions, dtype=np.int64))


def publish(staging: Path, output_dir: Path, manifest: IndexManifest, known_files: dict | None = None) -> None:
    """Record every staged file's size and sha256 in the manifest (reusing `known_files` entries for files copied
    unchanged), write the manifest last, and move the finished directory into place."""
    known_files = known_files or {}
    manifest.files = {
        name: known_files.get(name) or {"bytes": (staging / name).stat().st_size, "sha256": sha256_file(staging / name)}
        for name in sorted(os.listdir(staging))
    }
    # atomically, and last: a staging directory with a manifest is complete (what `directory_swap.recover` trusts)
    tmp = staging / f".{MANIFEST_FILE}.tmp"
    tmp.write_text(manifest.to_json())
    os.replace(tmp, staging / MANIFEST_FILE)
    swap_into_place(staging, output_dir)


def library_versions() -> dict:
    return {"npm_hf": __version__, "transformers": transformers.__version__, "torch": torch.__version__,
            "faiss": faiss.__version__, "numpy": np.__version__}
