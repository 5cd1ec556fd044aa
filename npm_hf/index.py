"""The reference-corpus index of an NPM: one float16 vector per corpus token, searched by inner product.

Layout of an index directory (`<model>/index` by default); every file loads without pickle:

    manifest.json          IndexManifest: counts, dims, fingerprints of encoder and tokenizer, file checksums
    token_ids.npy          token id of every corpus token (blocks are consecutive runs of block_size tokens: packed
                           paragraphs of one document, then PAD tokens, see `corpus`)
    token_flags.npy        WORD_START / WORD_END / SPECIAL / LINE_START / PAD bits per token
    token_docs.npy         document of every token
    token_offsets.npy      (start, end) character offsets of every token in its document's text
    positions.npy          corpus position of every indexed token = row of the vectors: as in the official
                           datastore, word starts and word ends only (not mid-word pieces), and with
                           remove_stopwords no stop-word id (`indexed_token_mask`)
    vectors.npy            (num_indexed, hidden_size) float16 last hidden states, memory-mapped; when they exceed
                           max_shard_size, row shards vectors-00000-of-0000N.npy instead (see `shard_layout`)
    index.faiss            FAISS inner-product index over the rows of the vectors (a flat one is stored empty and
                           filled from the vectors when loaded: the same values, without a float32 copy on disk)
    index.ivfdata          IVF indexes: their inverted lists, merged on disk and memory-mapped when loaded
    documents.jsonl        one {"id", "title", "text"} line per document
    document_offsets.npy   byte offset of every line of documents.jsonl, plus the file size

A build writes into a hidden sibling directory (`.{name}.partial`, see `index_build`: resumable, and shared by the
processes of a multi-process build) and renames it into place at the end, so an interrupted build never leaves a
directory that loads.
"""

import contextlib
import dataclasses
import hashlib
import io
import json
import mmap
import os
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from transformers.utils import logging

from .corpus import PAD, SPECIAL, TOKEN_DTYPE, WORD_END, WORD_START, CorpusStats, iter_documents, tokenize_documents
from .stopwords import id_table, reference_stopword_ids


logger = logging.get_logger(__name__)

# Format 2 stores the vectors in several shards; an index with one vectors.npy is still written as format 1, so
# older npm_hf versions keep reading it (and refuse a sharded one with "upgrade npm_hf" instead of a wrong error).
FORMAT_VERSION = 2
_SINGLE_FILE_FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
TOKEN_FILES = {"token_ids": "token_ids.npy", "token_flags": "token_flags.npy", "token_docs": "token_docs.npy",
               "token_offsets": "token_offsets.npy"}
POSITIONS_FILE = "positions.npy"
VECTORS_FILE = "vectors.npy"
VECTOR_SHARD_FILE = "vectors-{:05d}-of-{:05d}.npy"
DEFAULT_MAX_SHARD_SIZE = "10GB"  # the Hub takes up to 50 GB per file and recommends under 20 GB
_HUB_MAX_FILE_BYTES = 50 * 10**9  # as hub_cards.HUB_MAX_FILE_BYTES (not imported: this module is also remote code)
FAISS_FILE = "index.faiss"
IVFDATA_FILE = "index.ivfdata"  # the inverted lists of an IVF index merged on disk (index_build)
DOCUMENTS_FILE = "documents.jsonl"
DOCUMENT_OFFSETS_FILE = "document_offsets.npy"
# verify="fast" hashes files up to this size on every load; larger ones are checked by size (all with "full").
_FAST_VERIFY_MAX_BYTES = 64 << 20
_FAISS_ADD_CHUNK = 65536
# Flat (exact) indexes up to this many vectors are filled into FAISS when loaded (a float32 copy in RAM, 1.5 GiB at
# d=384: fast searches); larger ones are searched chunk by chunk over the memory-mapped float16 vectors instead.
FLAT_FILL_MAX_VECTORS = 1 << 20
_STREAM_CHUNK_ROWS = 1 << 16
AUTO_FACTORY = "auto"
# FAISS's k-means asks for this many training points per centroid (it warns below); fewer than 1 per centroid fails.
_POINTS_PER_CENTROID = 39
# suggest_faiss_factory: exact search up to this many vectors (FAISS's own guideline for IndexFlat is ~1M).
_FLAT_MAX_VECTORS = 1_000_000
_HUB_FILES_PER_FOLDER = 10_000  # the Hub's recommendation


# NPMIndex.search_many: FAISS's matrix-product search of a flat index from this many queries on, in blocks of this
# many stored vectors.
_BLAS_MIN_QUERIES = 16
_BLAS_DATABASE_BLOCK = 32768


class NPMIndexError(ValueError):
    """An index directory is missing, incomplete, corrupted, or does not belong to the model."""


class IndexMismatchError(NPMIndexError):
    """The index was built with another encoder or tokenizer than the one it is used with."""


@dataclass
class IndexBuildArguments:
    """How to build a reference-corpus index (`npm_hf.build_index`, `npm-hf build-index`)."""

    block_size: int = field(default=256, metadata={"help": "Tokens per encoded block (the paper uses 256)."})
    batch_size: int = field(default=16, metadata={"help": "Blocks encoded per forward pass."})
    faiss_factory: str = field(
        default="Flat",
        metadata={"help": "FAISS index_factory string, always with inner product (e.g. Flat, HNSW32, IVF1024,PQ64), "
                          "or 'auto' to pick one from the corpus size and --max-memory."},
    )
    max_memory: str | None = field(
        default=None,
        metadata={"help": "Memory budget of the whole build, e.g. 8GB or 512MiB: the process's resident memory "
                          "(interpreter, libraries, model weights, encoding batches, FAISS training sample and "
                          "index). The build caps the training sample to it and refuses, before encoding, a "
                          "faiss_factory that cannot fit; 'auto' picks a factory that fits. Memory-mapped files "
                          "(vectors, token arrays) are not counted: the kernel pages them in and out."},
    )
    train_sample_size: int = field(
        default=1_000_000, metadata={"help": "Vectors sampled to train FAISS indexes that need training."}
    )
    max_shard_size: int | str = field(
        default=DEFAULT_MAX_SHARD_SIZE,
        metadata={"help": "Largest vectors file, in bytes or as e.g. 500MB, 10GB or 2GiB; larger vectors are split "
                          "into vectors-00000-of-0000N.npy shards (the Hub refuses files above 50GB)."},
    )
    overwrite: bool = field(
        default=False,
        metadata={"help": "Replace an existing index at the output path (and an interrupted build's partial work)."},
    )
    resume: bool = field(
        default=False,
        metadata={"help": "Continue an interrupted build of the same output (kept in the hidden .NAME.partial "
                          "directory beside it) from the work units it finished."},
    )
    blocks_per_unit: int = field(
        default=256,
        metadata={"help": "Blocks per resumable work unit (rounded up to whole batches): what a process encodes "
                          "and saves at a time, and what a resumed build does not encode again."},
    )
    show_progress_bar: bool = field(default=True, metadata={"help": "Show tqdm progress bars."})
    seed: int = field(default=0, metadata={"help": "Seed of the FAISS training sample."})
    remove_stopwords: bool = field(
        default=False,
        metadata={"help": "Leave stop-word and punctuation ids out of the index (the paper's open-set datastore, "
                          "`npm_hf.stopwords.reference_stopword_ids`): they are in neither softmax. The paper "
                          "protocol's open-set evaluation needs such an index."},
    )
    index_all_tokens: bool = field(
        default=False,
        metadata={"help": "Index mid-word pieces too (npm_hf before 0.2). By default only word starts and word ends "
                          "get a vector, as in the official datastore: the others can never start or end an answer."},
    )

    def __post_init__(self):
        for name in ("block_size", "batch_size", "train_sample_size", "blocks_per_unit"):
            if getattr(self, name) < 1:
                raise ValueError(f"IndexBuildArguments.{name} must be >= 1, got {getattr(self, name)}.")
        if self.block_size < 3:
            raise ValueError(
                f"IndexBuildArguments.block_size must be >= 3 (room for special tokens), got {self.block_size}."
            )
        if not self.faiss_factory.strip():
            raise ValueError("IndexBuildArguments.faiss_factory must be a FAISS factory string such as 'Flat'.")
        if self.max_memory is not None:
            parse_memory_size(self.max_memory)  # a malformed size fails here, before any work
        if parse_shard_size(self.max_shard_size) > _HUB_MAX_FILE_BYTES:
            logger.warning(f"max_shard_size={self.max_shard_size!r} allows vector files above the Hub's 50 GB "
                           "per-file limit; such an index cannot be pushed to the Hub.")


@dataclass
class IndexManifest:
    """What an index holds and how it was built; saved as manifest.json."""

    format_version: int
    encoder_fingerprint: str
    tokenizer_fingerprint: str
    encoder_name_or_path: str
    hidden_size: int
    block_size: int
    faiss_factory: str
    num_documents: int
    num_skipped_empty_documents: int
    num_tokens: int
    num_indexed_tokens: int
    num_blocks: int
    build_seconds: float
    versions: dict
    files: dict = field(default_factory=dict)
    metric: str = "inner_product"
    vector_dtype: str = "float16"
    num_deleted_documents: int = 0  # documents.jsonl keeps a record without text for each (token_docs stay valid)
    # [{"file", "start", "stop"}] per vector shard, rows [start, stop); empty = one vectors.npy (format 1 indexes)
    vector_shards: list = field(default_factory=list)
    max_shard_bytes: int | None = None  # the rule the shards were cut by; edits cut new shards by it too
    line_starts_marked: bool = False  # token_flags carry LINE_START (builds since it exists; older ones do not)
    # What is indexed and how blocks are cut (older builds: every non-special token, one running token stream)
    boundary_tokens_only: bool = False
    stopwords_removed: bool = False
    paragraph_blocks: bool = False

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict) -> "IndexManifest":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            logger.warning(f"Ignoring unknown index manifest keys {unknown}; upgrade npm_hf to use them.")
        return cls(**{key: value for key, value in data.items() if key in known})


def encoder_fingerprint(model) -> str:
    """Identify encoder weights: names, shapes and a strided sample of every tensor, rounded to bfloat16 so that
    fp32 and bf16 copies of the same weights agree."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        flat = tensor.detach().reshape(-1)
        picks = torch.linspace(0, max(flat.numel() - 1, 0), min(flat.numel(), 4096)).long()
        sample = flat[picks].to("cpu", torch.float32).to(torch.bfloat16).view(torch.int16).numpy()
        digest.update(f"{name}:{tuple(tensor.shape)}:".encode())
        digest.update(sample.tobytes())
    return digest.hexdigest()


def tokenizer_fingerprint(tokenizer) -> str:
    """Identify a tokenizer by its full backend definition (vocabulary, normaliser, pre-tokenizer, specials)."""
    definition = json.loads(tokenizer.backend_tokenizer.to_str())
    for transient in ("truncation", "padding"):  # runtime settings, changed by calls with truncation=True
        definition.pop(transient, None)
    return hashlib.sha256(json.dumps(definition, sort_keys=True).encode()).hexdigest()


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


class DocumentStore:
    """Random access to documents.jsonl through a memory map and the byte offsets of its lines."""

    _CACHE_SIZE = 64  # parsed documents kept: one answer list cites a handful, often the same ones

    def __init__(self, path: Path, offsets: np.ndarray):
        self._offsets = offsets
        self._file = open(path, "rb")
        self._map = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ) if offsets[-1] > 0 else b""
        self._cache: dict[int, dict] = {}

    def __len__(self) -> int:
        return len(self._offsets) - 1

    def __getitem__(self, i: int) -> dict:
        i = int(i)
        if i not in self._cache:
            if len(self._cache) >= self._CACHE_SIZE:
                self._cache.pop(next(iter(self._cache)))
            self._cache[i] = json.loads(self._map[int(self._offsets[i]) : int(self._offsets[i + 1])])
        return self._cache[i]


class ShardedArray:
    """Row shards (arrays of one dtype and row shape, e.g. memory-mapped .npy files) read as their concatenation
    along the first axis, which is never built: indexing with an int, a slice or an integer (or boolean) array
    returns what indexing `np.concatenate(shards)` would, reading only the rows asked for. Writable shards also take
    `array[lo:hi] = rows`, how a build streams vectors into them."""

    def __init__(self, shards):
        self.shards = list(shards)
        if not self.shards:
            raise ValueError("A ShardedArray needs at least one shard.")
        first = self.shards[0]
        for shard in self.shards[1:]:
            if shard.dtype != first.dtype or shard.shape[1:] != first.shape[1:]:
                raise ValueError(f"Shards differ: {first.dtype}{first.shape[1:]} and {shard.dtype}{shard.shape[1:]}.")
        self.bounds = np.cumsum([0] + [len(shard) for shard in self.shards])  # shard i: rows bounds[i]:bounds[i+1]
        self.shape = (int(self.bounds[-1]), *first.shape[1:])
        self.dtype = first.dtype

    def __len__(self) -> int:
        return self.shape[0]

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def __repr__(self) -> str:
        return f"ShardedArray(shape={self.shape}, dtype={self.dtype}, shards={len(self.shards)})"

    def __array__(self, dtype=None, copy=None):
        """All rows in one array: a full copy unless there is a single shard (for small indexes and tests)."""
        if copy is False and len(self.shards) > 1:
            raise ValueError("Several shards cannot be presented as one array without copying them.")
        whole = self.shards[0] if len(self.shards) == 1 else np.concatenate(self.shards)
        whole = np.asarray(whole, dtype=dtype)
        return whole.copy() if copy and whole is self.shards[0] else whole

    def __getitem__(self, key):
        if len(self.shards) == 1:
            return self.shards[0][key]  # numpy's own indexing, as fast as before sharding
        if isinstance(key, tuple):
            return self._index_rows_then_columns(key)
        if _is_integer(key):
            row = self._check_row(int(key))
            s = int(self._shard_of(row))
            return self.shards[s][row - int(self.bounds[s])]
        if isinstance(key, slice):
            start, stop, step = key.indices(len(self))
            return self._range(start, stop) if step == 1 else self._gather(np.arange(start, stop, step))
        return self._gather(self._integer_rows(key))

    def __setitem__(self, key, rows) -> None:
        if not isinstance(key, slice) or key.step not in (None, 1):
            raise TypeError("A ShardedArray is written by contiguous row ranges: array[lo:hi] = rows.")
        start, stop, _ = key.indices(len(self))
        rows = np.asarray(rows)
        if len(rows) != max(stop - start, 0):
            raise ValueError(f"Cannot write {len(rows)} rows to the {max(stop - start, 0)} rows {start}:{stop}.")
        for shard, lo in zip(self.shards, self.bounds):
            first, last = max(start, lo), min(stop, lo + len(shard))
            if first < last:
                shard[first - lo : last - lo] = rows[first - start : last - start]

    def flush(self) -> None:
        for shard in self.shards:
            if hasattr(shard, "flush"):
                shard.flush()

    def _index_rows_then_columns(self, key: tuple):
        if any(not (_is_integer(k) or isinstance(k, slice)) for k in key[1:]):
            raise IndexError("A ShardedArray takes arrays of rows on its first axis only: index rows, then columns.")
        rows = self[key[0]] if key else self[:]
        return rows[key[1:]] if key and _is_integer(key[0]) else rows[(slice(None), *key[1:])]

    def _check_row(self, row: int) -> int:
        if not -len(self) <= row < len(self):
            raise IndexError(f"index {row} is out of bounds for axis 0 with size {len(self)}")
        return row % len(self)

    def _shard_of(self, rows):
        # side="right": with empty shards (repeated bounds) a row goes to the last shard starting at or before it
        return np.searchsorted(self.bounds, rows, side="right") - 1

    def _range(self, start: int, stop: int) -> np.ndarray:
        if stop <= start:
            return np.empty((0, *self.shape[1:]), dtype=self.dtype)
        parts = [shard[max(start - lo, 0) : min(stop - lo, len(shard))]
                 for shard, lo in zip(self.shards, self.bounds) if lo < stop and start < lo + len(shard)]
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def _integer_rows(self, key) -> np.ndarray:
        rows = np.asarray(key)
        if rows.dtype == bool:
            if rows.shape != (len(self),):
                raise IndexError(f"A boolean index of shape {rows.shape} does not match the {len(self)} rows.")
            return np.flatnonzero(rows)
        if rows.size == 0:
            rows = rows.astype(np.intp)  # numpy takes an empty list as "no rows"
        if not np.issubdtype(rows.dtype, np.integer):
            raise IndexError(f"Cannot index rows with {rows.dtype} values; use ints, slices or integer arrays.")
        if rows.size and (rows.min() < -len(self) or rows.max() >= len(self)):
            bad = rows[(rows < -len(self)) | (rows >= len(self))].reshape(-1)[0]
            raise IndexError(f"index {bad} is out of bounds for axis 0 with size {len(self)}")
        return np.where(rows < 0, rows + len(self), rows)

    def _gather(self, rows: np.ndarray) -> np.ndarray:
        """Rows in any order, repeats allowed: one read per shard touched."""
        flat = rows.reshape(-1)
        out = np.empty((len(flat), *self.shape[1:]), dtype=self.dtype)
        shard_ids = self._shard_of(flat)
        order = np.argsort(shard_ids, kind="stable")
        for group in np.split(order, np.flatnonzero(np.diff(shard_ids[order])) + 1):
            if len(group):
                s = shard_ids[group[0]]
                out[group] = self.shards[s][flat[group] - self.bounds[s]]
        return out.reshape(*rows.shape, *self.shape[1:])


def _is_integer(key) -> bool:
    return isinstance(key, (int, np.integer)) and not isinstance(key, (bool, np.bool_))


# ------------------------------------------------------------------------------------------- vector shards
def parse_shard_size(value) -> int:
    """Bytes of a max_shard_size: an int, or a size such as 10GB, 500MB or 2GiB."""
    try:
        if isinstance(value, bool):
            raise ValueError
        size = parse_memory_size(value)
        if size < 1:
            raise ValueError
    except ValueError:
        raise ValueError(
            f"Cannot read max_shard_size={value!r}; give a positive number of bytes or a size such as 10GB, 500MB "
            "or 2GiB (GB = 10**9 bytes, GiB = 2**30; CLI: --max-shard-size 10GB)."
        ) from None
    return size


def _npy_header_bytes(num_rows: int, hidden_size: int) -> int:
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, {"descr": np.lib.format.dtype_to_descr(np.dtype(np.float16)),
                                                  "fortran_order": False, "shape": (num_rows, hidden_size)})
    return buffer.tell()


def shard_layout(num_rows: int, hidden_size: int, max_shard_bytes: int) -> list[dict]:
    """How `num_rows` float16 vectors are cut into .npy files of at most `max_shard_bytes` (header included): as
    many rows per file as fit, all in vectors.npy when one file holds them, else in vectors-{i:05d}-of-{n:05d}.npy.
    Returns [{"file", "start", "stop"}] (rows start:stop of each file)."""
    header = _npy_header_bytes(num_rows, hidden_size)  # no shard has more rows, so no longer a header
    per_shard = (max_shard_bytes - header) // (2 * hidden_size)
    if per_shard < 1:
        raise ValueError(
            f"max_shard_size={max_shard_bytes} bytes cannot hold one vector ({2 * hidden_size} bytes after a "
            f"{header}-byte .npy header); raise max_shard_size."
        )
    count = max(1, -(-num_rows // per_shard))
    if count == 1:
        return [{"file": VECTORS_FILE, "start": 0, "stop": num_rows}]
    if count > _HUB_FILES_PER_FOLDER:
        logger.warning(f"{count} vector shards: the Hub recommends fewer than {_HUB_FILES_PER_FOLDER} files per "
                       "folder; consider a larger max_shard_size.")
    return [{"file": VECTOR_SHARD_FILE.format(i, count), "start": i * per_shard,
             "stop": min((i + 1) * per_shard, num_rows)} for i in range(count)]


def vector_layout(manifest: IndexManifest) -> list[dict]:
    """The vector shards of an index (format 1 indexes without the record: one vectors.npy)."""
    return manifest.vector_shards or [{"file": VECTORS_FILE, "start": 0, "stop": manifest.num_indexed_tokens}]


def layout_format_version(layout: list[dict]) -> int:
    return _SINGLE_FILE_FORMAT_VERSION if [s["file"] for s in layout] == [VECTORS_FILE] else FORMAT_VERSION


def create_vector_shards(directory: Path, layout: list[dict], hidden_size: int) -> ShardedArray:
    """New, writable, memory-mapped vector shards (filled by `array[lo:hi] = rows`, then `flush()`)."""
    return ShardedArray([np.lib.format.open_memmap(directory / s["file"], mode="w+", dtype=np.float16,
                                                   shape=(s["stop"] - s["start"], hidden_size)) for s in layout])


def open_vector_shards(directory: Path, layout: list[dict], hidden_size: int) -> ShardedArray:
    """The vector shards of an index directory, memory-mapped read-only (never unpickled)."""
    shards = []
    for s in layout:
        mapped = np.load(directory / s["file"], mmap_mode="r", allow_pickle=False)
        _advise_random_access(mapped)
        # np.asarray: a plain ndarray view of the map (no copy); np.memmap's indexing is much slower.
        shard = np.asarray(mapped)
        if shard.dtype != np.float16 or shard.shape != (s["stop"] - s["start"], hidden_size):
            raise NPMIndexError(
                f"{directory / s['file']} holds {shard.dtype} {shard.shape}, the manifest says float16 "
                f"{(s['stop'] - s['start'], hidden_size)}; rebuild the index."
            )
        shards.append(shard)
    return ShardedArray(shards)


def _advise_random_access(mapped: np.memmap) -> None:
    """Searches read scattered rows (8192 per query at k=4096): without this hint, each row not in the page cache
    makes the kernel read its mmap read-around window (~128 KB) from disk instead of one page."""
    handle = getattr(mapped, "_mmap", None)  # the mmap.mmap under an np.memmap (None for an empty file)
    if handle is not None and hasattr(mmap, "MADV_RANDOM"):
        handle.madvise(mmap.MADV_RANDOM)


def _check_layout(path: Path, layout: list[dict], num_rows: int) -> None:
    try:
        stops = [0] + [int(s["stop"]) for s in layout]
        names = [str(s["file"]) for s in layout]
        contiguous = [s["start"] for s in layout] == stops[:-1] and stops[-1] == num_rows and stops == sorted(stops)
    except (TypeError, KeyError, ValueError):
        contiguous, names = False, []
    # plain names: the manifest never points outside the index directory
    plain = all(name == Path(name).name and name.endswith(".npy") for name in names) and len(set(names)) == len(names)
    if not (contiguous and plain):
        raise NPMIndexError(f"The manifest of {path} lists vector shards that do not cover rows 0:{num_rows} in "
                            "order; it is corrupted, rebuild the index.")


class NPMIndex:
    """Token-level index over a reference corpus. Build with [`NPMIndex.build`], open with [`NPMIndex.load`] or
    [`NPMIndex.from_pretrained`]."""

    def __init__(self, path: Path, manifest: IndexManifest, token_arrays: dict, positions, vectors, faiss_index,
                 documents):
        self.path = Path(path)
        self.manifest = manifest
        self.token_ids = token_arrays["token_ids"]
        self.token_flags = token_arrays["token_flags"]
        self.token_docs = token_arrays["token_docs"]
        self.token_offsets = token_arrays["token_offsets"]
        self.block_size = manifest.block_size
        self.positions = positions
        self.vectors = vectors
        self.faiss_index = faiss_index
        self.documents = documents
        import faiss

        self.exact_search = isinstance(faiss.downcast_index(faiss_index), faiss.IndexFlat)
        # an exact index too large to fill into FAISS at load: searched over the memory-mapped vectors
        self.streamed_exact_search = self.exact_search and faiss_index.ntotal == 0 and manifest.num_indexed_tokens > 0
        self._search_names = search_parameter_names(faiss_index)
        self._search_defaults = _current_search_parameters(faiss_index)
        self._search_applied = dict(self._search_defaults)

    def __repr__(self) -> str:
        m = self.manifest
        return (
            f"NPMIndex(path={str(self.path)!r}, documents={m.num_documents}, tokens={m.num_tokens}, "
            f"indexed={m.num_indexed_tokens}, dim={m.hidden_size}, factory={m.faiss_factory!r})"
        )

    @property
    def num_tokens(self) -> int:
        return self.manifest.num_tokens

    @property
    def num_indexed(self) -> int:
        return self.manifest.num_indexed_tokens

    # ----------------------------------------------------------------------------------------------- building
    @classmethod
    def build(cls, model, tokenizer, corpus, output_dir, args: IndexBuildArguments | None = None) -> "NPMIndex":
        """Encode `corpus` with `model` and write an index to `output_dir` (atomically). Returns the loaded index.

        Under `torchrun` / `accelerate launch` every process encodes its share; `args.resume` continues an
        interrupted build. See `index_build`."""
        args = args or IndexBuildArguments()
        limit = getattr(model.config, "max_input_length", None)
        if limit is not None and args.block_size > limit:
            raise ValueError(
                f"block_size={args.block_size} is longer than the encoder accepts ({limit} tokens); "
                f"use block_size <= {limit} (CLI: --block-size {limit})."
            )
        from .index_build import build_index_directory

        build_index_directory(model, tokenizer, corpus, Path(output_dir), args)
        return cls.load(output_dir, verify="none")  # just written and hashed

    # ------------------------------------------------------------------------------------------------ loading
    @classmethod
    def load(cls, path, verify: str = "fast") -> "NPMIndex":
        """Open an index directory. `verify`: "fast" checks every file's size and the checksums of files up to
        64 MiB, "full" hashes every file, "none" only checks sizes."""
        path = Path(path)
        if verify not in ("none", "fast", "full"):
            raise ValueError(f"verify={verify!r}; use 'none', 'fast' or 'full'.")
        manifest_path = path / MANIFEST_FILE
        if not manifest_path.is_file():
            hint = " It looks like an interrupted build; build it again." if path.name.startswith(".") else ""
            raise NPMIndexError(
                f"No NPM index at {path} (missing {MANIFEST_FILE}).{hint} Build one with "
                "`npm-hf build-index --model DIR --corpus FILE` or `npm_hf.build_index(...)`."
            )
        try:
            manifest = IndexManifest.from_dict(json.loads(manifest_path.read_text()))
        except (json.JSONDecodeError, TypeError) as error:
            raise NPMIndexError(f"{manifest_path} is corrupted ({error}); rebuild the index.") from None
        if manifest.format_version > FORMAT_VERSION:
            raise NPMIndexError(
                f"{path} uses index format {manifest.format_version}, newer than this npm_hf supports "
                f"({FORMAT_VERSION}); upgrade npm_hf."
            )
        _verify_files(path, manifest, verify)
        try:
            # np.asarray: plain ndarray views of the maps (no copy); np.memmap's indexing is much slower.
            token_arrays = {name: np.asarray(np.load(path / file, mmap_mode="r", allow_pickle=False))
                            for name, file in TOKEN_FILES.items()}
            positions = np.asarray(np.load(path / POSITIONS_FILE, mmap_mode="r", allow_pickle=False))
            vectors = open_vector_shards(path, vector_layout(manifest), manifest.hidden_size)
            offsets = np.load(path / DOCUMENT_OFFSETS_FILE, allow_pickle=False)
            faiss_index = read_faiss_index(path / FAISS_FILE)
        except NPMIndexError:
            raise
        except (ValueError, OSError, RuntimeError) as error:
            raise NPMIndexError(f"Index files in {path} are corrupted ({error}); rebuild the index.") from None
        # Flat indexes are stored empty (see build): filled from the vectors here up to FLAT_FILL_MAX_VECTORS,
        # searched by streaming over the memory-mapped vectors above (`search`).
        streamed = _is_flat(faiss_index) and faiss_index.ntotal == 0 and len(vectors) > FLAT_FILL_MAX_VECTORS
        if _is_flat(faiss_index) and faiss_index.ntotal == 0 and faiss_index.d == vectors.shape[1] and not streamed:
            _add_vectors(faiss_index, vectors)
        faiss_rows = len(vectors) if streamed else faiss_index.ntotal
        expected = {
            **{name: (array.shape[:1], (manifest.num_tokens,)) for name, array in token_arrays.items()},
            "positions": (positions.shape, (manifest.num_indexed_tokens,)),
            "vectors": (vectors.shape, (manifest.num_indexed_tokens, manifest.hidden_size)),
            "faiss": ((faiss_rows, faiss_index.d), (manifest.num_indexed_tokens, manifest.hidden_size)),
            "documents": ((len(offsets) - 1,), (manifest.num_documents,)),
        }
        for name, (got, want) in expected.items():
            if tuple(got) != tuple(want):
                raise NPMIndexError(f"{path}: {name} has shape {tuple(got)}, the manifest says {tuple(want)}; rebuild.")
        if not manifest.paragraph_blocks:
            logger.warning(
                f"The index at {path} was built by an npm_hf before 0.2: its blocks are cut from one running token "
                "stream and it indexes mid-word pieces too, unlike the official NPM datastore, so its answers differ "
                "from the reference's. It is answered as before; rebuild it for the faithful index: `npm-hf "
                "build-index --model MODEL --corpus CORPUS --output DIR --overwrite`.")
        return cls(path, manifest, token_arrays, positions, vectors, faiss_index,
                   DocumentStore(path / DOCUMENTS_FILE, offsets))

    @classmethod
    def from_pretrained(cls, name_or_path, subfolder: str = "index", verify: str = "fast", **hub_kwargs) -> "NPMIndex":
        """Open the index of a model directory or Hub repo (`<name_or_path>/<subfolder>`).

        `hub_kwargs` (`revision`, `cache_dir`, `token`, `local_files_only`) go to `huggingface_hub.snapshot_download`.
        """
        local = Path(name_or_path) / subfolder
        if Path(name_or_path).is_dir():
            return cls.load(local, verify=verify)
        from huggingface_hub import snapshot_download

        # "*" also matches "/": every file under the subfolder, whatever the number of vector shards
        snapshot = snapshot_download(str(name_or_path), allow_patterns=[f"{subfolder}/*"], **hub_kwargs)
        return cls.load(Path(snapshot) / subfolder, verify=verify)

    @classmethod
    def for_model(cls, model, verify: str = "fast", **hub_kwargs) -> "NPMIndex":
        """The index that belongs to `model`: in its directory, in its Hub repo at the very commit its weights came
        from, or in the dataset repo and commit its config names (`index_repo_id`, `index_revision`)."""
        config = model.config
        if config.index_repo_id:
            return cls.from_pretrained(config.index_repo_id, subfolder=config.index_subfolder, verify=verify,
                                       repo_type="dataset", revision=config.index_revision, **hub_kwargs)
        commit = getattr(config, "_commit_hash", None)
        if commit and not Path(model.name_or_path).is_dir():
            hub_kwargs.setdefault("revision", commit)
        return cls.from_pretrained(model.name_or_path, subfolder=config.index_subfolder, verify=verify, **hub_kwargs)

    # ---------------------------------------------------------------------------------------------- editing
    def add_documents(self, model, tokenizer, documents, batch_size: int = 16,
                      show_progress_bar: bool = False) -> "NPMIndex":
        """Encode `documents` (any corpus form `build` takes) with `model` into new blocks after the existing ones
        and add them to this index, on disk and in this object, without re-encoding the rest. The model and
        tokenizer must be the ones the index was built with; ids must be new. Atomic: see `index_editing`."""
        from .index_editing import add_documents

        add_documents(self, model, tokenizer, documents, batch_size=batch_size, show_progress_bar=show_progress_bar)
        return self._reload()

    def delete_documents(self, doc_ids) -> "NPMIndex":
        """Remove the documents with these ids: their tokens leave the search and their text leaves
        documents.jsonl, on disk and in this object. An unknown id raises NPMIndexError and changes nothing."""
        from .index_editing import delete_documents

        delete_documents(self, doc_ids)
        return self._reload()

    def _reload(self) -> "NPMIndex":
        self.__dict__.update(type(self).load(self.path, verify="none").__dict__)  # just written and hashed
        return self

    def check_compatible(self, model, tokenizer=None) -> None:
        """Raise IndexMismatchError unless this index was built with `model`'s weights (and `tokenizer`)."""
        if encoder_fingerprint(model) != self.manifest.encoder_fingerprint:
            raise IndexMismatchError(
                f"The index at {self.path} was built with different encoder weights "
                f"({self.manifest.encoder_name_or_path!r}) than the model in use ({model.name_or_path!r}). Its "
                "vectors would not match the queries: rebuild the index with this model (`npm-hf build-index`). "
                "Loading the same weights in another dtype (fp16) can also cause this."
            )
        if tokenizer is not None and tokenizer_fingerprint(tokenizer) != self.manifest.tokenizer_fingerprint:
            raise IndexMismatchError(
                f"The index at {self.path} was built with a different tokenizer than the one in use; its token ids "
                "would be decoded wrongly. Use the model's own tokenizer or rebuild the index."
            )

    # ---------------------------------------------------------------------------------------------- searching
    def search(self, queries: np.ndarray, k: int, nprobe: int | None = None,
               ef_search: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Top-k vector rows per query by inner product, re-scored exactly from the stored float16 vectors
        (a flat index's own scores are exact already: it holds those vectors in float32).

        `nprobe` (IVF indexes: inverted lists visited) and `ef_search` (HNSW: candidate list size) trade speed for
        recall of approximate indexes, for this call only; None keeps FAISS's default.

        Returns `(scores, rows)` of shape (num_queries, min(k, num_indexed)), best first. Rows FAISS could not
        fill (approximate indexes) are -1 with score -inf.
        """
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if self.exact_search:  # a flat index holds the stored vectors themselves: its scores are already exact
            self.check_search_parameters(nprobe, ef_search)
            if self.streamed_exact_search:
                return streamed_exact_search(self.vectors, queries, min(int(k), self.num_indexed))
            return self.faiss_index.search(queries, min(int(k), self.num_indexed))
        return self.rescore(queries, self.candidate_rows(queries, k, nprobe=nprobe, ef_search=ef_search))

    def rescore(self, queries: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Exact inner products of each query with its candidate rows (from the stored float16 vectors), best first;
        rows of -1 (no candidate) score -inf."""
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        found = rows >= 0
        vectors = self.vectors_for_rows(np.where(found, rows, 0).reshape(-1)).reshape(*rows.shape, -1)
        scores = np.einsum("qkd,qd->qk", vectors, queries)
        scores[~found] = -np.inf
        order = np.argsort(-scores, axis=1, kind="stable")
        return np.take_along_axis(scores, order, axis=1), np.take_along_axis(rows, order, axis=1)

    def candidate_rows(self, queries: np.ndarray, k: int, nprobe: int | None = None,
                       ef_search: int | None = None) -> np.ndarray:
        """FAISS's top-k vector rows per query (approximate for compressed indexes; -1 where none was found)."""
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        self._configure_search(nprobe, ef_search)
        _, rows = self.faiss_index.search(queries, min(int(k), self.num_indexed))
        return rows

    def check_search_parameters(self, nprobe: int | None = None, ef_search: int | None = None) -> None:
        """Raise ValueError unless `nprobe` / `ef_search` (None: not set) apply to this index and are in range."""
        factory = self.manifest.faiss_factory
        if nprobe is not None:
            _check_positive("nprobe", nprobe)
            if "nprobe" not in self._search_names:
                raise ValueError(
                    f"nprobe applies to IVF indexes, and the index at {self.path} is {factory!r}, which has no "
                    "inverted lists. Drop nprobe (CLI: --nprobe), or build an IVF index (e.g. 'IVF1024,SQ8')."
                )
            nlist = _extract_ivf(self.faiss_index).nlist
            if nprobe > nlist:
                raise ValueError(
                    f"nprobe={nprobe} is more than the {nlist} IVF lists (nlist) of the index at {self.path} "
                    f"({factory!r}); use 1 <= nprobe <= {nlist} (nprobe={nlist} searches every list)."
                )
        if ef_search is not None:
            _check_positive("ef_search", ef_search)
            if "ef_search" not in self._search_names:
                raise ValueError(
                    f"efSearch applies to HNSW indexes (e.g. 'HNSW32', or an IVF with an HNSW quantizer such as "
                    f"'IVF4096_HNSW32,SQ8'), and the index at {self.path} is {factory!r}. Drop ef_search "
                    "(CLI: --ef-search)."
                )

    def _configure_search(self, nprobe: int | None, ef_search: int | None) -> None:
        """Set FAISS's search parameters for the next search: the given values, else FAISS's defaults."""
        import faiss

        self.check_search_parameters(nprobe, ef_search)
        given = {"nprobe": nprobe, "ef_search": ef_search}
        for name, default in self._search_defaults.items():
            value = int(default if given[name] is None else given[name])
            if self._search_applied[name] != value:
                faiss.ParameterSpace().set_index_parameter(self.faiss_index, self._search_names[name], value)
                self._search_applied[name] = value

    def vectors_for_rows(self, rows: np.ndarray) -> np.ndarray:
        return np.asarray(self.vectors[np.asarray(rows)], dtype=np.float32)

    def rows_for_positions(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Vector rows of corpus positions, and whether each position is indexed at all."""
        rows = np.searchsorted(self.positions, positions)
        rows = np.minimum(rows, self.num_indexed - 1)
        return rows, self.positions[rows] == positions

    def block_of(self, positions: np.ndarray) -> np.ndarray:
        return positions // self.block_size

    def block_range(self, block: int) -> tuple[int, int]:
        return block * self.block_size, min((block + 1) * self.block_size, self.num_tokens)

    def evidence(self, start: int, end: int) -> dict:
        """Where the tokens [start, end] (inclusive corpus positions) come from: their document and the text of the
        block around them, with `text[start:end]` being the phrase itself."""
        doc_index = int(self.token_docs[start])
        document = self.documents[doc_index]
        lo, hi = self.block_range(int(start) // self.block_size)
        same_doc = (self.token_docs[lo:hi] == doc_index) & ((self.token_flags[lo:hi] & SPECIAL) == 0)
        window = self.token_offsets[lo:hi][same_doc]
        context_start, context_end = int(window[:, 0].min()), int(window[:, 1].max())
        char_start, char_end = int(self.token_offsets[start, 0]), int(self.token_offsets[end, 1])
        return {
            "doc_id": document["id"],
            "title": document["title"],
            "start": char_start - context_start,
            "end": char_end - context_start,
            "text": document["text"][context_start:context_end],
        }

    def surface_text(self, start: int, end: int) -> str:
        """The corpus text of tokens [start, end] (inclusive positions), as written in the document."""
        document = self.documents[int(self.token_docs[start])]
        return document["text"][int(self.token_offsets[start, 0]) : int(self.token_offsets[end, 1])]

    def search_many(self, queries: np.ndarray, k: int, nprobe: int | None = None,
                    ef_search: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """`search` for a batch of queries (e.g. all of a batched pipeline call's). On a flat index, from 16 queries
        on, FAISS scores them with one matrix product per block of stored vectors rather than one pass over all
        vectors per query (each pass reads every vector from memory: 3-4 times slower at k=4096 on 2 cores). The
        scores can differ from `search`'s in the last float bits (another summation order)."""
        if not self.exact_search or len(queries) < _BLAS_MIN_QUERIES:
            return self.search(queries, k, nprobe=nprobe, ef_search=ef_search)
        import faiss

        names = ("distance_compute_blas_threshold", "distance_compute_blas_query_bs",
                 "distance_compute_blas_database_bs")
        saved = [getattr(faiss.cvar, name) for name in names]
        # FAISS-wide settings, for this call only: BLAS from 1 query; blocks of up to 512 queries by
        # _BLAS_DATABASE_BLOCK vectors (fewer, larger products than FAISS's 4096 x 1024: better on few cores; FAISS
        # allocates a whole block's scores, 64 MiB at most here)
        wanted = (1, min(len(queries), 512), _BLAS_DATABASE_BLOCK)
        try:
            for name, value in zip(names, wanted):
                setattr(faiss.cvar, name, value)
            return self.search(queries, k, nprobe=nprobe, ef_search=ef_search)
        finally:
            for name, value in zip(names, saved):
                setattr(faiss.cvar, name, value)


# --------------------------------------------------------------------------------------------- build stages
def _write_corpus(staging: Path, corpus, tokenizer, args: IndexBuildArguments) -> CorpusStats:
    """Tokenize every document; write documents.jsonl, its offsets and the per-token arrays. Token records stream
    to raw files as documents are tokenized (memory stays flat whatever the corpus size) and become .npy files at
    the end, byte for byte what `np.save` writes."""
    from tqdm.auto import tqdm

    stats = CorpusStats()
    offsets = [0]
    raw = {name: staging / f".{file}.raw" for name, file in TOKEN_FILES.items()}
    with open(staging / DOCUMENTS_FILE, "wb") as handle, contextlib.ExitStack() as stack:
        columns = {name: stack.enter_context(open(path, "wb")) for name, path in raw.items()}
        documents = tqdm(iter_documents(corpus), desc="Tokenizing corpus", unit="doc",
                         disable=not args.show_progress_bar)
        for document, records in tokenize_documents(documents, tokenizer, stats, block_size=args.block_size):
            columns["token_ids"].write(records["id"].tobytes())
            columns["token_flags"].write(records["flags"].tobytes())
            columns["token_docs"].write(np.full(len(records), stats.num_documents - 1, np.int32).tobytes())
            columns["token_offsets"].write(np.stack([records["start"], records["end"]], axis=1).tobytes())
            line = json.dumps({"id": document["id"], "title": document["title"], "text": document["text"]},
                              ensure_ascii=False).encode("utf-8") + b"\n"
            handle.write(line)
            offsets.append(offsets[-1] + len(line))
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


def indexed_token_mask(ids, flags, boundaries_only: bool = True, stopwords: np.ndarray | None = None) -> np.ndarray:
    """Which corpus tokens get a vector: never special ones; with `boundaries_only` only word starts and word ends
    (the official datastore, method §2); never an id whose entry in the boolean table `stopwords` is set."""
    ids, flags = np.asarray(ids), np.asarray(flags)
    keep = (flags & SPECIAL) == 0
    if boundaries_only:
        keep &= (flags & (WORD_START | WORD_END)) != 0
    if stopwords is not None:
        keep &= ~stopwords[ids]
    return keep


def index_rule(manifest_or_args, tokenizer) -> dict:
    """`indexed_token_mask` keyword arguments for an index manifest or IndexBuildArguments."""
    if isinstance(manifest_or_args, IndexBuildArguments):
        boundaries, stopwords = not manifest_or_args.index_all_tokens, manifest_or_args.remove_stopwords
    else:
        boundaries, stopwords = manifest_or_args.boundary_tokens_only, manifest_or_args.stopwords_removed
    table = id_table(tokenizer, reference_stopword_ids(tokenizer)) if stopwords else None
    return {"boundaries_only": boundaries, "stopwords": table}


def _write_positions(staging: Path, ids: np.ndarray, flags: np.ndarray, rule: dict, chunk: int = 1 << 22) -> None:
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


def unit_blocks(args: IndexBuildArguments) -> int:
    """Blocks per work unit: `blocks_per_unit` rounded up to whole batches (`index_build.work_units`)."""
    return -(-args.blocks_per_unit // args.batch_size) * args.batch_size


def encoding_plan(flags, args: IndexBuildArguments) -> list[list[tuple[np.ndarray, int]]]:
    """The forward passes that encode a run of tokens starting at a block boundary: per work unit, its blocks sorted
    by length (tokens before their PAD), longest first, in batches of `batch_size`, each batch trimmed to its longest
    block. Returns, per unit, `(block numbers, length)` per forward pass. Packed paragraphs leave blocks of many
    lengths, and a batch of short blocks costs what its longest one does, not `block_size`; every block is encoded
    on its own (attention never crosses blocks), so the order changes no vector."""
    flags, size = np.asarray(flags), args.block_size
    num_blocks = -(-len(flags) // size)
    real = np.zeros(num_blocks * size, dtype=bool)
    real[: len(flags)] = (flags & PAD) == 0
    real = real.reshape(num_blocks, size)
    lengths = np.where(real.any(axis=1), size - np.argmax(real[:, ::-1], axis=1), 0)
    plan, per_unit = [], unit_blocks(args)
    for lo in range(0, num_blocks, per_unit):
        blocks = np.arange(lo, min(lo + per_unit, num_blocks))
        blocks = blocks[lengths[blocks] > 0]
        order = blocks[np.argsort(-lengths[blocks], kind="stable")]
        plan.append([(order[b : b + args.batch_size], int(lengths[order[b]]))
                     for b in range(0, len(order), args.batch_size)])
    return plan


def padded_blocks(ids, flags, block_size: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """`(input ids, attention mask)` of shape (blocks, block_size), both int64: the tokens of a run starting at a block
    boundary, PAD tokens (and the rest of a last partial block) replaced by `pad_id` and not attended to."""
    ids, flags = np.asarray(ids), np.asarray(flags)
    num_blocks = -(-len(ids) // block_size)
    blocks = np.full(num_blocks * block_size, pad_id, dtype=np.int64)
    attend = np.zeros(num_blocks * block_size, dtype=np.int64)
    attend[: len(ids)] = (flags & PAD) == 0
    blocks[: len(ids)] = np.where(attend[: len(ids)] == 1, ids, pad_id)
    return blocks.reshape(num_blocks, block_size), attend.reshape(num_blocks, block_size)


def encode_into(vectors: np.ndarray, row: int, model, ids, flags, keep, args: IndexBuildArguments) -> int:
    """Encode the tokens `ids` (a run starting at a block boundary) block by block (`encoding_plan`) and write the
    float16 hidden states of the tokens where `keep` is set to `vectors[row:]`, in corpus order. PAD tokens are not
    attended to. Returns the row after the last one."""
    from tqdm.auto import tqdm

    ids, flags, keep = np.asarray(ids), np.asarray(flags), np.asarray(keep, dtype=bool)
    size = args.block_size
    blocks, attend = padded_blocks(ids, flags, size, _pad_token_id(model))
    chosen = np.zeros(blocks.size, dtype=bool)
    chosen[: len(ids)] = keep
    chosen = chosen.reshape(blocks.shape)
    device = model.device
    was_training = model.training
    model.eval()
    done = 0
    with torch.inference_mode(), tqdm(total=len(ids), desc="Encoding corpus", unit="tok",
                                      disable=not args.show_progress_bar) as progress:
        for unit in encoding_plan(flags, args):
            states = {}
            for members, length in unit:
                hidden = model(input_ids=torch.from_numpy(blocks[members, :length]).to(device),
                               attention_mask=torch.from_numpy(attend[members, :length]).to(device),
                               ).last_hidden_state
                for j, block in enumerate(members.tolist()):
                    states[block] = hidden[j][torch.from_numpy(chosen[block, :length]).to(device)]
            for block in sorted(states):  # back in corpus order
                state = states[block].to(torch.float16).cpu().numpy()
                vectors[row : row + len(state)] = state
                row += len(state)
            if states:
                reached = min((max(states) + 1) * size, len(ids))
                progress.update(reached - done)
                done = reached
    model.train(was_training)
    return row


def _pad_token_id(model) -> int:
    encoder_config = getattr(model.config, "encoder", model.config)
    pad = getattr(encoder_config, "pad_token_id", None)
    return 0 if pad is None else int(pad)


def _is_flat(index) -> bool:
    import faiss

    return isinstance(faiss.downcast_index(index), faiss.IndexFlat)


def _add_vectors(index, vectors: np.ndarray, start: int = 0) -> None:
    """Add `vectors[start:]` (float16, memory-mapped) to a FAISS index, a float32 chunk at a time."""
    for lo in range(start, len(vectors), _FAISS_ADD_CHUNK):
        index.add(np.asarray(vectors[lo : lo + _FAISS_ADD_CHUNK], dtype=np.float32))


# FAISS file types of flat indexes ("IxFI" inner product, "IxF2" L2, "IxFl" older): stored empty by a build and
# filled at load, so they are read plainly (an index whose codes are memory-mapped cannot grow).
_FLAT_FOURCCS = (b"IxFI", b"IxF2", b"IxFl")


def read_faiss_index(path: Path, mapped: bool = True):
    """Read index.faiss with its codes and inverted lists memory-mapped from the files, not copied into RAM: a
    10^7-vector IVF index opens in milliseconds and only the lists a search visits are paged in. An IVF index merged
    on disk (see `index_build`) maps the index.ivfdata beside it, read-only, wherever the directory has moved.
    `mapped=False` reads the codes of other indexes into memory, where they can grow (edits)."""
    import faiss

    on_disk = _read_on_disk_ivf(Path(path))
    if on_disk is not None:
        return on_disk
    with open(path, "rb") as handle:
        fourcc = handle.read(4)
    flags = 0 if fourcc in _FLAT_FOURCCS or not mapped else faiss.IO_FLAG_MMAP_IFC | faiss.IO_FLAG_READ_ONLY
    return faiss.read_index(str(path), flags)


def streamed_exact_search(vectors, queries: np.ndarray, k: int,
                          chunk_rows: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k inner products of `queries` with all `vectors` (float16 rows, e.g. memory-mapped shards),
    chunk by chunk with a running top-k, as FAISS's IndexFlatIP would return them (best first) without a float32
    copy of the vectors in memory."""
    chunk_rows = chunk_rows or _STREAM_CHUNK_ROWS
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    best_scores = np.full((len(queries), 0), -np.inf, dtype=np.float32)
    best_rows = np.zeros((len(queries), 0), dtype=np.int64)
    for lo in range(0, len(vectors), chunk_rows):
        chunk = np.asarray(vectors[lo : lo + chunk_rows], dtype=np.float32)
        scores = np.concatenate([best_scores, queries @ chunk.T], axis=1)
        rows = np.concatenate([best_rows, np.broadcast_to(np.arange(lo, lo + len(chunk)), (len(queries), len(chunk)))],
                              axis=1)
        if scores.shape[1] > k:
            keep = np.argpartition(-scores, k - 1, axis=1)[:, :k]
            scores, rows = np.take_along_axis(scores, keep, axis=1), np.take_along_axis(rows, keep, axis=1)
        best_scores, best_rows = scores, rows
    order = np.lexsort((best_rows, -best_scores), axis=1)  # best first; ties by row, as FAISS
    return np.take_along_axis(best_scores, order, axis=1), np.take_along_axis(best_rows, order, axis=1)


def _read_on_disk_ivf(path: Path):
    """The IVF index at `path` with its lists mapped from the index.ivfdata beside it; None for other indexes."""
    import faiss

    ivfdata = path.parent / IVFDATA_FILE
    if not ivfdata.is_file():
        return None
    # Not IO_FLAG_ONDISK_SAME_DIR: it does the same, but prints to stdout (e.g. into `fill-mask --json`).
    index = faiss.read_index(str(path), faiss.IO_FLAG_SKIP_IVF_DATA)
    ivf = _extract_ivf(index)
    lists = None if ivf is None else faiss.downcast_InvertedLists(ivf.invlists)
    if not isinstance(lists, faiss.OnDiskInvertedLists):
        return None
    lists.filename = str(ivfdata)
    lists.read_only = True
    lists.do_mmap()
    return index


def _new_faiss_index(hidden_size: int, factory: str):
    import faiss

    try:
        return faiss.index_factory(hidden_size, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as error:
        raise ValueError(f"Invalid FAISS factory string {factory!r}: {error}") from None


def _publish(staging: Path, output_dir: Path, manifest: IndexManifest, known_files: dict | None = None) -> None:
    """Record every staged file's size and sha256 in the manifest (reusing `known_files` entries for files copied
    unchanged), write the manifest last, and move the finished directory into place."""
    known_files = known_files or {}
    manifest.files = {
        name: known_files.get(name) or {"bytes": (staging / name).stat().st_size, "sha256": _sha256(staging / name)}
        for name in sorted(os.listdir(staging))
    }
    (staging / MANIFEST_FILE).write_text(manifest.to_json())
    _move_into_place(staging, output_dir)


def _move_into_place(staging: Path, output_dir: Path) -> None:
    """Rename the finished build into place; an existing index is swapped out only after the new one is complete."""
    retired = None
    if output_dir.exists():
        retired = output_dir.parent / f".{output_dir.name}.old-{uuid.uuid4().hex[:12]}"
        os.replace(output_dir, retired)
    os.replace(staging, output_dir)
    if retired is not None:
        shutil.rmtree(retired, ignore_errors=True)


def _verify_files(path: Path, manifest: IndexManifest, verify: str) -> None:
    layout = vector_layout(manifest)
    _check_layout(path, layout, manifest.num_indexed_tokens)
    for name, expected in manifest.files.items():
        if name == MANIFEST_FILE:
            continue
        file = path / name
        if not file.is_file():
            raise NPMIndexError(f"{path} is incomplete: {name} is missing; rebuild the index.")
        size = file.stat().st_size
        if size != expected["bytes"]:
            raise NPMIndexError(
                f"{file} is {size} bytes, the manifest says {expected['bytes']} (truncated or modified); rebuild."
            )
        if verify == "full" or (verify == "fast" and size <= _FAST_VERIFY_MAX_BYTES):
            if _sha256(file) != expected["sha256"]:
                raise NPMIndexError(f"{file} is corrupted (checksum mismatch); rebuild the index.")
    required = {*TOKEN_FILES.values(), *(s["file"] for s in layout), FAISS_FILE, POSITIONS_FILE, DOCUMENTS_FILE}
    missing = required - set(manifest.files)
    if missing:
        raise NPMIndexError(f"The manifest of {path} lists no {sorted(missing)}; rebuild the index.")


def _versions() -> dict:
    import faiss
    import transformers

    from .version import __version__

    return {"npm_hf": __version__, "transformers": transformers.__version__, "torch": torch.__version__,
            "faiss": faiss.__version__, "numpy": np.__version__}


# ------------------------------------------------------------------------------------------- FAISS choices
_MEMORY_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
                 "t": 10**12, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_memory_size(text) -> int:
    """Bytes of a size such as 2GB, 1.5GiB, 512MB or 1000000 (GB = 10**9 bytes, GiB = 2**30)."""
    import re

    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    unit = match.group(2).lower() if match else None
    if unit not in _MEMORY_UNITS or float(match.group(1)) <= 0:
        raise ValueError(f"Cannot read the memory size {text!r}; write a positive number with an optional unit, "
                         "e.g. 2GB, 512MiB or 1000000 (bytes).")
    return int(float(match.group(1)) * _MEMORY_UNITS[unit])


# ------------------------------------------------------------------------------------------- build memory
# float32 bytes per dimension of each training vector at the peak of FAISS training: the float16 gather (2), its
# float32 copy (4), and the residuals IVF codecs train on (4).
_TRAIN_BYTES_PER_DIM = 10


def process_resident_bytes() -> int | None:
    """Resident memory of this process now (Linux /proc; None elsewhere)."""
    try:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def _format_bytes(size: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(size) < 1000:
            return f"{size:.0f}{unit}" if unit == "B" else f"{size:.1f}{unit}"
        size /= 1000
    return f"{size:.1f}TB"


def encoding_peak_bytes(config, batch_size: int, block_size: int) -> int:
    """Activations of one inference forward pass of a BERT-like encoder over `batch_size` blocks (float32): the
    largest layer's hidden states, attention scores and feed-forward, plus the kept last hidden state."""
    config = getattr(config, "encoder", config)
    hidden = config.hidden_size
    intermediate = getattr(config, "intermediate_size", None) or 4 * hidden
    heads = getattr(config, "num_attention_heads", None) or max(1, hidden // 64)
    return 4 * batch_size * block_size * (8 * hidden + 2 * intermediate + 3 * heads * block_size)


def faiss_memory_bytes(index, num_vectors: int) -> int:
    """RAM a FAISS index over `num_vectors` vectors takes while a build fills and writes it. A flat index is
    stored empty: it costs its float32 copy when the build's reload fills it (up to FLAT_FILL_MAX_VECTORS)."""
    d = index.d
    if _is_flat(index):
        return 4 * d * num_vectors if num_vectors <= FLAT_FILL_MAX_VECTORS else 0
    ivf = _extract_ivf(index)
    if ivf is not None:
        return num_vectors * (ivf.code_size + 8) + faiss_memory_bytes(ivf.quantizer, ivf.nlist)
    core = _core_index(index)
    if hasattr(core, "hnsw"):
        storage = _core_index(core.storage)
        links = 4 * core.hnsw.nb_neighbors(0) * 1.1 + 16  # level-0 links, upper levels (~1/M of the nodes), offsets
        return int(num_vectors * (getattr(storage, "code_size", 4 * d) + links))
    return num_vectors * getattr(core, "code_size", 4 * d)


@dataclass
class BuildMemoryPlan:
    """The resident memory a build needs, stage by stage, against its budget (`IndexBuildArguments.max_memory`)."""

    budget: int
    baseline: int  # the process before encoding: interpreter, libraries, the model's weights
    encoding: int  # activations of one batch
    metadata: int  # document offsets (the token arrays and positions are memory-mapped)
    num_vectors: int
    hidden_size: int

    @classmethod
    def measure(cls, model, args: IndexBuildArguments, num_vectors: int, num_documents: int):
        """The plan of a build of `num_vectors` vectors, or None without a budget. Raises ValueError when the
        budget cannot hold encoding at all."""
        if args.max_memory is None:
            return None
        weights = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
        plan = cls(budget=parse_memory_size(args.max_memory), baseline=process_resident_bytes() or weights,
                   encoding=encoding_peak_bytes(model.config, args.batch_size, args.block_size),
                   metadata=48 * num_documents, num_vectors=num_vectors, hidden_size=model.config.hidden_size)
        if plan.available() < 0:
            fixed = plan.baseline + plan.encoding + plan.metadata
            raise ValueError(
                f"max_memory={args.max_memory} is less than encoding alone needs: {_format_bytes(plan.baseline)} "
                f"already resident (interpreter, libraries, the model's {_format_bytes(weights)} of weights) + "
                f"{_format_bytes(plan.encoding)} of activations for batch_size={args.batch_size} blocks of "
                f"{args.block_size} tokens + {_format_bytes(plan.metadata)} of document offsets. Raise "
                f"max_memory (CLI: --max-memory) to at least {_format_bytes(fixed)}, more for FAISS, or lower "
                "batch_size (--batch-size)."
            )
        return plan

    def available(self) -> int:
        """Bytes left for FAISS (training sample, or index plus one add chunk) after the fixed costs."""
        return self.budget - self.baseline - self.encoding - self.metadata

    def add_chunk(self) -> int:
        return min(self.num_vectors, _FAISS_ADD_CHUNK) * self.hidden_size * 6  # float16 rows + float32 copy

    def faiss_budget(self) -> int:
        """What faiss_factory='auto' may spend on the index, keeping room for one add chunk."""
        return max(self.available() - self.add_chunk(), 1)

    def fit(self, index, factory: str, args: IndexBuildArguments) -> IndexBuildArguments:
        """`args` with train_sample_size capped to what the budget holds (with a warning); ValueError when
        `index` itself cannot fit, naming a factory that would."""
        needed = faiss_memory_bytes(index, self.num_vectors) + self.add_chunk()
        if needed > self.available():
            try:
                hint = (f"'{suggest_faiss_factory(self.num_vectors, self.hidden_size, self.faiss_budget())}' fits "
                        "(or pass faiss_factory='auto', CLI: --faiss-factory auto)")
            except ValueError:
                hint = "no FAISS index fits"
            raise ValueError(
                f"The FAISS index {factory!r} over {self.num_vectors} vectors needs about {_format_bytes(needed)} of "
                f"RAM, but max_memory={_format_bytes(self.budget)} leaves {_format_bytes(self.available())} after "
                f"the process ({_format_bytes(self.baseline)}), encoding ({_format_bytes(self.encoding)}) and "
                f"document offsets ({_format_bytes(self.metadata)}): {hint}. Raise max_memory (CLI: --max-memory) "
                "or choose a smaller index."
            )
        if index.is_trained:
            return args
        fitting = max(self.available() // (_TRAIN_BYTES_PER_DIM * self.hidden_size), 1)
        if fitting >= min(args.train_sample_size, self.num_vectors):
            return args
        logger.warning(f"Training FAISS on {fitting} sampled vectors instead of train_sample_size="
                       f"{args.train_sample_size}: more would not fit max_memory={_format_bytes(self.budget)}.")
        return dataclasses.replace(args, train_sample_size=int(fitting))


def _ivf_lists(num_vectors: int) -> int:
    """A power of two near 4·sqrt(n) (FAISS's guideline is 4-16·sqrt(n)), with >= 39 training points per list."""
    wanted = 4 * num_vectors**0.5
    nlist = 1 << max(0, round(np.log2(wanted)))
    while nlist > 1 and nlist * _POINTS_PER_CENTROID > num_vectors:
        nlist //= 2
    return nlist


def suggest_faiss_factory(num_vectors: int, hidden_size: int, memory_budget_bytes: int | None = None) -> str:
    """A FAISS factory string for `num_vectors` token vectors of `hidden_size` dimensions.

    Exact `Flat` (4·d bytes per vector in RAM) up to a million vectors when it fits the budget; above, an IVF index
    with about 4·sqrt(n) lists and 1-byte scalar quantization (`IVF{n},SQ8`, d bytes per vector), or, when that
    does not fit `memory_budget_bytes`, product quantization with the largest code that does (`IVF{n},PQ{m}np`, m
    bytes). Approximate candidates are re-scored exactly from the stored vectors, memory-mapped and not counted.
    """
    if num_vectors < 1 or hidden_size < 1:
        raise ValueError(f"Need num_vectors >= 1 and hidden_size >= 1, got {num_vectors} and {hidden_size}.")
    flat_bytes = 4 * hidden_size * num_vectors
    fits = lambda size: memory_budget_bytes is None or size <= memory_budget_bytes  # noqa: E731
    if num_vectors <= _FLAT_MAX_VECTORS and fits(flat_bytes):
        return "Flat"
    nlist = _ivf_lists(num_vectors)
    codes = [(hidden_size, "SQ8")] if nlist >= 2 else []
    if num_vectors >= 256 * _POINTS_PER_CENTROID:  # enough to train 256 PQ centroids well
        # "np": no polysemous training, which only serves Hamming pre-filtering (candidates are re-scored exactly
        # here instead) and takes minutes.
        codes += [(m, f"PQ{m}np") for m in (64, 48, 32, 24, 16, 8) if hidden_size % m == 0 and m < hidden_size]
    for code_bytes, codec in codes:
        if fits(num_vectors * (code_bytes + 8) + 4 * hidden_size * nlist):  # + 8-byte ids, + the centroids
            return f"IVF{nlist},{codec}"
    if not codes and fits(flat_bytes):
        return "Flat"  # too few vectors to train any quantizer
    raise ValueError(
        f"No FAISS index over {num_vectors} vectors of dimension {hidden_size} fits {memory_budget_bytes} bytes "
        f"(exact search needs {flat_bytes}); raise the budget (--max-memory)."
    )


def _core_index(index):
    """The index under pre-transforms (OPQ, PCA) and id maps, downcast to its concrete type."""
    import faiss

    index = faiss.downcast_index(index)
    while isinstance(index, (faiss.IndexPreTransform, faiss.IndexIDMap)):
        index = faiss.downcast_index(index.index)
    return index


def _extract_ivf(index):
    import faiss

    try:
        return faiss.downcast_index(faiss.extract_index_ivf(index))
    except RuntimeError:  # not an IVF index
        return None


def faiss_training_minimum(index) -> tuple[int, int, str]:
    """(fewest training vectors FAISS accepts, fewest it trains well on, what needs them) for an untrained index;
    (0, 0, "") when it needs no training."""
    import faiss

    if index.is_trained:
        return 0, 0, ""
    needs = []  # (clusters, what)
    top = faiss.downcast_index(index)
    if isinstance(top, faiss.IndexPreTransform):
        for j in range(top.chain.size()):
            if isinstance(faiss.downcast_VectorTransform(top.chain.at(j)), faiss.OPQMatrix):
                needs.append((256, "OPQ rotation: 256 centroids per sub-quantizer"))
    core = _extract_ivf(index) or _core_index(index)
    if hasattr(core, "nlist"):
        needs.append((core.nlist, f"IVF{core.nlist}: one k-means centroid per list"))
    storage = faiss.downcast_index(core.storage) if hasattr(core, "storage") else core  # HNSW over PQ codes
    pq = getattr(storage, "pq", None)
    if pq is not None:
        needs.append((1 << pq.nbits, f"PQ{pq.M}x{pq.nbits}: {1 << pq.nbits} centroids per sub-quantizer"))
    if not needs:
        return 1, 1, "training"
    clusters, what = max(needs)
    return clusters, clusters * _POINTS_PER_CENTROID, what


def check_training_size(index, factory: str, num_vectors: int, train_sample_size: int) -> None:
    """Raise NPMIndexError before any training when FAISS could not train `index` on the vectors available."""
    minimum, recommended, what = faiss_training_minimum(index)
    available = min(num_vectors, train_sample_size)
    if available >= recommended:
        return
    limit = f" (train_sample_size={train_sample_size})" if train_sample_size < num_vectors else ""
    if available >= minimum:
        logger.warning(f"Training FAISS {factory!r} on {available} vectors{limit}; {what} trains well from "
                       f"{recommended} vectors on (FAISS warns below). Results may be poor: consider fewer lists.")
        return
    hint = f"'IVF{_ivf_lists(num_vectors)},SQ8'" if num_vectors >= 2 * _POINTS_PER_CENTROID else "nothing but Flat"
    raise NPMIndexError(
        f"The FAISS factory {factory!r} needs at least {minimum} training vectors ({what}), but only {available} "
        f"are available{limit} ({num_vectors} indexed tokens). Use fewer IVF lists or a smaller PQ (this corpus "
        f"fits {hint}), 'Flat' (exact search, best for small corpora), or faiss_factory='auto' "
        "(CLI: --faiss-factory auto)."
    )


# -------------------------------------------------------------------------------------- search parameters
def search_parameter_names(index) -> dict:
    """Which FAISS ParameterSpace names `nprobe` and `ef_search` map to for `index` (absent: not applicable)."""
    names = {}
    ivf = _extract_ivf(index)
    if ivf is not None:
        names["nprobe"] = "nprobe"
        if hasattr(_core_index(ivf.quantizer), "hnsw"):
            names["ef_search"] = "quantizer_efSearch"
    elif hasattr(_core_index(index), "hnsw"):
        names["ef_search"] = "efSearch"
    return names


def _current_search_parameters(index) -> dict:
    """FAISS's own values of the tunable search parameters of `index` (restored when a call sets none)."""
    values = {}
    ivf = _extract_ivf(index)
    names = search_parameter_names(index)
    if "nprobe" in names:
        values["nprobe"] = ivf.nprobe
    if names.get("ef_search") == "quantizer_efSearch":
        values["ef_search"] = _core_index(ivf.quantizer).hnsw.efSearch
    elif "ef_search" in names:
        values["ef_search"] = _core_index(index).hnsw.efSearch
    return values


def _check_positive(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}.")
