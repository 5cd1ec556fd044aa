"""Knowledge editing: adding and deleting documents of a built index, atomically, without re-encoding or rewriting
the rest (append segments and tombstones), and compacting the edits into a plain index."""

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
    assert reloaded.faiss_index.ntotal == reloaded.num_indexed == index.num_indexed  # base + appended rows
    assert reloaded.manifest.format_version == 4 and [s["name"] for s in reloaded.manifest.edits["segments"]] == [
        "append-00001"]


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
    rows_before = index.num_indexed
    index.delete_documents(["texas"])
    assert "texas" not in _doc_ids_in_answers(fill, query)
    assert "texas" not in _doc_ids_in_answers(fill, f"Texas borders {mask}.", k=10_000)
    _, rows = index.search(texas_vectors, index.num_indexed)  # its own vectors find none of its tokens
    assert rows.shape == (len(texas_rows), len(kept)) and (rows >= 0).sum() > 0
    assert not np.isin(np.asarray(index.token_docs)[index.positions[rows[rows >= 0]]], [texas]).any()
    # its rows stay (a tombstone marks them) until compaction; none is ever a result
    assert index.faiss_index.ntotal == index.num_indexed == rows_before and index.num_searchable == len(kept)
    np.testing.assert_array_equal(np.flatnonzero(index.deleted_rows), texas_rows)
    for row, position in enumerate(index.positions):  # every vector is untouched
        if row not in set(texas_rows):
            np.testing.assert_array_equal(index.vectors[row], kept[int(position)])
    record = index.documents[texas]
    assert record == {"id": "texas", "title": "", "text": "", "deleted": True}
    dead = np.asarray(index.token_docs) == texas
    assert (index.token_flags[dead] == SPECIAL).all() and (index.token_ids[dead] == 0).all()
    assert not index.rows_for_positions(np.asarray(index.positions)[texas_rows])[1].any()
    reloaded = NPMIndex.load(index.path, verify="full")
    assert reloaded.manifest.num_deleted_documents == 1 and reloaded.num_searchable == index.num_searchable
    assert reloaded.manifest.edits["tombstones"] == "tombstones-00001.npy"
    reloaded.compact()  # now the rows go
    assert reloaded.faiss_index.ntotal == reloaded.num_indexed == reloaded.num_searchable == len(kept)
    assert reloaded.deleted_rows is None and reloaded.manifest.edits == {}
    for row, position in enumerate(reloaded.positions):
        np.testing.assert_array_equal(reloaded.vectors[row], kept[int(position)])
    assert reloaded.documents[texas] == record and (reloaded.token_flags[dead] == SPECIAL).all()
    assert "texas" not in _doc_ids_in_answers(_fill(reloaded, model_and_tokenizer), query)


def test_span_scores_after_a_delete_match_brute_force(index, model_and_tokenizer, brute_force):
    if index.manifest.faiss_factory.startswith("HNSW"):
        pytest.skip("HNSW search cannot be made exhaustive")
    model, tokenizer = model_and_tokenizer
    q_start, q_end = (np.asarray(index.vectors[i], dtype=np.float32) for i in (3, 11))
    index.add_documents(model, tokenizer, [NEW])
    index.delete_documents(["desert", "rivers"])
    knobs = {"nprobe": 2} if index.manifest.faiss_factory.startswith("IVF") else {}  # every list: exact
    predictor = NPMPredictor(model.config, tokenizer, index).using(k=index.num_indexed, **knobs)
    answers = predictor.predict_span(q_start, q_end, top_k=100_000)
    # the oracle's datastore is the live tokens alone: those of the index compacted (same positions)
    shutil.copytree(index.path, index.path.parent / "compacted")
    compacted = NPMIndex.load(index.path.parent / "compacted").compact()
    want = brute_force.spans(compacted, tokenizer, q_start, q_end, model.config.scale, 1.0, 10)
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


# ------------------------------------------------------------------------------------- segments, compaction
def test_edits_only_add_files(index, model_and_tokenizer):
    """An add writes a segment and a delete a tombstone file, both checksummed; no file of the base changes."""
    before = {p.name: (p.stat().st_ino, p.read_bytes()) for p in index.path.iterdir() if p.name != "manifest.json"}
    index.add_documents(*model_and_tokenizer, [NEW])
    index.delete_documents(["texas"])
    index.add_documents(*model_and_tokenizer, [{"id": "other", "text": "Saltoria borders Texas."}])
    index.delete_documents(["zorb"])
    now = {p.name: p for p in index.path.iterdir()}
    for name, (inode, content) in before.items():  # hard links of the very same files
        assert now[name].stat().st_ino == inode and now[name].read_bytes() == content
    manifest = index.manifest
    names = [s["name"] for s in manifest.edits["segments"]]
    assert names == ["append-00001", "append-00002"] and manifest.edits["tombstones"] == "tombstones-00002.npy"
    added = set(now) - set(before) - {"manifest.json"}
    assert added == set(manifest.files) - set(before) - {"manifest.json"}
    assert "tombstones-00001.npy" not in now  # replaced by the next generation
    assert all(name.startswith(("append-0000", "tombstones-")) for name in added)
    np.testing.assert_array_equal(np.load(index.path / "tombstones-00002.npy"),
                                  sorted([_document_index(index, "texas"), _document_index(index, "zorb")]))
    reloaded = NPMIndex.load(index.path, verify="full")  # every file checksummed
    assert reloaded.faiss_index.ntotal == reloaded.num_indexed and len(reloaded.documents) == 7


def _document_index(index, doc_id):
    return next(i for i in range(len(index.documents)) if index.documents[i]["id"] == doc_id)


def test_compaction_gives_what_the_edited_index_answers(index, model_and_tokenizer, mask):
    index.add_documents(*model_and_tokenizer, [NEW])
    index.delete_documents(["texas", "desert"])
    fill = _fill(index, model_and_tokenizer)
    queries = [f"Borvin lives in {mask}.", f"Thessaloniki is far from {mask}.", f"The river flows to {mask}."]
    exact = index.manifest.faiss_factory == "Flat"
    before = [fill(query, top_k=5, k=index.num_indexed) for query in queries]
    live = np.flatnonzero(~index.deleted_rows)
    positions, vectors = np.asarray(index.positions)[live], np.asarray(index.vectors[live])
    index.compact()
    assert index.manifest.edits == {} and index.deleted_rows is None and index.num_indexed == len(live)
    assert index.manifest.format_version in (1, 2, 3) and not [p for p in os.listdir(index.path) if "append" in p]
    np.testing.assert_array_equal(index.positions, positions)
    np.testing.assert_array_equal(np.asarray(index.vectors), vectors)
    assert index.faiss_index.ntotal == index.num_indexed
    after = [fill(query, top_k=5, k=index.num_indexed) for query in queries]  # the same pipeline object
    if exact:
        assert after == before
    assert all("texas" not in {a["evidence"]["doc_id"] for a in answers if a["evidence"]} for answers in after)
    NPMIndex.load(index.path, verify="full")


def test_a_reload_keeps_the_filled_flat_index_and_never_changes_it(index, model_and_tokenizer):
    if index.manifest.faiss_factory != "Flat":
        pytest.skip("only flat indexes are filled at load")
    base = index.faiss_index
    rows = base.ntotal
    index.add_documents(*model_and_tokenizer, [NEW])
    assert index.base_faiss_index is base and base.ntotal == rows  # used again, never added to
    assert index.faiss_index.ntotal == index.num_indexed > rows
    index.compact()  # the base changed: filled anew
    assert index.base_faiss_index is not base and index.faiss_index.ntotal == index.num_indexed


def test_an_ivf_segment_is_searched_like_the_base(tmp_path, model_and_tokenizer, corpus):
    """An IVF index's segment is a copy of its trained index: with every list probed, search is exact."""
    model, tokenizer = model_and_tokenizer
    index = NPMIndex.build(model, tokenizer, corpus, tmp_path / "ivf",
                           IndexBuildArguments(block_size=16, faiss_factory="IVF2,SQ8", show_progress_bar=False))
    base_rows = index.num_indexed
    index.add_documents(model, tokenizer, [NEW])
    assert index.faiss_index.ntotal == index.num_indexed > base_rows
    segment = index.manifest.edits["segments"][0]
    assert segment["faiss"] and (index.path / "append-00001.faiss").is_file()
    queries = np.asarray(index.vectors[base_rows:], dtype=np.float32)  # the new rows find themselves
    scores, rows = index.search(queries, 3, nprobe=2)
    vectors = np.asarray(index.vectors, dtype=np.float32)
    exact = queries @ vectors.T
    # every list probed: the best match of each new row scores as its exact best (the row itself or an identical
    # vector of the base); the SQ8 first stage may order near-ties below it differently, but every score returned
    # is the exact score of its row
    assert (rows >= 0).all()
    np.testing.assert_allclose(scores, np.take_along_axis(exact, rows, axis=1), rtol=1e-4)
    np.testing.assert_allclose(scores[:, 0], exact.max(axis=1), rtol=1e-4)
    with pytest.raises(ValueError, match="nprobe=3 is more than the 2 IVF lists"):
        index.search(queries, 3, nprobe=3)


def test_a_segment_bm25_scores_with_the_base_statistics():
    """The BM25 of a segment's passages scores them as one BM25 index over the base's and the segment's passages
    would (bm25s itself, the oracle), and without a base as bm25s does."""
    import bm25s

    from npm_hf.inference.prefilter import SavedBM25, bm25_with_stats

    base_texts = ["Texas borders Mexico and New Mexico.", "The Rio Grande flows to the Gulf of Mexico.",
                  "Thessaloniki is a city in Greece.", "Saltoria is cold in winter."]
    new_texts = ["Borvin lives in Saltoria. Saltoria is cold.", "Texas is big."]
    tokenize = lambda texts: bm25s.tokenize(texts, stopwords="en", show_progress=False)  # noqa: E731
    base = bm25s.BM25()
    base.index(tokenize(base_texts), show_progress=False)
    total = sum(len(ids) for ids in tokenize(base_texts).ids)
    whole = bm25s.BM25()
    whole.index(tokenize(base_texts + new_texts), show_progress=False)
    alone = bm25s.BM25()
    alone.index(tokenize(new_texts), show_progress=False)
    segment, _ = bm25_with_stats(new_texts, SavedBM25(base, base.vocab_dict), total)
    unbased, _ = bm25_with_stats(new_texts, None, None)
    for query in (["saltoria"], ["texas", "cold"], ["borvin", "mexico"]):
        np.testing.assert_allclose(segment.scores(query), whole.get_scores(query)[len(base_texts):], rtol=1e-5)
        np.testing.assert_allclose(unbased.scores(query), alone.get_scores(query), rtol=1e-5)
        assert segment.scores(query).max() > 0


def test_cli_compact(tmp_path, npm_dir, capsys):
    shutil.copytree(npm_dir / "index", tmp_path / "index")
    assert main(["index", "delete", "--index", str(tmp_path / "index"), "--ids", "texas"]) == 0
    capsys.readouterr()
    assert main(["index", "compact", "--index", str(tmp_path / "index")]) == 0
    out = capsys.readouterr().out
    assert "Compacted" in out and "0 append segments merged" in out and "of deleted documents dropped" in out
    index = NPMIndex.load(tmp_path / "index", verify="full")
    assert index.manifest.edits == {} and index.num_searchable == index.num_indexed
