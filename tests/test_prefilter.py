"""Two-stage retrieval: BM25 and dense block pre-filters, exact scoring of the kept blocks' tokens (brute force),
and the pipeline's `prefilter` option."""

from collections import Counter

import numpy as np
import pytest

from npm_hf import NPMConfig, NPMIndex
from npm_hf.prefilter import BM25BlockRetriever, DenseBlockRetriever, block_positions, block_texts, bm25_query


def softmax(x):
    e = np.exp(x - x.max())
    return e / e.sum()


def test_bm25_finds_the_block_of_the_query_words(npm_dir, corpus):
    index = NPMIndex.load(npm_dir / "index")
    texts = block_texts(index)
    # Blocks cover the corpus text (a block boundary may fall anywhere, even inside a word: compare without spaces).
    squeeze = lambda text: "".join(text.split())  # noqa: E731
    assert squeeze("".join(texts)) == squeeze("".join(d["text"] for d in corpus))
    retriever = BM25BlockRetriever(index)
    query = bm25_query("The Chihuahuan Desert covers parts of [MASK], Texas and the Rio Grande", "[MASK]")
    (top,) = retriever.top_blocks([query], n=2)
    assert len(top) == 2
    positions = block_positions(index, top)
    desert = [d["id"] for d in corpus].index("desert")
    assert desert in np.asarray(index.token_docs[block_positions(index, top[:1])]).tolist()
    assert set(np.asarray(index.token_docs[positions]).tolist()) <= set(range(len(corpus)))
    with pytest.raises(ValueError, match="must be >= 1"):
        retriever.top_blocks(["x"], n=0)


def test_span_prediction_among_positions_matches_brute_force(npm_dir, mask, make_pipeline):
    fill = make_pipeline(npm_dir)
    (queries,) = fill._forward(fill.preprocess(f"The Chihuahuan Desert covers parts of {mask}."))["query_vectors"]
    index, predictor = fill.index, fill.predictor
    positions = block_positions(index, np.array([0, 1, 2]))
    answers = predictor.predict_span_among(queries[0], queries[1], positions, top_k=1000)
    rows, _ = index.rows_for_positions(positions)
    vectors = np.asarray(index.vectors[rows], dtype=np.float64)
    factor = fill.model.config.scale / fill.model.config.span_temperature
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
    retriever = DenseBlockRetriever(index)
    block = 2
    lo, hi = index.block_range(block)
    rows = [r for r, p in enumerate(index.positions) if lo <= p < hi]
    mean = np.asarray(index.vectors[rows], dtype=np.float64).mean(axis=0)
    assert retriever.embeddings[block].numpy() == pytest.approx(mean / np.linalg.norm(mean), abs=1e-5)
    (top,) = retriever.top_blocks(mean * 3.0, n=1)  # cosine: the scale of the query does not matter
    assert top.tolist() == [block]


@pytest.mark.parametrize("method", ["bm25", "dense"])
def test_pipeline_prefilter_scores_only_the_kept_blocks(npm_dir, mask, method, make_pipeline):
    fill = make_pipeline(npm_dir)
    text = f"The Chihuahuan Desert covers parts of {mask}."
    answers = fill(text, top_k=50, prefilter=method, prefilter_blocks=2)
    outputs = fill._forward(fill.preprocess(text))
    positions = fill.prefilter_positions(outputs, method, 2)
    assert len(np.unique(np.asarray(fill.index.token_flags[positions]) * 0 + positions // 16)) <= 2
    vectors = outputs["query_vectors"][0]
    want = fill.predictor.predict_span_among(vectors[0], vectors[1], positions, top_k=50)
    assert [(a["token_str"], round(a["score"], 6)) for a in answers] == \
        [(a["token_str"], round(a["score"], 6)) for a in want]
    assert answers != fill(text, top_k=50)  # the whole-index answers differ
    fill.model.config.prefilter = method  # the config default does the same
    assert fill(text, top_k=50, prefilter_blocks=2) == answers


def test_single_mode_prefilter_matches_brute_force(npm_dir, mask, make_pipeline):
    fill = make_pipeline(npm_dir, mode="single")
    text = f"Abraham Lincoln was born in {mask}, Kentucky."
    outputs = fill._forward(fill.preprocess(text))
    positions = fill.prefilter_positions(outputs, "bm25", 2)
    answers = fill(text, top_k=1000, prefilter="bm25", prefilter_blocks=2)
    rows, _ = fill.index.rows_for_positions(positions)
    probs = softmax(np.asarray(fill.index.vectors[rows], dtype=np.float64) @ outputs["query_vectors"][0][0]
                    * fill.model.config.scale / fill.model.config.temperature)
    want = Counter()
    for position, prob in zip(positions.tolist(), probs):
        want[int(fill.index.token_ids[position])] += prob
    assert {a["token"]: a["score"] for a in answers} == pytest.approx(dict(want), abs=1e-6)


def test_bad_prefilter_settings(npm_dir, mask, make_pipeline):
    with pytest.raises(ValueError, match="NPMConfig.prefilter='bm26' is not supported"):
        NPMConfig(prefilter="bm26")
    with pytest.raises(ValueError, match="NPMConfig.span_scoring='mean' is not supported"):
        NPMConfig(span_scoring="mean")
    with pytest.raises(ValueError, match="prefilter_blocks must be >= 1"):
        NPMConfig(prefilter_blocks=0)
    fill = make_pipeline(npm_dir)
    with pytest.raises(ValueError, match="Unknown pre-filter 'bm26'"):
        fill(f"Texas borders {mask}.", prefilter="bm26")
    with pytest.raises(ValueError, match="prefilter_blocks must be a positive integer"):
        fill(f"Texas borders {mask}.", prefilter="bm25", prefilter_blocks=0)
