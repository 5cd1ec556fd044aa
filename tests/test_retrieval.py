"""NPM scores against a brute-force NumPy computation that follows the official code's rules (conftest), on the tiny
word-piece vocabularies of conftest (WordPiece and byte-level BPE: most corpus words are two or more pieces)."""

import shutil

import numpy as np
import pytest

import npm_hf
from npm_hf import NPMIndex
from npm_hf.corpus import LINE_START, SPECIAL, WORD_END, WORD_START
from npm_hf.inference.retrieval import Candidates
from npm_hf.inference.stopwords import STOPWORDS, reference_stopword_ids




def query_vectors(fill, text):
    return fill._forward(fill.preprocess(text))["query_vectors"]


def as_scores(answers):
    return {answer["token_str"]: answer["score"] for answer in answers}


def assert_same_scores(got: dict, want: dict):
    assert set(got) == set(want)
    for text, value in want.items():
        assert got[text] == pytest.approx(value, abs=1e-5), text


@pytest.mark.parametrize("temperature", [1.0, 5.0])
def test_single_mode_matches_brute_force(npm_dir, mask, brute_force, temperature, make_pipeline):
    fill = make_pipeline(npm_dir, mode="single", temperature=temperature)
    text = f"Abraham Lincoln was born in {mask}, Kentucky."
    answers = fill(text, top_k=10_000)
    (query,) = query_vectors(fill, text)
    want = brute_force.single(fill.index, query[0], fill.model.config.scale, temperature)
    assert {a["token"]: a["score"] for a in answers} == pytest.approx(want, abs=1e-5)
    assert sum(a["score"] for a in answers) == pytest.approx(1.0, abs=1e-6)
    assert [a["score"] for a in answers] == sorted((a["score"] for a in answers), reverse=True)


@pytest.mark.parametrize("alpha, expand, scoring, aggregation", [
    (0.0, False, "sum", "sum"), (1.0, False, "sum", "sum"), (0.0, True, "sum", "sum"), (0.0, False, "product", "sum"),
    (0.0, False, "sum", "max"), (0.5, True, "product", "max")])
def test_span_mode_matches_brute_force(npm_dir, mask, brute_force, alpha, expand, scoring, aggregation, make_pipeline):
    fill = make_pipeline(npm_dir, length_penalty_alpha=alpha, expand_span_candidates=expand, span_scoring=scoring,
                         phrase_aggregation=aggregation)
    text = f"The Rio Grande flows through {mask} and Texas."
    answers = fill(text, top_k=100_000)
    (vectors,) = query_vectors(fill, text)
    config, decoding = fill.model.config, fill.decoding
    want = brute_force.spans(fill.index, fill.tokenizer, vectors[0], vectors[1], config.scale, decoding.temperature,
                             decoding.max_span_length, alpha=alpha, scoring=scoring, aggregation=aggregation)
    assert_same_scores(as_scores(answers), want)
    assert len(want) > 20  # multi-token phrases are among the candidates
    assert any(len(answer["token"]) > 2 for answer in answers)


def test_temperature_quirk_divides_twice(npm_dir, mask, brute_force, make_pipeline):
    fill = make_pipeline(npm_dir, temperature=3.0, apply_temperature_twice=True)
    text = f"Hagios Demetrios is located in {mask}."
    (vectors,) = query_vectors(fill, text)
    config, decoding = fill.model.config, fill.decoding
    want = brute_force.spans(fill.index, fill.tokenizer, vectors[0], vectors[1], config.scale, 9.0,
                             decoding.max_span_length)
    assert_same_scores(as_scores(fill(text, top_k=100_000)), want)
    plain = make_pipeline(npm_dir, temperature=3.0)
    assert as_scores(plain(text, top_k=3)) != pytest.approx(as_scores(fill(text, top_k=3)))


@pytest.mark.parametrize("rule", ["any", "edges"])
def test_span_stopword_rules(npm_dir, mask, brute_force, rule, make_pipeline):
    fill = make_pipeline(npm_dir, span_stopwords=rule)
    flags, ids = fill.index.token_flags, fill.index.token_ids

    def is_stop(position):  # the word around the position reads as a stop word, however many pieces it has
        first, last = position, position
        while not flags[first] & (WORD_START | SPECIAL):
            first -= 1
        while not flags[last] & (WORD_END | SPECIAL):
            last += 1
        word = fill.tokenizer.decode([int(i) for i in ids[first : last + 1]]).strip().lower()
        return bool(flags[first] & WORD_START and flags[last] & WORD_END) and word in STOPWORDS

    def keep(s, e):
        if rule == "edges":
            return not (is_stop(s) or is_stop(e))
        return not any(is_stop(p) for p in range(s, e + 1))

    text = f"The church of {mask} is in Thessaloniki."
    (vectors,) = query_vectors(fill, text)
    config, decoding = fill.model.config, fill.decoding
    want = brute_force.spans(fill.index, fill.tokenizer, vectors[0], vectors[1], config.scale, decoding.temperature,
                             decoding.max_span_length, stopwords=keep)
    got = as_scores(fill(text, top_k=100_000))
    assert_same_scores(got, want)
    assert "the" not in got and "." not in got
    pieces = [p for p in range(fill.index.num_tokens) if flags[p] & WORD_START and not flags[p] & WORD_END]
    assert any(is_stop(p) for p in pieces)  # a stop word of several pieces ("th ##e") is found too


def test_small_k_uses_only_retrieved_candidates(npm_dir, mask, make_pipeline):
    fill = make_pipeline(npm_dir)
    text = f"New Mexico is hot and {mask} in the summer."
    exact = fill(text, top_k=100_000)
    approximate = fill(text, top_k=100_000, k=40)
    assert 0 < len(approximate) < len(exact)
    assert sum(a["score"] for a in approximate) == pytest.approx(1.0)
    exact_phrases = {a["token_str"] for a in exact}
    assert {a["token_str"] for a in approximate} <= exact_phrases
    (vectors,) = query_vectors(fill, text)
    _, rows = fill.index.search(np.stack([vectors[0], vectors[1]]), 40)
    retrieved_starts, retrieved_ends = set(fill.index.positions[rows[0]]), set(fill.index.positions[rows[1]])
    expanded = make_pipeline(npm_dir, expand_span_candidates=True)(text, top_k=100_000, k=40)
    assert {a["token_str"] for a in approximate} <= {a["token_str"] for a in expanded} <= exact_phrases
    assert len(expanded) > len(approximate)
    starts, ends = fill.predictor.enumerate_spans(np.array(sorted(retrieved_starts)), np.array(sorted(retrieved_ends)))
    assert set(starts.tolist()) <= retrieved_starts and set(ends.tolist()) <= retrieved_ends


def test_spans_respect_boundaries_and_blocks(npm_dir, mask, make_pipeline):
    fill = make_pipeline(npm_dir, max_span_length=4)
    index = fill.index
    starts, ends = fill.predictor.enumerate_spans(index.positions, index.positions)
    flags = index.token_flags
    assert len(starts) > 0
    assert np.all(flags[starts] & WORD_START) and np.all(flags[ends] & WORD_END)
    assert np.all(ends - starts < 4) and np.all(ends >= starts)
    assert np.all(starts // index.block_size == ends // index.block_size)
    assert len(set(zip(starts.tolist(), ends.tolist()))) == len(starts)  # each (s, e) once


def test_exact_search_scores_match_numpy(npm_dir):
    index = NPMIndex.load(npm_dir / "index")
    rng = np.random.default_rng(0)
    queries = rng.normal(size=(3, index.manifest.hidden_size)).astype(np.float32)
    scores, rows = index.search(queries, k=7)
    full = np.asarray(index.vectors, dtype=np.float64) @ queries.T.astype(np.float64)
    for q in range(3):
        expected_rows = np.argsort(-full[:, q])[:7]
        assert rows[q].tolist() == expected_rows.tolist()
        np.testing.assert_allclose(scores[q], full[expected_rows, q], atol=1e-5)


def test_spellings_of_one_phrase_are_summed(npm_dir, mask, brute_force, make_pipeline):
    """BPE tokenizes "Texas" at a document start ("Tex"+"as") unlike mid-text ("ĠTexas"): one phrase, one score."""
    fill = make_pipeline(npm_dir)
    index, tokenizer = fill.index, fill.tokenizer
    spellings = set()
    for doc_start in np.flatnonzero(np.asarray(index.token_docs) == 3):
        for length in (1, 2):
            ids = [int(i) for i in index.token_ids[doc_start : doc_start + length]]
            if tokenizer.decode(ids).strip().lower() == "texas":
                spellings.add(tuple(ids))
    if tokenizer.convert_ids_to_tokens(0) == "<s>":
        assert len(spellings) == 2  # the byte-level BPE case this test is about
    text = f"The Rio Grande flows to {mask}."
    answers = [a for a in fill(text, top_k=100_000) if a["token_str"].lower() == "texas"]
    (vectors,) = query_vectors(fill, text)
    config, decoding = fill.model.config, fill.decoding
    want = brute_force.spans(index, tokenizer, vectors[0], vectors[1], config.scale, decoding.temperature,
                             decoding.max_span_length)
    assert len(answers) == 1 and answers[0]["score"] == pytest.approx(want[answers[0]["token_str"]], abs=1e-6)


@pytest.mark.parametrize("overrides", [
    {}, {"span_scoring": "product", "phrase_aggregation": "max", "length_penalty_alpha": 0.5},
    {"span_stopwords": "any"}, {"span_stopwords": "edges", "max_span_length": 3}, {"expand_span_candidates": True}])
def test_spans_from_a_shared_search_are_those_of_each_pair_alone(npm_dir, mask, make_pipeline, overrides):
    """Batched calls search all query pairs at once and pass each pair its `hits`."""
    fill = make_pipeline(npm_dir, **overrides)
    texts = [f"The Rio Grande flows through {mask} and Texas.", f"Abraham Lincoln was born in {mask}, Kentucky.",
             f"{mask} borders {mask}.", f"Hagios Demetrios is located in {mask}."]
    pairs = np.stack([vectors for text in texts for vectors in query_vectors(fill, text)])
    predictor = fill.predictor
    for k, top_k, targets in ((None, 50, None), (2, 5, None), (25, 3, ["Texas", "New Mexico", "Zanzibar"])):
        scores, rows = predictor.using(k=k).search(pairs.reshape(-1, pairs.shape[-1]))
        shared = [predictor.predict_span(pair[0], pair[1], top_k, targets=targets, candidates=Candidates.whole_index(
                  (scores[2 * i : 2 * i + 2], rows[2 * i : 2 * i + 2]))) for i, pair in enumerate(pairs)]
        assert shared == [predictor.using(k=k).predict_span(pair[0], pair[1], top_k, targets=targets)
                          for pair in pairs]
        if k is None:  # each pair read its own slice of the hits
            assert any(other != shared[0] for other in shared[1:])


@pytest.mark.parametrize("prefilter", ["none", "bm25"])
def test_query_phrases_are_excluded_and_the_rest_renormalised(npm_dir, mask, make_pipeline, prefilter):
    fill = make_pipeline(npm_dir, exclude_query_phrases=True, prefilter=prefilter, prefilter_blocks=2)
    plain = make_pipeline(npm_dir, prefilter=prefilter, prefilter_blocks=2)
    text = f"The Rio Grande flows through {mask} and Texas."
    before, after = as_scores(plain(text, top_k=100_000)), as_scores(fill(text, top_k=100_000))
    tokenizer = fill.tokenizer
    left, right = (tokenizer(part, add_special_tokens=False)["input_ids"] for part in text.split(mask))

    def in_query(phrase):  # with or without a leading space (BPE spells a word after a space differently)
        spellings = [tokenizer(form, add_special_tokens=False)["input_ids"] for form in (phrase, " " + phrase)]
        return any(run[i : i + len(ids)] == ids for ids in spellings for run in (left, right) for i in range(len(run)))

    excluded = {phrase for phrase in before if in_query(phrase)}
    assert {fill.predictor.normalise_target("Texas")} <= excluded
    assert len(excluded) >= 3 and any(" " in phrase for phrase in excluded)  # multi-word query phrases too
    total = sum(score for phrase, score in before.items() if phrase not in excluded)
    assert_same_scores(after, {phrase: score / total for phrase, score in before.items() if phrase not in excluded})
    assert fill(text, targets=["Texas"])[0]["score"] > 0  # scoring given targets is never filtered


LINE_CORPUS = [
    {"id": "list", "title": "Neighbours",
     "text": "Texas borders:\n* New Mexico\n* Oklahoma\nLincoln was born in Kentucky."},
    {"id": "plain", "title": "Rivers", "text": "The Rio Grande flows through New Mexico and Texas."},
]


@pytest.fixture(scope="module")
def lines_npm_dir(encoder_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("lines") / "model"
    npm_hf.convert_encoder(str(encoder_dir), folder, k=4096)
    npm_hf.build_index(folder, LINE_CORPUS, args=npm_hf.IndexBuildArguments(block_size=16, show_progress_bar=False))
    return folder


def test_spans_within_lines_match_brute_force(lines_npm_dir, brute_force, make_pipeline):
    fill = make_pipeline(lines_npm_dir, spans_cross_lines=False)
    assert fill.index.manifest.line_starts_marked
    flags = np.asarray(fill.index.token_flags)
    text = f"Texas borders {fill.tokenizer.mask_token} and Oklahoma."
    (vectors,) = query_vectors(fill, text)
    config, decoding = fill.model.config, fill.decoding
    within_a_line = lambda s, e: not (flags[s + 1 : e + 1] & LINE_START).any()  # noqa: E731
    want = brute_force.spans(fill.index, fill.tokenizer, vectors[0], vectors[1], config.scale, decoding.temperature,
                             decoding.max_span_length, stopwords=within_a_line)
    assert_same_scores(as_scores(fill(text, top_k=100_000)), want)
    crossing = as_scores(make_pipeline(lines_npm_dir)(text, top_k=100_000))
    # each line is a paragraph of its own, with its own special tokens (the official blocks): no span crosses one
    assert set(want) == set(crossing) and not any("\n" in phrase for phrase in crossing)
    assert "mexico oklahoma" not in {phrase.lower() for phrase in crossing}
    # the official candidate expansion walks within lines too
    assert set(as_scores(fill(text, top_k=100_000, expand_span_candidates=True))) == set(want)


def test_spans_within_lines_warn_on_an_index_without_line_marks(lines_npm_dir, tmp_path, make_pipeline, caplog,
                                                                rewrite_manifest):
    import shutil

    from transformers.utils import logging as hf_logging

    old = tmp_path / "model"
    shutil.copytree(lines_npm_dir, old)
    rewrite_manifest(old / "index", lambda m: m.pop("line_starts_marked"), seal=False)  # written before the field
    text = f"Texas borders {make_pipeline(old).tokenizer.mask_token} and Oklahoma."
    hf_logging.enable_propagation()
    try:
        with caplog.at_level("WARNING"):
            within = make_pipeline(old, spans_cross_lines=False)(text, top_k=100_000)
    finally:
        hf_logging.disable_propagation()
    assert "spans_cross_lines=False has no effect: this index was built before npm_hf marked line starts" in caplog.text
    assert as_scores(within) == pytest.approx(as_scores(make_pipeline(old)(text, top_k=100_000)))


# ------------------------------------------------------------------- fidelity to the official code (issue 16)
TEXTS = ["The Rio Grande flows through {mask} and Texas.", "Abraham Lincoln was born in {mask}, Kentucky.",
         "Hagios Demetrios is located in {mask}."]


def test_most_corpus_words_are_several_pieces(npm_dir):
    index = NPMIndex.load(npm_dir / "index")
    flags, ids = np.asarray(index.token_flags), np.asarray(index.token_ids)
    starts, ends = np.flatnonzero(flags & WORD_START), np.flatnonzero(flags & WORD_END)
    words = {tuple(ids[s : e + 1].tolist()) for s, e in zip(starts, ends)}
    assert sum(len(word) > 1 for word in words) > 0.6 * len(words)  # the word-piece case the issue is about


def test_single_mode_never_answers_a_mid_word_piece(npm_dir, mask, brute_force, make_pipeline):
    fill = make_pipeline(npm_dir, mode="single")
    text = f"Abraham Lincoln was born in {mask}, Kentucky."
    answers = fill(text, top_k=10_000)
    (query,) = query_vectors(fill, text)
    assert {a["token"]: a["score"] for a in answers} == pytest.approx(
        brute_force.single(fill.index, query[0], fill.model.config.scale, 1.0), abs=1e-5)
    flags, ids = np.asarray(fill.index.token_flags), np.asarray(fill.index.token_ids)
    boundary = (flags & (WORD_START | WORD_END)) != 0
    only_mid_word = set(ids[~boundary & ((flags & SPECIAL) == 0)].tolist()) - set(ids[boundary].tolist())
    assert len(only_mid_word) > 3  # pieces that only ever occur inside a word ...
    assert not only_mid_word & {a["token"] for a in answers}  # ... are never an answer
    assert len(answers) == len(set(ids[fill.index.positions].tolist()))


@pytest.mark.parametrize("k", [None, 60])
@pytest.mark.parametrize("expand", [False, True])
def test_span_softmaxes_over_retrieved_starts_and_ends(npm_dir, mask, brute_force, make_pipeline, k, expand):
    """P_s over the retrieved word starts, P_e over the retrieved word ends (with `expand`, plus the starts and ends
    of spans walked from them), each normalised on its own; at k < N too."""
    fill = make_pipeline(npm_dir, expand_span_candidates=expand)
    config, decoding = fill.model.config, fill.decoding
    for template in TEXTS:
        text = template.format(mask=mask)
        (vectors,) = query_vectors(fill, text)
        want = brute_force.spans(fill.index, fill.tokenizer, vectors[0], vectors[1], config.scale,
                                 decoding.temperature, decoding.max_span_length, k=k, expand=expand)
        got = as_scores(fill(text, top_k=100_000, k=k or fill.index.num_indexed))
        assert_same_scores(got, want)
    if k is not None and expand:  # expansion finds spans whose other end was not retrieved
        plain = brute_force.spans(fill.index, fill.tokenizer, vectors[0], vectors[1], config.scale,
                                  decoding.temperature, decoding.max_span_length, k=k)
        assert set(plain) < set(want)


def test_one_softmax_over_the_union_would_differ(npm_dir, mask, brute_force, make_pipeline):
    """The separate normalisation is observable: a single softmax over start and end candidates together (what
    npm_hf did before) gives other scores, so the parity tests above can fail."""
    fill = make_pipeline(npm_dir, expand_span_candidates=True)
    text = TEXTS[0].format(mask=mask)
    (vectors,) = query_vectors(fill, text)
    predictor, index = fill.predictor, fill.index
    _, rows = index.search(np.stack(vectors), 60)
    starts, ends = index.positions[rows[0]], index.positions[rows[1]]
    starts = starts[(index.token_flags[starts] & WORD_START) != 0]
    ends = ends[(index.token_flags[ends] & WORD_END) != 0]
    span_starts, span_ends = predictor.enumerate_spans(starts, ends, expand=True)
    start_set = set(starts.tolist()) | set(span_starts.tolist())
    end_set = set(ends.tolist()) | set(span_ends.tolist())
    assert start_set != end_set and start_set & end_set  # overlapping but different candidate sets


def test_remove_stopwords_index(npm_dir, corpus, mask, brute_force, make_pipeline, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(npm_dir, folder, ignore=shutil.ignore_patterns("index"))
    npm_hf.build_index(folder, corpus, args=npm_hf.IndexBuildArguments(block_size=16, remove_stopwords=True,
                                                                       show_progress_bar=False))
    fill = make_pipeline(folder, span_stopwords="reference")
    tokenizer, index = fill.tokenizer, fill.index
    assert index.manifest.stopwords_removed
    stop = reference_stopword_ids(tokenizer)
    assert {tokenizer.convert_tokens_to_ids(t) for t in (".", ",")} <= stop
    assert index.positions.tolist() == brute_force.datastore(index, tokenizer, remove_stopwords=True)
    assert len(index.positions) < len(npm_hf.NPMIndex.load(npm_dir / "index").positions)
    assert not set(np.asarray(index.token_ids)[index.positions].tolist()) & stop  # in neither softmax
    ids = np.asarray(index.token_ids)
    no_stop_word = lambda s, e: not any(int(i) in stop for i in ids[s : e + 1])  # noqa: E731
    config, decoding = fill.model.config, fill.decoding
    for expand in (False, True):
        for template in TEXTS:
            text = template.format(mask=mask)
            (vectors,) = query_vectors(fill, text)
            want = brute_force.spans(index, tokenizer, vectors[0], vectors[1], config.scale, decoding.temperature,
                                     decoding.max_span_length, stopwords=no_stop_word, expand=expand)
            assert_same_scores(as_scores(fill(text, top_k=100_000, expand_span_candidates=expand)), want)
    # spans may still hold a stop word inside, never at an end (it has no vector)
    for answer in fill(TEXTS[0].format(mask=mask), top_k=100_000, span_stopwords="none"):
        first, last = answer["token"][0], answer["token"][-1]
        assert first not in stop and last not in stop
    single = make_pipeline(folder, mode="single")(TEXTS[1].format(mask=mask), top_k=10_000)
    assert not {a["token"] for a in single} & stop


def test_reference_rule_rejects_a_word_whose_first_piece_is_a_stop_word(encoder_dir, tmp_path, make_pipeline):
    """"the ##ssa ##lon ##iki": the official rule looks at ids, wherever they sit; npm_hf's "any" at whole words."""
    folder = tmp_path / "model"
    npm_hf.convert_encoder(str(encoder_dir), folder, k=4096)
    text = "Atlantic Island Tobacco Onward Theodore Inland Isabel Andes Upton Ofelia."
    npm_hf.build_index(folder, [text], args=npm_hf.IndexBuildArguments(block_size=64, show_progress_bar=False))
    fill = make_pipeline(folder, max_span_length=20)
    tokenizer, index = fill.tokenizer, fill.index
    stop = reference_stopword_ids(tokenizer)
    flags, ids = np.asarray(index.token_flags), np.asarray(index.token_ids)
    firsts = [p for p in np.flatnonzero(flags & WORD_START) if not flags[p] & WORD_END and int(ids[p]) in stop]
    assert firsts  # e.g. "a ##t ##l ##an ##t ##i ##c" or "ĠA tl antic"
    word_end = next(e for e in range(firsts[0], firsts[0] + 20) if flags[e] & WORD_END)
    word = tokenizer.decode([int(i) for i in ids[firsts[0] : word_end + 1]]).strip()
    query = f"{fill.tokenizer.mask_token} is a word."
    assert word in as_scores(make_pipeline(folder, span_stopwords="any")(query, top_k=100_000))
    reference = make_pipeline(folder, span_stopwords="reference")(query, top_k=100_000)
    assert reference and word not in as_scores(reference)
    assert all(not set(answer["token"]) & stop for answer in reference)


# ------------------------------------------------------------------------- punctuation inside spans (issue 20)
PUNCTUATION_DOCUMENTS = ["Lincoln was born in Hodgenville, Kentucky, far from Texas.",
                         "The Rio Grande | Texas borders New Mexico. Lincoln met St. Demetrios.",
                         "Kentucky.Ohio is in Thessaloniki, Texas | . The church , Mexico is hot."]


@pytest.fixture(scope="module")
def punctuation_npm_dir(encoder_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("punctuation") / "model"
    npm_hf.convert_encoder(str(encoder_dir), folder, k=4096)
    npm_hf.build_index(folder, PUNCTUATION_DOCUMENTS,
                       args=npm_hf.IndexBuildArguments(block_size=64, show_progress_bar=False))
    return folder


def punctuation_oracle(index, tokenizer, max_len: int, punctuation: str) -> set:
    """The spans span_stopwords="any" keeps, word by word: neither edge word a stop word or a word without a letter
    or digit; no inner stop word; inner punctuation only inside a word (no space on either side) or, with
    punctuation="inner", a one-token "&", "/" or dash between two words that are neither, a comma right after the
    first of them, or a period right after such a word of at most 3 characters. With punctuation="word", only the
    stop-word list's punctuation is checked inside (as before the option existed)."""
    flags, ids = np.asarray(index.token_flags), np.asarray(index.token_ids)
    offsets, n = np.asarray(index.token_offsets), index.num_tokens
    word_of = {}
    for first, last in zip(np.flatnonzero(flags & WORD_START), np.flatnonzero(flags & WORD_END)):
        word_of.update({p: (int(first), int(last)) for p in range(first, last + 1)})
    text = lambda word: fill_text(tokenizer, ids[word[0] : word[1] + 1])  # noqa: E731
    stop = lambda word: text(word).lower() in STOPWORDS  # noqa: E731
    unknown = tokenizer.unk_token  # its text is not known: a symbol
    symbol = lambda word: not any(c.isalnum() for c in text(word).replace(unknown, "")) and bool(text(word))  # noqa
    content = lambda p: p in word_of and not stop(word_of[p]) and not symbol(word_of[p])  # noqa: E731

    def inner_ok(p):
        if p not in word_of:  # a whitespace-only piece (a bare BPE space): part of no word
            return True
        word = word_of[p]
        if symbol(word) if punctuation == "inner" else stop(word) and symbol(word):
            if offsets[p - 1, 1] == offsets[p, 0] and offsets[p, 1] == offsets[p + 1, 0]:
                return True  # inside a word
            before = max(q for q in word_of if q < p)  # the neighbouring words, past whitespace-only pieces
            after = min(q for q in word_of if q > p)
            if punctuation == "word" or word != (p, p) or not (content(before) and content(after)):
                return False
            before = word_of[before]
            attached = offsets[before[1], 1] == offsets[p, 0]
            short = offsets[before[1], 1] - offsets[before[0], 0] <= 3
            return (text(word) in {"&", "/", "-", "\u2013", "\u2014"} or (text(word) == "," and attached)
                    or (text(word) == "." and attached and short))
        return not stop(word)

    spans = set()
    for s in np.flatnonzero(flags & WORD_START):
        for e in range(s, min(s + max_len, n)):
            if flags[e] & SPECIAL or e // index.block_size != s // index.block_size:
                break
            if flags[e] & WORD_END and content(s) and content(e) and all(inner_ok(p) for p in range(s + 1, e)):
                spans.add((int(s), int(e)))
    return spans


def fill_text(tokenizer, ids) -> str:
    return tokenizer.decode([int(i) for i in ids]).strip()


@pytest.mark.parametrize("punctuation", ["word", "inner"])
def test_punctuation_inside_spans_matches_the_rule(punctuation_npm_dir, make_pipeline, punctuation):
    fill = make_pipeline(punctuation_npm_dir, span_stopwords="any", span_punctuation=punctuation, max_span_length=20)
    index = fill.index
    starts, ends = fill.predictor.enumerate_spans(index.positions, index.positions)
    want = punctuation_oracle(index, fill.tokenizer, fill.decoding.max_span_length, punctuation)
    assert set(zip(starts.tolist(), ends.tolist())) == want
    phrases = {index.surface_text(s, e) for s, e in want}
    joined = {"Hodgenville, Kentucky", "St. Demetrios", "Thessaloniki, Texas", "Kentucky, far", "Rio Grande"}
    if punctuation == "inner":
        assert joined - phrases == set()
    else:
        assert phrases & joined == {"Rio Grande"}
    assert "Kentucky.Ohio" in phrases  # inside a word
    assert not {"Mexico. Lincoln", "church , Mexico"} & phrases  # a sentence's end; a clause's spaced comma
    # a bar (WordPiece: [UNK], whose text is not known) joins nothing; the stop-word list alone never knew it
    assert ("Grande | Texas" in phrases) == (punctuation == "word")
    assert not any(phrase.endswith((",", ".", "|")) or phrase.startswith((",", ".", "|")) for phrase in phrases)


@pytest.mark.parametrize("rule, punctuation", [("any", "word"), ("any", "inner"), ("edges", "word")])
def test_no_answer_is_empty_or_punctuation_only(punctuation_npm_dir, make_pipeline, rule, punctuation):
    """After SQuAD's normalisation (the answers' exact match): a bare "|" (a symbol outside the stop-word list; the
    tiny WordPiece vocabulary reads it as [UNK]) used to be an answer."""
    from npm_hf.evaluation.metrics import normalize_answer

    fill = make_pipeline(punctuation_npm_dir, span_stopwords=rule, span_punctuation=punctuation)
    answers = fill(f"{fill.tokenizer.mask_token} borders Texas.", top_k=100_000)
    assert len(answers) > 20
    assert all(normalize_answer(answer["phrase"]) and normalize_answer(answer["token_str"]) for answer in answers)
    every = {answer["phrase"] for answer in make_pipeline(punctuation_npm_dir)(
        f"{fill.tokenizer.mask_token} borders Texas.", top_k=100_000)}
    assert {"|", "."} <= every  # span_stopwords="none" keeps every span, as the paper
