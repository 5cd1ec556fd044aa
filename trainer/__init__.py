"""Training NPMs (installed as npm_hf.trainer): span-masking collator, contrastive loss, arguments, Trainer."""

from .data_collator import NPMSpanCollator
from .loss import NPMContrastiveLoss, gather, gather_with_grad
from .trainer import (GroupSampler, NPMTrainer, TimeBudgetCallback, end_distributed_run, last_complete_checkpoint,
                      save_final_model)
from .training_args import NPMTrainingArguments, cpu_has_native_bf16


__all__ = ["GroupSampler", "NPMContrastiveLoss", "NPMSpanCollator", "NPMTrainer", "NPMTrainingArguments",
           "TimeBudgetCallback", "cpu_has_native_bf16", "end_distributed_run", "gather", "gather_with_grad",
           "last_complete_checkpoint", "save_final_model"]
