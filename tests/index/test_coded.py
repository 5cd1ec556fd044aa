"""Indexes without float16 vectors (`IndexBuildArguments(vectors="none")`): candidates re-scored from refine codes.

The oracle: a refine stage of float16 codes (`Refine(SQfp16)`) decodes to exactly the float16 vectors an index with
vectors keeps, so such an index must answer exactly like the float16 index of the same first stage."""

import json
import logging
import shutil

import numpy as np
import pytest

import npm_hf
from npm_hf import IndexBuildArguments, NonparametricFillMaskPipeline, NPMIndex
from npm_hf.inference.vector_codes import CODEC_FILE, CODES_FILE, CodedVectors, split_refine


BASE = "IVF2,SQ8"
NEW = {"id": "zorb", "title": "Borvin", "text": "Borvin lives in Saltoria. Saltoria is cold."}


def _build(model_and_tokenizer, corpus, path, **kwargs):
    return NPMIndex.build(*model_and_tokenizer, corpus, path,
                          IndexBuildArguments(block_size=16, show_progress_bar=False, **kwargs))


@pytest.fixture
def pair(tmp_path, model_and_tokenizer, corpus):
    """(float16 index with first stage BASE, vectors="none" index of BASE refined by exact float16 codes)."""
    with_vectors = _build(model_and_tokenizer, corpus, tmp_path / "float16", faiss_factory=BASE)
    coded = _build(model_and_tokenizer, corpus, tmp_path / "coded", faiss_factory=f"{BASE},Refine(SQfp16)",
                   vectors="none")
    return with_vectors, coded


def _fill(index, model_and_tokenizer, **decoding):
    model, tokenizer = model_and_tokenizer
    return NonparametricFillMaskPipeline(model=model, tokenizer=tokenizer, index=index,
                                         decoding={"nprobe": 2, **decoding})


def test_split_refine():
    assert split_refine("IVF1024,PQ16np,Refine(SQ8)") == ("IVF1024,PQ16np", "SQ8")
    assert split_refine("OPQ16,IVF64,PQ16np,Refine(OPQ32,PQ32)") == ("OPQ16,IVF64,PQ16np", "OPQ32,PQ32")
    assert split_refine("IVF64,PQ16np") == ("IVF64,PQ16np", None)


def test_no_vector_file_is_written_and_codes_decode_to_the_vectors(pair):
    with_vectors, coded = pair
    files = set(coded.manifest.files)
    assert not [name for name in files if name.startswith("vectors")] and {CODES_FILE, CODEC_FILE} <= files
    m = coded.manifest
    assert m.vector_dtype == "none" and m.format_version == 3 and m.faiss_factory == f"{BASE},Refine(SQfp16)"
    assert m.vector_codes["code_size"] == 2 * m.hidden_size and m.vector_codes["top1_agreement"] == 1.0
    assert m.files[CODES_FILE]["bytes"] == 128 + m.num_indexed_tokens * 2 * m.hidden_size
    assert isinstance(coded.vectors, CodedVectors)
    np.testing.assert_array_equal(coded.vectors[:], np.asarray(with_vectors.vectors[:], dtype=np.float32))
    rows = np.array([[3, 0], [1, 1]])
    np.testing.assert_array_equal(coded.vectors[rows], np.asarray(with_vectors.vectors[rows], dtype=np.float32))


def test_exact_codes_answer_like_the_float16_index(pair, model_and_tokenizer, mask):
    with_vectors, coded = pair
    queries = np.asarray(with_vectors.vectors[::3], dtype=np.float32) * 0.9
    for k in (1, 5, 1000):
        got, want = coded.search(queries, k, nprobe=2), with_vectors.search(queries, k, nprobe=2)
        np.testing.assert_array_equal(got[1], want[1])
        np.testing.assert_allclose(got[0], want[0], rtol=1e-6)
    for mode in ("span", "single"):
        model_and_tokenizer[0].config.mode = mode
        try:
            for text in (f"The capital of Texas is {mask}.", f"{mask} is a desert.", f"Hot and dry {mask} ."):
                got = _fill(coded, model_and_tokenizer)(text, top_k=5)
                want = _fill(with_vectors, model_and_tokenizer)(text, top_k=5)
                assert [(a["token_str"], a["evidence"]) for a in got] == [(a["token_str"], a["evidence"]) for a in want]
                np.testing.assert_allclose([a["score"] for a in got], [a["score"] for a in want], rtol=1e-5)
        finally:
            model_and_tokenizer[0].config.mode = "span"


def test_pre_filters_work_without_vectors(pair, model_and_tokenizer, mask):
    with_vectors, coded = pair
    text = f"The capital of Texas is {mask}."
    for prefilter in ("bm25", "dense"):
        got = _fill(coded, model_and_tokenizer, prefilter=prefilter, prefilter_blocks=2)(text, top_k=5)
        want = _fill(with_vectors, model_and_tokenizer, prefilter=prefilter, prefilter_blocks=2)(text, top_k=5)
        assert [a["token_str"] for a in got] == [a["token_str"] for a in want]


def test_sq8_codes_keep_the_nearest_token(tmp_path, model_and_tokenizer, corpus):
    exact = _build(model_and_tokenizer, corpus, tmp_path / "exact")
    coded = _build(model_and_tokenizer, corpus, tmp_path / "sq8", faiss_factory="IVF2,SQ8,Refine(SQ8)", vectors="none")
    m = coded.manifest
    assert m.vector_codes["code_size"] == m.hidden_size  # 1 byte per dimension
    assert 0.75 <= m.vector_codes["top1_agreement"] <= 1.0  # the tiny encoder's vectors nearly tie (norms ~ equal)
    queries = np.asarray(exact.vectors[:], dtype=np.float32)
    got, want = coded.search(queries, 1, nprobe=2), exact.search(queries, 1)
    exact_scores_of_got = np.einsum("qd,qd->q", queries, np.asarray(exact.vectors[got[1][:, 0]], dtype=np.float32))
    assert np.mean(exact_scores_of_got >= want[0][:, 0] - 1e-4) >= 0.75
    assert (exact_scores_of_got >= want[0][:, 0] * (1 - 1e-3)).all()  # a miss is a near-tie, within SQ8's error
    np.testing.assert_allclose(got[0][:, 0], exact_scores_of_got, rtol=0.05, atol=0.05)  # approximate scores


def test_edits_without_vectors(pair, model_and_tokenizer, mask):
    with_vectors, coded = pair
    for index in pair:
        index.add_documents(*model_and_tokenizer, [NEW])
    query = f"Borvin lives in {mask}."
    answers = [_fill(index, model_and_tokenizer)(query, targets=["Saltoria"])[0] for index in pair]
    assert answers[1]["evidence"]["doc_id"] == "zorb" and answers[0]["evidence"] == answers[1]["evidence"]
    for index in pair:
        index.delete_documents(["zorb", "texas"])
    reloaded = NPMIndex.load(coded.path, verify="full")
    assert reloaded.num_indexed == with_vectors.num_indexed and reloaded.faiss_index.ntotal == reloaded.num_indexed
    np.testing.assert_array_equal(reloaded.vectors[:], np.asarray(with_vectors.vectors[:], dtype=np.float32))
    docs = {a["evidence"]["doc_id"] for a in _fill(reloaded, model_and_tokenizer)(query, top_k=10_000)
            if a["evidence"]}
    assert not docs & {"zorb", "texas"}


def test_codes_are_sharded_like_vectors(tmp_path, model_and_tokenizer, corpus):
    coded = _build(model_and_tokenizer, corpus, tmp_path / "sharded", faiss_factory=f"{BASE},Refine(SQ8)",
                   vectors="none", max_shard_size=2000)
    shards = [s["file"] for s in coded.manifest.vector_shards]
    assert len(shards) >= 2 and shards[0] == f"vector_codes-00000-of-{len(shards):05d}.npy"
    single = _build(model_and_tokenizer, corpus, tmp_path / "single", faiss_factory=f"{BASE},Refine(SQ8)",
                    vectors="none")
    np.testing.assert_array_equal(NPMIndex.load(coded.path).vectors[:], single.vectors[:])


def test_bad_factories_for_no_vectors(caplog):
    with pytest.raises(ValueError, match=r"Flat first stage .* Use .*'IVF1024,PQ16np,Refine\(SQ8\)'"):
        IndexBuildArguments(faiss_factory="Flat", vectors="none")
    with pytest.raises(ValueError, match="use 'float16' or 'none'"):
        IndexBuildArguments(vectors="int8")
    with caplog.at_level(logging.WARNING, logger="npm_hf"):
        IndexBuildArguments(faiss_factory="IVF64,PQ16np", vectors="none")
    assert "has no refine stage" in caplog.text and "Refine(SQ8)" in caplog.text


def test_auto_without_vectors_picks_a_refined_factory(tmp_path, model_and_tokenizer, corpus):
    coded = _build(model_and_tokenizer, corpus, tmp_path / "auto", faiss_factory="auto", vectors="none")
    assert split_refine(coded.manifest.faiss_factory)[1] == "SQ8"


def test_card_reports_the_agreement_measured_against_the_vectors(tmp_path, npm_dir, corpus):
    shutil.copytree(npm_dir, tmp_path / "npm", ignore=shutil.ignore_patterns("index"))
    npm_hf.build_index(tmp_path / "npm", corpus, args=IndexBuildArguments(
        block_size=16, faiss_factory=f"{BASE},Refine(SQfp16)", vectors="none", show_progress_bar=False))
    m = NPMIndex.load(tmp_path / "npm" / "index").manifest
    per_token = round(sum(entry["bytes"] for entry in m.files.values()) / m.num_indexed_tokens, 1)
    text = (tmp_path / "npm" / "README.md").read_text()
    assert (f"| {BASE},Refine(SQfp16) (inner product) | approximate, top-1 agreement with exact search 1.0 (64 stored "
            "vectors as queries, k=4096, nprobe=1, against the float16 vectors) | " f"{per_token} |") in text
    facts = json.loads((tmp_path / "npm" / "npm_card.json").read_text())["index"]
    assert facts["top1_agreement"] == m.vector_codes["top1_agreement"] == 1.0
