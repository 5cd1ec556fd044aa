"""Held-out cloze accuracy of NPM models, with and without a pre-filter, next to a lexical baseline.

    python benchmarks/cloze_table.py --cloze cloze.jsonl --model NPM_DIR [NPM_DIR ...] [--output table.json]
        [--prefilter none bm25 dense] [--scoring sum product] [--aggregation sum max] [--stopwords none edges any]
        [--exclude-query-phrases false true]

Each model retrieves from its own index (built over the corpus the cloze sentences were cut from). The lexical
baseline takes BM25's top-3 blocks of the first model's index for the query (mask removed) and answers with their
most frequent capitalised 1-4-word runs that the query does not already contain.
"""

import argparse
import itertools
import json
import re
import sys
from collections import Counter

import npm_hf
from npm_hf.evaluation import EvaluationArguments, save_results
from npm_hf.evaluation.cloze import _CAPITALISED_RUN
from npm_hf.evaluation.metrics import exact_match
from npm_hf.prefilter import BM25PassageRetriever, passage_texts


def lexical_baseline(index, examples: list[dict], blocks: int = 3) -> dict:
    retriever = BM25PassageRetriever(index)
    texts = passage_texts(index, retriever.ranges)
    queries = [example["masked"].replace("[MASK]", " ") for example in examples]
    at1 = at5 = 0
    for query, example, (top, _) in zip(queries, examples, retriever.top_passages(queries, blocks)):
        counts = Counter(m.group(1) for b in top for m in _CAPITALISED_RUN.finditer(texts[b]))
        ranked = [phrase for phrase, _ in counts.most_common() if not re.search(rf"\b{re.escape(phrase)}\b", query)]
        at1 += bool(ranked) and exact_match(ranked[0], example["answer"])
        at5 += any(exact_match(p, example["answer"]) for p in ranked[:5])
    return {"exact_match_at_1": at1 / len(examples), "exact_match_at_5": at5 / len(examples)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cloze", required=True)
    parser.add_argument("--model", nargs="+", required=True)
    parser.add_argument("--prefilter", nargs="+", default=["none", "bm25", "dense"])
    parser.add_argument("--scoring", nargs="+", default=["sum", "product"], help="config.span_scoring values")
    parser.add_argument("--aggregation", nargs="+", default=["sum"], help="config.phrase_aggregation values")
    parser.add_argument("--stopwords", nargs="+", default=["none"], help="config.span_stopwords values")
    parser.add_argument("--exclude-query-phrases", nargs="+", default=["false"], choices=["false", "true"],
                        help="config.exclude_query_phrases values")
    parser.add_argument("--output", default=None)
    args = parser.parse_args(argv)
    rows = []
    for model in args.model:
        npm, tokenizer = npm_hf.load_npm(model)
        for scoring, aggregation, stopwords, exclude, prefilter in itertools.product(
                args.scoring, args.aggregation, args.stopwords, args.exclude_query_phrases, args.prefilter):
            npm.config.span_scoring, npm.config.phrase_aggregation = scoring, aggregation
            npm.config.exclude_query_phrases = exclude == "true"
            result = npm_hf.evaluate(npm, EvaluationArguments(task="cloze", data=args.cloze, prefilter=prefilter,
                                                              span_stopwords=stopwords, show_progress_bar=False),
                                     tokenizer=tokenizer)
            row = {"model": model, "span_scoring": scoring, "phrase_aggregation": aggregation,
                   "span_stopwords": stopwords, "exclude_query_phrases": exclude, "prefilter": prefilter,
                   "em1": result["micro_exact_match"], "em5": result["micro_exact_match_at_5"],
                   "queries": result["num_examples"], "seconds": result["seconds"]}
            rows.append(row)
            print(json.dumps(row), flush=True)
    examples = [json.loads(line) for line in open(args.cloze, encoding="utf-8")]
    lexical = lexical_baseline(npm_hf.NPMIndex.for_model(npm_hf.load_npm(args.model[0])[0]), examples)
    print(json.dumps({"model": "lexical baseline (BM25 top-3 blocks, capitalised runs by frequency)", **lexical}))
    if args.output:
        save_results({"rows": rows, "lexical_baseline": lexical}, args.output)
    print("| model | span scoring | aggregation | span stop words | query phrases excluded | pre-filter | EM@1 "
          "| EM@5 |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['span_scoring']} | {r['phrase_aggregation']} | {r['span_stopwords']} | "
              f"{r['exclude_query_phrases']} | {r['prefilter']} | {100 * r['em1']:.1f} | {100 * r['em5']:.1f} |")
    print(f"| lexical baseline | | | | | BM25 top-3 | {100 * lexical['exact_match_at_1']:.1f} | "
          f"{100 * lexical['exact_match_at_5']:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
