"""Indexes without float16 vectors (`IndexBuildArguments(vectors="none")`, manifest `vector_dtype="none"`): each
indexed token's vector is kept only as a code of a FAISS coder, the refine stage of the factory
(`IVF1024,PQ16np,Refine(SQ8)`: SQ8 codes, d bytes per token), and decoded wherever rows are read.

    index.faiss                 the first stage (the factory without its Refine(...)): finds candidates
    vector_codec.faiss          the trained coder (no vectors): `sa_decode` turns codes back into vectors
    vector_codes.npy            (num_indexed, code_size) uint8 codes, memory-mapped; row shards
                                vector_codes-00000-of-0000N.npy when they exceed max_shard_size

`CodedVectors` reads like the float16 vectors of other indexes (`index.vectors[rows]`, `len`, `shape`): searches
re-score the first stage's candidates (`k_factor` times k of them) from the decoded codes, and every other path
(spans, evidence, the dense pre-filter, edits) reads decoded rows. Scores are then approximate: how often the top-1
agrees with exact search is measured at build time and recorded in the manifest (`vector_codes`).
"""

import re
from pathlib import Path

import faiss
import numpy as np


CODEC_FILE = "vector_codec.faiss"
CODES_FILE = "vector_codes.npy"
CODES_SHARD_FILE = "vector_codes-{:05d}-of-{:05d}.npy"
NO_VECTORS = "none"  # manifest.vector_dtype of an index without float16 vectors
VECTOR_CHOICES = ("float16", NO_VECTORS)
_REFINE = re.compile(r"^(?P<base>.+?),\s*Refine\((?P<codec>.+)\)$")
_DECODE_ROWS = 1 << 16  # rows decoded at a time


def split_refine(factory: str) -> tuple[str, str | None]:
    """A factory string's first stage and its refine coder: "IVF1024,PQ16np,Refine(SQ8)" -> ("IVF1024,PQ16np",
    "SQ8"); a factory without Refine(...) -> (factory, None)."""
    match = _REFINE.match(factory.strip())
    return (match["base"], match["codec"]) if match else (factory.strip(), None)


class CodedVectors:
    """Codes (rows of uint8, e.g. a memory-mapped ShardedArray) read as the float32 vectors they decode to:
    `vectors[key]` takes what indexing the codes takes (an int, a slice, row arrays) and returns decoded rows."""

    def __init__(self, codes, codec):
        self.codes = codes
        self.codec = codec
        self.shape = (len(codes), codec.d)
        self.dtype = np.dtype(np.float32)

    def __len__(self) -> int:
        return self.shape[0]

    @property
    def ndim(self) -> int:
        return 2

    def __repr__(self) -> str:
        return f"CodedVectors(shape={self.shape}, code_size={self.codec.sa_code_size()})"

    def __array__(self, dtype=None, copy=None):
        return np.asarray(self[:], dtype=dtype)

    def __getitem__(self, key):
        codes = np.asarray(self.codes[key])
        flat = codes.reshape(-1, codes.shape[-1])
        out = np.empty((len(flat), self.codec.d), dtype=np.float32)
        for lo in range(0, len(flat), _DECODE_ROWS):
            out[lo : lo + _DECODE_ROWS] = self.codec.sa_decode(np.ascontiguousarray(flat[lo : lo + _DECODE_ROWS]))
        return out.reshape(*codes.shape[:-1], self.codec.d)


def read_codec(path: Path):
    """The trained coder of an index without vectors (never unpickled: FAISS's own format)."""
    return faiss.read_index(str(path))


def encode_rows(codec, vectors: np.ndarray) -> np.ndarray:
    """The codes of float vectors (any float dtype), as uint8 rows of `codec.sa_code_size()` bytes."""
    return codec.sa_encode(np.ascontiguousarray(vectors, dtype=np.float32))
