"""The saved BM25 pre-filter's vocabulary, looked up on disk: exact lookups against a dict, bm25s never holding the
vocabulary in memory, answers identical to bm25s's own retrieval, and indexes saved before the lookup files."""

import json
import random
from pathlib import Path

import numpy as np
import pytest

from npm_hf import NPMIndex
from npm_hf.inference.bm25_vocabulary import DiskVocabulary, vocabulary_files, write_vocabulary
from npm_hf.inference.index_files import sha256_file
from npm_hf.inference.prefilter import (BM25PassageRetriever, SavedBM25, bm25_files, bm25_stem,
                                        bm25_vocabulary_files, load_bm25, passage_ranges, passage_texts)


def test_lookups_match_a_dict(tmp_path):
    rng = random.Random(0)
    alphabet = "abcz0é€𝄞ß_"
    vocab = {}
    while len(vocab) < 3000:
        vocab["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 7)))] = len(vocab)
    vocab.update({"": len(vocab), "ab": len(vocab) + 1, "abc": len(vocab) + 2})  # prefixes of each other
    names = write_vocabulary(vocab, tmp_path, "v")
    assert names == list(vocabulary_files("v")) and sorted(p.name for p in tmp_path.iterdir()) == sorted(names)
    lookup = DiskVocabulary(tmp_path, "v")
    assert len(lookup) == len(vocab)
    for word, column in vocab.items():
        assert lookup.get(word) == column and word in lookup
    missing = [w + "a" for w in list(vocab)[:500]] + [w[:-1] + "y" for w in list(vocab)[:500] if w] + ["zzzzzzzz"]
    for word in (w for w in missing if w not in vocab):
        assert lookup.get(word) is None and lookup.get(word, -7) == -7 and word not in lookup
    assert list(lookup.items()) == sorted(vocab.items(), key=lambda item: item[0].encode("utf-8"))
    write_vocabulary({"b": 0, "c": 1}, tmp_path, "small")  # a word before the first one, in a single bucket
    small = DiskVocabulary(tmp_path, "small")
    assert small.get("a") is None and small.get("") is None and small.get("c") == 1 and small.get("d") is None
    empty = write_vocabulary({}, tmp_path, "empty")
    assert len(DiskVocabulary(tmp_path, "empty")) == 0 and DiskVocabulary(tmp_path, "empty").get("a") is None
    assert len(empty) == 2


def test_malformed_vocabulary_files_are_refused(tmp_path):
    write_vocabulary({"texas": 0, "mexico": 1}, tmp_path, "v")
    words, table = vocabulary_files("v")
    np.save(tmp_path / words, np.zeros(3, dtype=np.uint8))  # the table ends past these bytes
    with pytest.raises(ValueError, match="malformed; rebuild the pre-filter"):
        DiskVocabulary(tmp_path, "v")
    np.save(tmp_path / table, np.zeros(4, dtype=np.int64))
    with pytest.raises(ValueError, match="malformed"):
        DiskVocabulary(tmp_path, "v")
    np.save(tmp_path / table, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="malformed.*Python objects"):  # never unpickled
        DiskVocabulary(tmp_path, "v")
    write_vocabulary({"texas": 0, "mexico": 1}, tmp_path, "v")
    (tmp_path / table).write_bytes((tmp_path / table).read_bytes()[:-8])  # truncated
    with pytest.raises(ValueError, match="malformed.*shorter than its header says"):
        DiskVocabulary(tmp_path, "v")
    (tmp_path / table).write_bytes(b"not an array at all")
    with pytest.raises(ValueError, match="malformed.*not a .npy array"):
        DiskVocabulary(tmp_path, "v")


def _queries(index, count=60, seed=0):
    """Queries of corpus words, some repeated, some unknown, and one of stopwords only."""
    rng = random.Random(seed)
    words = sorted({w for text in passage_texts(index, passage_ranges(index)) for w in text.split()})
    queries = [" ".join(rng.choice(words) for _ in range(rng.randint(1, 6))) for _ in range(count)]
    return queries + ["Saltoriaxyz unknownword", "the of and", words[0] + " " + words[0] + " _____"]


def test_a_saved_bm25_answers_as_bm25s_without_loading_its_vocabulary(two_builds):
    import bm25s

    saved, plain = two_builds
    index = NPMIndex.load(saved.path, verify="full")
    for passages in (None, 8):
        loaded = load_bm25(index.path, passages)
        assert loaded.retriever.vocab_dict == {} and isinstance(loaded.vocabulary, DiskVocabulary)
        memory = BM25PassageRetriever(plain, passages)  # built in memory from the passage texts
        ranges = passage_ranges(plain, passages)
        oracle = bm25s.BM25()
        oracle.index(bm25s.tokenize(passage_texts(plain, ranges), stopwords="en", show_progress=False),
                     show_progress=False)
        assert len(loaded.vocabulary) == len(oracle.vocab_dict)
        for word, column in oracle.vocab_dict.items():
            assert loaded.vocabulary.get(word) == column
        retriever = BM25PassageRetriever(index, passages)
        queries = _queries(plain)
        got = retriever.top_passages(queries, n=5)
        assert [(list(i), list(s)) for i, s in got] == [(list(i), list(s)) for i, s in memory.top_passages(queries, 5)]
        tokens = bm25s.tokenize(queries, stopwords="en", show_progress=False)
        _, expected_scores = oracle.retrieve(tokens, k=len(ranges), show_progress=False)
        all_ids, _ = oracle.retrieve(tokens, k=len(ranges), show_progress=False)
        untied = 0
        for (ids, scores), full, full_ids in zip(got, expected_scores, all_ids):
            np.testing.assert_allclose(scores, full[:5], rtol=1e-6)  # bm25s's own best five scores
            assert list(ids) == sorted(ids, key=lambda i: (-scores[list(ids).index(i)], i))  # ties by passage
            if full[4] > full[5]:  # no tie at the cut: the same passages
                assert set(ids) == set(full_ids[:5].tolist())
                untied += 1
        assert untied > 10 and max(s[0] for _, s in got) > 0


def test_a_saved_bm25_reads_its_files_without_mapping_them(two_builds):
    """Scores read per query word equal bm25s's over its memory-mapped matrix bit for bit, and a query leaves no page
    of the vocabulary or the score matrix resident in the process (no map of the vocabulary at all)."""
    saved, plain = two_builds
    index = NPMIndex.load(saved.path)
    for passages in (None, 8):
        loaded = load_bm25(index.path, passages)
        assert loaded.postings is not None
        queries = _queries(plain, 40, seed=2)
        for query in queries:
            words = [w for w in query.lower().split() if w in loaded.vocabulary]
            columns = [loaded.vocabulary.get(w) for w in words]
            expected = loaded.retriever.get_scores_from_ids(columns)
            got = loaded.scores(words)
            assert got.dtype == expected.dtype
            np.testing.assert_array_equal(got, expected)
        with pytest.raises(ValueError, match="outside the score matrix"):
            loaded.postings.scores([loaded.postings.num_columns], 3, np.float32)
    if not Path("/proc/self/smaps").is_file():
        return
    fresh = [load_bm25(index.path, passages) for passages in (None, 8)]
    for loaded in fresh:
        for query in _queries(plain, 20, seed=3):
            loaded.scores(query.lower().split())
    resident = {}
    name = None
    for line in Path("/proc/self/smaps").read_text().splitlines():
        fields = line.split()
        if fields and "-" in fields[0] and len(fields) >= 5:
            name = fields[5] if len(fields) > 5 else None
        elif fields and fields[0] == "Rss:" and name and name.startswith(str(index.path)):
            resident[Path(name).name] = resident.get(Path(name).name, 0) + int(fields[1])
    stems = [bm25_stem(passages) for passages in (None, 8)]
    assert not [n for n in resident for stem in stems if n in vocabulary_files(stem)]  # never mapped
    assert all(kb == 0 for n, kb in resident.items() if n.startswith(tuple(stems))), resident


def test_an_index_saved_with_bm25s_vocab_json_still_loads(two_builds, model_and_tokenizer, rewrite_manifest):
    """Indexes saved before the lookup files hold bm25s's vocab.json: their vocabulary is loaded from it."""
    saved, plain = two_builds
    for passages in (None, 8):
        stem_files = bm25_vocabulary_files(passages)
        vocabulary = load_bm25(saved.path, passages).vocabulary
        old = dict(vocabulary.items())
        assert len(old) == len(vocabulary)
        vocab_json = saved.path / bm25_files(passages)["vocab_name"]
        vocab_json.write_text(json.dumps(old))
        del vocabulary
        for name in stem_files:
            (saved.path / name).unlink()

        def change(data, stem_files=stem_files, vocab_json=vocab_json):
            for name in stem_files:
                del data["files"][name]
            data["files"][vocab_json.name] = {"bytes": vocab_json.stat().st_size, "sha256": sha256_file(vocab_json)}

        rewrite_manifest(saved.path, change)
    index = NPMIndex.load(saved.path, verify="full")
    for passages in (None, 8):
        loaded = load_bm25(index.path, passages)
        assert isinstance(loaded, SavedBM25) and isinstance(loaded.vocabulary, dict) and loaded.vocabulary
        queries = _queries(plain, 20, seed=1)
        got = BM25PassageRetriever(index, passages).top_passages(queries, n=4)
        expected = BM25PassageRetriever(plain, passages).top_passages(queries, n=4)
        assert [(list(i), list(s)) for i, s in got] == [(list(i), list(s)) for i, s in expected]
