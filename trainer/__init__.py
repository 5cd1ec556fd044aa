"""Training NPMs (installed as npm_hf.trainer): span-masking collator, contrastive loss, arguments, Trainer."""

from .data_collator import NPMSpanCollator
from .loss import NPMContrastiveLoss, gather, gather_with_grad
from .trainer import GroupSampler, NPMTrainer
from .training_args import NPMTrainingArguments


__all__ = ["GroupSampler", "NPMContrastiveLoss", "NPMSpanCollator", "NPMTrainer", "NPMTrainingArguments", "gather",
           "gather_with_grad"]
