"""pipeline("fill-mask"): NPM answers with evidence for NPM models, stock behaviour for every other model."""

import json
import logging
import shutil

import pytest
import torch
from transformers import AutoTokenizer, BertConfig, BertForMaskedLM, FillMaskPipeline, pipeline
from transformers.pipelines.base import PipelineException

from npm_hf import (IndexBuildArguments, IndexMismatchError, NonparametricFillMaskPipeline, NPMIndex, NPMIndexError,
                    NPMModel, build_index, convert_encoder)
from npm_hf.inference.index_files import ENCODER_SAMPLE_FILE
from npm_hf.remote_code import remote_code_files


KEYS = ["score", "token", "token_str", "sequence", "phrase", "evidence"]


@pytest.fixture(scope="module")
def fill(npm_dir):
    return pipeline("fill-mask", model=str(npm_dir))


def test_npm_directory_gets_the_npm_pipeline(fill, mask, corpus):
    assert type(fill) is NonparametricFillMaskPipeline
    answers = fill(f"Hagios Demetrios is located in {mask}.", top_k=5)
    assert len(answers) == 5 and all(list(answer) == KEYS for answer in answers)
    for answer in answers:
        evidence = answer["evidence"]
        assert set(evidence) == {"doc_id", "title", "start", "end", "text", "block_id", "doc_start", "doc_end"}
        assert evidence["text"][evidence["start"] : evidence["end"]] == answer["phrase"]
        document = next(doc["text"] for doc in corpus if doc["id"] == evidence["doc_id"])
        assert document[evidence["doc_start"] : evidence["doc_end"]] == answer["phrase"]
        assert evidence["doc_end"] - evidence["doc_start"] == evidence["end"] - evidence["start"]
        assert answer["phrase"].lower().replace(" ", "") == answer["token_str"].lower().replace(" ", "")
        assert isinstance(answer["token"], list) and answer["token_str"] in answer["sequence"]
        assert mask not in answer["sequence"]
    assert [a["score"] for a in answers] == sorted((a["score"] for a in answers), reverse=True)


def test_scores_are_normalised_over_all_candidates(fill, mask):
    answers = fill(f"The Ohio River borders {mask}.", top_k=100_000)
    assert sum(a["score"] for a in answers) == pytest.approx(1.0)
    assert len({a["token_str"] for a in answers}) == len(answers)


def test_several_masks_and_batches(fill, mask):
    two = fill(f"{mask} was born in {mask}.", top_k=2)
    assert len(two) == 2 and all(len(answers) == 2 for answers in two)
    assert all(answer["sequence"].count(mask) == 1 for answers in two for answer in answers)
    batch = fill([f"New Mexico is {mask}.", f"Lincoln moved to {mask}."], top_k=3)
    assert len(batch) == 2 and all(len(answers) == 3 for answers in batch)
    assert batch[1] == fill(f"Lincoln moved to {mask}.", top_k=3)


def test_two_adjacent_masks_are_one_span(fill, mask):
    assert fill(f"Lincoln moved to {mask}{mask}.", top_k=4) == fill(f"Lincoln moved to {mask}.", top_k=4)
    with pytest.raises(ValueError, match="run of 3 adjacent masks"):
        fill(f"Lincoln moved to {mask}{mask}{mask}.")


def test_bad_calls(fill, mask):
    with pytest.raises(PipelineException, match="No mask_token"):
        fill("There is no mask here.")
    for bad in (0, -2):
        with pytest.raises(ValueError, match="top_k must be a positive integer"):
            fill(f"Texas is {mask}.", top_k=bad)
    with pytest.raises(ValueError, match="k must be a positive integer"):
        fill(f"Texas is {mask}.", k=0)


def test_targets_score_given_phrases(fill, mask):
    free = {a["token_str"]: a["score"] for a in fill(f"The desert covers {mask}.", top_k=100_000)}
    targeted = fill(f"The desert covers {mask}.", targets=["New Mexico", "Texas", "Atlantis"])
    assert len(targeted) == 3
    by_text = {a["token_str"].lower(): a for a in targeted}
    for phrase in ("new mexico", "texas"):
        assert by_text[phrase]["score"] == pytest.approx(free[next(k for k in free if k.lower() == phrase)])
        assert by_text[phrase]["evidence"] is not None
    assert by_text["atlantis"]["score"] == 0.0 and by_text["atlantis"]["evidence"] is None
    assert [a["score"] for a in targeted] == sorted((a["score"] for a in targeted), reverse=True)


def test_long_inputs_are_cut_around_the_mask(fill, mask, caplog):
    limit = fill.model.config.max_input_length
    text = "Texas is big. " * limit + f"Lincoln moved to {mask}." + " New Mexico is hot." * limit
    with caplog.at_level(logging.WARNING):
        answers = fill(text, top_k=2)
    assert len(answers) == 2
    assert any("longer than the encoder's limit" in record.getMessage() for record in caplog.records)
    with pytest.raises(ValueError, match="masks are .* tokens apart"):
        fill(f"{mask} " + "Texas is big. " * limit + f"{mask}.")


def test_model_object_with_explicit_index(npm_dir, mask):
    model = NPMModel.from_pretrained(npm_dir)
    tokenizer = AutoTokenizer.from_pretrained(npm_dir)
    index = NPMIndex.load(npm_dir / "index")
    fill = pipeline("fill-mask", model=model, tokenizer=tokenizer, index=index)
    assert type(fill) is NonparametricFillMaskPipeline and fill.index is index
    assert fill(f"Texas is {mask}.", top_k=2) == pipeline("fill-mask", model=str(npm_dir))(f"Texas is {mask}.", top_k=2)


def test_missing_index_is_a_clear_error(tmp_path, encoder_dir):
    convert_encoder(str(encoder_dir), tmp_path / "npm")
    with pytest.raises(NPMIndexError, match="No NPM index at .*npm-hf build-index"):
        pipeline("fill-mask", model=str(tmp_path / "npm"))


def test_index_of_another_model_is_refused(tmp_path, npm_dir, encoder_dir):
    convert_encoder(str(encoder_dir), tmp_path / "npm")
    other = NPMModel.from_pretrained(tmp_path / "npm")
    with torch.no_grad():
        other.encoder.get_input_embeddings().weight.mul_(2)
    other.save_pretrained(tmp_path / "npm")
    with pytest.raises(NPMIndexError, match="different encoder weights"):
        pipeline("fill-mask", model=str(tmp_path / "npm"), index=NPMIndex.load(npm_dir / "index"))


@pytest.mark.parametrize("kwargs", [{"dtype": torch.float16}, {"torch_dtype": torch.float16}, {"dtype": "bfloat16"},
                                    {"dtype": "auto", "device": "cpu"}, {"device": -1}, {"device_map": "cpu"}])
def test_dtype_and_device_arguments_load_as_for_any_pipeline(npm_dir, mask, kwargs):
    """Half precision loads against the index built in float32 (the weights are the same, their fingerprint differs:
    recognised by the index's weight sample), and answers as float32 does on this tiny model."""
    fill = pipeline("fill-mask", model=str(npm_dir), **kwargs)
    dtype = kwargs.get("dtype", kwargs.get("torch_dtype", torch.float32))
    assert fill.model.dtype == (torch.float32 if dtype == "auto" else getattr(torch, str(dtype).split(".")[-1]))
    assert fill.device == torch.device("cpu") and fill.model.device == torch.device("cpu")
    text = f"The Rio Grande flows through {mask} and Texas."
    want = pipeline("fill-mask", model=str(npm_dir))(text, top_k=3)
    got = fill(text, top_k=3)
    assert [a["phrase"] for a in got] == [a["phrase"] for a in want]
    assert [a["score"] for a in got] == pytest.approx([a["score"] for a in want], abs=2e-3)


def test_other_weights_are_refused_in_every_precision(tmp_path, npm_dir):
    index = NPMIndex.load(npm_dir / "index")
    tokenizer = AutoTokenizer.from_pretrained(npm_dir)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        index.check_compatible(NPMModel.from_pretrained(npm_dir, dtype=dtype), tokenizer)
        other = NPMModel.from_pretrained(npm_dir, dtype=dtype)
        with torch.no_grad():
            other.encoder.get_input_embeddings().weight[7] += 0.5
        with pytest.raises(IndexMismatchError, match="different encoder weights"):
            index.check_compatible(other, tokenizer)
    half = NPMModel.from_pretrained(npm_dir, dtype=torch.float16)
    with torch.no_grad():  # one value, by less than bfloat16 resolves but more than float16 does
        weight = half.encoder.get_input_embeddings().weight
        weight[3, 0] = weight[3, 0] * (1 + 2 ** -9)
    with pytest.raises(IndexMismatchError, match="not even in another precision"):
        index.check_compatible(half, tokenizer)


def test_an_index_without_weight_sample_says_how_to_load_in_half_precision(tmp_path, npm_dir, rewrite_manifest):
    """Indexes built before encoder_sample.npz still load in float32 and bfloat16; fp16 gets the fix named."""
    shutil.copytree(npm_dir / "index", tmp_path / "index")
    (tmp_path / "index" / ENCODER_SAMPLE_FILE).unlink()
    rewrite_manifest(tmp_path / "index", lambda m: m["files"].pop(ENCODER_SAMPLE_FILE), seal=False)  # an old index
    old = NPMIndex.load(tmp_path / "index")
    tokenizer = AutoTokenizer.from_pretrained(npm_dir)
    old.check_compatible(NPMModel.from_pretrained(npm_dir), tokenizer)
    old.check_compatible(NPMModel.from_pretrained(npm_dir, dtype=torch.bfloat16), tokenizer)
    with pytest.raises(IndexMismatchError, match=r"torch.float16 model .* load the model in float32 or bfloat16 "
                                                 r"\(dtype=torch.bfloat16\), or rebuild the index"):
        old.check_compatible(NPMModel.from_pretrained(npm_dir, dtype=torch.float16), tokenizer)


def test_single_mode(tmp_path, encoder_dir, mask):
    convert_encoder(str(encoder_dir), tmp_path / "single", mode="single")
    build_index(tmp_path / "single", ["Lincoln moved to Illinois.", "Texas is big and hot."],
                args=IndexBuildArguments(block_size=32, show_progress_bar=False))
    fill = pipeline("fill-mask", model=str(tmp_path / "single"))
    answers = fill(f"Texas is {mask}.", top_k=3)
    assert len(answers) == 3 and all(isinstance(a["token"], int) for a in answers)
    assert all(a["evidence"]["text"][a["evidence"]["start"] : a["evidence"]["end"]] == a["phrase"] for a in answers)
    two = fill(f"{mask} {mask} is big.", top_k=2)  # NPM-single: every mask is its own token query
    assert len(two) == 2
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "single")
    texas = tokenizer("Texas", add_special_tokens=False)["input_ids"][0]
    targeted = fill(f"{mask} is big.", targets=["Texas"])
    assert [a["token"] for a in targeted] == [texas] and targeted[0]["score"] > 0


@pytest.fixture(scope="module")
def stock_mlm(tmp_path_factory):
    """A tiny BertForMaskedLM with the MiniLM-free WordPiece vocabulary of the test corpus."""
    from tokenizers import BertWordPieceTokenizer
    from transformers import BertTokenizer

    trainer = BertWordPieceTokenizer(lowercase=True)
    trainer.train_from_iterator(["paris is the capital of france"] * 3, vocab_size=60,
                                special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"])
    tokenizer = BertTokenizer(vocab=trainer.get_vocab())
    torch.manual_seed(0)
    model = BertForMaskedLM(BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2,
                                       num_attention_heads=2, intermediate_size=64)).eval()
    folder = tmp_path_factory.mktemp("stock-bert")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_other_models_keep_the_stock_pipeline(stock_mlm):
    fill = pipeline("fill-mask", model=str(stock_mlm))
    assert type(fill) is FillMaskPipeline
    stock = FillMaskPipeline(model=fill.model, tokenizer=fill.tokenizer)
    for text, kwargs in [("paris is the [MASK] of france.", {"top_k": 4}),
                         ("[MASK] is the [MASK] of france.", {}),
                         ("paris is the [MASK] of france.", {"targets": ["capital", "paris"]})]:
        assert fill(text, **kwargs) == stock(text, **kwargs)
    with pytest.raises(ValueError, match="not an NPM model"):
        pipeline("fill-mask", model=str(stock_mlm), index=object())


def test_hub_repo_id_pulls_weights_and_index_from_the_cache(tmp_path, npm_dir, mask):
    """pipeline("fill-mask", model="org/name") finds the index in the Hub cache (offline fake cache, §4.4)."""
    import shutil
    import subprocess
    import sys

    sha = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--npm-org--npm-tiny"
    shutil.copytree(npm_dir, repo / "snapshots" / sha)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(sha)
    script = (
        "import json, npm_hf\n"
        "from transformers import pipeline\n"
        "fill = pipeline('fill-mask', model='npm-org/npm-tiny')\n"
        f"print(json.dumps(fill({f'Texas borders {mask}.'!r}, top_k=2)))\n"
    )
    env = {**__import__("os").environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub")}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    local = pipeline("fill-mask", model=str(npm_dir))(f"Texas borders {mask}.", top_k=2)
    assert json.loads(result.stdout.strip().splitlines()[-1]) == json.loads(json.dumps(local))


def test_pipeline_runs_as_remote_code_without_npm_hf(tmp_path, npm_dir, mask):
    """The directory carries the pipeline's code: a process that cannot import npm_hf answers with
    trust_remote_code=True exactly as npm_hf does; with npm_hf imported no flag is needed."""
    import shutil
    import subprocess
    import sys

    config = json.loads((npm_dir / "config.json").read_text())
    assert config["custom_pipelines"]["fill-mask"]["impl"] == "pipeline.NonparametricFillMaskPipeline"
    code = {p.name for p in npm_dir.iterdir() if p.suffix == ".py"}
    assert code == {"configuration_npm.py", "modeling_npm.py", *remote_code_files()}  # the closure, nothing more
    folder = tmp_path / "npm"
    shutil.copytree(npm_dir, folder)
    text = f"Texas borders {mask}."
    script = (
        "import json, sys\n"
        "sys.modules['npm_hf'] = None  # as if npm_hf were not installed\n"
        "from transformers import pipeline\n"
        f"fill = pipeline('fill-mask', model={str(folder)!r}, trust_remote_code=True)\n"
        "assert not type(fill).__module__.startswith('npm_hf'), type(fill).__module__\n"
        f"print(json.dumps(fill({text!r}, top_k=3)))\n"
    )
    env = {**__import__("os").environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    remote = json.loads(result.stdout.strip().splitlines()[-1])
    local = pipeline("fill-mask", model=str(folder))  # npm_hf imported: no trust_remote_code needed
    assert type(local) is NonparametricFillMaskPipeline
    assert remote == json.loads(json.dumps(local(text, top_k=3)))


def test_remote_pipeline_needs_trust(tmp_path, npm_dir):
    import subprocess
    import sys

    script = (
        "import sys\n"
        "sys.modules['npm_hf'] = None\n"
        "from transformers import pipeline\n"
        f"pipeline('fill-mask', model={str(npm_dir)!r})\n"
    )
    env = {**__import__("os").environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert result.returncode != 0 and "trust_remote_code=True" in result.stderr


def _flat_answers(result):
    return result if isinstance(result[0], dict) else [answer for answers in result for answer in answers]


def assert_same_answers(got, want):
    """Same answers and sequences in the same order, scores equal up to float noise (padding changes the sums)."""
    got, want = _flat_answers(got), _flat_answers(want)
    assert [(a["token_str"], a["sequence"]) for a in got] == [(a["token_str"], a["sequence"]) for a in want]
    assert [a["score"] for a in got] == pytest.approx([a["score"] for a in want], abs=1e-5)


@pytest.mark.parametrize("mode", ["span", "single"])
def test_batched_calls_give_the_answers_of_one_text_at_a_time(npm_dir, mask, make_pipeline, mode):
    fill = make_pipeline(npm_dir, mode=mode)
    texts = [f"Abraham Lincoln was born in {mask}, Kentucky.", f"The Rio Grande flows through {mask} and Texas.",
             f"Hagios Demetrios is located in {mask}.", f"{mask} borders {mask}."]  # varied lengths, two masks
    batched = fill(texts, top_k=7, batch_size=3)
    assert len(batched) == len(texts)
    for got, text in zip(batched, texts):
        assert_same_answers(got, fill(text, top_k=7))
    for got, text in zip(fill(texts, top_k=3, batch_size=4, prefilter="bm25"), texts):
        assert_same_answers(got, fill(text, top_k=3, prefilter="bm25"))
    assert_same_answers(fill(texts[:1], top_k=3, batch_size=8), fill(texts[0], top_k=3))  # a list of one: unwrapped


@pytest.mark.parametrize("mode, params", [
    ("span", {}), ("span", {"prefilter": "bm25", "prefilter_blocks": 2}), ("span", {"targets": ["Texas", "Ohio"]}),
    ("single", {}), ("single", {"prefilter": "bm25"}), ("span", {"k": 30, "top_k": 12})])
def test_answers_from_a_batch_search_are_exactly_one_text_at_a_time(npm_dir, mask, make_pipeline, mode, params):
    """From the same forward outputs, one search for the batch (`search_batch`, fewer query vectors than
    `NPMIndex.search_many` hands to BLAS) gives each text's answers exactly: scores, phrases, evidence, sequences and
    order."""
    fill = make_pipeline(npm_dir, mode=mode)
    texts = [f"Abraham Lincoln was born in {mask}, Kentucky.", f"The Rio Grande flows through {mask} and Texas.",
             f"{mask} borders {mask}.", f"Hagios Demetrios is located in {mask}."]
    _, _, params = fill._sanitize_parameters(**{"top_k": 6, **params})  # as a call's arguments reach postprocess
    alone = [fill.postprocess(fill._forward(fill.preprocess(text)), **params) for text in texts]
    outputs = [fill._forward(fill.preprocess(text)) for text in texts]
    fill.search_batch(outputs, params.get("decoding"))
    assert [fill.postprocess(output, **params) for output in outputs] == alone
    assert len(alone[2]) == 2 and all(isinstance(answers, list) and answers for answers in alone[2])  # two masks


def test_length_groups_cover_every_input_with_little_padding():
    from npm_hf.inference.pipeline import _length_groups

    lengths = [14, 47, 15, 30, 31, 29, 44, 16, 5, 5, 46]
    groups = _length_groups(lengths)
    assert sorted(i for group in groups for i in group) == list(range(len(lengths)))
    assert [lengths[group[0]] for group in groups] == sorted(lengths[group[0]] for group in groups)
    for group in groups:
        assert len(group) * max(lengths[i] for i in group) <= 1.25 * sum(lengths[i] for i in group)
    assert len(groups) < len(lengths)
    assert _length_groups([7] * 5) == [[0, 1, 2, 3, 4]]
