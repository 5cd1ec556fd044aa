"""Vectors sharded into files below a size limit: ShardedArray indexing, sharded builds, loads, checks and edits."""

import json
import os

import numpy as np
import pytest

from npm_hf import IndexBuildArguments, NonparametricFillMaskPipeline, NPMIndex, NPMIndexError
from npm_hf.cli import main
from npm_hf.index import VECTORS_FILE, ShardedArray, parse_shard_size, shard_layout


SHARD_BYTES = 1000  # 13 rows of 32 float16 dimensions after the 128-byte header: about ten shards per index
NEW = {"id": "zorb", "title": "Borvin", "text": "Borvin lives in Saltoria. Saltoria is cold."}


def _build(model_and_tokenizer, corpus, path, **kwargs):
    args = IndexBuildArguments(block_size=16, batch_size=3, show_progress_bar=False, **kwargs)
    return NPMIndex.build(*model_and_tokenizer, corpus, path, args)


@pytest.fixture
def pair(tmp_path, model_and_tokenizer, corpus):
    """The same corpus indexed into one vectors.npy and into shards of at most SHARD_BYTES."""
    return (_build(model_and_tokenizer, corpus, tmp_path / "single"),
            _build(model_and_tokenizer, corpus, tmp_path / "sharded", max_shard_size=SHARD_BYTES))


def _shard_files(path):
    return sorted(name for name in os.listdir(path) if name.startswith("vectors"))


# ------------------------------------------------------------------------------------------- ShardedArray
@pytest.fixture
def arrays():
    rng = np.random.default_rng(0)
    shards = [rng.standard_normal((n, 4)).astype(np.float16) for n in (3, 0, 5, 1, 4)]  # an empty one too
    return ShardedArray(shards), np.concatenate(shards)


@pytest.mark.parametrize("key", [
    0, 2, 3, 8, 12, -1, -13, np.int64(9),
    slice(None), slice(2, 9), slice(3, 8), slice(9, 2), slice(-4, None), slice(None, None, -1), slice(1, 11, 3),
    [], [12, 0, 3, 3, -1, 8], np.array([[1, 8], [9, 4]]), np.array([5, 5, 5]),
    (slice(2, 9), 1), (4, slice(1, 3)), ([5, 1], slice(None)),
])
def test_sharded_array_indexes_like_the_concatenation(arrays, key):
    sharded, whole = arrays
    got, want = sharded[key], whole[key]
    assert isinstance(got, np.ndarray) and got.dtype == want.dtype == np.float16 and got.shape == want.shape
    np.testing.assert_array_equal(got, want)


def test_sharded_array_shape_masks_errors_and_writes(arrays):
    sharded, whole = arrays
    assert (sharded.shape, sharded.dtype, len(sharded), sharded.ndim) == (whole.shape, whole.dtype, 13, 2)
    np.testing.assert_array_equal(sharded[whole[:, 0] > 0], whole[whole[:, 0] > 0])
    np.testing.assert_array_equal(np.asarray(sharded, dtype=np.float32), whole.astype(np.float32))
    np.testing.assert_array_equal(list(sharded), list(whole))
    for bad in (13, -14, [0, 13], np.array([-14])):
        with pytest.raises(IndexError, match="out of bounds"):
            sharded[bad]
    with pytest.raises(IndexError, match="float64"):
        sharded[np.array([0.5])]
    rows = np.arange(6 * 4, dtype=np.float16).reshape(6, 4)
    sharded[2:8] = rows  # across three shards and the empty one
    whole[2:8] = rows
    np.testing.assert_array_equal(sharded[:], whole)
    with pytest.raises(TypeError, match="contiguous row ranges"):
        sharded[[1, 2]] = rows[:2]
    with pytest.raises(ValueError, match="Cannot write 6 rows to the 2 rows"):
        sharded[0:2] = rows


# ------------------------------------------------------------------------------------------- sharded build
def test_build_writes_shards_below_the_limit(pair):
    single, sharded = pair
    names = _shard_files(sharded.path)
    count = len(names)
    assert count >= 3 and names == [f"vectors-{i:05d}-of-{count:05d}.npy" for i in range(count)]
    assert _shard_files(single.path) == [VECTORS_FILE]
    manifest = json.loads((sharded.path / "manifest.json").read_text())
    assert manifest["format_version"] == 3 and manifest["max_shard_bytes"] == SHARD_BYTES  # compact token files
    assert [s["file"] for s in manifest["vector_shards"]] == names
    assert [s["start"] for s in manifest["vector_shards"]] == [0] + [s["stop"] for s in manifest["vector_shards"]][:-1]
    assert manifest["vector_shards"][-1]["stop"] == sharded.num_indexed
    pieces = []
    for shard in manifest["vector_shards"]:
        path = sharded.path / shard["file"]
        assert path.stat().st_size <= SHARD_BYTES and manifest["files"][shard["file"]]["bytes"] == path.stat().st_size
        assert len(manifest["files"][shard["file"]]["sha256"]) == 64
        pieces.append(np.load(path, allow_pickle=False))
        assert pieces[-1].shape == (shard["stop"] - shard["start"], sharded.manifest.hidden_size)
    np.testing.assert_array_equal(np.concatenate(pieces), np.load(single.path / VECTORS_FILE, allow_pickle=False))
    assert isinstance(sharded.vectors, ShardedArray) and len(sharded.vectors.shards) == count
    # builds write format 3 (compact token files) sharded or not; formats 1 and 2 are read (tests/index/test_compact.py)
    assert json.loads((single.path / "manifest.json").read_text())["format_version"] == 3


def test_sharded_index_answers_exactly_like_one_file(pair, model_and_tokenizer, mask):
    single, sharded = pair
    model, tokenizer = model_and_tokenizer
    fills = [NonparametricFillMaskPipeline(model=model, tokenizer=tokenizer, index=index) for index in pair]
    answered = 0
    for text, kwargs in [(f"Thessaloniki is far from {mask}.", {"top_k": 20}),
                         (f"Lincoln was born in {mask}.", {"top_k": 10, "prefilter": "dense", "prefilter_blocks": 2}),
                         (f"The {mask} flows through New Mexico.", {"top_k": 10, "k": 7})]:
        one, many = (fill(text, **kwargs) for fill in fills)
        assert one == many  # same phrases, evidence and bit-identical scores
        answered += bool(one)
    assert answered >= 2
    queries = np.asarray(single.vectors[[0, 40, -1]], dtype=np.float32)
    for a, b in zip(single.search(queries, 9), sharded.search(queries, 9)):
        np.testing.assert_array_equal(a, b)
    rows = np.array([sharded.num_indexed - 1, 0, 14, 14, 27, 3])
    np.testing.assert_array_equal(sharded.vectors_for_rows(rows), single.vectors_for_rows(rows))


def test_approximate_sharded_index_is_rescored_from_the_shards(tmp_path, model_and_tokenizer, corpus):
    index = _build(model_and_tokenizer, corpus, tmp_path / "i", faiss_factory="IVF2,Flat", max_shard_size="1kb")
    whole = np.asarray(index.vectors, dtype=np.float32)
    queries = whole[[2, 50, -3]]
    scores, rows = index.search(queries, 12, nprobe=2)  # every list: exhaustive
    exact = queries @ whole.T
    np.testing.assert_allclose(scores, np.take_along_axis(exact, rows, axis=1), rtol=1e-5)
    np.testing.assert_allclose(scores, -np.sort(-exact, axis=1)[:, :12], rtol=1e-5)  # the exact top 12, in order


# ----------------------------------------------------------------------------------------- integrity checks
def _flip_a_byte(path):
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF
    path.write_bytes(bytes(data))


def test_a_corrupted_or_missing_shard_is_detected(pair):
    path = pair[1].path
    names = _shard_files(path)
    _flip_a_byte(path / names[1])
    with pytest.raises(NPMIndexError, match=f"{names[1]} is corrupted"):
        NPMIndex.load(path, verify="full")
    NPMIndex.load(path, verify="none")  # sizes only
    os.remove(path / names[-1])
    with pytest.raises(NPMIndexError, match=f"{names[-1]} is missing"):
        NPMIndex.load(path, verify="none")


def test_a_manifest_with_broken_shard_boundaries_is_refused(pair, rewrite_manifest):
    path = pair[1].path
    rewrite_manifest(path, lambda m: m["vector_shards"][1].update(start=m["vector_shards"][1]["start"] + 1))
    with pytest.raises(NPMIndexError, match="vector shards that do not cover rows"):
        NPMIndex.load(path)
    rewrite_manifest(path, lambda m: m["vector_shards"][1].update(start=m["vector_shards"][1]["start"] - 1))
    rewrite_manifest(path, lambda m: m["vector_shards"][0].update(file="../outside.npy"))
    with pytest.raises(NPMIndexError, match="vector shards that do not cover rows"):
        NPMIndex.load(path)


def test_an_index_without_shard_records_still_loads(pair, model_and_tokenizer, mask, rewrite_manifest):
    """Indexes written before sharding (format 1, no vector_shards / max_shard_bytes) load and edit as before."""
    single = pair[0]
    rewrite_manifest(single.path, lambda m: [m.pop(key) for key in ("vector_shards", "max_shard_bytes")], seal=False)
    old = NPMIndex.load(single.path, verify="full")
    np.testing.assert_array_equal(old.vectors[:], single.vectors[:])
    old.delete_documents(["texas"])
    assert _shard_files(old.path) == [VECTORS_FILE] and old.manifest.format_version == 3
    assert old.manifest.max_shard_bytes == 10**10  # the default rule


# ------------------------------------------------------------------------------------------------- editing
def test_edits_of_a_sharded_index_keep_the_shard_rule(pair, model_and_tokenizer, mask):
    single, sharded = pair
    before = _shard_files(sharded.path)
    for index in pair:
        index.delete_documents(["texas", "desert"])
    after_delete = _shard_files(sharded.path)
    assert len(after_delete) < len(before)  # fewer rows, fewer shards, and none of the old names is left over
    for index in pair:
        index.add_documents(*model_and_tokenizer, [NEW])
    names = _shard_files(sharded.path)
    assert len(names) > len(after_delete) and names[0].endswith(f"-of-{len(names):05d}.npy")
    assert _shard_files(single.path) == [VECTORS_FILE]
    assert all((sharded.path / name).stat().st_size <= SHARD_BYTES for name in names)
    reloaded = NPMIndex.load(sharded.path, verify="full")
    assert [s["file"] for s in reloaded.manifest.vector_shards] == names
    assert sorted(name for name in reloaded.manifest.files if name.startswith("vectors")) == names
    np.testing.assert_array_equal(reloaded.vectors[:], single.vectors[:])
    model, tokenizer = model_and_tokenizer
    fills = [NonparametricFillMaskPipeline(model=model, tokenizer=tokenizer, index=index) for index in pair]
    one, many = (fill(f"Borvin lives in {mask}.", targets=["Saltoria", "Kentucky"]) for fill in fills)
    assert one == many and len(one) == 2  # both targets found, with the same scores and evidence
    assert "zorb" in {answer["evidence"]["doc_id"] for answer in one}


# ---------------------------------------------------------------------------------------------- arguments
@pytest.mark.parametrize("value, size", [(1000, 1000), ("500MB", 500 * 10**6), ("10GB", 10**10),
                                         ("2GiB", 2 * 2**30), (" 1.5 kb ", 1500)])
def test_shard_sizes_are_read(value, size):
    assert parse_shard_size(value) == size
    assert IndexBuildArguments(max_shard_size=value).max_shard_size == value


@pytest.mark.parametrize("value", ["10XB", "-5MB", "", "big", 0, -1, True, "0.1"])
def test_bad_shard_sizes_are_refused(value):
    with pytest.raises(ValueError, match=r"Cannot read max_shard_size=.*such as 10GB, 500MB or 2GiB"):
        IndexBuildArguments(max_shard_size=value)


def test_shard_sizes_above_the_hub_limit_are_warned_about(caplog):
    with caplog.at_level("WARNING", logger="npm_hf.index"):
        IndexBuildArguments(max_shard_size="50GB")
        assert not caplog.records
        IndexBuildArguments(max_shard_size="51GB")
    assert "above the Hub's 50 GB per-file limit" in caplog.text


def test_cli_builds_shards(tmp_path, npm_dir, capsys):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("Texas borders New Mexico.\nLincoln was born in Kentucky. The Ohio River borders Kentucky.\n")
    assert main(["build-index", "--model", str(npm_dir), "--corpus", str(corpus), "--output", str(tmp_path / "i"),
                 "--block-size", "16", "--max-shard-size", "0.5KB", "--no-show-progress-bar"]) == 0
    assert len(_shard_files(tmp_path / "i")) > 1 and NPMIndex.load(tmp_path / "i").manifest.max_shard_bytes == 500
    assert main(["build-index", "--model", str(npm_dir), "--corpus", str(corpus), "--output", str(tmp_path / "j"),
                 "--max-shard-size", "lots"]) == 2
    assert "Cannot read max_shard_size='lots'" in capsys.readouterr().err


def test_a_shard_size_below_one_vector_fails_before_any_work(tmp_path, model_and_tokenizer, corpus):
    with pytest.raises(ValueError, match="cannot hold one vector .* raise max_shard_size"):
        _build(model_and_tokenizer, corpus, tmp_path / "i", max_shard_size=150)
    assert os.listdir(tmp_path) == []


def test_shard_layout_rule():
    assert shard_layout(10, 32, 10**10) == [{"file": VECTORS_FILE, "start": 0, "stop": 10}]
    assert shard_layout(0, 32, 1000) == [{"file": VECTORS_FILE, "start": 0, "stop": 0}]
    layout = shard_layout(27, 32, 128 + 13 * 64)  # exactly 13 rows per shard
    assert [(s["file"], s["start"], s["stop"]) for s in layout] == [
        ("vectors-00000-of-00003.npy", 0, 13), ("vectors-00001-of-00003.npy", 13, 26),
        ("vectors-00002-of-00003.npy", 26, 27)]
    assert len(shard_layout(26, 32, 128 + 13 * 64)) == 2 and len(shard_layout(13, 32, 128 + 13 * 64)) == 1
