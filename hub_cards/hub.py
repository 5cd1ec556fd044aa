"""Pushing an NPM directory (weights, tokenizer, config, remote code, card and index) to the Hugging Face Hub."""

import json
import os
import uuid
from pathlib import Path

from huggingface_hub import HfApi
from huggingface_hub.utils import filter_repo_objects
from transformers.utils import logging

from .model_card import update_model_card


logger = logging.get_logger(__name__)

# Never uploaded: training checkpoints, the Trainer's pickled arguments, hidden and temporary files.
IGNORE_PATTERNS = ["checkpoint-*", "checkpoint-*/*", "training_args.bin", ".*", "*/.*", "*.tmp*", "runs/*"]
# The Hub refuses larger files (and recommends under 20 GB); index vectors are sharded below max_shard_size.
HUB_MAX_FILE_BYTES = 50 * 10**9


def push_to_hub(model_dir, repo_id: str, *, private: bool | None = None, revision: str | None = None,
                create_pr: bool = False, token: str | None = None, commit_message: str = "Upload NPM",
                index_repo_id: str | None = None, api: HfApi | None = None):
    """Upload an NPM directory to `repo_id` in one commit: weights, tokenizer, config, remote code, README and the
    index subfolder. With `index_repo_id`, the index goes to that dataset repo instead (for very large indexes) and
    the model's config records the dataset repo and the commit it was uploaded at. Returns the model commit info.
    """
    api = api or HfApi(token=token)
    model_dir = Path(model_dir)
    config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    if config.get("model_type") != "npm":
        raise ValueError(f"{model_dir} is not an NPM directory (config.json model_type {config.get('model_type')!r}).")
    subfolder = config.get("index_subfolder", "index")
    if not (model_dir / subfolder / "manifest.json").is_file():
        raise ValueError(
            f"{model_dir} has no index in {subfolder}/; build one before pushing "
            f"(`npm-hf build-index --model {model_dir} --corpus FILE`), or users get a model that cannot answer."
        )
    check_file_sizes(model_dir, subfolder)  # before anything is created or changed
    update_model_card(model_dir, model_id=repo_id)  # the card's usage snippet now names the repo
    api.create_repo(repo_id, private=private, exist_ok=True)
    ignore = list(IGNORE_PATTERNS)
    if index_repo_id is not None:
        api.create_repo(index_repo_id, repo_type="dataset", private=private, exist_ok=True)
        index_commit = api.upload_folder(repo_id=index_repo_id, repo_type="dataset",
                                         folder_path=str(model_dir / subfolder), path_in_repo=subfolder,
                                         commit_message=f"{commit_message} (index)", ignore_patterns=IGNORE_PATTERNS)
        update_config_file(model_dir, {"index_repo_id": index_repo_id, "index_revision": index_commit.oid})
        ignore += [subfolder, f"{subfolder}/*"]
    return api.upload_folder(repo_id=repo_id, folder_path=str(model_dir), revision=revision, create_pr=create_pr,
                             commit_message=commit_message, ignore_patterns=ignore)


def check_file_sizes(model_dir, subfolder: str = "index") -> None:
    """Raise ValueError, naming the file and the fix, if a file to upload exceeds the Hub's per-file limit."""
    model_dir = Path(model_dir)
    files = [path.relative_to(model_dir).as_posix() for path in model_dir.rglob("*") if path.is_file()]
    for name in filter_repo_objects(files, ignore_patterns=IGNORE_PATTERNS):
        size = (model_dir / name).stat().st_size
        if size <= HUB_MAX_FILE_BYTES:
            continue
        if name.startswith(f"{subfolder}/"):
            fix = ("rebuild the index with a smaller max_shard_size, e.g. IndexBuildArguments(max_shard_size='10GB') "
                   "(CLI: npm-hf build-index --max-shard-size 10GB), which splits the vectors into shards")
        else:
            fix = "save it in smaller shards (e.g. model.save_pretrained(dir, max_shard_size='10GB'))"
        raise ValueError(f"{model_dir / name} is {size} bytes, above the Hub's per-file limit of "
                         f"{HUB_MAX_FILE_BYTES} bytes (50 GB); {fix}. Nothing was uploaded.")


def update_config_file(model_dir, fields) -> dict:
    """Set `fields` in `model_dir`/config.json (a dict, or a function of the current config that returns one),
    atomically: a temporary file renamed over it. Returns the new config."""
    path = Path(model_dir) / "config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    config.update(fields(config) if callable(fields) else fields)
    staging = path.with_name(f".config.json.tmp-{uuid.uuid4().hex[:8]}")
    staging.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(staging, path)
    return config
