"""What `NPMModel.save_pretrained` adds to transformers' save once npm_hf is imported, so that `save_pretrained`,
`Trainer.save_model` and `push_to_hub` (which all save through it) write a complete NPM directory, as
`npm-hf convert/train/push` do: the remote pipeline code, decoding_config.json, the index when one is attached
(`model.index`) or given (`save_pretrained(dir, index=...)`), and the model card.

`npm_hf.modeling` cannot import this (it travels alone as remote code): it runs the callables of
`NPMPreTrainedModel.save_hooks`, and `npm_hf.register` puts `complete_npm_directory` there.
"""

import shutil
import weakref
from pathlib import Path

from transformers.utils import logging

from .hub_cards import CARD_EXAMPLE, load_card_facts, mask_token_of, update_model_card
from .index import IndexMismatchError
from .inference.decoding import NPMDecodingConfig
from .inference.directory_swap import DirectoryLock, link_or_copy, staging_path, swap_into_place
from .remote_code import add_remote_pipeline
from .version import __version__


logger = logging.get_logger(__name__)

# the decoding settings each model's saves carry: its own (NPMDecodingConfig.for_model) as loaded
_DECODING = weakref.WeakKeyDictionary()
# card facts a saved copy keeps from the directory its model was loaded from (the index facts are the saved index's)
INHERITED_CARD_FACTS = ("base_model", "training", "eval_results", "baselines", "decoding", "example",
                        "license", "datasets", "language")


class NPMDirectoryHook:
    """The save hook (`NPMPreTrainedModel.save_hooks`): `check` runs before transformers writes anything, the call
    completes the NPM directory transformers just saved the model into."""

    def check(self, model, index=None) -> None:
        """A given `index` (an `NPMIndexReader`) must be of these weights: IndexMismatchError, nothing written."""
        if index is not None:
            index.check_compatible(model)

    def __call__(self, model, save_directory, index=None, model_id: str | None = None) -> None:
        complete_npm_directory(model, save_directory, index=index, model_id=model_id)

    def __eq__(self, other) -> bool:  # one per process, however often npm_hf.register runs
        return isinstance(other, NPMDirectoryHook)

    __hash__ = object.__hash__


def complete_npm_directory(model, save_directory, index=None, model_id: str | None = None) -> None:
    """Complete the NPM directory transformers just saved `model` into.

    `index` (an `NPMIndexReader`), else the attached `model.index`, is copied into `<save_directory>/<index_subfolder>`
    (hard links where the file system allows: index files are never written in place) when it was built with these
    weights. A given `index` of other weights raises IndexMismatchError (through `save_pretrained`, before anything
    is written: `NPMDirectoryHook.check`); an attached one is left out with a warning (a checkpoint saved in the
    middle of training, the index stale)."""
    save_directory = Path(save_directory)
    attached = index is None
    index = getattr(model, "index", None) if attached else index
    if index is not None:
        try:
            index.check_compatible(model)
        except IndexMismatchError as error:
            if not attached:
                raise
            logger.warning(f"The index attached to the model is not saved with it in {save_directory}: {error}")
            index = None
    name = str(getattr(model, "name_or_path", "") or "")
    source = Path(name) if name and Path(name).is_dir() else None
    if model not in _DECODING:  # looked up once per model (a Hub id costs a request), not at every checkpoint
        _DECODING[model] = NPMDecodingConfig.for_model(model)
    _DECODING[model].save_pretrained(save_directory)
    add_remote_pipeline(save_directory)
    if index is not None:
        copy_index(Path(index.path), save_directory / model.config.index_subfolder)
    facts = load_card_facts(source) if source and source.resolve() != save_directory.resolve() else {}
    existing = load_card_facts(save_directory)
    inherited = {key: facts[key] for key in INHERITED_CARD_FACTS if key in facts and key not in existing}
    mask = mask_token_of(save_directory) or (source and mask_token_of(source))
    if mask and "example" not in existing and "example" not in inherited:
        inherited["example"] = CARD_EXAMPLE.format(mask=mask)
    update_model_card(save_directory, **inherited, model_id=model_id or str(save_directory),
                      mode=model.config.mode, index=index_card_facts(index) if index is not None else None,
                      versions={"npm_hf": __version__})


def copy_index(source: Path, target: Path) -> None:
    """Copy an index directory to `target` atomically (a hidden staging copy swapped into place under the target's
    writer lock, replacing an older index only once complete), hard-linking files where possible. Nothing to do
    when `target` is `source`."""
    if target.exists() and target.resolve() == source.resolve():
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    with DirectoryLock(target, "save_pretrained"):
        staging = staging_path(target)
        try:
            shutil.copytree(source, staging, copy_function=link_or_copy, ignore=shutil.ignore_patterns(".*"))
            swap_into_place(staging, target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)


def index_card_facts(index) -> dict:
    """The card's facts of an index: its size and how it was built."""
    m = index.manifest
    total = sum(entry["bytes"] for entry in m.files.values())
    return {"num_documents": m.num_documents, "num_tokens": m.num_tokens, "num_indexed_tokens": m.num_indexed_tokens,
            "block_size": m.block_size, "faiss_factory": m.faiss_factory, "build_seconds": m.build_seconds,
            "bytes_per_token": round(total / max(m.num_indexed_tokens, 1), 1)}
