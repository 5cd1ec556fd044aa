"""npm-hf: Nonparametric Masked Language Models (NPM, Min et al. 2022) as a 🤗 transformers plugin.

`import npm_hf` registers the `npm` model type with AutoConfig / AutoModel / AutoModelForMaskedLM and routes
`pipeline("fill-mask")` to NPM retrieval for NPM models (other models keep the stock pipeline).
"""

from .version import __version__
from .modeling import NPMConfig, NPMModel, NPMOutput, NPMPreTrainedModel
from .corpus import iter_documents
from .training_blocks import prepare_training_blocks
from .index import (IndexBuildArguments, IndexLockedError, IndexManifest, IndexMismatchError, NPMIndex, NPMIndexError,
                    NPMIndexReader)
from .inference.decoding import NPMDecodingConfig
from .inference.pipeline import NonparametricFillMaskPipeline
from .inference.retrieval import NPMPredictor
from .fill_mask import FillMaskDispatcher
from .trainer import NPMContrastiveLoss, NPMSpanCollator, NPMTrainer, NPMTrainingArguments
from .api import (TrainDataArguments, build_index, convert_encoder, convert_lightning_checkpoint, load_npm,
                  push_to_hub, train)
from .evaluation import EvaluationArguments, evaluate
from .registration import register


register()

__all__ = [
    "__version__",
    "EvaluationArguments",
    "evaluate",
    "IndexBuildArguments",
    "IndexManifest",
    "IndexLockedError",
    "IndexMismatchError",
    "NPMContrastiveLoss",
    "NPMDecodingConfig",
    "NPMSpanCollator",
    "NPMTrainer",
    "NPMTrainingArguments",
    "NPMConfig",
    "NPMIndex",
    "NPMIndexError",
    "NPMIndexReader",
    "NPMModel",
    "NPMOutput",
    "NPMPredictor",
    "NPMPreTrainedModel",
    "NonparametricFillMaskPipeline",
    "FillMaskDispatcher",
    "build_index",
    "convert_encoder",
    "convert_lightning_checkpoint",
    "iter_documents",
    "register",
    "load_npm",
    "train",
    "TrainDataArguments",
    "prepare_training_blocks",
    "push_to_hub",
]
