"""Load-time checks of an index directory that a crafted (or damaged) one must not get past: file names in the
manifest, sizes a FAISS file declares, and the ranges of the arrays every query indexes with. Each raises
NPMIndexError naming the file and the fix; all run before anything large is read or allocated."""

import struct
from pathlib import Path

import numpy as np

from .index_files import NPMIndexError


# Rows checked at a time: the temporaries of a range check stay at a few MiB whatever the index size.
_CHECK_CHUNK_ROWS = 1 << 22
# FAISS file types of flat indexes (inner product, L2, older), stored empty by a build and filled at load.
FLAT_FOURCCS = (b"IxFI", b"IxF2", b"IxFl")
# IVF file types whose header (an index header, nlist, nprobe) is followed by the coarse quantizer.
_IVF_FOURCCS = (b"IwFl", b"IwFL", b"IwSq", b"IwSQ", b"IwPQ", b"IwP2", b"IwP3", b"IwHE")
# FAISS's index header: fourcc, d (int32), ntotal (int64), two unused int64, is_trained (bool), metric (int32),
# then a float metric argument for metrics above L2 (1).
_HEADER = struct.Struct("<4siqqq?i")


def is_plain_file_name(name) -> bool:
    """A file name directly inside the index: no folder, no '..', not absolute (on any system)."""
    return (isinstance(name, str) and name not in ("", ".", "..") and not any(c in name for c in "/\\:\0"))


def check_file_names(path: Path, files: dict) -> None:
    """Refuse a manifest whose `files` name anything but plain file names inside the index directory: a crafted one
    (`../../x`, `/etc/passwd`) would have files elsewhere hashed and their sizes disclosed."""
    bad = [name for name in files if not is_plain_file_name(name)]
    if bad:
        raise NPMIndexError(
            f"The manifest of {path} lists files {bad[:5]} that are not plain file names inside the index (a path, "
            "'..' or an absolute name): it was crafted or damaged. Rebuild the index."
        )


def check_faiss_file(path: Path, hidden_size: int) -> None:
    """Check the sizes `path` (an index.faiss) declares against the file's own size before FAISS reads it, which
    allocates whatever a header claims (a 45-byte file claiming 2^31 codes takes 8 GiB).

    A flat index is stored empty by every build (filled from the vectors when loaded), so only its header is
    accepted: no vectors, no codes, nothing after. For IVF indexes the header and a flat coarse quantizer are
    checked (its centroids must fit the file); the rest is mapped, not copied, by `read_faiss_index`."""
    size = path.stat().st_size
    with open(path, "rb") as handle:
        head = handle.read(_HEADER.size + 4 + 16)
    if len(head) < _HEADER.size:
        raise NPMIndexError(f"{path} is {size} bytes, too short for a FAISS index; rebuild the index.")
    fourcc, d, ntotal, *_ = _HEADER.unpack_from(head)
    if d != hidden_size:
        raise NPMIndexError(f"{path} declares vectors of dimension {d}, the manifest {hidden_size}; rebuild the index.")
    if fourcc in FLAT_FOURCCS:
        end = _flat_end(head, 0, path, size)
        if ntotal != 0 or end != size:
            raise NPMIndexError(
                f"{path} is a flat FAISS index that claims {ntotal} vectors in {size} bytes; npm_hf stores flat "
                "indexes empty (their vectors are vectors.npy), so it was crafted or damaged. Rebuild the index."
            )
    elif fourcc in _IVF_FOURCCS:
        if ntotal < 0:
            raise NPMIndexError(f"{path} claims {ntotal} vectors; rebuild the index.")
        offset = _header_end(head, 0)
        with open(path, "rb") as handle:
            handle.seek(offset)
            nlist, _ = struct.unpack("<qq", handle.read(16))
            quantizer = handle.read(_HEADER.size + 4 + 8)
        if not 0 < nlist <= size:  # every list takes bytes in the file (or its ivfdata, checked by FAISS's map)
            raise NPMIndexError(f"{path} claims {nlist} inverted lists in {size} bytes; rebuild the index.")
        if quantizer[:4] in FLAT_FOURCCS:
            q_fourcc, q_d, q_ntotal, *_ = _HEADER.unpack_from(quantizer)
            floats = _flat_floats(quantizer)
            if q_d != d or q_ntotal != nlist or floats != nlist * d or offset + 16 + 4 * floats > size:
                raise NPMIndexError(
                    f"{path}: its coarse quantizer claims {q_ntotal} centroids ({floats} floats) for {nlist} lists of "
                    f"dimension {d} in a {size}-byte file; it was crafted or damaged. Rebuild the index."
                )


def _header_end(buffer: bytes, offset: int) -> int:
    metric = _HEADER.unpack_from(buffer, offset)[-1]
    return offset + _HEADER.size + (4 if metric > 1 else 0)


def _flat_floats(buffer: bytes) -> int:
    end = _header_end(buffer, 0)
    return struct.unpack_from("<Q", buffer, end)[0] if len(buffer) >= end + 8 else -1


def _flat_end(buffer: bytes, offset: int, path: Path, size: int) -> int:
    """Where a flat index that starts at `offset` ends, from its declared code count (not read)."""
    end = _header_end(buffer, offset)
    if len(buffer) < end + 8:
        raise NPMIndexError(f"{path} is {size} bytes, too short for a FAISS flat index; rebuild the index.")
    floats = struct.unpack_from("<Q", buffer, end)[0]
    return end + 8 + 4 * floats


def check_index_arrays(path: Path, manifest, token_arrays: dict, positions: np.ndarray, offsets: np.ndarray,
                       documents_bytes: int) -> None:
    """Range-check the arrays queries index with, once at load, so that a crafted array is refused here rather than
    raising (or answering from the wrong place) on every query: positions strictly increasing corpus positions,
    document ids of existing documents, character offsets with 0 <= start <= end, document line offsets increasing
    from 0 to the size of documents.jsonl. Vectorised in chunks: about 10 ms per 10^6 tokens (2-core AMD EPYC)."""
    num_tokens, num_documents = manifest.num_tokens, manifest.num_documents
    for name, array in [("positions", positions), ("token_docs", token_arrays["token_docs"]),
                        ("token_offsets", token_arrays["token_offsets"]), ("document_offsets", offsets),
                        ("token_ids", token_arrays["token_ids"])]:
        if not np.issubdtype(array.dtype, np.integer):
            raise NPMIndexError(f"{path}: {name} holds {array.dtype} values, not integers; rebuild the index.")
    _check_range(path, "positions", positions, 0, num_tokens - 1, increasing=True)
    _check_range(path, "token_docs", token_arrays["token_docs"], 0, num_documents - 1)
    _check_range(path, "token_ids", token_arrays["token_ids"], 0, None)
    token_offsets = token_arrays["token_offsets"]
    if token_offsets.ndim != 2 or token_offsets.shape[1:] != (2,):
        raise NPMIndexError(f"{path}: token_offsets has shape {token_offsets.shape}, not (num_tokens, 2); rebuild.")
    for lo in range(0, len(token_offsets), _CHECK_CHUNK_ROWS):
        chunk = np.asarray(token_offsets[lo : lo + _CHECK_CHUNK_ROWS])
        bad = np.flatnonzero((chunk[:, 0] < 0) | (chunk[:, 0] > chunk[:, 1]))
        if len(bad):
            row = lo + int(bad[0])
            raise NPMIndexError(f"{path}: token_offsets[{row}] = {chunk[bad[0]].tolist()} is not 0 <= start <= end "
                                "(crafted or damaged); rebuild the index.")
    if offsets.ndim != 1 or len(offsets) < 1 or offsets[0] != 0 or offsets[-1] != documents_bytes:
        raise NPMIndexError(
            f"{path}: document_offsets must run from 0 to the size of documents.jsonl ({documents_bytes} bytes), "
            f"got {offsets[:1].tolist()} ... {offsets[-1:].tolist()}; rebuild the index.")
    _check_range(path, "document_offsets", offsets, 0, documents_bytes, increasing=True)


def _check_range(path: Path, name: str, array: np.ndarray, low: int, high: int | None,
                 increasing: bool = False) -> None:
    """Raise NPMIndexError unless low <= array <= high (high None: no bound) and, with `increasing`, each value is
    above the one before; chunk by chunk."""
    previous = None
    for lo in range(0, len(array), _CHECK_CHUNK_ROWS):
        chunk = np.asarray(array[lo : lo + _CHECK_CHUNK_ROWS])
        out = (chunk < low) if high is None else (chunk < low) | (chunk > high)
        if out.any():
            row = lo + int(np.argmax(out))
            bound = f">= {low}" if high is None else f"in [{low}, {high}]"
            raise NPMIndexError(f"{path}: {name}[{row}] = {int(array[row])} is not {bound} (crafted or damaged); "
                                "rebuild the index.")
        if increasing:
            steps = np.diff(chunk) if previous is None else np.diff(chunk, prepend=previous)
            if (steps <= 0).any():
                row = lo + int(np.argmax(steps <= 0)) + (1 if previous is None else 0)
                raise NPMIndexError(f"{path}: {name} is not increasing at row {row} ({int(array[row - 1])} then "
                                    f"{int(array[row])}; crafted or damaged); rebuild the index.")
            if len(chunk):
                previous = chunk[-1]
