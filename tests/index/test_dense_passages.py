"""Passage vectors of the dense pre-filter stored at build time (`IndexBuildArguments.dense_passages`).

The oracle is the definition: a passage's vector is the normalised mean of the vectors of its indexed tokens (live
rows only). Stored vectors are scalar-quantised (one byte per dimension), so they match it to ~1e-3; what is
averaged at first use (segments, passages with deleted rows, settings not stored) matches it exactly."""

import shutil

import faiss
import numpy as np
import pytest

import npm_hf.inference.prefilter as prefilter
from npm_hf import IndexBuildArguments, NPMIndex
from npm_hf.inference.index_files import NPMIndexError
from npm_hf.inference.passage_vectors import dense_passage_file, passage_means
from npm_hf.inference.prefilter import DensePassageRetriever, passage_ranges


STORED_TOLERANCE = 2e-3  # SQ8 over unit vectors
NEW = {"id": "zorb", "title": "Borvin", "text": "Borvin lives in Saltoria. Saltoria is cold and far from the sea."}


def _build(model_and_tokenizer, corpus, path, **kwargs):
    return NPMIndex.build(*model_and_tokenizer, corpus, path,
                          IndexBuildArguments(block_size=16, show_progress_bar=False, **kwargs))


def _oracle(index, ranges) -> np.ndarray:
    positions = np.asarray(index.positions)
    deleted = index.deleted_rows
    want = np.zeros((len(ranges), index.manifest.hidden_size))
    for i, (lo, hi) in enumerate(np.asarray(ranges).tolist()):
        rows = np.flatnonzero((positions >= lo) & (positions < hi))
        if deleted is not None:
            rows = rows[~deleted[rows]]
        if len(rows):
            mean = np.asarray(index.vectors[rows], dtype=np.float64).mean(axis=0)
            want[i] = mean / np.linalg.norm(mean)
    return want


def _forbid_averaging(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("the token vectors were averaged although the build stored the passage vectors")
    monkeypatch.setattr(prefilter, "passage_means", fail)


@pytest.fixture
def built(tmp_path, model_and_tokenizer, corpus):
    path = tmp_path / "built"
    return _build(model_and_tokenizer, corpus, path, dense_passages="blocks,6").path


def test_build_stores_the_means_of_each_setting(built, monkeypatch):
    index = NPMIndex.load(built, verify="full")  # the files are in the manifest, checksummed
    assert index.manifest.dense_passages == [None, 6]
    for passage in (None, 6):
        assert dense_passage_file(passage) in index.manifest.files
        _forbid_averaging(monkeypatch)
        retriever = DensePassageRetriever(index, passage)
        assert retriever.embeddings.shape == (len(passage_ranges(index, passage)), index.manifest.hidden_size)
        want = _oracle(index, retriever.ranges)
        np.testing.assert_allclose(retriever.embeddings.numpy(), want, atol=STORED_TOLERANCE)
        assert not (retriever.embeddings.numpy() - want == 0).all()  # quantised: not a plain copy of the oracle
        empty = ~want.any(axis=1)  # windows of padding or mid-word pieces only: no vector, match nothing
        assert not retriever.embeddings.numpy()[empty].any()


def test_stored_means_rank_passages_like_exact_means(built):
    index = NPMIndex.load(built)
    retriever = DensePassageRetriever(index, 6)
    exact = _oracle(index, retriever.ranges)
    queries = np.random.default_rng(0).normal(size=(20, index.manifest.hidden_size))
    for query, (top, scores) in zip(queries, retriever.top_passages(queries, n=5)):
        cosine = exact @ (query / np.linalg.norm(query))
        assert cosine[top] == pytest.approx(np.sort(cosine)[::-1][:5], abs=2 * STORED_TOLERANCE)
        assert scores == pytest.approx(cosine[top], abs=2 * STORED_TOLERANCE)


def test_a_setting_not_stored_is_averaged_exactly(built):
    index = NPMIndex.load(built)
    retriever = DensePassageRetriever(index, 8)
    np.testing.assert_allclose(retriever.embeddings.numpy(), _oracle(index, retriever.ranges), atol=1e-5)


def test_none_stores_nothing(tmp_path, model_and_tokenizer, corpus):
    index = _build(model_and_tokenizer, corpus, tmp_path / "index", dense_passages="none")
    assert index.manifest.dense_passages == []
    assert not list(index.path.glob("dense-*"))
    retriever = DensePassageRetriever(index)
    np.testing.assert_allclose(retriever.embeddings.numpy(), _oracle(index, retriever.ranges), atol=1e-5)


def test_auto_stores_blocks(npm_dir):
    index = NPMIndex.load(npm_dir / "index")
    assert index.manifest.dense_passages == [None] and (index.path / dense_passage_file(None)).is_file()


def test_bad_setting_names_the_argument():
    with pytest.raises(ValueError, match="dense_passages='blocks,x'"):
        IndexBuildArguments(dense_passages="blocks,x")


def test_edits_average_only_what_the_stored_vectors_miss(tmp_path, built, model_and_tokenizer, monkeypatch):
    path = tmp_path / "index"
    shutil.copytree(built, path)
    index = NPMIndex.load(path)
    stored = DensePassageRetriever(index, 6).embeddings.numpy()
    index.add_documents(*model_and_tokenizer, [NEW])
    index.delete_documents(["texas"])
    index = NPMIndex.load(path)
    averaged = []
    real = passage_means
    monkeypatch.setattr(prefilter, "passage_means", lambda p, v, ranges, *a: averaged.append(ranges) or real(
        p, v, ranges, *a))
    retriever = DensePassageRetriever(index, 6)
    want = _oracle(index, retriever.ranges)
    (redone,) = averaged
    redo = np.flatnonzero((retriever.ranges[:, None] == redone[None]).all(axis=2).any(axis=1))
    # the segment's passages and the base's passages holding a deleted row: exact; the rest: as stored
    positions, deleted = np.asarray(index.positions), index.deleted_rows
    rows = np.searchsorted(positions, retriever.ranges)
    touched = np.array([deleted[lo:hi].any() for lo, hi in rows])
    base = len(stored)
    assert set(redo) == set(np.flatnonzero(touched[:base])) | set(range(base, len(retriever.ranges)))
    assert len(redo) < len(retriever.ranges) and touched[:base].any() and base < len(retriever.ranges)
    np.testing.assert_allclose(retriever.embeddings.numpy()[redo], want[redo], atol=1e-5)
    keep = np.setdiff1d(np.arange(base), redo)
    np.testing.assert_array_equal(retriever.embeddings.numpy()[keep], stored[keep])
    assert retriever.top_passages(want[base:base + 1], n=1)[0][0][0] >= base  # the new document is found

    monkeypatch.setattr(prefilter, "passage_means", real)
    index.compact()
    index = NPMIndex.load(path, verify="full")
    assert index.manifest.dense_passages == [None, 6]
    _forbid_averaging(monkeypatch)
    compacted = DensePassageRetriever(index, 6)
    np.testing.assert_allclose(compacted.embeddings.numpy(), _oracle(index, compacted.ranges), atol=STORED_TOLERANCE)


def test_a_stored_file_of_another_index_is_refused(tmp_path, built, rewrite_manifest):
    path = tmp_path / "index"
    shutil.copytree(built, path)
    coder = faiss.read_index(str(path / dense_passage_file(6)))
    coder.remove_ids(np.array([0], dtype=np.int64))
    faiss.write_index(coder, str(path / dense_passage_file(6)))
    rewrite_manifest(path, lambda data: data["files"].pop(dense_passage_file(6)))  # not checked by a checksum
    with pytest.raises(NPMIndexError, match="passage vectors, but the index cuts"):
        DensePassageRetriever(NPMIndex.load(path), 6)


def test_an_index_without_vectors_stores_means_of_the_exact_vectors(tmp_path, built, model_and_tokenizer, corpus,
                                                                    monkeypatch):
    coded = _build(model_and_tokenizer, corpus, tmp_path / "coded", faiss_factory="IVF2,SQ8,Refine(SQ4)",
                   vectors="none", dense_passages="blocks,6")
    assert coded.manifest.vector_dtype == "none" and coded.manifest.dense_passages == [None, 6]
    _forbid_averaging(monkeypatch)
    exact = NPMIndex.load(built)  # the same corpus and encoder with float16 vectors: the exact means
    retriever = DensePassageRetriever(coded, 6)
    np.testing.assert_allclose(retriever.embeddings.numpy(), _oracle(exact, retriever.ranges), atol=STORED_TOLERANCE)
