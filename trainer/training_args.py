"""Training arguments of NPMTrainer: TrainingArguments with NPM's defaults and span-masking knobs."""

import dataclasses
import math
from dataclasses import dataclass, field

import torch
from transformers import TrainingArguments
from transformers.utils import logging

from .data_collator import check_masking


logger = logging.get_logger(__name__)


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 matrix products natively (AVX-512 BF16 or AMX), so that `bf16=True` with
    `use_cpu=True` (autocast) speeds training up; elsewhere bf16 is emulated and slower than fp32.
    `benchmarks/train_levers.py` measures it (×2.09 tokens/s on an AVX-512 BF16 AMD EPYC, 2 cores)."""
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")  # private, hence looked up with care
    return any(getattr(torch.cpu, probe, lambda: False)() for probe in probes)


TIME_SCHEDULES = frozenset({"linear", "cosine"})  # decays that `schedule_by_time` can follow in wall time


@dataclass
class NPMTrainingArguments(TrainingArguments):
    """`TrainingArguments` plus NPM's span masking. Defaults follow the paper where they fit any run size
    (lr 3e-5, weight decay 0.01, gradient clipping 2.0); the warm-up stays yours to set (the paper: 4000 steps).

    A batch is made of whole groups (consecutive blocks, see `npm_hf.prepare_training_blocks`), so
    `per_device_train_batch_size` must be a multiple of the dataset's group size.
    """

    learning_rate: float = field(default=3e-5, metadata={"help": "AdamW learning rate (paper: 3e-5)."})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay (paper: 0.01)."})
    max_grad_norm: float = field(default=2.0, metadata={"help": "Gradient clipping norm (paper: 2.0)."})
    per_device_train_batch_size: int = field(
        default=16, metadata={"help": "Sequences per process and step: a multiple of the group size (paper: 16)."}
    )
    per_device_eval_batch_size: int = field(default=16, metadata={"help": "Like per_device_train_batch_size."})
    mask_ratio: float = field(default=0.15, metadata={"help": "Share of real tokens masked per group."})
    geometric_p: float = field(default=0.5, metadata={"help": "Span length ~ Geometric(p) (paper: 0.5)."})
    max_masked_span_length: int = field(default=10, metadata={"help": "Longest masked span in tokens (paper: 10)."})
    max_spans_per_sequence: int = field(default=64, metadata={"help": "Masked spans per sequence at most."})
    max_ngram_uses: int = field(default=10, metadata={"help": "Masks of one n-gram per group at most."})
    salient_span_ratio: float = field(
        default=0.0, metadata={"help": "Share of the masking budget spent first on whole name-like runs (salient span "
                                       "masking; needs blocks built with prepare_training_blocks(..., salient=True))."})
    masking_seed: int = field(default=2022, metadata={"help": "Seed of the span masking (plus the group id)."})
    shuffle_groups: bool = field(default=True, metadata={"help": "Shuffle the order of groups every epoch."})
    max_train_minutes: float | None = field(
        default=None, metadata={"help": "Stop after this much training wall time (counted across resumed runs)."})
    schedule_by_time: bool = field(
        default=False, metadata={"help": "With max_train_minutes: the linear or cosine decay of lr_scheduler_type "
                                         "follows training wall time, reaching its end as the budget runs out (the "
                                         "step count is unknown in advance). Warm-up still counts steps."})
    freeze_embeddings: bool = field(default=False, metadata={"help": "Keep the encoder's input embeddings fixed "
                                                                       "(fewer parameters to update on small budgets)."})
    key_gradients: bool = field(default=True, metadata={"help": "Backpropagate through the unmasked key pass (the "
                                                                  "paper); False encodes keys without gradients, "
                                                                  "cheaper per step."})
    # Required by NPM training; set here so that the defaults need no correction (a different value warns).
    remove_unused_columns: bool = field(default=False, metadata={"help": "Must stay False: the collator needs "
                                                                          "word_start / word_end / group."})
    dataloader_drop_last: bool = field(default=True, metadata={"help": "Must stay True: processes gather keys "
                                                                         "of equal shape."})
    ddp_find_unused_parameters: bool | None = field(default=False, metadata={"help": "False: both passes use "
                                                                                      "every parameter."})
    prediction_loss_only: bool = field(default=True, metadata={"help": "Evaluation reports the NPM loss."})

    def __post_init__(self):
        super().__post_init__()
        for f in dataclasses.fields(self):  # TrainingArguments' own too (learning_rate, adam_beta1, warmup_ratio, ...)
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"NPMTrainingArguments.{f.name} must be a finite number, got {value}.")
        if self.max_train_minutes is not None and self.max_train_minutes <= 0:
            raise ValueError(f"max_train_minutes must be > 0, got {self.max_train_minutes}.")
        if self.schedule_by_time:
            schedule = getattr(self.lr_scheduler_type, "value", self.lr_scheduler_type)
            if self.max_train_minutes is None or schedule not in TIME_SCHEDULES:
                raise ValueError(
                    "schedule_by_time needs max_train_minutes and lr_scheduler_type in "
                    f"{sorted(TIME_SCHEDULES)}; got max_train_minutes={self.max_train_minutes}, "
                    f"lr_scheduler_type={schedule!r}."
                )
        check_masking(mask_ratio=self.mask_ratio, geometric_p=self.geometric_p,
                      max_span_length=self.max_masked_span_length, max_spans_per_sequence=self.max_spans_per_sequence,
                      max_ngram_uses=self.max_ngram_uses, salient_span_ratio=self.salient_span_ratio)
        forced = {
            "remove_unused_columns": False,  # the collator needs word_start / word_end / group
            "dataloader_drop_last": True,  # every process gathers keys of the same shape
            "ddp_find_unused_parameters": False,  # both passes use every parameter
            "prediction_loss_only": True,
            "label_names": ["query_ids"],  # evaluation then goes through compute_loss
        }
        for name, value in forced.items():
            if getattr(self, name) != value and not (name == "label_names" and getattr(self, name) is None):
                logger.warning(f"NPMTrainingArguments needs {name}={value}; ignoring {getattr(self, name)}.")
            setattr(self, name, value)
