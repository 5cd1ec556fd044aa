"""The "fill-mask" task once npm_hf is imported: NPM models get [`NonparametricFillMaskPipeline`] over an
[`NPMIndex`], every other model the stock `FillMaskPipeline`, unchanged."""

from transformers import FillMaskPipeline

from .index import NPMIndex
from .inference.pipeline import NPM_MODEL_TYPE, NonparametricFillMaskPipeline


class FillMaskDispatcher:
    """The implementation of the "fill-mask" entry of the transformers pipeline registry (`npm_hf.register`)."""

    _load_tokenizer = FillMaskPipeline._load_tokenizer
    _load_processor = FillMaskPipeline._load_processor
    _load_image_processor = FillMaskPipeline._load_image_processor
    _load_feature_extractor = FillMaskPipeline._load_feature_extractor
    _load_video_processor = getattr(FillMaskPipeline, "_load_video_processor", False)

    def __new__(cls, model, *args, **kwargs):
        if is_npm_model(model):
            if kwargs.get("index") is None:  # npm_hf's NPMIndex (editable), not remote code's NPMIndexReader
                kwargs["index"] = NPMIndex.for_model(model, **(kwargs.get("index_kwargs") or {}))
            return NonparametricFillMaskPipeline(model, *args, **kwargs)
        if kwargs.get("index") is not None:
            raise ValueError(
                f"index= was passed to pipeline('fill-mask') with a {type(model).__name__}, which is not an NPM "
                "model; load an NPM model (config.model_type == 'npm') to retrieve from an index."
            )
        kwargs.pop("index", None)
        return FillMaskPipeline(model, *args, **kwargs)


def is_npm_model(model) -> bool:
    return getattr(getattr(model, "config", None), "model_type", None) == NPM_MODEL_TYPE
