"""Hub round trip, offline: uploads against a mocked HfApi, downloads through a fake local Hub cache."""

import json
import os
import shutil
import subprocess
import sys
from types import SimpleNamespace
from unittest import mock

import numpy as np
import pytest
from huggingface_hub.utils import filter_repo_objects

import npm_hf
from npm_hf import NPMIndex
from npm_hf.hub_cards import HUB_MAX_FILE_BYTES, push_to_hub, upload_plan


# Every file of a saved NPM's remote code, listed by hand so that a module added to npm_hf.inference (which then
# travels with every saved model) is a deliberate change of this list.
REMOTE_CODE = {"configuration_npm.py", "modeling_npm.py", "pipeline.py", "retrieval.py", "spans.py", "prefilter.py",
               "reader.py", "faiss_io.py", "vector_shards.py", "index_files.py", "stopwords.py", "tokens.py",
               "decoding.py", "directory_swap.py", "validation.py", "segments.py", "compact_tokens.py",
               "vector_codes.py", "passage_vectors.py", "bm25_vocabulary.py"}


SHA = "0123456789abcdef0123456789abcdef01234567"
INDEX_SHA = "fedcba9876543210fedcba9876543210fedcba98"


@pytest.fixture
def model_copy(tmp_path, npm_dir):
    folder = tmp_path / "npm"
    shutil.copytree(npm_dir, folder)
    (folder / "training_args.bin").write_bytes(b"pickle")  # what Trainer leaves behind: never uploaded
    (folder / "checkpoint-2").mkdir()
    (folder / "checkpoint-2" / "model.safetensors").write_bytes(b"x")
    return folder


def uploaded_files(call) -> set[str]:
    folder = call.kwargs["folder_path"]
    files = [os.path.relpath(os.path.join(root, name), folder).replace(os.sep, "/")
             for root, _, names in os.walk(folder) for name in names]
    prefix = call.kwargs.get("path_in_repo") or ""
    kept = filter_repo_objects(files, allow_patterns=call.kwargs.get("allow_patterns"),
                               ignore_patterns=call.kwargs.get("ignore_patterns"))
    return {f"{prefix}/{name}" if prefix else name for name in kept}


def fake_api():
    """An HfApi whose upload_folder, like the real one, appends its default ignore patterns to the list it is given,
    in place."""
    def upload_folder(**kwargs):
        if kwargs.get("ignore_patterns") is not None:
            kwargs["ignore_patterns"] += [".git", ".git/*", "*/.git", "**/.git/**"]
        return SimpleNamespace(oid=INDEX_SHA if kwargs.get("repo_type") == "dataset" else SHA,
                               commit_url="https://hf.co/commit")

    api = mock.MagicMock()
    api.upload_folder.side_effect = upload_folder
    return api


def test_push_uploads_weights_code_card_and_index_in_one_commit(model_copy):
    api = fake_api()
    push_to_hub(model_copy, "org/npm-tiny", private=True, revision="dev", create_pr=True, api=api)
    api.create_repo.assert_called_once_with("org/npm-tiny", private=True, exist_ok=True)
    (call,) = api.upload_folder.call_args_list
    assert (call.kwargs["repo_id"], call.kwargs["revision"], call.kwargs["create_pr"]) == ("org/npm-tiny", "dev", True)
    index_files = {f"index/{name}" for name in os.listdir(model_copy / "index")}
    remote_code = REMOTE_CODE
    expected = {"config.json", "decoding_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                "README.md", "npm_card.json"} | remote_code | index_files
    assert uploaded_files(call) == expected
    assert 'model="org/npm-tiny"' in (model_copy / "README.md").read_text()


def test_large_index_goes_to_a_pinned_dataset_repo(model_copy):
    api = fake_api()
    push_to_hub(model_copy, "org/npm-tiny", index_repo_id="org/npm-tiny-index", api=api)
    index_call, model_call = api.upload_folder.call_args_list
    assert (index_call.kwargs["repo_id"], index_call.kwargs["repo_type"]) == ("org/npm-tiny-index", "dataset")
    assert uploaded_files(index_call) == {f"index/{name}" for name in os.listdir(model_copy / "index")}
    assert not [name for name in uploaded_files(model_call) if name.startswith("index/")]
    config = json.loads((model_copy / "config.json").read_text())
    assert (config["index_repo_id"], config["index_revision"]) == ("org/npm-tiny-index", INDEX_SHA)


@pytest.fixture
def sharded_copy(model_copy, corpus):
    """The model copy with its index rebuilt in vector shards of at most 1000 bytes, and an IVF index whose lists
    are merged on disk (index.ivfdata)."""
    npm_hf.build_index(model_copy, corpus, args=npm_hf.IndexBuildArguments(
        block_size=16, max_shard_size=1000, overwrite=True, show_progress_bar=False, faiss_factory="IVF2,Flat"))
    return model_copy


def _shards(folder):
    return {name for name in os.listdir(folder / "index") if name.startswith("vectors-")}


@pytest.mark.parametrize("index_repo_id", [None, "org/npm-tiny-index"])
def test_push_uploads_every_vector_shard(sharded_copy, index_repo_id):
    api = fake_api()
    push_to_hub(sharded_copy, "org/npm-tiny", index_repo_id=index_repo_id, api=api)
    shards = _shards(sharded_copy)
    assert len(shards) >= 3
    uploaded = set().union(*(uploaded_files(call) for call in api.upload_folder.call_args_list))
    assert {f"index/{name}" for name in shards} | {"index/index.ivfdata"} <= uploaded
    assert {name for name in uploaded if name.startswith("index/")} == {
        f"index/{name}" for name in os.listdir(sharded_copy / "index")}


def test_download_fetches_every_vector_shard(tmp_path, sharded_copy):
    """NPMIndex.from_pretrained's allow_patterns select every shard of a repo (here: a fake snapshot_download)."""
    repo_files = [p.relative_to(sharded_copy).as_posix() for p in sharded_copy.rglob("*") if p.is_file()]

    def snapshot_download(repo_id, allow_patterns=None, **kwargs):
        snapshot = tmp_path / "snapshot"
        for name in filter_repo_objects(repo_files, allow_patterns=allow_patterns):
            (snapshot / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(sharded_copy / name, snapshot / name)
        return str(snapshot)

    with mock.patch("npm_hf.inference.reader.snapshot_download", snapshot_download):
        index = NPMIndex.from_pretrained("org/npm-tiny", verify="full")
    assert _shards(tmp_path / "snapshot") == _shards(sharded_copy)
    assert len(index.vectors.shards) == len(_shards(sharded_copy))
    queries = np.asarray(index.vectors[:5], dtype=np.float32)  # the IVF lists are read from the snapshot's copy
    np.testing.assert_array_equal(index.search(queries, 3, nprobe=2)[1],
                                  NPMIndex.load(sharded_copy / "index").search(queries, 3, nprobe=2)[1])


@pytest.mark.parametrize("name, advice", [("index/vectors.npy", "smaller max_shard_size"),
                                          ("model.safetensors", r"save_pretrained\(dir, max_shard_size")])
def test_files_above_the_hub_limit_are_refused_before_any_upload(model_copy, name, advice):
    readme = (model_copy / "README.md").read_text()
    with open(model_copy / name, "wb") as handle:
        handle.truncate(HUB_MAX_FILE_BYTES + 1)  # sparse: no disk space taken
    api = fake_api()
    with pytest.raises(ValueError, match=rf"{name} is {HUB_MAX_FILE_BYTES + 1} bytes, above the Hub's per-file "
                                         rf"limit of {HUB_MAX_FILE_BYTES} bytes \(50 GB\); .*{advice}"):
        push_to_hub(model_copy, "org/npm-tiny", api=api)
    assert not api.create_repo.called and not api.upload_folder.called
    assert (model_copy / "README.md").read_text() == readme
    (model_copy / "checkpoint-2" / "huge.bin").write_bytes(b"")
    os.truncate(model_copy / "checkpoint-2" / "huge.bin", HUB_MAX_FILE_BYTES + 1)
    os.truncate(model_copy / name, HUB_MAX_FILE_BYTES)  # at the limit, and a big file that is never uploaded
    push_to_hub(model_copy, "org/npm-tiny", api=api)
    assert api.upload_folder.called


def test_push_without_index_is_refused(model_copy):
    shutil.rmtree(model_copy / "index")
    with pytest.raises(ValueError, match="has no index in index/; build one"):
        push_to_hub(model_copy, "org/npm-tiny", api=fake_api())


def _fake_cache(cache, repo_type, repo_id, sha, source):
    root = cache / f"{repo_type}s--{repo_id.replace('/', '--')}"
    shutil.copytree(source, root / "snapshots" / sha)
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(sha)
    return root / "snapshots" / sha


def test_pull_from_a_dataset_repo_named_in_the_config(tmp_path, model_copy, mask):
    """A model repo without index whose config pins a dataset repo: the pipeline pulls that index, offline."""
    push_to_hub(model_copy, "org/npm-tiny", index_repo_id="org/npm-tiny-index", api=fake_api())
    index_source = tmp_path / "index-repo"
    shutil.copytree(model_copy / "index", index_source / "index")
    shutil.rmtree(model_copy / "index")
    cache = tmp_path / "hub"
    _fake_cache(cache, "model", "org/npm-tiny", SHA, model_copy)
    _fake_cache(cache, "dataset", "org/npm-tiny-index", INDEX_SHA, index_source)
    script = (
        "import json, npm_hf\n"
        "from transformers import pipeline\n"
        "fill = pipeline('fill-mask', model='org/npm-tiny')\n"
        f"print(json.dumps([str(fill.index.path), fill({f'Texas borders {mask}.'!r}, top_k=1)]))\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache)}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    path, answers = json.loads(result.stdout.strip().splitlines()[-1])
    assert f"datasets--org--npm-tiny-index/snapshots/{INDEX_SHA}/index" in path and len(answers) == 1


def test_cli_push(model_copy, capsys):
    from npm_hf.cli import main

    api = fake_api()
    with mock.patch("npm_hf.hub_cards.hub.HfApi", return_value=api):
        assert main(["push", "--model", str(model_copy), "--repo-id", "org/npm-tiny", "--private"]) == 0
    api.create_repo.assert_called_once_with("org/npm-tiny", private=True, exist_ok=True)
    assert "Pushed" in capsys.readouterr().out


# What a careless folder holds beside the model: none of it may reach the Hub.
SECRETS = {"credentials.yaml": b"aws_secret: x", "id_rsa": b"-----BEGIN OPENSSH PRIVATE KEY-----",
           "secrets.json": b"{}", "notes/hf_token.txt": b"hf_xxx", "logs/train.log": b"step 1",
           "wandb/run-1/files/config.yaml": b"key: x", "model.pkl": b"pickle", "optimizer.pt": b"pt",
           "scheduler.pt": b"pt", "index/notes.txt": b"not in the manifest", "helper.py": b"import os"}


@pytest.fixture
def cluttered_copy(model_copy, tmp_path):
    for name, content in SECRETS.items():
        (model_copy / name).parent.mkdir(parents=True, exist_ok=True)
        (model_copy / name).write_bytes(content)
    return model_copy


def _expected_model_files(folder):
    remote_code = REMOTE_CODE
    manifest = json.loads((folder / "index" / "manifest.json").read_text())
    return ({"config.json", "decoding_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
             "README.md", "npm_card.json"} | remote_code,
            {"index/manifest.json"} | {f"index/{name}" for name in manifest["files"]})


@pytest.mark.parametrize("index_repo_id", [None, "org/npm-tiny-index"])
def test_push_uploads_an_allow_list_only(cluttered_copy, index_repo_id):
    model_files, index_files = _expected_model_files(cluttered_copy)
    api = fake_api()
    push_to_hub(cluttered_copy, "org/npm-tiny", index_repo_id=index_repo_id, api=api)
    uploaded = [uploaded_files(call) for call in api.upload_folder.call_args_list]
    if index_repo_id is None:
        assert uploaded == [model_files | index_files]
    else:
        assert uploaded == [index_files, model_files]
    assert not set().union(*uploaded) & {*SECRETS, "training_args.bin", "checkpoint-2/model.safetensors"}


def test_npm_hf_push_lists_the_same_files_in_a_dry_run_and_changes_nothing(cluttered_copy, tmp_path):
    """npm_hf.push_to_hub(dry_run=True) on a folder without remote code yet: the list includes the code the real
    push copies in, the folder stays as it was, and the real push then uploads exactly that list."""
    for name in ["pipeline.py", "retrieval.py", "reader.py"]:
        (cluttered_copy / name).unlink()
    before = {p: p.read_bytes() for p in cluttered_copy.rglob("*") if p.is_file()}
    api = fake_api()
    with mock.patch("npm_hf.hub_cards.hub.HfApi", return_value=api):
        plan = npm_hf.push_to_hub(cluttered_copy, "org/npm-tiny", dry_run=True)
    assert {p: p.read_bytes() for p in cluttered_copy.rglob("*") if p.is_file()} == before
    assert not api.method_calls
    model_files, index_files = _expected_model_files(cluttered_copy)
    assert list(plan) == ["org/npm-tiny"] and plan["org/npm-tiny"] == sorted(model_files | index_files)
    npm_hf.push_to_hub(cluttered_copy, "org/npm-tiny", api=api)
    (call,) = api.upload_folder.call_args_list
    assert uploaded_files(call) == set(plan["org/npm-tiny"])


def test_upload_plan_is_the_same_after_pushes_with_an_index_repo(model_copy):
    """upload_folder appends to the pattern lists it is given: nothing of ours is shared between calls."""
    first = upload_plan(model_copy, separate_index=True)
    for _ in range(2):
        api = fake_api()
        push_to_hub(model_copy, "org/npm-tiny", index_repo_id="org/npm-tiny-index", api=api)
        assert [uploaded_files(call) for call in api.upload_folder.call_args_list] == [
            set(first["index"]), set(first["model"])]
    assert upload_plan(model_copy, separate_index=True) == first


@pytest.mark.parametrize("link", ["optimizer.pt", "tokenizer.json", "index/documents.jsonl", "index"])
def test_symlinks_out_of_the_folder_are_refused(model_copy, tmp_path, link):
    outside = tmp_path / "outside"
    if link == "index":
        shutil.move(str(model_copy / "index"), str(outside))
    else:
        outside.write_bytes(b"secret")
        (model_copy / link).unlink(missing_ok=True)
    os.symlink(outside, model_copy / link)
    api = fake_api()
    if link == "optimizer.pt":  # not on the allow-list: never read, the push goes on
        push_to_hub(model_copy, "org/npm-tiny", api=api)
        assert "optimizer.pt" not in uploaded_files(api.upload_folder.call_args)
        return
    with pytest.raises(ValueError, match=rf"{link}.* is a symlink to {outside}.*, outside .*nothing was uploaded"):
        push_to_hub(model_copy, "org/npm-tiny", api=api)
    assert not api.method_calls


def test_symlinks_inside_the_folder_are_uploaded(model_copy):
    (model_copy / "tokenizer_config.json").rename(model_copy / "tok.json")
    os.symlink("tok.json", model_copy / "tokenizer_config.json")
    assert "tokenizer_config.json" in upload_plan(model_copy)["model"]


@pytest.mark.parametrize("name", ["../../config.json", "/etc/passwd", "sub/x.npy", ".."])
def test_push_refuses_a_manifest_naming_paths(model_copy, name):
    manifest_path = model_copy / "index" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["files"][name] = {"bytes": 1, "sha256": "0" * 64}
    manifest_path.write_text(json.dumps(manifest))
    api = fake_api()
    with pytest.raises(ValueError, match=r"lists files \[.*\] that are not plain names inside the index"):
        push_to_hub(model_copy, "org/npm-tiny", api=api)
    assert not api.method_calls


def test_cli_push_dry_run(cluttered_copy, capsys):
    from npm_hf.cli import main

    api = fake_api()
    with mock.patch("npm_hf.hub_cards.hub.HfApi", return_value=api):
        assert main(["push", "--model", str(cluttered_copy), "--repo-id", "org/npm-tiny", "--dry-run",
                     "--index-repo-id", "org/npm-tiny-index"]) == 0
    assert not api.method_calls
    out = capsys.readouterr().out.splitlines()
    model_files, index_files = _expected_model_files(cluttered_copy)
    assert out[0] == f"Would upload {len(model_files)} files to org/npm-tiny:"
    assert out[1 : 1 + len(model_files)] == [f"  {name}" for name in sorted(model_files)]
    assert out[1 + len(model_files)] == f"Would upload {len(index_files)} files to org/npm-tiny-index:"
    assert out[-1] == "Nothing was uploaded (--dry-run)."
    assert not any(secret in line for line in out for secret in SECRETS)
