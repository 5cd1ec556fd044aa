"""Registration of NPM with transformers' Auto classes and pipeline registry, done once on `import npm_hf`."""

from transformers import AutoConfig, AutoModel, AutoModelForMaskedLM
from transformers.pipelines import PIPELINE_REGISTRY

from .hub_cards import NPMModelCardCallback
from .modeling import NPMConfig, NPMModel, NPMPreTrainedModel
from .fill_mask import FillMaskDispatcher
from .saving import NPMDirectoryHook
from .trainer import NPMTrainer


def register() -> None:
    """Register `npm` with AutoConfig/AutoModel/AutoModelForMaskedLM (also as remote code in saved models) and
    dispatch "fill-mask" by model type.

    Idempotent. The "fill-mask" entry keeps its default model and Auto class; only its implementation becomes
    [`FillMaskDispatcher`], which hands non-NPM models to the stock `FillMaskPipeline`.
    """
    AutoConfig.register(NPMConfig.model_type, NPMConfig, exist_ok=True)
    AutoModel.register(NPMConfig, NPMModel, exist_ok=True)
    AutoModelForMaskedLM.register(NPMConfig, NPMModel, exist_ok=True)
    # Saved NPMs carry configuration_npm.py / modeling_npm.py and an auto_map, so that
    # AutoModel.from_pretrained(..., trust_remote_code=True) loads them where npm_hf is not installed.
    NPMConfig.register_for_auto_class()
    NPMModel.register_for_auto_class("AutoModel")
    if NPMDirectoryHook() not in NPMPreTrainedModel.save_hooks:
        # save_pretrained, Trainer.save_model and push_to_hub write a complete NPM directory (npm_hf.saving)
        NPMPreTrainedModel.save_hooks.append(NPMDirectoryHook())
    if NPMModelCardCallback not in NPMTrainer.default_callbacks:
        NPMTrainer.default_callbacks.append(NPMModelCardCallback)  # trainings write their card
    task = PIPELINE_REGISTRY.supported_tasks["fill-mask"]
    if task["impl"] is not FillMaskDispatcher:
        # A new dict, assigned without register_pipeline: that would warn "Overwriting pipeline" on every import.
        PIPELINE_REGISTRY.supported_tasks["fill-mask"] = {**task, "impl": FillMaskDispatcher}
