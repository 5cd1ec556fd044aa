"""Training: group batches, span masking, the contrastive loss, NPMTrainer, DDP equivalence, learning."""

import json
import os
import random
import socket
import subprocess
import time
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from tokenizers import BertWordPieceTokenizer
from transformers import AutoModel, BertConfig, BertModel, BertTokenizer, TrainingArguments, pipeline

import npm_hf
from npm_hf import NPMModel, NPMSpanCollator, NPMTrainer, NPMTrainingArguments, prepare_training_blocks
from npm_hf.trainer import GroupSampler, NPMContrastiveLoss, cpu_has_native_bf16, last_complete_checkpoint


SCRIPTS = Path(__file__).parent / "scripts"
PEOPLE = ["alice", "bob", "carol", "dave", "erin", "frank", "grace", "heidi", "ivan", "judy", "oscar", "peggy"]
CITIES = ["paris", "rome", "oslo", "lima", "cairo", "tokyo", "delhi", "quito", "dakar", "hanoi", "sofia", "riga"]
TEMPLATES = ["{p} was born in {c} .", "{c} is the birthplace of {p} .", "{p} grew up in {c} .",
             "the home town of {p} is {c} ."]


def fact_documents(count: int, seed: int) -> list[str]:
    """Documents restating the same birthplace facts: spans co-occur across the sequences of a group."""
    rng = random.Random(seed)
    facts = list(zip(PEOPLE, CITIES))
    documents = []
    for _ in range(count):
        picks = [rng.choice(facts) for _ in range(6)]
        documents.append(" ".join(rng.choice(TEMPLATES).format(p=p, c=c) for p, c in picks))
    return documents


@pytest.fixture(scope="module")
def tokenizer():
    trainer = BertWordPieceTokenizer(lowercase=True)
    trainer.train_from_iterator(fact_documents(50, seed=1), vocab_size=200,
                                special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"])
    return BertTokenizer(vocab=trainer.get_vocab())


@pytest.fixture(scope="module")
def model_dir(tokenizer, tmp_path_factory):
    torch.manual_seed(0)
    encoder = BertModel(BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2,
                                   num_attention_heads=4, intermediate_size=64, max_position_embeddings=64,
                                   hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))
    folder = tmp_path_factory.mktemp("train-npm")
    encoder.save_pretrained(folder / "encoder")
    tokenizer.save_pretrained(folder / "encoder")
    npm_hf.convert_encoder(str(folder / "encoder"), folder / "npm")
    return folder / "npm"


@pytest.fixture(scope="module")
def blocks(tokenizer):
    return prepare_training_blocks(fact_documents(200, seed=2), tokenizer, block_size=32, group_size=4)


def quiet_args(tmp_path, **overrides):
    defaults = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, use_cpu=True, report_to="none",
                    save_strategy="no", disable_tqdm=True, seed=0, warmup_steps=0)
    return NPMTrainingArguments(**{**defaults, **overrides})


# ------------------------------------------------------------------------------------------------ data and groups
def test_blocks_come_in_whole_groups(blocks, tokenizer):
    groups = np.asarray(blocks["group"])
    assert len(blocks) % 4 == 0 and np.all(np.bincount(groups) == 4)
    lengths = [len(ids) for ids in blocks["input_ids"]]
    assert max(lengths) == 32 and min(lengths) < 32  # a document's last block is shorter (not padded)
    with pytest.raises(ValueError, match="fewer than one group of 4 blocks"):
        prepare_training_blocks(["alice was born in paris ."], tokenizer, block_size=32, group_size=4)


def test_group_sampler_never_splits_groups():
    sampler = GroupSampler([0, 0, 1, 1, 2, 2, 3, 3], shuffle=True, seed=5)
    orders = []
    for epoch in range(3):
        sampler.set_epoch(epoch)
        order = list(sampler)
        assert sorted(order) == list(range(8))
        assert all(order[i] // 2 == order[i + 1] // 2 for i in range(0, 8, 2))  # pairs stay together
        orders.append(order)
    assert len({tuple(o) for o in orders}) > 1  # reshuffled per epoch
    assert list(GroupSampler([0, 0, 1, 1, 2, 2, 3, 3], shuffle=True, seed=5)) == orders[0]  # same on every process


# ---------------------------------------------------------------------------------------------------- collator
def test_collator_masks_co_occurring_spans_deterministically(blocks, tokenizer):
    collator = NPMSpanCollator(tokenizer)
    features = [blocks[i] for i in range(8)]  # two groups
    batch = collator(features)
    alone = collator(features[4:])  # the second group by itself
    second = batch["query_sequence"] >= 4
    assert torch.equal(batch["query_ids"][second], alone["query_ids"])
    assert torch.equal(batch["input_ids"][4:, : alone["input_ids"].shape[1]], alone["input_ids"])
    mask_id = tokenizer.mask_token_id
    for row in range(len(batch["query_sequence"])):
        seq = int(batch["query_sequence"][row])
        span = batch["query_ids"][row][: batch["query_length"][row]].tolist()
        start, end = int(batch["query_start"][row]), int(batch["query_end"][row])
        assert end == start + 1 and batch["input_ids"][seq, start] == mask_id == batch["input_ids"][seq, end]
        group = range(seq // 4 * 4, seq // 4 * 4 + 4)
        others = [features[j]["input_ids"] for j in group if j != seq]
        n = len(span)
        assert any(other[m : m + n] == span for other in others for m in range(len(other) - n + 1))
        assert tokenizer.mask_token_id not in span and not set(span) & set(tokenizer.all_special_ids)
    width = batch["key_input_ids"].shape[1]
    padded = [f["input_ids"] + [tokenizer.pad_token_id] * (width - len(f["input_ids"])) for f in features]
    assert torch.equal(batch["key_input_ids"], torch.tensor(padded))
    assert torch.equal(batch["key_attention_mask"].sum(1), torch.tensor([len(f["input_ids"]) for f in features]))
    masked_tokens = int(batch["query_length"][:].sum())
    real = sum(len(f["input_ids"]) for f in features)
    assert 0.05 * real <= masked_tokens <= 0.15 * real + 2 * 10


def test_collator_respects_word_boundaries(blocks, tokenizer):
    batch = NPMSpanCollator(tokenizer, mode="single")(blocks[:4] and [blocks[i] for i in range(4)])
    assert torch.all(batch["query_start"] == batch["query_end"]) and batch["query_ids"].shape[1] == 1
    for seq, position in zip(batch["query_sequence"].tolist(), batch["query_start"].tolist()):
        assert batch["input_ids"][seq, position] == tokenizer.mask_token_id
    span_batch = NPMSpanCollator(tokenizer)([blocks[i] for i in range(4)])
    for row in range(len(span_batch["query_sequence"])):
        seq = int(span_batch["query_sequence"][row])
        pieces = tokenizer.convert_ids_to_tokens(span_batch["query_ids"][row][: span_batch["query_length"][row]])
        assert not pieces[0].startswith("##")
        # The span ends at a word end: the token after it in the original block is not a continuation.
        original = blocks[seq]["input_ids"]
        n = len(pieces)
        starts = [m for m in range(len(original) - n + 1)
                  if tokenizer.convert_ids_to_tokens(original[m : m + n]) == pieces and blocks[seq]["word_start"][m]
                  and blocks[seq]["word_end"][m + n - 1]]
        assert starts


@pytest.mark.parametrize("kwargs, message", [
    ({"mask_ratio": 1.5}, "mask_ratio must be in"),
    ({"geometric_p": 0.0}, "geometric_p must be in"),
    ({"max_span_length": 0}, "max_span_length must be >= 1"),
    ({"mode": "phrase"}, "use 'span' or 'single'"),
])
def test_collator_validation(tokenizer, kwargs, message):
    with pytest.raises(ValueError, match=message):
        NPMSpanCollator(tokenizer, **kwargs)


def test_tokenizer_without_mask_token_is_refused(tokenizer):
    import copy

    unmasked = copy.deepcopy(tokenizer)
    unmasked.mask_token = None
    with pytest.raises(ValueError, match="has no mask token"):
        NPMSpanCollator(unmasked)


def test_too_few_spans_still_give_a_valid_batch(tokenizer):
    features = [{"input_ids": tokenizer(t)["input_ids"], "word_start": [1] * 6, "word_end": [1] * 6, "group": 0}
                for t in ("alice rome", "bob oslo", "carol lima", "dave cairo")]
    for feature in features:
        n = len(feature["input_ids"])
        feature["word_start"], feature["word_end"] = [1] * n, [1] * n
    batch = NPMSpanCollator(tokenizer)(features)
    assert batch["query_ids"].shape == (0, 10) and batch["input_ids"].shape[0] == 4


# -------------------------------------------------------------------------------------------------------- loss
def test_loss_matches_a_naive_computation(model_dir, blocks, tokenizer):
    model = NPMModel.from_pretrained(model_dir)
    batch = NPMSpanCollator(tokenizer)([blocks[i] for i in range(8)])
    loss_module = NPMContrastiveLoss(model)
    loss = loss_module(model, batch)
    with torch.no_grad():
        queries = model(batch["input_ids"], batch["attention_mask"]).last_hidden_state
        keys = model(batch["key_input_ids"], batch["key_attention_mask"]).last_hidden_state
    scale = model.config.scale
    totals = {"start": [], "end": []}
    key_ids = batch["key_input_ids"].tolist()
    for row in range(len(batch["query_sequence"])):
        seq = int(batch["query_sequence"][row])
        span = batch["query_ids"][row][: batch["query_length"][row]].tolist()
        for side, position in (("start", batch["query_start"][row]), ("end", batch["query_end"][row])):
            q = queries[seq, position]
            scores, positive = [], []
            for other in range(8):
                if other == seq:
                    continue
                for m in range(32):
                    if not batch["key_attention_mask"][other, m]:
                        continue
                    scores.append(float(q @ keys[other, m]) * scale)
                    first = m if side == "start" else m - len(span) + 1
                    positive.append(first >= 0 and key_ids[other][first : first + len(span)] == span)
            scores = np.array(scores)
            positive = np.array(positive)
            if positive.any():
                totals[side].append(np.logaddexp.reduce(scores) - np.logaddexp.reduce(scores[positive]))
    expected = np.mean(totals["start"]) + np.mean(totals["end"])
    assert loss.item() == pytest.approx(expected, rel=1e-4)
    assert loss_module.last_stats["queries"] == len(batch["query_sequence"])
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)


def test_batch_without_positives_gives_a_connected_zero(model_dir, tokenizer):
    model = NPMModel.from_pretrained(model_dir)
    features = [{"input_ids": tokenizer(t)["input_ids"], "group": 0} for t in ("alice", "bob", "carol", "dave")]
    for feature in features:
        feature["word_start"] = feature["word_end"] = [1] * len(feature["input_ids"])
    batch = NPMSpanCollator(tokenizer)(features)
    loss = NPMContrastiveLoss(model)(model, batch)
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()


def test_excluded_ids_never_begin_or_end_a_masked_span(blocks, tokenizer):
    features = [blocks[i] for i in range(8)]
    plain = NPMSpanCollator(tokenizer)(features)
    edges = lambda batch: {int(ids[0]) for ids in batch["query_ids"]} | {  # noqa: E731
        int(ids[n - 1]) for ids, n in zip(batch["query_ids"], batch["query_length"])}
    common = sorted(edges(plain))[:3]  # ids that do begin or end spans without the rule
    batch = NPMSpanCollator(tokenizer, span_edge_exclude_ids=frozenset(common))(features)
    assert not edges(batch) & set(common)
    assert len(batch["query_sequence"]) > 0


def test_keys_without_gradients_give_the_same_loss_and_one_backward(model_dir, blocks, tokenizer):
    batch = NPMSpanCollator(tokenizer)([blocks[i] for i in range(8)])
    model = NPMModel.from_pretrained(model_dir).eval()  # no dropout: both passes are deterministic
    with_grad = NPMContrastiveLoss(model)(model, batch)
    without = NPMContrastiveLoss(model, key_gradients=False)(model, batch)
    assert without.item() == pytest.approx(with_grad.item(), rel=1e-6)
    grads = {}
    for name, loss in (("with", with_grad), ("without", without)):
        model.zero_grad()
        loss.backward()
        grads[name] = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    assert not torch.allclose(grads["with"], grads["without"])  # the keys' share of the gradient is gone


def test_frozen_embeddings_stay_fixed(model_dir, blocks, tmp_path):
    args = quiet_args(tmp_path, max_steps=2, learning_rate=1e-2, freeze_embeddings=True, key_gradients=False)
    model = NPMModel.from_pretrained(model_dir)
    before = model.get_input_embeddings().weight.detach().clone()
    layer = next(p for n, p in model.named_parameters() if "layer.0" in n).detach().clone()
    NPMTrainer(model=model, args=args, train_dataset=blocks).train()
    assert torch.equal(model.get_input_embeddings().weight, before)
    assert not torch.equal(next(p for n, p in model.named_parameters() if "layer.0" in n), layer)


def _first_losses(model_dir, blocks, tmp_path, **overrides) -> list[float]:
    args = quiet_args(tmp_path, max_steps=2, logging_steps=1, learning_rate=1e-3, **overrides)
    trainer = NPMTrainer(model=NPMModel.from_pretrained(model_dir), args=args, train_dataset=blocks)
    trainer.train()
    trainer.save_model(tmp_path / "saved")
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def test_bf16_autocast_on_cpu_trains_like_fp32_and_saves_fp32_weights(model_dir, blocks, tmp_path):
    """The demo turns on `bf16=True, use_cpu=True` where the CPU computes bf16 natively; the loss must survive it."""
    fp32 = _first_losses(model_dir, blocks, tmp_path / "fp32")
    bf16 = _first_losses(model_dir, blocks, tmp_path / "bf16", bf16=True)
    assert len(bf16) == 2 and all(np.isfinite(bf16))
    np.testing.assert_allclose(bf16, fp32, rtol=0.05)  # bf16 keeps ~3 significant digits; the masks are the same
    assert bf16 != fp32  # autocast really ran in bf16 (identical floats would mean it did not)
    saved = _parameters(tmp_path / "bf16" / "saved")
    assert {tensor.dtype for tensor in saved.values()} == {torch.float32}  # master weights stay fp32


@pytest.mark.parametrize("avx512_bf16, amx, expected", [(True, False, True), (False, True, True), (False, False, False)])
def test_cpu_has_native_bf16_reads_torchs_cpu_probes(monkeypatch, avx512_bf16, amx, expected):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    assert cpu_has_native_bf16() is expected
    monkeypatch.delattr(torch.cpu, "_is_avx512_bf16_supported")
    monkeypatch.delattr(torch.cpu, "_is_amx_tile_supported")
    assert cpu_has_native_bf16() is False  # a torch without the private probes: no bf16, no crash


# ----------------------------------------------------------------------------------------------------- trainer
def test_trainer_trains_logs_and_saves_a_usable_npm(model_dir, blocks, tokenizer, tmp_path):
    args = quiet_args(tmp_path, max_steps=3, logging_steps=1, learning_rate=1e-3)
    trainer = NPMTrainer(model=NPMModel.from_pretrained(model_dir), args=args, train_dataset=blocks)
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == 3 and all(entry["spans_per_batch"] > 0 for entry in logs)
    assert all(0 <= entry["span_accuracy"] <= 1 and entry["queries_with_positives"] == 1.0 for entry in logs)
    trainer.save_model(tmp_path / "trained")
    reloaded = AutoModel.from_pretrained(tmp_path / "trained")
    assert type(reloaded) is NPMModel
    index = npm_hf.build_index(tmp_path / "trained", fact_documents(3, seed=9),
                               args=npm_hf.IndexBuildArguments(block_size=32, show_progress_bar=False))
    assert index.manifest.num_documents == 3


def test_a_lora_trained_npm_merges_saves_indexes_and_answers(model_dir, blocks, tokenizer, tmp_path):
    """peft LoRA on the encoder's attention, trained by NPMTrainer; merged back, it is a plain NPM again."""
    from peft import LoraConfig, get_peft_model

    base = _parameters(model_dir)
    lora = get_peft_model(NPMModel.from_pretrained(model_dir),
                          LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["query", "value"]))
    trainable = {name for name, p in lora.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in name or ".lora_B." in name for name in trainable)
    args = quiet_args(tmp_path, max_steps=3, logging_steps=1, learning_rate=1e-2)
    trainer = NPMTrainer(model=lora, args=args, train_dataset=blocks, processing_class=tokenizer)
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 3 and all(np.isfinite(losses))
    probe = tokenizer(fact_documents(2, seed=11), padding=True, return_tensors="pt")
    with torch.no_grad():
        expected = lora.eval()(**probe).last_hidden_state
    merged = lora.merge_and_unload()
    assert type(merged) is NPMModel
    merged.save_pretrained(tmp_path / "merged")
    tokenizer.save_pretrained(tmp_path / "merged")
    saved = _parameters(tmp_path / "merged")
    assert sorted(saved) == sorted(base)  # no adapter weights left
    changed = {key for key in base if not torch.equal(saved[key], base[key])}
    targeted = {f"encoder.encoder.layer.{i}.attention.self.{m}.weight" for i in (0, 1) for m in ("query", "value")}
    assert changed == targeted
    reloaded = AutoModel.from_pretrained(tmp_path / "merged")
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**probe).last_hidden_state, expected, atol=1e-5, rtol=1e-5)
    npm_hf.build_index(tmp_path / "merged", fact_documents(8, seed=9),
                       args=npm_hf.IndexBuildArguments(block_size=32, show_progress_bar=False))
    answers = pipeline("fill-mask", model=str(tmp_path / "merged"))(f"alice was born in {tokenizer.mask_token} .",
                                                                   top_k=3)
    assert len(answers) == 3 and answers[0]["score"] >= answers[1]["score"] >= answers[2]["score"] > 0
    for answer in answers:  # each answer is a phrase of the indexed corpus, cited where it occurs
        evidence = answer["evidence"]
        assert evidence["text"][evidence["start"] : evidence["end"]].lower() == answer["phrase"].lower()


@pytest.mark.parametrize("adapter", ["full", "lora"])
def test_gradient_checkpointing_gives_the_same_losses_and_weights(model_dir, blocks, tokenizer, tmp_path, adapter):
    """`activation_checkpointing=True` (transformers 5's name for `gradient_checkpointing`) recomputes the encoder
    layers in the backward pass (counted here) and changes nothing else: the same losses, step after step, and the
    same trained weights (no dropout in this model)."""
    from peft import LoraConfig, get_peft_model

    runs = {}
    for checkpointing in (False, True):
        model = NPMModel.from_pretrained(model_dir)
        calls = []
        model.encoder.encoder.layer[0].attention.self.query.register_forward_hook(lambda *_: calls.append(1))
        if adapter == "lora":
            model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                                     target_modules=["query", "value"]))
        args = quiet_args(tmp_path / str(checkpointing), max_steps=2, logging_steps=1, learning_rate=1e-2,
                          activation_checkpointing=checkpointing)
        trainer = NPMTrainer(model=model, args=args, train_dataset=blocks, processing_class=tokenizer)
        trainer.train()
        weights = torch.cat([p.detach().flatten() for p in model.parameters()])
        runs[checkpointing] = ([e["loss"] for e in trainer.state.log_history if "loss" in e], len(calls), weights)
    (plain, plain_calls, plain_weights), (checked, checked_calls, checked_weights) = runs[False], runs[True]
    assert plain_calls == 2 * 2 and checked_calls == 2 * 4  # 2 passes a step (masked, keys), each one recomputed
    np.testing.assert_allclose(checked, plain, rtol=1e-6)
    torch.testing.assert_close(checked_weights, plain_weights, atol=1e-6, rtol=1e-6)


def test_time_budget_stops_training_and_carries_over_a_resume(model_dir, blocks, tmp_path, monkeypatch):
    from npm_hf.trainer import TimeBudgetCallback

    clock = iter(range(0, 10_000, 30))  # every reading of the clock is 30 s after the previous one
    monkeypatch.setattr("npm_hf.trainer.trainer.time.perf_counter", lambda: float(next(clock)))
    args = quiet_args(tmp_path, max_steps=50, max_train_minutes=2.0, save_strategy="steps", save_steps=1)
    trainer = NPMTrainer(model=NPMModel.from_pretrained(model_dir), args=args, train_dataset=blocks)
    trainer.train()
    assert 1 <= trainer.state.global_step < 50  # stopped by the 2-minute budget, not by max_steps
    last = Path(last_complete_checkpoint(args.output_dir))
    spent = json.loads((last / TimeBudgetCallback.CLOCK_FILE).read_text())["train_seconds"]
    assert spent >= 120
    resumed = NPMTrainer(model=NPMModel.from_pretrained(model_dir), args=args, train_dataset=blocks)
    resumed.train(resume_from_checkpoint=str(last))
    # the budget was already spent: the resumed run stops after its first step (Trainer checks after each step)
    assert resumed.state.global_step == trainer.state.global_step + 1
    with pytest.raises(ValueError, match="max_train_minutes must be > 0"):
        quiet_args(tmp_path, max_train_minutes=0)


def test_a_time_budget_shows_its_minutes_not_max_steps(model_dir, blocks, tmp_path, monkeypatch, capsys):
    from transformers.trainer_callback import ProgressCallback

    from npm_hf.trainer.trainer import TimeBudgetProgressCallback

    clock = iter(range(0, 10_000, 30))
    monkeypatch.setattr("npm_hf.trainer.trainer.time.perf_counter", lambda: float(next(clock)))
    args = quiet_args(tmp_path, max_steps=1_000_000, max_train_minutes=2.0, disable_tqdm=False)
    trainer = NPMTrainer(model=NPMModel.from_pretrained(model_dir), args=args, train_dataset=blocks)
    bars = [type(c) for c in trainer.callback_handler.callbacks if isinstance(c, ProgressCallback)]
    assert bars == [TimeBudgetProgressCallback]
    trainer.train()
    shown = capsys.readouterr().err
    assert "2.0/2.0 min" in shown and f"step {trainer.state.global_step}" in shown and "1000000" not in shown
    quiet = NPMTrainer(model=NPMModel.from_pretrained(model_dir), train_dataset=blocks,
                       args=quiet_args(tmp_path, max_train_minutes=2.0, disable_tqdm=True))
    assert not [c for c in quiet.callback_handler.callbacks if isinstance(c, ProgressCallback)]


@pytest.mark.parametrize("decay, expected", [("linear", 0.75), ("cosine", 0.5 * (1 - np.cos(np.pi * 0.75)))])
def test_schedule_by_time_decays_with_the_budget_spent(model_dir, blocks, tmp_path, monkeypatch, decay, expected):
    now = [0.0]
    monkeypatch.setattr("npm_hf.trainer.trainer.time.perf_counter", lambda: now[0])
    args = quiet_args(tmp_path, max_train_minutes=10.0, schedule_by_time=True, lr_scheduler_type=decay,
                      warmup_steps=2, learning_rate=1e-3)
    trainer = NPMTrainer(model=NPMModel.from_pretrained(model_dir), args=args, train_dataset=blocks)
    trainer.create_optimizer_and_scheduler(num_training_steps=1_000)
    trainer.time_budget.started = 0.0
    trainer.lr_scheduler.step()  # step 1 of a 2-step warm-up: half the rate, whatever the clock says
    assert trainer.lr_scheduler.get_last_lr()[0] == pytest.approx(0.5e-3)
    now[0] = 150.0  # a quarter of the 10-minute budget spent
    trainer.lr_scheduler.step()
    assert trainer.lr_scheduler.get_last_lr()[0] == pytest.approx(1e-3 * expected)
    now[0] = 700.0  # past the budget: nothing left to decay
    trainer.lr_scheduler.step()
    assert trainer.lr_scheduler.get_last_lr()[0] == 0.0


def test_schedule_by_time_needs_a_budget_and_a_decay(tmp_path):
    with pytest.raises(ValueError, match="schedule_by_time needs max_train_minutes"):
        quiet_args(tmp_path, schedule_by_time=True, lr_scheduler_type="linear")
    with pytest.raises(ValueError, match="lr_scheduler_type='constant'"):
        quiet_args(tmp_path, schedule_by_time=True, max_train_minutes=1.0, lr_scheduler_type="constant")


def test_trainer_rejects_bad_setups(model_dir, blocks, tmp_path, tokenizer):
    model = NPMModel.from_pretrained(model_dir)
    with pytest.raises(ValueError, match="needs NPMTrainingArguments"):
        NPMTrainer(model=model, args=TrainingArguments(output_dir=str(tmp_path)), train_dataset=blocks)
    with pytest.raises(ValueError, match="multiple of the group size"):
        NPMTrainer(model=model, args=quiet_args(tmp_path, per_device_train_batch_size=6), train_dataset=blocks)
    with pytest.raises(ValueError, match="lacks the columns \\['word_start', 'word_end', 'group'\\]"):
        NPMTrainer(model=model, args=quiet_args(tmp_path), train_dataset=blocks.select_columns(["input_ids"]))
    with pytest.raises(ValueError, match="wrap your encoder"):
        NPMTrainer(model=BertModel(BertConfig(vocab_size=10, hidden_size=8, num_hidden_layers=1,
                                              num_attention_heads=1, intermediate_size=8)), train_dataset=blocks)
    long_documents = [" ".join(fact_documents(3, seed=s)) for s in range(16)]  # paragraphs longer than a block
    long_blocks = prepare_training_blocks(long_documents, tokenizer, block_size=70, group_size=4)
    with pytest.raises(ValueError, match="more than the encoder accepts \\(64\\)"):
        NPMTrainer(model=model, args=quiet_args(tmp_path), train_dataset=long_blocks)
    with pytest.raises(ValueError, match="mask_ratio must be in"):
        quiet_args(tmp_path, mask_ratio=0.0)


def _parameters(folder) -> dict:
    return load_file(str(Path(folder) / "model.safetensors"))


LAUNCHERS = {  # how a 2-process run is started; both run 2 CPU processes over gloo
    "torchrun": [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"],
    "accelerate": [str(Path(sys.executable).parent / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2",
                   "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"],
}


def _one_step(model_dir, dataset_dir, output_dir, groups_per_process, launcher=None, *extra: str) -> dict:
    """One SGD step by tests/scripts/train_one_step.py, in one process or under `launcher` (a LAUNCHERS key); the
    saved weights. Under a launcher, <output_dir>-report.json says how the run was distributed."""
    script = [str(SCRIPTS / "train_one_step.py"), str(model_dir), str(dataset_dir), str(output_dir),
              str(groups_per_process)]
    if launcher is None:
        command = [sys.executable, *script]
    else:
        flag = "--master_port" if launcher == "torchrun" else "--main_process_port"
        report = Path(output_dir).parent / f"{Path(output_dir).name}-report.json"
        command = [*LAUNCHERS[launcher], flag, _free_port(), *script, str(report), *extra]
    _run_launched(command, Path(output_dir).parent)
    return _parameters(output_dir)


def _free_port() -> str:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return str(probe.getsockname()[1])


def _run_launched(command: list[str], scratch: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "HF_HOME": str(scratch / "hf-home")}  # no user's accelerate config applies
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=240)  # ~10 s when healthy
    assert result.returncode == 0, result.stderr[-3000:]


def test_gradient_accumulation_averages_micro_batches(model_dir, blocks, tmp_path):
    two_groups = blocks.filter(lambda row: row["group"] in (0, 1))
    for name, dataset in (("both", two_groups), ("first", two_groups.filter(lambda r: r["group"] == 0)),
                          ("second", two_groups.filter(lambda r: r["group"] == 1))):
        args = quiet_args(tmp_path / name, max_steps=1, optim="sgd", learning_rate=0.5, weight_decay=0.0,
                          max_grad_norm=0.0, lr_scheduler_type="constant", shuffle_groups=False,
                          gradient_accumulation_steps=2 if name == "both" else 1)
        trainer = NPMTrainer(model=NPMModel.from_pretrained(model_dir), args=args, train_dataset=dataset)
        trainer.train()
        trainer.save_model(tmp_path / name)
    both, first, second = (_parameters(tmp_path / n) for n in ("both", "first", "second"))
    for key in both:
        torch.testing.assert_close(both[key], (first[key] + second[key]) / 2, atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def one_step_reference(model_dir, blocks, tmp_path_factory):
    """Two groups saved to disk and the weights after one SGD step by one process holding both."""
    folder = tmp_path_factory.mktemp("one-step")
    blocks.filter(lambda row: row["group"] in (0, 1)).save_to_disk(folder / "blocks")
    return folder / "blocks", _one_step(model_dir, folder / "blocks", folder / "single", groups_per_process=2)


@pytest.mark.parametrize("launcher", ["torchrun", "accelerate"])
def test_ddp_step_equals_one_process_over_the_global_batch(model_dir, one_step_reference, tmp_path, launcher):
    """`torchrun --nproc_per_node 2` and `accelerate launch --multi_gpu --num_processes 2` on CPU (gloo): one SGD
    step matches one process holding both groups."""
    dataset_dir, single = one_step_reference
    ddp = _one_step(model_dir, dataset_dir, tmp_path / "ddp", groups_per_process=1, launcher=launcher)
    start = _parameters(model_dir)
    moved = max(float((single[k] - start[k]).abs().max()) for k in single)
    assert moved > 1e-3  # the step did change the weights
    for key in single:
        torch.testing.assert_close(ddp[key], single[key], atol=1e-5, rtol=1e-5)
    report = json.loads((tmp_path / "ddp-report.json").read_text())
    assert report == {"world_size": 2, "fsdp": False, "wrapper": "DistributedDataParallel", "sharded_parameters": 0}


def test_trainer_asked_for_fsdp_on_cpu_runs_ddp(model_dir, one_step_reference, tmp_path):
    """What accelerate 1.16 does with `fsdp="full_shard"` on CPU processes (docs/training.md says so): it enables
    FSDP for accelerator devices only and trains with DDP instead, without a word. The step is still right."""
    dataset_dir, single = one_step_reference
    step = _one_step(model_dir, dataset_dir, tmp_path / "fsdp", 1, "torchrun", "2")  # FSDP2 via TrainingArguments
    for key in single:
        torch.testing.assert_close(step[key], single[key], atol=1e-5, rtol=1e-5)
    report = json.loads((tmp_path / "fsdp-report.json").read_text())
    assert report == {"world_size": 2, "fsdp": False, "wrapper": "DistributedDataParallel", "sharded_parameters": 0}


@pytest.mark.slow
def test_fsdp2_sharded_step_on_cpu_equals_one_process(model_dir, one_step_reference, tmp_path):
    """torch's FSDP2 (`fully_shard`, no Trainer) with 2 CPU processes over gloo: every parameter is a sharded
    DTensor, and one SGD step of NPM's loss gives the weights of one process holding both groups."""
    dataset_dir, _ = one_step_reference
    weights = {}
    for processes in (1, 2):
        output, report = tmp_path / f"fsdp{processes}.safetensors", tmp_path / f"fsdp{processes}.json"
        _run_launched([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
                       "--master_port", _free_port(), str(SCRIPTS / "fsdp_one_step.py"), str(model_dir),
                       str(dataset_dir), str(output), str(report)], tmp_path)
        facts = json.loads(report.read_text())
        assert facts["world_size"] == processes and facts["sharded_parameters"] == facts["parameters"] > 0
        weights[processes] = load_file(str(output))
    start = _parameters(model_dir)
    assert sorted(weights[2]) == sorted(start)
    assert max(float((weights[1][k] - start[k]).abs().max()) for k in start) > 1e-3  # the step moved the weights
    for key in start:
        torch.testing.assert_close(weights[2][key], weights[1][key], atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_training_learns_to_retrieve_held_out_spans(model_dir, blocks, tokenizer, tmp_path):
    held_out = prepare_training_blocks(fact_documents(64, seed=7), tokenizer, block_size=32, group_size=4)
    args = quiet_args(tmp_path, max_steps=40, per_device_train_batch_size=8, per_device_eval_batch_size=8,
                      learning_rate=2e-3, logging_steps=10)
    trainer = NPMTrainer(model=NPMModel.from_pretrained(model_dir), args=args, train_dataset=blocks,
                         eval_dataset=held_out)
    before = trainer.evaluate()
    trainer.train()
    after = trainer.evaluate()
    assert after["eval_loss"] < before["eval_loss"] - 0.2
    assert after["eval_span_accuracy"] > before["eval_span_accuracy"] + 0.01
    train_losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert train_losses[-1] < train_losses[0]


def test_train_gives_new_npms_the_similarity_scale_asked_for(model_dir, tmp_path):
    from npm_hf.api import TrainDataArguments, train

    corpus = tmp_path / "facts.txt"
    corpus.write_text("\n".join(fact_documents(20, seed=4)) + "\n", encoding="utf-8")
    data = TrainDataArguments(model=str(model_dir.parent / "encoder"), corpus=str(corpus), output=str(tmp_path / "npm"),
                              block_size=32, group_size=4, similarity_scale=0.5)
    trainer = train(data, quiet_args(tmp_path, max_steps=1))
    assert trainer.model.config.scale == 0.5
    assert NPMModel.from_pretrained(tmp_path / "npm").config.similarity_scale == 0.5
    with pytest.raises(ValueError, match="similarity_scale must be > 0 \\(or None for the paper's\\), got 0"):
        TrainDataArguments(model="m", corpus="c", output="o", similarity_scale=0)


def _train_command(model, corpus, output, *flags):
    return [str(Path(sys.executable).parent / "npm-hf"), "train", "--model", str(model), "--corpus", str(corpus),
            "--output", str(output), "--block-size", "32", "--group-size", "4", "--per_device_train_batch_size", "4",
            "--use_cpu", "--report_to", "none", "--disable_tqdm", "true", *flags]


def test_cli_train_is_killed_then_resumes_from_its_checkpoint(model_dir, tmp_path):
    corpus = tmp_path / "facts.txt"
    corpus.write_text("\n".join(fact_documents(60, seed=4)) + "\n", encoding="utf-8")
    output = tmp_path / "trained"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = _train_command(model_dir, corpus, output, "--max_steps", "400", "--save_steps", "2",
                             "--learning_rate", "1e-3")
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 240
    while last_complete_checkpoint(output) is None:
        assert process.poll() is None and time.time() < deadline, process.stderr.read().decode()[-2000:]
        time.sleep(0.05)
    process.kill()
    process.wait()
    assert not (output / "config.json").exists()  # killed before the final save
    done = int(last_complete_checkpoint(output).rsplit("-", 1)[1])
    (output / f"checkpoint-{done + 2}").mkdir(exist_ok=True)  # as if killed while writing the next checkpoint
    resumed = subprocess.run(_train_command(model_dir, corpus, output, "--max_steps", str(done + 4), "--save_steps",
                                            "2", "--learning_rate", "1e-3", "--resume_from_checkpoint", "true"),
                             env={**env, "TRANSFORMERS_VERBOSITY": "info"}, capture_output=True, text=True,
                             timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"Trained for {done + 4} steps" in resumed.stdout
    assert "Skipping the incomplete checkpoint" in resumed.stderr
    assert f"Resuming training from checkpoint with epoch 0 and global step {done}" in resumed.stderr
    state = json.loads((output / f"checkpoint-{done + 4}" / "trainer_state.json").read_text())
    assert state["global_step"] == done + 4
    assert type(AutoModel.from_pretrained(output)) is NPMModel
    assert not (output / "training_args.bin").exists()  # no pickle in the model's directory (checkpoints keep it)
    assert (output / f"checkpoint-{done + 4}" / "training_args.bin").exists()


# ------------------------------------------------------------------------------------------ salient span masking
def test_salient_tokens_mark_name_runs_that_do_not_open_a_sentence(tokenizer):
    from npm_hf.corpus import CorpusStats, salient_tokens, tokenize_documents

    text = "Alice was born in Paris. The home town of Bob is Rome of Lima and Oslo-Riga."
    ((_, records),) = tokenize_documents([{"id": "0", "title": "", "text": text}], tokenizer, CorpusStats())
    marked = salient_tokens(records, text)
    words = [text[s:e] for s, e, m in zip(records["start"], records["end"], marked) if m]
    # "Alice" and "The" open sentences; "of" joins Rome and Lima, "-" joins Oslo and Riga; "of Bob" joins nothing
    assert words == ["Paris", "Bob", "Rome", "of", "Lima", "Oslo", "-", "Riga"]


def _capitalised_facts(count: int, seed: int) -> list[str]:
    return [" ".join(word.capitalize() if word in PEOPLE + CITIES else word for word in document.split())
            for document in fact_documents(count, seed)]


def test_salient_masking_masks_whole_name_runs_first(tokenizer):
    blocks = prepare_training_blocks(_capitalised_facts(60, seed=3), tokenizer, block_size=32, group_size=4,
                                     salient=True)
    features = [blocks[i] for i in range(8)]

    def masked_spans(ratio):
        batch = NPMSpanCollator(tokenizer, mask_ratio=0.1, salient_span_ratio=ratio)(features)
        sequences = [int(s) for s in batch["query_sequence"]]
        spans = []
        for sequence, ids, n in zip(sequences, batch["query_ids"], batch["query_length"]):
            spans.append((sequence, ids[: int(n)].tolist()))
        return spans

    def is_whole_run(sequence, ids):
        salient, tokens = features[sequence]["salient"], features[sequence]["input_ids"]
        for start in range(len(tokens) - len(ids) + 1):
            if tokens[start : start + len(ids)] == ids:
                end = start + len(ids)
                if all(salient[start:end]) and (start == 0 or not salient[start - 1]) and (
                        end == len(tokens) or not salient[end]):
                    return True
        return False

    salient = masked_spans(1.0)
    assert salient and all(is_whole_run(*span) for span in salient)
    plain = masked_spans(0.0)
    assert sum(is_whole_run(*span) for span in plain) < len(plain)  # without it, other n-grams are masked too


def test_salient_masking_needs_the_salient_column(blocks, tokenizer, model_dir, tmp_path):
    with pytest.raises(ValueError, match=r"salient=True"):
        NPMSpanCollator(tokenizer, salient_span_ratio=0.5)([blocks[i] for i in range(4)])
    with pytest.raises(ValueError, match=r"salient_span_ratio must be in \[0, 1\]"):
        NPMSpanCollator(tokenizer, salient_span_ratio=1.5)
    with pytest.raises(ValueError, match=r"salient_span_ratio must be in \[0, 1\]"):
        quiet_args(tmp_path, salient_span_ratio=-0.1)
    with pytest.raises(ValueError, match=r"lacks the columns \['salient'\].*salient=True"):
        NPMTrainer(model=NPMModel.from_pretrained(model_dir), args=quiet_args(tmp_path, salient_span_ratio=1.0),
                   train_dataset=blocks)


def test_trainer_on_memory_mapped_blocks_trains_as_on_the_in_ram_lists(model_dir, blocks, tokenizer, tmp_path,
                                                                       list_training_blocks):
    """Issue 19: the Arrow-backed blocks (a memory-mapped file) are the old in-RAM lists, and a real NPMTrainer
    run on them gives the same losses and weights for the same seed."""
    import datasets

    assert isinstance(blocks._data, datasets.table.MemoryMappedTable) and blocks.cache_files
    in_ram = datasets.Dataset.from_dict(list_training_blocks(fact_documents(200, seed=2), tokenizer, block_size=32,
                                                             group_size=4))
    assert in_ram.to_dict() == blocks.to_dict()
    arrow = _first_losses(model_dir, blocks, tmp_path / "arrow")
    lists = _first_losses(model_dir, in_ram, tmp_path / "lists")
    assert len(arrow) == 2 and arrow == lists
    saved = [load_file(tmp_path / name / "saved" / "model.safetensors") for name in ("arrow", "lists")]
    assert saved[0].keys() == saved[1].keys() and all(torch.equal(saved[0][k], saved[1][k]) for k in saved[0])
