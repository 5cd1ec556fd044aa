"""Resumable and multi-process index builds (npm_hf.index.build), and IVF indexes merged on disk."""

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from transformers import AutoTokenizer

import npm_hf.index.build as index_build
from npm_hf.inference.faiss_io import is_on_disk
from npm_hf import IndexBuildArguments, NPMIndex, NPMIndexError, NPMModel


# Units of one batch of 2 blocks of 16 tokens: a corpus of a few hundred tokens makes many units.
SMALL_UNITS = dict(block_size=16, batch_size=2, blocks_per_unit=2, show_progress_bar=False)
_ENCODE_UNIT = index_build.encode_unit
CLI_FLAGS = ["--block-size", "16", "--batch-size", "2", "--blocks-per-unit", "2", "--no-show-progress-bar"]


@pytest.fixture(scope="module")
def big_corpus(corpus):
    """The test corpus ten times over (new ids): enough vectors for IVF4 and a dozen work units."""
    return [{**doc, "id": f"{doc['id']}-{i}"} for i in range(10) for doc in corpus]


def _vectors(index) -> np.ndarray:
    return np.asarray(index.vectors[:], dtype=np.float32)


def _assert_same_index(built: NPMIndex, reference: NPMIndex) -> None:
    """Same tokens, bit-identical vectors, same FAISS answers (every IVF list visited and one)."""
    np.testing.assert_array_equal(built.token_ids, reference.token_ids)
    np.testing.assert_array_equal(built.positions, reference.positions)
    np.testing.assert_array_equal(_vectors(built), _vectors(reference))
    queries = _vectors(reference)[::9]
    nlist = [{}] if reference.exact_search else [{"nprobe": 1}, {"nprobe": 4}]
    for knobs in nlist:
        for got, want in zip(built.search(queries, 8, **knobs), reference.search(queries, 8, **knobs)):
            np.testing.assert_array_equal(got, want)


def _count_units(monkeypatch, fail_after: int | None = None) -> list:
    """Record every unit encoded (and raise KeyboardInterrupt, as a kill would stop it, after `fail_after`)."""
    encoded = []
    original = _ENCODE_UNIT

    def encode_unit(path, *args):
        if fail_after is not None and len(encoded) == fail_after:
            raise KeyboardInterrupt
        encoded.append(path.name)
        return original(path, *args)

    monkeypatch.setattr(index_build, "encode_unit", encode_unit)
    return encoded


# -------------------------------------------------------------------------------------------------- resume
@pytest.mark.parametrize("factory", ["Flat", "IVF4,Flat"])
def test_an_interrupted_build_resumes_without_encoding_finished_units_again(
        tmp_path, model_and_tokenizer, big_corpus, monkeypatch, factory):
    model, tokenizer = model_and_tokenizer
    args = IndexBuildArguments(faiss_factory=factory, **SMALL_UNITS)
    reference = NPMIndex.build(model, tokenizer, big_corpus, tmp_path / "reference", args)
    num_units = len(index_build.work_units(reference.num_tokens, args))
    assert num_units > 6

    _count_units(monkeypatch, fail_after=5)
    with pytest.raises(KeyboardInterrupt):
        NPMIndex.build(model, tokenizer, big_corpus, tmp_path / "index", args)
    partial = tmp_path / ".index.partial"
    assert sorted(os.listdir(tmp_path)) == [".index.partial", "reference"]
    assert len(list((partial / "state" / "units").glob("*.npy"))) == 5
    for never_an_index in (tmp_path / "index", partial, partial / "index"):
        with pytest.raises(NPMIndexError, match="missing manifest.json"):
            NPMIndex.load(never_an_index)

    with pytest.raises(FileExistsError, match="interrupted build.*resume=True.*--resume.*--overwrite"):
        NPMIndex.build(model, tokenizer, big_corpus, tmp_path / "index", args)
    encoded = _count_units(monkeypatch)
    resumed = NPMIndex.build(model, tokenizer, big_corpus, tmp_path / "index",
                             IndexBuildArguments(faiss_factory=factory, resume=True, **SMALL_UNITS))
    assert len(encoded) == num_units - 5  # the five finished units were kept
    assert not partial.exists()
    _assert_same_index(resumed, reference)


def test_a_build_killed_while_merging_faiss_resumes_from_its_parts(tmp_path, model_and_tokenizer, big_corpus,
                                                                    monkeypatch):
    model, tokenizer = model_and_tokenizer
    args = IndexBuildArguments(faiss_factory="IVF4,Flat", **SMALL_UNITS)
    reference = NPMIndex.build(model, tokenizer, big_corpus, tmp_path / "reference", args)

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("faiss.contrib.ondisk.merge_ondisk", killed)
    with pytest.raises(KeyboardInterrupt):
        NPMIndex.build(model, tokenizer, big_corpus, tmp_path / "index", args)
    state = tmp_path / ".index.partial" / "state"
    assert (state / "vectors.done").exists() and (state / "trained.faiss").exists()
    assert len(list((state / "parts").glob("part-*.faiss"))) == 1
    monkeypatch.undo()
    encoded = _count_units(monkeypatch)
    resumed = NPMIndex.build(model, tokenizer, big_corpus, tmp_path / "index",
                             IndexBuildArguments(faiss_factory="IVF4,Flat", resume=True, **SMALL_UNITS))
    assert encoded == []
    _assert_same_index(resumed, reference)


def test_a_resume_with_other_inputs_is_refused(tmp_path, model_and_tokenizer, big_corpus, monkeypatch):
    model, tokenizer = model_and_tokenizer
    _count_units(monkeypatch, fail_after=2)
    with pytest.raises(KeyboardInterrupt):
        NPMIndex.build(model, tokenizer, big_corpus, tmp_path / "index", IndexBuildArguments(**SMALL_UNITS))
    resume = IndexBuildArguments(resume=True, **SMALL_UNITS)
    with pytest.raises(NPMIndexError, match="Cannot resume the interrupted build.*: the corpus changed.*overwrite"):
        NPMIndex.build(model, tokenizer, big_corpus[:-1], tmp_path / "index", resume)
    with pytest.raises(NPMIndexError, match="block_size=16 -> 8"):
        NPMIndex.build(model, tokenizer, big_corpus, tmp_path / "index",
                       IndexBuildArguments(resume=True, **{**SMALL_UNITS, "block_size": 8}))
    other_model = NPMModel.from_pretrained(model.name_or_path)
    other_model.encoder.embeddings.word_embeddings.weight.data += 1.0
    with pytest.raises(NPMIndexError, match="the encoder changed"):
        NPMIndex.build(other_model, tokenizer, big_corpus, tmp_path / "index", resume)
    encoded = _count_units(monkeypatch)
    NPMIndex.build(model, tokenizer, big_corpus, tmp_path / "index",
                   IndexBuildArguments(overwrite=True, **SMALL_UNITS))  # starts over
    assert len(encoded) == len(index_build.work_units(NPMIndex.load(tmp_path / "index").num_tokens,
                                                      IndexBuildArguments(**SMALL_UNITS)))


def test_a_build_failing_before_its_corpus_is_tokenized_leaves_nothing(tmp_path, model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    with pytest.raises(ValueError, match="no non-empty document"):
        NPMIndex.build(model, tokenizer, ["  "], tmp_path / "index", IndexBuildArguments(**SMALL_UNITS))
    assert os.listdir(tmp_path) == []


def test_work_units_are_whole_batches_of_blocks():
    args = IndexBuildArguments(block_size=16, batch_size=3, blocks_per_unit=4)  # rounded up to 6 blocks
    assert index_build.work_units(200, args) == [(0, 96), (96, 192), (192, 200)]
    with pytest.raises(ValueError, match="blocks_per_unit must be >= 1"):
        IndexBuildArguments(blocks_per_unit=0)


# ----------------------------------------------------------------------------------------- on-disk IVF
def _sha256(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def test_an_ivf_index_is_merged_on_disk_and_loads_after_a_move(tmp_path, model_and_tokenizer, big_corpus):
    model, tokenizer = model_and_tokenizer
    built = NPMIndex.build(model, tokenizer, big_corpus, tmp_path / "index",
                           IndexBuildArguments(faiss_factory="IVF4,Flat", **SMALL_UNITS))
    assert is_on_disk(built.faiss_index)
    manifest = json.loads((tmp_path / "index" / "manifest.json").read_text())
    assert manifest["files"]["index.ivfdata"]["sha256"] == _sha256(tmp_path / "index" / "index.ivfdata")
    queries = _vectors(built)[::7]
    before = built.search(queries, 10, nprobe=2)
    shutil.move(tmp_path / "index", tmp_path / "moved")
    moved = NPMIndex.load(tmp_path / "moved", verify="full")
    for got, want in zip(moved.search(queries, 10, nprobe=2), before):
        np.testing.assert_array_equal(got, want)
    # every list visited: the exact top 10 of all stored vectors
    scores, _ = moved.search(queries, 10, nprobe=4)
    np.testing.assert_allclose(scores, -np.sort(-(queries @ _vectors(moved).T), axis=1)[:, :10], rtol=1e-5,
                               atol=1e-5)


def test_editing_an_on_disk_index_never_writes_its_live_ivfdata(tmp_path, model_and_tokenizer, big_corpus):
    model, tokenizer = model_and_tokenizer
    index = NPMIndex.build(model, tokenizer, big_corpus, tmp_path / "index",
                           IndexBuildArguments(faiss_factory="IVF4,Flat", **SMALL_UNITS))
    live = tmp_path / "index" / "index.ivfdata"
    witness = tmp_path / "witness.ivfdata"
    os.link(live, witness)  # the very file (inode) the loaded index maps
    original = _sha256(witness)
    index.add_documents(model, tokenizer, [{"id": "new", "title": "New", "text": "Kentucky borders Ohio."}])
    index.delete_documents([big_corpus[0]["id"]])
    assert _sha256(witness) == original
    assert is_on_disk(index.faiss_index)
    reloaded = NPMIndex.load(tmp_path / "index", verify="full")
    assert reloaded.faiss_index.ntotal == reloaded.num_indexed
    queries = _vectors(reloaded)[::5]
    scores, _ = reloaded.search(queries, 6, nprobe=4)
    np.testing.assert_allclose(scores, -np.sort(-(queries @ _vectors(reloaded).T), axis=1)[:, :6], rtol=1e-5,
                               atol=1e-5)


# ------------------------------------------------------------------------------------------ several processes
def _launch(launcher: str, model_dir, corpus_file, output, *flags) -> subprocess.CompletedProcess:
    port = str(29600 + os.getpid() % 1000 + (7 if launcher == "accelerate" else 0))
    cli = ["-m", "npm_hf.cli", "build-index", "--model", str(model_dir), "--corpus", str(corpus_file),
           "--output", str(output), *CLI_FLAGS, *flags]
    if launcher == "torchrun":
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", port, *cli]
    else:
        # --multi_gpu is accelerate's torch.distributed launcher; without GPUs its processes run on the CPU.
        command = [str(Path(sys.executable).parent / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2",
                   "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                   "--main_process_port", port, *cli]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.fixture
def corpus_file(tmp_path, big_corpus):
    path = tmp_path / "corpus.jsonl"
    path.write_text("".join(json.dumps(doc) + "\n" for doc in big_corpus))
    return path


@pytest.mark.parametrize("launcher,factory", [("torchrun", "IVF4,Flat"), ("accelerate", "Flat")])
def test_two_processes_build_the_index_of_one(tmp_path, encoder_dir, npm_dir, model_and_tokenizer, corpus_file,
                                              launcher, factory):
    if "roberta" in encoder_dir.name:
        pytest.skip("one tokenizer family is enough for the launchers (each launch takes seconds)")
    model, tokenizer = model_and_tokenizer
    one = NPMIndex.build(model, tokenizer, corpus_file, tmp_path / "one",
                         IndexBuildArguments(faiss_factory=factory, **SMALL_UNITS))
    two = _launch(launcher, npm_dir, corpus_file, tmp_path / "two", "--faiss-factory", factory)
    assert "on 2 processes" in two.stdout and two.stdout.count("Indexed") == 1
    assert "IO_FLAG" not in two.stdout  # FAISS prints nothing when an on-disk index loads
    _assert_same_index(NPMIndex.load(tmp_path / "two", verify="full"), one)
    assert sorted(os.listdir(tmp_path)) == ["corpus.jsonl", "one", "two"]


@pytest.mark.slow
def test_two_processes_resume_the_build_one_of_them_failed(tmp_path, encoder_dir, npm_dir, corpus_file, big_corpus):
    if "roberta" in encoder_dir.name:
        pytest.skip("one tokenizer family is enough for the launchers (each launch takes seconds)")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "CUDA_VISIBLE_DEVICES": ""}
    script = Path(__file__).parents[1] / "scripts" / "build_index_counting.py"

    def launch(attempt: int, fail_rank: int, corpus, *flags):
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                   str(29650 + os.getpid() % 1000 + attempt), str(script), str(fail_rank), "3", "build-index",
                   "--model", str(npm_dir), "--corpus", str(corpus), "--output", str(tmp_path / "two"), *CLI_FLAGS,
                   "--faiss-factory", "IVF4,Flat", *flags]
        return subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)

    failed = launch(0, 1, corpus_file)  # process 1 fails after 3 units; process 0 must not wait forever
    assert failed.returncode != 0
    assert "injected failure of process 1" in failed.stderr
    assert "Another process of the distributed index build failed" in failed.stderr
    finished = len(list((tmp_path / ".two.partial" / "state" / "units").glob("*.npy")))
    args = IndexBuildArguments(faiss_factory="IVF4,Flat", **SMALL_UNITS)
    model = NPMModel.from_pretrained(npm_dir)
    one = NPMIndex.build(model, AutoTokenizer.from_pretrained(npm_dir), corpus_file, tmp_path / "one", args)
    num_units = len(index_build.work_units(one.num_tokens, args))
    assert finished == (num_units + 1) // 2 + 3  # all of process 0's units, three of process 1's

    other = tmp_path / "other.jsonl"
    other.write_text("".join(json.dumps(doc) + "\n" for doc in big_corpus[:-1]))
    refused = launch(1, -1, other, "--resume")
    assert refused.returncode != 0 and "the corpus changed" in refused.stderr

    resumed = launch(2, -1, corpus_file, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    counts = [int(line.split()[3]) for line in resumed.stderr.splitlines() if " encoded " in line]
    assert len(counts) == 2 and sum(counts) == num_units - finished
    _assert_same_index(NPMIndex.load(tmp_path / "two", verify="full"), one)
