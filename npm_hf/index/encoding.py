"""Which corpus tokens an index holds and how they are encoded: the indexing rule, the forward passes over packed
blocks, and the float16 hidden states written to the vectors."""

import numpy as np
import torch
from tqdm.auto import tqdm

from ..inference.stopwords import id_table, reference_stopword_ids
from ..inference.tokens import PAD, SPECIAL, WORD_END, WORD_START
from .arguments import IndexBuildArguments


def indexed_token_mask(ids, flags, boundaries_only: bool = True, stopwords: np.ndarray | None = None) -> np.ndarray:
    """Which corpus tokens get a vector: never special ones; with `boundaries_only` only word starts and word ends
    (the official datastore, method §2); never an id whose entry in the boolean table `stopwords` is set."""
    ids, flags = np.asarray(ids), np.asarray(flags)
    keep = (flags & SPECIAL) == 0
    if boundaries_only:
        keep &= (flags & (WORD_START | WORD_END)) != 0
    if stopwords is not None:
        keep &= ~stopwords[ids]
    return keep


def index_rule(manifest_or_args, tokenizer) -> dict:
    """`indexed_token_mask` keyword arguments for an index manifest or IndexBuildArguments."""
    if isinstance(manifest_or_args, IndexBuildArguments):
        boundaries, stopwords = not manifest_or_args.index_all_tokens, manifest_or_args.remove_stopwords
    else:
        boundaries, stopwords = manifest_or_args.boundary_tokens_only, manifest_or_args.stopwords_removed
    table = id_table(tokenizer, reference_stopword_ids(tokenizer)) if stopwords else None
    return {"boundaries_only": boundaries, "stopwords": table}


def unit_blocks(args: IndexBuildArguments) -> int:
    """Blocks per work unit: `blocks_per_unit` rounded up to whole batches (`index_build.work_units`)."""
    return -(-args.blocks_per_unit // args.batch_size) * args.batch_size


def encoding_plan(flags, args: IndexBuildArguments) -> list[list[tuple[np.ndarray, int]]]:
    """The forward passes that encode a run of tokens starting at a block boundary: per work unit, its blocks sorted
    by length (tokens before their PAD), longest first, in batches of `batch_size`, each batch trimmed to its longest
    block. Returns, per unit, `(block numbers, length)` per forward pass. Packed paragraphs leave blocks of many
    lengths, and a batch of short blocks costs what its longest one does, not `block_size`; every block is encoded
    on its own (attention never crosses blocks), so the order changes no vector."""
    flags, size = np.asarray(flags), args.block_size
    num_blocks = -(-len(flags) // size)
    real = np.zeros(num_blocks * size, dtype=bool)
    real[: len(flags)] = (flags & PAD) == 0
    real = real.reshape(num_blocks, size)
    lengths = np.where(real.any(axis=1), size - np.argmax(real[:, ::-1], axis=1), 0)
    plan, per_unit = [], unit_blocks(args)
    for lo in range(0, num_blocks, per_unit):
        blocks = np.arange(lo, min(lo + per_unit, num_blocks))
        blocks = blocks[lengths[blocks] > 0]
        order = blocks[np.argsort(-lengths[blocks], kind="stable")]
        plan.append([(order[b : b + args.batch_size], int(lengths[order[b]]))
                     for b in range(0, len(order), args.batch_size)])
    return plan


def padded_blocks(ids, flags, block_size: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """`(input ids, attention mask)` of shape (blocks, block_size), both int64: the tokens of a run starting at a block
    boundary, PAD tokens (and the rest of a last partial block) replaced by `pad_id` and not attended to."""
    ids, flags = np.asarray(ids), np.asarray(flags)
    num_blocks = -(-len(ids) // block_size)
    blocks = np.full(num_blocks * block_size, pad_id, dtype=np.int64)
    attend = np.zeros(num_blocks * block_size, dtype=np.int64)
    attend[: len(ids)] = (flags & PAD) == 0
    blocks[: len(ids)] = np.where(attend[: len(ids)] == 1, ids, pad_id)
    return blocks.reshape(num_blocks, block_size), attend.reshape(num_blocks, block_size)


def encode_into(vectors: np.ndarray, row: int, model, ids, flags, keep, args: IndexBuildArguments) -> int:
    """Encode the tokens `ids` (a run starting at a block boundary) block by block (`encoding_plan`) and write the
    float16 hidden states of the tokens where `keep` is set to `vectors[row:]`, in corpus order. PAD tokens are not
    attended to. Returns the row after the last one."""
    ids, flags, keep = np.asarray(ids), np.asarray(flags), np.asarray(keep, dtype=bool)
    size = args.block_size
    blocks, attend = padded_blocks(ids, flags, size, pad_token_id(model))
    chosen = np.zeros(blocks.size, dtype=bool)
    chosen[: len(ids)] = keep
    chosen = chosen.reshape(blocks.shape)
    device = model.device
    was_training = model.training
    model.eval()
    done = 0
    with torch.inference_mode(), tqdm(total=len(ids), desc="Encoding corpus", unit="tok",
                                      disable=not args.show_progress_bar) as progress:
        for unit in encoding_plan(flags, args):
            states = {}
            for members, length in unit:
                hidden = model(input_ids=torch.from_numpy(blocks[members, :length]).to(device),
                               attention_mask=torch.from_numpy(attend[members, :length]).to(device),
                               ).last_hidden_state
                for j, block in enumerate(members.tolist()):
                    states[block] = hidden[j][torch.from_numpy(chosen[block, :length]).to(device)]
            for block in sorted(states):  # back in corpus order
                state = states[block].to(torch.float16).cpu().numpy()
                vectors[row : row + len(state)] = state
                row += len(state)
            if states:
                reached = min((max(states) + 1) * size, len(ids))
                progress.update(reached - done)
                done = reached
    model.train(was_training)
    return row


def pad_token_id(model) -> int:
    encoder_config = getattr(model.config, "encoder", model.config)
    pad = getattr(encoder_config, "pad_token_id", None)
    return 0 if pad is None else int(pad)
