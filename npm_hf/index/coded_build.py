"""The build stages of an index without float16 vectors (`IndexBuildArguments(vectors="none")`, see
`npm_hf.inference.vector_codes`): the factory split into first stage and refine coder, the codes written from the
float16 vectors the build encoded (kept in its state directory, never published), and the top-1 agreement with exact
search measured while those vectors still exist."""

from pathlib import Path

import faiss
import numpy as np
from transformers.utils import logging

from ..inference.faiss_io import FAISS_ADD_CHUNK, extract_ivf, read_faiss_index, streamed_exact_search
from ..inference.index_files import FAISS_FILE
from ..inference.vector_codes import (CODEC_FILE, CODES_FILE, CODES_SHARD_FILE, CodedVectors, encode_rows,
                                      split_refine)
from ..inference.vector_shards import create_vector_shards, open_vector_shards, parse_shard_size, shard_layout
from .faiss_build import ivf_lists, new_faiss_index, write_index_atomically


logger = logging.get_logger(__name__)

AGREEMENT_QUERIES = 64  # stored vectors used as queries for the agreement the manifest and the card report
AGREEMENT_K = 4096  # NPMDecodingConfig's default k
DEFAULT_K_FACTOR = 1  # candidates of the first stage per result (IndexRefine's k_factor)


def suggest_refined_factory(num_vectors: int, hidden_size: int) -> str:
    """faiss_factory='auto' with vectors='none': IVF (≈4·sqrt(n) lists) over 16-byte PQ codes to find candidates,
    refined by 1-byte scalar quantization (d bytes per token): of the kinds measured in docs/compact_index.md the
    one closest to exact search (smaller codes lose top-1 agreement); tiny corpora: PQ codes without IVF."""
    nlist = ivf_lists(num_vectors)
    m = next((m for m in (16, 8, 4, 2, 1) if hidden_size % m == 0), 1)
    pq = f"PQ{m}np" if num_vectors >= 256 * 39 else f"PQ{m}x4np" if num_vectors >= 16 * 39 else None
    if pq is None:
        return "SQ8,Refine(SQ8)" if num_vectors >= 2 else "SQ8"
    return f"IVF{nlist},{pq},Refine(SQ8)" if nlist >= 2 else f"{pq},Refine(SQ8)"


def stage_factories(factory: str) -> tuple[str, str]:
    """(first stage, coder) of a vectors='none' factory; without a refine stage, the first stage codes itself."""
    base, codec = split_refine(factory)
    return base, codec or base


def default_nprobe(faiss_index) -> int | None:
    """The nprobe an index without vectors is stored with (FAISS's default of 1 list misses most top-1s): a quarter
    of the lists (P3: 256 of 1024 reach 0.99 top-1 agreement)."""
    ivf = extract_ivf(faiss_index)
    return None if ivf is None else max(1, ivf.nlist // 4)


def write_codes(index_dir: Path, vectors, codec_factory: str, hidden_size: int, train_sample_size: int, seed: int,
                max_shard_size) -> dict:
    """Train the coder on a seeded sample of `vectors` (float16, the build's), write it and the codes of every
    row into `index_dir`; returns {"layout", "facts"} (the code shards and the manifest's `vector_codes`)."""
    codec = new_faiss_index(hidden_size, codec_factory)
    if not codec.is_trained:
        rng = np.random.default_rng(seed)
        sample = np.sort(rng.choice(len(vectors), size=min(len(vectors), train_sample_size), replace=False))
        codec.train(np.asarray(vectors[sample], dtype=np.float32))
    code_size = codec.sa_code_size()
    layout = shard_layout(len(vectors), code_size, parse_shard_size(max_shard_size), dtype=np.uint8,
                          names=(CODES_FILE, CODES_SHARD_FILE))
    codes = create_vector_shards(index_dir, layout, code_size, dtype=np.uint8)
    for lo in range(0, len(vectors), FAISS_ADD_CHUNK):
        chunk = np.asarray(vectors[lo : lo + FAISS_ADD_CHUNK], dtype=np.float32)
        codes[lo : lo + len(chunk)] = encode_rows(codec, chunk)
    codes.flush()
    del codes
    write_index_atomically(codec, index_dir / CODEC_FILE)
    return {"layout": layout, "facts": {"codec": codec_factory, "code_size": int(code_size),
                                        "k_factor": DEFAULT_K_FACTOR}}


def coded_agreement(index_dir: Path, vectors, layout: list[dict], facts: dict, seed: int = 0) -> dict:
    """Top-1 agreement of the coded search (first stage, then re-scoring from the codes) with exact search over the
    float16 `vectors`, on AGREEMENT_QUERIES stored vectors as queries (ties with the exact best score count), as
    `npm_hf.index.quality.top1_agreement` measures indexes with vectors."""
    from_codes = CodedVectors(open_vector_shards(index_dir, layout, facts["code_size"], dtype=np.uint8),
                              faiss.read_index(str(index_dir / CODEC_FILE)))
    base = read_faiss_index(index_dir / FAISS_FILE)
    rows = np.sort(np.random.default_rng(seed).choice(len(vectors), size=min(AGREEMENT_QUERIES, len(vectors)),
                                                      replace=False))
    queries = np.asarray(vectors[rows], dtype=np.float32)
    best, _ = streamed_exact_search(vectors, queries, 1)
    k = min(AGREEMENT_K * facts["k_factor"], len(vectors))
    _, candidates = base.search(queries, k)
    found = candidates >= 0
    decoded = from_codes[np.where(found, candidates, 0)]
    scores = np.where(found, np.einsum("qkd,qd->qk", decoded, queries), -np.inf)
    top = candidates[np.arange(len(queries)), scores.argmax(axis=1)]
    exact_of_top = np.einsum("qd,qd->q", np.asarray(vectors[top], dtype=np.float32), queries)
    agree = exact_of_top >= best[:, 0] - 1e-5 * np.maximum(np.abs(best[:, 0]), 1.0)
    nprobe = default_nprobe(base)
    return {"top1_agreement": round(float(agree.mean()), 3),
            "agreement_measured_on": f"{len(queries)} stored vectors as queries, k={AGREEMENT_K}"
                                     + (f", nprobe={nprobe}" if nprobe else "") + ", against the float16 vectors"}



def copy_codes(index, staging: Path, rows: np.ndarray, extra_rows: int, max_shard_bytes: int):
    """An edit of an index without vectors: new code shards in `staging` holding the codes of `rows`, then
    `extra_rows` rows to fill, cut by the index's shard rule and its coder written beside them; returned as
    (writable codes, CodedVectors over them, layout)."""
    codec = index.vectors.codec
    code_size = codec.sa_code_size()
    layout = shard_layout(len(rows) + extra_rows, code_size, max_shard_bytes, dtype=np.uint8,
                          names=(CODES_FILE, CODES_SHARD_FILE))
    codes = create_vector_shards(staging, layout, code_size, dtype=np.uint8)
    for lo in range(0, len(rows), FAISS_ADD_CHUNK):
        chunk = rows[lo : lo + FAISS_ADD_CHUNK]
        codes[lo : lo + len(chunk)] = index.vectors.codes[chunk]
    write_index_atomically(codec, staging / CODEC_FILE)
    return codes, CodedVectors(codes, codec), layout


def append_codes(codes, codec, start: int, vectors) -> None:
    """Write the codes of float `vectors` (new documents' rows) into `codes` from row `start`."""
    for lo in range(0, len(vectors), FAISS_ADD_CHUNK):
        chunk = np.asarray(vectors[lo : lo + FAISS_ADD_CHUNK], dtype=np.float32)
        codes[start + lo : start + lo + len(chunk)] = encode_rows(codec, chunk)
