"""Two-stage retrieval: BM25 and dense passage pre-filters (blocks or windows), exact scoring of the kept passages'
tokens with and without the pre-filter's logit bias (brute force), and the pipeline's `prefilter` option."""

import re
from collections import Counter

import numpy as np
import pytest

from npm_hf import NPMIndex
from npm_hf.inference.decoding import NPMDecodingConfig
from npm_hf.inference.retrieval import Candidates
from npm_hf.corpus import SPECIAL, WORD_END, WORD_START
from npm_hf.inference.prefilter import (BM25PassageRetriever, DensePassageRetriever, bm25_query, passage_positions,
                                        passage_ranges, passage_texts)


def kept_passages(fill, outputs, method: str, count: int):
    """The positions and logit bias of what `fill`'s pre-filter keeps for one input under its own settings."""
    decoding = fill.decoding.update(prefilter=method, prefilter_blocks=count)
    candidates = fill.prefilters.candidates(decoding, outputs["text"], outputs["query_embedding"],
                                            fill.tokenizer.mask_token)
    return candidates.positions, candidates.bias


def softmax(x):
    e = np.exp(x - x.max())
    return e / e.sum()


def _word_around(flags, position):
    start, end = position, position
    while not flags[start] & WORD_START:
        start -= 1
    while not flags[end] & WORD_END:
        end += 1
    return start, end


def block_positions(index, blocks):
    return passage_positions(index, passage_ranges(index), blocks)[0]


def test_bm25_finds_the_block_of_the_query_words(npm_dir, corpus):
    index = NPMIndex.load(npm_dir / "index")
    texts = passage_texts(index, passage_ranges(index))
    # Blocks cover the corpus text in whole words (a block boundary inside a word gives the word to both blocks).
    words = lambda text: re.findall(r"\w+", text)  # noqa: E731
    for document in corpus:
        assert set(words(document["text"])) <= {w for text in texts for w in words(text)}
    flags = np.asarray(index.token_flags)
    inside = next(p for p in range(1, index.num_tokens - 1) if not flags[p] & (WORD_START | WORD_END | SPECIAL))
    (text,) = passage_texts(index, np.array([[inside, inside + 1]]))  # one piece from the middle of a word
    assert text == index.surface_text(*_word_around(flags, inside))
    retriever = BM25PassageRetriever(index)
    query = bm25_query("The Chihuahuan Desert covers parts of [MASK], Texas and the Rio Grande", "[MASK]")
    ((top, scores),) = retriever.top_passages([query], n=2)
    assert scores[0] >= scores[1] > 0
    assert len(top) == 2
    positions = block_positions(index, top)
    desert = [d["id"] for d in corpus].index("desert")
    assert desert in np.asarray(index.token_docs[block_positions(index, top[:1])]).tolist()
    assert set(np.asarray(index.token_docs[positions]).tolist()) <= set(range(len(corpus)))
    with pytest.raises(ValueError, match="number of pre-filter passages must be >= 1"):
        retriever.top_passages(["x"], n=0)


def test_span_prediction_among_positions_matches_brute_force(npm_dir, mask, make_pipeline):
    fill = make_pipeline(npm_dir)
    (queries,) = fill._forward(fill.preprocess(f"The Chihuahuan Desert covers parts of {mask}."))["query_vectors"]
    index, predictor = fill.index, fill.predictor
    positions = block_positions(index, np.array([0, 1, 2]))
    answers = predictor.predict_span(queries[0], queries[1], 1000, Candidates.among(positions))
    rows, _ = index.rows_for_positions(positions)
    vectors = np.asarray(index.vectors[rows], dtype=np.float64)
    factor = fill.model.config.scale / fill.decoding.span_temperature
    p_start, p_end = softmax(vectors @ queries[0] * factor), softmax(vectors @ queries[1] * factor)
    allowed = set(positions.tolist())
    assert all(a["evidence"] is not None for a in answers)
    starts, ends = predictor.enumerate_spans(positions, positions)
    assert set(starts.tolist()) <= allowed and set(ends.tolist()) <= allowed
    row_of = {int(p): r for r, p in enumerate(positions)}
    totals = Counter()
    for s, e in zip(starts.tolist(), ends.tolist()):
        text = fill.tokenizer.decode(list(np.asarray(index.token_ids[s : e + 1]))).strip()
        totals[text] += p_start[row_of[s]] + p_end[row_of[e]]
    norm = sum(totals.values())
    assert {a["token_str"]: a["score"] for a in answers} == pytest.approx({t: v / norm for t, v in totals.items()},
                                                                          abs=1e-5)


def test_dense_blocks_are_normalised_mean_vectors(npm_dir):
    index = NPMIndex.load(npm_dir / "index")
    retriever = DensePassageRetriever(index)
    block = 2
    lo, hi = index.block_range(block)
    rows = [r for r, p in enumerate(index.positions) if lo <= p < hi]
    mean = np.asarray(index.vectors[rows], dtype=np.float64).mean(axis=0)
    # stored by the build, one byte per dimension (tests/index/test_dense_passages.py): close, not exact
    assert retriever.embeddings[block].numpy() == pytest.approx(mean / np.linalg.norm(mean), abs=2e-3)
    ((top, scores),) = retriever.top_passages(mean * 3.0, n=1)  # cosine: the scale of the query does not matter
    assert top.tolist() == [block] and scores[0] == pytest.approx(1.0, abs=1e-4)


@pytest.mark.parametrize("method", ["bm25", "dense"])
def test_pipeline_prefilter_scores_only_the_kept_blocks(npm_dir, mask, method, make_pipeline):
    fill = make_pipeline(npm_dir)
    text = f"The Chihuahuan Desert covers parts of {mask}."
    answers = fill(text, top_k=50, prefilter=method, prefilter_blocks=2)
    outputs = fill._forward(fill.preprocess(text))
    positions, bias = kept_passages(fill, outputs, method, 2)
    assert bias is None  # config.prefilter_weight is 0
    assert len(np.unique(positions // fill.index.block_size)) <= 2
    vectors = outputs["query_vectors"][0]
    want = fill.predictor.predict_span(vectors[0], vectors[1], 50, Candidates.among(positions))
    assert [(a["token_str"], round(a["score"], 6)) for a in answers] == \
        [(a["token_str"], round(a["score"], 6)) for a in want]
    assert answers != fill(text, top_k=50)  # the whole-index answers differ
    configured = make_pipeline(npm_dir, prefilter=method)  # the pipeline's own setting does the same
    assert configured(text, top_k=50, prefilter_blocks=2) == answers


def test_single_mode_prefilter_matches_brute_force(npm_dir, mask, make_pipeline):
    fill = make_pipeline(npm_dir, mode="single")
    text = f"Abraham Lincoln was born in {mask}, Kentucky."
    outputs = fill._forward(fill.preprocess(text))
    positions, _ = kept_passages(fill, outputs, "bm25", 2)
    answers = fill(text, top_k=1000, prefilter="bm25", prefilter_blocks=2)
    rows, _ = fill.index.rows_for_positions(positions)
    probs = softmax(np.asarray(fill.index.vectors[rows], dtype=np.float64) @ outputs["query_vectors"][0][0]
                    * fill.model.config.scale / fill.decoding.temperature)
    want = Counter()
    for position, prob in zip(positions.tolist(), probs):
        want[int(fill.index.token_ids[position])] += prob
    assert {a["token"]: a["score"] for a in answers} == pytest.approx(dict(want), abs=1e-6)


def test_bad_prefilter_settings(npm_dir, mask, make_pipeline):
    with pytest.raises(ValueError, match="NPMDecodingConfig.prefilter='bm26' is not supported"):
        NPMDecodingConfig(prefilter="bm26")
    with pytest.raises(ValueError, match="NPMDecodingConfig.span_scoring='mean' is not supported"):
        NPMDecodingConfig(span_scoring="mean")
    with pytest.raises(ValueError, match="prefilter_blocks must be a positive integer, got 0"):
        NPMDecodingConfig(prefilter_blocks=0)
    fill = make_pipeline(npm_dir)
    with pytest.raises(ValueError, match="NPMDecodingConfig.prefilter='bm26' is not supported"):
        fill(f"Texas borders {mask}.", prefilter="bm26")
    with pytest.raises(ValueError, match="prefilter_blocks must be a positive integer"):
        fill(f"Texas borders {mask}.", prefilter="bm25", prefilter_blocks=0)


def test_passage_windows_overlap_by_half_inside_blocks(npm_dir):
    index = NPMIndex.load(npm_dir / "index")
    blocks = passage_ranges(index)
    assert blocks.tolist() == [list(index.block_range(b)) for b in range(len(blocks))]
    windows = passage_ranges(index, passage_tokens=6)
    want = []
    for lo, hi in blocks.tolist():  # 16-token blocks: starts every 3 tokens, the last window flush with the end
        starts = list(range(lo, hi - 6 + 1, 3)) if hi - lo > 6 else [lo]
        if starts[-1] + 6 < hi:
            starts.append(hi - 6)
        want += [[s, min(s + 6, hi)] for s in starts]
    assert windows.tolist() == want
    assert windows[:6].tolist() == [[0, 6], [3, 9], [6, 12], [9, 15], [10, 16], [16, 22]]
    assert passage_ranges(index, passage_tokens=10_000).tolist() == blocks.tolist()
    with pytest.raises(ValueError, match="at least 2 tokens"):
        passage_ranges(index, passage_tokens=1)


def test_dense_windows_are_normalised_mean_vectors(npm_dir):
    index = NPMIndex.load(npm_dir / "index")
    retriever = DensePassageRetriever(index, passage_tokens=6)
    positions = np.asarray(index.positions)
    for passage, (lo, hi) in enumerate(retriever.ranges.tolist()):
        rows = np.flatnonzero((positions >= lo) & (positions < hi))
        if len(rows) == 0:  # a window of mid-word pieces and padding has no vector: it matches nothing
            assert not retriever.embeddings[passage].numpy().any()
            continue
        mean = np.asarray(index.vectors[rows], dtype=np.float64).mean(axis=0)
        assert retriever.embeddings[passage].numpy() == pytest.approx(mean / np.linalg.norm(mean), abs=1e-5)


def test_bm25_windows_find_the_sentence_of_the_query_words(npm_dir):
    index = NPMIndex.load(npm_dir / "index")
    retriever = BM25PassageRetriever(index, passage_tokens=8)
    ((top, scores),) = retriever.top_passages([bm25_query("[MASK] lies in the Chihuahuan Desert", "[MASK]")], n=3)
    assert "Chihuahuan" in passage_texts(index, retriever.ranges[top[:1]])[0]
    assert list(scores) == sorted(scores, reverse=True)


def test_passage_bias_is_the_weighted_best_relative_score(npm_dir):
    index = NPMIndex.load(npm_dir / "index")
    ranges = np.array([[0, 6], [3, 9], [16, 20]])
    positions, bias = passage_positions(index, ranges, np.array([1, 0, 2]), np.array([4.0, 2.0, 1.0]), weight=3.0)
    flags = np.asarray(index.token_flags)
    want = {p: 3.0 for p in range(3, 9)} | {p: 1.5 for p in range(0, 3)} | {p: 0.75 for p in range(16, 20)}
    indexed = set(index.positions.tolist())  # tokens with a vector: no special token, no mid-word piece
    want = {p: b for p, b in want.items() if p in indexed}
    assert not any(flags[p] & SPECIAL for p in want)
    assert positions.tolist() == sorted(want) and bias.tolist() == [want[p] for p in sorted(want)]
    same, none = passage_positions(index, ranges, np.array([1, 0, 2]), np.array([4.0, 2.0, 1.0]), weight=0.0)
    assert same.tolist() == positions.tolist() and none is None
    _, none = passage_positions(index, ranges, np.array([1, 0]), np.array([0.0, 0.0]), weight=3.0)
    assert none is None  # BM25 scores 0 when no word matches: no relevance to share out


@pytest.mark.parametrize("method", ["bm25", "dense"])
def test_prefilter_weight_biases_span_logits_exactly(npm_dir, mask, method, make_pipeline):
    fill = make_pipeline(npm_dir, prefilter_passage_tokens=12, prefilter_weight=2.5)
    text = f"The Chihuahuan Desert covers parts of {mask}."
    outputs = fill._forward(fill.preprocess(text))
    positions, bias = kept_passages(fill, outputs, method, 3)
    assert bias is not None and bias.max() == pytest.approx(2.5) and len(np.unique(bias)) > 1
    answers = fill(text, top_k=1000, prefilter=method, prefilter_blocks=3)
    queries = outputs["query_vectors"][0]
    index, predictor = fill.index, fill.predictor
    rows, indexed = index.rows_for_positions(positions)
    positions, rows, bias = positions[indexed], rows[indexed], bias[indexed]
    vectors = np.asarray(index.vectors[rows], dtype=np.float64)
    factor = fill.model.config.scale / fill.decoding.span_temperature
    p_start, p_end = softmax(vectors @ queries[0] * factor + bias), softmax(vectors @ queries[1] * factor + bias)
    row_of = {int(p): r for r, p in enumerate(positions)}
    totals = Counter()
    for s, e in zip(*predictor.enumerate_spans(positions, positions)):
        text_ = fill.tokenizer.decode(list(np.asarray(index.token_ids[s : e + 1]))).strip()
        totals[text_] += p_start[row_of[int(s)]] + p_end[row_of[int(e)]]
    norm = sum(totals.values())
    assert {a["token_str"]: a["score"] for a in answers} == pytest.approx({t: v / norm for t, v in totals.items()},
                                                                          abs=1e-5)
    unbiased = fill.predictor.predict_span(queries[0], queries[1], 1000, Candidates.among(positions))
    assert [a["score"] for a in unbiased] != pytest.approx([a["score"] for a in answers])


def test_single_mode_prefilter_weight_matches_brute_force(npm_dir, mask, make_pipeline):
    fill = make_pipeline(npm_dir, mode="single", prefilter_passage_tokens=8, prefilter_weight=1.5)
    text = f"Abraham Lincoln was born in {mask}, Kentucky."
    outputs = fill._forward(fill.preprocess(text))
    positions, bias = kept_passages(fill, outputs, "bm25", 4)
    answers = fill(text, top_k=1000, prefilter="bm25", prefilter_blocks=4)
    rows, indexed = fill.index.rows_for_positions(positions)
    probs = softmax(np.asarray(fill.index.vectors[rows[indexed]], dtype=np.float64) @ outputs["query_vectors"][0][0]
                    * fill.model.config.scale / fill.decoding.temperature + bias[indexed])
    want = Counter()
    for position, prob in zip(positions[indexed].tolist(), probs):
        want[int(fill.index.token_ids[position])] += prob
    assert {a["token"]: a["score"] for a in answers} == pytest.approx(dict(want), abs=1e-6)


@pytest.mark.parametrize("method", ["bm25", "dense"])
def test_passage_settings_per_call_override_the_config(npm_dir, mask, method, make_pipeline):
    text = f"The Chihuahuan Desert covers parts of {mask}."
    windows = make_pipeline(npm_dir, prefilter_passage_tokens=8, prefilter_weight=2.5)(
        text, top_k=50, prefilter=method, prefilter_blocks=3)
    blocks = make_pipeline(npm_dir)(text, top_k=50, prefilter=method, prefilter_blocks=3)
    assert windows != blocks
    fill = make_pipeline(npm_dir)
    assert fill(text, top_k=50, prefilter=method, prefilter_blocks=3, prefilter_passage_tokens=8,
                prefilter_weight=2.5) == windows
    assert fill(text, top_k=50, prefilter=method, prefilter_blocks=3) == blocks  # the call changed nothing
    configured = make_pipeline(npm_dir, prefilter_passage_tokens=8, prefilter_weight=2.5)
    assert configured(text, top_k=50, prefilter=method, prefilter_blocks=3, prefilter_passage_tokens="blocks",
                      prefilter_weight=0) == blocks


def test_bad_passage_settings(npm_dir, mask, make_pipeline):
    with pytest.raises(ValueError, match='prefilter_passage_tokens must be an integer >= 2 or "blocks" or None, got 1'):
        NPMDecodingConfig(prefilter_passage_tokens=1)
    with pytest.raises(ValueError, match="prefilter_weight must be a finite number >= 0, got -1"):
        NPMDecodingConfig(prefilter_weight=-1.0)
    fill = make_pipeline(npm_dir)
    with pytest.raises(ValueError, match="one value per position, and sorted unique positions"):
        fill.predictor.predict_span(np.ones(32), np.ones(32), 5, Candidates.among(np.array([3, 2]), np.zeros(2)))
    for bad in (1, 8.0, "windows", True):
        allowed = 'an integer >= 2 or "blocks" or None'
        with pytest.raises(ValueError, match=f"{allowed}, got {bad!r}"):
            fill(f"The Chihuahuan Desert covers parts of {mask}.", prefilter="bm25", prefilter_passage_tokens=bad)
    for bad in (-1.0, float("nan"), "2"):
        with pytest.raises(ValueError, match="prefilter_weight must be a finite number >= 0"):
            fill(f"The Chihuahuan Desert covers parts of {mask}.", prefilter="bm25", prefilter_weight=bad)


# ---------------------------------------------------------------------------------- BM25 saved with the index
def _bm25_pipeline(model_and_tokenizer, index):
    from npm_hf import NonparametricFillMaskPipeline

    model, tokenizer = model_and_tokenizer
    return NonparametricFillMaskPipeline(model=model, tokenizer=tokenizer, index=index, decoding={"prefilter": "bm25"})


def test_bm25_saved_with_the_index_loads_without_reading_the_passages(two_builds, model_and_tokenizer, mask,
                                                                       monkeypatch):
    import npm_hf.inference.prefilter as prefilter

    saved, plain = two_builds
    assert saved.manifest.bm25_passages == [None, 8] and plain.manifest.bm25_passages == []
    files = set(saved.manifest.files)
    assert {"bm25-blocks.data.npy", "bm25-blocks.words.npy", "bm25-8tok.word_ids.npy"} <= files  # checksummed
    assert not [name for name in files if name.endswith("vocab.json")]  # the vocabulary is kept once, on disk
    queries = [f"Hagios Demetrios is located in {mask}.", f"The Ohio River borders {mask}.", f"{mask} grew up."]
    expected = {passages: [_bm25_pipeline(model_and_tokenizer, plain)(q, prefilter_passage_tokens=passages, top_k=5)
                           for q in queries] for passages in (None, 8, 4)}

    def no_passage_texts(*args):
        raise AssertionError("the saved BM25 index should have been loaded")

    monkeypatch.setattr(prefilter, "passage_texts", no_passage_texts)
    fill = _bm25_pipeline(model_and_tokenizer, NPMIndex.load(saved.path, verify="full"))
    for passages in (None, 8):
        assert [fill(q, prefilter_passage_tokens=passages, top_k=5) for q in queries] == expected[passages]
    with pytest.raises(AssertionError, match="should have been loaded"):  # 4-token windows were not saved
        fill(queries[0], prefilter_passage_tokens=4)
    monkeypatch.undo()
    assert [fill(q, prefilter_passage_tokens=4, top_k=5) for q in queries] == expected[4]  # built in memory


def test_edits_keep_the_saved_bm25_in_step(two_builds, model_and_tokenizer, mask):
    saved, plain = two_builds
    new = [{"id": "zorb", "title": "Borvin", "text": "Borvin lives in Saltoria. Saltoria is cold."}]
    fill = _bm25_pipeline(model_and_tokenizer, saved)
    before = {name: saved.manifest.files[name]["sha256"] for name in saved.manifest.files if name.startswith("bm25")}
    for index in (saved, plain):
        index.add_documents(*model_and_tokenizer, new)
        index.delete_documents(["texas"])
    after = NPMIndex.load(saved.path, verify="full")  # the segment's BM25 files are checksummed
    assert {name: after.manifest.files[name]["sha256"] for name in before} == before  # the base's are kept
    assert {name for name in after.manifest.files if name.startswith("append-00001.bm25-")} == {
        f"append-00001.bm25-{key}.{part}" for key in ("blocks", "8tok")
        for part in ("data.npy", "indices.npy", "indptr.npy", "words.npy", "word_ids.npy", "params.json")}
    queries = (f"Borvin lives in {mask}.", f"Texas borders {mask}.", f"{mask} is cold.")
    for query in queries:
        for passages in (None, 8):
            got = fill(query, prefilter_passage_tokens=passages, top_k=5)  # the same pipeline sees the edits
            assert got and "texas" not in {a["evidence"]["doc_id"] for a in got if a["evidence"]}
    # the one passage that shares words with the query is the new one (others: score 0, in any order)
    kept = fill(f"Borvin lives in {mask}.", prefilter_blocks=1, top_k=100)
    assert kept and {a["evidence"]["doc_id"] for a in kept if a["evidence"]} == {"zorb"}
    for index in (saved, plain):  # compacted: one BM25 index again, saved as a build saves it
        index.compact()
    assert not [name for name in saved.manifest.files if name.startswith("append-")]
    reference = _bm25_pipeline(model_and_tokenizer, plain)
    for query in queries:
        for passages in (None, 8):
            got = fill(query, prefilter_passage_tokens=passages, top_k=5)
            assert got == reference(query, prefilter_passage_tokens=passages, top_k=5)


def test_bad_bm25_passage_lists_are_refused():
    from npm_hf import IndexBuildArguments

    for bad in ("blocks,1", "sentences", "8,x", ""):
        with pytest.raises(ValueError, match="bm25_passages=.*'blocks' or a window size >= 2"):
            IndexBuildArguments(bm25_passages=bad)
