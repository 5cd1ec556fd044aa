"""Synthetic NPM index directories for search-scaling figures (P4): clustered float16 token vectors, consistent
token arrays, documents and manifest, and an `IVF{nlist},SQ8` FAISS index, written with npm_hf's own shard,
manifest and publish helpers so that `NPMIndex.load` opens them like built ones.

Vectors: `nlist` unit-norm centres drawn at random, each vector a random centre plus Gaussian noise (norm ~0.5).
Training k-means over 10^7 vectors on two cores would take hours, so the IVF quantizer is given the generating
centres instead (FAISS then skips k-means) and every vector goes to the list of its own centre; `write` measures
on a sample how often that is the centre with the best inner product (the list FAISS itself would pick) and
records it in the returned stats. The scalar quantizer is trained normally on a sample.

    python benchmarks/synthetic_index.py DIR NUM_VECTORS   # writes DIR (skips it when already complete)
"""

import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from npm_hf.inference.tokens import WORD_END, WORD_START  # noqa: E402
from npm_hf.index.faiss_build import ivf_lists  # noqa: E402
from npm_hf.index.writing import library_versions, publish  # noqa: E402
from npm_hf.inference.index_files import (  # noqa: E402
    DOCUMENT_OFFSETS_FILE, DOCUMENTS_FILE, FAISS_FILE, MANIFEST_FILE, POSITIONS_FILE, TOKEN_FILES, IndexManifest,
)
from npm_hf.inference.vector_shards import (  # noqa: E402
    create_vector_shards, layout_format_version, parse_shard_size, shard_layout,
)

HIDDEN_SIZE = 384  # MiniLM's
BLOCK_SIZE = 256
TOKENS_PER_DOCUMENT = 1000
CHUNK = 200_000  # vectors generated at a time (300 MB of float32 at d=384)
NOISE_NORM = 0.5
STATS_FILE = "synthetic.json"  # beside the index, not in it (the manifest lists every file of the index)


def _centres(nlist: int, seed: int) -> np.ndarray:
    centres = np.random.default_rng(seed).standard_normal((nlist, HIDDEN_SIZE)).astype(np.float32)
    return centres / np.linalg.norm(centres, axis=1, keepdims=True)


def _chunk_vectors(centres: np.ndarray, lo: int, hi: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng([seed, lo])
    assign = rng.integers(0, len(centres), hi - lo)
    noise = rng.standard_normal((hi - lo, HIDDEN_SIZE), dtype=np.float32)
    noise *= NOISE_NORM / np.sqrt(HIDDEN_SIZE)
    noise += centres[assign]
    return noise.astype(np.float16), assign


def _write_token_files(staging: Path, num_tokens: int, seed: int) -> int:
    """Token arrays of documents of TOKENS_PER_DOCUMENT words "w<id>" (no special tokens: every token indexed)."""
    rng = np.random.default_rng(seed)
    arrays = {name: np.lib.format.open_memmap(staging / file, mode="w+", dtype=dtype, shape=shape)
              for (name, file), (dtype, shape) in zip(TOKEN_FILES.items(), [
                  (np.int32, (num_tokens,)), (np.uint8, (num_tokens,)), (np.int32, (num_tokens,)),
                  (np.int32, (num_tokens, 2))])}
    positions = np.lib.format.open_memmap(staging / POSITIONS_FILE, mode="w+", dtype=np.int64, shape=(num_tokens,))
    word = 8  # "w12345 " padded: every token is 8 characters
    for lo in range(0, num_tokens, CHUNK):
        hi = min(lo + CHUNK, num_tokens)
        rows = np.arange(lo, hi)
        arrays["token_ids"][lo:hi] = rng.integers(1000, 30000, hi - lo, dtype=np.int32)
        arrays["token_flags"][lo:hi] = WORD_START | WORD_END
        arrays["token_docs"][lo:hi] = rows // TOKENS_PER_DOCUMENT
        start = (rows % TOKENS_PER_DOCUMENT) * word
        arrays["token_offsets"][lo:hi] = np.stack([start, start + word - 2], axis=1)  # "w00042"
        positions[lo:hi] = rows
    for array in (*arrays.values(), positions):
        array.flush()
    num_documents = -(-num_tokens // TOKENS_PER_DOCUMENT)
    offsets = [0]
    with open(staging / DOCUMENTS_FILE, "wb") as handle:
        for doc in range(num_documents):
            length = min(TOKENS_PER_DOCUMENT, num_tokens - doc * TOKENS_PER_DOCUMENT)
            text = "".join(f"w{(doc * 7 + i) % 100000:05d}  " for i in range(length))
            line = json.dumps({"id": f"doc{doc}", "title": f"Synthetic {doc}", "text": text}).encode() + b"\n"
            handle.write(line)
            offsets.append(offsets[-1] + len(line))
    np.save(staging / DOCUMENT_OFFSETS_FILE, np.asarray(offsets, dtype=np.int64))
    return num_documents


def _ivf_sq8(centres: np.ndarray, sample: np.ndarray):
    import faiss

    quantizer = faiss.IndexFlatIP(HIDDEN_SIZE)
    quantizer.add(centres)
    index = faiss.IndexIVFScalarQuantizer(quantizer, HIDDEN_SIZE, len(centres), faiss.ScalarQuantizer.QT_8bit,
                                          faiss.METRIC_INNER_PRODUCT)
    index.own_fields = True
    quantizer.this.disown()  # the index frees it
    index.train(sample)  # the quantizer is trained and full: FAISS trains only the scalar quantizer
    return index


def write(directory: Path, num_vectors: int, seed: int = 0, max_shard_size: str = "10GB") -> dict:
    """Write a synthetic index of `num_vectors` token vectors to `directory` (atomically); returns its stats."""
    import faiss

    started = time.perf_counter()
    directory = Path(directory)
    staging = directory.parent / f".{directory.name}.tmp"
    if staging.exists():
        import shutil

        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    nlist = ivf_lists(num_vectors)
    centres = _centres(nlist, seed)
    num_documents = _write_token_files(staging, num_vectors, seed)
    max_shard_bytes = parse_shard_size(max_shard_size)
    layout = shard_layout(num_vectors, HIDDEN_SIZE, max_shard_bytes)
    vectors = create_vector_shards(staging, layout, HIDDEN_SIZE)
    sample, _ = _chunk_vectors(centres, num_vectors, num_vectors + min(num_vectors, 100_000), seed)
    index = _ivf_sq8(centres, sample.astype(np.float32))
    agree = []
    for lo in range(0, num_vectors, CHUNK):
        hi = min(lo + CHUNK, num_vectors)
        chunk, assign = _chunk_vectors(centres, lo, hi, seed)
        vectors[lo:hi] = chunk
        chunk = chunk.astype(np.float32)
        if len(agree) < 5:  # how often the generating centre is the one FAISS would assign
            agree.append(np.mean(np.argmax(chunk[:2000] @ centres.T, axis=1) == assign[:2000]))
        ids, lists = np.arange(lo, hi, dtype=np.int64), np.ascontiguousarray(assign, dtype=np.int64)
        # (swig_ptr keeps no reference: the arrays must outlive the call)
        index.add_core(hi - lo, faiss.swig_ptr(chunk), faiss.swig_ptr(ids), faiss.swig_ptr(lists))
        print(f"{directory.name}: {hi}/{num_vectors} vectors, {time.perf_counter() - started:.0f}s", flush=True)
    vectors.flush()
    del vectors
    faiss.write_index(index, str(staging / FAISS_FILE))
    del index
    manifest = IndexManifest(
        format_version=layout_format_version(layout), encoder_fingerprint="synthetic", tokenizer_fingerprint="synthetic",
        encoder_name_or_path="synthetic", hidden_size=HIDDEN_SIZE, block_size=BLOCK_SIZE,
        faiss_factory=f"IVF{nlist},SQ8", num_documents=num_documents, num_skipped_empty_documents=0,
        num_tokens=num_vectors, num_indexed_tokens=num_vectors, num_blocks=-(-num_vectors // BLOCK_SIZE),
        build_seconds=0.0, versions=library_versions(), vector_shards=layout, max_shard_bytes=max_shard_bytes,
    )
    publish(staging, directory, manifest)
    stats = {"num_vectors": num_vectors, "nlist": nlist, "assignment_agreement": float(np.mean(agree)),
             "seconds": round(time.perf_counter() - started, 1),
             "bytes": {name: entry["bytes"] for name, entry in manifest.files.items()}}
    (directory.parent / f"{directory.name}.{STATS_FILE}").write_text(json.dumps(stats, indent=2))
    return stats


def ensure(directory: Path, num_vectors: int) -> dict:
    """The stats of the synthetic index at `directory`, writing it first unless it is already complete."""
    stats_path = Path(directory).parent / f"{Path(directory).name}.{STATS_FILE}"
    if (Path(directory) / MANIFEST_FILE).is_file() and stats_path.is_file():
        stats = json.loads(stats_path.read_text())
        if stats["num_vectors"] == num_vectors:
            return stats
    return write(directory, num_vectors)


if __name__ == "__main__":
    print(json.dumps(ensure(Path(sys.argv[1]), int(float(sys.argv[2])))))
