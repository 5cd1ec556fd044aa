"""Evaluate a model on every task with an offline copy in ../shared/offline_data; print a Markdown table.

    python benchmarks/eval_offline.py --model NPM_DIR [--index DIR] [--max-examples 1000] [--output results.json]

Closed-set tasks score label words over the model's index (or --index). LAMA tasks run over that index and over the
evaluated facts' own evidence sentences (the oracle corpus), with each of --prefilters (default: none, bm25, dense;
"none" is FAISS top-k over the whole index), next to a lexical baseline over the same evidence: BM25's top-3
sentences for the query (mask removed) answer with their most frequent words that are neither stop words nor in the
query. A non-NPM masked LM gets the parametric rows. The majority-class baseline is in every closed-set row.
"""

import argparse
import json
import re
import sys
from collections import Counter
from pathlib import Path

from transformers import AutoConfig, AutoTokenizer

import npm_hf
from npm_hf.evaluation import EvaluationArguments, results_to_markdown, save_results
from npm_hf.evaluation import metrics
from npm_hf.evaluation.evaluator import _sample_per_bucket, evidence_documents
from npm_hf.evaluation.tasks import get_task, load_examples
from npm_hf.inference.stopwords import STOPWORDS


DATA_DIR = Path(__file__).resolve().parents[2] / "shared" / "offline_data"
CLOSED = ("sst2", "mr", "rt", "cr", "amazon", "subj", "agn", "rte")
OPEN = ("lama-trex", "lama-google-re")
_WORD = re.compile(r"\w+")


def lama_lexical_baseline(task_name: str, tokenizer, args: EvaluationArguments, top_sentences: int = 3) -> dict:
    """Macro exact match (@1 and @5) of answering with the most frequent content words of BM25's top sentences
    among the evidence of the same examples the NPM rows evaluate."""
    import bm25s

    task = get_task(task_name)
    examples, _ = load_examples(task, args.data, args.data_dir)
    examples, buckets = _sample_per_bucket(examples, tokenizer, args)
    texts = [document["text"] for document in evidence_documents(task, examples)]
    retriever = bm25s.BM25()
    retriever.index(bm25s.tokenize(texts, stopwords="en", show_progress=False), show_progress=False)
    queries = [task.template(example, " ") for example in examples]
    found, _ = retriever.retrieve(bm25s.tokenize(queries, stopwords="en", show_progress=False),
                                  k=min(top_sentences, len(texts)), show_progress=False)
    ranked = []
    for query, top in zip(queries, found):
        seen = {word.lower() for word in _WORD.findall(query)}
        counts = Counter(word for i in top for word in _WORD.findall(texts[i])
                         if word.lower() not in STOPWORDS and word.lower() not in seen)
        ranked.append([word for word, _ in counts.most_common(5)])
    references = [example["answer"] for example in examples]
    at1 = metrics.bucketed_exact_match([r[0] if r else "" for r in ranked], references, buckets)
    best = [next((a for a in r if metrics.exact_match(a, ref)), r[0] if r else "") for r, ref in zip(ranked, references)]
    at5 = metrics.bucketed_exact_match(best, references, buckets)
    return {"task": task.name, "model": "lexical baseline", "model_type": "lexical", "metric": "macro_exact_match",
            "score": at1["macro_exact_match"], "macro_exact_match_at_5": at5["macro_exact_match"],
            "num_examples": len(examples), "seconds": 0.0,
            "settings": {"prefilter": "bm25", "prefilter_blocks": top_sentences, "evidence_corpus": True}}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--index", default=None)
    parser.add_argument("--data-dir", default=str(DATA_DIR))
    parser.add_argument("--max-examples", type=int, default=1000)
    parser.add_argument("--max-examples-per-bucket", type=int, default=300)
    parser.add_argument("--tasks", nargs="+", default=[*CLOSED, *OPEN])
    parser.add_argument("--prefilters", nargs="+", default=["none", "bm25", "dense"],
                        help="Retrieval settings of the LAMA rows (closed-set tasks never pre-filter).")
    parser.add_argument("--output", default=None)
    args = parser.parse_args(argv)
    is_npm = npm_hf.NPMConfig.model_type == AutoConfig.from_pretrained(args.model).model_type
    runs = []
    for task in args.tasks:
        common = dict(task=task, data_dir=args.data_dir, max_examples=args.max_examples,
                      max_examples_per_bucket=args.max_examples_per_bucket, show_progress_bar=False)
        settings = [{}]
        if task in OPEN and is_npm:
            has_index = args.index is not None or (Path(args.model) / "index").is_dir()  # else evidence only
            settings = [{"prefilter": p} for p in args.prefilters] if has_index else []
            settings += [{"evidence_corpus": True, "prefilter": p} for p in args.prefilters]
        for extra in settings:
            index = args.index if is_npm and not extra.get("evidence_corpus") else None
            result = npm_hf.evaluate(args.model, EvaluationArguments(**common, **extra), index=index)
            result.pop("predictions")
            runs.append(result)
            print(json.dumps({k: result[k] for k in ("task", "metric", "score", "num_examples")}
                             | {"majority": result.get("majority_baseline"), "seconds": result["seconds"],
                                "prefilter": result["settings"]["prefilter"],
                                "evidence": bool(extra.get("evidence_corpus"))}), flush=True)
        if task in OPEN and is_npm:
            tokenizer = AutoTokenizer.from_pretrained(args.model)
            runs.append(lama_lexical_baseline(task, tokenizer, EvaluationArguments(**common)))
            print(json.dumps({k: runs[-1][k] for k in ("task", "model", "score", "macro_exact_match_at_5")}), flush=True)
    if args.output:
        save_results(runs, args.output)
    print(results_to_markdown(runs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
