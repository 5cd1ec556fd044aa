"""Edits that leave an index's files as they are (index format 4): added documents in append segments, deleted ones
in a tombstone file. `NPMIndex.compact` (`npm_hf.index.editing`) rewrites an edited index into a plain one.

An append segment `append-NNNNN` holds the documents one `add_documents` call added, in files of its own beside the
base's (`segment_file(name, part)`: `append-00001.token_ids.npy`, ...). Its tokens continue the corpus at the next
block boundary, its vector rows continue the rows and its documents the documents, so every corpus position, vector
row and document index means what it means in the index rebuilt with them. FAISS: a flat index has nothing stored
(the segment's vectors are filled in at load, like the base's); any other index keeps a copy of the base's trained
index holding the segment's vectors alone (`append-NNNNN.faiss`), searched beside the base's (a FAISS IndexShards,
whose `ntotal` is the base's plus the appended rows).

The tombstone file (`tombstones-NNNNN.npy`, a new name at every delete) lists the deleted documents: indices into
the documents, sorted. Their vector rows stay in the vectors and in FAISS until compaction; every search leaves them
out (`NPMIndexReader.search`), and at load their tokens are masked as a rewritten index would hold them (special,
id 0, no offsets), so no span, pre-filter or evidence reaches them. Their text stays on disk until compaction.

Loading an edited index concatenates the token arrays and positions of the base and its segments in memory (about
25 bytes per corpus token; an index without edits memory-maps them). `IndexManifest.edits` names the segments and
the tombstone file; every one of their files is listed and checksummed in the manifest like the base's.
"""

import dataclasses
import re
from pathlib import Path

import faiss
import numpy as np

from .faiss_io import add_vectors, is_flat
from .index_files import DocumentStore, NPMIndexError
from .tokens import SPECIAL
from .validation import check_faiss_file
from .vector_codes import NO_VECTORS, CodedVectors
from .vector_shards import ShardedArray


SEGMENT_NAME = "append-{:05d}"
TOMBSTONE_FILE = "tombstones-{:05d}.npy"
# The files of a segment: `segment_file(name, part)`; "faiss" only for indexes that are not flat; "codes" instead of
# "vectors" in an index without float16 vectors (`vector_codes`: the segment's rows coded by the base's coder).
SEGMENT_PARTS = {"token_ids": "token_ids.npy", "token_flags": "token_flags.npy", "token_docs": "token_docs.npy",
                 "token_offsets": "token_offsets.npy", "positions": "positions.npy", "vectors": "vectors.npy",
                 "codes": "vector_codes.npy", "documents": "documents.jsonl",
                 "document_offsets": "document_offsets.npy", "faiss": "faiss"}
_TOKEN_PARTS = ("token_ids", "token_flags", "token_docs", "token_offsets")
_SEGMENT_FIELDS = ("first_token", "num_tokens", "first_row", "num_rows", "first_document", "num_documents")
_NAME_PATTERN = re.compile(r"append-\d{5}")
_TOMBSTONE_PATTERN = re.compile(r"tombstones-\d{5}\.npy")
# An edited index searches one FAISS index per segment: past this many, `index compact` is advised.
SEGMENTS_BEFORE_COMPACTION = 64


def segment_file(name: str, part: str) -> str:
    return f"{name}.{SEGMENT_PARTS[part]}"


def segments(manifest) -> list[dict]:
    """The append segments of an index, in order ([] for an index without any)."""
    return list((manifest.edits or {}).get("segments", []))


def tombstone_file(manifest) -> str | None:
    return (manifest.edits or {}).get("tombstones")


def segment_files(manifest, segment: dict) -> list[str]:
    """Every file name of `segment` that the manifest must list."""
    skipped = {"vectors" if segment.get("codes") else "codes", *(() if segment.get("faiss") else ("faiss",))}
    parts = [part for part in SEGMENT_PARTS if part not in skipped]
    return [segment_file(segment["name"], part) for part in parts] + list(segment.get("bm25_files", []))


def edit_file_names(manifest) -> set[str]:
    """The names of every file the edits of `manifest` add to the base's."""
    names = {name for segment in segments(manifest) for name in segment_files(manifest, segment)}
    return names | ({tombstone_file(manifest)} if tombstone_file(manifest) else set())


def base_manifest(manifest):
    """The manifest of the index without its segments: the counts that the base's own files hold."""
    parts = segments(manifest)
    if not parts:
        return manifest
    first = parts[0]
    num_tokens = int(first["first_token"])
    return dataclasses.replace(manifest, num_tokens=num_tokens, num_indexed_tokens=int(first["first_row"]),
                               num_documents=int(first["first_document"]),
                               num_blocks=-(-num_tokens // manifest.block_size))


def check_edits(path: Path, manifest) -> None:
    """The edits record names plain files the manifest lists, and its segments continue each other up to the
    manifest's totals: a crafted or damaged record is refused before anything is read."""
    edits = manifest.edits or {}
    parts = segments(manifest)
    problems = []
    if not isinstance(edits.get("segments", []), list):
        problems.append("segments is not a list")
        parts = []
    ends = None
    for segment in parts:
        if not (isinstance(segment, dict) and isinstance(segment.get("name"), str)
                and _NAME_PATTERN.fullmatch(segment["name"])
                and all(type(segment.get(key)) is int and segment[key] >= 0 for key in _SEGMENT_FIELDS)):
            problems.append(f"segment {segment!r} is not a record of {list(_SEGMENT_FIELDS)} with a name append-NNNNN")
            break
        starts = (segment["first_token"], segment["first_row"], segment["first_document"])
        if segment.get("codes", False) is not (manifest.vector_dtype == NO_VECTORS):
            problems.append(f"segment {segment['name']} holds {'codes' if segment.get('codes') else 'float16 vectors'}"
                            f", the index vector_dtype={manifest.vector_dtype!r}")
        if ends is not None and starts != ends:
            problems.append(f"segment {segment['name']} does not continue the one before it")
        extra = segment.get("bm25_files", [])
        if not (isinstance(extra, list) and all(isinstance(f, str) and f.startswith(f"{segment['name']}.bm25-")
                                                 and "/" not in f and "\\" not in f for f in extra)):
            problems.append(f"segment {segment['name']} lists BM25 files {extra!r} that are not its own")
        ends = (segment["first_token"] + segment["num_tokens"], segment["first_row"] + segment["num_rows"],
                segment["first_document"] + segment["num_documents"])
    if ends is not None and not problems and ends != (manifest.num_tokens, manifest.num_indexed_tokens,
                                                      manifest.num_documents):
        problems.append(f"the segments end at (tokens, rows, documents) {ends}, the manifest says "
                        f"{(manifest.num_tokens, manifest.num_indexed_tokens, manifest.num_documents)}")
    tombstones = tombstone_file(manifest)
    if tombstones is not None and not (isinstance(tombstones, str) and _TOMBSTONE_PATTERN.fullmatch(tombstones)):
        problems.append(f"tombstones={tombstones!r} is not a file name tombstones-NNNNN.npy")
    if not problems:
        missing = sorted(edit_file_names(manifest) - set(manifest.files))
        if missing:
            problems.append(f"its files {missing[:5]} are not listed")
    if problems:
        raise NPMIndexError(f"The edits recorded in the manifest of {path} are corrupted: {'; '.join(problems)}. "
                            "Rebuild the index (or restore its manifest).")


@dataclasses.dataclass
class EditedParts:
    """The base and segments of an index read as one: what `NPMIndexReader` holds."""

    token_arrays: dict
    positions: np.ndarray
    vectors: ShardedArray
    documents: "EditedDocuments | DocumentStore"
    deleted_documents: np.ndarray  # sorted document indices
    deleted_rows: np.ndarray | None  # bool per vector row; None: nothing deleted
    segment_vectors: list


def open_edits(path: Path, manifest, token_arrays: dict, positions, vectors: ShardedArray,
               documents: DocumentStore) -> EditedParts:
    """The base's arrays (memory-mapped) joined with the segments of `manifest`, tokens of deleted documents masked."""
    path = Path(path)
    parts = segments(manifest)
    stores, segment_vectors = [documents], []
    arrays = {name: [array] for name, array in token_arrays.items()}
    all_positions = [positions]
    for segment in parts:
        loaded = _open_segment(path, manifest, segment, getattr(vectors, "codec", None))
        for name in _TOKEN_PARTS:
            arrays[name].append(loaded[name])
        all_positions.append(loaded["positions"])
        segment_vectors.append(loaded["vectors"])
        stores.append(loaded["documents"])
    if parts:
        token_arrays = {name: np.concatenate(chunks) for name, chunks in arrays.items()}
        positions = np.concatenate(all_positions)
        if isinstance(vectors, CodedVectors):
            vectors = CodedVectors(ShardedArray([*vectors.codes.shards, *(v.codes for v in segment_vectors)]),
                                   vectors.codec)
        else:
            vectors = ShardedArray([*vectors.shards, *segment_vectors])
    deleted = _read_tombstones(path, manifest)
    deleted_rows = None
    if len(deleted):
        dead = np.isin(token_arrays["token_docs"], deleted)
        token_arrays = dict(token_arrays)
        token_arrays["token_ids"] = np.where(dead, 0, token_arrays["token_ids"]).astype(token_arrays["token_ids"].dtype)
        token_arrays["token_flags"] = np.where(dead, SPECIAL, token_arrays["token_flags"]).astype(
            token_arrays["token_flags"].dtype)
        token_arrays["token_offsets"] = np.where(dead[:, None], 0, token_arrays["token_offsets"]).astype(
            token_arrays["token_offsets"].dtype)
        deleted_rows = dead[np.asarray(positions)]
    if parts or len(deleted):
        documents = EditedDocuments(stores, [int(s["first_document"]) for s in parts], deleted)
    return EditedParts(token_arrays, positions, vectors, documents, deleted, deleted_rows, segment_vectors)


def _open_segment(path: Path, manifest, segment: dict, codec=None) -> dict:
    """A segment's arrays (memory-mapped) and documents, checked against its record; an index without float16
    vectors reads its codes (decoded by the base's `codec`) as its vectors."""
    name = segment["name"]
    coded = bool(segment.get("codes"))
    try:
        loaded = {part: np.asarray(np.load(path / segment_file(name, part), mmap_mode="r", allow_pickle=False))
                  for part in (*_TOKEN_PARTS, "positions", "codes" if coded else "vectors")}
        if coded:
            loaded["vectors"] = loaded.pop("codes")
        offsets = np.load(path / segment_file(name, "document_offsets"), allow_pickle=False)
    except (ValueError, OSError) as error:
        raise NPMIndexError(f"The files of segment {name} in {path} are corrupted ({error}); "
                            "rebuild the index.") from None
    first, n = segment["first_token"], segment["num_tokens"]
    doc_lo, doc_hi = segment["first_document"], segment["first_document"] + segment["num_documents"]
    documents_bytes = (path / segment_file(name, "documents")).stat().st_size
    shapes = {**{part: (loaded[part].shape[:1], (n,)) for part in _TOKEN_PARTS},
              "positions": (loaded["positions"].shape, (segment["num_rows"],)),
              "vectors": (loaded["vectors"].shape,
                          (segment["num_rows"], codec.sa_code_size() if coded else manifest.hidden_size)),
              "document_offsets": (offsets.shape, (segment["num_documents"] + 1,))}
    problems = [f"{part} has shape {tuple(got)}, not {tuple(want)}" for part, (got, want) in shapes.items()
                if tuple(got) != tuple(want)]
    if not problems:
        rows, docs = loaded["positions"], loaded["token_docs"]
        if loaded["vectors"].dtype != (np.uint8 if coded else np.float16):
            problems.append(f"vectors hold {loaded['vectors'].dtype}, not {'uint8 codes' if coded else 'float16'}")
        if len(rows) and (rows[0] < first or rows[-1] >= first + n or (np.diff(rows) <= 0).any()):
            problems.append(f"positions are not increasing within {first}..{first + n - 1}")
        if len(docs) and (((docs < doc_lo) & (docs != -1)) | (docs >= doc_hi)).any():
            problems.append(f"token_docs are not documents {doc_lo}..{doc_hi - 1}")
        token_offsets = loaded["token_offsets"]
        if token_offsets.ndim != 2 or ((token_offsets[:, 0] < 0) | (token_offsets[:, 0] > token_offsets[:, 1])).any():
            problems.append("token_offsets are not 0 <= start <= end")
        if offsets[0] != 0 or offsets[-1] != documents_bytes or (np.diff(offsets) <= 0).any():
            problems.append(f"document_offsets do not run from 0 to the {documents_bytes} bytes of its documents")
    if problems:
        raise NPMIndexError(f"Segment {name} of the index at {path} is corrupted: {'; '.join(problems)}. "
                            "Rebuild the index.")
    loaded["documents"] = DocumentStore(path / segment_file(name, "documents"), offsets)
    if coded:
        loaded["vectors"] = CodedVectors(loaded["vectors"], codec)
    return loaded


def _read_tombstones(path: Path, manifest) -> np.ndarray:
    name = tombstone_file(manifest)
    if name is None:
        return np.zeros(0, dtype=np.int64)
    try:
        deleted = np.load(path / name, allow_pickle=False)
    except (ValueError, OSError) as error:
        raise NPMIndexError(f"{path / name} is corrupted ({error}); rebuild the index.") from None
    if (deleted.ndim != 1 or not np.issubdtype(deleted.dtype, np.integer)
            or (len(deleted) and (deleted[0] < 0 or deleted[-1] >= manifest.num_documents
                                  or (np.diff(deleted) <= 0).any()))):
        raise NPMIndexError(f"{path / name} is not a sorted list of document indices below {manifest.num_documents} "
                            "(crafted or damaged); rebuild the index.")
    return deleted.astype(np.int64)


class EditedDocuments:
    """The documents of the base and its segments as one sequence; a deleted one reads as a record without text."""

    def __init__(self, stores: list, starts: list[int], deleted: np.ndarray):
        self._stores = stores
        self._starts = np.asarray([0, *starts], dtype=np.int64)
        self._deleted = set(np.asarray(deleted).tolist())

    def __len__(self) -> int:
        return int(self._starts[-1]) + len(self._stores[-1])

    def __getitem__(self, i: int) -> dict:
        i = int(i)
        if not 0 <= i < len(self):
            raise IndexError(f"document {i} is out of range (0..{len(self) - 1})")
        part = int(np.searchsorted(self._starts, i, side="right")) - 1
        document = self._stores[part][i - int(self._starts[part])]
        if i in self._deleted:
            return {"id": document["id"], "title": "", "text": "", "deleted": True}
        return document


# ---------------------------------------------------------------------------------------------------- FAISS
def join_faiss(path: Path, manifest, base_index, segment_vectors: list, streamed: bool):
    """The FAISS index over the base's and the segments' rows: `base_index` itself without segments (or when a flat
    index too large to fill is searched by streaming over the vectors), else an IndexShards of the base's and one
    index per segment (row numbers continue from shard to shard)."""
    parts = segments(manifest)
    if not parts or streamed:
        return base_index
    shards = faiss.IndexShards(base_index.d, False, True)  # not threaded; successive ids: rows continue
    members = [base_index]
    for segment, vectors in zip(parts, segment_vectors):
        if is_flat(base_index):
            member = faiss.IndexFlat(base_index.d, base_index.metric_type)
            try:
                add_vectors(member, vectors)
            except ValueError as error:
                raise NPMIndexError(f"The vectors of segment {segment['name']} of the index at {path} are corrupted: "
                                    f"{error}. Rebuild the index.") from None
        else:
            file = path / segment_file(segment["name"], "faiss")
            check_faiss_file(file, manifest.hidden_size)
            member = faiss.read_index(str(file), faiss.IO_FLAG_MMAP_IFC | faiss.IO_FLAG_READ_ONLY)  # codes mapped
            if member.ntotal != segment["num_rows"]:
                raise NPMIndexError(f"{file} holds {member.ntotal} vectors, its segment {segment['num_rows']}; "
                                    "rebuild the index.")
        members.append(member)
    for member in members:
        shards.add_shard(member)
    shards.referenced_objects = members  # IndexShards does not own its members: keep them alive with it
    return shards


def base_of(faiss_index):
    """The base's own FAISS index of an edited index's IndexShards (the index itself otherwise)."""
    joined = faiss.downcast_index(faiss_index)
    if isinstance(joined, faiss.IndexShards):
        return faiss.downcast_index(joined.at(0))
    return faiss_index


# ---------------------------------------------------------------------------------------------------- search
def fetch_count(k: int, deleted_rows: np.ndarray | None, num_rows: int) -> int:
    """How many rows to ask FAISS for so that `k` remain once deleted rows are dropped."""
    extra = 0 if deleted_rows is None else int(deleted_rows.sum())
    return min(int(k) + extra, num_rows)


def drop_deleted(scores: np.ndarray, rows: np.ndarray, deleted_rows: np.ndarray | None,
                 k: int) -> tuple[np.ndarray, np.ndarray]:
    """The first `k` results per query that are not deleted rows, in their order (rows of -1: none found, kept at
    the end with score -inf)."""
    if deleted_rows is None:
        return scores[:, :k], rows[:, :k]
    gone = (rows < 0) | deleted_rows[np.where(rows >= 0, rows, 0)]
    order = np.argsort(gone, axis=1, kind="stable")[:, :k]
    scores, rows = np.take_along_axis(scores, order, axis=1), np.take_along_axis(rows, order, axis=1)
    unfilled = np.take_along_axis(gone, order, axis=1)
    return np.where(unfilled, -np.inf, scores).astype(scores.dtype), np.where(unfilled, -1, rows)
