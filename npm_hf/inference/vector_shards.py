"""Vectors of an index in row shards (`ShardedArray`), how they are cut into files, and sizes such as "10GB"."""

import io
import mmap
import re
from pathlib import Path

import numpy as np
from transformers.utils import logging

from .index_files import (SHARDED_FORMAT_VERSION, SINGLE_FILE_FORMAT_VERSION, VECTOR_SHARD_FILE, VECTORS_FILE, IndexManifest,
                          NPMIndexError)


logger = logging.get_logger(__name__)

DEFAULT_MAX_SHARD_SIZE = "10GB"  # the Hub takes up to 50 GB per file and recommends under 20 GB
_HUB_FILES_PER_FOLDER = 10_000  # the Hub's recommendation
_MEMORY_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
                 "t": 10**12, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


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


def parse_memory_size(text) -> int:
    """Bytes of a size such as 2GB, 1.5GiB, 512MB or 1000000 (GB = 10**9 bytes, GiB = 2**30)."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    unit = match.group(2).lower() if match else None
    if unit not in _MEMORY_UNITS or float(match.group(1)) <= 0:
        raise ValueError(f"Cannot read the memory size {text!r}; write a positive number with an optional unit, "
                         "e.g. 2GB, 512MiB or 1000000 (bytes).")
    return int(float(match.group(1)) * _MEMORY_UNITS[unit])



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
    return SINGLE_FILE_FORMAT_VERSION if [s["file"] for s in layout] == [VECTORS_FILE] else SHARDED_FORMAT_VERSION


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


def check_layout(path: Path, layout: list[dict], num_rows: int) -> None:
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
