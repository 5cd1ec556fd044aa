"""Bad input, as a hostile user gives it: each case gets a clear error that names the fix (CLI: exit 2 and one
line), never a traceback or a silent wrong answer, and nothing is left on disk or changed in an existing index.
Locks and interrupted swaps: tests/index/test_writers.py."""

import json
import logging
import os
import shutil

import numpy as np
import pytest
from transformers import pipeline
from transformers.pipelines.base import PipelineException

from npm_hf import IndexBuildArguments, NonparametricFillMaskPipeline, NPMIndex, NPMIndexError
from npm_hf.cli import main


QUIET = {"show_progress_bar": False, "block_size": 16}
UNKNOWN = "ξζψ"  # no piece of it is in the test corpus (WordPiece: [UNK]; byte-level BPE: Greek bytes)


@pytest.fixture(scope="module")
def fill(npm_dir):
    return pipeline("fill-mask", model=str(npm_dir))


def _one_error_line(capsys, command: str) -> str:
    lines = [line for line in capsys.readouterr().err.splitlines() if "error" in line or "Traceback" in line]
    assert len(lines) == 1 and lines[0].startswith(f"npm-hf {command}: error: "), lines
    return lines[0]


def _tree(path):
    return sorted((str(p.relative_to(path)), p.stat().st_size) for p in path.rglob("*"))


# ------------------------------------------------------------------------------------------------- fill-mask
def test_texts_that_are_not_texts(fill, mask):
    assert fill([]) == []
    for bad in (None, 42, ["fine " + mask, 7]):
        with pytest.raises(ValueError, match=f"takes a text .*with a {mask.replace('[', '.').replace(']', '.')}"):
            fill(bad)
    with pytest.raises(PipelineException, match="put .* where the answer goes"):
        fill("A text without any mask.")


def test_cli_fill_mask_without_a_mask_is_one_line(npm_dir, capsys):
    assert main(["fill-mask", "--model", str(npm_dir), "A text without any mask."]) == 2
    assert "No mask_token" in _one_error_line(capsys, "fill-mask")


def test_batch_size_must_be_positive(fill, mask):
    for bad in (0, -1, "2", 1.5, True):
        with pytest.raises(ValueError, match="batch_size must be a positive integer"):
            fill([f"Texas borders {mask}."] * 2, batch_size=bad)


def test_targets_that_cannot_be_answers(fill, mask, caplog):
    text = f"Texas borders {mask}."
    for bad in ([""], ["  "], ["Texas", ""], [None]):
        with pytest.raises(ValueError, match="empty or not strings.*targets=\\["):
            fill(text, targets=bad)
    with pytest.raises(ValueError, match="None of the targets.*occurs in the index"):
        fill(text, targets=[UNKNOWN])
    from transformers.utils import logging as hf_logging

    hf_logging.enable_propagation()
    try:
        with caplog.at_level(logging.WARNING):
            answers = fill(text, targets=["New Mexico", UNKNOWN + "2"])
    finally:
        hf_logging.disable_propagation()
    assert [a["token_str"].lower() for a in answers] == ["new mexico"] and answers[0]["score"] > 0
    assert f"The target '{UNKNOWN}2'" in caplog.text and "ignoring it" in caplog.text


def test_top_k_beyond_the_candidates_is_logged(fill, mask, caplog):
    from transformers.utils import logging as hf_logging

    hf_logging.enable_propagation()
    hf_logging.set_verbosity_info()
    try:
        with caplog.at_level(logging.INFO):
            answers = fill(f"Texas borders {mask}.", top_k=100_000)
    finally:
        hf_logging.set_verbosity_warning()
        hf_logging.disable_propagation()
    assert f"top_k=100000, but only {len(answers)} answers" in caplog.text


def test_an_index_whose_documents_were_all_deleted_says_so(index_copy, model_and_tokenizer, mask, caplog):
    model, tokenizer = model_and_tokenizer
    index = NPMIndex.load(index_copy)
    index.delete_documents([index.documents[i]["id"] for i in range(len(index.documents))])
    assert index.num_searchable == 0 and index.num_indexed > 0  # tombstoned rows, until compaction
    from transformers.utils import logging as hf_logging

    for _ in range(2):  # tombstones, then compacted: no row at all
        hf_logging.enable_propagation()
        try:
            with caplog.at_level(logging.WARNING):
                fill = NonparametricFillMaskPipeline(model=model, tokenizer=tokenizer, index=index)
        finally:
            hf_logging.disable_propagation()
        assert "holds no indexed token (were all its documents deleted?)" in caplog.text
        for prefilter in ("none", "bm25", "dense"):  # a clear error, never an empty answer list
            with pytest.raises(NPMIndexError, match="every one of its 5 documents was deleted.*Add documents"):
                fill(f"Texas borders {mask}.", prefilter=prefilter)
        with pytest.raises(NPMIndexError, match="every one of its 5 documents was deleted"):
            index.search(np.ones((1, index.manifest.hidden_size), dtype=np.float32), 4)
        index.compact()
        assert index.num_indexed == index.num_searchable == 0 and index.manifest.edits == {}


# -------------------------------------------------------------------------------------- non-finite numbers
def _poison(index_dir, row: int) -> None:
    """A flipped bit: the first value of a stored vector becomes NaN (the file keeps its size)."""
    vectors = np.load(index_dir / "vectors.npy", mmap_mode="r+")
    vectors[row, 0] = np.float16("nan")
    vectors.flush()


def test_a_nan_in_the_vectors_of_a_flat_index_is_caught_before_any_answer(index_copy):
    """A flat index is filled from its vectors on first use (a pre-filtered pipeline never pays for it): the fill
    refuses a non-finite row, every time it is tried, and never leaves a half-filled index behind."""
    _poison(index_copy, 3)
    # verify="none" checks sizes only, as "fast" does for files above 64 MiB
    index = NPMIndex.load(index_copy, verify="none")
    for _ in range(2):
        with pytest.raises(NPMIndexError, match="vector row 3 holds non-finite values.*verify='full'"):
            index.search(np.ones((1, index.manifest.hidden_size), dtype=np.float32), 4)
    assert index._faiss_index.ntotal == 0


def test_a_flat_index_is_filled_on_first_use_only(index_copy):
    index = NPMIndex.load(index_copy)
    assert index._faiss_index.ntotal == 0 and not index.streamed_exact_search  # nothing filled at load
    query = np.asarray(index.vectors[:2], dtype=np.float32)
    scores, rows = index.search(query, 3)
    assert index._faiss_index.ntotal == index.num_indexed
    exact = np.asarray(index.vectors, dtype=np.float32) @ query.T
    np.testing.assert_allclose(scores, np.sort(exact, axis=0)[::-1][:3].T, rtol=1e-5)


@pytest.mark.parametrize("factory", ["HNSW8", "IVF2,Flat"])
def test_a_nan_in_the_vectors_never_reaches_an_answer(tmp_path, model_and_tokenizer, corpus, mask, factory):
    model, tokenizer = model_and_tokenizer
    NPMIndex.build(model, tokenizer, corpus, tmp_path / "index", IndexBuildArguments(faiss_factory=factory, **QUIET))
    index = NPMIndex.load(tmp_path / "index")
    fill = NonparametricFillMaskPipeline(model=model, tokenizer=tokenizer, index=index,
                                         decoding={"nprobe": 2} if factory.startswith("IVF") else {"ef_search": 999})
    assert fill(f"Texas borders {mask}.")  # answers before
    vectors = np.load(tmp_path / "index" / "vectors.npy", mmap_mode="r+")
    vectors[:, 0] = np.float16("nan")  # the re-scoring rows are read from this file (FAISS holds its own codes)
    vectors.flush()
    poisoned = NonparametricFillMaskPipeline(model=model, tokenizer=tokenizer,
                                             index=NPMIndex.load(tmp_path / "index", verify="none"),
                                             decoding=fill.decoding)
    for prefilter in ("none", "bm25"):
        with pytest.raises(NPMIndexError, match="are corrupted \\(vector row \\d+.*non-finite.*verify='full'"):
            poisoned(f"Texas borders {mask}.", prefilter=prefilter)


def test_non_finite_queries_are_refused(npm_dir):
    index = NPMIndex.load(npm_dir / "index")
    queries = np.ones((2, index.manifest.hidden_size), dtype=np.float32)
    queries[1, 5] = np.inf
    with pytest.raises(ValueError, match="non-finite query vectors.*float32 or bfloat16"):
        index.search(queries, 4)


# ----------------------------------------------------------------------------------------------- manifests
def test_a_manifest_that_is_not_json_text(index_copy):
    for content, message in ((b"\xff\xfe{}", "not valid UTF-8 JSON"), (b"{not json", "not valid UTF-8 JSON"),
                             (b"[1, 2]", "a JSON list, not an object"), (b"null", "a JSON NoneType")):
        (index_copy / "manifest.json").write_bytes(content)
        with pytest.raises(NPMIndexError, match=f"manifest.json is corrupted \\({message}.*rebuild"):
            NPMIndex.load(index_copy)


def test_a_hand_edited_manifest_is_refused(index_copy, rewrite_manifest):
    manifest = json.loads((index_copy / "manifest.json").read_text())
    assert manifest["checksum"].startswith("sha256:")
    manifest["block_size"] = 8  # blocks of 16 read as blocks of 8: silently wrong evidence and spans
    (index_copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(NPMIndexError, match="does not match its checksum.*Rebuild the index, or restore"):
        NPMIndex.load(index_copy)
    # sealed again (a checksum recomputed by hand): the counts still give it away
    rewrite_manifest(index_copy, lambda m: None)
    with pytest.raises(NPMIndexError, match="contradicts itself: .* blocks of 8, not num_blocks="):
        NPMIndex.load(index_copy)
    rewrite_manifest(index_copy, lambda m: m.update(block_size=16, num_tokens=str(m["num_tokens"])))
    with pytest.raises(NPMIndexError, match="num_tokens='\\d+' is not a int"):
        NPMIndex.load(index_copy)
    rewrite_manifest(index_copy, lambda m: m.update(num_tokens=int(m["num_tokens"]), num_deleted_documents=99))
    with pytest.raises(NPMIndexError, match="num_deleted_documents=99 is not within"):
        NPMIndex.load(index_copy)


def test_an_index_linked_from_outside_the_model_directory_warns(tmp_path, npm_dir, caplog):
    model = tmp_path / "model"
    shutil.copytree(npm_dir, model, ignore=shutil.ignore_patterns("index"))
    shutil.copytree(npm_dir / "index", tmp_path / "elsewhere")
    os.symlink(tmp_path / "elsewhere", model / "index")
    from transformers.utils import logging as hf_logging

    hf_logging.enable_propagation()
    try:
        with caplog.at_level(logging.WARNING):
            NPMIndex.from_pretrained(model)
        assert "links outside the model directory" in caplog.text and "elsewhere" in caplog.text
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            NPMIndex.from_pretrained(npm_dir)  # a plain directory: no warning
        assert "links outside" not in caplog.text
    finally:
        hf_logging.disable_propagation()


# -------------------------------------------------------------------------------------------------- builds
def test_resume_and_overwrite_together_are_refused(tmp_path, npm_dir, capsys):
    with pytest.raises(ValueError, match="resume=True continues .* overwrite=True deletes it; pass one"):
        IndexBuildArguments(resume=True, overwrite=True)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("Texas is big.\n")
    assert main(["build-index", "--model", str(npm_dir), "--corpus", str(corpus), "--output", str(tmp_path / "i"),
                 "--resume", "--overwrite"]) == 2
    assert "not both" in _one_error_line(capsys, "build-index")
    assert sorted(os.listdir(tmp_path)) == ["corpus.txt"]


def test_an_output_that_cannot_be_written(tmp_path, model_and_tokenizer, npm_dir, capsys):
    model, tokenizer = model_and_tokenizer
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(OSError, match="Cannot write in .*a-file.*choose a folder you can write to"):
        NPMIndex.build(model, tokenizer, ["Texas is big."], blocker / "index", IndexBuildArguments(**QUIET))
    assert main(["build-index", "--model", str(npm_dir), "--corpus", str(blocker), "--output",
                 str(blocker / "index"), "--block-size", "16"]) == 2
    assert "Cannot write in" in _one_error_line(capsys, "build-index")
    assert sorted(os.listdir(tmp_path)) == ["a-file"]


def test_duplicate_document_ids_are_refused_at_build(tmp_path, model_and_tokenizer, corpus):
    model, tokenizer = model_and_tokenizer
    documents = corpus + [{**corpus[0], "text": "Another text."}, {**corpus[2], "text": "A third."},
                          {**corpus[2], "text": "A fourth."}]
    with pytest.raises(ValueError, match="2 document ids that occur more than once: 'lincoln', 'hagios'. Give"):
        NPMIndex.build(model, tokenizer, documents, tmp_path / "index", IndexBuildArguments(**QUIET))
    assert os.listdir(tmp_path) == []  # nothing to resume, nothing half-written


def test_a_damaged_work_unit_is_never_built_into_the_index(tmp_path, model_and_tokenizer, corpus, monkeypatch,
                                                           kill_encoding_after):
    model, tokenizer = model_and_tokenizer
    big = [{**doc, "id": f"{doc['id']}-{i}"} for i in range(4) for doc in corpus]
    args = dict(QUIET, batch_size=2, blocks_per_unit=2)
    reference = NPMIndex.build(model, tokenizer, big, tmp_path / "reference", IndexBuildArguments(**args))
    encoded = kill_encoding_after(3)
    with pytest.raises(KeyboardInterrupt):
        NPMIndex.build(model, tokenizer, big, tmp_path / "index", IndexBuildArguments(**args))
    monkeypatch.undo()
    with open(encoded[1], "r+b") as handle:  # one flipped bit in the second unit's vectors
        handle.seek(-7, os.SEEK_END)
        byte = handle.read(1)
        handle.seek(-7, os.SEEK_END)
        handle.write(bytes([byte[0] ^ 0x10]))
    with pytest.raises(NPMIndexError, match=f"work unit .*{encoded[1].name} is corrupted \\(checksum mismatch\\).*"
                                            "resume=True"):
        NPMIndex.build(model, tokenizer, big, tmp_path / "index", IndexBuildArguments(resume=True, **args))
    assert not encoded[1].exists() and not (tmp_path / "index").exists()
    resumed = NPMIndex.build(model, tokenizer, big, tmp_path / "index", IndexBuildArguments(resume=True, **args))
    np.testing.assert_array_equal(np.asarray(resumed.vectors[:]), np.asarray(reference.vectors[:]))


def test_bad_inputs_leave_an_existing_index_unchanged(index_copy, model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    before = _tree(index_copy)
    index = NPMIndex.load(index_copy)
    for edit in (lambda: index.add_documents(model, tokenizer, [{"id": "texas", "title": "", "text": "Again."}]),
                 lambda: index.add_documents(model, tokenizer, [{"id": "", "text": "   "}]),
                 lambda: index.delete_documents([]), lambda: index.delete_documents(["nobody"])):
        with pytest.raises(ValueError):
            edit()
    assert _tree(index_copy) == before and sorted(os.listdir(index_copy.parent)) == ["index"]


# ---------------------------------------------------------------------------------------- argument fields
def test_non_finite_numbers_are_refused_in_every_argument_field(tmp_path):
    from npm_hf import NPMDecodingConfig, NPMTrainingArguments
    from npm_hf.demo import DemoArguments
    from npm_hf.modeling import NPMConfig

    for value in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match="similarity_scale"):
            NPMConfig(similarity_scale=value)
        for name in ("temperature", "prefilter_weight", "length_penalty_alpha"):
            with pytest.raises(ValueError, match=name):
                NPMDecodingConfig(**{name: value})
        for name in ("learning_rate", "max_grad_norm", "adam_beta1", "max_train_minutes", "mask_ratio"):
            with pytest.raises(ValueError, match=name):
                NPMTrainingArguments(output_dir=str(tmp_path), use_cpu=True, **{name: value})
        with pytest.raises(ValueError, match="train_steps must be an integer"):
            DemoArguments(train_steps=value)
