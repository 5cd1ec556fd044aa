"""Evaluation harness: task loaders and templates, metrics, closed-set phrase scores against brute force,
end-to-end runs for NPMs and the parametric baseline, bad input."""

import dataclasses
import json
import shutil

import numpy as np
import pytest
from transformers import AutoTokenizer

import npm_hf
from npm_hf import EvaluationArguments, NPMModel
from npm_hf.cli import main as cli_main
from npm_hf.evaluation import bucketed_exact_match, get_task, load_examples, normalize_answer, results_to_markdown
from npm_hf.evaluation.metrics import accuracy, exact_match_rate, length_bucket
from npm_hf.hub_cards import load_card_facts
from npm_hf.inference.decoding import NPMDecodingConfig




def softmax(x):
    e = np.exp(x - x.max())
    return e / e.sum()


def write_lines(path, lines):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture
def data_dir(tmp_path):
    """Tiny copies of every offline task file, in the layout of ../shared/offline_data."""
    root = tmp_path / "data"
    sentences = ["0 a dull , boring film .", "1 a great film .", "1 texas is great .", "1 lovely and warm ."]
    for name in ("stsa.binary.test", "rt-polarity.all", "custrev.all", "subj.all"):
        write_lines(root / "sent_classification" / name, sentences)
    write_lines(root / "vader_snippets" / "amazonReviewSnippets_GroundTruth.txt",
                ["1_1\t-0.9\tbroken on arrival.", "1_2\t0.0\tit is a box.", "1_3\t2.5\tworks great."])
    write_lines(root / "ag_news" / "test.csv", ['"3","Oil prices up","Crude \\oil rose today."',
                                                '"2","Texas wins","The team won the game."'])
    write_lines(root / "rte" / "val.jsonl", [
        json.dumps({"premise": "Lincoln was born in Kentucky.", "hypothesis": "Lincoln was born.",
                    "label": "entailment", "idx": 0}),
        json.dumps({"premise": "It rained!", "hypothesis": "The sun shone.", "label": "not_entailment", "idx": 1})])
    write_lines(root / "lama" / "relations.jsonl", [json.dumps({"relation": "P19", "template": "[X] was born in [Y] ."})])
    write_lines(root / "lama" / "trex" / "P19.jsonl", [json.dumps({
        "sub_label": "Abraham Lincoln", "obj_label": "Hodgenville",
        "evidences": [{"masked_sentence": "Abraham Lincoln was born in [MASK], Kentucky.", "obj_surface": "Hodgenville",
                       "sub_surface": "Abraham Lincoln"}]})])
    for relation in ("place_of_birth", "date_of_birth", "place_of_death"):
        write_lines(root / "lama" / "google_re" / f"{relation}_test.jsonl", [json.dumps({
            "sub_label": "Abraham Lincoln", "obj_label": "Kentucky", "masked_sentences": [],
            "evidences": [{"url": "u", "snippet": "Abraham Lincoln was born in Hodgenville, Kentucky."}]})])
    return root


# ------------------------------------------------------------------------------------------- tasks and data
def test_every_offline_task_loads_with_its_template(data_dir):
    examples = {name: load_examples(get_task(name), data_dir=str(data_dir))[0]
                for name in ("sst2", "mr", "rt", "cr", "subj", "amazon", "agn", "rte", "lama-trex", "lama-google-re")}
    assert examples["sst2"][0] == {"text": "a dull , boring film .", "label": 0}
    assert [e["label"] for e in examples["amazon"]] == [0, 1]  # the neutral (0.0) snippet is dropped
    assert examples["agn"][0] == {"title": "Oil prices up", "description": "Crude  oil rose today.", "label": 2}
    assert [e["label"] for e in examples["rte"]] == [0, 1]
    assert len(examples["lama-google-re"]) == 3
    mask = "<mask>"
    assert get_task("sst2").template(examples["sst2"][1], mask) == "a great film . It was<mask>."
    assert get_task("subj").template(examples["subj"][1], mask) == "a great film . This is a<mask>."
    assert get_task("agn").template(examples["agn"][1], mask) == \
        "Texas wins \n The team won the game. The text topic is about<mask>."
    assert get_task("rte").template(examples["rte"][0], mask) == \
        "Lincoln was born in Kentucky, right?<mask>, lincoln was born."
    assert get_task("rte").template(examples["rte"][1], mask) == "It rained, right?<mask>, the sun shone."
    assert get_task("lama-trex").template(examples["lama-trex"][0], mask) == "Abraham Lincoln was born in <mask> ."
    assert examples["lama-trex"][0]["evidence"] == ["Abraham Lincoln was born in Hodgenville, Kentucky."]
    assert get_task("lama-google-re").template(
        {"subject": "Ada", "template": "[X] (born [Y])."}, mask) == "Ada (born <mask>)."
    assert get_task("yahoo").template({"title": "t", "content": "c", "answer": "a"}, mask) == \
        "title: t content: c answer: a The text topic is about<mask>."


def test_a_single_data_file_can_be_passed(data_dir):
    examples, source = load_examples(get_task("cr"), data=str(data_dir / "sent_classification" / "custrev.all"))
    assert len(examples) == 4 and source.endswith("custrev.all")


def test_missing_data_says_where_files_go(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match=r"sent_classification/stsa.binary.test.*--data PATH"):
        load_examples(get_task("sst2"), data_dir=str(tmp_path))
    with pytest.raises(FileNotFoundError, match="reads local files only"):
        load_examples(get_task("lama-trex"), data="no/such/dataset")
    with pytest.raises(FileNotFoundError, match="neither"):
        load_examples(get_task("sst2"), data=str(tmp_path / "missing.txt"))


def test_labels_outside_the_task_are_refused(tmp_path):
    path = write_lines(tmp_path / "sst.txt", ["0 fine .", "7 odd ."])
    with pytest.raises(ValueError, match=r"labels \[7\].*outside 0..1"):
        load_examples(get_task("sst2"), data=str(path))


def test_unknown_task_and_bad_arguments():
    with pytest.raises(ValueError, match="Unknown task 'sst5'.*sst2"):
        EvaluationArguments(task="sst5")
    with pytest.raises(ValueError, match="NPMDecodingConfig.prefilter='bm26' is not supported"):
        EvaluationArguments(task="lama-trex", prefilter="bm26")
    with pytest.raises(ValueError, match="evidence_corpus is for the LAMA tasks"):
        EvaluationArguments(task="sst2", evidence_corpus=True)
    with pytest.raises(ValueError, match="'sst2' is closed-set.*pre-filter is for open-set tasks"):
        EvaluationArguments(task="sst2", prefilter="bm25")


def test_paper_protocol_settings():
    closed = EvaluationArguments(task="sst2", paper_protocol=True)
    assert (closed.k, closed.temperature, closed.apply_temperature_twice, closed.fuzzy_verbalizer) == \
        (4096, 5.0, True, True)
    assert EvaluationArguments(task="subj", paper_protocol=True).fuzzy_verbalizer is False  # none in the paper
    open_set = EvaluationArguments(task="lama-trex", paper_protocol=True)
    assert (open_set.k, open_set.temperature, open_set.prefilter, open_set.prefilter_blocks,
            open_set.span_stopwords) == (4096, 1.0, "bm25", 3, "reference")


# ------------------------------------------------------------------------------------------------- metrics
def test_squad_normalisation_and_exact_match():
    assert normalize_answer("The  Ohio River!") == "ohio river"
    assert normalize_answer("An apple, a day") == "apple day"
    assert exact_match_rate(["the Texas", "Texas.", "New Mexico"], ["Texas", "texas", "Mexico"]) == pytest.approx(2 / 3)
    assert accuracy([1, 0, 1, 1], [1, 1, 1, 0]) == 0.5


def test_bucketed_exact_match_is_a_macro_average_over_length_buckets():
    predictions = ["a", "x", "b c", "d e f", "g h i j k", "no"]
    references = ["a", "y", "b c", "d e f", "g h i j k", "l m n o p"]
    buckets = [length_bucket(n) for n in (1, 1, 2, 3, 5, 7)]
    result = bucketed_exact_match(predictions, references, buckets)
    # bucket 1: 1/2, bucket 2: 1/1, bucket 3: 1/1, bucket 4+: 1/2 -> macro (0.5 + 1 + 1 + 0.5) / 4
    assert result["macro_exact_match"] == pytest.approx(0.75)
    assert result["micro_exact_match"] == pytest.approx(4 / 6)
    assert result["buckets"]["4+"] == {"exact_match": 0.5, "count": 2}


# ----------------------------------------------------------------------------------- closed-set scoring
def brute_force_phrase_probability(index, queries, phrase, factor, single):
    """Sum of one softmax over every (query, token) pair, where the phrase starts (or, for the end query, ends)."""
    vectors = np.asarray(index.vectors, dtype=np.float64)
    logits = np.concatenate([vectors @ np.asarray(q, dtype=np.float64) for q in queries]) * factor
    probs = softmax(logits)
    ids, n, block = np.asarray(index.token_ids), index.num_tokens, index.manifest.block_size
    total = 0.0
    for query_number in range(len(queries)):
        for row, position in enumerate(index.positions):
            first = position - (len(phrase) - 1) if query_number == 1 and not single else position
            last = first + len(phrase) - 1
            if first < 0 or last >= n or first // block != last // block:
                continue
            if list(ids[first : last + 1]) == list(phrase):
                total += probs[query_number * len(index.positions) + row]
    return total


@pytest.mark.parametrize("mode, twice", [("span", False), ("span", True), ("single", False)])
def test_phrase_probabilities_match_brute_force(npm_dir, mask, mode, twice, make_pipeline):
    fill = make_pipeline(npm_dir, mode=mode, temperature=2.0, apply_temperature_twice=twice)
    text = f"The Rio Grande flows through {mask} and Texas."
    (queries,) = fill._forward(fill.preprocess(text))["query_vectors"]
    config, decoding = fill.model.config, fill.decoding
    temperature = 4.0 if twice else 2.0
    phrases = [fill.tokenizer(w, add_special_tokens=False)["input_ids"] for w in (" Texas", " New Mexico", " Ohio")]
    assert max(len(p) for p in phrases) > 1
    got = fill.predictor.phrase_probabilities(queries, phrases)
    for phrase, value in zip(phrases, got):
        want = brute_force_phrase_probability(fill.index, queries, phrase, config.scale / temperature,
                                              single=mode == "single")
        assert value == pytest.approx(want, abs=1e-6)
    assert got[0] > 0 and got[1] > 0


# ------------------------------------------------------------------------------------------- end to end
def test_closed_set_evaluation_of_an_npm(npm_dir, data_dir, tmp_path, make_pipeline):
    args = EvaluationArguments(task="sst2", data_dir=str(data_dir), temperature=3.0, batch_size=3,
                               show_progress_bar=False)
    model = NPMModel.from_pretrained(npm_dir)
    # a shipped open-set decoding must not change closed-set scoring
    results = npm_hf.evaluate(model, args, decoding={"prefilter": "bm25"})
    assert NPMDecodingConfig.for_model(model).temperature == 1.0  # the run's settings changed nothing shared
    assert results["settings"]["prefilter"] == "none" and results["settings"]["prefilter_blocks"] is None
    assert results["num_examples"] == 4 and results["majority_baseline"] == 0.75
    fill = make_pipeline(npm_dir, temperature=3.0)
    task = get_task("sst2")
    examples, _ = load_examples(task, data_dir=str(data_dir))
    want = []
    for example in examples:  # one query at a time through the pipeline: batching must not change anything
        (queries,) = fill._forward(fill.preprocess(task.template(example, fill.tokenizer.mask_token)))["query_vectors"]
        ids = [fill.tokenizer(w, add_special_tokens=False)["input_ids"] for (w,) in task.label_words]
        want.append(int(np.argmax(fill.predictor.phrase_probabilities(queries, ids))))
    assert results["predictions"] == want
    assert results["score"] == pytest.approx(np.mean(np.array(want) == [e["label"] for e in examples]))
    assert results["settings"]["temperature"] == 3.0 and results["model_type"] == "npm"
    path = npm_hf.evaluation.save_results(results, tmp_path / "out" / "r.json")
    assert json.loads(path.read_text())["score"] == results["score"]
    assert "| sst2 |" in results_to_markdown([results])


def test_fuzzy_verbaliser_uses_equal_length_synonym_lists(npm_dir, data_dir):
    args = EvaluationArguments(task="sst2", data_dir=str(data_dir), fuzzy_verbalizer=True, show_progress_bar=False)
    results = npm_hf.evaluate(str(npm_dir), args)
    assert [len(group) for group in results["label_words"]] == [8, 8]
    assert results["label_words"][1][:2] == [" great", " good"]


def test_open_set_evaluation_with_the_evidence_corpus(npm_dir, data_dir):
    for prefilter in ("none", "bm25", "dense"):
        args = EvaluationArguments(task="lama-trex", data_dir=str(data_dir), evidence_corpus=True,
                                   prefilter=prefilter, show_progress_bar=False)
        results = npm_hf.evaluate(str(npm_dir), args)
        assert results["num_examples"] == 1 and results["settings"]["index_documents"] == 1
        assert results["settings"]["prefilter"] == prefilter
        (answers,) = results["predictions"]
        assert 1 <= len(answers) <= 5
        assert all(a in "Abraham Lincoln was born in Hodgenville, Kentucky." for a in answers)  # from the evidence
        assert results["score"] == float(normalize_answer(answers[0]) == "hodgenville")
        assert results["macro_exact_match_at_5"] == float(any(normalize_answer(a) == "hodgenville" for a in answers))


def test_paper_protocol_open_set_needs_an_index_without_stop_words(npm_dir, data_dir, tmp_path):
    args = EvaluationArguments(task="lama-trex", data_dir=str(data_dir), paper_protocol=True, show_progress_bar=False)
    with pytest.raises(ValueError, match="index without stop-word tokens.*--remove-stopwords"):
        npm_hf.evaluate(str(npm_dir), args)  # the model's own index keeps its stop words
    model = NPMModel.from_pretrained(npm_dir)
    index = npm_hf.build_index(model, [{"id": "0", "title": "", "text": "Abraham Lincoln was born in Hodgenville."}],
                               output_dir=tmp_path / "index", tokenizer=AutoTokenizer.from_pretrained(npm_dir),
                               args=npm_hf.IndexBuildArguments(block_size=32, remove_stopwords=True,
                                                               show_progress_bar=False))
    results = npm_hf.evaluate(model, args, index=index)
    assert results["settings"]["span_stopwords"] == "reference" and results["num_examples"] == 1
    evidence = npm_hf.evaluate(model, dataclasses.replace(args, evidence_corpus=True))  # builds one without them
    assert evidence["settings"]["index_documents"] == 1


def test_evaluation_overrides_the_prefilter_weight_for_the_run_only(npm_dir, data_dir):
    model = NPMModel.from_pretrained(npm_dir)
    for weight in (0.0, 2.5):
        args = EvaluationArguments(task="lama-trex", data_dir=str(data_dir), evidence_corpus=True, prefilter="bm25",
                                   prefilter_weight=weight, show_progress_bar=False)
        results = npm_hf.evaluate(model, args, decoding={"prefilter_weight": 4.0})
        assert results["settings"]["prefilter_weight"] == weight
    assert NPMDecodingConfig.for_model(model).prefilter_weight == 0.0  # the model's own settings are untouched
    with pytest.raises(ValueError, match="prefilter_weight must be a finite number >= 0, got -1"):
        EvaluationArguments(task="lama-trex", prefilter_weight=-1.0)


def test_open_set_needs_span_mode(npm_dir, data_dir, tmp_path):
    model = NPMModel.from_pretrained(npm_dir)
    model.config.mode = "single"
    args = EvaluationArguments(task="lama-trex", data_dir=str(data_dir), show_progress_bar=False)
    with pytest.raises(ValueError, match="span-mode NPM"):
        npm_hf.evaluate(model, args, tokenizer=AutoTokenizer.from_pretrained(npm_dir))


def test_parametric_baseline_on_the_same_examples(encoder_dir, data_dir):
    if not (encoder_dir / "config.json").read_text().count("RobertaForMaskedLM"):
        pytest.skip("the tiny BERT encoder has no MLM head")
    args = EvaluationArguments(task="sst2", data_dir=str(data_dir), show_progress_bar=False)
    results = npm_hf.evaluate(str(encoder_dir), args)
    assert results["model_type"] == "masked-lm" and results["num_examples"] == 4
    from transformers import pipeline

    fill = pipeline("fill-mask", model=str(encoder_dir))
    task = get_task("sst2")
    examples, _ = load_examples(task, data_dir=str(data_dir))
    first_ids = [fill.tokenizer(w, add_special_tokens=False)["input_ids"][0] for w in (" terrible", " great")]
    want = []
    for example in examples:
        answers = fill(task.template(example, fill.tokenizer.mask_token), targets=[" terrible", " great"], top_k=2)
        score = {a["token"]: a["score"] for a in answers}
        want.append(int(np.argmax([score.get(i, 0.0) for i in first_ids])))
    assert results["predictions"] == want
    lama = npm_hf.evaluate(str(encoder_dir), EvaluationArguments(task="lama-trex", data_dir=str(data_dir),
                                                                 show_progress_bar=False))
    assert lama["predictions"] == [[a["token_str"].strip() for a in fill("Abraham Lincoln was born in <mask> .",
                                                                         top_k=5)]]
    with pytest.raises(ValueError, match="not an NPM"):
        npm_hf.evaluate(str(encoder_dir), args, corpus=["some text"])


def test_a_model_without_an_index_needs_a_corpus(encoder_dir, data_dir, tmp_path):
    bare = tmp_path / "bare"
    npm_hf.convert_encoder(str(encoder_dir), bare)
    args = EvaluationArguments(task="sst2", data_dir=str(data_dir), show_progress_bar=False)
    with pytest.raises(ValueError, match="has no index.*--corpus"):
        npm_hf.evaluate(str(bare), args)
    results = npm_hf.evaluate(str(bare), args, corpus=["Texas is great. The film was terrible."])
    assert results["settings"]["index_documents"] == 1


def test_label_words_that_tokenize_to_nothing(npm_dir, data_dir, monkeypatch):
    from npm_hf.evaluation import tasks

    broken = dataclasses.replace(get_task("sst2"), label_words=(("",), (" great",)))
    monkeypatch.setitem(tasks.TASKS, "sst2", broken)
    args = EvaluationArguments(task="sst2", data_dir=str(data_dir), show_progress_bar=False)
    with pytest.raises(ValueError, match="label word '' tokenizes to nothing"):
        npm_hf.evaluate(str(npm_dir), args)


def test_cli_evaluate_writes_json(npm_dir, data_dir, tmp_path, capsys):
    out = tmp_path / "results.json"
    code = cli_main(["evaluate", "--model", str(npm_dir), "--task", "cr", "--data-dir", str(data_dir),
                     "--max-examples", "3", "--seed", "1", "--output", str(out), "--no-show-progress-bar"])
    assert code == 0
    results = json.loads(out.read_text())
    assert results["task"] == "cr" and results["num_examples"] == 3 and results["settings"]["seed"] == 1
    assert "| cr |" in capsys.readouterr().out
    assert cli_main(["evaluate", "--model", str(npm_dir), "--task", "nope"]) == 2
    assert "Unknown task 'nope'" in capsys.readouterr().err


def test_cli_evaluate_records_results_in_the_card(npm_dir, data_dir, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(npm_dir, model)
    common = ["evaluate", "--model", str(model), "--data-dir", str(data_dir), "--no-show-progress-bar",
              "--update-card"]
    assert cli_main([*common, "--task", "cr", "--max-examples", "3"]) == 0
    assert cli_main([*common, "--task", "lama-trex", "--evidence-corpus"]) == 0
    assert cli_main([*common, "--task", "cr", "--max-examples", "2"]) == 0  # measured again: replaces its row
    rows = load_card_facts(model)["eval_results"]
    assert [(r["task"], r["metric"]) for r in rows] == [
        ("lama-trex", "macro_exact_match (FAISS top-k (evidence corpus))"),
        ("lama-trex", "macro_exact_match@5 (FAISS top-k (evidence corpus))"),
        ("cr", "accuracy (FAISS top-k)"),
    ]
    card = (model / "README.md").read_text()
    assert "| cr | cr (2 examples) | accuracy (FAISS top-k) |" in card and "3 examples" not in card
    with pytest.raises(ValueError, match="not a local model directory"):
        npm_hf.evaluation.record_results_in_card("org/some-model", [])


# ---------------------------------------------------------------------------------------- held-out cloze set
def test_cloze_set_cuts_answerable_sentences_out_of_the_corpus(shared_dir):
    from npm_hf.evaluation import build_cloze_set

    lines = (shared_dir / "offline_data" / "enwiki_sample" / "enwiki_sample.jsonl").read_text().splitlines()
    documents = [json.loads(line) for line in lines[:30]]
    queries, remaining = build_cloze_set(documents, num_queries=12, seed=0)
    assert len(queries) == 12 and len({q["doc_id"] for q in queries}) == 12  # at most one query per document
    rest = "\n".join(doc["text"] for doc in remaining)
    for query in queries:
        assert query["sentence"].count(query["answer"]) == 1
        assert query["masked"] == query["sentence"].replace(query["answer"], "[MASK]")
        assert query["sentence"] not in rest  # cut out of training and index ...
        assert rest.count(query["answer"]) >= 2  # ... while the answer stays findable elsewhere
    assert build_cloze_set(documents, num_queries=12, seed=0) == (queries, remaining)  # a seed is a fixed cut
    other, _ = build_cloze_set(documents, num_queries=12, seed=1)
    assert {q["sentence"] for q in other} != {q["sentence"] for q in queries}
    with pytest.raises(ValueError, match="num_queries must be >= 1"):
        build_cloze_set(documents, num_queries=0)


def test_lexical_cloze_baseline_answers_with_the_top_blocks_most_frequent_name(npm_dir):
    from npm_hf.evaluation import lexical_cloze_baseline

    index = npm_hf.NPMIndex.load(npm_dir / "index")
    queries = [{"masked": "The church of Hagios Demetrios is the main sanctuary of [MASK].", "answer": "Thessaloniki"},
               {"masked": "Abraham Lincoln was born in [MASK].", "answer": "Paris"}]  # never in the corpus
    assert lexical_cloze_baseline(index, queries) == {"exact_match_at_1": 0.5, "exact_match_at_5": 0.5}
