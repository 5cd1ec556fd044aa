"""Config and model of the NPM (installed as `npm_hf.modeling`). Flat, with relative imports only, so the two
files can travel to the Hub as remote code."""

from .configuration_npm import NPMConfig
from .modeling_npm import NPMModel, NPMOutput, NPMPreTrainedModel


__all__ = ["NPMConfig", "NPMModel", "NPMOutput", "NPMPreTrainedModel"]
