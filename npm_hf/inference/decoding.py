"""How an NPM turns retrieved tokens into answers: `NPMDecodingConfig`, kept apart from the model's config the way
transformers keeps `GenerationConfig` apart from a model's, and saved beside it as `decoding_config.json`.

The model config says what the model is (its encoder, mode, similarity scale, where its index lives); decoding
settings say how one call answers and can differ per pipeline and per call without touching the model: a pipeline
holds its own `NPMDecodingConfig`, and every call merges its keyword arguments into a new one (`update`), validated
here and nowhere else. Directories saved before this file existed carry the settings inline in config.json;
`from_model_config` reads them from there.
"""

import dataclasses
import json
import math
import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from huggingface_hub import hf_hub_download
from huggingface_hub.errors import EntryNotFoundError, HFValidationError, LocalEntryNotFoundError


DECODING_CONFIG_FILE = "decoding_config.json"
CHOICES = {
    "span_stopwords": ("none", "any", "edges", "reference"),
    "span_punctuation": ("word", "inner"),
    "span_scoring": ("sum", "product"),
    "phrase_aggregation": ("sum", "max"),
    "prefilter": ("none", "bm25", "dense"),
}


@dataclass(frozen=True)
class NPMDecodingConfig:
    """Decoding settings of an NPM (`pipeline("fill-mask", model=..., decoding=...)`, `fill(text, k=...)`)."""

    k: int = field(default=4096, metadata={"help": "Neighbours retrieved per query vector."})
    max_span_length: int = field(default=10, metadata={"help": "Longest answer span, in tokens."})
    temperature: float = field(default=1.0, metadata={"help": "Softmax temperature of the scaled inner products."})
    apply_temperature_twice: bool = field(
        default=False, metadata={"help": "Span mode: divide by T twice (T^2), the official code's quirk."})
    length_penalty_alpha: float = field(
        default=0.0, metadata={"help": "A span answer v scores S(v) * |v| ** alpha (|v| in tokens)."})
    span_stopwords: str = field(
        default="none",
        metadata={"help": "'none' keeps every span; 'reference' drops spans holding any stop-word or punctuation "
                          "id, wherever it sits in a word (the official open-set rule); 'any' drops spans holding a "
                          "whole-word stop word or punctuation outside a word; 'edges' drops spans that start or end "
                          "with one. 'any' and 'edges' never let a span start or end with a word that has no letter "
                          "or digit (punctuation, symbols), so no answer is empty or punctuation only."})
    span_punctuation: str = field(
        default="word",
        metadata={"help": "With span_stopwords='any': 'word' lets punctuation inside a span only within a word "
                          "(\"Mid-Atlantic\", \"7,000\"); 'inner' also between two words, where it joins a number, "
                          "date or name (\"May 16, 1929\", \"Austin, Texas\", \"St. Louis\", \"Procter & Gamble\"): "
                          "a comma, '&', '/' or dash between two words that are neither stop words nor punctuation, "
                          "or a period after such a word of at most 3 characters. Never at an edge."})
    expand_span_candidates: bool = field(
        default=False,
        metadata={"help": "Span mode: the official candidate expansion (starts of spans ending at a retrieved end, "
                          "and ends of spans beginning at a retrieved start), at several times the cost."})
    span_scoring: str = field(
        default="sum", metadata={"help": "A span scores P_s(s) + P_e(e) ('sum', the paper) or P_s(s) * P_e(e) "
                                         "('product': one-word fragments no longer win on their start alone)."})
    phrase_aggregation: str = field(
        default="sum", metadata={"help": "A phrase scores the sum ('sum', the paper) or the best ('max') of its "
                                         "spans' scores."})
    spans_cross_lines: bool = field(
        default=True,
        metadata={"help": "False keeps each span within one line on indexes built before paragraph blocks (current "
                          "indexes never let a span cross a line)."})
    exclude_query_phrases: bool = field(
        default=False, metadata={"help": "Span mode: never answer a phrase the input contains outside its masks."})
    prefilter: str = field(
        default="none",
        metadata={"help": "Two-stage retrieval: 'bm25' (the paper's open set) or 'dense' keeps prefilter_blocks "
                          "passages, whose tokens are then scored exactly; 'none' searches the whole index."})
    prefilter_blocks: int = field(default=3, metadata={"help": "Passages kept by the pre-filter (the paper: 3)."})
    prefilter_passage_tokens: int | None = field(
        default=None,
        metadata={"help": "Pre-filter passages: None (or 'blocks') = the index's blocks (the paper), or windows of "
                          "this many tokens, overlapping by half, inside each block."})
    prefilter_weight: float = field(
        default=0.0,
        metadata={"help": "Each kept token's logits gain this weight times its passage's score / the best "
                          "passage's score; 0 = the passages only restrict the candidates (the paper)."})
    nprobe: int | None = field(
        default=None, metadata={"help": "IVF indexes: inverted lists visited per query (None: FAISS's default)."})
    ef_search: int | None = field(
        default=None, metadata={"help": "HNSW indexes: size of the search's candidate list (None: FAISS's default)."})

    def __post_init__(self):
        if self.prefilter_passage_tokens == "blocks":
            object.__setattr__(self, "prefilter_passage_tokens", None)
        for name in ("k", "max_span_length", "prefilter_blocks"):
            _check_integer(name, getattr(self, name), minimum=1)
        for name in ("nprobe", "ef_search"):
            _check_integer(name, getattr(self, name), minimum=1, optional=True)
        _check_integer("prefilter_passage_tokens", self.prefilter_passage_tokens, minimum=2, optional=True,
                       hint=' or "blocks"')
        for name in ("apply_temperature_twice", "expand_span_candidates", "spans_cross_lines",
                     "exclude_query_phrases"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"NPMDecodingConfig.{name} must be True or False, got {getattr(self, name)!r}.")
        for name, allowed in CHOICES.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"NPMDecodingConfig.{name}={getattr(self, name)!r} is not supported; use one of "
                                 f"{list(allowed)}.")
        _check_number("temperature", self.temperature, "> 0", lambda value: value > 0)
        _check_number("length_penalty_alpha", self.length_penalty_alpha, "", lambda value: True)
        _check_number("prefilter_weight", self.prefilter_weight, ">= 0", lambda value: value >= 0)

    @property
    def span_temperature(self) -> float:
        """Temperature of span-mode softmaxes: T, or T² with the official code's quirk."""
        return self.temperature**2 if self.apply_temperature_twice else float(self.temperature)

    # --------------------------------------------------------------------------------------------- merging
    def update(self, **overrides) -> "NPMDecodingConfig":
        """A new config with `overrides` applied (None values are ignored: "not given"); this one is unchanged."""
        unknown = sorted(set(overrides) - set(decoding_field_names()))
        if unknown:
            raise ValueError(f"Unknown decoding option(s) {unknown}; NPMDecodingConfig has {decoding_field_names()}.")
        given = {name: value for name, value in overrides.items() if value is not None}
        return dataclasses.replace(self, **given) if given else self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    # ------------------------------------------------------------------------------------------- files
    def save_pretrained(self, directory) -> None:
        """Write `decoding_config.json` into `directory` (a temporary file renamed into place)."""
        path = Path(directory) / DECODING_CONFIG_FILE
        staging = path.with_name(f".{DECODING_CONFIG_FILE}.tmp-{uuid.uuid4().hex[:8]}")
        staging.write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n", encoding="utf-8")
        os.replace(staging, path)

    @classmethod
    def from_dict(cls, data: dict, source: str = "decoding settings") -> "NPMDecodingConfig":
        if not isinstance(data, dict):
            raise ValueError(f"{source} must be a JSON object of decoding options, got {type(data).__name__}.")
        return cls().update(**data)

    @classmethod
    def from_model_config(cls, config) -> "NPMDecodingConfig":
        """The settings an NPM config carries inline (directories saved before decoding_config.json): every field
        config.json sets, the defaults for the rest."""
        inline = {name: getattr(config, name) for name in decoding_field_names() if hasattr(config, name)}
        return cls().update(**inline)

    @classmethod
    def for_model(cls, model, **hub_kwargs) -> "NPMDecodingConfig":
        """The model's own decoding settings: its directory's (or Hub repo's, at the commit of its weights)
        decoding_config.json, else those inline in its config."""
        name = str(getattr(model, "name_or_path", "") or "")
        path = None
        if name and Path(name).is_dir():
            path = Path(name) / DECODING_CONFIG_FILE
        elif name:
            commit = getattr(model.config, "_commit_hash", None)
            try:
                path = Path(hf_hub_download(name, DECODING_CONFIG_FILE, revision=commit, **hub_kwargs))
            except (EntryNotFoundError, LocalEntryNotFoundError, HFValidationError, OSError):
                path = None  # no such file (a repo saved before it), or not a repo id: the settings are in its config
        if path is None or not path.is_file():
            return cls.from_model_config(model.config)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ValueError(f"{path} is not valid JSON ({error}); fix or delete it.") from None
        return cls.from_dict(data, source=str(path))


def decoding_field_names() -> list[str]:
    return [f.name for f in dataclasses.fields(NPMDecodingConfig)]


def as_decoding_config(decoding, base: NPMDecodingConfig | None = None) -> NPMDecodingConfig:
    """`decoding` (an NPMDecodingConfig, a dict of options, or None) as an NPMDecodingConfig: a dict updates `base`
    (default: the defaults)."""
    base = base or NPMDecodingConfig()
    if decoding is None:
        return base
    if isinstance(decoding, NPMDecodingConfig):
        return decoding
    if isinstance(decoding, dict):
        return base.update(**decoding)
    raise TypeError(f"decoding= takes an NPMDecodingConfig or a dict of its options, got {type(decoding).__name__}.")


def _check_integer(name: str, value, minimum: int, optional: bool = False, hint: str = "") -> None:
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        what = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise ValueError(f"NPMDecodingConfig.{name} must be {what}{hint}{' or None' if optional else ''}, "
                         f"got {value!r}.")


def _check_number(name: str, value, rule: str, holds) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not holds(value):
        rule = f" {rule}" if rule else ""
        raise ValueError(f"NPMDecodingConfig.{name} must be a finite number{rule}, got {value!r}.")
