"""Training throughput of the CPU levers, side by side in one run: corpus tokens per second of NPMTrainer steps.

    python benchmarks/train_levers.py --encoder MINILM_DIR --corpus corpus.jsonl [--steps 6] [--rounds 2]

Levers: keys without gradients, frozen input embeddings, stop words kept off masked span edges (this one changes
what is masked, not the cost), `torch.compile`, bf16 autocast (fast only where the CPU has AVX-512 BF16 or AMX),
sequence length. Each configuration runs `--steps` steps per round
after two untimed warm-up steps; rounds alternate the configurations so that machine noise hits all of them alike.
One JSON line each.
"""

import argparse
import json
import sys
import tempfile
import time

import torch
from transformers import AutoTokenizer, TrainerCallback
from transformers.utils import logging

import npm_hf
from npm_hf.inference.stopwords import stopword_ids


LEVERS = {
    "paper (keys with gradients)": {},
    "keys without gradients": {"key_gradients": False},
    "frozen embeddings": {"freeze_embeddings": True},
    "keys without gradients + frozen embeddings": {"key_gradients": False, "freeze_embeddings": True},
    "stop words off span edges": {"mask_stopwords": False},
    "torch.compile": {"torch_compile": True},
    "bf16 autocast": {"bf16": True, "use_cpu": True},
}
UNTIMED_STEPS = 2  # the first steps compile (torch.compile, again for a second input shape) or warm caches


class StepTimer(TrainerCallback):
    def __init__(self):
        self.times = []

    def on_step_end(self, args, state, control, **kwargs):
        self.times.append(time.perf_counter())


def run(encoder, blocks, tokenizer, lever: dict, steps: int, block_size: int) -> dict:
    lever = dict(lever)
    excluded = stopword_ids(tokenizer) if not lever.pop("mask_stopwords", True) else None
    with tempfile.TemporaryDirectory() as output:
        args = npm_hf.NPMTrainingArguments(output_dir=output, max_steps=steps + UNTIMED_STEPS, learning_rate=1e-4,
                                           report_to=[], save_strategy="no", logging_steps=1000,
                                           disable_tqdm=True, **lever)
        timer = StepTimer()
        trainer = npm_hf.NPMTrainer(model=npm_hf.NPMModel.from_encoder(encoder), args=args, train_dataset=blocks,
                                    processing_class=tokenizer, span_edge_exclude_ids=excluded,
                                    callbacks=[timer])
        trainer.train()
    seconds = timer.times[-1] - timer.times[UNTIMED_STEPS - 1]
    tokens = steps * args.per_device_train_batch_size * block_size
    return {"tokens_per_second": tokens / seconds, "seconds_per_step": seconds / steps}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--encoder", required=True)
    parser.add_argument("--corpus", required=True)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--block-sizes", type=int, nargs="+", default=[128])
    parser.add_argument("--levers", nargs="+", choices=list(LEVERS), default=list(LEVERS),
                        help="Levers to time (the first one listed in LEVERS is always timed: it is the baseline).")
    args = parser.parse_args(argv)
    levers = {name: lever for i, (name, lever) in enumerate(LEVERS.items()) if i == 0 or name in args.levers}
    logging.set_verbosity_error()
    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(args.encoder)
    results = {}
    for block_size in args.block_sizes:
        blocks = npm_hf.prepare_training_blocks(args.corpus, tokenizer, block_size=block_size, group_size=16)
        blocks = blocks.select(range(min(len(blocks), 16 * (args.steps + UNTIMED_STEPS) * 2)))
        for _ in range(args.rounds):
            for name, lever in levers.items():
                key = f"{name}, block {block_size}"
                results.setdefault(key, []).append(run(args.encoder, blocks, tokenizer, lever, args.steps, block_size))
    base = max(r["tokens_per_second"] for r in results[f"{next(iter(LEVERS))}, block {args.block_sizes[0]}"])
    for key, runs in results.items():
        best = max(r["tokens_per_second"] for r in runs)
        print(json.dumps({"figure": "training throughput", "config": key, "tokens_per_second": round(best, 1),
                          "ratio_to_paper_setup": round(best / base, 3)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
