"""Evaluate a model on every task with an offline copy in ../shared/offline_data; print a Markdown table.

    python benchmarks/eval_offline.py --model NPM_DIR [--index DIR] [--max-examples 1000] [--output results.json]

Closed-set tasks retrieve from the model's index (or --index); LAMA tasks run dense over that index, and dense and
BM25 over the evaluated facts' own evidence sentences (the oracle corpus). A non-NPM masked LM gets the parametric
rows. The majority-class baseline is in every closed-set row.
"""

import argparse
import json
import sys
from pathlib import Path

import npm_hf
from npm_hf.evaluation import EvaluationArguments, results_to_markdown, save_results


DATA_DIR = Path(__file__).resolve().parents[2] / "shared" / "offline_data"
CLOSED = ("sst2", "mr", "rt", "cr", "amazon", "subj", "agn", "rte")
OPEN = ("lama-trex", "lama-google-re")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--index", default=None)
    parser.add_argument("--data-dir", default=str(DATA_DIR))
    parser.add_argument("--max-examples", type=int, default=1000)
    parser.add_argument("--max-examples-per-bucket", type=int, default=300)
    parser.add_argument("--tasks", nargs="+", default=[*CLOSED, *OPEN])
    parser.add_argument("--output", default=None)
    args = parser.parse_args(argv)
    is_npm = npm_hf.NPMConfig.model_type == __import__("transformers").AutoConfig.from_pretrained(args.model).model_type
    runs = []
    for task in args.tasks:
        common = dict(task=task, data_dir=args.data_dir, max_examples=args.max_examples,
                      max_examples_per_bucket=args.max_examples_per_bucket, show_progress_bar=False)
        settings = [{}]
        if task in OPEN and is_npm:
            settings = [{}, {"evidence_corpus": True}, {"evidence_corpus": True, "prefilter": "bm25"},
                        {"evidence_corpus": True, "prefilter": "dense"}]
        for extra in settings:
            index = args.index if is_npm and not extra.get("evidence_corpus") else None
            result = npm_hf.evaluate(args.model, EvaluationArguments(**common, **extra), index=index)
            result.pop("predictions")
            runs.append(result)
            print(json.dumps({k: result[k] for k in ("task", "metric", "score", "num_examples")}
                             | {"majority": result.get("majority_baseline"), "seconds": result["seconds"],
                                "prefilter": result["settings"]["prefilter"],
                                "evidence": bool(extra.get("evidence_corpus"))}), flush=True)
    if args.output:
        save_results(runs, args.output)
    print(results_to_markdown(runs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
