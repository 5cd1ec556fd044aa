"""The demo's stage bookkeeping (the full demo runs with MiniLM in test_integration_minilm.py)."""

import json
import random
import time

import pytest
import torch
from transformers import BertConfig, BertModel, BertTokenizer, TrainerCallback

import npm_hf.demo
from npm_hf import NPMModel, NPMTrainer, convert_encoder, prepare_training_blocks
from npm_hf.demo import DemoArguments, _DemoState


def test_a_changed_recipe_restarts_and_drops_old_checkpoints(tmp_path):
    old = DemoArguments(output=str(tmp_path), train_steps=5).recipe()
    (tmp_path / "demo_state.json").write_text(json.dumps({"recipe": old, "done": {"cloze": [1], "model": {}}}))
    (tmp_path / "checkpoints" / "checkpoint-25").mkdir(parents=True)
    same = _DemoState(tmp_path, old)
    assert same.stage("cloze", lambda: [2]) == [1]  # done stages are reused
    assert (tmp_path / "checkpoints").exists()
    changed = _DemoState(tmp_path, DemoArguments(output=str(tmp_path), train_steps=6).recipe())
    assert not (tmp_path / "checkpoints").exists()  # another recipe's training is never resumed
    assert changed.stage("cloze", lambda: [3]) == [3]
    assert json.loads((tmp_path / "demo_state.json").read_text())["done"] == {"cloze": [3]}


def test_the_budget_is_the_same_number_of_steps_on_every_machine(tmp_path, monkeypatch):
    for native in (True, False):  # bf16 makes a step faster, not the budget shorter
        monkeypatch.setattr(npm_hf.demo, "bf16_training", lambda native=native: native)
        args = DemoArguments(output=str(tmp_path))
        assert args.train_steps == npm_hf.demo.DEFAULT_TRAIN_STEPS and args.recipe()["train_steps"] == args.train_steps
        training = npm_hf.demo.demo_training_arguments(args, tmp_path / "checkpoints")
        assert training.max_steps == args.train_steps and training.max_train_minutes is None
        assert not training.schedule_by_time and training.lr_scheduler_type == "cosine"
        assert training.bf16 is native
    assert DemoArguments(output=str(tmp_path), train_steps=7).train_steps == 7  # a user's budget stands


@pytest.mark.parametrize("value", [-1, 1.5, float("nan"), True, "100"])
def test_a_budget_that_is_not_a_whole_number_of_steps_is_refused(tmp_path, value):
    with pytest.raises(ValueError, match="train_steps must be an integer >= 0"):
        DemoArguments(output=str(tmp_path), train_steps=value)


def test_stages_report_their_seconds_and_whether_they_were_reused(tmp_path):
    recipe = DemoArguments(output=str(tmp_path)).recipe()
    first = _DemoState(tmp_path, recipe)
    first.stage("cloze", lambda: time.sleep(0.05) or [1])
    first.stage("model", lambda: {"trained": False})
    (cloze, model) = first.timings()
    assert (cloze["stage"], cloze["reused"], model["stage"], model["reused"]) == ("cloze", False, "model", False)
    assert cloze["seconds"] >= 0.05
    second = _DemoState(tmp_path, recipe)
    second.stage("cloze", lambda: [2])
    second.stage("index 2", lambda: {})
    assert [(row["stage"], row["reused"]) for row in second.timings()] == [("cloze", True), ("index", False)]
    assert second.timings()[0]["seconds"] == cloze["seconds"]  # the time it took when it was built


def test_the_demo_schedule_gives_the_same_model_on_a_slow_machine(tmp_path, monkeypatch):
    """A wall-clock budget trained fewer steps on a slower machine (issue 20); the step budget must not care."""
    monkeypatch.setattr(npm_hf.demo, "bf16_training", lambda: False)
    vocabulary = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(40)]
    (tmp_path / "vocab.txt").write_text("\n".join(vocabulary) + "\n")
    tokenizer = BertTokenizer(str(tmp_path / "vocab.txt"))
    rng = random.Random(0)
    documents = [" ".join(f"w{rng.randrange(12)}" for _ in range(60)) for _ in range(40)]
    blocks = prepare_training_blocks(documents, tokenizer, block_size=16, group_size=16, salient=True)
    torch.manual_seed(0)
    encoder = BertModel(BertConfig(vocab_size=len(vocabulary), hidden_size=16, num_hidden_layers=1,
                                   num_attention_heads=2, intermediate_size=32, max_position_embeddings=32))
    encoder.save_pretrained(tmp_path / "encoder")
    tokenizer.save_pretrained(tmp_path / "encoder")
    convert_encoder(str(tmp_path / "encoder"), tmp_path / "npm")

    class SlowMachine(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            time.sleep(0.3)

    weights, steps = [], []
    for slow in (False, True):
        args = npm_hf.demo.demo_training_arguments(
            DemoArguments(output=str(tmp_path), train_steps=6, show_progress_bar=False), tmp_path / f"out-{slow}")
        args.save_strategy, args.resume_from_checkpoint, args.logging_steps = "no", None, 1
        trainer = NPMTrainer(model=NPMModel.from_pretrained(tmp_path / "npm"), args=args, train_dataset=blocks,
                             processing_class=tokenizer, callbacks=[SlowMachine()] if slow else [])
        trainer.train()
        steps.append(trainer.state.global_step)
        weights.append({name: tensor.detach().clone() for name, tensor in trainer.model.state_dict().items()})
        assert trainer.lr_scheduler.get_last_lr()[0] == pytest.approx(0.0, abs=1e-12)  # the cosine ran its course
    assert steps == [6, 6]
    assert all(torch.equal(weights[0][name], weights[1][name]) for name in weights[0])
