"""Approximate FAISS indexes: search knobs (nprobe, efSearch), training-size checks, factory choice."""

import os

import faiss
import numpy as np
import pytest
from transformers import pipeline

from npm_hf import IndexBuildArguments, NPMIndex, NPMIndexError
from npm_hf.cli import main
from npm_hf.index import faiss_training_minimum, parse_memory_size, suggest_faiss_factory
from npm_hf.inference.decoding import NPMDecodingConfig


QUIET = dict(show_progress_bar=False, block_size=16)


@pytest.fixture
def build(tmp_path, model_and_tokenizer, corpus):
    def build(factory, **kwargs):
        model, tokenizer = model_and_tokenizer
        return NPMIndex.build(model, tokenizer, corpus, tmp_path / factory,
                              IndexBuildArguments(faiss_factory=factory, **QUIET, **kwargs))

    return build


def _all_rows(index):
    return np.asarray(index.vectors[::7], dtype=np.float32)


# ------------------------------------------------------------------------------------------------ nprobe
def test_nprobe_is_applied_per_call_and_reset(build):
    index = build("IVF4,Flat")
    ivf = faiss.extract_index_ivf(index.faiss_index)
    assert ivf.nlist == 4 and ivf.nprobe == 1  # FAISS's default
    queries = _all_rows(index)
    found_one = (index.search(queries, index.num_indexed, nprobe=1)[1] >= 0).sum(axis=1)
    scores, rows = index.search(queries, index.num_indexed, nprobe=4)
    assert ivf.nprobe == 4
    assert (rows >= 0).all()  # every list visited: all vectors found, as exact search would
    assert (found_one < index.num_indexed).all()  # one list holds only part of the vectors
    exact = np.asarray(index.vectors, dtype=np.float32) @ queries.T
    np.testing.assert_allclose(scores, -np.sort(-exact.T, axis=1), rtol=1e-5, atol=1e-5)
    index.search(queries, 5)
    assert ivf.nprobe == 1  # a call without nprobe gets FAISS's default back


def test_nprobe_errors(build):
    index = build("IVF4,Flat")
    query = _all_rows(index)[:1]
    with pytest.raises(ValueError, match=r"nprobe=5 is more than the 4 IVF lists \(nlist\).*nprobe <= 4"):
        index.search(query, 3, nprobe=5)
    for bad in (0, -1, True, 2.5):
        with pytest.raises(ValueError, match="nprobe must be a positive integer"):
            index.search(query, 3, nprobe=bad)
    with pytest.raises(ValueError, match="efSearch applies to HNSW indexes.*'IVF4,Flat'"):
        index.search(query, 3, ef_search=32)


@pytest.mark.parametrize("factory", ["Flat", "HNSW8"])
def test_nprobe_on_a_non_ivf_index(build, factory):
    index = build(factory)
    with pytest.raises(ValueError, match=f"nprobe applies to IVF indexes.*'{factory}'.*no inverted lists"):
        index.search(_all_rows(index)[:1], 3, nprobe=2)


# --------------------------------------------------------------------------------------------- efSearch
def test_ef_search_is_applied_to_hnsw(build):
    index = build("HNSW8")
    hnsw = faiss.downcast_index(index.faiss_index).hnsw
    default = hnsw.efSearch
    queries = _all_rows(index)
    _, rows = index.search(queries, 4, ef_search=200)
    assert hnsw.efSearch == 200 and (rows >= 0).all()
    index.search(queries, 4)
    assert hnsw.efSearch == default
    with pytest.raises(ValueError, match="efSearch applies to HNSW indexes.*'Flat'"):
        build("Flat").search(queries[:1], 3, ef_search=16)


def test_ef_search_of_an_hnsw_quantizer(build):
    index = build("IVF4_HNSW8,Flat")
    index.search(_all_rows(index), 4, ef_search=77, nprobe=2)
    ivf = faiss.extract_index_ivf(index.faiss_index)
    assert faiss.downcast_index(ivf.quantizer).hnsw.efSearch == 77 and ivf.nprobe == 2


# --------------------------------------------------------------------------------------- config, pipeline
def test_decoding_knobs_are_validated():
    NPMDecodingConfig(nprobe=8, ef_search=64)
    with pytest.raises(ValueError, match="NPMDecodingConfig.nprobe must be a positive integer or None, got 0"):
        NPMDecodingConfig(nprobe=0)
    with pytest.raises(ValueError, match="NPMDecodingConfig.ef_search must be a positive integer or None"):
        NPMDecodingConfig(ef_search=-3)


def test_pipeline_knobs_from_config_constructor_and_call(build, model_and_tokenizer, mask):
    model, tokenizer = model_and_tokenizer
    index = build("IVF4,Flat")
    ivf = faiss.extract_index_ivf(index.faiss_index)
    fill = pipeline("fill-mask", model=model, tokenizer=tokenizer, index=index, decoding={"nprobe": 2})
    fill(f"Texas borders {mask}.")
    assert ivf.nprobe == 2  # the pipeline's settings
    fill(f"Texas borders {mask}.", nprobe=3)
    assert ivf.nprobe == 3  # call beats them
    fill = pipeline("fill-mask", model=model, tokenizer=tokenizer, index=index, decoding={"nprobe": 2}, nprobe=4)
    fill(f"Texas borders {mask}.")
    assert ivf.nprobe == 4  # a constructor keyword beats decoding=
    with pytest.raises(ValueError, match="nprobe=9 is more than the 4 IVF lists"):
        fill(f"Texas borders {mask}.", nprobe=9)
    with pytest.raises(ValueError, match="ef_search must be a positive integer"):
        fill(f"Texas borders {mask}.", ef_search=0)


def test_pipeline_refuses_a_knob_its_index_lacks(npm_dir, mask):
    with pytest.raises(ValueError, match="nprobe applies to IVF indexes.*'Flat'"):
        pipeline("fill-mask", model=str(npm_dir), nprobe=4)
    with pytest.raises(ValueError, match="efSearch applies to HNSW indexes"):
        pipeline("fill-mask", model=str(npm_dir), decoding={"ef_search": 32})


def test_cli_fill_mask_knobs(build, npm_dir, mask, capsys):
    index = build("IVF4,Flat")
    argv = ["fill-mask", "--model", str(npm_dir), "--index", str(index.path), "--top-k", "1", "--json"]
    assert main([*argv, "--nprobe", "4", f"Texas borders {mask}."]) == 0
    assert capsys.readouterr().out.strip().startswith("[")
    assert main([*argv, "--nprobe", "99", f"Texas borders {mask}."]) == 2
    assert "nprobe=99 is more than the 4 IVF lists" in capsys.readouterr().err
    assert main(["fill-mask", "--model", str(npm_dir), "--ef-search", "8", f"Texas borders {mask}."]) == 2
    assert "efSearch applies to HNSW indexes" in capsys.readouterr().err


# ------------------------------------------------------------------------------------ training checks
@pytest.mark.parametrize("factory, minimum, what", [
    ("IVF512,Flat", 512, "IVF512"),
    ("IVF4,PQ8", 256, r"PQ8x8: 256 centroids"),
    ("PQ4", 256, "PQ4x8"),
])
def test_too_few_vectors_to_train_fails_before_encoding(tmp_path, model_and_tokenizer, corpus, monkeypatch,
                                                        factory, minimum, what):
    model, tokenizer = model_and_tokenizer

    def no_encoding(*args, **kwargs):
        raise AssertionError("the training-size check must come before encoding")

    monkeypatch.setattr(model, "forward", no_encoding)
    with pytest.raises(NPMIndexError, match=rf"'{factory}' needs at least {minimum} training vectors \({what}.*"
                                            r"only \d+ are available.*'Flat'"):
        NPMIndex.build(model, tokenizer, corpus, tmp_path / "i", IndexBuildArguments(faiss_factory=factory, **QUIET))
    assert os.listdir(tmp_path) == []


def test_train_sample_size_can_be_the_limit(build):
    with pytest.raises(NPMIndexError, match=r"at least 4 training vectors .* only 3 are available "
                                            r"\(train_sample_size=3\)"):
        build("IVF4,Flat", train_sample_size=3)


def test_few_training_vectors_warn(build, caplog):
    from transformers.utils import logging as hf_logging

    hf_logging.enable_propagation()
    try:
        with caplog.at_level("WARNING"):
            index = build("IVF4,Flat", train_sample_size=100)
    finally:
        hf_logging.disable_propagation()
    assert "on 100 vectors (train_sample_size=100); IVF4: one k-means centroid per list trains well from 156" \
        in caplog.text
    assert index.faiss_index.ntotal == index.num_indexed  # a warning, not an error


@pytest.mark.parametrize("factory, expected", [
    ("Flat", (0, 0)), ("HNSW32", (0, 0)), ("IVF100,SQ8", (100, 3900)), ("IVF16,PQ8", (256, 9984)),
    ("OPQ8,IVF16,PQ8", (256, 9984)), ("IVF1024_HNSW32,Flat", (1024, 39936)), ("HNSW16_PQ8", (256, 9984)),
    ("IVF64,PQ8x4fs", (64, 2496)), ("SQ8", (1, 1)),
])
def test_training_minimum_of_factories(factory, expected):
    index = faiss.index_factory(64, factory, faiss.METRIC_INNER_PRODUCT)
    assert faiss_training_minimum(index)[:2] == expected


def test_invalid_factory_string_is_refused_before_work(tmp_path, model_and_tokenizer, monkeypatch):
    model, tokenizer = model_and_tokenizer

    def no_tokenizing(*args, **kwargs):
        raise AssertionError("the factory must be checked before the corpus is read")

    monkeypatch.setattr("npm_hf.index.build.write_corpus", no_tokenizing)
    with pytest.raises(ValueError, match="Invalid FAISS factory string 'IVF,,PQ'"):
        NPMIndex.build(model, tokenizer, ["Texas."], tmp_path / "i",
                       IndexBuildArguments(faiss_factory="IVF,,PQ", **QUIET))
    assert os.listdir(tmp_path) == []


# --------------------------------------------------------------------------------------- factory choice
@pytest.mark.parametrize("num_vectors, hidden, budget, expected", [
    (1, 384, None, "Flat"),
    (1_000_000, 384, None, "Flat"),
    (1_000_001, 384, None, "IVF4096,SQ8"),
    (10_000_000, 384, None, "IVF16384,SQ8"),
    (10_000_000, 384, parse_memory_size("2GB"), "IVF16384,PQ64np"),
    (10_000_000, 384, parse_memory_size("500MB"), "IVF16384,PQ32np"),
    (100_000, 384, parse_memory_size("100MB"), "IVF1024,SQ8"),  # Flat would need 153.6 MB
    (100_000, 384, parse_memory_size("10MB"), "IVF1024,PQ64np"),
    (200_000_000, 1024, parse_memory_size("16GB"), "IVF65536,PQ64np"),
    (5_000, 384, parse_memory_size("3MB"), "IVF128,SQ8"),  # too few vectors to train PQ well
])
def test_suggested_factories(num_vectors, hidden, budget, expected):
    factory = suggest_faiss_factory(num_vectors, hidden, budget)
    assert factory == expected
    faiss.index_factory(hidden, factory, faiss.METRIC_INNER_PRODUCT)  # FAISS accepts it
    if factory != "Flat":  # and it can be trained on that many vectors
        minimum, recommended, _ = faiss_training_minimum(faiss.index_factory(hidden, factory))
        assert recommended <= num_vectors
    if budget is not None and factory == "Flat":
        assert 4 * hidden * num_vectors <= budget


def test_no_factory_fits_a_tiny_budget():
    with pytest.raises(ValueError, match="No FAISS index over 100 vectors.*raise the budget"):
        suggest_faiss_factory(100, 384, 1000)
    with pytest.raises(ValueError, match="No FAISS index over 10000000 vectors"):
        suggest_faiss_factory(10_000_000, 384, parse_memory_size("10MB"))


@pytest.mark.parametrize("text, size", [("2GB", 2 * 10**9), ("512MiB", 512 * 2**20), ("1.5g", 1_500_000_000),
                                        ("1000", 1000), (" 3 kb ", 3000)])
def test_memory_sizes(text, size):
    assert parse_memory_size(text) == size


@pytest.mark.parametrize("text", ["lots", "2 parsecs", "-1GB", "0"])
def test_bad_memory_sizes(text):
    with pytest.raises(ValueError, match="Cannot read the memory size"):
        parse_memory_size(text)


def test_max_memory_is_checked_early():
    assert IndexBuildArguments(max_memory="2GB").max_memory == "2GB"  # any factory takes a budget
    with pytest.raises(ValueError, match="Cannot read the memory size 'much'"):
        IndexBuildArguments(faiss_factory="auto", max_memory="much")


def test_auto_factory_from_the_cli(tmp_path, npm_dir, capsys):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("Texas borders New Mexico.\nLincoln was born in Kentucky.\n", encoding="utf-8")
    argv = ["build-index", "--model", str(npm_dir), "--corpus", str(corpus), "--no-show-progress-bar",
            "--block-size", "16", "--faiss-factory", "auto"]
    assert main([*argv, "--output", str(tmp_path / "a"), "--max-memory", "64GB"]) == 0
    assert NPMIndex.load(tmp_path / "a").manifest.faiss_factory == "Flat"
    assert main([*argv, "--output", str(tmp_path / "b"), "--max-memory", "100"]) == 2
    assert "max_memory=100 is less than encoding alone needs" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()


# ---------------------------------------------------------------------------------------------- batches
BLAS_SETTINGS = ("distance_compute_blas_threshold", "distance_compute_blas_query_bs",
                 "distance_compute_blas_database_bs")


def test_search_many_finds_the_exact_top_k_and_restores_faiss_settings(build):
    index = build("Flat")
    queries = np.asarray(index.vectors[:40], dtype=np.float32)  # enough queries for FAISS's matrix-product search
    before = [getattr(faiss.cvar, name) for name in BLAS_SETTINGS]
    scores, rows = index.search_many(queries, 50)
    assert [getattr(faiss.cvar, name) for name in BLAS_SETTINGS] == before
    exact = queries.astype(np.float64) @ np.asarray(index.vectors, dtype=np.float64).T
    np.testing.assert_allclose(scores, np.take_along_axis(exact, rows, axis=1), rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(scores, -np.sort(-exact, axis=1)[:, :50], rtol=1e-5, atol=1e-4)
    want_scores, want_rows = index.search(queries, 50)
    np.testing.assert_allclose(scores, want_scores, rtol=1e-5, atol=1e-4)
    assert (rows[:, 0] == want_rows[:, 0]).all()


def test_search_many_of_an_approximate_index_is_search(build):
    index = build("IVF4,Flat")
    queries = _all_rows(index)
    for got, want in zip(index.search_many(queries, 30, nprobe=2), index.search(queries, 30, nprobe=2)):
        np.testing.assert_array_equal(got, want)


def test_spans_from_a_shared_search_of_an_approximate_index(build, model_and_tokenizer):
    """nprobe=1 leaves rows unfilled (-1), so the pairs of a batch have different numbers of candidates."""
    from npm_hf.inference.retrieval import Candidates, NPMPredictor

    index = build("IVF4,Flat")
    model, tokenizer = model_and_tokenizer
    predictor = NPMPredictor(model.config, tokenizer, index)
    pairs = _all_rows(index)[:12].reshape(6, 2, -1)
    assert (index.search(pairs.reshape(12, -1), index.num_indexed, nprobe=1)[1] < 0).any()
    for nprobe in (1, 4):
        scores, rows = index.search_many(pairs.reshape(12, -1), index.num_indexed, nprobe=nprobe)
        shared = [predictor.predict_span(pair[0], pair[1], 20, Candidates.whole_index((scores[2 * i : 2 * i + 2],
                                                                                       rows[2 * i : 2 * i + 2])))
                  for i, pair in enumerate(pairs)]
        exact = predictor.using(k=index.num_indexed, nprobe=nprobe)
        alone = [exact.predict_span(pair[0], pair[1], 20) for pair in pairs]
        assert shared == alone and sum(len(answers) for answers in alone) > 20
