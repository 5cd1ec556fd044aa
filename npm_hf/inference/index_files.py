"""The files of an NPM index directory: their names, the manifest, and fingerprints of encoder and tokenizer.

Layout of an index directory (`<model>/index` by default); every file loads without pickle:

    manifest.json          IndexManifest: counts, dims, fingerprints of encoder and tokenizer, file checksums
    token_ids.npy          token id of every corpus token (blocks are consecutive runs of block_size tokens: packed
                           paragraphs of one document, then PAD tokens, see `npm_hf.corpus`)
    token_flags.npy        WORD_START / WORD_END / SPECIAL / LINE_START / PAD bits per token
    token_docs.npy         document of every token
    token_offsets.npy      (start, end) character offsets of every token in its document's text
    positions.npy          corpus position of every indexed token = row of the vectors: as in the official
                           datastore, word starts and word ends only (not mid-word pieces), and with
                           remove_stopwords no stop-word id (`npm_hf.index.encoding.indexed_token_mask`)
    vectors.npy            (num_indexed, hidden_size) float16 last hidden states, memory-mapped; when they exceed
                           max_shard_size, row shards vectors-00000-of-0000N.npy instead
                           (see `vector_shards.shard_layout`)
    index.faiss            FAISS inner-product index over the rows of the vectors (a flat one is stored empty and
                           filled from the vectors when loaded: the same values, without a float32 copy on disk)
    index.ivfdata          IVF indexes: their inverted lists, merged on disk and memory-mapped when loaded
    encoder_sample.npz     the encoder weight values the fingerprint samples, as float32: a model loaded in another
                           precision (fp16) is recognised by them (`encoder_sample_matches`); absent in older builds
    documents.jsonl        one {"id", "title", "text"} line per document
    document_offsets.npy   byte offset of every line of documents.jsonl, plus the file size

A build writes into a hidden sibling directory (`.{name}.partial`, see `npm_hf.index.build`: resumable, and shared
by the processes of a multi-process build) and renames it into place at the end, so an interrupted build never leaves a
directory that loads.
"""

import dataclasses
import hashlib
import json
import mmap
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from transformers.utils import logging


logger = logging.get_logger(__name__)

# Format 2 stores the vectors in several shards; an index with one vectors.npy is still written as format 1, so
# older npm_hf versions keep reading it (and refuse a sharded one with "upgrade npm_hf" instead of a wrong error).
# Format 3 stores the per-token metadata compactly (`compact_tokens`) and may hold no float16 vectors at all
# (`vector_dtype="none"`: refine codes instead, `vector_codes`); builds write it.
# Format 4 adds append segments and tombstones (`segments`): written by an edit only, so an index without edits
# keeps the version its layout needs. This reader reads formats 1 to 4.
FORMAT_VERSION = 4
SHARDED_FORMAT_VERSION = 2
SINGLE_FILE_FORMAT_VERSION = 1
EDITS_FORMAT_VERSION = 4
MANIFEST_FILE = "manifest.json"
TOKEN_FILES = {"token_ids": "token_ids.npy", "token_flags": "token_flags.npy", "token_docs": "token_docs.npy",
               "token_offsets": "token_offsets.npy"}
POSITIONS_FILE = "positions.npy"
VECTORS_FILE = "vectors.npy"
VECTOR_SHARD_FILE = "vectors-{:05d}-of-{:05d}.npy"
FAISS_FILE = "index.faiss"
IVFDATA_FILE = "index.ivfdata"  # the inverted lists of an IVF index merged on disk (npm_hf.index.build)
DOCUMENTS_FILE = "documents.jsonl"
DOCUMENT_OFFSETS_FILE = "document_offsets.npy"
ENCODER_SAMPLE_FILE = "encoder_sample.npz"  # the weight values the fingerprint samples (absent in older builds)
# Format 3: the per-token files of `compact_tokens` replace TOKEN_FILES' token_docs / token_offsets and positions.npy
COMPACT_MARKER_FILE = "token_doc_runs.npy"


class NPMIndexError(ValueError):
    """An index directory is missing, incomplete, corrupted, or does not belong to the model."""


class IndexMismatchError(NPMIndexError):
    """The index was built with another encoder or tokenizer than the one it is used with."""



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
    # BM25 pre-filters saved with the index (files `prefilter.bm25_files`): None = over blocks, N = N-token windows
    bm25_passages: list = field(default_factory=list)
    # Dense pre-filter passage vectors stored with the index (files `passage_vectors.dense_passage_file`), same keys
    dense_passages: list = field(default_factory=list)
    # Edits kept beside the files they change (format 4, `segments`): {"segments": [...], "tombstones": file, ...}
    edits: dict = field(default_factory=dict)
    # vector_dtype "none" (format 3): the vectors are codes of a FAISS coder (`vector_codes`): {"codec", "code_size",
    # "k_factor", and the quality measured at build time: "top1_agreement", "agreement_measured_on"}
    vector_codes: dict = field(default_factory=dict)

    def to_json(self) -> str:
        """The manifest as written: every field, sealed with `checksum` (a hand-edited manifest no longer loads)."""
        data = dataclasses.asdict(self)
        data[CHECKSUM_KEY] = manifest_checksum(data)
        return json.dumps(data, indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict) -> "IndexManifest":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            logger.warning(f"Ignoring unknown index manifest keys {unknown}; upgrade npm_hf to use them.")
        return cls(**{key: value for key, value in data.items() if key in known})


CHECKSUM_KEY = "checksum"
# Fields whose values must be of these types (JSON numbers that are ints, strings, ...): anything else is corrupt.
_FIELD_TYPES = {"format_version": int, "hidden_size": int, "block_size": int, "num_documents": int,
                "num_skipped_empty_documents": int, "num_tokens": int, "num_indexed_tokens": int, "num_blocks": int,
                "num_deleted_documents": int, "encoder_fingerprint": str, "tokenizer_fingerprint": str,
                "faiss_factory": str, "files": dict, "vector_shards": list, "versions": dict, "bm25_passages": list,
                "dense_passages": list, "edits": dict, "vector_dtype": str, "vector_codes": dict}


def manifest_checksum(data: dict) -> str:
    """sha256 of a manifest's content, every key but the checksum itself, in canonical JSON."""
    content = {key: value for key, value in data.items() if key != CHECKSUM_KEY}
    return "sha256:" + hashlib.sha256(json.dumps(content, sort_keys=True).encode("utf-8")).hexdigest()


def read_manifest(path: Path) -> IndexManifest:
    """Read and check a manifest.json: valid UTF-8 JSON, an object, fields of the right types, the checksum it was
    sealed with (manifests written before checksums existed have none and are accepted)."""
    try:
        data = json.loads(Path(path).read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise NPMIndexError(f"{path} is corrupted (not valid UTF-8 JSON: {error}); rebuild the index.") from None
    if not isinstance(data, dict):
        raise NPMIndexError(f"{path} is corrupted (a JSON {type(data).__name__}, not an object); rebuild the index.")
    if CHECKSUM_KEY in data and data[CHECKSUM_KEY] != manifest_checksum(data):
        raise NPMIndexError(
            f"{path} does not match its checksum: it was modified after the index was written (its counts, block "
            "size or file list would no longer describe the files). Rebuild the index, or restore the manifest."
        )
    for name, kind in _FIELD_TYPES.items():
        value = data.get(name)
        if name in data and (not isinstance(value, kind) or (kind is int and isinstance(value, bool))):
            raise NPMIndexError(f"{path} is corrupted: {name}={value!r} is not a {kind.__name__}; rebuild the index.")
    try:
        return IndexManifest.from_dict({key: value for key, value in data.items() if key != CHECKSUM_KEY})
    except TypeError as error:  # a required field is missing
        raise NPMIndexError(f"{path} is corrupted ({error}); rebuild the index.") from None


def _weight_samples(model):
    """(name, shape, sample) of every tensor of the model's state dict, by name: a strided sample of up to 4096
    values, in the tensor's own dtype, on the CPU."""
    for name, tensor in sorted(model.state_dict().items()):
        flat = tensor.detach().reshape(-1)
        picks = torch.linspace(0, max(flat.numel() - 1, 0), min(flat.numel(), 4096)).long()
        yield name, tuple(tensor.shape), flat[picks.to(flat.device)].cpu()


def encoder_fingerprint(model) -> str:
    """Identify encoder weights: names, shapes and a strided sample of every tensor, rounded to bfloat16 so that
    fp32 and bf16 copies of the same weights agree (fp16 copies do not always: see `encoder_sample_matches`)."""
    digest = hashlib.sha256()
    for name, shape, sample in _weight_samples(model):
        digest.update(f"{name}:{shape}:".encode())
        digest.update(sample.to(torch.float32).to(torch.bfloat16).view(torch.int16).numpy().tobytes())
    return digest.hexdigest()


def write_encoder_sample(index_dir: Path, model) -> None:
    """Save the values `encoder_fingerprint` samples, as float32 (exact for fp32, fp16 and bf16 weights), to
    `ENCODER_SAMPLE_FILE`: what lets a model loaded in another precision than the one the index was built with be
    recognised (`encoder_sample_matches`)."""
    samples = list(_weight_samples(model))
    tmp = Path(index_dir) / f".{ENCODER_SAMPLE_FILE}.tmp"
    with open(tmp, "wb") as handle:  # np.savez on a path would append ".npz" to the temporary name
        np.savez(handle, layout=np.array(json.dumps([[name, list(shape)] for name, shape, _ in samples])),
                 values=torch.cat([sample.to(torch.float32) for *_, sample in samples]).numpy())
    tmp.replace(Path(index_dir) / ENCODER_SAMPLE_FILE)


def encoder_sample_matches(model, sample_file: Path) -> bool:
    """Whether `model` holds the weights sampled in `sample_file` (`write_encoder_sample`), in any precision:
    tensor by tensor, the stored and current values agree once both are rounded to float16, or both to bfloat16.
    A cast of the same weights to either precision (or back to float32) agrees in one of the two; other weights
    (other training, another checkpoint, an edited tensor) do not, as with `encoder_fingerprint`."""
    with np.load(sample_file, allow_pickle=False) as stored:
        layout, values = json.loads(str(stored["layout"][()])), torch.from_numpy(stored["values"])
    samples = list(_weight_samples(model))
    if [[name, list(shape)] for name, shape, _ in samples] != layout:
        return False
    offset = 0
    for *_, sample in samples:
        saved, offset = values[offset : offset + len(sample)], offset + len(sample)
        if not any(torch.equal(saved.to(precision), sample.to(precision))
                   for precision in (torch.float16, torch.bfloat16)):
            return False
    return offset == len(values)


def tokenizer_fingerprint(tokenizer) -> str:
    """Identify a tokenizer by its full backend definition (vocabulary, normaliser, pre-tokenizer, specials)."""
    definition = json.loads(tokenizer.backend_tokenizer.to_str())
    for transient in ("truncation", "padding"):  # runtime settings, changed by calls with truncation=True
        definition.pop(transient, None)
    return hashlib.sha256(json.dumps(definition, sort_keys=True).encode()).hexdigest()


def sha256_file(path: Path) -> str:
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
        self._lock = threading.Lock()  # threads share one store: two evicting the same entry raised KeyError

    def __len__(self) -> int:
        return len(self._offsets) - 1

    def __getitem__(self, i: int) -> dict:
        i = int(i)
        with self._lock:
            document = self._cache.get(i)
            if document is None:
                if len(self._cache) >= self._CACHE_SIZE:
                    self._cache.pop(next(iter(self._cache)))
                document = self._cache[i] = json.loads(self._map[int(self._offsets[i]) : int(self._offsets[i + 1])])
        return document
