"""Configuration of a Nonparametric Masked Language Model (NPM, Min et al. 2022).

This file travels to the Hub as remote code: it imports nothing from the rest of npm_hf.
"""

import math
import posixpath

from huggingface_hub.dataclasses import strict
from transformers import AutoConfig
from transformers.configuration_utils import PreTrainedConfig, SubConfigSpec


NPM_MODES = ("span", "single")
SPAN_STOPWORD_RULES = ("none", "any", "edges", "reference")
SPAN_SCORINGS = ("sum", "product")
PHRASE_AGGREGATIONS = ("sum", "max")
PREFILTERS = ("none", "bm25", "dense")


@strict(accept_kwargs=True)
class NPMConfig(PreTrainedConfig):
    r"""
    Configuration of an [`NPMModel`]: an encoder whose last hidden states are matched against a reference corpus.

    Args:
        encoder (`PreTrainedConfig` or `dict`, *optional*):
            Configuration of the wrapped encoder (any BERT/RoBERTa-family model that `AutoModel` builds).
        mode (`str`, *optional*, defaults to `"span"`):
            `"span"` (NPM: a masked span is two mask tokens, a start and an end query) or `"single"`
            (NPM-single: one mask, one retrieved token).
        k (`int`, *optional*, defaults to 4096):
            Neighbours retrieved per query vector.
        max_span_length (`int`, *optional*, defaults to 10):
            Longest answer span, in tokens.
        temperature (`float`, *optional*, defaults to 1.0):
            Softmax temperature applied to the scaled inner products.
        similarity_scale (`float`, *optional*):
            Multiplier of the inner product; `None` means `1 / sqrt(hidden_size)`, as in the paper.
        length_penalty_alpha (`float`, *optional*, defaults to 0.0):
            A span answer `v` scores `S(v) * |v| ** alpha` (|v| in tokens).
        span_stopwords (`str`, *optional*, defaults to `"none"`):
            `"none"` keeps every span; `"reference"` drops spans holding any stop-word or punctuation id, wherever it
            sits in a word (the official open-set rule, which also rejects "the ##ssa ##lon ##iki"); `"any"` drops
            spans holding a whole-word stop word or punctuation outside a word ("Mid-Atlantic" stays); `"edges"`
            drops spans that start or end with one.
        index_subfolder (`str`, *optional*, defaults to `"index"`):
            Where the reference-corpus index lives, relative to the model directory or Hub repo.
        apply_temperature_twice (`bool`, *optional*, defaults to `False`):
            Reproduce the official code's span-mode quirk that divides by the temperature twice (T²).
        index_repo_id (`str`, *optional*):
            A Hub dataset repo holding the index (very large indexes live apart from the weights).
        index_revision (`str`, *optional*):
            The commit of `index_repo_id` the index was uploaded at (pinned, so weights and index stay matched).
        expand_span_candidates (`bool`, *optional*, defaults to `False`):
            Span mode: the official code's candidate expansion. The start candidates are the retrieved word starts
            and the starts of spans that end at a retrieved word end; the end candidates likewise; P_s and P_e are
            softmaxes over those two sets. Finds spans with only one retrieved end, at several times the cost.
        span_scoring (`str`, *optional*, defaults to `"sum"`):
            A span scores `P_s(s) + P_e(e)` (`"sum"`, the paper) or `P_s(s) * P_e(e)` (`"product"`: a span needs
            both ends, so one-word fragments of a phrase no longer win on their start alone).
        phrase_aggregation (`str`, *optional*, defaults to `"sum"`):
            A phrase scores the sum of its spans' scores (`"sum"`, the paper: frequent strings gain) or the best one
            (`"max"`).
        spans_cross_lines (`bool`, *optional*, defaults to `True`):
            Span mode, indexes built before paragraph blocks (whose blocks run over line breaks): `False` keeps each
            answer within one line, so list items, table cells and headings no longer run together ("Nigeria\n*
            Ada"). Current indexes tokenize every line as a paragraph of its own, as the official code does, so no
            span crosses a line there anyway.
        exclude_query_phrases (`bool`, *optional*, defaults to `False`):
            Span mode: never answer with a phrase the input already contains outside its masks (a cloze answer rarely
            repeats its own sentence, while retrieved blocks that match the query are full of its words).
        prefilter (`str`, *optional*, defaults to `"none"`):
            Two-stage retrieval: `"bm25"` (the paper's open-set setting) or `"dense"` (the encoder's mean-pooled
            query against mean-pooled passages) keeps `prefilter_blocks` passages, whose tokens are then scored
            exactly.
        prefilter_blocks (`int`, *optional*, defaults to 3):
            Passages kept by the pre-filter (the paper: 3 blocks).
        prefilter_passage_tokens (`int`, *optional*):
            Pre-filter passages: `None` = the index's blocks (the paper), or windows of this many tokens, overlapping
            by half, inside each block (they single out the sentences that match the query).
        prefilter_weight (`float`, *optional*, defaults to 0.0):
            Fuses the pre-filter's relevance into token scoring: each kept token's start and end logits gain this
            weight times its passage's score divided by the best passage's score. 0 = the kept passages are only a
            restriction (the paper).
        nprobe (`int`, *optional*):
            IVF indexes: inverted lists visited per query (more = better recall, slower); `None` = FAISS's default.
        ef_search (`int`, *optional*):
            HNSW indexes: size of the search's candidate list (FAISS's `efSearch`); `None` = FAISS's default.

    Example:
    ```python
    >>> from npm_hf import NPMConfig
    >>> config = NPMConfig(encoder={"model_type": "bert", "hidden_size": 32, "num_hidden_layers": 2,
    ...                             "num_attention_heads": 2, "intermediate_size": 64}, mode="single")
    >>> round(config.scale, 4)
    0.1768
    ```"""

    model_type = "npm"
    sub_configs_defaults = {"encoder": SubConfigSpec(config_class=AutoConfig, model_type="roberta")}

    encoder: PreTrainedConfig | dict | None = None
    mode: str = "span"
    k: int = 4096
    max_span_length: int = 10
    temperature: float | int = 1.0
    similarity_scale: float | int | None = None
    length_penalty_alpha: float | int = 0.0
    span_stopwords: str = "none"
    index_subfolder: str = "index"
    index_repo_id: str | None = None
    index_revision: str | None = None
    apply_temperature_twice: bool = False
    expand_span_candidates: bool = False
    span_scoring: str = "sum"
    phrase_aggregation: str = "sum"
    spans_cross_lines: bool = True
    exclude_query_phrases: bool = False
    prefilter: str = "none"
    prefilter_blocks: int = 3
    prefilter_passage_tokens: int | None = None
    prefilter_weight: float | int = 0.0
    nprobe: int | None = None
    ef_search: int | None = None
    pad_token_id: int | None = None

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        pipelines = getattr(self, "custom_pipelines", None) or {}
        if __name__.startswith("npm_hf.") and "fill-mask" in pipelines:
            # npm_hf itself serves "fill-mask" for NPM models; the repo's copy of its pipeline is for processes without
            # npm_hf, and kept here it would make transformers demand trust_remote_code even where npm_hf is installed.
            self.custom_pipelines = {task: spec for task, spec in pipelines.items() if task != "fill-mask"}
        if self.pad_token_id is None:
            self.pad_token_id = getattr(self.encoder, "pad_token_id", None)
        if self.mode not in NPM_MODES:
            raise ValueError(f"NPMConfig.mode={self.mode!r} is not supported; use one of {list(NPM_MODES)}.")
        if self.span_stopwords not in SPAN_STOPWORD_RULES:
            raise ValueError(
                f"NPMConfig.span_stopwords={self.span_stopwords!r} is not supported; "
                f"use one of {list(SPAN_STOPWORD_RULES)}."
            )
        for name, allowed in (("span_scoring", SPAN_SCORINGS), ("phrase_aggregation", PHRASE_AGGREGATIONS),
                              ("prefilter", PREFILTERS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"NPMConfig.{name}={getattr(self, name)!r} is not supported; use one of "
                                 f"{list(allowed)}.")
        for name in ("k", "max_span_length", "prefilter_blocks"):
            if getattr(self, name) < 1:
                raise ValueError(f"NPMConfig.{name} must be >= 1, got {getattr(self, name)}.")
        for name in ("nprobe", "ef_search"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"NPMConfig.{name} must be a positive integer or None, got {value!r}.")
        tokens = self.prefilter_passage_tokens
        if tokens is not None and (isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 2):
            raise ValueError(f"NPMConfig.prefilter_passage_tokens must be an integer >= 2 or None, got {tokens!r}.")
        if not (math.isfinite(self.prefilter_weight) and self.prefilter_weight >= 0):
            raise ValueError(f"NPMConfig.prefilter_weight must be a finite number >= 0, got {self.prefilter_weight}.")
        if self.temperature <= 0:
            raise ValueError(f"NPMConfig.temperature must be > 0, got {self.temperature}.")
        if self.similarity_scale is not None and self.similarity_scale <= 0:
            raise ValueError(f"NPMConfig.similarity_scale must be > 0 or None, got {self.similarity_scale}.")
        folder = posixpath.normpath(self.index_subfolder.replace("\\", "/"))
        if posixpath.isabs(folder) or folder.startswith(".."):
            raise ValueError(
                f"NPMConfig.index_subfolder={self.index_subfolder!r} must be a path relative to the model "
                "directory (e.g. 'index'), so that the model and its index travel together."
            )

    @property
    def hidden_size(self) -> int:
        return self.encoder.hidden_size

    @property
    def max_input_length(self) -> int:
        """Longest token sequence the encoder accepts (RoBERTa-style positions start after the padding index)."""
        limit = getattr(self.encoder, "max_position_embeddings", None) or 512
        if "roberta" in self.encoder.model_type or self.encoder.model_type in ("camembert", "longformer"):
            limit -= (self.encoder.pad_token_id or 0) + 1
        return limit

    @property
    def scale(self) -> float:
        """Multiplier of query·key inner products: `similarity_scale`, or 1/sqrt(hidden size) (the paper)."""
        if self.similarity_scale is not None:
            return float(self.similarity_scale)
        return 1.0 / math.sqrt(self.hidden_size)

    @property
    def span_temperature(self) -> float:
        """Temperature of span-mode softmaxes: T, or T² with the official code's quirk."""
        return self.temperature**2 if self.apply_temperature_twice else float(self.temperature)


__all__ = ["NPMConfig"]
