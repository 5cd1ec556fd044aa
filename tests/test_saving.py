"""save_pretrained, Trainer.save_model and push_to_hub write a complete NPM directory (npm_hf.saving): the remote
pipeline code and decoding_config.json always, the index when one is attached or given, and the card."""

import json
import logging
import os
import shutil
from pathlib import Path
from unittest import mock

import pytest
import torch
from transformers import AutoTokenizer, pipeline

from npm_hf import (IndexMismatchError, NonparametricFillMaskPipeline, NPMIndex, NPMModel, NPMTrainer,
                    NPMTrainingArguments, prepare_training_blocks)
from npm_hf.hub_cards import load_card_facts, update_model_card
from npm_hf.remote_code import remote_code_files


MODEL_FILES = {"config.json", "model.safetensors", "decoding_config.json", "README.md", "npm_card.json",
               "configuration_npm.py", "modeling_npm.py"}
TOKENIZER_FILES = {"tokenizer.json", "tokenizer_config.json"}
TRAINER_FILES = {"training_args.bin"}  # Trainer.save_model's own (never uploaded: not in hub_cards.upload_plan)


def index_files(npm_dir) -> set[str]:
    return set(os.listdir(npm_dir / "index"))


def assert_complete(folder: Path, npm_dir, with_index: bool) -> None:
    files = set(os.listdir(folder)) - TOKENIZER_FILES - TRAINER_FILES
    assert files == MODEL_FILES | set(remote_code_files()) | ({"index"} if with_index else set())
    config = json.loads((folder / "config.json").read_text())
    assert config["custom_pipelines"]["fill-mask"]["impl"] == "pipeline.NonparametricFillMaskPipeline"
    assert json.loads((folder / "decoding_config.json").read_text()) == \
        json.loads((npm_dir / "decoding_config.json").read_text())  # the model's own settings (k=4096) travel
    if with_index:
        assert set(os.listdir(folder / "index")) == index_files(npm_dir)
        for name in index_files(npm_dir):  # the same bytes: hard links on one file system
            assert (folder / "index" / name).read_bytes() == (npm_dir / "index" / name).read_bytes()


def answers(folder, text):
    return [(a["phrase"], round(a["score"], 6)) for a in pipeline("fill-mask", model=str(folder))(text, top_k=3)]


def test_save_pretrained_always_writes_remote_code_and_decoding(tmp_path, npm_dir):
    NPMModel.from_pretrained(npm_dir).save_pretrained(tmp_path / "plain")
    assert_complete(tmp_path / "plain", npm_dir, with_index=False)


@pytest.mark.parametrize("how", ["attached", "argument"])
def test_save_pretrained_carries_the_index(tmp_path, npm_dir, mask, how):
    model = NPMModel.from_pretrained(npm_dir)
    index = NPMIndex.load(npm_dir / "index")
    if how == "attached":
        model.index = index
        model.save_pretrained(tmp_path / "copy")
    else:
        model.save_pretrained(tmp_path / "copy", index=index)
    AutoTokenizer.from_pretrained(npm_dir).save_pretrained(tmp_path / "copy")
    assert_complete(tmp_path / "copy", npm_dir, with_index=True)
    assert os.stat(tmp_path / "copy" / "index" / "vectors.npy").st_ino == os.stat(npm_dir / "index" /
                                                                                 "vectors.npy").st_ino
    text = f"The Rio Grande flows through {mask} and Texas."
    assert answers(tmp_path / "copy", text) == answers(npm_dir, text)
    card = (tmp_path / "copy" / "README.md").read_text()
    m = index.manifest
    assert f"| {m.num_documents} | {m.num_tokens} | {m.num_indexed_tokens} | 16 |" in card  # the saved index's facts
    assert f"located in {mask}." in card


def test_an_index_of_other_weights_is_not_saved(tmp_path, npm_dir, caplog):
    model = NPMModel.from_pretrained(npm_dir)
    with torch.no_grad():
        model.encoder.get_input_embeddings().weight[5] += 1.0
    model.index = NPMIndex.load(npm_dir / "index")
    with caplog.at_level(logging.WARNING):
        model.save_pretrained(tmp_path / "stale")
    assert "not saved with it" in caplog.text and "different encoder weights" in caplog.text
    assert_complete(tmp_path / "stale", npm_dir, with_index=False)
    with pytest.raises(IndexMismatchError, match="different encoder weights"):
        model.save_pretrained(tmp_path / "given", index=NPMIndex.load(npm_dir / "index"))
    assert not (tmp_path / "given").exists()  # refused before anything was written
    api, commits, patches = _fake_hub()
    with patches[0], patches[1], pytest.raises(IndexMismatchError, match="different encoder weights"):
        model.push_to_hub("org/npm-tiny", index=NPMIndex.load(npm_dir / "index"))
    assert not commits and not api.create_repo.called


def test_trainer_save_model_writes_a_complete_npm(tmp_path, npm_dir, corpus, mask):
    tokenizer = AutoTokenizer.from_pretrained(npm_dir)
    blocks = prepare_training_blocks([doc["text"] for doc in corpus] * 4, tokenizer, block_size=16, group_size=2)
    args = NPMTrainingArguments(output_dir=str(tmp_path / "out"), per_device_train_batch_size=2, use_cpu=True,
                                report_to="none", save_strategy="no", disable_tqdm=True, seed=0, max_steps=2,
                                learning_rate=1e-2)
    model = NPMModel.from_pretrained(npm_dir)
    model.index = NPMIndex.load(npm_dir / "index")
    trainer = NPMTrainer(model=model, args=args, train_dataset=blocks, processing_class=tokenizer)
    trainer.save_model(str(tmp_path / "before"))  # the weights the index was built with: the index travels
    assert_complete(tmp_path / "before", npm_dir, with_index=True)
    fill = pipeline("fill-mask", model=str(tmp_path / "before"))
    assert type(fill) is NonparametricFillMaskPipeline and fill(f"Texas borders {mask}.")[0]["evidence"]
    trainer.train()
    trainer.save_model(str(tmp_path / "after"))  # trained: the attached index is stale, everything else is there
    assert_complete(tmp_path / "after", npm_dir, with_index=False)
    assert set(os.listdir(tmp_path / "after")) >= TOKENIZER_FILES


def _fake_hub():
    """transformers' Hub client, mocked: records each commit's files (path in repo -> bytes) while they exist."""
    api, commits = mock.MagicMock(), []
    api.create_repo.side_effect = lambda repo_id, **kwargs: mock.Mock(repo_id=repo_id)

    def create_commit(repo_id, operations, **kwargs):
        commits.append({"repo_id": repo_id, **kwargs, "files": {
            op.path_in_repo.replace(os.sep, "/"): Path(op.path_or_fileobj).read_bytes() for op in operations}})
        return mock.Mock(oid="0" * 40)

    api.create_commit.side_effect = create_commit
    patches = [mock.patch("transformers.utils.hub.hf_api", return_value=api),
               mock.patch("npm_hf.modeling.modeling_npm.hf_api", return_value=api)]
    return api, commits, patches


def test_push_to_hub_uploads_the_complete_directory(npm_dir, mask):
    model = NPMModel.from_pretrained(npm_dir)
    model.index = NPMIndex.load(npm_dir / "index")
    api, commits, patches = _fake_hub()
    with patches[0], patches[1]:
        model.push_to_hub("org/npm-tiny", private=True, commit_message="Upload NPM", create_pr=True)
    api.create_repo.assert_called_once_with("org/npm-tiny", private=True, token=None, exist_ok=True)
    (commit,) = commits
    assert (commit["repo_id"], commit["commit_message"], commit["create_pr"]) == ("org/npm-tiny", "Upload NPM", True)
    assert set(commit["files"]) == MODEL_FILES | set(remote_code_files()) | {f"index/{n}" for n in index_files(npm_dir)}
    assert commit["files"]["index/vectors.npy"] == (npm_dir / "index" / "vectors.npy").read_bytes()
    card = commit["files"]["README.md"].decode()
    assert 'model="org/npm-tiny"' in card and "# org/npm-tiny" in card  # our card, not transformers' blank one
    with pytest.raises(TypeError, match="does not take \\['tags_typo'\\]"):
        model.push_to_hub("org/npm-tiny", tags_typo=["x"])


def test_save_pretrained_with_push_to_hub_uploads_the_hooks_files_too(tmp_path, npm_dir):
    model = NPMModel.from_pretrained(npm_dir)
    api, commits, patches = _fake_hub()
    with patches[0], patches[1]:
        model.save_pretrained(tmp_path / "npm-tiny", push_to_hub=True, repo_id="org/npm-tiny")
    (commit,) = commits
    assert commit["repo_id"] == "org/npm-tiny"
    assert set(commit["files"]) == MODEL_FILES | set(remote_code_files())
    assert 'model="org/npm-tiny"' in commit["files"]["README.md"].decode()


def test_a_saved_copy_keeps_the_cards_facts(tmp_path, npm_dir):
    """Base model, evaluation results and example travel from the directory the model was loaded from; the index
    facts are the saved index's (none here), never the source's."""
    shutil.copytree(npm_dir, tmp_path / "source")
    result = {"task": "cloze", "dataset": "demo", "metric": "exact match@1", "value": 31.5}
    assert update_model_card(tmp_path / "source", eval_results=[result])
    source_facts = load_card_facts(tmp_path / "source")
    assert source_facts["index"]["num_documents"] == NPMIndex.load(npm_dir / "index").manifest.num_documents
    NPMModel.from_pretrained(tmp_path / "source").save_pretrained(tmp_path / "copy")
    facts = load_card_facts(tmp_path / "copy")
    assert facts["eval_results"] == [result] and facts["base_model"] == source_facts["base_model"]
    assert facts["example"] == source_facts["example"] and "index" not in facts
    text = (tmp_path / "copy" / "README.md").read_text()
    assert "| cloze | demo | exact match@1 | 31.5 |" in text and "No index was built yet" in text
