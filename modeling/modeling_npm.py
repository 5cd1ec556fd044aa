"""NPM encoder model: a plain transformer encoder whose last hidden states are NPM's query and key vectors.

This file travels to the Hub as remote code: relative imports only, nothing from the rest of npm_hf.
"""

import os
import tempfile
from dataclasses import dataclass

import torch
from transformers import AutoModel, PreTrainedConfig, PreTrainedModel
from transformers.modeling_outputs import ModelOutput
from transformers.utils import logging

try:  # the Hub client transformers' own uploads use (5.x)
    from transformers.utils.hub import hf_api
except ImportError:  # older transformers
    from huggingface_hub import HfApi as hf_api

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
    """Saving: `save_pretrained` (hence `Trainer.save_model` and `push_to_hub`) writes what transformers writes, then
    runs each of `save_hooks` as `hook(model, save_directory, index=..., model_id=...)` (a hook with a
    `check(model, index)` method has it run first, before anything is written). This file travels alone as
    remote code and knows nothing of npm_hf; npm_hf registers the hook that completes an NPM directory (the remote
    pipeline code, decoding_config.json, the index when one is attached or given, the card). Without npm_hf there is
    no hook, and saving is transformers' own."""

    config_class = NPMConfig
    base_model_prefix = "npm"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    save_hooks: list = []  # shared by every NPM class: callables registered once, by `npm_hf.register`
    index = None  # an index attached to the model (`model.index = NPMIndex.load(...)`): saved with it

    def save_pretrained(self, save_directory, is_main_process: bool = True, *args, index=None, push_to_hub=False,
                        **kwargs):
        """`PreTrainedModel.save_pretrained`, then the `save_hooks` (on the main process). `index`: the index to
        save with the model (default: the attached `model.index`, if any)."""
        if not self.save_hooks:
            return super().save_pretrained(save_directory, is_main_process, *args, push_to_hub=push_to_hub, **kwargs)
        self._check_save_hooks(index)
        hub = {key: kwargs.pop(key) for key in ("repo_id", "commit_message", "create_pr") if key in kwargs}
        token = kwargs.get("token")
        timestamps = self._get_files_timestamps(save_directory) if push_to_hub and os.path.isdir(save_directory) else {}
        super().save_pretrained(save_directory, is_main_process, *args, **kwargs)
        repo_id = hub.pop("repo_id", os.path.basename(os.path.normpath(save_directory))) if push_to_hub else None
        if self.should_save_on_this_rank(is_main_process):
            for hook in self.save_hooks:
                hook(self, save_directory, index=index, model_id=repo_id or str(save_directory))
            if push_to_hub:  # what transformers does, after the hooks so that their files go too
                repo_id = hf_api().create_repo(repo_id, exist_ok=True, token=token).repo_id
                self._upload_modified_files(save_directory, repo_id, timestamps, token=token, **hub)

    def push_to_hub(self, repo_id: str, *, index=None, max_shard_size="50GB", commit_message=None,
                    commit_description=None, private=None, token=None, revision=None, create_pr=False, **kwargs):
        """`PreTrainedModel.push_to_hub`, saving through `save_pretrained` with its hooks (and `index`), and
        keeping the card they write."""
        if not self.save_hooks:
            return super().push_to_hub(repo_id, max_shard_size=max_shard_size, commit_message=commit_message,
                                       commit_description=commit_description, private=private, token=token,
                                       revision=revision, create_pr=create_pr, **kwargs)
        if kwargs:
            raise TypeError(f"NPMModel.push_to_hub does not take {sorted(kwargs)}; it takes index, max_shard_size, "
                            "commit_message, commit_description, private, token, revision and create_pr.")
        self._check_save_hooks(index)
        repo_id = hf_api().create_repo(repo_id, private=private, token=token, exist_ok=True).repo_id
        with tempfile.TemporaryDirectory() as tmp_dir:
            self._save_for_push(tmp_dir, index=index, model_id=repo_id, max_shard_size=max_shard_size)
            return self._upload_modified_files(tmp_dir, repo_id, files_timestamps={}, commit_message=commit_message,
                                               token=token, create_pr=create_pr, revision=revision,
                                               commit_description=commit_description)

    def _check_save_hooks(self, index) -> None:
        for hook in self.save_hooks:
            if hasattr(hook, "check"):
                hook.check(self, index)

    def _save_for_push(self, save_directory, index, model_id: str, **kwargs):
        super().save_pretrained(save_directory, **kwargs)
        for hook in self.save_hooks:
            hook(self, save_directory, index=index, model_id=model_id)


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
            kwargs: [`NPMConfig`] fields (`mode`, `similarity_scale`, ...); every other keyword goes to
                `AutoModel.from_pretrained` (`revision`, `cache_dir`, `token`, `dtype`, ...). Decoding settings
                (`k`, `temperature`, span rules) are not part of the model: pass them to the pipeline.

        Example:
        ```python
        >>> model = NPMModel.from_encoder("roberta-large", mode="span")
        ```
        """
        config_fields = set(NPMConfig.__dataclass_fields__) - set(PreTrainedConfig.__dataclass_fields__) - {"encoder"}
        npm_kwargs = {key: kwargs.pop(key) for key in list(kwargs) if key in config_fields}
        # The released facebook/npm-single is NPM-single; every other encoder starts as an NPM (span mode).
        npm_kwargs.setdefault("mode", "single" if "npm-single" in str(encoder_name_or_path).rstrip("/") else "span")
        try:
            encoder, info = _load_encoder_quietly(encoder_name_or_path, **kwargs)
        except TypeError as error:
            if not kwargs or "unexpected keyword argument" not in str(error):
                raise
            raise TypeError(
                f"NPMModel.from_encoder got {sorted(kwargs)}, which are neither NPMConfig fields "
                f"({sorted(config_fields)}) nor arguments the encoder accepts ({error}). Decoding settings (k, "
                "temperature, span rules, pre-filters) belong to the pipeline: pipeline('fill-mask', model=..., "
                "k=8) or the model's decoding_config.json."
            ) from None
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
