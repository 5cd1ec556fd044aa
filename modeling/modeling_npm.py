"""NPM encoder model: a plain transformer encoder whose last hidden states are NPM's query and key vectors.

This file travels to the Hub as remote code: relative imports only, nothing from the rest of npm_hf.
"""

from dataclasses import dataclass

import torch
from transformers import AutoModel, PreTrainedConfig, PreTrainedModel
from transformers.modeling_outputs import ModelOutput
from transformers.utils import logging

from .configuration_npm import NPMConfig


logger = logging.get_logger(__name__)

# Checkpoint keys of heads NPM never uses (MLM heads of the released checkpoints, BERT poolers): dropped quietly.
_IGNORED_HEAD_PREFIXES = ("lm_head.", "cls.", "pooler.", "generator_", "predictions.")


@dataclass
class NPMOutput(ModelOutput):
    """
    Args:
        last_hidden_state (`torch.FloatTensor` of shape `(batch_size, sequence_length, hidden_size)`):
            Last-layer hidden states: queries at mask positions, keys (corpus vectors) everywhere else.
        hidden_states (`tuple(torch.FloatTensor)`, *optional*): All layers' hidden states, when requested.
        attentions (`tuple(torch.FloatTensor)`, *optional*): Attention weights, when requested.
    """

    last_hidden_state: torch.FloatTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None


class NPMPreTrainedModel(PreTrainedModel):
    config_class = NPMConfig
    base_model_prefix = "npm"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True


class NPMModel(NPMPreTrainedModel):
    """An NPM: the wrapped encoder's last hidden states, scored by inner product against a reference corpus.

    The model has no vocabulary head. Predictions come from an index over a corpus (`npm_hf.NPMIndex`) and the
    `fill-mask` pipeline. Build one from any BERT/RoBERTa-family encoder with [`NPMModel.from_encoder`].
    """

    def __init__(self, config: NPMConfig):
        super().__init__(config)
        self.encoder = AutoModel.from_config(config.encoder)
        if getattr(self.encoder, "pooler", None) is not None:
            self.encoder.pooler = None  # NPM uses token states only; an unused pooler would stall DDP
        self.post_init()

    def get_input_embeddings(self):
        return self.encoder.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.encoder.set_input_embeddings(value)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.LongTensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        **kwargs,
    ) -> NPMOutput:
        encoder_kwargs = {"token_type_ids": token_type_ids, "position_ids": position_ids}
        encoder_kwargs = {key: value for key, value in encoder_kwargs.items() if value is not None}
        out = self.encoder(
            input_ids=input_ids,
            attention_mask=attention_mask,
            inputs_embeds=inputs_embeds,
            output_hidden_states=output_hidden_states,
            output_attentions=output_attentions,
            return_dict=True,
            **encoder_kwargs,
            **kwargs,
        )
        return NPMOutput(
            last_hidden_state=out.last_hidden_state,
            hidden_states=getattr(out, "hidden_states", None),
            attentions=getattr(out, "attentions", None),
        )

    @classmethod
    def from_encoder(cls, encoder_name_or_path: str, **kwargs) -> "NPMModel":
        """Wrap a plain encoder checkpoint (a directory or Hub id) as an NPM, keeping its weights.

        Accepts bare encoders (`BertModel`, `RobertaModel`, ...) and checkpoints with an MLM head such as the
        released `facebook/npm` (`RobertaForMaskedLM`): heads are dropped quietly, since NPM never uses them.
        Without an explicit `mode`, names containing "npm-single" (the released `facebook/npm-single`) give
        NPM-single and all others span mode.

        Args:
            encoder_name_or_path: local directory or Hub model id of the encoder.
            kwargs: [`NPMConfig`] fields (`mode`, `k`, `temperature`, ...); every other keyword goes to
                `AutoModel.from_pretrained` (`revision`, `cache_dir`, `token`, `dtype`, ...).

        Example:
        ```python
        >>> model = NPMModel.from_encoder("roberta-large", mode="span")
        ```
        """
        config_fields = set(NPMConfig.__dataclass_fields__) - set(PreTrainedConfig.__dataclass_fields__) - {"encoder"}
        npm_kwargs = {key: kwargs.pop(key) for key in list(kwargs) if key in config_fields}
        # The released facebook/npm-single is NPM-single; every other encoder starts as an NPM (span mode).
        npm_kwargs.setdefault("mode", "single" if "npm-single" in str(encoder_name_or_path).rstrip("/") else "span")
        encoder, info = _load_encoder_quietly(encoder_name_or_path, **kwargs)
        if encoder.config.model_type == NPMConfig.model_type:
            raise ValueError(
                f"{encoder_name_or_path!r} is already an NPM model; load it with NPMModel.from_pretrained."
            )
        missing = [key for key in info.get("missing_keys", []) if not key.startswith(_IGNORED_HEAD_PREFIXES)]
        if missing:
            logger.warning(
                f"Encoder weights missing from {encoder_name_or_path!r} (randomly initialised): {sorted(missing)}"
            )
        config = NPMConfig(encoder=encoder.config, **npm_kwargs)
        config._name_or_path = encoder.config._name_or_path
        with torch.device("meta"):
            model = cls(config)
        if getattr(encoder, "pooler", None) is not None:
            encoder.pooler = None
        model.encoder = encoder
        model.config.encoder = encoder.config
        model.eval()
        return model


def _load_encoder_quietly(name_or_path: str, **kwargs):
    """AutoModel.from_pretrained with the report of unused head weights silenced (they are expected here)."""
    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        return AutoModel.from_pretrained(name_or_path, output_loading_info=True, **kwargs)
    finally:
        logging.set_verbosity(verbosity)


__all__ = ["NPMModel", "NPMOutput", "NPMPreTrainedModel"]
