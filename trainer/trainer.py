"""NPMTrainer: a thin Trainer whose loss is NPM's in-batch contrastive objective."""

from collections import defaultdict

import gc
import json
import math
import os
import re
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import AutoTokenizer, Trainer, TrainerCallback
from transformers.trainer import TRAINING_ARGS_NAME
from transformers.trainer_callback import ProgressCallback
from transformers.utils import logging

from .data_collator import NPMSpanCollator
from .loss import NPMContrastiveLoss
from .training_args import NPMTrainingArguments


logger = logging.get_logger(__name__)

REQUIRED_COLUMNS = ("input_ids", "word_start", "word_end", "group")


class GroupSampler(torch.utils.data.Sampler):
    """Yields example indices group by group (a group is never split), in a seeded order reshuffled per epoch.

    Every process computes the same order; accelerate then hands each process whole batches, hence whole groups.
    """

    def __init__(self, groups: list[int], shuffle: bool = True, seed: int = 0):
        self.members = defaultdict(list)
        for index, group in enumerate(groups):
            self.members[int(group)].append(index)
        self.order = list(self.members)
        self.shuffle, self.seed, self.epoch = shuffle, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return sum(len(members) for members in self.members.values())

    def __iter__(self):
        order = self.order
        if self.shuffle:
            order = [order[i] for i in np.random.default_rng(self.seed + self.epoch).permutation(len(order))]
        for group in order:
            yield from self.members[group]


class NPMTrainer(Trainer):
    """Trains an `NPMModel` with NPM's contrastive loss; everything else is the stock `Trainer`.

    Args:
        model: an `NPMModel` (e.g. `NPMModel.from_encoder("roberta-base")`).
        args: [`NPMTrainingArguments`].
        train_dataset / eval_dataset: from `npm_hf.prepare_training_blocks` (columns input_ids, word_start,
            word_end, group).
        processing_class: the tokenizer (loaded from the model's name_or_path when omitted).
        data_collator: defaults to an `NPMSpanCollator` configured from `args` and the model.
        loss: defaults to `NPMContrastiveLoss(model)`.

    Logs, besides the loss, `spans_per_batch` (queries per batch), `queries_with_positives` (their share) and
    `span_accuracy` (share of those whose best-scoring in-batch key is a positive); with an `eval_` prefix in
    evaluation.
    """

    loss_is_scaled_for_ga = False  # the loss is a per-batch mean: Trainer divides by accumulation steps
    # Callback classes every NPMTrainer adds; `import npm_hf` puts the model-card callback here.
    default_callbacks: list = []

    def __init__(self, model=None, args: NPMTrainingArguments | None = None, train_dataset=None, eval_dataset=None,
                 processing_class=None, data_collator=None, loss: NPMContrastiveLoss | None = None,
                 span_edge_exclude_ids: frozenset | None = None, **kwargs):
        if getattr(getattr(model, "config", None), "model_type", None) != "npm":
            raise ValueError("NPMTrainer trains NPM models: wrap your encoder with NPMModel.from_encoder(...) first.")
        if args is None:
            args = NPMTrainingArguments(output_dir="npm-output")
        if not isinstance(args, NPMTrainingArguments):
            raise ValueError(
                f"NPMTrainer needs NPMTrainingArguments, got {type(args).__name__}; convert it with "
                "NPMTrainingArguments(**args.to_dict())."
            )
        if processing_class is None:
            processing_class = AutoTokenizer.from_pretrained(model.name_or_path)
        for name, dataset in (("train_dataset", train_dataset), ("eval_dataset", eval_dataset)):
            if dataset is not None:
                _check_dataset(name, dataset, args, model.config.max_input_length)
        if data_collator is None:
            data_collator = NPMSpanCollator(
                processing_class, mode=model.config.mode, mask_ratio=args.mask_ratio, geometric_p=args.geometric_p,
                max_span_length=args.max_masked_span_length, max_spans_per_sequence=args.max_spans_per_sequence,
                max_ngram_uses=args.max_ngram_uses, max_length=model.config.max_input_length, seed=args.masking_seed,
                span_edge_exclude_ids=span_edge_exclude_ids, salient_span_ratio=args.salient_span_ratio,
            )
        if args.freeze_embeddings:
            model.get_input_embeddings().requires_grad_(False)
        super().__init__(model=model, args=args, train_dataset=train_dataset, eval_dataset=eval_dataset,
                         processing_class=processing_class, data_collator=data_collator, **kwargs)
        for callback in self.default_callbacks:
            self.add_callback(callback())
        self.time_budget = None
        if args.max_train_minutes is not None:
            self.time_budget = TimeBudgetCallback(args.max_train_minutes)
            self.add_callback(self.time_budget)
            if self.pop_callback(ProgressCallback) is not None:  # a bar over max_steps would show a meaningless ETA
                self.add_callback(TimeBudgetProgressCallback(self.time_budget))
        self.loss = loss if loss is not None else NPMContrastiveLoss(model, key_gradients=args.key_gradients)
        self._span_stats = defaultdict(float)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss = self.loss(model, inputs)
        for key, value in self.loss.last_stats.items():
            self._span_stats[key] += value
        self._span_stats["batches"] += 1
        return (loss, {}) if return_outputs else loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        stats, self._span_stats = self._span_stats, defaultdict(float)
        if stats["batches"]:
            prefix = "eval_" if any(key.startswith("eval_") for key in logs) else ""
            logs[f"{prefix}spans_per_batch"] = round(stats["queries"] / stats["batches"], 2)
            share = stats["queries_with_positives"] / max(stats["queries"], 1)
            logs[f"{prefix}queries_with_positives"] = round(share, 4)
            logs[f"{prefix}span_accuracy"] = round(stats["correct_top1"] / max(stats["queries_with_positives"], 1), 4)
        super().log(logs, start_time)

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        if not self.args.schedule_by_time or self.lr_scheduler is not None:
            return super().create_scheduler(num_training_steps, optimizer)
        warmup = self.args.get_warmup_steps(num_training_steps)
        decay = getattr(self.args.lr_scheduler_type, "value", self.args.lr_scheduler_type)
        budget = self.time_budget

        def factor(step: int) -> float:
            if step < warmup:
                return step / max(1, warmup)
            left = max(0.0, 1.0 - budget.spent() / budget.budget)
            return left if decay == "linear" else 0.5 * (1.0 - math.cos(math.pi * left))

        self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer or self.optimizer, factor)
        self._created_lr_scheduler = True
        return self.lr_scheduler

    def _get_train_sampler(self, train_dataset=None):
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        return GroupSampler(dataset["group"], shuffle=self.args.shuffle_groups, seed=self.args.seed)


def _check_dataset(name: str, dataset, args: NPMTrainingArguments, max_length: int) -> None:
    required = REQUIRED_COLUMNS + (("salient",) if args.salient_span_ratio > 0 else ())
    missing = [column for column in required if column not in dataset.column_names]
    if missing:
        how = ", salient=True" if "salient" in missing else ""
        raise ValueError(
            f"{name} lacks the columns {missing}; build it with npm_hf.prepare_training_blocks(corpus, "
            f"tokenizer{how})."
        )
    groups = np.asarray(dataset["group"])
    sizes = np.unique(np.unique(groups, return_counts=True)[1])
    batch = args.per_device_train_batch_size if name == "train_dataset" else args.per_device_eval_batch_size
    if len(sizes) != 1 or batch % int(sizes[0]):
        raise ValueError(
            f"{name} has groups of {sizes.tolist()} sequences; a batch of {batch} per device must hold whole groups. "
            f"Set per_device_{'train' if name == 'train_dataset' else 'eval'}_batch_size to a multiple of the "
            "group size."
        )
    longest = max(len(ids) for ids in dataset[:64]["input_ids"])
    if longest > max_length:
        raise ValueError(
            f"{name} has sequences of {longest} tokens, more than the encoder accepts ({max_length}); prepare the "
            f"blocks with block_size <= {max_length} (masking a span of one token adds one more)."
        )


class TimeBudgetCallback(TrainerCallback):
    """Stops training after `minutes` of training wall time. Checkpoints record the time spent so far, so a run
    resumed from one continues the same budget instead of starting a new one."""

    CLOCK_FILE = "npm_train_clock.json"

    def __init__(self, minutes: float):
        self.budget = minutes * 60.0
        self.spent_before = 0.0
        self.started = None

    def on_train_begin(self, args, state, control, **kwargs):
        clock = Path(args.output_dir) / f"checkpoint-{state.global_step}" / self.CLOCK_FILE
        if state.global_step and clock.exists():
            self.spent_before = float(json.loads(clock.read_text())["train_seconds"])
        self.started = time.perf_counter()

    def spent(self) -> float:
        return self.spent_before + (time.perf_counter() - self.started if self.started is not None else 0.0)

    def on_step_end(self, args, state, control, **kwargs):
        if self.spent() >= self.budget:
            logger.info(f"Training time budget of {self.budget / 60:.1f} minutes reached at step {state.global_step}.")
            control.should_training_stop = True
            control.should_save = args.save_strategy != "no"  # a checkpoint to resume from, where checkpoints are kept

    def on_save(self, args, state, control, **kwargs):
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if folder.is_dir() and state.is_world_process_zero:
            (folder / self.CLOCK_FILE).write_text(json.dumps({"train_seconds": self.spent()}))


class TimeBudgetProgressCallback(ProgressCallback):
    """The training bar of a wall-clock budget: minutes spent of the budget (resumed runs start where they left),
    with the step count beside it, instead of steps out of a `max_steps` that the budget ends long before."""

    BAR_FORMAT = "{l_bar}{bar}| {n:.1f}/{total_fmt} min [{elapsed}<{remaining}{postfix}]"

    def __init__(self, time_budget: TimeBudgetCallback):
        super().__init__()
        self.time_budget = time_budget

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            self.training_bar = tqdm(total=round(self.time_budget.budget / 60, 2), unit="min", dynamic_ncols=True,
                                     bar_format=self.BAR_FORMAT)
            self.training_bar.update(round(self.time_budget.spent() / 60, 2))

    def on_step_end(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            spent = min(self.time_budget.spent(), self.time_budget.budget) / 60
            self.training_bar.set_postfix_str(f"step {state.global_step}", refresh=False)
            self.training_bar.update(spent - self.training_bar.n)


def last_complete_checkpoint(output_dir) -> str | None:
    """The newest `checkpoint-N` folder whose trainer_state.json (written last by Trainer) is complete.

    A run killed while saving leaves a partial checkpoint; resuming from it would fail, so it is skipped.
    """
    folder = Path(output_dir)
    if not folder.is_dir():
        return None
    steps = sorted((int(m.group(1)), p) for p in folder.iterdir() if (m := re.fullmatch(r"checkpoint-(\d+)", p.name)))
    for _, path in reversed(steps):
        try:
            json.loads((path / "trainer_state.json").read_text())
            return str(path)
        except (OSError, json.JSONDecodeError):
            logger.warning(f"Skipping the incomplete checkpoint {path} (interrupted while saving).")
    return None


# the model card npm_hf writes beside a saved model (npm_hf.hub_cards: the facts, and the README rendered from them)
_CARD_FACTS_FILE = "npm_card.json"
_CARD_FILES = (_CARD_FACTS_FILE, "README.md")


def save_final_model(trainer: Trainer, output_dir) -> None:
    """`trainer.save_model(output_dir)` without a window in which a kill leaves a half-written model there:
    files are written to a staging folder and moved in, config.json last. The Trainer's pickled arguments stay
    out: the model's directory holds no pickle (checkpoints keep theirs for resuming; the card lists the
    hyper-parameters)."""
    output_dir = Path(output_dir)
    staging = output_dir / ".final-model.tmp"
    trainer.save_model(str(staging))
    if trainer.is_world_process_zero():
        (staging / TRAINING_ARGS_NAME).unlink(missing_ok=True)
        if (output_dir / _CARD_FACTS_FILE).is_file():  # the card of this run (npm_hf's callback) is not replaced by
            for name in _CARD_FILES:                    # the staging copy's, which knows nothing of the training
                (staging / name).unlink(missing_ok=True)
        names = sorted(os.listdir(staging), key=lambda name: name == "config.json")
        for name in names:
            os.replace(staging / name, output_dir / name)
        shutil.rmtree(staging, ignore_errors=True)


def end_distributed_run(trainer: Trainer) -> None:
    """Finish a `torchrun` / `accelerate launch` run: drop the trainer's DDP wrapper while the process group still
    lives, then leave the group with every process present. Left to interpreter exit, gloo's threads sometimes
    aborted ("terminate called without an active exception") or hung one rank. The trainer cannot train again
    afterwards; a single process is left as it is."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    trainer.model_wrapped = trainer.model
    trainer.accelerator.free_memory()
    gc.collect()
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
