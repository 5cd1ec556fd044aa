"""NPM inference over an index (method §3): token distributions (NPM-single) and span scores (NPM).

NPM-single: p = softmax(s · h_i · scale / T) over the k retrieved tokens, summed per vocabulary id.
NPM span:   P_s is a softmax of the start query over its retrieved word-start tokens, P_e one of the end query over
            its retrieved word-end tokens, each normalised separately (the official non-restricted mode). A span
            (s, e) with s among the start and e among the end candidates, in one block, at most `max_span_length`
            tokens, no special token (nor line break: `spans_cross_lines=False`), scores P_s(s) + P_e(e) (or
            P_s(s) * P_e(e): `span_scoring="product"`); spans are summed (or, with `phrase_aggregation="max"`, maxed)
            per decoded string v, multiplied by |v|^alpha and normalised over all candidates. With
            `expand_span_candidates`, as in the official code, the start candidates also include the starts of
            spans ending at a retrieved end and the end candidates the ends of spans beginning at a retrieved start.
With k >= the number of indexed tokens all of these are exact.
"""

import copy
from dataclasses import dataclass

import numpy as np
import torch
from transformers.utils import logging

from .decoding import NPMDecodingConfig
from .spans import SpanRules, text_hash
from .tokens import WORD_END, WORD_START


logger = logging.get_logger(__name__)


def softmax(logits: np.ndarray) -> np.ndarray:
    if len(logits) == 0:
        return np.zeros(0)
    shifted = np.exp(logits - logits.max())
    return shifted / shifted.sum()


@dataclass(frozen=True)
class Candidates:
    """Where one query's answers come from: the whole index, searched by FAISS (or already searched, `hits`: its
    `(scores, rows)` when the caller searched many queries at once), or given corpus positions (the tokens of
    pre-filtered passages, or any restricted set), each with an optional logit `bias` (sorted unique positions)."""

    positions: np.ndarray | None = None
    bias: np.ndarray | None = None
    hits: tuple | None = None

    @classmethod
    def whole_index(cls, hits: tuple | None = None) -> "Candidates":
        return cls(hits=hits)

    @classmethod
    def among(cls, positions: np.ndarray, bias: np.ndarray | None = None) -> "Candidates":
        return cls(positions=np.asarray(positions, dtype=np.int64), bias=bias)


WHOLE_INDEX = Candidates()


class NPMPredictor(SpanRules):
    """Turns query vectors into ranked answers with evidence, for one model config, tokenizer and index, under
    one set of decoding settings (`decoding`; `using` gives a predictor with others, sharing the lookups)."""

    def __init__(self, config, tokenizer, index, decoding: NPMDecodingConfig | None = None):
        self.scale = config.scale
        self.mode = config.mode
        self.decoding = decoding or NPMDecodingConfig.from_model_config(config)
        self.tokenizer = tokenizer
        self.index = index
        super().__init__()  # the span rules' lookups

    def using(self, decoding: NPMDecodingConfig | None = None, **overrides) -> "NPMPredictor":
        """This predictor under `decoding` (default: its own) with `overrides` applied; itself when nothing
        changes. Nothing is copied but the settings."""
        decoding = (decoding or self.decoding).update(**overrides)
        if decoding == self.decoding:
            return self
        other = copy.copy(self)
        other.decoding = decoding
        return other

    def search(self, queries: np.ndarray, batch: bool = False):
        """index.search (`batch`: index.search_many) with the settings' k, nprobe and ef_search."""
        search = self.index.search_many if batch else self.index.search
        d = self.decoding
        return search(queries, d.k, nprobe=d.nprobe, ef_search=d.ef_search)

    # -------------------------------------------------------------------------------------------- NPM-single
    def predict_single(self, query: np.ndarray, top_k: int, candidates: Candidates = WHOLE_INDEX,
                       target_ids=None) -> list[dict]:
        """NPM-single: the top-k tokens by probability summed per vocabulary id, from `candidates`."""
        factor = self.scale / self.decoding.temperature
        if candidates.positions is not None:  # scored exactly over the given positions
            positions, vectors, bias = self._candidates(candidates.positions, candidates.bias)
            if len(positions) == 0:
                return self._rank_tokens(positions, np.zeros(0), top_k, target_ids)
            logits = (vectors @ torch.from_numpy(np.asarray(query, dtype=np.float32))).numpy()
            return self._rank_tokens(positions, softmax(logits * factor + bias), top_k, target_ids)
        scores, rows = candidates.hits if candidates.hits is not None else self.search(query[None, :])
        found = rows[0] >= 0
        probs = softmax(scores[0][found] * factor)
        return self._rank_tokens(self.index.positions[rows[0][found]], probs, top_k, target_ids)

    def _rank_tokens(self, positions: np.ndarray, probs: np.ndarray, top_k: int, target_ids) -> list[dict]:
        """Sum probabilities per vocabulary id; the best-scoring occurrence of an id is its evidence."""
        order = np.argsort(-probs, kind="stable")
        positions, probs = positions[order], probs[order]
        ids = np.asarray(self.index.token_ids[positions])
        unique_ids, first, inverse = np.unique(ids, return_index=True, return_inverse=True)
        totals = np.bincount(inverse.reshape(-1), weights=probs, minlength=len(unique_ids))
        if target_ids is not None:
            lookup = dict(zip(unique_ids.tolist(), range(len(unique_ids))))
            chosen = [(tid, lookup.get(tid)) for tid in target_ids]
        else:
            chosen = [(int(unique_ids[g]), g) for g in _top_indices(totals, top_k)]
        answers = []
        for token_id, group in chosen:
            best = None if group is None else int(positions[first[group]])
            answers.append(self._answer(
                score=0.0 if group is None else float(totals[group]), token=token_id, token_ids=[token_id],
                token_str=self.tokenizer.decode([token_id]), span=None if best is None else (best, best)))
        answers.sort(key=lambda answer: -answer["score"])
        return answers[:top_k]

    def _candidates(self, positions: np.ndarray, bias: np.ndarray | None = None):
        """The indexed ones among `positions`, their stored vectors and their logit bias (0 without `bias`, which
        needs sorted unique `positions`)."""
        positions = np.asarray(positions, dtype=np.int64)
        if bias is None:
            positions = np.unique(positions)
            bias = np.zeros(len(positions))
        elif len(bias) != len(positions) or np.any(np.diff(positions) <= 0):
            raise ValueError("A logit bias needs one value per position, and sorted unique positions.")
        rows, indexed = self.index.rows_for_positions(positions)
        rows = rows[indexed]
        return self.index.positions[rows], torch.from_numpy(self.index.vectors_for_rows(rows)), bias[indexed]

    # ---------------------------------------------------------------------------------------------- NPM span
    def predict_span(self, q_start: np.ndarray, q_end: np.ndarray, top_k: int, candidates: Candidates = WHOLE_INDEX,
                     targets=None, exclude: np.ndarray | None = None) -> list[dict]:
        """NPM: the top phrases from the start and end queries, over `candidates`. `targets`: score these strings
        instead; `exclude`: phrase hashes (`query_phrase_hashes`) that may not be answers."""
        if candidates.positions is not None:
            found = self._spans_among(q_start, q_end, candidates)
        else:
            found = self._spans_retrieved(q_start, q_end, candidates.hits)
        if found is None:
            return [] if targets is None else [self._missing(t) for t in targets][:top_k]
        return self._rank_spans(*found, top_k, targets, exclude)

    def _spans_retrieved(self, q_start: np.ndarray, q_end: np.ndarray, hits):
        """Spans between FAISS's retrieved word starts and word ends, and their scores (None: no span)."""
        scores, rows = hits if hits is not None else self.search(np.stack([q_start, q_end]))
        flags = self.index.token_flags
        # Only retrieved word starts are start candidates, only word ends end candidates (the official get_candidates)
        found = rows >= 0
        found[0] &= (flags[self.index.positions[np.where(found[0], rows[0], 0)]] & WORD_START) != 0
        found[1] &= (flags[self.index.positions[np.where(found[1], rows[1], 0)]] & WORD_END) != 0
        starts, ends = self.index.positions[rows[0][found[0]]], self.index.positions[rows[1][found[1]]]
        factor = self.scale / self.decoding.span_temperature
        if self.decoding.expand_span_candidates:
            span_starts, span_ends = self.enumerate_spans(starts, ends, expand=True)
            start_set = np.unique(np.concatenate([starts, span_starts]))
            end_set = np.unique(np.concatenate([ends, span_ends]))
            p_start = self._softmax_at(start_set, q_start, factor)
            p_end = self._softmax_at(end_set, q_end, factor)
            span_scores = self._combine(p_start[np.searchsorted(start_set, span_starts)],
                                        p_end[np.searchsorted(end_set, span_ends)])
        else:
            p_start = softmax(scores[0][found[0]] * factor)
            end_order = np.argsort(ends)
            p_end, ends = softmax(scores[1][found[1]] * factor)[end_order], ends[end_order]
            start_index, end_index = self.spans_between(starts, ends)
            span_starts, span_ends = starts[start_index], ends[end_index]
            span_scores = self._combine(p_start[start_index], p_end[end_index])
        return (span_starts, span_ends, span_scores) if len(span_starts) else None

    def _spans_among(self, q_start: np.ndarray, q_end: np.ndarray, candidates: Candidates):
        """Spans scored exactly over given positions (e.g. every token of BM25's top blocks, the paper's restricted
        open-set mode): P_s and P_e are softmaxes over those tokens only, each logit plus its position's bias (the
        pre-filter's relevance, `prefilter.passage_positions`). None: no span."""
        positions, vectors, bias = self._candidates(candidates.positions, candidates.bias)
        if len(positions) == 0:
            return None
        queries = torch.from_numpy(np.stack([q_start, q_end]).T.astype(np.float32, copy=True))
        logits = (vectors @ queries).numpy() * (self.scale / self.decoding.span_temperature) + bias[:, None]
        p_start, p_end = softmax(logits[:, 0]), softmax(logits[:, 1])
        start_index, end_index = self.spans_between(positions, positions)
        if len(start_index) == 0:
            return None
        return (positions[start_index], positions[end_index],
                self._combine(p_start[start_index], p_end[end_index]))

    def _softmax_at(self, positions: np.ndarray, query: np.ndarray, factor: float) -> np.ndarray:
        """softmax(query · h · factor) over the stored vectors of the (sorted, indexed) corpus `positions`."""
        if len(positions) == 0:
            return np.zeros(0)
        rows, _ = self.index.rows_for_positions(positions)
        vectors = torch.from_numpy(self.index.vectors_for_rows(rows))
        return softmax((vectors @ torch.from_numpy(np.asarray(query, dtype=np.float32))).numpy() * factor)

    # ---------------------------------------------------------------------------------- closed-set scoring
    def phrase_probabilities(self, queries: np.ndarray, phrases: list[list[int]],
                             hits: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
        """NPM probability of each phrase (a list of token ids) at the masked slot, for closed-set tasks (§3.2).

        The top-k hits of the query vectors (start and end in span mode, the one query in single mode) share one
        softmax. A phrase collects the mass of start hits where an occurrence of it begins and of end hits where
        one ends (single mode: where one begins). For one-token phrases this is the official per-token sum; longer
        phrases, which the official code refuses, follow the same rule. `hits`: the `index.search` result for these
        queries, when the caller searched many queries at once.
        """
        queries = np.atleast_2d(queries)
        scores, rows = hits if hits is not None else self.search(queries)
        found = rows >= 0
        temperature = self.decoding.temperature if self.mode == "single" else self.decoding.span_temperature
        probs = softmax(scores[found] * (self.scale / temperature))
        which_query = np.broadcast_to(np.arange(len(queries))[:, None], rows.shape)[found]
        positions = self.index.positions[rows[found]]
        anchored_at_end = which_query == 1  # the end query's hits match where a phrase finishes
        totals = np.zeros(len(phrases))
        for j, phrase in enumerate(phrases):
            totals[j] = probs[self._phrase_at(positions, phrase, anchored_at_end)].sum()
        return totals

    def _phrase_at(self, positions: np.ndarray, phrase: list[int], anchored_at_end: np.ndarray) -> np.ndarray:
        """Whether `phrase` occurs in one block starting at each position (or ending there, where anchored_at_end)."""
        length = len(phrase)
        first = np.where(anchored_at_end, positions - (length - 1), positions)
        last = first + length - 1
        ok = (first >= 0) & (last < self.index.num_tokens)
        first, last = np.where(ok, first, 0), np.where(ok, last, 0)
        ok &= self.index.block_of(first) == self.index.block_of(last)
        for offset, token in enumerate(phrase):
            ok &= np.asarray(self.index.token_ids[np.minimum(first + offset, self.index.num_tokens - 1)]) == token
        return ok

    def _combine(self, p_start: np.ndarray, p_end: np.ndarray) -> np.ndarray:
        """A span's score from its start and end probabilities (`decoding.span_scoring`)."""
        return p_start * p_end if self.decoding.span_scoring == "product" else p_start + p_end

    def _rank_spans(self, span_starts, span_ends, span_scores, top_k: int, targets, exclude=None) -> list[dict]:
        """Sum (or max) span scores per phrase (decoded string), apply |v|^alpha, normalise over all phrases, keep
        `top_k`.

        Only the returned answers are decoded: spans are grouped by a hash of their decoded text, built from
        per-token pieces (see `_piece_hashes`), so "ĠTexas" and "Tex"+"as" count as the same phrase. Phrases whose
        hash is in `exclude` are dropped before normalising (not when scoring `targets`).
        """
        lengths = span_ends - span_starts + 1
        # one row per offset (contiguous: phrase_hashes reads the ids offset by offset), transposed to one per span
        offsets = np.arange(self.decoding.max_span_length)[:, None]
        inside = offsets < lengths
        grid = np.minimum(span_starts + offsets, span_ends)
        ids = np.where(inside, self.index.token_ids[grid], np.int64(-1)).T
        keys = self.phrase_hashes(ids)
        if exclude is not None and targets is None:
            kept = ~np.isin(keys, exclude)
            span_starts, span_ends, span_scores = span_starts[kept], span_ends[kept], span_scores[kept]
            lengths, ids, keys = lengths[kept], ids[kept], keys[kept]
            if len(keys) == 0:
                return []
        unique_keys, group_of_span = np.unique(keys, return_inverse=True)
        group_of_span = group_of_span.reshape(-1)
        if self.decoding.phrase_aggregation == "max":
            totals = np.zeros(len(unique_keys))
            np.maximum.at(totals, group_of_span, span_scores)
        else:
            totals = np.bincount(group_of_span, weights=span_scores, minlength=len(unique_keys))
        if self.decoding.length_penalty_alpha:  # |v| in tokens: its shortest spelling ("ĠTexas", not "Tex"+"as")
            shortest = np.full(len(unique_keys), np.iinfo(np.int64).max)
            np.minimum.at(shortest, group_of_span, lengths)
            totals = totals * shortest.astype(np.float64) ** self.decoding.length_penalty_alpha
        totals = totals / totals.sum()
        if targets is not None:
            lookup = dict(zip(unique_keys.tolist(), range(len(unique_keys))))
            chosen = [(target, lookup.get(text_hash(self.normalise_target(target)))) for target in targets]
        else:
            chosen = [(None, g) for g in _top_indices(totals, top_k)]
        answers = []
        for target, group in chosen:
            if group is None:
                answers.append(self._missing(target))
                continue
            members = np.flatnonzero(group_of_span == group)
            span = int(members[np.argmax(span_scores[members])])  # the best-scoring occurrence is the evidence
            token_ids = ids[span][ids[span] >= 0].tolist()
            answers.append(self._answer(score=float(totals[group]), token=token_ids, token_ids=token_ids,
                                        token_str=self.tokenizer.decode(token_ids).strip(),
                                        span=(int(span_starts[span]), int(span_ends[span]))))
        answers.sort(key=lambda answer: -answer["score"])
        return answers[:top_k]

    def normalise_target(self, target: str) -> str:
        """The decoded form a target string takes in the corpus (lower-cased by uncased tokenizers, etc.)."""
        ids = self.tokenizer(target, add_special_tokens=False)["input_ids"]
        return self.tokenizer.decode(ids).strip()

    def _missing(self, target: str) -> dict:
        ids = self.tokenizer(target, add_special_tokens=False)["input_ids"]
        return self._answer(score=0.0, token=ids, token_ids=ids, token_str=self.normalise_target(target), span=None)

    def _answer(self, score: float, token, token_ids: list, token_str: str, span) -> dict:
        evidence = None if span is None else self.index.evidence(*span)
        phrase = token_str if span is None else self.index.surface_text(*span)
        return {"score": score, "token": token, "token_str": token_str, "phrase": phrase,
                "evidence": evidence, "token_ids": token_ids}


def _top_indices(values: np.ndarray, count: int) -> np.ndarray:
    """Indices of the `count` largest values, largest first (ties: lower index first)."""
    if count < len(values):
        candidates = np.argpartition(-values, count - 1)[:count]
        cutoff = values[candidates].min()
        candidates = np.flatnonzero(values >= cutoff)  # all ties at the cut, so the order below is stable
    else:
        candidates = np.arange(len(values))
    return candidates[np.argsort(-values[candidates], kind="stable")][:count]
