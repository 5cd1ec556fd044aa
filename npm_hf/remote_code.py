"""The remote code of a saved NPM directory: the "fill-mask" pipeline, so that `pipeline("fill-mask", model=...,
trust_remote_code=True)` works where npm_hf is not installed (the model classes travel on their own, from
`npm_hf.modeling`, through `register_for_auto_class`). Which modules travel, and why they stay flat, is written
down in `npm_hf.inference`."""

from pathlib import Path

from transformers.dynamic_module_utils import custom_object_save, get_relative_import_files

from .hub_cards import update_config_file
from .inference import pipeline


REMOTE_FILL_MASK = {"impl": "pipeline.NonparametricFillMaskPipeline", "pt": ["AutoModel"], "type": "text"}


def remote_code_files() -> list[str]:
    """File names of the pipeline's remote code: `pipeline.py` and every module it imports, as transformers copies
    them (`custom_object_save`)."""
    entry = Path(pipeline.__file__)
    return sorted({entry.name, *(Path(path).name for path in get_relative_import_files(entry))})


def add_remote_pipeline(model_dir) -> None:
    """Copy the pipeline's code (`remote_code_files`) into an NPM directory and declare it as the repo's
    "fill-mask" pipeline in its config.json (with faiss installed, a process without npm_hf can then answer)."""
    custom_object_save(pipeline.NonparametricFillMaskPipeline, model_dir)
    update_config_file(model_dir, lambda config: {
        "custom_pipelines": {**config.get("custom_pipelines", {}), "fill-mask": REMOTE_FILL_MASK}})
