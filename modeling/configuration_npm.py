"""Configuration of a Nonparametric Masked Language Model (NPM, Min et al. 2022).

This file travels to the Hub as remote code: it imports nothing from the rest of npm_hf.
"""

import math
import posixpath

from huggingface_hub.dataclasses import strict
from transformers import AutoConfig
from transformers.configuration_utils import PreTrainedConfig, SubConfigSpec


NPM_MODES = ("span", "single")


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
        similarity_scale (`float`, *optional*):
            Multiplier of the inner product, in training and retrieval; `None` means `1 / sqrt(hidden_size)`, as in
            the paper.
        index_subfolder (`str`, *optional*, defaults to `"index"`):
            Where the reference-corpus index lives, relative to the model directory or Hub repo.
        index_repo_id (`str`, *optional*):
            A Hub dataset repo holding the index (very large indexes live apart from the weights).
        index_revision (`str`, *optional*):
            The commit of `index_repo_id` the index was uploaded at (pinned, so weights and index stay matched).

    How answers are decoded (k, temperature, span rules, pre-filters, search knobs) is not part of the model: see
    `npm_hf.inference.decoding.NPMDecodingConfig`, saved beside this config as decoding_config.json. Configs saved
    before it carry those settings inline; they still load, and the pipeline reads them from there (`temperature`
    is declared for them, and None otherwise).

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
    similarity_scale: float | int | None = None
    index_subfolder: str = "index"
    index_repo_id: str | None = None
    index_revision: str | None = None
    pad_token_id: int | None = None
    # Legacy, None in new configs: the softmax temperature of configs saved before decoding_config.json, read from
    # here by NPMDecodingConfig.from_model_config. Declared because transformers drops an undeclared `temperature`
    # (a generation parameter) on load, which would silently change those models' answers; the other old inline
    # decoding fields load as plain attributes.
    temperature: float | int | None = None

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
        scale = self.similarity_scale
        if scale is not None and not (math.isfinite(scale) and scale > 0):
            raise ValueError(f"NPMConfig.similarity_scale must be a finite number > 0 or None, got {scale}.")
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

__all__ = ["NPMConfig"]
