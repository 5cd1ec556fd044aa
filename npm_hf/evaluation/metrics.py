"""Metrics: accuracy (closed set) and SQuAD exact match, macro-averaged over answer-length buckets (LAMA).

`evaluate`'s Hub metrics ("accuracy", "squad") are used when they can be loaded; offline (`evaluate.load` cannot
reach the Hub and the wheel ships none) the same numbers come from the NumPy fallbacks here.
"""

import re
import string
from collections import Counter

import numpy as np
from transformers.utils import logging


logger = logging.get_logger(__name__)

LENGTH_BUCKETS = ("1", "2", "3", "4+")
_metric_cache: dict = {}


def load_metric(name: str):
    """An `evaluate` metric, or None (logged once) when it cannot be loaded, e.g. offline."""
    if name not in _metric_cache:
        try:
            import evaluate

            _metric_cache[name] = evaluate.load(name)
        except Exception as error:  # offline: evaluate raises FileNotFoundError / ConnectionError variants
            logger.info(f"evaluate.load({name!r}) failed ({type(error).__name__}); using npm_hf's identical "
                        "offline implementation.")
            _metric_cache[name] = None
    return _metric_cache[name]


def accuracy(predictions, references) -> float:
    if len(references) == 0:
        raise ValueError("accuracy needs at least one example.")
    metric = load_metric("accuracy")
    if metric is not None:
        return float(metric.compute(predictions=list(predictions), references=list(references))["accuracy"])
    return float(np.mean(np.asarray(predictions) == np.asarray(references)))


def normalize_answer(text: str) -> str:
    """SQuAD normalisation: lower-case, drop punctuation and the articles a/an/the, collapse whitespace."""
    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def exact_match(prediction: str, reference: str) -> bool:
    return normalize_answer(prediction) == normalize_answer(reference)


def exact_match_rate(predictions: list[str], references: list[str]) -> float:
    if not references:
        raise ValueError("exact match needs at least one example.")
    metric = load_metric("squad")
    if metric is not None:
        ids = [str(i) for i in range(len(references))]
        result = metric.compute(
            predictions=[{"id": i, "prediction_text": p} for i, p in zip(ids, predictions)],
            references=[{"id": i, "answers": {"text": [r], "answer_start": [0]}} for i, r in zip(ids, references)],
        )
        return float(result["exact_match"]) / 100.0
    return float(np.mean([exact_match(p, r) for p, r in zip(predictions, references)]))


def length_bucket(num_tokens: int) -> str:
    return LENGTH_BUCKETS[min(num_tokens, 4) - 1] if num_tokens >= 1 else LENGTH_BUCKETS[0]


def bucketed_exact_match(predictions: list[str], references: list[str], buckets: list[str]) -> dict:
    """Exact match per answer-length bucket and their macro average over the buckets that have examples (LAMA)."""
    per_bucket, counts = {}, Counter(buckets)
    for bucket in LENGTH_BUCKETS:
        members = [i for i, b in enumerate(buckets) if b == bucket]
        if members:
            per_bucket[bucket] = exact_match_rate([predictions[i] for i in members],
                                                  [references[i] for i in members])
    if not per_bucket:
        raise ValueError("bucketed exact match needs at least one example.")
    return {"macro_exact_match": float(np.mean(list(per_bucket.values()))),
            "micro_exact_match": exact_match_rate(predictions, references),
            "buckets": {b: {"exact_match": per_bucket[b], "count": counts[b]} for b in per_bucket}}
