"""Pushing an NPM directory (weights, tokenizer, config, remote code, card and index) to the Hugging Face Hub."""

import glob
import json
import os
import uuid
from pathlib import Path

from huggingface_hub import HfApi
from transformers.dynamic_module_utils import get_relative_import_files
from transformers.utils import logging

from .model_card import FACTS_FILE, update_model_card


logger = logging.get_logger(__name__)

# What a push uploads is an allow-list (`upload_plan`): these top-level files when present, the weights
# (*.safetensors and their index), the remote code that config.json names, and the index files its manifest names.
# Everything else (credentials, notes, logs, wandb/, pickles, optimizer states, checkpoints) stays on the machine.
MODEL_FILES = ("config.json", "decoding_config.json", "generation_config.json", "README.md", FACTS_FILE)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.txt", "vocab.json", "merges.txt", "spiece.model", "sentencepiece.bpe.model",
                   "tokenizer.model", "chat_template.jinja")
WEIGHT_SUFFIXES = (".safetensors", ".safetensors.index.json")
INDEX_MANIFEST = "manifest.json"
# The Hub refuses larger files (and recommends under 20 GB); index vectors are sharded below max_shard_size.
HUB_MAX_FILE_BYTES = 50 * 10**9


def push_to_hub(model_dir, repo_id: str, *, private: bool | None = None, revision: str | None = None,
                create_pr: bool = False, token: str | None = None, commit_message: str = "Upload NPM",
                index_repo_id: str | None = None, api: HfApi | None = None, dry_run: bool = False,
                extra_files: tuple[str, ...] = ()):
    """Upload an NPM directory to `repo_id` in one commit: weights, tokenizer, config, remote code, README and the
    index subfolder, chosen by an allow-list (`upload_plan`; nothing else in the folder is sent). With
    `index_repo_id`, the index goes to that dataset repo instead (for very large indexes) and the model's config
    records the dataset repo and the commit it was uploaded at. Returns the model commit info.

    `dry_run=True` uploads and changes nothing and returns what would be uploaded: `{repo_id: [paths]}` (and
    `index_repo_id: [paths]`). `extra_files`: top-level files a caller will add before a real push (the remote code
    `npm_hf.push_to_hub` copies in), listed by a dry run although they are not there yet.
    """
    model_dir = Path(model_dir)
    plan = upload_plan(model_dir, index_repo_id is not None, extra_files=extra_files)
    if dry_run:
        return {repo_id: plan["model"], **({index_repo_id: plan["index"]} if index_repo_id is not None else {})}
    api = api or HfApi(token=token)
    subfolder = plan["subfolder"]
    update_model_card(model_dir, model_id=repo_id)  # the card's usage snippet now names the repo
    api.create_repo(repo_id, private=private, exist_ok=True)
    if index_repo_id is not None:
        api.create_repo(index_repo_id, repo_type="dataset", private=private, exist_ok=True)
        prefix = f"{subfolder}/"
        index_commit = api.upload_folder(repo_id=index_repo_id, repo_type="dataset",
                                         folder_path=str(model_dir / subfolder), path_in_repo=subfolder,
                                         commit_message=f"{commit_message} (index)",
                                         allow_patterns=_exact_patterns(p[len(prefix):] for p in plan["index"]))
        update_config_file(model_dir, {"index_repo_id": index_repo_id, "index_revision": index_commit.oid})
    model_files = upload_plan(model_dir, index_repo_id is not None)["model"]  # README.md now exists
    # a fresh list per call: upload_folder appends its default ignore patterns to the list it is given, in place
    return api.upload_folder(repo_id=repo_id, folder_path=str(model_dir), revision=revision, create_pr=create_pr,
                             commit_message=commit_message, allow_patterns=_exact_patterns(model_files))


def _exact_patterns(paths) -> list[str]:
    """upload_folder's allow_patterns are fnmatch patterns: escape `*?[` so that each matches its own path only."""
    return [glob.escape(path) for path in paths]


def upload_plan(model_dir, separate_index: bool = False, extra_files: tuple[str, ...] = ()) -> dict:
    """What a push of `model_dir` uploads, by an allow-list: `{"model": [paths], "index": [paths], "subfolder": name}`
    with repo paths, sorted ("index" is empty unless `separate_index`, the index then being in no model path).

    Uploaded: config.json, decoding_config.json, generation_config.json, README.md and npm_card.json; the weights
    (top-level *.safetensors and their index json); the tokenizer's files (`TOKENIZER_FILES`); the remote code
    config.json names (auto_map, custom_pipelines) with the modules they import; the index's manifest and the files
    it lists. Raises ValueError, before anything is changed, for a directory that is not an NPM with an index, an
    index file name that is not a plain name, a file to upload that is a symlink leaving the directory, or one above
    the Hub's per-file limit.
    """
    model_dir = Path(model_dir)
    config_path = model_dir / "config.json"
    if not config_path.is_file():
        raise ValueError(f"{model_dir} has no config.json: not a saved NPM directory (see `npm-hf convert`).")
    config = json.loads(config_path.read_text(encoding="utf-8"))
    if config.get("model_type") != "npm":
        raise ValueError(f"{model_dir} is not an NPM directory (config.json model_type {config.get('model_type')!r}).")
    subfolder = config.get("index_subfolder", "index")
    if not isinstance(subfolder, str) or not all(is_plain_file_name(part) for part in subfolder.split("/")):
        raise ValueError(f"config.json's index_subfolder {subfolder!r} is not a relative folder inside {model_dir}; "
                         "set it to a plain name such as 'index'.")
    manifest_path = model_dir / subfolder / INDEX_MANIFEST
    if not manifest_path.is_file():
        raise ValueError(
            f"{model_dir} has no index in {subfolder}/; build one before pushing "
            f"(`npm-hf build-index --model {model_dir} --corpus FILE`), or users get a model that cannot answer."
        )
    top = {name for name in (*MODEL_FILES, *TOKENIZER_FILES) if (model_dir / name).is_file()}
    top |= {path.name for path in model_dir.iterdir() if path.name.endswith(WEIGHT_SUFFIXES) and path.is_file()}
    top |= remote_code_files(model_dir, config)
    top |= set(extra_files)
    top.add("README.md")  # written by the push (update_model_card) when missing
    index = [f"{subfolder}/{name}" for name in [INDEX_MANIFEST, *index_file_names(manifest_path)]]
    for path in sorted(top | set(index)):
        if (model_dir / path).exists() or os.path.islink(model_dir / path):
            check_inside(model_dir, path)
    check_file_sizes(model_dir, [path for path in sorted(top | set(index)) if (model_dir / path).is_file()], subfolder)
    model = sorted(top) if separate_index else sorted(top | set(index))
    return {"model": model, "index": sorted(index) if separate_index else [], "subfolder": subfolder}


def remote_code_files(model_dir: Path, config: dict) -> set[str]:
    """The code files config.json's auto_map and custom_pipelines name, with every module they import relatively
    (what `trust_remote_code=True` downloads), that are in `model_dir`."""
    references = [ref for ref in (config.get("auto_map") or {}).values()]
    references += [entry.get("impl", "") for entry in (config.get("custom_pipelines") or {}).values()]
    names = set()
    for reference in references:
        for item in reference if isinstance(reference, (list, tuple)) else [reference]:
            if isinstance(item, str) and "." in item:
                module = item.split("--")[-1].rsplit(".", 1)[0]  # "repo--module.Class" points at another repo
                if "--" not in item and "/" not in module and "\\" not in module:
                    names.add(f"{module}.py")
    found = set()
    for name in names:
        path = model_dir / name
        if path.is_file():
            found.add(name)
            found |= {Path(other).name for other in get_relative_import_files(str(path))}
    return found


def index_file_names(manifest_path: Path) -> list[str]:
    """The files the index manifest lists; ValueError unless each is a plain file name inside the index."""
    try:
        files = json.loads(manifest_path.read_text(encoding="utf-8")).get("files", {})
    except (ValueError, UnicodeDecodeError, AttributeError) as error:
        raise ValueError(f"{manifest_path} is not a valid index manifest ({error}); rebuild the index.") from None
    bad = [name for name in files if not is_plain_file_name(name)]
    if bad:
        raise ValueError(f"{manifest_path} lists files {bad[:5]} that are not plain names inside the index (a path, "
                         "'..' or absolute): a tampered manifest. Rebuild the index; nothing was uploaded.")
    return sorted(name for name in files if name != INDEX_MANIFEST)


def is_plain_file_name(name) -> bool:
    return (isinstance(name, str) and name not in ("", ".", "..") and "/" not in name and "\\" not in name
            and "\0" not in name and not os.path.isabs(name) and ":" not in name)


def check_inside(model_dir: Path, path: str) -> None:
    """Raise ValueError if `model_dir`/`path` (or a folder on the way) is a symlink that resolves outside
    `model_dir`: its target would be uploaded as if it were part of the model."""
    root = model_dir.resolve()
    target = (model_dir / path).resolve()
    if not target.is_relative_to(root):
        raise ValueError(
            f"{model_dir / path} is a symlink to {target}, outside {model_dir}: refusing to upload a file from "
            "elsewhere on this machine. Copy the file into the directory (or remove the link); nothing was uploaded."
        )


def check_file_sizes(model_dir, files: list[str], subfolder: str = "index") -> None:
    """Raise ValueError, naming the file and the fix, if a file to upload exceeds the Hub's per-file limit."""
    model_dir = Path(model_dir)
    for name in files:
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
