"""Index build, storage format, integrity checks and atomic writes."""

import json
import os
import shutil

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from npm_hf import IndexBuildArguments, IndexMismatchError, NPMIndex, NPMIndexError, NPMModel, build_index
from npm_hf.corpus import PAD, SPECIAL, WORD_END, WORD_START
from npm_hf.index import VECTORS_FILE


QUIET = dict(show_progress_bar=False, block_size=32)


def test_layout_counts_and_manifest(npm_dir, brute_force):
    index = NPMIndex.load(npm_dir / "index")
    m = index.manifest
    assert m.num_documents == 5 and m.num_skipped_empty_documents == 1
    assert m.num_tokens == len(index.token_ids) == len(index.token_offsets) == len(index.token_docs)
    assert m.num_indexed_tokens == len(index.positions)
    flags = np.asarray(index.token_flags)
    specials, pads = (flags & SPECIAL) != 0, (flags & PAD) != 0
    assert not (pads & ~specials).any()
    assert (specials & ~pads).sum() == 2 * m.num_documents  # each document is one paragraph: [CLS] … [SEP] / <s> … </s>
    # the official datastore: word starts and word ends only; the tiny vocabularies split most words into pieces
    tokenizer = AutoTokenizer.from_pretrained(npm_dir)
    assert index.positions.tolist() == brute_force.datastore(index, tokenizer)
    mid_word = ~specials & ((flags & (WORD_START | WORD_END)) == 0)
    assert mid_word.sum() > 20 and not mid_word[index.positions].any()
    assert m.boundary_tokens_only and m.paragraph_blocks and not m.stopwords_removed
    assert m.num_tokens % 16 == 0 and m.num_blocks == m.num_tokens // 16  # blocks are padded to block_size
    assert index.block_range(m.num_blocks - 1)[1] == m.num_tokens
    assert index.vectors.dtype == np.float16 and index.vectors.shape == (m.num_indexed_tokens, m.hidden_size)
    assert index.faiss_index.ntotal == m.num_indexed_tokens and m.metric == "inner_product"
    assert set(m.versions) >= {"npm_hf", "transformers", "torch", "faiss"}
    assert [index.documents[i]["id"] for i in range(5)] == ["lincoln", "desert", "hagios", "texas", "rivers"]


def test_vectors_are_the_encoder_states_of_unmasked_blocks(npm_dir, model_and_tokenizer):
    model, _ = model_and_tokenizer
    index = NPMIndex.load(npm_dir / "index")
    ids, flags = np.asarray(index.token_ids), np.asarray(index.token_flags)
    for block in (0, 3, index.manifest.num_blocks - 1):  # the last block ends with PAD tokens
        lo, hi = index.block_range(block)
        attention = torch.from_numpy(((flags[None, lo:hi] & PAD) == 0).astype(np.int64))
        with torch.no_grad():
            hidden = model(torch.from_numpy(ids[None, lo:hi].astype(np.int64)),
                           attention_mask=attention).last_hidden_state[0].numpy()
        rows, indexed = index.rows_for_positions(np.arange(lo, hi))
        np.testing.assert_allclose(index.vectors_for_rows(rows[indexed]), hidden[indexed], atol=2e-3, rtol=2e-3)
    assert ((flags & PAD) != 0).any()


def test_encoding_plan_sorts_blocks_by_length_within_work_units(npm_dir):
    from npm_hf.index import encoding_plan

    index = NPMIndex.load(npm_dir / "index")
    flags = np.asarray(index.token_flags)
    args = IndexBuildArguments(block_size=16, batch_size=3, blocks_per_unit=5)  # units of 6 blocks
    plan = encoding_plan(flags, args)
    lengths = [16 - int(np.argmax(((flags[b * 16 : (b + 1) * 16] & PAD) == 0)[::-1])) for b in range(len(flags) // 16)]
    assert len(set(lengths)) > 2  # packed paragraphs: blocks of several lengths
    seen = []
    for number, unit in enumerate(plan):
        members = [int(b) for batch, _ in unit for b in batch]
        assert sorted(members) == list(range(6 * number, min(6 * number + 6, len(lengths))))  # a unit's own blocks
        assert [lengths[b] for b in members] == sorted((lengths[b] for b in members), reverse=True)
        for batch, length in unit:
            assert len(batch) <= 3 and length == max(lengths[b] for b in batch)
        seen += members
    assert sorted(seen) == list(range(len(lengths))) and seen != sorted(seen)


def test_evidence_points_at_the_phrase(npm_dir, corpus):
    index = NPMIndex.load(npm_dir / "index")
    text = corpus[1]["text"]
    start_char = text.index("New Mexico")
    doc_tokens = np.flatnonzero(np.asarray(index.token_docs) == 1)
    starts = [p for p in doc_tokens if index.token_offsets[p, 0] == start_char]
    ends = [p for p in doc_tokens if index.token_offsets[p, 1] == start_char + len("New Mexico")]
    evidence = index.evidence(starts[0], ends[0])
    assert evidence["doc_id"] == "desert" and evidence["title"] == "Chihuahuan Desert"
    assert evidence["text"][evidence["start"] : evidence["end"]] == "New Mexico"
    assert evidence["text"] in text
    assert index.surface_text(starts[0], ends[0]) == "New Mexico"


def test_evidence_names_the_block_and_the_span_in_the_document(npm_dir, corpus):
    """An occurrence of "New Mexico" in the desert document whose tokens lie in one 16-token block (as every answer
    span's do): its characters in the whole document, its block, and the passage, that block's stretch of the
    document. (The tiny WordPiece vocabulary is trained anew each session and its ties can fall either way, so the
    block is found, not hard-coded.)"""
    index = NPMIndex.load(npm_dir / "index")
    text = corpus[1]["text"]
    doc_tokens = np.flatnonzero(np.asarray(index.token_docs) == 1)
    checked = 0
    for char_start in (i for i in range(len(text)) if text.startswith("New Mexico", i)):
        start = next(p for p in doc_tokens if index.token_offsets[p, 0] == char_start)
        end = next(p for p in doc_tokens if index.token_offsets[p, 1] == char_start + len("New Mexico"))
        block = int(start) // 16
        if int(end) // 16 != block:
            continue  # a paragraph longer than a block continues in the next one: no answer spans the cut
        evidence = index.evidence(start, end)
        mine = [p for p in range(block * 16, block * 16 + 16)
                if index.token_docs[p] == 1 and not index.token_flags[p] & SPECIAL]
        passage_start = min(int(index.token_offsets[p, 0]) for p in mine)
        passage_end = max(int(index.token_offsets[p, 1]) for p in mine)
        assert evidence == {"doc_id": "desert", "title": "Chihuahuan Desert", "doc_start": char_start,
                            "doc_end": char_start + 10, "block_id": block, "start": char_start - passage_start,
                            "end": char_start + 10 - passage_start, "text": text[passage_start:passage_end]}
        assert text[evidence["doc_start"] : evidence["doc_end"]] == "New Mexico"
        assert evidence["text"][evidence["start"] : evidence["end"]] == "New Mexico"
        checked += 1
    assert checked >= 1


def test_empty_corpus_is_an_error_and_leaves_nothing(tmp_path, model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    with pytest.raises(ValueError, match=r"no non-empty document \(2 empty ones skipped\)"):
        NPMIndex.build(model, tokenizer, ["", "  "], tmp_path / "index", IndexBuildArguments(**QUIET))
    with pytest.raises(ValueError, match="no non-empty document"):
        NPMIndex.build(model, tokenizer, [], tmp_path / "index", IndexBuildArguments(**QUIET))
    assert os.listdir(tmp_path) == []


def test_interrupted_build_leaves_no_index(tmp_path, model_and_tokenizer, monkeypatch, corpus):
    model, tokenizer = model_and_tokenizer
    calls = {"n": 0}
    original = model.forward

    def crash_on_second_batch(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(model, "forward", crash_on_second_batch)
    with pytest.raises(KeyboardInterrupt):
        NPMIndex.build(model, tokenizer, corpus, tmp_path / "index",
                       IndexBuildArguments(batch_size=1, **{**QUIET, "block_size": 8}))
    assert os.listdir(tmp_path) == [".index.partial"]  # kept for a resume (see index/test_build.py), hidden
    for path in (tmp_path / ".index.partial", tmp_path / ".index.partial" / "index"):
        with pytest.raises(NPMIndexError, match="missing manifest.json"):
            NPMIndex.load(path)


def test_staging_directory_of_a_killed_build_never_loads(tmp_path, npm_dir):
    staging = tmp_path / ".index.tmp-123"
    shutil.copytree(npm_dir / "index", staging)
    os.remove(staging / "manifest.json")  # a build killed before its last step has no manifest yet
    with pytest.raises(NPMIndexError, match="missing manifest.json.*interrupted build"):
        NPMIndex.load(staging)


def test_existing_output_needs_overwrite(tmp_path, model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    first = NPMIndex.build(model, tokenizer, ["Texas is big."], tmp_path / "index", IndexBuildArguments(**QUIET))
    with pytest.raises(FileExistsError, match="--overwrite"):
        NPMIndex.build(model, tokenizer, ["Texas is big."], tmp_path / "index", IndexBuildArguments(**QUIET))
    second = NPMIndex.build(model, tokenizer, ["Ohio River.", "Kentucky."], tmp_path / "index",
                            IndexBuildArguments(overwrite=True, **QUIET))
    assert first.manifest.num_documents == 1 and second.manifest.num_documents == 2
    assert NPMIndex.load(tmp_path / "index").manifest.num_documents == 2
    assert sorted(os.listdir(tmp_path)) == ["index"]


def test_truncated_vectors_are_detected(index_copy):
    with open(index_copy / VECTORS_FILE, "r+b") as handle:
        handle.truncate(os.path.getsize(index_copy / VECTORS_FILE) - 64)
    with pytest.raises(NPMIndexError, match="vectors.npy is .* bytes, the manifest says"):
        NPMIndex.load(index_copy)


@pytest.mark.parametrize("name", ["token_ids.npy", "token_starts.npy", "index.faiss", "documents.jsonl"])
def test_corrupted_files_are_detected(index_copy, name):
    data = bytearray((index_copy / name).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (index_copy / name).write_bytes(bytes(data))
    with pytest.raises(NPMIndexError, match=f"{name} is corrupted"):
        NPMIndex.load(index_copy)


def test_full_verification_hashes_vectors(index_copy):
    data = bytearray((index_copy / VECTORS_FILE).read_bytes())
    data[-3] ^= 0xFF
    (index_copy / VECTORS_FILE).write_bytes(bytes(data))
    with pytest.raises(NPMIndexError, match="vectors.npy is corrupted"):
        NPMIndex.load(index_copy, verify="full")


def test_missing_file_and_corrupted_manifest(index_copy):
    manifest = json.loads((index_copy / "manifest.json").read_text())
    (index_copy / "manifest.json").write_text("{not json")
    with pytest.raises(NPMIndexError, match="manifest.json is corrupted"):
        NPMIndex.load(index_copy)
    (index_copy / "manifest.json").write_text(json.dumps(manifest))
    os.remove(index_copy / "indexed_tokens.npy")
    with pytest.raises(NPMIndexError, match="indexed_tokens.npy is missing"):
        NPMIndex.load(index_copy)


def test_newer_format_asks_for_an_upgrade(index_copy, rewrite_manifest):
    rewrite_manifest(index_copy, lambda m: m.update(format_version=99))
    with pytest.raises(NPMIndexError, match="upgrade npm_hf"):
        NPMIndex.load(index_copy)


def test_missing_index_says_how_to_build_one(tmp_path):
    with pytest.raises(NPMIndexError, match="npm-hf build-index"):
        NPMIndex.load(tmp_path / "nowhere")


def test_fingerprints_catch_other_weights_and_tokenizers(npm_dir, model_and_tokenizer, encoder_dir):
    model, tokenizer = model_and_tokenizer
    index = NPMIndex.load(npm_dir / "index")
    index.check_compatible(model, tokenizer)
    index.check_compatible(model.to(torch.bfloat16).to(torch.float32), tokenizer)  # precision round trip
    other = NPMModel.from_pretrained(npm_dir)
    with torch.no_grad():
        other.encoder.get_input_embeddings().weight[7] += 0.5
    with pytest.raises(IndexMismatchError, match="different encoder weights"):
        index.check_compatible(other, tokenizer)
    changed = AutoTokenizer.from_pretrained(npm_dir)
    changed.add_tokens(["zzyzx"])
    with pytest.raises(IndexMismatchError, match="different tokenizer"):
        index.check_compatible(model, changed)


def test_build_index_from_a_directory_and_its_errors(tmp_path, npm_dir, encoder_dir):
    index = build_index(npm_dir, ["Texas is big."], output_dir=tmp_path / "idx", args=IndexBuildArguments(**QUIET))
    assert index.manifest.num_documents == 1
    with pytest.raises(ValueError, match="not an NPM.*npm-hf convert"):
        build_index(encoder_dir, ["Texas."], output_dir=tmp_path / "x")
    with pytest.raises(ValueError, match="Pass output_dir= and tokenizer="):
        build_index(NPMModel.from_pretrained(npm_dir), ["Texas."])


@pytest.mark.parametrize("kwargs, message", [
    ({"block_size": 2}, "block_size must be >= 3"),
    ({"batch_size": 0}, "batch_size must be >= 1"),
    ({"faiss_factory": " "}, "faiss_factory must be"),
])
def test_build_arguments_are_validated(kwargs, message):
    with pytest.raises(ValueError, match=message):
        IndexBuildArguments(**kwargs)


def test_invalid_faiss_factory(tmp_path, model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    with pytest.raises(ValueError, match="Invalid FAISS factory string 'Nonsense'"):
        NPMIndex.build(model, tokenizer, ["Texas."], tmp_path / "i",
                       IndexBuildArguments(faiss_factory="Nonsense", **QUIET))
    assert os.listdir(tmp_path) == []


def test_approximate_factory_is_rescored_exactly(tmp_path, model_and_tokenizer, corpus):
    model, tokenizer = model_and_tokenizer
    index = NPMIndex.build(model, tokenizer, corpus, tmp_path / "i",
                           IndexBuildArguments(faiss_factory="HNSW8", **QUIET))
    query = np.asarray(index.vectors[5], dtype=np.float32)[None]
    scores, rows = index.search(query, 5)
    expected = np.asarray(index.vectors, dtype=np.float32)[rows[0]] @ query[0]
    np.testing.assert_allclose(scores[0], expected, rtol=1e-5)
    assert rows[0][0] == 5 or scores[0][0] >= float(query[0] @ query[0]) - 1e-3


def test_blocks_longer_than_the_encoder_are_refused(tmp_path, model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    limit = model.config.max_input_length
    with pytest.raises(ValueError, match=f"use block_size <= {limit}"):
        NPMIndex.build(model, tokenizer, ["Texas."], tmp_path / "i", IndexBuildArguments(block_size=limit + 1))
    assert os.listdir(tmp_path) == []


# ------------------------------------------------------------------------------------------- old indexes
def test_an_index_from_an_older_npm_hf_loads_and_warns(npm_dir, tmp_path, mask, make_pipeline, caplog,
                                                       rewrite_manifest):
    from transformers.utils import logging as hf_logging

    old = tmp_path / "model"
    shutil.copytree(npm_dir, old)
    # as written before the fields existed
    rewrite_manifest(old / "index", lambda m: [m.pop(key) for key in
                                               ("boundary_tokens_only", "stopwords_removed", "paragraph_blocks")],
                     seal=False)
    hf_logging.enable_propagation()
    try:
        with caplog.at_level("WARNING"):
            fill = make_pipeline(old)
    finally:
        hf_logging.disable_propagation()
    assert "built by an npm_hf before 0.2" in caplog.text and "npm-hf build-index" in caplog.text
    assert "--overwrite" in caplog.text
    text = f"The Rio Grande flows through {mask} and Texas."
    scores = lambda answers: {a["token_str"]: a["score"] for a in answers}  # noqa: E731
    assert scores(fill(text, top_k=50)) == pytest.approx(scores(make_pipeline(npm_dir)(text, top_k=50)))
