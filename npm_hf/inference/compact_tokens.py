"""Index format 3's per-token metadata: the same arrays as formats 1 and 2 (`TOKEN_FILES`, `POSITIONS_FILE`) in
about 6 bytes per corpus token instead of 25 (plus 8 per indexed token), decoded exactly when the index is loaded.

    token_ids.npy        uint16 when every id is below 65,536 (int32 otherwise)
    token_flags.npy      uint8, as before
    token_doc_runs.npy   (runs, 2) int64: the first position of each run of tokens of one document, and the document
                         (a block holds one document's paragraphs, so a run spans whole blocks)
    block_offsets.npy    int64 per block: the smallest character offset of the block's non-special tokens
    token_starts.npy     start offset - the block's offset (uint16 when it fits, else uint32); 0 for special tokens
    token_lengths.npy    end - start (uint8 when it fits, else uint16 / uint32); 0 for special tokens
    indexed_tokens.npy   1 bit per corpus token (`np.packbits`): whether it has a vector row; row r of the vectors
                         is the r-th set bit, so positions are implied

Special tokens (CLS, SEP, PAD, deleted text) always have offsets (0, 0): `write_compact_tokens` checks it, so the
round trip is exact. The reader decodes everything into memory at load (ids as int32, documents and offsets as
int32, positions as int64: ~21 bytes per token of RAM, against memory-mapped columns in formats 1 and 2).
"""

from pathlib import Path

import numpy as np

from .index_files import COMPACT_MARKER_FILE, POSITIONS_FILE, TOKEN_FILES
from .tokens import SPECIAL


COMPACT_TOKENS_FORMAT_VERSION = 3
COMPACT_TOKEN_FILES = {"token_ids": "token_ids.npy", "token_flags": "token_flags.npy",
                       "doc_runs": COMPACT_MARKER_FILE, "block_offsets": "block_offsets.npy",
                       "starts": "token_starts.npy", "lengths": "token_lengths.npy",
                       "indexed": "indexed_tokens.npy"}
_CHUNK_BLOCKS = 4096  # blocks converted at a time (bounded memory)


def compact_tokens_present(directory: Path) -> bool:
    """Whether `directory` holds format 3's token files (rather than formats 1 and 2's)."""
    return (Path(directory) / COMPACT_TOKEN_FILES["doc_runs"]).is_file()


def token_file_names(compact: bool) -> set[str]:
    """The names of the per-token files of a format-3 (`compact`) or a format 1/2 index."""
    return set(COMPACT_TOKEN_FILES.values()) if compact else {*TOKEN_FILES.values(), POSITIONS_FILE}


def _smallest_unsigned(maximum: int, choices=(np.uint8, np.uint16, np.uint32)) -> np.dtype:
    for dtype in choices:
        if maximum <= np.iinfo(dtype).max:
            return np.dtype(dtype)
    raise ValueError(f"{maximum} does not fit 32 bits")


def _save(path: Path, array: np.ndarray) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as handle:
        np.save(handle, np.ascontiguousarray(array))
    tmp.replace(path)


def write_compact_tokens(directory: Path, token_ids, token_flags, token_docs, token_offsets, positions,
                         block_size: int) -> None:
    """Write the format-3 token files of these arrays (memory-mapped or not) into `directory`, block chunk by
    block chunk. Raises ValueError for a special token with non-zero offsets (the corpus never writes one)."""
    directory = Path(directory)
    num_tokens = len(token_flags)
    num_blocks = -(-num_tokens // block_size)
    step = _CHUNK_BLOCKS * block_size
    bases = np.zeros(num_blocks, dtype=np.int64)
    max_id = max_start = max_length = 0
    for lo in range(0, num_tokens, step):  # first pass: the blocks' offsets and the widths the columns need
        flags = np.asarray(token_flags[lo : lo + step])
        offsets = np.asarray(token_offsets[lo : lo + step], dtype=np.int64)
        special = (flags & SPECIAL) != 0
        if (offsets[special] != 0).any():
            row = lo + int(np.flatnonzero(special & (offsets != 0).any(axis=1))[0])
            raise ValueError(f"token {row} is special but has character offsets {offsets[row - lo].tolist()}")
        block = (np.arange(lo, lo + len(flags)) // block_size) - lo // block_size
        starts = np.where(special, np.iinfo(np.int64).max, offsets[:, 0])
        chunk_bases = np.full(block.max() + 1 if len(block) else 0, np.iinfo(np.int64).max, dtype=np.int64)
        np.minimum.at(chunk_bases, block, starts)
        chunk_bases[chunk_bases == np.iinfo(np.int64).max] = 0
        bases[lo // block_size : lo // block_size + len(chunk_bases)] = chunk_bases
        relative = np.where(special, 0, offsets[:, 0] - chunk_bases[block])
        ids = np.asarray(token_ids[lo : lo + step])
        max_id = max(max_id, int(ids.max()) if len(ids) else 0)
        max_start = max(max_start, int(relative.max()) if len(relative) else 0)
        max_length = max(max_length, int((offsets[:, 1] - offsets[:, 0]).max()) if len(offsets) else 0)
    id_dtype = np.dtype(np.uint16) if max_id <= np.iinfo(np.uint16).max else np.dtype(np.int32)
    start_dtype = _smallest_unsigned(max_start, (np.uint16, np.uint32))
    length_dtype = _smallest_unsigned(max_length)
    names = COMPACT_TOKEN_FILES
    tmp = {name: directory / f".{file}.tmp" for name, file in names.items()}
    columns = {
        "token_ids": np.lib.format.open_memmap(tmp["token_ids"], "w+", id_dtype, (num_tokens,)),
        "starts": np.lib.format.open_memmap(tmp["starts"], "w+", start_dtype, (num_tokens,)),
        "lengths": np.lib.format.open_memmap(tmp["lengths"], "w+", length_dtype, (num_tokens,)),
    }
    runs = []  # (first position, document)
    for lo in range(0, num_tokens, step):  # second pass: the columns
        hi = min(lo + step, num_tokens)
        flags = np.asarray(token_flags[lo:hi])
        offsets = np.asarray(token_offsets[lo:hi], dtype=np.int64)
        special = (flags & SPECIAL) != 0
        base = bases[np.arange(lo, hi) // block_size]
        columns["token_ids"][lo:hi] = np.asarray(token_ids[lo:hi])
        columns["starts"][lo:hi] = np.where(special, 0, offsets[:, 0] - base)
        columns["lengths"][lo:hi] = offsets[:, 1] - offsets[:, 0]
        docs = np.asarray(token_docs[lo:hi], dtype=np.int64)
        change = np.flatnonzero(np.diff(docs)) + 1
        for first in ([0] if not runs or runs[-1][1] != docs[0] else []) + change.tolist():
            runs.append((lo + first, int(docs[first])))
    for column in columns.values():
        column.flush()
    del columns
    bits = np.zeros(num_tokens, dtype=bool)
    bits[np.asarray(positions, dtype=np.int64)] = True
    _save(directory / names["indexed"], np.packbits(bits))
    _save(directory / names["doc_runs"], np.asarray(runs, dtype=np.int64).reshape(-1, 2))
    _save(directory / names["block_offsets"], bases)
    _save(directory / names["token_flags"], np.asarray(token_flags, dtype=np.uint8))
    for name in ("token_ids", "starts", "lengths"):
        tmp[name].replace(directory / names[name])


def read_compact_tokens(directory: Path, block_size: int) -> tuple[dict, np.ndarray]:
    """The token arrays (`TOKEN_FILES` names: ids, flags, docs, offsets) and positions of a format-3 directory,
    decoded. Raises ValueError when the files contradict each other (shapes, runs, bits)."""
    directory = Path(directory)
    load = {name: np.load(directory / file, mmap_mode="r", allow_pickle=False)
            for name, file in COMPACT_TOKEN_FILES.items()}
    flags = np.asarray(load["token_flags"])
    num_tokens = len(flags)
    for name in ("token_ids", "starts", "lengths"):
        if load[name].shape != (num_tokens,) or not np.issubdtype(load[name].dtype, np.integer):
            raise ValueError(f"{COMPACT_TOKEN_FILES[name]} holds {load[name].dtype} {load[name].shape}, not "
                             f"{num_tokens} integers")
    bases = np.asarray(load["block_offsets"], dtype=np.int64)
    if bases.shape != (-(-num_tokens // block_size),):
        raise ValueError(f"block_offsets.npy has {bases.shape} entries for {num_tokens} tokens of blocks of "
                         f"{block_size}")
    runs = np.asarray(load["doc_runs"], dtype=np.int64)
    if runs.ndim != 2 or runs.shape[1] != 2 or (num_tokens and (len(runs) == 0 or runs[0, 0] != 0)) \
            or (np.diff(runs[:, 0]) <= 0).any() or (len(runs) and runs[-1, 0] >= max(num_tokens, 1)):
        raise ValueError("token_doc_runs.npy does not cut the tokens into increasing runs from position 0")
    docs = np.repeat(runs[:, 1], np.diff(np.append(runs[:, 0], num_tokens))).astype(np.int32)
    special = (flags & SPECIAL) != 0
    starts = bases[np.arange(num_tokens) // block_size] + np.asarray(load["starts"], dtype=np.int64)
    starts[special] = 0
    offsets = np.empty((num_tokens, 2), dtype=np.int32)
    offsets[:, 0] = starts
    offsets[:, 1] = starts + np.asarray(load["lengths"], dtype=np.int64)
    offsets[special] = 0
    packed = np.asarray(load["indexed"])
    if packed.shape != (-(-num_tokens // 8),):
        raise ValueError(f"indexed_tokens.npy holds {packed.shape} bytes for {num_tokens} tokens")
    positions = np.flatnonzero(np.unpackbits(packed, count=num_tokens)).astype(np.int64)
    arrays = {"token_ids": np.asarray(load["token_ids"]).astype(np.int32), "token_flags": flags,
              "token_docs": docs, "token_offsets": offsets}
    return arrays, positions


def load_token_arrays(directory: Path, block_size: int) -> tuple[dict, np.ndarray]:
    """The token arrays and positions of an index directory of any format (formats 1 and 2 memory-mapped)."""
    directory = Path(directory)
    if compact_tokens_present(directory):
        return read_compact_tokens(directory, block_size)
    arrays = {name: np.asarray(np.load(directory / file, mmap_mode="r", allow_pickle=False))
              for name, file in TOKEN_FILES.items()}
    return arrays, np.asarray(np.load(directory / POSITIONS_FILE, mmap_mode="r", allow_pickle=False))
