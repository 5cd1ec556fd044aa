"""Knowledge editing: adding and deleting documents of a built index, atomically, without re-encoding the rest."""

import json
import os
import shutil

import numpy as np
import pytest
import torch

from npm_hf import (IndexBuildArguments, IndexMismatchError, NonparametricFillMaskPipeline, NPMIndex, NPMIndexError,
                    NPMModel, NPMPredictor)
from npm_hf.cli import main
from npm_hf.corpus import SPECIAL


NEW = {"id": "zorb", "title": "Borvin", "text": "Borvin lives in Saltoria. Saltoria is cold."}


@pytest.fixture(params=["Flat", "HNSW8", "IVF2,Flat"])
def index(request, tmp_path, model_and_tokenizer, corpus):
    model, tokenizer = model_and_tokenizer
    return NPMIndex.build(model, tokenizer, corpus, tmp_path / "index",
                          IndexBuildArguments(block_size=16, faiss_factory=request.param, show_progress_bar=False))


def _fill(index, model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    decoding = {}
    if index.manifest.faiss_factory.startswith("IVF2"):
        decoding["nprobe"] = 2  # every list: retrieval does not hinge on which list a vector fell into
    if index.manifest.faiss_factory.startswith("HNSW"):
        decoding["ef_search"] = 1000  # likewise: a candidate list longer than the corpus
    return NonparametricFillMaskPipeline(model=model, tokenizer=tokenizer, index=index, decoding=decoding)


def _doc_ids_in_answers(fill, text, **kwargs):
    return {answer["evidence"]["doc_id"] for answer in fill(text, top_k=10_000, **kwargs) if answer["evidence"]}


# ------------------------------------------------------------------------------------------------- adding
def test_added_document_is_retrievable_at_once(index, model_and_tokenizer, mask):
    fill = _fill(index, model_and_tokenizer)
    query = f"Borvin lives in {mask}."
    try:  # not in the corpus yet: no evidence, or (none of its pieces in the corpus) refused as a target
        assert fill(query, targets=["Saltoria"])[0]["evidence"] is None
    except ValueError as error:
        assert "None of the targets ['Saltoria'] occurs in the index" in str(error)
    index.add_documents(*model_and_tokenizer, [NEW])
    answer = fill(query, targets=["Saltoria"])[0]  # the same pipeline object sees the edit
    assert answer["score"] > 0 and answer["evidence"]["doc_id"] == "zorb"
    assert answer["evidence"]["text"][answer["evidence"]["start"] : answer["evidence"]["end"]] == "Saltoria"
    reloaded = NPMIndex.load(index.path, verify="full")
    assert reloaded.manifest.num_documents == 6 and reloaded.documents[5]["id"] == "zorb"
    assert reloaded.faiss_index.ntotal == reloaded.num_indexed == index.num_indexed


def test_added_blocks_are_encoded_alone_and_the_rest_is_kept(tmp_path, index, model_and_tokenizer):
    old_vectors = np.array(index.vectors)
    old_tokens, old_indexed = index.num_tokens, index.num_indexed
    index.add_documents(*model_and_tokenizer, [NEW, {"id": "blank", "text": " "}])  # an empty one is skipped
    block = index.block_size
    start = -(-old_tokens // block) * block
    np.testing.assert_array_equal(index.vectors[:old_indexed], old_vectors)
    padding = slice(old_tokens, start)
    assert (index.token_flags[padding] == SPECIAL).all() and (index.token_docs[padding] == -1).all()
    assert index.token_docs[start] == 5 and index.manifest.num_skipped_empty_documents == 2
    assert index.manifest.num_blocks == -(-index.num_tokens // block)
    # The new rows are exactly what a fresh build of the new document alone holds (its blocks start at 0 there).
    fresh = NPMIndex.build(*model_and_tokenizer, [NEW], tmp_path / "fresh",
                           IndexBuildArguments(block_size=block, show_progress_bar=False))
    np.testing.assert_allclose(np.asarray(index.vectors[old_indexed:], dtype=np.float32),
                               np.asarray(fresh.vectors, dtype=np.float32), atol=1e-3)
    np.testing.assert_array_equal(index.token_ids[start:], fresh.token_ids)
    np.testing.assert_array_equal(index.positions[old_indexed:], start + np.asarray(fresh.positions))


def test_add_refuses_taken_ids_other_models_and_empty_input(index, model_and_tokenizer, npm_dir):
    model, tokenizer = model_and_tokenizer
    files = json.loads((index.path / "manifest.json").read_text())["files"]
    with pytest.raises(NPMIndexError, match="id 'texas' is already in the index.*Delete it first"):
        index.add_documents(model, tokenizer, [{"id": "texas", "text": "Texas again."}])
    with pytest.raises(NPMIndexError, match="id 'twin' is already in the index"):
        index.add_documents(model, tokenizer, [{"id": "twin", "text": "One."}, {"id": "twin", "text": "Two."}])
    with pytest.raises(ValueError, match=r"No non-empty document to add \(1 empty ones skipped\)"):
        index.add_documents(model, tokenizer, [" "])
    other = NPMModel.from_pretrained(npm_dir)
    with torch.no_grad():
        other.encoder.get_input_embeddings().weight[7] += 0.5
    with pytest.raises(IndexMismatchError, match="different encoder weights"):
        index.add_documents(other, tokenizer, [NEW])
    assert json.loads((index.path / "manifest.json").read_text())["files"] == files  # nothing changed


# ----------------------------------------------------------------------------------------------- deleting
def test_deleted_document_is_never_retrieved_or_cited(index, model_and_tokenizer, mask):
    fill = _fill(index, model_and_tokenizer)
    query = f"Thessaloniki is far from {mask}."
    assert "texas" in _doc_ids_in_answers(fill, query)  # cited before
    texas = int(np.flatnonzero([index.documents[i]["id"] == "texas" for i in range(5)])[0])
    texas_rows = np.flatnonzero(np.asarray(index.token_docs)[index.positions] == texas)
    texas_vectors = np.asarray(index.vectors[texas_rows], dtype=np.float32)
    kept = {int(p): np.array(index.vectors[r]) for r, p in enumerate(index.positions) if r not in set(texas_rows)}
    index.delete_documents(["texas"])
    assert "texas" not in _doc_ids_in_answers(fill, query)
    assert "texas" not in _doc_ids_in_answers(fill, f"Texas borders {mask}.", k=10_000)
    _, rows = index.search(texas_vectors, index.num_indexed)  # its own vectors find none of its tokens
    assert not np.isin(np.asarray(index.token_docs)[index.positions[rows[rows >= 0]]], [texas]).any()
    assert index.faiss_index.ntotal == index.num_indexed == len(kept)
    for row, position in enumerate(index.positions):  # every other vector is untouched
        np.testing.assert_array_equal(index.vectors[row], kept[int(position)])
    record = index.documents[texas]
    assert record == {"id": "texas", "title": "", "text": "", "deleted": True}
    dead = np.asarray(index.token_docs) == texas
    assert (index.token_flags[dead] == SPECIAL).all() and (index.token_ids[dead] == 0).all()
    reloaded = NPMIndex.load(index.path, verify="full")
    assert reloaded.manifest.num_deleted_documents == 1 and reloaded.num_indexed == index.num_indexed


def test_span_scores_after_a_delete_match_brute_force(index, model_and_tokenizer, brute_force):
    if index.manifest.faiss_factory.startswith("HNSW"):
        pytest.skip("HNSW search cannot be made exhaustive")
    model, tokenizer = model_and_tokenizer
    index.delete_documents(["desert", "rivers"])
    knobs = {"nprobe": 2} if index.manifest.faiss_factory.startswith("IVF") else {}  # every list: exact
    q_start, q_end = (np.asarray(index.vectors[i], dtype=np.float32) for i in (3, 11))
    predictor = NPMPredictor(model.config, tokenizer, index).using(k=index.num_indexed, **knobs)
    answers = predictor.predict_span(q_start, q_end, top_k=100_000)
    want = brute_force.spans(index, tokenizer, q_start, q_end, model.config.scale, 1.0, 10)
    assert len(answers) == len(want) > 10
    for answer in answers:
        assert answer["score"] == pytest.approx(want[answer["token_str"]], rel=1e-4, abs=1e-7)
        assert answer["evidence"]["doc_id"] not in {"desert", "rivers"}


def test_unknown_ids_change_nothing(index):
    before = sorted((p.name, p.stat().st_mtime_ns) for p in index.path.iterdir())
    with pytest.raises(NPMIndexError, match=r"No document with id 'nope' .* \(nor \['nada'\]\); nothing was deleted"):
        index.delete_documents(["texas", "nope", "nada"])
    assert sorted((p.name, p.stat().st_mtime_ns) for p in index.path.iterdir()) == before
    index.delete_documents("texas")
    with pytest.raises(NPMIndexError, match="No document with id 'texas'"):
        index.delete_documents(["texas"])  # deleted already
    with pytest.raises(ValueError, match="No document id to delete"):
        index.delete_documents([])


def test_a_deleted_id_can_be_added_again(index, model_and_tokenizer, mask):
    index.delete_documents(["texas"])
    index.add_documents(*model_and_tokenizer, [{"id": "texas", "title": "Texas", "text": "Texas has Saltoria."}])
    fill = _fill(index, model_and_tokenizer)
    assert fill(f"Texas has {mask}.", targets=["Saltoria"])[0]["evidence"]["doc_id"] == "texas"
    assert index.manifest.num_documents == 6 and index.manifest.num_deleted_documents == 1


# ----------------------------------------------------------------------------------------------- atomicity
def test_an_interrupted_edit_leaves_the_old_index(index, model_and_tokenizer, monkeypatch):
    manifest = (index.path / "manifest.json").read_text()

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("npm_hf.index.editing.publish", crash)  # after tokens, vectors, FAISS and documents
    with pytest.raises(KeyboardInterrupt):
        index.delete_documents(["texas"])
    with pytest.raises(KeyboardInterrupt):
        index.add_documents(*model_and_tokenizer, [NEW])
    assert sorted(os.listdir(index.path.parent)) == ["index"]  # no staging directory left
    assert (index.path / "manifest.json").read_text() == manifest
    reloaded = NPMIndex.load(index.path, verify="full")
    assert reloaded.manifest.num_documents == 5 and reloaded.num_indexed == index.num_indexed


def test_edits_never_write_through_hard_links(index, model_and_tokenizer):
    kept = index.path.parent / "before"
    shutil.copytree(index.path, kept)
    os.link(index.path / "encoder_sample.npz", index.path.parent / "outside-link")
    os.link(index.path / "token_doc_runs.npy", index.path.parent / "outside-link-2")
    index.delete_documents(["texas"])  # encoder_sample.npz is unchanged by a delete: linked into the new directory
    assert (index.path.parent / "outside-link").read_bytes() == (kept / "encoder_sample.npz").read_bytes()
    index.add_documents(*model_and_tokenizer, [NEW])  # rewrites token_doc_runs.npy as a new file
    assert (index.path.parent / "outside-link-2").read_bytes() == (kept / "token_doc_runs.npy").read_bytes()


# --------------------------------------------------------------------------------------------------- CLI
def test_cli_add_and_delete(tmp_path, npm_dir, capsys):
    shutil.copytree(npm_dir / "index", tmp_path / "index")
    corpus = tmp_path / "new.jsonl"
    corpus.write_text(json.dumps(NEW) + "\n", encoding="utf-8")
    argv = ["index", "add", "--index", str(tmp_path / "index"), "--model", str(npm_dir), "--corpus", str(corpus),
            "--no-show-progress-bar"]
    assert main(argv) == 0
    assert "Added 1 documents" in capsys.readouterr().out
    assert main(argv) == 2
    assert "id 'zorb' is already in the index" in capsys.readouterr().err
    assert main(["index", "delete", "--index", str(tmp_path / "index"), "--ids", "zorb, texas"]) == 0
    assert "Deleted 2 document ids" in capsys.readouterr().out
    assert main(["index", "delete", "--index", str(tmp_path / "index"), "--ids", "ghost"]) == 2
    assert "No document with id 'ghost'" in capsys.readouterr().err
    index = NPMIndex.load(tmp_path / "index", verify="full")
    assert index.manifest.num_deleted_documents == 2 and index.manifest.num_documents == 6
