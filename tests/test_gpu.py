"""The same results on a CUDA device as on the CPU: index build, fill-mask, batched queries, evaluation, a training
step. Skipped where no GPU is visible (CI); run on a GPU machine with `pytest tests/test_gpu.py`."""

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

import npm_hf
from npm_hf import EvaluationArguments, NonparametricFillMaskPipeline, NPMIndex, NPMModel


pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_index_built_on_the_gpu_matches_the_cpu(npm_dir, corpus, tmp_path):
    model = NPMModel.from_pretrained(npm_dir).to("cuda")
    tokenizer = AutoTokenizer.from_pretrained(npm_dir)
    gpu = NPMIndex.build(model, tokenizer, corpus, tmp_path / "gpu",
                         npm_hf.IndexBuildArguments(block_size=16, batch_size=3, show_progress_bar=False))
    cpu = NPMIndex.load(npm_dir / "index")
    assert np.array_equal(np.asarray(gpu.token_ids), np.asarray(cpu.token_ids))
    np.testing.assert_allclose(np.asarray(gpu.vectors, dtype=np.float32), np.asarray(cpu.vectors, dtype=np.float32),
                               atol=2e-3)


def test_fill_mask_on_the_gpu_matches_the_cpu(npm_dir, mask):
    texts = [f"Abraham Lincoln was born in {mask}, Kentucky.", f"The Rio Grande flows through {mask} and Texas."]
    cpu, gpu = (NonparametricFillMaskPipeline(model=NPMModel.from_pretrained(npm_dir), device=device,
                                              index=NPMIndex.load(npm_dir / "index"),
                                              tokenizer=AutoTokenizer.from_pretrained(npm_dir))
                for device in ("cpu", "cuda"))
    assert gpu.model.device.type == "cuda" and cpu.model.device.type == "cpu"
    for text in texts:
        want, got = cpu(text, top_k=5), gpu(text, top_k=5)
        assert [a["token_str"] for a in got] == [a["token_str"] for a in want]
        assert [a["score"] for a in got] == pytest.approx([a["score"] for a in want], abs=1e-4)
    batched = gpu(texts, top_k=5, batch_size=2)
    assert [[a["token_str"] for a in answers] for answers in batched] == \
        [[a["token_str"] for a in cpu(text, top_k=5)] for text in texts]


def test_evaluation_on_the_gpu_matches_the_cpu(npm_dir, tmp_path):
    data = tmp_path / "sst.txt"
    data.write_text("0 a dull , boring film .\n1 a great film .\n1 texas is great .\n0 kentucky was terrible .\n")
    results = {device: npm_hf.evaluate(str(npm_dir), EvaluationArguments(task="sst2", data=str(data), device=device,
                                                                         show_progress_bar=False))
               for device in ("cpu", "cuda")}
    assert results["cuda"]["predictions"] == results["cpu"]["predictions"]
    assert results["cuda"]["score"] == results["cpu"]["score"]


def test_a_training_step_runs_on_the_gpu(npm_dir, corpus, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(npm_dir)
    blocks = npm_hf.prepare_training_blocks([d["text"] for d in corpus] * 4, tokenizer, block_size=16, group_size=4)
    args = npm_hf.NPMTrainingArguments(output_dir=str(tmp_path / "out"), max_steps=2, per_device_train_batch_size=4,
                                       learning_rate=1e-3, report_to=[], save_strategy="no", disable_tqdm=True)
    trainer = npm_hf.NPMTrainer(model=NPMModel.from_pretrained(npm_dir), args=args, train_dataset=blocks,
                                processing_class=tokenizer)
    trainer.train()
    assert next(trainer.model.parameters()).device.type == "cuda"
    assert trainer.state.global_step == 2 and np.isfinite(trainer.state.log_history[-1]["train_loss"])


def test_half_precision_on_the_gpu_loads_against_the_float32_index(npm_dir, mask):
    """pipeline(device=, dtype=) as for any pipeline: fp16 weights on the GPU are recognised by the index's weight
    sample (their fingerprint differs) and answer as float32 on the CPU does. Written without a GPU at hand (issue
    19.1); the CPU half-precision case: test_pipeline.py::test_dtype_and_device_arguments_load_as_for_any_pipeline."""
    from transformers import pipeline

    gpu = pipeline("fill-mask", model=str(npm_dir), device=0, dtype=torch.float16)
    assert gpu.model.dtype == torch.float16 and gpu.model.device.type == "cuda"
    text = f"The Rio Grande flows through {mask} and Texas."
    want = pipeline("fill-mask", model=str(npm_dir))(text, top_k=3)
    got = gpu(text, top_k=3)
    assert got[0]["phrase"] == want[0]["phrase"] and got[0]["evidence"] == want[0]["evidence"]
    assert [a["score"] for a in got] == pytest.approx([a["score"] for a in want], abs=5e-3)
