"""NPM inference over an index (method §3): token distributions (NPM-single) and span scores (NPM).

NPM-single: p = softmax(s · h_i · scale / T) over the k retrieved tokens, summed per vocabulary id.
NPM span:   P_s and P_e are softmaxes of the start and end queries over the candidate tokens (both top-k sets and
            the tokens that complete spans from them); a span (s, e) in one block, s a word start, e a word end,
            at most `max_span_length` tokens and no special token, scores P_s(s) + P_e(e); spans are summed per
            decoded string v, multiplied by |v|^alpha and normalised over all candidates.
With k >= the number of indexed tokens both are exact.
"""

import numpy as np

from .corpus import SPECIAL, WORD_END, WORD_START


# Function words and punctuation for `span_stopwords` ("any": the official open-set rule; "edges": ours).
STOPWORDS = frozenset(
    """a about above after again against all am an and any are as at be because been before being below between both
    but by can could did do does doing down during each few for from further had has have having he her here hers
    herself him himself his how i if in into is it its itself just me more most my myself no nor not now of off on
    once only or other our ours ourselves out over own same she should so some such than that the their theirs them
    themselves then there these they this those through to too under until up very was we were what when where which
    while who whom why will with would you your yours yourself yourselves 's 't . , ; : ! ? ' " ( ) [ ] - -- ...
    """.split()
)


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max())
    return shifted / shifted.sum()


class NPMPredictor:
    """Turns query vectors into ranked answers with evidence, for one model config, tokenizer and index."""

    def __init__(self, config, tokenizer, index):
        self.config = config
        self.tokenizer = tokenizer
        self.index = index
        self._stopword_ids = None
        self._pieces = None

    # -------------------------------------------------------------------------------------------- NPM-single
    def predict_single(self, query: np.ndarray, top_k: int, target_ids=None, k: int | None = None) -> list[dict]:
        scores, rows = self.index.search(query[None, :], k or self.config.k)
        found = rows[0] >= 0
        rows = rows[0][found]
        probs = softmax(scores[0][found] * self.config.scale / self.config.temperature)
        positions = self.index.positions[rows]
        ids = np.asarray(self.index.tokens["id"][positions])
        unique_ids, first, inverse = np.unique(ids, return_index=True, return_inverse=True)
        totals = np.bincount(inverse, weights=probs)
        if target_ids is not None:
            lookup = dict(zip(unique_ids.tolist(), range(len(unique_ids))))
            chosen = [(tid, lookup.get(tid)) for tid in target_ids]
        else:
            order = np.argsort(-totals, kind="stable")[:top_k]
            chosen = [(int(unique_ids[g]), g) for g in order]
        answers = []
        for token_id, group in chosen:
            best = None if group is None else int(positions[first[group]])  # rows are sorted best first
            answers.append(self._answer(
                score=0.0 if group is None else float(totals[group]), token=token_id, token_ids=[token_id],
                token_str=self.tokenizer.decode([token_id]), span=None if best is None else (best, best)))
        answers.sort(key=lambda answer: -answer["score"])
        return answers[:top_k]

    # ---------------------------------------------------------------------------------------------- NPM span
    def predict_span(self, q_start: np.ndarray, q_end: np.ndarray, top_k: int, targets=None,
                     k: int | None = None) -> list[dict]:
        rows = self.index.candidate_rows(np.stack([q_start, q_end]), k or self.config.k)  # re-scored below
        starts = self.index.positions[rows[0][rows[0] >= 0]]
        ends = self.index.positions[rows[1][rows[1] >= 0]]
        span_starts, span_ends = self.enumerate_spans(starts, ends)
        if len(span_starts) == 0:
            return [] if targets is None else [self._missing(t) for t in targets][:top_k]
        candidates = np.unique(np.concatenate([starts, ends, span_starts, span_ends]))
        cand_rows, _ = self.index.rows_for_positions(candidates)
        vectors = self.index.vectors_for_rows(cand_rows)
        divisor = self.config.span_temperature
        p_start = softmax(vectors @ q_start * (self.config.scale / divisor))
        p_end = softmax(vectors @ q_end * (self.config.scale / divisor))
        span_scores = (p_start[np.searchsorted(candidates, span_starts)]
                       + p_end[np.searchsorted(candidates, span_ends)])
        return self._rank_spans(span_starts, span_ends, span_scores, top_k, targets)

    def enumerate_spans(self, starts: np.ndarray, ends: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Every valid span that begins at one of `starts` or finishes at one of `ends`, each counted once."""
        flags = self.index.tokens["flags"]
        n = self.index.num_tokens
        found_s, found_e = [], []
        for anchors, step in ((np.unique(starts), 1), (np.unique(ends), -1)):
            anchor_flags = np.asarray(flags[anchors])
            alive = (anchor_flags & SPECIAL) == 0
            anchor_block = self.index.block_of(anchors)
            for offset in range(self.config.max_span_length):
                other = anchors + step * offset
                alive &= (other >= 0) & (other < n)
                other = np.where(alive, other, anchors)
                other_flags = np.asarray(flags[other])
                alive &= ((other_flags & SPECIAL) == 0) & (self.index.block_of(other) == anchor_block)
                s, e = (anchors, other) if step == 1 else (other, anchors)
                start_flags, end_flags = (anchor_flags, other_flags) if step == 1 else (other_flags, anchor_flags)
                ok = alive & ((start_flags & WORD_START) != 0) & ((end_flags & WORD_END) != 0)
                found_s.append(s[ok])
                found_e.append(e[ok])
        span_starts, span_ends = np.concatenate(found_s), np.concatenate(found_e)
        keys = np.unique(span_starts.astype(np.int64) * n + span_ends)
        span_starts, span_ends = keys // n, keys % n
        return self._filter_stopwords(span_starts, span_ends)

    def _filter_stopwords(self, span_starts: np.ndarray, span_ends: np.ndarray):
        rule = self.config.span_stopwords
        if rule == "none" or len(span_starts) == 0:
            return span_starts, span_ends
        is_stop = self._stopword_positions
        if rule == "edges":
            keep = ~(is_stop(span_starts) | is_stop(span_ends))
        else:  # "any"
            keep = np.ones(len(span_starts), dtype=bool)
            for offset in range(self.config.max_span_length):
                inside = span_starts + offset <= span_ends
                keep &= ~(inside & is_stop(np.where(inside, span_starts + offset, span_starts)))
        return span_starts[keep], span_ends[keep]

    def _stopword_positions(self, positions: np.ndarray) -> np.ndarray:
        """Whether each corpus position is a whole-word stop word or punctuation token."""
        if self._stopword_ids is None:
            vocab = self.tokenizer.get_vocab()
            ids = np.fromiter(vocab.values(), dtype=np.int64)
            words = self.tokenizer.batch_decode([[i] for i in ids.tolist()])
            table = np.zeros(max(ids.max() + 1, len(self.tokenizer)), dtype=bool)
            table[ids] = [word.strip().lower() in STOPWORDS for word in words]
            self._stopword_ids = table
        records = self.index.tokens[positions]
        whole_word = (records["flags"] & (WORD_START | WORD_END)) == (WORD_START | WORD_END)
        return self._stopword_ids[records["id"]] & whole_word

    def _rank_spans(self, span_starts, span_ends, span_scores, top_k: int, targets) -> list[dict]:
        """Sum span scores per phrase (decoded string), apply |v|^alpha, normalise over all phrases, keep `top_k`.

        Only the returned answers are decoded: spans are grouped by a hash of their decoded text, built from
        per-token pieces (see `_piece_hashes`), so "ĠTexas" and "Tex"+"as" count as the same phrase.
        """
        lengths = span_ends - span_starts + 1
        offsets = np.arange(self.config.max_span_length)
        inside = offsets < lengths[:, None]
        grid = np.where(inside, span_starts[:, None] + offsets, span_starts[:, None])
        ids = np.where(inside, self.index.tokens["id"][grid], -1).astype(np.int64)
        keys = self._phrase_hashes(ids, inside)
        unique_keys, group_of_span = np.unique(keys, return_inverse=True)
        group_of_span = group_of_span.reshape(-1)
        totals = np.bincount(group_of_span, weights=span_scores, minlength=len(unique_keys))
        best_span = _argmax_per_group(span_scores, group_of_span, len(unique_keys))
        totals = totals * lengths[best_span].astype(np.float64) ** self.config.length_penalty_alpha
        totals = totals / totals.sum()
        if targets is not None:
            lookup = dict(zip(unique_keys.tolist(), range(len(unique_keys))))
            chosen = [(target, lookup.get(_text_hash(self.normalise_target(target)))) for target in targets]
        else:
            chosen = [(None, g) for g in np.argsort(-totals, kind="stable")[:top_k]]
        answers = []
        for target, group in chosen:
            if group is None:
                answers.append(self._missing(target))
                continue
            span = int(best_span[group])
            token_ids = ids[span][ids[span] >= 0].tolist()
            answers.append(self._answer(score=float(totals[group]), token=token_ids, token_ids=token_ids,
                                        token_str=self.tokenizer.decode(token_ids).strip(),
                                        span=(int(span_starts[span]), int(span_ends[span]))))
        answers.sort(key=lambda answer: -answer["score"])
        return answers[:top_k]

    def _phrase_hashes(self, ids: np.ndarray, inside: np.ndarray) -> np.ndarray:
        """Polynomial hash of each span's decoded, stripped text, combined from per-token piece hashes."""
        first_hash, first_power, next_hash, next_power = self._piece_hashes
        keys = first_hash[ids[:, 0]].copy()
        with np.errstate(over="ignore"):  # uint64 arithmetic is meant to wrap (hash modulo 2**64)
            for offset in range(1, ids.shape[1]):
                token = np.where(inside[:, offset], ids[:, offset], 0)
                combined = keys * next_power[token] + next_hash[token]
                keys = np.where(inside[:, offset], combined, keys)
        return keys

    @property
    def _piece_hashes(self):
        """Per vocabulary id: hash and base power of its text as a span's first token (left-stripped) and as a
        following token (with the space decode puts before it), read off `decode([anchor, id])`."""
        if self._pieces is None:
            size = max(len(self.tokenizer), max(self.tokenizer.get_vocab().values()) + 1)
            anchor = self.tokenizer.convert_tokens_to_ids(self.tokenizer.tokenize("a"))[0]
            prefix = self.tokenizer.decode([anchor])
            pairs = self.tokenizer.batch_decode([[anchor, i] for i in range(size)])
            tables = [np.zeros(size, dtype=np.uint64) for _ in range(4)]
            for i, text in enumerate(pairs):
                piece = text[len(prefix):] if text.startswith(prefix) and "\ufffd" not in text else None
                if piece is None:  # partial UTF-8 bytes or odd decoders: such tokens only match themselves
                    piece = f"\x00<{i}>"
                for column, variant in ((0, piece.lstrip()), (2, piece)):
                    tables[column][i], tables[column + 1][i] = _text_hash(variant), _power(variant)
            self._pieces = tuple(tables)
        return self._pieces

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


def _argmax_per_group(values: np.ndarray, groups: np.ndarray, num_groups: int) -> np.ndarray:
    """Index of the largest value within each group."""
    order = np.lexsort((-values, groups))
    first = np.ones(len(order), dtype=bool)
    first[1:] = groups[order][1:] != groups[order][:-1]
    best = np.empty(num_groups, dtype=np.int64)
    best[groups[order][first]] = order[first]
    return best


def _text_hash(text: str) -> int:
    """Polynomial hash of UTF-8 bytes modulo 2**64 (the span hash extends it token by token)."""
    value = 0
    for byte in text.encode("utf-8"):
        value = (value * 1_000_003 + byte + 1) % (1 << 64)
    return value


def _power(text: str) -> int:
    return pow(1_000_003, len(text.encode("utf-8")), 1 << 64)
