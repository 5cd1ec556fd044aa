"""NPM's in-batch contrastive loss (method §4), gathered across processes with gradients."""

import torch
import torch.distributed as dist
from torch import nn
from transformers.utils import logging


logger = logging.get_logger(__name__)


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate `tensor` from every process along dim 0; gradients flow back to each process's own part
    (summed over the processes that used it). A single process gets `tensor` itself."""
    if _world()[1] == 1:
        return tensor
    # torch.distributed.nn's gather is deprecated since torch 2.6 for the functional collectives, whose
    # autograd gather was renamed in later releases (the old name warns); take the newest one present.
    from torch.distributed import _functional_collectives as functional

    autograd_gather = getattr(functional, "all_gather_single_autograd", None) or getattr(
        functional, "all_gather_tensor_autograd", None)
    if autograd_gather is None:
        import torch.distributed.nn.functional as distributed_functional

        return torch.cat(distributed_functional.all_gather(tensor), dim=0)
    return autograd_gather(tensor.contiguous(), gather_dim=0, group=dist.group.WORLD)


def gather(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate `tensor` from every process along dim 0, without gradients (ids, masks, counts)."""
    rank, world = _world()
    if world == 1:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(world)]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts, dim=0)


class NPMContrastiveLoss(nn.Module):
    """In-batch contrastive loss of NPM.

    Queries are the last hidden states at the masks of the masked pass; keys are the last hidden states of every
    token of the unmasked pass (with gradients), gathered from all processes. Keys of the query's own sequence and
    padding are excluded. Span mode: the start query's positives are the key positions where its span starts in
    another sequence, the end query's where it ends; single mode: keys with the same token id. With
    s = scale · q·h, each query contributes −log Σ_pos e^s + log Σ_valid e^s; L = mean L_start + mean L_end over
    queries with positives (the others are dropped and counted). Means are taken over all processes' queries, so
    a step under DDP equals one process over the same global batch.

    Args:
        model: the `NPMModel` (its config gives `mode` and the similarity `scale`).
    """

    def __init__(self, model, key_gradients: bool = True):
        super().__init__()
        self.model = model
        self.key_gradients = key_gradients  # False: keys are constants (one backward pass instead of two)
        self.last_stats: dict[str, float] = {}

    def forward(self, model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """`model` is the (possibly DDP-wrapped) model to call; `inputs` come from `NPMSpanCollator`."""
        config = self.model.config
        queries_hidden = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).last_hidden_state
        with torch.set_grad_enabled(self.key_gradients and torch.is_grad_enabled()):
            keys_hidden = model(input_ids=inputs["key_input_ids"],
                                attention_mask=inputs["key_attention_mask"]).last_hidden_state
        rank, _ = _world()
        batch, length = inputs["key_input_ids"].shape
        all_keys = gather_with_grad(keys_hidden.float()) if keys_hidden.requires_grad else gather(keys_hidden.float())
        keys = all_keys.reshape(-1, keys_hidden.shape[-1])
        key_ids = gather(inputs["key_input_ids"])
        key_valid = gather(inputs["key_attention_mask"]).bool()
        sequence = inputs["query_sequence"] + rank * batch  # global index of each query's own sequence
        owner = torch.arange(key_ids.shape[0], device=key_ids.device).repeat_interleave(length)
        valid = key_valid.reshape(1, -1) & (owner[None, :] != sequence[:, None])
        starts, ends = self._positives(key_ids, inputs["query_ids"], inputs["query_length"], config.mode)
        rows = inputs["query_sequence"]
        losses, kept, correct = [], 0, 0
        _, world = _world()
        for positions, positives in ((inputs["query_start"], starts), (inputs["query_end"], ends)):
            positives = positives & valid
            has = positives.any(dim=1)
            # Only queries with positives enter the graph: an all -inf row would turn its zero gradient into NaN.
            query = queries_hidden[rows[has], positions[has]].float()
            logits = query @ keys.T * config.scale
            scores = logits.masked_fill(~valid[has], float("-inf"))
            per_query = torch.logsumexp(scores, dim=1) - torch.logsumexp(
                logits.masked_fill(~positives[has], float("-inf")), dim=1)
            with torch.no_grad():  # top-1 retrieval accuracy among this batch's keys, for logging
                best = scores.argmax(dim=1, keepdim=True)
                correct += int(positives[has].gather(1, best).sum())
            total = gather(has.sum().reshape(1).float()).sum()  # queries with positives over all processes
            # A process without positives still returns a graph-connected zero, so DDP's backward never hangs.
            summed = per_query.sum() + (queries_hidden.sum() + keys.sum()) * 0.0
            losses.append(summed * world / total.clamp(min=1))
            kept += int(has.sum())
        self.last_stats = {
            "queries": float(len(rows)),
            "queries_with_positives": kept / 2,
            "correct_top1": correct / 2,
        }
        return losses[0] + losses[1]

    @staticmethod
    def _positives(key_ids: torch.Tensor, query_ids: torch.Tensor, query_length: torch.Tensor, mode: str):
        """Boolean (num_queries, num_sequences * length) maps of start and end positives."""
        num_sequences, length = key_ids.shape
        if mode == "single":
            same = key_ids.reshape(1, -1) == query_ids[:, :1]
            return same, same
        starts = torch.zeros(len(query_ids), num_sequences, length, dtype=torch.bool, device=key_ids.device)
        ends = torch.zeros_like(starts)
        for n in torch.unique(query_length).tolist():
            if n > length:
                continue
            chosen = torch.nonzero(query_length == n).reshape(-1)
            windows = key_ids.unfold(1, n, 1)  # (sequences, length - n + 1, n)
            match = (windows[None] == query_ids[chosen, None, None, :n]).all(dim=-1)
            starts[chosen, :, : length - n + 1] = match
            ends[chosen, :, n - 1 :] = match
        shape = (len(query_ids), num_sequences * length)
        return starts.reshape(shape), ends.reshape(shape)

    def get_config_dict(self) -> dict:
        return {"mode": self.model.config.mode, "scale": self.model.config.scale}

    @property
    def citation(self) -> str:
        return (
            "@inproceedings{min2023nonparametric, title={Nonparametric Masked Language Modeling}, author={Min, Sewon "
            "and Shi, Weijia and Lewis, Mike and Chen, Xilun and Yih, Wen-tau and Hajishirzi, Hannaneh and "
            "Zettlemoyer, Luke}, booktitle={Findings of ACL 2023}, year={2023}}"
        )
