"""Span masking for NPM training (method §4): mask n-grams that co-occur in another sequence of the same group."""

from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np
import torch
from transformers.utils import logging


logger = logging.get_logger(__name__)

PUNCTUATION = frozenset("!,.:?")


@dataclass
class NPMSpanCollator:
    """Masks spans that also occur in another sequence of the same group, so the loss finds positives in-batch.

    Every group (consecutive blocks sharing a `group` id, see `npm_hf.prepare_training_blocks`) is masked on its
    own with a generator seeded by `seed + group`: the masking of a group is the same however groups are batched
    or spread over processes. Features need `input_ids`, `word_start`, `word_end` and `group`.

    Outputs: `input_ids`/`attention_mask` (masked queries), `key_input_ids`/`key_attention_mask` (unmasked, padded
    to `key_length`), and per query `query_sequence`, `query_start`, `query_end` (mask positions), `query_ids`
    (span token ids, -1 padded) and `query_length`. Span mode puts two masks (start, end) per span; single mode
    one mask per token.
    """

    tokenizer: object = field(metadata={"help": "Tokenizer with a mask token (the model's)."})
    mode: str = field(default="span", metadata={"help": "'span' (two masks per span) or 'single' (one per token)."})
    mask_ratio: float = field(default=0.15, metadata={"help": "Share of real tokens to mask per group."})
    geometric_p: float = field(default=0.5, metadata={"help": "Span lengths ~ Geometric(p), redrawn above max."})
    max_span_length: int = field(default=10, metadata={"help": "Longest masked span (n-gram) in tokens."})
    max_spans_per_sequence: int = field(default=64, metadata={"help": "Masked spans per sequence at most."})
    max_ngram_uses: int = field(default=10, metadata={"help": "Times the same n-gram may be masked per group."})
    punctuation_keep_prob: float = field(default=0.1, metadata={"help": "Chance to keep a 1-gram of punctuation."})
    key_length: int | None = field(default=None, metadata={"help": "Pad keys to this length (equal across processes)."})
    max_length: int | None = field(default=None, metadata={"help": "Longest masked input the encoder accepts."})
    seed: int = field(default=2022, metadata={"help": "Seed of the masking (plus the group id)."})
    span_edge_exclude_ids: frozenset | None = field(
        default=None, metadata={"help": "Token ids that may not begin or end a masked span (e.g. stop words): the "
                                        "masking budget then goes to content phrases."})
    salient_span_ratio: float = field(
        default=0.0, metadata={"help": "Share of the masking budget spent first on salient spans: whole name-like "
                                       "runs (feature column `salient`, see npm_hf.corpus.salient_tokens) that occur "
                                       "in another sequence of the group (REALM's salient span masking)."})

    def __post_init__(self):
        if getattr(self.tokenizer, "mask_token_id", None) is None:
            raise ValueError(
                f"{type(self.tokenizer).__name__} has no mask token; NPM needs one for its queries. Set "
                "tokenizer.mask_token (e.g. tokenizer.add_special_tokens({'mask_token': '[MASK]'})) and resize the "
                "model's embeddings."
            )
        if self.mode not in ("span", "single"):
            raise ValueError(f"mode={self.mode!r}; use 'span' or 'single'.")
        if not 0.0 <= self.punctuation_keep_prob <= 1.0:
            raise ValueError(f"punctuation_keep_prob must be in [0, 1], got {self.punctuation_keep_prob}.")
        check_masking(mask_ratio=self.mask_ratio, geometric_p=self.geometric_p, max_span_length=self.max_span_length,
                      max_spans_per_sequence=self.max_spans_per_sequence, max_ngram_uses=self.max_ngram_uses,
                      salient_span_ratio=self.salient_span_ratio)
        pad = self.tokenizer.pad_token_id
        self._pad_id = 0 if pad is None else pad
        self._special_ids = frozenset(self.tokenizer.all_special_ids)
        self._edge_excluded = frozenset(self.span_edge_exclude_ids or ())
        self._punctuation_ids = frozenset(
            i for token, i in self.tokenizer.get_vocab().items()
            if self.tokenizer.convert_tokens_to_string([token]).strip() in PUNCTUATION
        )

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        spans_per_sequence = [[] for _ in features]
        for group_id, members in _groups(features):
            chosen = self._mask_group([features[i] for i in members], np.random.default_rng(self.seed + group_id))
            for local, spans in enumerate(chosen):
                spans_per_sequence[members[local]] = spans
        return self._tensors(features, spans_per_sequence)

    # --------------------------------------------------------------------------------------------- sampling
    def _mask_group(self, sequences: list[dict], rng: np.random.Generator) -> list[list[tuple[int, int]]]:
        """Choose (start, length) spans per sequence of one group: salient runs first (up to their share of the
        budget), then n-grams of Geometric lengths."""
        by_length = self._candidates(sequences)
        real = sum(sum(1 for t in seq["input_ids"] if t != self._pad_id) for seq in sequences)
        budget = int(self.mask_ratio * real)
        state = _MaskingState(sequences)
        if self.salient_span_ratio > 0:
            salient = self._salient_candidates(sequences, by_length)
            for i in rng.permutation(len(salient)):
                if state.masked >= self.salient_span_ratio * budget:
                    break
                self._try_mask(state, sequences, *salient[i])
        pools = {n: [spans[i] for i in rng.permutation(len(spans))] for n, spans in by_length.items()}
        while state.masked < budget:
            n = int(rng.geometric(self.geometric_p))
            while n > self.max_span_length:
                n = int(rng.geometric(self.geometric_p))
            while n > 0 and not pools.get(n):
                n -= 1
            if n == 0:
                break
            self._try_mask(state, sequences, *pools[n].pop())
        if real and state.masked < 0.05 * real:
            logger.info(f"Only {state.masked} of {real} tokens of a group could be masked (few spans co-occur in it).")
        return [sorted(spans) for spans in state.chosen]

    def _try_mask(self, state: "_MaskingState", sequences: list[dict], seq: int, start: int, ngram: tuple) -> None:
        """Mask the n-gram at (seq, start) unless it overlaps a masked span or breaks a per-sequence limit."""
        n = len(ngram)
        grows = 1 if self.mode == "span" and n == 1 else 0
        if (state.taken[seq][start : start + n].any() or len(state.chosen[seq]) >= self.max_spans_per_sequence
                or state.uses[ngram] >= self.max_ngram_uses
                or not self._fits(sequences[seq], state.growth[seq] + grows)):
            return
        state.taken[seq][start : start + n] = True
        state.chosen[seq].append((start, n))
        state.growth[seq] += grows
        state.uses[ngram] += 1
        state.masked += n

    @staticmethod
    def _salient_candidates(sequences: list[dict], by_length: dict) -> list[tuple[int, int, tuple]]:
        """The candidates that cover a whole salient run (no salient token just before or after them)."""
        if any("salient" not in seq for seq in sequences):
            raise ValueError("salient_span_ratio > 0 needs a `salient` column: build the blocks with "
                             "npm_hf.prepare_training_blocks(..., salient=True).")
        found = []
        for candidates in by_length.values():
            for seq, start, ngram in candidates:
                flags = sequences[seq]["salient"]
                end = start + len(ngram)
                if (all(flags[start:end]) and (start == 0 or not flags[start - 1])
                        and (end == len(flags) or not flags[end])):
                    found.append((seq, start, ngram))
        return found

    def _fits(self, sequence: dict, growth: int) -> bool:
        return self.max_length is None or len(sequence["input_ids"]) + growth <= self.max_length

    def _candidates(self, sequences: list[dict]) -> dict[int, list[tuple[int, int, tuple]]]:
        """n-grams (n <= max) at word boundaries, without special tokens, that occur in another sequence."""
        owners = defaultdict(set)
        for number, seq in enumerate(sequences):
            ids = seq["input_ids"]
            for start in range(len(ids)):
                for n in range(1, min(self.max_span_length, len(ids) - start) + 1):
                    owners[tuple(ids[start : start + n])].add(number)
        by_length = defaultdict(list)
        for number, seq in enumerate(sequences):
            ids, starts, ends = seq["input_ids"], seq["word_start"], seq["word_end"]
            for start in range(len(ids)):
                if not starts[start] or ids[start] in self._special_ids or ids[start] in self._edge_excluded:
                    continue
                punctuation = ids[start] in self._punctuation_ids
                for n in range(1, min(self.max_span_length, len(ids) - start) + 1):
                    end = start + n - 1
                    if ids[end] in self._special_ids:
                        break
                    ngram = tuple(ids[start : end + 1])
                    if len(owners[ngram]) < 2:
                        break  # longer n-grams from here are not shared either
                    if not ends[end] or (punctuation and n > 1) or ids[end] in self._edge_excluded:
                        continue
                    by_length[n].append((number, start, ngram))
        if self.punctuation_keep_prob < 1.0:
            rng = np.random.default_rng(self.seed)  # fixed thinning, independent of sampling order
            by_length[1] = [c for c in by_length.get(1, []) if c[2][0] not in self._punctuation_ids
                            or rng.random() < self.punctuation_keep_prob]
        return by_length

    # ---------------------------------------------------------------------------------------------- tensors
    def _tensors(self, features: list[dict], spans_per_sequence: list[list[tuple[int, int]]]) -> dict:
        mask_id = self.tokenizer.mask_token_id
        masked_inputs, queries = [], []
        for number, (feature, spans) in enumerate(zip(features, spans_per_sequence)):
            ids = list(feature["input_ids"])
            out, cursor = [], 0
            for start, n in spans:
                out.extend(ids[cursor:start])
                span_ids = ids[start : start + n]
                if self.mode == "span":
                    queries.append((number, len(out), len(out) + 1, span_ids))
                    out.extend([mask_id, mask_id])
                else:
                    for offset, token in enumerate(span_ids):
                        queries.append((number, len(out) + offset, len(out) + offset, [token]))
                    out.extend([mask_id] * n)
                cursor = start + n
            out.extend(ids[cursor:])
            masked_inputs.append(out)
        key_length = self.key_length or max(len(f["input_ids"]) for f in features)
        batch = {}
        batch["input_ids"], batch["attention_mask"] = _pad([m for m in masked_inputs], None, self._pad_id)
        batch["key_input_ids"], batch["key_attention_mask"] = _pad([f["input_ids"] for f in features], key_length,
                                                                   self._pad_id)
        width = self.max_span_length if self.mode == "span" else 1
        query_ids = torch.full((len(queries), width), -1, dtype=torch.long)
        for row, (_, _, _, span_ids) in enumerate(queries):
            query_ids[row, : len(span_ids)] = torch.tensor(span_ids)
        batch["query_sequence"] = torch.tensor([q[0] for q in queries], dtype=torch.long)
        batch["query_start"] = torch.tensor([q[1] for q in queries], dtype=torch.long)
        batch["query_end"] = torch.tensor([q[2] for q in queries], dtype=torch.long)
        batch["query_ids"] = query_ids
        batch["query_length"] = torch.tensor([len(q[3]) for q in queries], dtype=torch.long)
        return batch


class _MaskingState:
    """What the masking of one group has chosen so far."""

    def __init__(self, sequences: list[dict]):
        self.chosen = [[] for _ in sequences]
        self.taken = [np.zeros(len(seq["input_ids"]), dtype=bool) for seq in sequences]
        self.growth = [0] * len(sequences)
        self.uses = defaultdict(int)
        self.masked = 0


def check_masking(**settings) -> None:
    """Validate span-masking settings (shared by NPMSpanCollator and NPMTrainingArguments)."""
    if not 0.0 < settings["mask_ratio"] <= 1.0:
        raise ValueError(f"mask_ratio must be in (0, 1], got {settings['mask_ratio']}.")
    if not 0.0 < settings["geometric_p"] <= 1.0:
        raise ValueError(f"geometric_p must be in (0, 1], got {settings['geometric_p']}.")
    if not 0.0 <= settings["salient_span_ratio"] <= 1.0:
        raise ValueError(f"salient_span_ratio must be in [0, 1], got {settings['salient_span_ratio']}.")
    for name in ("max_span_length", "max_spans_per_sequence", "max_ngram_uses"):
        if settings[name] < 1:
            raise ValueError(f"{name} must be >= 1, got {settings[name]}.")


def _groups(features: list[dict]):
    """(group id, member indices) for each run of features sharing a `group` value."""
    runs = []
    for i, feature in enumerate(features):
        group = int(feature["group"])
        if runs and runs[-1][0] == group:
            runs[-1][1].append(i)
        else:
            runs.append((group, [i]))
    return runs


def _pad(sequences: list[list[int]], length: int | None, pad_id: int):
    length = length or max(len(s) for s in sequences)
    ids = torch.full((len(sequences), length), pad_id, dtype=torch.long)
    attention = torch.zeros((len(sequences), length), dtype=torch.long)
    for row, sequence in enumerate(sequences):
        ids[row, : len(sequence)] = torch.tensor(sequence[:length], dtype=torch.long)
        attention[row, : len(sequence)] = 1
    return ids, attention
