"""Held-out cloze accuracy of each CPU training lever at a fixed number of steps (issue 7, part 3).

    python benchmarks/cloze_levers.py --demo-dir DEMO_OUTPUT --output DIR [--steps 150] [--levers recipe salient ...]

Every lever starts from all-MiniLM-L6-v2 and changes one thing of the demo recipe (keys without gradients, stop
words off span edges, lr 1e-4 constant, 16 x 128-token groups, no salient masking). It trains `--steps` steps on the
demo's held-out corpus (`DEMO_OUTPUT/corpus.jsonl`, the cloze sentences cut out), indexes that corpus, and measures
exact match at 1 / 5 on `DEMO_OUTPUT/cloze.jsonl` with the demo's decoding, with the BM25 pre-filter and without.
Fixed steps, not minutes, so that runs sharing the machine stay comparable; throughput is train_levers.py's job.
Finished levers are kept in `DIR/lever<N>/result.json` (N: the lever's place in LEVERS) and skipped when rerun.
One JSON line per lever, then a table.
"""

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

from npm_hf.api import TrainDataArguments, build_index, train
from npm_hf.demo import DemoArguments, set_decoding, minilm_path
from npm_hf.evaluation import EvaluationArguments, evaluate
from npm_hf.index import IndexBuildArguments
from npm_hf.trainer import NPMTrainingArguments


# Each lever: overrides of the training arguments ("train") or of the data arguments ("data") of the recipe.
LEVERS = {
    "recipe": {},
    "salient": {"train": {"salient_span_ratio": 1.0}},
    "stop words may edge spans (paper)": {"data": {"mask_stopwords": True}},
    "keys with gradients (paper)": {"train": {"key_gradients": True}},
    "frozen embeddings": {"train": {"freeze_embeddings": True}},
    "lr 3e-4": {"train": {"learning_rate": 3e-4}},
    "256-token blocks, groups of 8": {"data": {"block_size": 256, "group_size": 8}},
}


def run_lever(name: str, demo_dir: Path, output: Path, steps: int) -> dict:
    lever = LEVERS[name]
    training = dict(output_dir=str(output / "checkpoints"), max_steps=steps, learning_rate=1e-4, warmup_steps=30,
                    lr_scheduler_type="constant_with_warmup", key_gradients=False, save_strategy="no",
                    logging_steps=min(25, steps), report_to=[], disable_tqdm=True, dataloader_pin_memory=False,
                    seed=0)
    data = dict(model=minilm_path(), corpus=str(demo_dir / "corpus.jsonl"), output=str(output / "model"),
                block_size=128, group_size=16, mask_stopwords=False)
    start = time.perf_counter()
    trainer = train(TrainDataArguments(**{**data, **lever.get("data", {})}),
                    NPMTrainingArguments(**{**training, **lever.get("train", {})}))
    seconds = time.perf_counter() - start
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    set_decoding(output / "model", DemoArguments(output=str(output), prefilter="bm25"))  # the demo's decoding
    build_index(output / "model", str(demo_dir / "corpus.jsonl"),
                args=IndexBuildArguments(show_progress_bar=False, overwrite=True))
    result = {"lever": name, "steps": steps, "train_seconds": round(seconds, 1), "first_loss": losses[0],
              "last_loss": losses[-1]}
    for prefilter in ("bm25", "none"):
        scores = evaluate(str(output / "model"), EvaluationArguments(
            task="cloze", data=str(demo_dir / "cloze.jsonl"), prefilter=prefilter, show_progress_bar=False))
        result[prefilter] = [scores["micro_exact_match"], scores["micro_exact_match_at_5"]]
    shutil.rmtree(output / "checkpoints", ignore_errors=True)
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--demo-dir", required=True, help="An `npm-hf demo` output folder (cloze.jsonl, corpus.jsonl).")
    parser.add_argument("--output", required=True, help="Where each lever's model and result go.")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--levers", nargs="+", default=list(LEVERS), choices=list(LEVERS))
    args = parser.parse_args(argv)
    demo_dir, results = Path(args.demo_dir), []
    for name in args.levers:
        folder = Path(args.output) / f"lever{list(LEVERS).index(name)}"
        done = folder / "result.json"
        if done.exists() and json.loads(done.read_text())["steps"] == args.steps:
            result = json.loads(done.read_text())
        else:
            shutil.rmtree(folder, ignore_errors=True)
            result = run_lever(name, demo_dir, folder, args.steps)
            done.write_text(json.dumps(result))
        results.append(result)
        print(json.dumps(result), flush=True)
    print(f"| lever ({args.steps} steps) | loss first → last | BM25 top-3: EM@1 / EM@5 | FAISS top-k: EM@1 / EM@5 |")
    print("|---|---|---|---|")
    for r in results:
        print(f"| {r['lever']} | {r['first_loss']:.1f} → {r['last_loss']:.1f} | {100 * r['bm25'][0]:.1f} / "
              f"{100 * r['bm25'][1]:.1f} | {100 * r['none'][0]:.1f} / {100 * r['none'][1]:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
