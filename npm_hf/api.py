"""High-level functions behind the CLI: make an NPM directory from an encoder, load one, build its index, train."""

import os
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AutoConfig, AutoTokenizer
from transformers.utils import logging

from .training_blocks import prepare_training_blocks
from .hub_cards import load_card_facts, update_model_card
from .hub_cards import push_to_hub as upload
from .index import IndexBuildArguments, NPMIndex, top1_agreement
from .inference.decoding import NPMDecodingConfig, as_decoding_config, decoding_field_names
from .inference.stopwords import stopword_ids
from .modeling import NPMConfig, NPMModel
from .remote_code import add_remote_pipeline, remote_code_files
from .saving import index_card_facts
from .trainer import NPMTrainer, last_complete_checkpoint, save_final_model
from .version import __version__


logger = logging.get_logger(__name__)


def convert_encoder(encoder_name_or_path: str, output_dir, overwrite: bool = False,
                    decoding: NPMDecodingConfig | dict | None = None, **config_kwargs) -> NPMModel:
    """Wrap a plain encoder (directory or Hub id) as an NPM and save model + tokenizer to `output_dir`, with its
    decoding settings in decoding_config.json.

    `config_kwargs` are [`NPMConfig`] fields (`mode`, `similarity_scale`, ...); [`NPMDecodingConfig`] fields among
    them (`k`, `prefilter`, ...) join `decoding`. The directory appears only once complete.
    """
    output_dir = Path(output_dir)
    if output_dir.exists() and not overwrite:
        raise FileExistsError(f"{output_dir} already exists; pass overwrite=True (CLI: --overwrite) to replace it.")
    decoding = as_decoding_config(decoding).update(
        **{name: config_kwargs.pop(name) for name in decoding_field_names() if name in config_kwargs})
    model = NPMModel.from_encoder(encoder_name_or_path, **config_kwargs)
    tokenizer = AutoTokenizer.from_pretrained(encoder_name_or_path)
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = output_dir.parent / f".{output_dir.name}.tmp-{uuid.uuid4().hex[:12]}"
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        decoding.save_pretrained(staging)
        add_remote_pipeline(staging)
        update_model_card(staging, model_id=str(output_dir), base_model=encoder_name_or_path,
                          mode=model.config.mode, example=f"Hagios Demetrios is located in {tokenizer.mask_token}.",
                          versions={"npm_hf": __version__})
        if output_dir.exists():
            shutil.rmtree(output_dir)
        os.replace(staging, output_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return model


LIGHTNING_PREFIX = "encoder.transformer."


def convert_lightning_checkpoint(checkpoint, base_model: str, output_dir, overwrite: bool = False,
                                 **config_kwargs) -> NPMModel:
    """Convert an original NPM training checkpoint (PyTorch Lightning `.ckpt`, or `.safetensors`, with keys
    `encoder.transformer.<Hugging Face key>`) into an NPM directory.

    `base_model` (directory or Hub id, e.g. `roberta-large`) gives the architecture and tokenizer. A `.ckpt` is read
    with `torch.load(weights_only=True)`, which accepts tensors and plain containers only; the mode defaults to
    NPM-single for files named like `npm-single.ckpt`, else span.
    """
    import tempfile

    from transformers import AutoModelForMaskedLM

    state = _read_checkpoint(Path(checkpoint))
    weights = {key[len(LIGHTNING_PREFIX):]: value for key, value in state.items() if key.startswith(LIGHTNING_PREFIX)}
    if not weights:
        raise ValueError(
            f"{checkpoint} has no '{LIGHTNING_PREFIX}*' weights, so it is not an NPM training checkpoint; plain "
            "Hugging Face checkpoints convert with `npm-hf convert --encoder`."
        )
    source = AutoModelForMaskedLM.from_config(AutoConfig.from_pretrained(base_model))
    missing, unexpected = source.load_state_dict(weights, strict=False)
    missing = [key for key in missing if "lm_head" not in key and "pooler" not in key]
    if missing or unexpected:
        raise ValueError(
            f"{checkpoint} does not fit the architecture of {base_model!r}: missing {missing[:5]}, unexpected "
            f"{unexpected[:5]}. Pass the base model the checkpoint was trained from (--base)."
        )
    config_kwargs.setdefault("mode", "single" if "npm-single" in Path(checkpoint).name else "span")
    with tempfile.TemporaryDirectory() as folder:
        source.save_pretrained(folder)
        AutoTokenizer.from_pretrained(base_model).save_pretrained(folder)
        model = convert_encoder(folder, output_dir, overwrite=overwrite, **config_kwargs)
    update_model_card(output_dir, base_model=base_model)
    return model


def _read_checkpoint(path: Path) -> dict:
    """The tensors of a checkpoint file, without unpickling arbitrary objects."""
    import pickle

    import torch

    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise ValueError(
            f"{path} holds Python objects besides tensors, which npm_hf does not unpickle ({str(error)[:200]}). In an "
            "environment you trust, extract its weights: `from safetensors.torch import save_file; save_file(torch."
            "load(path, weights_only=False)['state_dict'], 'npm.safetensors')`, then convert that file."
        ) from None
    return state.get("state_dict", state)


def push_to_hub(model_dir, repo_id: str, dry_run: bool = False, **kwargs):
    """Upload an NPM directory to the Hub with its index, card and remote code (model and fill-mask pipeline): the
    files `npm_hf.hub_cards.upload_plan` allows, nothing else. Keyword arguments as `npm_hf.hub_cards.push_to_hub`
    (private, revision, create_pr, token, index_repo_id). `dry_run=True` changes and uploads nothing and returns
    `{repo_id: [paths that would be uploaded]}` (and the index repo's paths with index_repo_id)."""
    if dry_run:
        return upload(model_dir, repo_id, dry_run=True, extra_files=tuple(remote_code_files()), **kwargs)
    add_remote_pipeline(model_dir)
    return upload(model_dir, repo_id, **kwargs)


def load_npm(name_or_path, **kwargs):
    """Load `(model, tokenizer)` of an NPM directory or Hub repo; a clear error for plain encoders."""
    config = AutoConfig.from_pretrained(name_or_path, **kwargs)
    if config.model_type != NPMConfig.model_type:
        raise ValueError(
            f"{name_or_path} holds a {config.model_type!r} model, not an NPM. Wrap it first: "
            f"`npm-hf convert --encoder {name_or_path} --output NPM_DIR` (or NPMModel.from_encoder)."
        )
    model = NPMModel.from_pretrained(name_or_path, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(name_or_path, **kwargs)
    return model, tokenizer


def build_index(model, corpus, output_dir=None, args: IndexBuildArguments | None = None, tokenizer=None) -> NPMIndex:
    """Build the reference-corpus index of an NPM.

    Args:
        model: an NPM directory (its index goes to `<dir>/<config.index_subfolder>` by default) or an `NPMModel`.
        corpus: a list of strings or dicts, a `datasets.Dataset`, a stream (`datasets.IterableDataset`, e.g.
            `load_dataset(..., streaming=True)` or `Dataset.to_iterable_dataset()`, or a generator of strings or
            dicts; a stream cannot `resume`), or a path to a .txt / .jsonl / saved dataset.
        output_dir: where to write the index; required when `model` is an object.
        args: [`IndexBuildArguments`] (block size, batch size, FAISS factory, overwrite, resume, ...).
        tokenizer: the model's tokenizer; loaded from the directory when `model` is a path.

    Under `torchrun` / `accelerate launch` every process encodes its share of the corpus (see `npm_hf.index.build`);
    each returns the finished index.
    """
    model_dir = None
    if isinstance(model, (str, os.PathLike)):
        model_dir = Path(model)
        model, loaded_tokenizer = load_npm(model_dir)
        tokenizer = tokenizer or loaded_tokenizer
        output_dir = output_dir or model_dir / model.config.index_subfolder
        if int(os.environ.get("WORLD_SIZE", "1")) > 1 and torch.cuda.is_available():  # one GPU per process
            model.to(torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count()))
    if output_dir is None or tokenizer is None:
        raise ValueError("Pass output_dir= and tokenizer= when building an index for a model object.")
    index = NPMIndex.build(model, tokenizer, corpus, output_dir, args)
    main_process = int(os.environ.get("RANK", "0")) == 0  # under torchrun / accelerate launch: process 0 writes
    if main_process and model_dir is not None and Path(output_dir).resolve() == (
            model_dir / model.config.index_subfolder).resolve():
        decoding = NPMDecodingConfig.for_model(model)  # the agreement of the search the pipeline will run
        agreement = top1_agreement(index, k=decoding.k, nprobe=decoding.nprobe, ef_search=decoding.ef_search)
        update_model_card(model_dir, index={**index_card_facts(index), **(agreement or {})})  # describe its own index
    return index


@dataclass
class TrainDataArguments:
    """What `npm-hf train` trains on and where it saves (the Trainer's own flags are NPMTrainingArguments)."""

    model: str = field(metadata={"help": "Encoder (directory or Hub id) to wrap, or an NPM directory to continue."})
    corpus: str = field(metadata={"help": "Training corpus: .txt, .jsonl or a datasets dataset."})
    output: str = field(metadata={"help": "Directory of the trained NPM (also the Trainer's output_dir)."})
    mode: str = field(default="span", metadata={"help": "'span' (NPM) or 'single' (NPM-single), for new NPMs."})
    similarity_scale: float | None = field(
        default=None, metadata={"help": "For new NPMs: multiplier of query-key inner products (default: the paper's "
                                        "1/sqrt(hidden size)); small encoders with small hidden states learn "
                                        "faster with a larger one."})
    block_size: int = field(default=256, metadata={"help": "Tokens per training sequence (paper: 256)."})
    group_size: int = field(default=16, metadata={"help": "Consecutive blocks per contrastive batch (paper: 16)."})
    eval_corpus: str | None = field(default=None, metadata={"help": "Optional held-out corpus for evaluation."})
    mask_stopwords: bool = field(
        default=True, metadata={"help": "Let masked spans begin or end with a stop word or punctuation (the paper); "
                                        "False spends the masking budget on content phrases."})

    def __post_init__(self):
        if self.mode not in ("span", "single"):
            raise ValueError(f"mode={self.mode!r}; use 'span' or 'single'.")
        if self.similarity_scale is not None and not self.similarity_scale > 0:
            raise ValueError(f"similarity_scale must be > 0 (or None for the paper's), got {self.similarity_scale}.")


def train(data_args: TrainDataArguments, training_args):
    """Train an NPM on a corpus with NPMTrainer and save it (weights + tokenizer) to `data_args.output`.

    `training_args` is an `NPMTrainingArguments`; its `resume_from_checkpoint` may be a checkpoint path or
    "true"/"last" for the newest checkpoint in the output directory. Returns the trainer.
    """
    config = AutoConfig.from_pretrained(data_args.model)
    if config.model_type == NPMConfig.model_type:
        model = NPMModel.from_pretrained(data_args.model)
    else:
        model = NPMModel.from_encoder(data_args.model, mode=data_args.mode, similarity_scale=data_args.similarity_scale)
    tokenizer = AutoTokenizer.from_pretrained(data_args.model)
    blocks = {
        name: prepare_training_blocks(corpus, tokenizer, block_size=data_args.block_size,
                                      group_size=data_args.group_size,
                                      salient=getattr(training_args, "salient_span_ratio", 0) > 0)
        for name, corpus in (("train", data_args.corpus), ("eval", data_args.eval_corpus)) if corpus is not None
    }
    excluded = None if data_args.mask_stopwords else stopword_ids(tokenizer)
    trainer = NPMTrainer(model=model, args=training_args, train_dataset=blocks["train"],
                         eval_dataset=blocks.get("eval"), processing_class=tokenizer, span_edge_exclude_ids=excluded)
    resume = training_args.resume_from_checkpoint
    if isinstance(resume, str) and resume.lower() in ("true", "last"):
        resume = last_complete_checkpoint(training_args.output_dir)
        if resume is None:
            logger.warning(f"No complete checkpoint in {training_args.output_dir}; training from the start.")
    trainer.train(resume_from_checkpoint=resume)
    save_final_model(trainer, data_args.output)
    if trainer.is_world_process_zero():
        _finish_trained_directory(Path(training_args.output_dir), Path(data_args.output),
                                  NPMDecodingConfig.for_model(model))
    return trainer


def _finish_trained_directory(trainer_dir: Path, output: Path, decoding: NPMDecodingConfig) -> None:
    """The saved NPM gets the decoding settings of the model it was trained from, the pipeline's remote code and,
    when the Trainer worked elsewhere, the card facts its callback recorded there (base model, mode, training run)."""
    decoding.save_pretrained(output)
    add_remote_pipeline(output)
    if trainer_dir.resolve() != output.resolve():
        facts = load_card_facts(trainer_dir)
        update_model_card(output, model_id=output.name, **{key: facts[key] for key in ("base_model", "mode", "training")
                                                           if key in facts})
    else:
        update_model_card(output)  # re-rendered: it now shows the decoding settings saved beside it
