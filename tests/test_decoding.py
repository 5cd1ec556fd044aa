"""NPMDecodingConfig: one validated home for decoding settings, saved beside the model config, merged per call
without touching anything shared."""

import json
import shutil

import pytest
from transformers import AutoTokenizer, pipeline

from npm_hf import NPMModel
from npm_hf.inference.decoding import DECODING_CONFIG_FILE, NPMDecodingConfig


def test_every_setting_is_checked_in_one_place():
    with pytest.raises(ValueError, match="NPMDecodingConfig.k must be a positive integer, got 0"):
        NPMDecodingConfig(k=0)
    with pytest.raises(ValueError, match="NPMDecodingConfig.temperature must be a finite number > 0, got nan"):
        NPMDecodingConfig(temperature=float("nan"))
    with pytest.raises(ValueError, match="length_penalty_alpha must be a finite number, got inf"):
        NPMDecodingConfig(length_penalty_alpha=float("inf"))
    with pytest.raises(ValueError, match="span_stopwords='some' is not supported; use one of"):
        NPMDecodingConfig(span_stopwords="some")
    with pytest.raises(ValueError, match=r"span_punctuation='inside' is not supported; use one of \['word', 'inner'\]"):
        NPMDecodingConfig(span_punctuation="inside")
    with pytest.raises(ValueError, match="exclude_query_phrases must be True or False"):
        NPMDecodingConfig(exclude_query_phrases="yes")
    with pytest.raises(ValueError, match=r"Unknown decoding option\(s\) \['topk'\]"):
        NPMDecodingConfig().update(topk=3)
    base = NPMDecodingConfig(k=7)
    assert base.update(prefilter="bm25", k=None) == NPMDecodingConfig(k=7, prefilter="bm25")  # None: not given
    assert base.k == 7 and base.prefilter == "none"  # update returns a new config
    assert NPMDecodingConfig(prefilter_passage_tokens="blocks").prefilter_passage_tokens is None


def test_saved_beside_the_model_config_and_loaded_back(npm_dir, tmp_path):
    folder = tmp_path / "npm"
    shutil.copytree(npm_dir, folder)
    assert NPMDecodingConfig.from_dict(json.loads((folder / DECODING_CONFIG_FILE).read_text())) == NPMDecodingConfig()
    assert "k" not in json.loads((folder / "config.json").read_text())  # not part of the model
    NPMDecodingConfig(k=64, span_scoring="product").save_pretrained(folder)
    fill = pipeline("fill-mask", model=str(folder))
    assert (fill.decoding.k, fill.decoding.span_scoring) == (64, "product")
    (folder / DECODING_CONFIG_FILE).write_text("[1, 2]")
    with pytest.raises(ValueError, match="must be a JSON object of decoding options, got list"):
        pipeline("fill-mask", model=str(folder))


def test_an_old_config_with_inline_settings_keeps_loading(npm_dir, tmp_path, mask):
    """Directories saved before decoding_config.json carry the settings in config.json (temperature too, which
    transformers would drop as a generation parameter): they answer as before."""
    folder = tmp_path / "old"
    shutil.copytree(npm_dir, folder)
    (folder / DECODING_CONFIG_FILE).unlink()
    config = json.loads((folder / "config.json").read_text())
    settings = {"k": 50, "temperature": 2.0, "span_stopwords": "any", "phrase_aggregation": "max"}
    (folder / "config.json").write_text(json.dumps({**config, **settings}))
    old = pipeline("fill-mask", model=str(folder))
    assert {name: getattr(old.decoding, name) for name in settings} == settings
    text = f"The Rio Grande flows through {mask} and Texas."
    new = pipeline("fill-mask", model=str(npm_dir), decoding=settings)
    assert old(text, top_k=5) == new(text, top_k=5)
    assert old(text, top_k=5) != pipeline("fill-mask", model=str(npm_dir))(text, top_k=5)  # the settings matter


def test_two_pipelines_over_one_model_do_not_interfere(npm_dir, mask):
    model, tokenizer = NPMModel.from_pretrained(npm_dir), AutoTokenizer.from_pretrained(npm_dir)
    config_before = model.config.to_dict()
    text = f"Abraham Lincoln was born in {mask}, Kentucky."
    warm = pipeline("fill-mask", model=model, tokenizer=tokenizer, temperature=0.5, span_scoring="product")
    plain = pipeline("fill-mask", model=model, tokenizer=tokenizer)
    warm_alone, plain_alone = warm(text, top_k=5), plain(text, top_k=5)
    assert warm_alone != plain_alone
    for _ in range(2):  # interleaved, and with per-call settings in between
        assert plain(text, top_k=5, k=10, prefilter="bm25") != plain_alone
        assert warm(text, top_k=5) == warm_alone
        assert plain(text, top_k=5) == plain_alone
    assert model.config.to_dict() == config_before
    assert plain.decoding == NPMDecodingConfig() and warm.decoding.temperature == 0.5


def test_decoding_argument_takes_a_config_or_a_dict(npm_dir, mask):
    text = f"Hagios Demetrios is located in {mask}."
    by_object = pipeline("fill-mask", model=str(npm_dir), decoding=NPMDecodingConfig(k=30, temperature=2.0))
    by_dict = pipeline("fill-mask", model=str(npm_dir), decoding={"k": 30, "temperature": 2.0})
    plain = pipeline("fill-mask", model=str(npm_dir))
    assert by_object(text, top_k=4) == by_dict(text, top_k=4) == plain(text, top_k=4, k=30, temperature=2.0)
    assert plain(text, top_k=4, decoding={"k": 30, "temperature": 2.0}) == by_dict(text, top_k=4)
    with pytest.raises(TypeError, match="decoding= takes an NPMDecodingConfig or a dict"):
        pipeline("fill-mask", model=str(npm_dir), decoding="fast")
    with pytest.raises(ValueError, match=r"Unknown decoding option\(s\) \['nprob'\]"):
        plain(text, nprob=4)
