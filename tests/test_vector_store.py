"""The Qdrant adapter (npm_hf.vector_store) in qdrant-client's local mode: same answers as the FAISS default with
k >= N, NPMIndex.search's contract, refusal of a collection of another index, and the missing-package error."""

import sys

import numpy as np
import pytest
from transformers import AutoTokenizer

import npm_hf
from npm_hf import NPMIndex, NPMIndexError, NPMModel
from npm_hf.inference.pipeline import NonparametricFillMaskPipeline
from npm_hf.vector_store import QdrantSearchIndex, collection_name_for, upload_index


try:  # the dev extra installs it; without it only the missing-package test runs
    import qdrant_client
    from qdrant_client import models
except ImportError:
    qdrant_client = models = None
needs_qdrant = pytest.mark.skipif(qdrant_client is None, reason="qdrant-client is not installed (extra 'qdrant')")


pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # the local mode warns about large collections


@pytest.fixture
def index(npm_dir):
    return NPMIndex.load(npm_dir / "index")


@pytest.fixture
def client():
    if qdrant_client is None:
        pytest.skip("qdrant-client is not installed (extra 'qdrant')")
    client = qdrant_client.QdrantClient(":memory:")
    yield client
    client.close()


@pytest.fixture
def wrapped(index, client):
    upload_index(index, client, batch_size=7, show_progress_bar=False)  # several batches, a partial last one
    return QdrantSearchIndex(index, client)


def _queries(index, count=5):
    rng = np.random.default_rng(0)
    return rng.standard_normal((count, index.manifest.hidden_size)).astype(np.float32)


def _pipelines(npm_dir, index, wrapped, mode):
    model = NPMModel.from_pretrained(npm_dir)
    model.config.mode = mode
    tokenizer = AutoTokenizer.from_pretrained(npm_dir)
    return (NonparametricFillMaskPipeline(model, tokenizer, index=index),
            NonparametricFillMaskPipeline(model, tokenizer, index=wrapped))


# ---------------------------------------------------------------------------------------------- answers
@pytest.mark.parametrize("mode", ["span", "single"])
def test_same_answers_as_faiss_with_k_at_least_n(npm_dir, mask, index, wrapped, mode):
    faiss_fill, qdrant_fill = _pipelines(npm_dir, index, wrapped, mode)
    assert faiss_fill.decoding.k >= index.num_indexed  # k >= N: both see every token, so both are exact
    texts = [f"Abraham Lincoln was born in {mask}, Kentucky.", f"Hagios Demetrios is located in {mask}.",
             f"{mask} borders {mask}."]
    for text in texts:
        want, got = faiss_fill(text, top_k=6), qdrant_fill(text, top_k=6)
        want, got = (want if isinstance(want[0], list) else [want]), (got if isinstance(got[0], list) else [got])
        for got_mask, want_mask in zip(got, want):
            assert [(a["token_str"], a["sequence"], a.get("evidence")) for a in got_mask] == \
                [(a["token_str"], a["sequence"], a.get("evidence")) for a in want_mask]
            assert [a["score"] for a in got_mask] == pytest.approx([a["score"] for a in want_mask], abs=1e-6)
    batched = qdrant_fill(texts[:2], top_k=3, batch_size=2)  # many query vectors in one query_batch_points call
    assert [[a["token_str"] for a in answers] for answers in batched] == \
        [[a["token_str"] for a in faiss_fill(text, top_k=3)] for text in texts[:2]]


def test_batched_calls_search_the_collection(npm_dir, mask, index, client, wrapped, monkeypatch):
    requests = []
    real_query = client.query_batch_points
    monkeypatch.setattr(client, "query_batch_points", lambda name, batch, **kwargs: requests.append(len(batch)) or
                        real_query(name, batch, **kwargs))
    _, qdrant_fill = _pipelines(npm_dir, index, wrapped, "span")
    qdrant_fill([f"Texas borders {mask}.", f"{mask} borders {mask}.", f"Ohio is {mask}."], top_k=2, batch_size=3)
    assert requests == [8]  # every query vector of the batch (2 per answer), not the wrapped index's FAISS search


def test_small_k_finds_the_exact_top_k(index, wrapped):
    queries = _queries(index)
    want_scores, want_rows = index.search(queries, 4)
    scores, rows = wrapped.search(queries, 4)
    np.testing.assert_array_equal(rows, want_rows)
    np.testing.assert_allclose(scores, want_scores, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------- contract
def test_search_contract(index, wrapped):
    queries = _queries(index)
    n = index.num_indexed
    exact = queries @ np.asarray(index.vectors, dtype=np.float32).T
    scores, rows = wrapped.search(queries, n + 10)  # k above N: shape (queries, N), no padding
    assert scores.shape == rows.shape == (len(queries), n)
    assert rows.dtype == np.int64 and scores.dtype == np.float32
    for q in range(len(queries)):
        assert sorted(rows[q]) == list(range(n))  # every row once
        np.testing.assert_allclose(scores[q], exact[q, rows[q]], rtol=1e-5, atol=1e-5)  # exact re-scoring
    assert (np.diff(scores, axis=1) <= 0).all()  # best first
    with pytest.raises(ValueError, match=r"queries must have shape \(num_queries, \d+\).*queries\[None, :\]"):
        wrapped.search(queries[0], 3)


def test_candidates_are_rescored_exactly_and_reordered(index, client, wrapped, monkeypatch):
    real_query = client.query_batch_points

    def shuffled(*args, **kwargs):  # as a quantized cluster may: approximate scores, another order
        responses = real_query(*args, **kwargs)
        for response in responses:
            response.points = [p.model_copy(update={"score": 0.0}) for p in response.points[::-1]]
        return responses

    monkeypatch.setattr(client, "query_batch_points", shuffled)
    queries = _queries(index)
    want_scores, want_rows = index.search(queries, index.num_indexed)
    scores, rows = wrapped.search(queries, index.num_indexed)
    np.testing.assert_array_equal(rows, want_rows)
    np.testing.assert_allclose(scores, want_scores, rtol=1e-5, atol=1e-5)


def test_rows_qdrant_does_not_return_are_padded(index, client, wrapped):
    gone = [0, 1, 2]
    client.delete(wrapped.collection_name, points_selector=models.PointIdsList(points=gone))
    scores, rows = wrapped.search(_queries(index, 2), index.num_indexed)
    assert rows.shape == (2, index.num_indexed)
    assert (rows[:, -3:] == -1).all() and np.isneginf(scores[:, -3:]).all()  # missing ones last
    assert not np.isin(rows[:, :-3], gone).any() and np.isfinite(scores[:, :-3]).all()


def test_other_attributes_come_from_the_wrapped_index(index, wrapped):
    assert wrapped.positions is index.positions and wrapped.token_ids is index.token_ids
    assert wrapped.num_indexed == index.num_indexed and wrapped.block_size == index.block_size
    assert wrapped.evidence(0, 0) == index.evidence(0, 0)
    assert "QdrantSearchIndex" in repr(wrapped)


def test_search_knobs(index, wrapped):
    with pytest.raises(ValueError, match="nprobe applies to FAISS IVF indexes.*use ef_search"):
        wrapped.search(_queries(index, 1), 3, nprobe=2)
    for bad in (0, True, 2.5):
        with pytest.raises(ValueError, match="ef_search must be a positive integer"):
            wrapped.search(_queries(index, 1), 3, ef_search=bad)
    assert wrapped.search(_queries(index, 1), 3, ef_search=64)[1].shape == (1, 3)  # Qdrant's hnsw_ef


# ------------------------------------------------------------------------------------------- collections
def test_upload_names_the_collection_after_the_index_and_is_idempotent(index, client, wrapped, caplog):
    name = wrapped.collection_name
    assert name == collection_name_for(index) and name.startswith("npm-")
    assert client.count(name).count == index.num_indexed
    point = client.retrieve(name, [5], with_vectors=True)[0]
    np.testing.assert_array_equal(np.asarray(point.vector, dtype=np.float32), index.vectors_for_rows([5])[0])
    assert upload_index(index, client, show_progress_bar=False) == name  # complete already: nothing to do
    params = client.get_collection(name).config.params.vectors
    assert params.distance == models.Distance.DOT and params.size == index.manifest.hidden_size


def test_vector_settings_reach_the_collection(index, client):
    name = upload_index(index, client, collection_name="half", on_disk=True, datatype=models.Datatype.FLOAT16,
                        show_progress_bar=False)
    params = client.get_collection(name).config.params.vectors
    assert params.on_disk is True and params.datatype == models.Datatype.FLOAT16


def test_a_collection_of_another_index_is_refused(tmp_path, npm_dir, index, client, wrapped, corpus):
    model, tokenizer = npm_hf.load_npm(npm_dir)
    other = NPMIndex.build(model, tokenizer, corpus[:2], tmp_path / "other",
                           npm_hf.IndexBuildArguments(block_size=16, show_progress_bar=False))
    with pytest.raises(NPMIndexError, match="was built from another index"):
        QdrantSearchIndex(other, client, collection_name=wrapped.collection_name)
    with pytest.raises(NPMIndexError, match="already holds vectors of another index.*overwrite=True"):
        upload_index(other, client, collection_name=wrapped.collection_name, show_progress_bar=False)
    with pytest.raises(NPMIndexError, match="does not exist.*upload_index"):
        QdrantSearchIndex(other, client)
    upload_index(other, client, collection_name=wrapped.collection_name, overwrite=True, show_progress_bar=False)
    assert QdrantSearchIndex(other, client, collection_name=wrapped.collection_name).num_indexed == other.num_indexed


def test_an_unfinished_upload_is_refused_then_completed(index, client, monkeypatch):
    calls = []
    real_upsert = client.upsert

    def failing_upsert(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise ConnectionError("lost the server")
        return real_upsert(*args, **kwargs)

    monkeypatch.setattr(client, "upsert", failing_upsert)
    with pytest.raises(ConnectionError):
        upload_index(index, client, batch_size=10, show_progress_bar=False)
    with pytest.raises(NPMIndexError, match=f"holds 10 of the index's {index.num_indexed} vectors.*again"):
        QdrantSearchIndex(index, client)
    upload_index(index, client, batch_size=10, show_progress_bar=False)  # resumes: upserts by row are idempotent
    assert QdrantSearchIndex(index, client).search(_queries(index, 1), 2)[1].shape == (1, 2)


def test_a_foreign_collection_is_refused(index, client):
    client.create_collection("plain", vectors_config=models.VectorParams(size=index.manifest.hidden_size,
                                                                         distance=models.Distance.DOT))
    with pytest.raises(NPMIndexError, match="has no npm_hf metadata"):
        QdrantSearchIndex(index, client, collection_name="plain")


def test_an_edited_index_needs_a_new_upload(npm_dir, tmp_path, client):
    import shutil

    shutil.copytree(npm_dir / "index", tmp_path / "index")
    index = NPMIndex.load(tmp_path / "index")
    upload_index(index, client, show_progress_bar=False)
    wrapped = QdrantSearchIndex(index, client)
    wrapped.delete_documents(["texas"])  # delegated to the index, which changes on disk and in memory
    with pytest.raises(NPMIndexError, match="changed.*upload it again"):
        wrapped.search(_queries(index, 1), 2)


@needs_qdrant
def test_local_persistent_mode(index, tmp_path):
    client = qdrant_client.QdrantClient(path=str(tmp_path / "qdrant"))
    upload_index(index, client, show_progress_bar=False)
    client.close()
    client = qdrant_client.QdrantClient(path=str(tmp_path / "qdrant"))  # reopened from disk
    scores, rows = QdrantSearchIndex(index, client).search(_queries(index, 2), 3)
    np.testing.assert_array_equal(rows, index.search(_queries(index, 2), 3)[1])
    client.close()


# ---------------------------------------------------------------------------------------------- packaging
def test_missing_qdrant_client_is_a_clear_error(index, monkeypatch):
    monkeypatch.setitem(sys.modules, "qdrant_client", None)  # makes `import qdrant_client` raise ImportError
    with pytest.raises(ImportError, match=r"pip install 'npm-hf\[qdrant\]'"):
        QdrantSearchIndex(index, client=None)
    with pytest.raises(ImportError, match=r"pip install 'npm-hf\[qdrant\]'"):
        upload_index(index, client=None)
