"""NPMConfig / NPMModel: validation, Auto registration, save/load round trips, wrapping plain encoders."""

import json
import logging
import os
import subprocess
import sys

import pytest
import torch
from transformers import AutoConfig, AutoModel, AutoModelForMaskedLM, RobertaForMaskedLM

import npm_hf
from npm_hf import NPMConfig, NPMModel
from npm_hf.inference.decoding import NPMDecodingConfig


TINY_BERT = {"model_type": "bert", "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
             "intermediate_size": 64, "vocab_size": 99}


def test_defaults_follow_the_paper():
    config = NPMConfig(encoder=TINY_BERT)
    decoding = NPMDecodingConfig()
    assert (config.mode, decoding.k, decoding.max_span_length, decoding.temperature) == ("span", 4096, 10, 1.0)
    assert config.scale == pytest.approx(32 ** -0.5)
    assert NPMConfig(encoder=TINY_BERT, similarity_scale=0.5).scale == 0.5
    assert NPMDecodingConfig(temperature=5, apply_temperature_twice=True).span_temperature == 25


@pytest.mark.parametrize("field, value, message", [
    ("mode", "phrase", "use one of \\['span', 'single'\\]"),
    ("similarity_scale", -1.0, "similarity_scale must be a finite number > 0"),
    ("similarity_scale", float("nan"), "similarity_scale must be a finite number > 0"),
    ("index_subfolder", "/abs/index", "relative to the model directory"),
    ("index_subfolder", "../elsewhere", "relative to the model directory"),
])
def test_invalid_config_values_are_rejected(field, value, message):
    with pytest.raises(ValueError, match=message):
        NPMConfig(encoder=TINY_BERT, **{field: value})


def test_registered_with_auto_classes(tmp_path):
    model = NPMModel(NPMConfig(encoder=TINY_BERT)).eval()
    model.save_pretrained(tmp_path)
    assert type(AutoConfig.from_pretrained(tmp_path)) is NPMConfig
    assert type(AutoModel.from_pretrained(tmp_path)) is NPMModel
    assert type(AutoModelForMaskedLM.from_pretrained(tmp_path)) is NPMModel
    npm_hf.register()  # idempotent
    assert type(AutoModel.from_pretrained(tmp_path)) is NPMModel


def test_save_load_round_trip_gives_identical_hidden_states(tmp_path):
    model = NPMModel(NPMConfig(encoder=TINY_BERT, mode="single", similarity_scale=0.25)).eval()
    model.save_pretrained(tmp_path)
    loaded = AutoModel.from_pretrained(tmp_path)
    assert (loaded.config.mode, loaded.config.scale) == ("single", 0.25)
    without_dtype = lambda config: {k: v for k, v in config.to_dict().items() if k != "dtype"}  # noqa: E731
    assert without_dtype(loaded.config.encoder) == without_dtype(model.config.encoder)
    ids = torch.randint(5, 99, (2, 9))
    assert torch.equal(model(ids).last_hidden_state, loaded(ids).last_hidden_state)
    assert not hasattr(loaded.encoder, "pooler") or loaded.encoder.pooler is None


def test_from_encoder_keeps_weights_and_drops_mlm_head_quietly(encoder_dir, caplog):
    source = AutoModel.from_pretrained(encoder_dir).eval()
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        model = NPMModel.from_encoder(str(encoder_dir), mode="single")
    assert not [r for r in caplog.records if "lm_head" in r.getMessage()]
    assert (model.config.mode, model.config.encoder.model_type) == ("single", source.config.model_type)
    ids = torch.randint(5, 60, (2, 11))
    assert torch.equal(model(ids).last_hidden_state, source(ids).last_hidden_state)
    assert not [name for name in model.state_dict() if name.startswith(("lm_head", "cls.")) or ".pooler." in name]


def test_from_encoder_of_released_npm_format(tmp_path):
    """facebook/npm is a plain RobertaForMaskedLM: the NPM vectors are its roberta.* last hidden states."""
    from transformers import RobertaConfig

    config = RobertaConfig(vocab_size=60, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                           intermediate_size=64, max_position_embeddings=40)
    released = RobertaForMaskedLM(config).eval()
    released.save_pretrained(tmp_path)
    model = NPMModel.from_encoder(str(tmp_path))
    ids = torch.randint(3, 60, (1, 12))
    expected = released(ids, output_hidden_states=True).hidden_states[-1]
    assert torch.equal(model(ids).last_hidden_state, expected)


def test_from_encoder_names_decoding_settings_that_are_not_model_fields(encoder_dir):
    with pytest.raises(TypeError, match=r"\['k'\], which are neither NPMConfig fields.*belong to the pipeline"):
        NPMModel.from_encoder(str(encoder_dir), k=8)
    assert NPMModel.from_encoder(str(encoder_dir), similarity_scale=0.5).config.similarity_scale == 0.5


def test_from_encoder_rejects_npm_checkpoints(tmp_path):
    NPMModel(NPMConfig(encoder=TINY_BERT)).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="already an NPM model"):
        NPMModel.from_encoder(str(tmp_path))


def test_saved_npm_loads_as_remote_code_without_npm_hf(tmp_path):
    """A saved NPM carries its config/model code: a process that cannot import npm_hf loads it with
    trust_remote_code=True and gets identical hidden states."""
    model = NPMModel(NPMConfig(encoder=TINY_BERT, mode="single", k=5)).eval()
    model.save_pretrained(tmp_path)
    assert {"configuration_npm.py", "modeling_npm.py"} <= {p.name for p in tmp_path.iterdir()}
    auto_map = json.loads((tmp_path / "config.json").read_text())["auto_map"]
    assert auto_map == {"AutoConfig": "configuration_npm.NPMConfig", "AutoModel": "modeling_npm.NPMModel"}
    ids = torch.arange(5, 14).reshape(1, 9)
    script = (
        "import sys, json, torch\n"
        "sys.modules['npm_hf'] = None  # as if npm_hf were not installed\n"
        "from transformers import AutoModel\n"
        f"model = AutoModel.from_pretrained({str(tmp_path)!r}, trust_remote_code=True).eval()\n"
        "assert not type(model).__module__.startswith('npm_hf'), type(model).__module__\n"
        f"hidden = model(torch.tensor({ids.tolist()})).last_hidden_state.tolist()\n"
        "print(json.dumps([type(model).__name__, model.config.mode, hidden]))\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    name, mode, hidden = json.loads(result.stdout.strip().splitlines()[-1])
    assert (name, mode) == ("NPMModel", "single")
    torch.testing.assert_close(torch.tensor(hidden), model(ids).last_hidden_state, atol=1e-6, rtol=1e-6)


def _tiny_released_npm(folder):
    """A RobertaForMaskedLM with a byte-level BPE tokenizer: the format of facebook/npm(-single)."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import RobertaConfig, RobertaTokenizer

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(["Texas borders New Mexico."] * 5, vocab_size=280,
                            special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"])
    folder.mkdir(parents=True)
    bpe.save_model(str(folder))
    tokenizer = RobertaTokenizer(vocab=str(folder / "vocab.json"), merges=str(folder / "merges.txt"))
    torch.manual_seed(1)
    model = RobertaForMaskedLM(RobertaConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2,
                                             num_attention_heads=2, intermediate_size=64, max_position_embeddings=40,
                                             pad_token_id=1)).eval()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return model


def test_released_npm_single_name_gives_single_mode(tmp_path):
    _tiny_released_npm(tmp_path / "facebook" / "npm-single")
    _tiny_released_npm(tmp_path / "facebook" / "npm")
    assert NPMModel.from_encoder(str(tmp_path / "facebook" / "npm-single")).config.mode == "single"
    assert NPMModel.from_encoder(str(tmp_path / "facebook" / "npm")).config.mode == "span"
    assert NPMModel.from_encoder(str(tmp_path / "facebook" / "npm-single"), mode="span").config.mode == "span"


@pytest.mark.parametrize("file_name", ["npm.ckpt", "npm-single.ckpt", "npm.safetensors"])
def test_lightning_checkpoints_convert_with_identical_states(tmp_path, file_name):
    import npm_hf
    from safetensors.torch import save_file

    source = _tiny_released_npm(tmp_path / "base")
    weights = {f"encoder.transformer.{key}": value.clone() for key, value in source.state_dict().items()}
    checkpoint = tmp_path / file_name
    if file_name.endswith(".ckpt"):
        torch.save({"state_dict": weights, "epoch": 3, "global_step": 10_000}, checkpoint)
    else:
        save_file({k: v.contiguous() for k, v in weights.items() if "decoder" not in k}, str(checkpoint))
    model = npm_hf.convert_lightning_checkpoint(checkpoint, str(tmp_path / "base"), tmp_path / "npm")
    assert model.config.mode == ("single" if "single" in file_name else "span")
    ids = torch.randint(3, 60, (1, 10))
    loaded = NPMModel.from_pretrained(tmp_path / "npm")
    expected = source(ids, output_hidden_states=True).hidden_states[-1]
    assert torch.equal(loaded(ids).last_hidden_state, expected)


class _Hyperparameters:  # stands for the custom objects Lightning pickles next to the weights
    def __init__(self):
        self.lr = 3e-5


def test_checkpoints_with_python_objects_are_not_unpickled(tmp_path):
    import npm_hf

    _tiny_released_npm(tmp_path / "base")
    torch.save({"state_dict": {}, "hyper_parameters": _Hyperparameters()}, tmp_path / "odd.ckpt")
    with pytest.raises(ValueError, match="does not unpickle"):
        npm_hf.convert_lightning_checkpoint(tmp_path / "odd.ckpt", str(tmp_path / "base"), tmp_path / "npm")
    torch.save({"state_dict": {"model.w": torch.zeros(1)}}, tmp_path / "other.ckpt")
    with pytest.raises(ValueError, match="not an NPM training checkpoint"):
        npm_hf.convert_lightning_checkpoint(tmp_path / "other.ckpt", str(tmp_path / "base"), tmp_path / "npm")
    assert not (tmp_path / "npm").exists()
