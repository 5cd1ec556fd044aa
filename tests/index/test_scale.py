"""Larger-than-RAM indexes: the build's memory budget, token records streamed to disk, memory-mapped FAISS files,
and exact search streamed over memory-mapped vectors."""

import io
import os
import subprocess
import sys
from pathlib import Path

import faiss
import numpy as np
import pytest

import npm_hf.index.memory as memory_module
import npm_hf.inference.faiss_io as faiss_io
import npm_hf.inference.reader as reader_module
from npm_hf import IndexBuildArguments, NPMIndex
from npm_hf.corpus import CorpusStats, iter_documents, tokenize_documents
from npm_hf.index import parse_memory_size, read_faiss_index, streamed_exact_search
from npm_hf.index.faiss_build import load_lists_into_memory
from npm_hf.index.memory import BuildMemoryPlan, encoding_peak_bytes, faiss_memory_bytes, process_resident_bytes
from npm_hf.index.writing import write_positions


QUIET = dict(show_progress_bar=False, block_size=16)


def _budget_above_the_process(extra: int) -> str:
    return str(process_resident_bytes() + extra)


# ------------------------------------------------------------------------------------ streamed token records
def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def test_streamed_token_files_equal_np_save_of_the_whole_corpus(tmp_path, model_and_tokenizer, corpus):
    model, tokenizer = model_and_tokenizer
    documents = [*corpus, "   ", "A last document about Kentucky."]
    index = NPMIndex.build(model, tokenizer, documents, tmp_path / "index", IndexBuildArguments(**QUIET))
    # what the files held when a build concatenated every record in memory and saved the arrays
    chunks = []
    for number, (_, records) in enumerate(tokenize_documents(iter_documents(documents), tokenizer, CorpusStats(),
                                                             block_size=16)):
        records["doc"] = number
        chunks.append(records)
    tokens = np.concatenate(chunks)
    expected = {
        "token_ids": tokens["id"], "token_flags": tokens["flags"], "token_docs": tokens["doc"],
        "token_offsets": np.stack([tokens["start"], tokens["end"]], axis=1),
        "positions": np.flatnonzero(((tokens["flags"] & 4) == 0) & ((tokens["flags"] & 3) != 0)).astype(np.int64),
    }
    # format 3 stores them compactly (tests/index/test_compact.py): what the index decodes is those arrays exactly
    for name, array in expected.items():
        np.testing.assert_array_equal(getattr(index, name), array, err_msg=name)
    assert (index.path / "token_flags.npy").read_bytes() == _npy_bytes(expected["token_flags"])
    assert not [name for name in os.listdir(index.path) if name.endswith(".raw")]


def test_positions_are_computed_chunk_by_chunk(tmp_path):
    flags = np.array([4, 0, 1, 4, 4, 2, 0, 4, 1, 3], dtype=np.uint8)
    ids = np.array([0, 5, 6, 0, 0, 7, 8, 0, 9, 7])
    stop = np.zeros(10, dtype=bool)
    stop[7] = True
    rules = [({"boundaries_only": True, "stopwords": None}, [2, 5, 8, 9]),
             ({"boundaries_only": False, "stopwords": None}, [1, 2, 5, 6, 8, 9]),
             ({"boundaries_only": True, "stopwords": stop}, [2, 8])]
    for rule, want in rules:
        for chunk in (1, 2, 4, 100):
            write_positions(tmp_path, ids, flags, rule, chunk=chunk)
            assert np.load(tmp_path / "positions.npy").tolist() == want


# ------------------------------------------------------------------------------------------ memory budget
def test_a_budget_below_encoding_is_refused_before_any_work(tmp_path, model_and_tokenizer, corpus):
    model, tokenizer = model_and_tokenizer
    with pytest.raises(ValueError, match=r"max_memory=100MB is less than encoding alone needs: .* already resident "
                                         r"\(interpreter, libraries, the model's .* of weights\).*at least"):
        NPMIndex.build(model, tokenizer, corpus, tmp_path / "index",
                       IndexBuildArguments(max_memory="100MB", faiss_factory="HNSW8", **QUIET))
    assert os.listdir(tmp_path) == []


def test_a_factory_that_cannot_fit_is_refused_naming_one_that_fits():
    plan = BuildMemoryPlan(budget=10**9, baseline=600 * 10**6, encoding=100 * 10**6, metadata=0,
                           num_vectors=1_000_000, hidden_size=384)
    flat = faiss.index_factory(384, "Flat", faiss.METRIC_INNER_PRODUCT)  # 1.5 GB once filled at load
    with pytest.raises(ValueError, match=r"'Flat' over 1000000 vectors needs about 1.7GB.*leaves 300.0MB.*"
                                         r"'IVF4096,PQ64np' fits"):
        plan.fit(flat, "Flat", IndexBuildArguments(**QUIET))
    ivf = faiss.index_factory(384, "IVF4096,PQ64np", faiss.METRIC_INNER_PRODUCT)
    args = plan.fit(ivf, "IVF4096,PQ64np", IndexBuildArguments(**QUIET))
    # 300 MB left at 10 bytes per dimension of each training vector: the million-vector sample is capped
    assert args.train_sample_size == 300 * 10**6 // (10 * 384) < 1_000_000


def test_training_sample_is_capped_with_a_warning(tmp_path, model_and_tokenizer, corpus, caplog, monkeypatch):
    model, tokenizer = model_and_tokenizer
    calls = []
    real_train = faiss.IndexIVFFlat.train
    monkeypatch.setattr(faiss.IndexIVFFlat, "train", lambda self, x: calls.append(len(x)) or real_train(self, x))
    # 1 MB left after the fixed costs, and training vectors that cost a third of it each: 3 fit
    hidden = model.config.hidden_size
    monkeypatch.setattr(BuildMemoryPlan, "available", lambda self: 10**6)
    monkeypatch.setattr(memory_module, "TRAIN_BYTES_PER_DIM", 10**6 // (3 * hidden))
    with caplog.at_level("WARNING"):
        index = NPMIndex.build(model, tokenizer, corpus, tmp_path / "index",
                               IndexBuildArguments(faiss_factory="IVF2,Flat", max_memory="64GB", **QUIET))
    assert "Training FAISS on 3 sampled vectors instead of train_sample_size=1000000" in caplog.text
    assert calls == [3] and index.faiss_index.ntotal == index.num_indexed > 3


def test_memory_estimates():
    assert faiss_memory_bytes(faiss.index_factory(8, "Flat"), 10) == 4 * 8 * 10
    assert faiss_memory_bytes(faiss.index_factory(8, "Flat"), faiss_io.FLAT_FILL_MAX_VECTORS + 1) == 0  # streamed
    assert faiss_memory_bytes(faiss.index_factory(8, "IVF4,SQ8"), 100) == 100 * (8 + 8) + 4 * 8 * 4
    assert faiss_memory_bytes(faiss.index_factory(16, "PQ4np"), 100) == 100 * 4
    assert faiss_memory_bytes(faiss.index_factory(8, "HNSW16"), 100) > 100 * (32 + 4 * 32)

    class Config:
        hidden_size, intermediate_size, num_attention_heads = 384, 1536, 12

    assert encoding_peak_bytes(Config, 16, 256) == 4 * 16 * 256 * (8 * 384 + 2 * 1536 + 3 * 12 * 256)
    assert parse_memory_size(_budget_above_the_process(0)) > 0


# ----------------------------------------------------------------------------------- memory-mapped loading
def _in_ram_and_mapped(path: Path):
    return faiss.read_index(str(path)), read_faiss_index(path)


@pytest.mark.parametrize("factory", ["IVF8,SQ8", "IVF8,PQ4np", "HNSW8", "SQ8", "OPQ4,IVF8,PQ4np"])
def test_memory_mapped_faiss_searches_like_the_in_ram_index(tmp_path, factory):
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((3000, 16)).astype(np.float32)
    index = faiss.index_factory(16, factory, faiss.METRIC_INNER_PRODUCT)
    index.train(vectors)
    index.add(vectors)
    faiss.write_index(index, str(tmp_path / "index.faiss"))
    in_ram, mapped = _in_ram_and_mapped(tmp_path / "index.faiss")
    for loaded in (in_ram, mapped):
        faiss.ParameterSpace().set_index_parameters(loaded, "nprobe=3" if "IVF" in factory else "")
    queries = rng.standard_normal((20, 16)).astype(np.float32)
    np.testing.assert_array_equal(in_ram.search(queries, 10)[1], mapped.search(queries, 10)[1])
    np.testing.assert_array_equal(in_ram.search(queries, 10)[0], mapped.search(queries, 10)[0])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_memory_mapped_ivf_is_not_read_into_ram(tmp_path):
    vectors = np.random.default_rng(0).standard_normal((200_000, 64)).astype(np.float32)
    index = faiss.index_factory(64, "IVF16,SQ8", faiss.METRIC_INNER_PRODUCT)
    index.train(vectors[:5000])
    index.add(vectors)
    faiss.write_index(index, str(tmp_path / "index.faiss"))
    del index, vectors
    size = (tmp_path / "index.faiss").stat().st_size  # 14 MB of codes and ids

    # in a fresh process: freed memory that this one keeps would hide a read into RAM
    script = ("import faiss, sys; from npm_hf.index import read_faiss_index, process_resident_bytes as rss; "
              "b = rss(); m = read_faiss_index(sys.argv[1]); mapped = rss() - b; "
              "p = faiss.read_index(sys.argv[1]); print(mapped, rss() - b - mapped)")
    result = subprocess.run([sys.executable, "-c", script, str(tmp_path / "index.faiss")], capture_output=True,
                            text=True, check=True, cwd=Path(__file__).resolve().parents[2])
    mapped, plain = map(int, result.stdout.split())
    assert mapped < size / 4  # pages come in when a search visits their lists
    assert plain > size / 2  # (the measure does see a read into RAM)


def test_built_ivf_index_loads_mapped_and_edits(tmp_path, model_and_tokenizer, corpus):
    model, tokenizer = model_and_tokenizer
    index = NPMIndex.build(model, tokenizer, corpus, tmp_path / "index",
                           IndexBuildArguments(faiss_factory="IVF2,SQ8", **QUIET))
    assert (index.path / "index.ivfdata").is_file()  # IVF lists are merged on disk and mapped at load
    in_ram = read_faiss_index(index.path / "index.faiss", mapped=False)
    load_lists_into_memory(in_ram)
    queries = np.asarray(index.vectors[::5], dtype=np.float32)
    faiss.extract_index_ivf(in_ram).nprobe = 2
    expected = in_ram.search(queries, 4)[1]
    np.testing.assert_array_equal(index.candidate_rows(queries, 4, nprobe=2), expected)
    before = index.num_indexed
    index.add_documents(model, tokenizer, [{"id": "new", "text": "Austin is the capital of Texas."}])
    assert index.num_indexed > before and index.faiss_index.ntotal == index.num_indexed


# ------------------------------------------------------------------------------------ streamed exact search
def test_streamed_exact_search_equals_brute_force():
    rng = np.random.default_rng(1)
    vectors = rng.standard_normal((1000, 24)).astype(np.float16)
    queries = rng.standard_normal((7, 24)).astype(np.float32)
    exact = queries @ vectors.astype(np.float32).T
    for k, chunk in [(1, 1000), (10, 64), (50, 7), (1000, 300)]:
        scores, rows = streamed_exact_search(vectors, queries, k, chunk_rows=chunk)
        expected_rows = np.argsort(-exact, axis=1, kind="stable")[:, :k]
        np.testing.assert_array_equal(rows, expected_rows)
        np.testing.assert_allclose(scores, np.take_along_axis(exact, expected_rows, axis=1), rtol=1e-5, atol=1e-5)


def test_large_flat_index_is_searched_streamed_like_faiss(tmp_path, model_and_tokenizer, corpus, monkeypatch):
    model, tokenizer = model_and_tokenizer
    built = NPMIndex.build(model, tokenizer, corpus, tmp_path / "index", IndexBuildArguments(**QUIET))
    assert not built.streamed_exact_search and built.faiss_index.ntotal == built.num_indexed
    monkeypatch.setattr(reader_module, "FLAT_FILL_MAX_VECTORS", built.num_indexed - 1)
    monkeypatch.setattr(faiss_io, "STREAM_CHUNK_ROWS", 5)
    streamed = NPMIndex.load(tmp_path / "index")
    assert streamed.streamed_exact_search and streamed.faiss_index.ntotal == 0  # no float32 copy
    queries = np.asarray(built.vectors[::3], dtype=np.float32) + 0.01
    exact = queries @ np.asarray(built.vectors, dtype=np.float32).T
    for k in (1, 7, built.num_indexed):
        faiss_scores, faiss_rows = built.search(queries, k)
        scores, rows = streamed.search(queries, k)
        np.testing.assert_allclose(scores, faiss_scores, rtol=1e-5, atol=1e-5)
        # each row has the exact score of its rank; only near-ties (float rounding) may swap places
        np.testing.assert_allclose(np.take_along_axis(exact, rows, axis=1), faiss_scores, rtol=1e-5, atol=1e-5)
        assert all(len(set(row)) == k for row in rows.tolist())
        # a row may differ from FAISS's only where the two rows tie (duplicate tokens of the corpus score the same)
        differ = rows != faiss_rows
        np.testing.assert_allclose(np.take_along_axis(exact, rows, axis=1)[differ],
                                   np.take_along_axis(exact, faiss_rows, axis=1)[differ], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="nprobe applies to IVF indexes"):
        streamed.search(queries, 3, nprobe=2)
