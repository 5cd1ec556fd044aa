"""Index format 3: the per-token metadata in compact files (`npm_hf.inference.compact_tokens`), read back exactly,
and formats 1 and 2 (plain token files) still read."""

import json

import numpy as np
import pytest

from npm_hf import NPMIndex
from npm_hf.inference import compact_tokens
from npm_hf.inference.compact_tokens import COMPACT_TOKEN_FILES, read_compact_tokens, write_compact_tokens
from npm_hf.inference.index_files import NPMIndexError
from npm_hf.inference.tokens import PAD, SPECIAL, WORD_END, WORD_START


def _tokens(num_blocks=7, block_size=16, seed=0):
    """Token arrays as a corpus writes them: blocks of one document each (documents span several), specials with
    offsets (0, 0), offsets growing within a document, some long tokens."""
    rng = np.random.default_rng(seed)
    n = num_blocks * block_size
    flags = rng.choice([WORD_START, WORD_END, WORD_START | WORD_END, 0], size=n).astype(np.uint8)
    flags[::block_size] = SPECIAL  # CLS
    flags[block_size - 3 :: block_size] = SPECIAL | PAD
    docs = np.repeat(np.array([0, 0, 1, 2, 2, 2, 4])[:num_blocks], block_size).astype(np.int32)
    lengths = rng.integers(0, 6, size=n)
    lengths[5] = 300  # a token longer than 255 characters: lengths need 16 bits
    starts = np.zeros(n, dtype=np.int64)
    for doc in np.unique(docs):
        where = np.flatnonzero(docs == doc)
        starts[where] = 70_000 * (doc == 2) + np.cumsum(lengths[where] + 1) - lengths[where] - 1
    starts[24:32] += 70_000  # a gap of 70,000 characters inside block 1: its relative offsets need 32 bits
    offsets = np.stack([starts, starts + lengths], axis=1).astype(np.int32)
    offsets[(flags & SPECIAL) != 0] = 0
    ids = rng.integers(0, 30_000, size=n).astype(np.int32)
    positions = np.flatnonzero(((flags & SPECIAL) == 0) & ((flags & (WORD_START | WORD_END)) != 0))
    return ids, flags, docs, offsets, positions, block_size


def test_compact_tokens_round_trip_exactly_in_any_chunking(tmp_path, monkeypatch):
    ids, flags, docs, offsets, positions, block_size = _tokens()
    written = {}
    for chunk_blocks in (1, 3, 4096):
        monkeypatch.setattr(compact_tokens, "_CHUNK_BLOCKS", chunk_blocks)
        folder = tmp_path / str(chunk_blocks)
        folder.mkdir()
        write_compact_tokens(folder, ids, flags, docs, offsets, positions, block_size)
        arrays, got_positions = read_compact_tokens(folder, block_size)
        np.testing.assert_array_equal(arrays["token_ids"], ids)
        np.testing.assert_array_equal(arrays["token_flags"], flags)
        np.testing.assert_array_equal(arrays["token_docs"], docs)
        np.testing.assert_array_equal(arrays["token_offsets"], offsets)
        np.testing.assert_array_equal(got_positions, positions)
        written[chunk_blocks] = {name: (folder / name).read_bytes() for name in COMPACT_TOKEN_FILES.values()}
        assert sorted(p.name for p in folder.iterdir()) == sorted(COMPACT_TOKEN_FILES.values())  # no temporaries
    assert written[1] == written[3] == written[4096]
    load = lambda name: np.load(tmp_path / "1" / COMPACT_TOKEN_FILES[name])  # noqa: E731
    assert load("token_ids").dtype == np.uint16 and load("lengths").dtype == np.uint16
    assert load("starts").dtype == np.uint32
    assert load("block_offsets")[3] >= 70_000  # document 2's text starts 70,000 characters in
    assert load("doc_runs").tolist() == [[0, 0], [32, 1], [48, 2], [96, 4]]


def test_a_special_token_with_offsets_is_refused(tmp_path):
    ids, flags, docs, offsets, positions, block_size = _tokens()
    offsets[0] = [3, 4]  # token 0 is special
    with pytest.raises(ValueError, match=r"token 0 is special but has character offsets \[3, 4\]"):
        write_compact_tokens(tmp_path, ids, flags, docs, offsets, positions, block_size)


def test_built_index_stores_a_few_bytes_per_token(npm_dir):
    index = NPMIndex.load(npm_dir / "index")
    m = index.manifest
    assert m.format_version == 3
    token_bytes = sum(m.files[name]["bytes"] for name in COMPACT_TOKEN_FILES.values())
    headers = 128 * len(COMPACT_TOKEN_FILES)  # each .npy file's header
    # ids 2 + flags 1 + relative start 2 + length 1 bytes and 1 bit per token, 8 bytes per block, 16 per document
    per_token = 2 + 1 + 2 + 1 + 1 / 8
    assert token_bytes <= headers + per_token * m.num_tokens + 8 * m.num_blocks + 16 * m.num_documents + 1
    assert not any(name in m.files for name in ("token_docs.npy", "token_offsets.npy", "positions.npy"))


def test_format_1_indexes_still_load_and_answer_the_same(npm_dir, plain_index_copy, model_and_tokenizer, mask):
    compact = NPMIndex.load(npm_dir / "index", verify="full")
    plain = NPMIndex.load(plain_index_copy, verify="full")
    assert plain.manifest.format_version == 1 and (plain_index_copy / "token_offsets.npy").is_file()
    for name in ("token_ids", "token_flags", "token_docs", "token_offsets", "positions"):
        np.testing.assert_array_equal(getattr(plain, name), getattr(compact, name), err_msg=name)
    queries = compact.vectors_for_rows(np.arange(0, compact.num_indexed, 7))
    for got, want in zip(plain.search(queries, 5), compact.search(queries, 5)):
        np.testing.assert_array_equal(got, want)
    for start in compact.positions[:: max(1, compact.num_indexed // 5)]:
        assert plain.evidence(int(start), int(start)) == compact.evidence(int(start), int(start))


@pytest.mark.parametrize("name, change, message", [
    ("doc_runs", lambda a: a[::-1], "token_doc_runs.npy does not cut the tokens into increasing runs"),
    ("indexed", lambda a: a[:-1], r"indexed_tokens.npy holds \(\d+,\) bytes for \d+ tokens"),
    ("block_offsets", lambda a: a[1:], r"block_offsets.npy has \(\d+,\) entries"),
    ("starts", lambda a: a[1:], r"token_starts.npy holds uint\d+ \(\d+,\), not \d+ integers"),
])
def test_crafted_compact_files_are_refused(index_copy, rewrite_manifest, name, change, message):
    path = index_copy / COMPACT_TOKEN_FILES[name]
    np.save(path, change(np.load(path)))
    size = path.stat().st_size
    rewrite_manifest(index_copy, lambda m: m["files"][path.name].update(bytes=size))
    with pytest.raises(NPMIndexError, match=message):
        NPMIndex.load(index_copy, verify="none")
    assert json.loads((index_copy / "manifest.json").read_text())["format_version"] == 3
