"""Row shards of an index searched in-process (`ShardSearcher`, no Ray): their merged top-k is the local index's."""

import subprocess
import sys

import numpy as np
import pytest

import npm_hf
from npm_hf.serve import merge_top_k
from npm_hf.serve.shards import ShardSearcher, ShardServingError, shard_bounds


def canonical(scores, rows):
    """(scores, rows) ordered best first, ties by row: the order the shards' merge promises."""
    order = np.lexsort((np.where(rows >= 0, rows, np.iinfo(np.int64).max), -scores), axis=1)
    return np.take_along_axis(scores, order, axis=1), np.take_along_axis(rows, order, axis=1)


def query_vectors(index, count=6, seed=0):
    rng = np.random.default_rng(seed)
    rows = rng.choice(index.num_indexed, size=count, replace=False)
    noise = rng.normal(scale=0.1, size=(count, index.manifest.hidden_size))
    return (index.vectors_for_rows(rows) + noise).astype(np.float32)


def sharded_search(path, num_shards, queries, k, many=False, **knobs):
    index = npm_hf.NPMIndex.load(path)
    parts = [ShardSearcher(str(path), lo, hi).search(queries, k, many=many, **knobs)
             for lo, hi in shard_bounds(index.num_indexed, num_shards)]
    return merge_top_k(parts, min(k, index.num_indexed))


def test_shard_bounds_cover_every_row_once():
    assert shard_bounds(10, 3) == [(0, 3), (3, 7), (7, 10)]
    assert shard_bounds(5, 1) == [(0, 5)]
    with pytest.raises(ValueError, match="num_shards <= 5"):
        shard_bounds(5, 6)
    with pytest.raises(ValueError, match="positive integer"):
        shard_bounds(5, 0)


@pytest.mark.parametrize("num_shards", [1, 2, 3])
def test_flat_shards_merge_to_the_local_top_k(npm_dir, num_shards):
    index = npm_hf.NPMIndex.load(npm_dir / "index")
    queries = query_vectors(index)
    for k in (1, 5, index.num_indexed, index.num_indexed + 10):
        got = sharded_search(npm_dir / "index", num_shards, queries, k)
        want = canonical(*index.search(queries, k))
        np.testing.assert_array_equal(got[1], want[1])
        np.testing.assert_array_equal(got[0], want[0])


def test_ivf_shards_merge_to_the_local_top_k(tmp_path, npm_dir, corpus):
    """An IVF index cut into shards: each shard searches the same lists (same nprobe), its candidates re-scored
    from the float16 vectors, so the merge is the local search."""
    ivf = tmp_path / "ivf"
    npm_hf.build_index(npm_dir, corpus, output_dir=ivf, args=npm_hf.IndexBuildArguments(
        block_size=16, batch_size=3, faiss_factory="IVF4,Flat", show_progress_bar=False))
    index = npm_hf.NPMIndex.load(ivf)
    queries = query_vectors(index)
    for nprobe in (1, 2, 4):
        for k in (3, index.num_indexed):
            got = sharded_search(ivf, 3, queries, k, nprobe=nprobe)
            want = canonical(*index.search(queries, k, nprobe=nprobe))
            np.testing.assert_array_equal(got[1], want[1])
            np.testing.assert_array_equal(got[0], want[0])


def test_a_factory_without_row_ids_is_refused(tmp_path, npm_dir, corpus):
    hnsw = tmp_path / "hnsw"
    npm_hf.build_index(npm_dir, corpus, output_dir=hnsw, args=npm_hf.IndexBuildArguments(
        block_size=16, batch_size=3, faiss_factory="HNSW8", show_progress_bar=False))
    with pytest.raises(ShardServingError, match="IVF1024,SQ8"):
        ShardSearcher(str(hnsw), 0, 5)


def test_rows_outside_the_index_are_refused(npm_dir):
    index = npm_hf.NPMIndex.load(npm_dir / "index")
    with pytest.raises(ShardServingError, match="start them again"):
        ShardSearcher(str(npm_dir / "index"), 0, index.num_indexed + 1)


def test_npm_hf_imports_without_ray_and_serving_names_the_install(npm_dir):
    """With ray not importable, `import npm_hf` and `import npm_hf.serve` work; serving says what to install."""
    code = ("import sys; sys.modules['ray'] = None\n"
            "import npm_hf, npm_hf.serve\n"
            "try:\n"
            f"    npm_hf.serve.RayShardedIndex({str(npm_dir / 'index')!r}, num_shards=2)\n"
            "except ImportError as error:\n"
            "    print('ImportError:', error)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "pip install 'npm-hf[ray]'" in out.stdout
