"""Model cards built from data: convert, index build, training and evaluation facts; user edits survive."""

import json
import logging
import re
import shutil

import pytest
from huggingface_hub import ModelCard

import npm_hf
from npm_hf import IndexBuildArguments, NPMIndex, NPMModel, NPMTrainer, NPMTrainingArguments, prepare_training_blocks
from npm_hf.hub_cards import update_model_card
from npm_hf.index import top1_agreement


def test_card_follows_convert_and_index_build(tmp_path, encoder_dir, corpus):
    model_dir = tmp_path / "npm"
    npm_hf.convert_encoder(str(encoder_dir), model_dir)
    card = ModelCard.load(model_dir / "README.md")
    header = card.data.to_dict()
    assert header["library_name"] == "transformers" and header["pipeline_tag"] == "fill-mask"
    assert "npm" in header["tags"] and "base_model" not in header  # a local path is no Hub id: text only
    assert f"Encoder initialised from `{encoder_dir}`" in card.text
    assert "No index was built yet" in card.text
    npm_hf.build_index(model_dir, corpus, args=IndexBuildArguments(block_size=32, show_progress_bar=False))
    text = (model_dir / "README.md").read_text()
    assert "| 5 | " in text and "Flat (inner product)" in text and "No index was built yet" not in text
    snippet = re.search(r"```python\n(.*?)```", text, flags=re.S).group(1)
    namespace = {}
    exec(snippet, namespace)  # the usage snippet runs as written
    example = re.search(r'fill\("(.*?)"', snippet).group(1)
    answers = namespace["fill"](example, top_k=3)
    assert len(answers) == 3 and answers[0]["evidence"]["doc_id"]


def test_existing_readme_is_updated_not_overwritten(tmp_path):
    (tmp_path / "README.md").write_text("---\nlicense: mit\ntags:\n- mine\n---\n# My model\n\nHand-written intro.\n")
    assert update_model_card(tmp_path, model_id="org/x", mode="single")
    assert update_model_card(tmp_path, eval_results=[{"task": "sst2", "dataset": "sst2", "metric": "accuracy",
                                                      "value": 0.61}])
    card = ModelCard.load(tmp_path / "README.md")
    assert card.data.license == "mit" and {"mine", "npm"} <= set(card.data.tags)
    assert card.text.startswith("# My model\n\nHand-written intro.")
    assert card.text.count("<!-- npm-hf:start -->") == 1 and "NPM-single" in card.text
    assert card.data.eval_results[0].metric_value == 0.61 and "| sst2 | sst2 | accuracy | 0.61 |" in card.text


def test_base_model_metadata_only_for_hub_repo_ids(tmp_path):
    assert update_model_card(tmp_path, base_model="sentence-transformers/all-MiniLM-L6-v2")
    assert ModelCard.load(tmp_path / "README.md").data.base_model == "sentence-transformers/all-MiniLM-L6-v2"
    for number, local in enumerate((str(tmp_path), "./encoder", "~/models/encoder", "a/b/c")):
        folder = tmp_path / str(number)
        folder.mkdir()
        assert update_model_card(folder, base_model=local)
        card = ModelCard.load(folder / "README.md")
        assert card.data.base_model is None and f"Encoder initialised from `{local}`" in card.text


def test_baselines_are_shown_beside_but_not_in_the_model_index(tmp_path):
    ours = {"task": "held-out cloze", "dataset": "demo corpus", "metric": "exact match@1", "value": 29.2}
    theirs = {**ours, "value": 5.2, "model": "lexical baseline"}
    assert update_model_card(tmp_path, model_id="org/demo", eval_results=[ours], baselines=[theirs])
    card = ModelCard.load(tmp_path / "README.md")
    assert [result.metric_value for result in card.data.eval_results] == [29.2]
    assert "| lexical baseline | held-out cloze | demo corpus | exact match@1 | 5.2 |" in card.text
    assert card.text.index("## Evaluation") < card.text.index("### Baselines on the same data")


def test_card_problems_are_logged_not_raised(tmp_path, caplog):
    (tmp_path / "npm_card.json").write_text("{broken")
    with caplog.at_level(logging.WARNING):
        assert update_model_card(tmp_path, mode="span") is False
    assert any("Could not write the model card" in record.getMessage() for record in caplog.records)
    assert not (tmp_path / "README.md").exists()


def test_training_writes_its_section(tmp_path, encoder_dir, corpus):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(encoder_dir)
    blocks = prepare_training_blocks(corpus * 4, tokenizer, block_size=16, group_size=2)
    args = NPMTrainingArguments(output_dir=str(tmp_path / "out"), max_steps=2, per_device_train_batch_size=2,
                                logging_steps=1, learning_rate=1e-3, use_cpu=True, report_to="none",
                                save_strategy="no", disable_tqdm=True)
    NPMTrainer(model=NPMModel.from_encoder(str(encoder_dir)), args=args, train_dataset=blocks,
               processing_class=tokenizer).train()
    text = (tmp_path / "out" / "README.md").read_text()
    assert "for 2 steps" in text and "Training loss:" in text and "| learning_rate | 0.001 |" in text
    facts = json.loads((tmp_path / "out" / "npm_card.json").read_text())
    assert facts["training"]["steps"] == 2 and facts["base_model"] == str(encoder_dir)


def test_time_budgeted_training_shows_its_budget_and_the_tokenizers_mask(tmp_path, encoder_dir, corpus,
                                                                          monkeypatch):
    from transformers import AutoTokenizer

    clock = iter(range(0, 10_000, 30))  # every reading of the clock is 30 s after the previous one
    monkeypatch.setattr("npm_hf.trainer.trainer.time.perf_counter", lambda: float(next(clock)))
    tokenizer = AutoTokenizer.from_pretrained(encoder_dir)
    blocks = prepare_training_blocks(corpus * 4, tokenizer, block_size=16, group_size=2)
    args = NPMTrainingArguments(output_dir=str(tmp_path / "out"), max_steps=1_000_000, max_train_minutes=1.0,
                                per_device_train_batch_size=2, use_cpu=True, report_to="none", save_strategy="no",
                                disable_tqdm=True)
    NPMTrainer(model=NPMModel.from_encoder(str(encoder_dir)), args=args, train_dataset=blocks,
               processing_class=tokenizer).train()
    text = (tmp_path / "out" / "README.md").read_text()
    assert "| max_train_minutes | 1.0 |" in text and "max_steps" not in text and "1000000" not in text
    assert f'fill("Hagios Demetrios is located in {tokenizer.mask_token}.", top_k=3)' in text
    assert ("[MASK]" if "bert-encoder" in encoder_dir.name else "<mask>") == tokenizer.mask_token


def test_card_shows_the_decoding_settings_and_the_tokenizers_mask(tmp_path, encoder_dir):
    npm_hf.convert_encoder(str(encoder_dir), tmp_path / "npm", k=1024, prefilter="bm25")
    (tmp_path / "npm" / "npm_card.json").unlink()  # no recorded example: the tokenizer's mask token is read
    assert update_model_card(tmp_path / "npm", mode="span")
    text = (tmp_path / "npm" / "README.md").read_text()
    decoding = json.loads((tmp_path / "npm" / "decoding_config.json").read_text())
    assert "## Decoding" in text and "| k | 1024 |" in text and "| prefilter | bm25 |" in text
    assert all(f"| {name} |" in text for name in decoding)
    mask = "[MASK]" if "bert-encoder" in encoder_dir.name else "<mask>"
    assert f'fill("Hagios Demetrios is located in {mask}.", top_k=3)' in text
    assert "decoding" not in json.loads((tmp_path / "npm" / "npm_card.json").read_text())  # read, not copied


def test_card_reports_exact_search_or_the_measured_agreement(tmp_path, npm_dir, corpus):
    shutil.copytree(npm_dir, tmp_path / "npm", ignore=shutil.ignore_patterns("index"))
    npm_hf.build_index(tmp_path / "npm", corpus, args=IndexBuildArguments(block_size=16, show_progress_bar=False))
    index = NPMIndex.load(tmp_path / "npm" / "index")
    m = index.manifest
    per_token = round(sum(entry["bytes"] for entry in m.files.values()) / m.num_indexed_tokens, 1)
    row = (f"| {m.num_documents} | {m.num_tokens} | {m.num_indexed_tokens} | 16 | Flat (inner product) | exact | "
           f"{per_token} |")
    assert row in (tmp_path / "npm" / "README.md").read_text() and top1_agreement(index) is None
    npm_hf.build_index(tmp_path / "npm", corpus, args=IndexBuildArguments(block_size=16, faiss_factory="HNSW8",
                                                                          overwrite=True, show_progress_bar=False))
    text = (tmp_path / "npm" / "README.md").read_text()
    # k=4096 candidates cover all of this tiny index's vectors: the re-scored top-1 is always exact search's
    assert ("| HNSW8 (inner product) | approximate, top-1 agreement with exact search 1.0 (64 stored vectors as "
            "queries, k=4096) |") in text
    facts = json.loads((tmp_path / "npm" / "npm_card.json").read_text())["index"]
    assert facts["faiss_factory"] == "HNSW8" and facts["top1_agreement"] == 1.0
    index = NPMIndex.load(tmp_path / "npm" / "index")
    assert top1_agreement(index, num_queries=200, k=1)["agreement_measured_on"] == \
        f"{index.num_indexed} stored vectors as queries, k=1"
    with pytest.raises(ValueError, match="num_queries and k must be >= 1"):
        top1_agreement(index, k=0)


@pytest.mark.parametrize("same_folder", [True, False])
def test_train_keeps_the_training_facts_in_the_saved_card(tmp_path, encoder_dir, corpus, same_folder):
    """npm_hf.train saves through the save hook into a staging folder: its card must not replace the run's."""
    from npm_hf.api import TrainDataArguments, train

    (tmp_path / "corpus.txt").write_text("\n".join(doc["text"] for doc in corpus * 4) + "\n", encoding="utf-8")
    output = tmp_path / "npm"
    data = TrainDataArguments(model=str(encoder_dir), corpus=str(tmp_path / "corpus.txt"), output=str(output),
                              block_size=16, group_size=2)
    args = NPMTrainingArguments(output_dir=str(output if same_folder else tmp_path / "work"), max_steps=2,
                                per_device_train_batch_size=2, logging_steps=1, use_cpu=True, report_to="none",
                                save_strategy="no", disable_tqdm=True)
    train(data, args)
    facts = json.loads((output / "npm_card.json").read_text())
    assert facts["training"]["steps"] == 2 and facts["base_model"] == str(encoder_dir)
    assert facts["model_id"] in (str(output), output.name) and ".tmp" not in json.dumps(facts)
    text = (output / "README.md").read_text()
    assert "for 2 steps" in text and "## Decoding" in text
