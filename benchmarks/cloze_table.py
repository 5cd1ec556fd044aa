"""Held-out cloze accuracy of NPM models, with and without a pre-filter, next to a lexical baseline.

    python benchmarks/cloze_table.py --cloze cloze.jsonl --model NPM_DIR [NPM_DIR ...] [--output table.json]
        [--prefilter none bm25 dense] [--scoring sum product] [--aggregation sum max] [--stopwords none edges any]
        [--punctuation word inner] [--exclude-query-phrases false true] [--cross-lines true false]
        [--passages blocks:3:0 64:10:4] [--max-examples N]

A `--passages` value is TOKENS:KEPT:WEIGHT, the pre-filter's passages (`blocks`, or windows of that many tokens), how
many it keeps and the weight of their relevance in the token logits (config.prefilter_passage_tokens,
prefilter_blocks, prefilter_weight).

Each row also gives EM@1 / EM@5 on the even and on the odd lines of the cloze file: settings chosen on one half are
reported on the other. Each model retrieves from its own index (built over the corpus the cloze sentences were cut
from). The lexical baseline takes BM25's top-3 blocks of the first model's index for the query (mask removed) and
answers with their most frequent capitalised 1-4-word runs that the query does not already contain.

It also counts, per span rule (stop words x punctuation), the gold answers that any decoding could return at all:
those with an occurrence in the first model's index that is a span the rule keeps ("reachable"), and how many gold
answers hold punctuation between two of their characters ("inner punctuation").
"""

import argparse
import itertools
import json
import re
import sys
import tempfile
from pathlib import Path

import numpy as np

import npm_hf
from npm_hf.evaluation import EvaluationArguments, lexical_cloze_baseline, save_results
from npm_hf.evaluation.metrics import exact_match
from npm_hf.inference.retrieval import NPMPredictor


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cloze", required=True)
    parser.add_argument("--model", nargs="+", required=True)
    parser.add_argument("--prefilter", nargs="+", default=["none", "bm25", "dense"])
    parser.add_argument("--scoring", nargs="+", default=["sum", "product"], help="config.span_scoring values")
    parser.add_argument("--aggregation", nargs="+", default=["sum"], help="config.phrase_aggregation values")
    parser.add_argument("--stopwords", nargs="+", default=["none"], help="config.span_stopwords values")
    parser.add_argument("--punctuation", nargs="+", default=["word"], help="config.span_punctuation values")
    parser.add_argument("--max-examples", type=int, default=None, help="Only the first N cloze queries.")
    parser.add_argument("--exclude-query-phrases", nargs="+", default=["false"], choices=["false", "true"],
                        help="config.exclude_query_phrases values")
    parser.add_argument("--cross-lines", nargs="+", default=["true"], choices=["false", "true"],
                        help="config.spans_cross_lines values (false needs an index that marks line starts)")
    parser.add_argument("--passages", nargs="+", default=["blocks:3:0"], type=_passages,
                        help="TOKENS:KEPT:WEIGHT pre-filter settings, TOKENS a number or 'blocks'")
    parser.add_argument("--output", default=None)
    args = parser.parse_args(argv)
    examples = [json.loads(line) for line in open(args.cloze, encoding="utf-8")][: args.max_examples]
    cloze = args.cloze
    if args.max_examples is not None:  # the evaluation reads a file: the first N queries in a temporary one
        cloze = str(Path(tempfile.mkdtemp(prefix="cloze-table-")) / "queries.jsonl")
        save_jsonl(examples, cloze)
    reachable = reachable_answers(args.model[0], examples, args.stopwords, args.punctuation)
    for row in reachable:
        print(json.dumps(row), flush=True)
    rows = []
    for model in args.model:
        npm, tokenizer = npm_hf.load_npm(model)
        for scoring, aggregation, stopwords, punctuation, exclude, cross_lines, prefilter, passages in (
                itertools.product(args.scoring, args.aggregation, args.stopwords, args.punctuation,
                                  args.exclude_query_phrases, args.cross_lines, args.prefilter, args.passages)):
            tokens, kept, weight = passages
            decoding = {"span_scoring": scoring, "phrase_aggregation": aggregation, "span_punctuation": punctuation,
                        "exclude_query_phrases": exclude == "true", "spans_cross_lines": cross_lines == "true",
                        "prefilter_passage_tokens": tokens or "blocks", "prefilter_blocks": kept,
                        "prefilter_weight": weight}
            result = npm_hf.evaluate(npm, EvaluationArguments(task="cloze", data=cloze, prefilter=prefilter,
                                                              span_stopwords=stopwords, show_progress_bar=False),
                                     tokenizer=tokenizer, decoding=decoding)
            row = {"model": model, "span_scoring": scoring, "phrase_aggregation": aggregation,
                   "span_stopwords": stopwords, "span_punctuation": punctuation, "exclude_query_phrases": exclude,
                   "spans_cross_lines": cross_lines,
                   "prefilter": prefilter,
                   "passages": _passages_name(passages),
                   "em1": result["micro_exact_match"], "em5": result["micro_exact_match_at_5"],
                   **_halves(result["predictions"], examples),
                   "queries": result["num_examples"], "seconds": result["seconds"]}
            rows.append(row)
            print(json.dumps(row), flush=True)
    lexical = lexical_cloze_baseline(npm_hf.NPMIndex.for_model(npm_hf.load_npm(args.model[0])[0]), examples)
    print(json.dumps({"model": "lexical baseline (BM25 top-3 blocks, capitalised runs by frequency)", **lexical}))
    if args.output:
        save_results({"rows": rows, "lexical_baseline": lexical, "reachable": reachable}, args.output)
    print("| span stop words | span punctuation | gold answers | with inner punctuation | reachable | reachable with "
          "inner punctuation |")
    print("|---|---|---|---|---|---|")
    for r in reachable:
        print(f"| {r['span_stopwords']} | {r['span_punctuation']} | {r['answers']} | {r['inner_punctuation']} | "
              f"{r['reachable']} | {r['reachable_inner_punctuation']} |")
    print("| model | span scoring | aggregation | span stop words | span punctuation | query phrases excluded "
          "| spans cross lines | pre-filter | passages | EM@1 / EM@5 | even lines | odd lines |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    pair = lambda at1, at5: f"{100 * at1:.1f} / {100 * at5:.1f}"  # noqa: E731
    for r in rows:
        print(f"| {r['model']} | {r['span_scoring']} | {r['phrase_aggregation']} | {r['span_stopwords']} | "
              f"{r['span_punctuation']} | {r['exclude_query_phrases']} | {r['spans_cross_lines']} | {r['prefilter']} | "
              f"{r['passages']} | "
              f"{pair(r['em1'], r['em5'])} | {pair(*r['even'])} | {pair(*r['odd'])} |")
    print(f"| lexical baseline | | | | | | | BM25 | top-3 blocks | "
          f"{pair(lexical['exact_match_at_1'], lexical['exact_match_at_5'])} | | |")
    return 0


INNER_PUNCTUATION = re.compile(r"\w[^\w\s]+\s*\w")


def reachable_answers(model: str, examples: list[dict], stopword_rules, punctuation_rules) -> list[dict]:
    """Per span rule: how many gold answers occur in the model's index as a span the rule keeps (what any decoding
    could answer), overall and among the answers with inner punctuation."""
    npm, tokenizer = npm_hf.load_npm(model)
    index = npm_hf.NPMIndex.for_model(npm)
    occurrences = [_occurrences(index, example["answer"]) for example in examples]
    inner = [bool(INNER_PUNCTUATION.search(example["answer"])) for example in examples]
    rows = []
    for stopwords, punctuation in itertools.product(stopword_rules, punctuation_rules):
        predictor = NPMPredictor(npm.config, tokenizer, index).using(span_stopwords=stopwords,
                                                                     span_punctuation=punctuation)
        found = []
        for starts, ends in occurrences:
            kept = [len(predictor.enumerate_spans(np.array([s]), np.array([e]))[0]) > 0 for s, e in zip(starts, ends)]
            found.append(any(kept))
        rows.append({"span_stopwords": stopwords, "span_punctuation": punctuation, "answers": len(examples),
                     "inner_punctuation": sum(inner), "reachable": sum(found),
                     "reachable_inner_punctuation": sum(f and i for f, i in zip(found, inner))})
    return rows


def _occurrences(index, answer: str) -> tuple[list[int], list[int]]:
    """Token spans (first, last position) of the index whose document text is `answer`, at word boundaries."""
    pattern = re.compile(rf"(?<!\w){re.escape(answer)}(?!\w)")
    docs, offsets = np.asarray(index.token_docs), np.asarray(index.token_offsets)
    starts, ends = [], []
    for d in range(index.manifest.num_documents):
        matches = list(pattern.finditer(index.documents[d]["text"]))
        if not matches:
            continue
        tokens = np.flatnonzero(docs == d)
        for match in matches:
            first = tokens[offsets[tokens, 0] == match.start()]
            last = tokens[offsets[tokens, 1] == match.end()]
            if len(first) and len(last):
                starts.append(int(first[0]))
                ends.append(int(last[-1]))
    return starts, ends


def save_jsonl(rows: list[dict], path: str) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")


def _halves(predictions: list[list[str]], examples: list[dict]) -> dict:
    """EM@1 / EM@5 on the even and the odd lines of the cloze file (tune on one half, report the other)."""
    if len(predictions) != len(examples):
        raise ValueError("The evaluation sampled the cloze file; halves need every query, in file order.")
    hits = np.array([[bool(p) and exact_match(p[0], e["answer"]), any(exact_match(a, e["answer"]) for a in p[:5])]
                     for p, e in zip(predictions, examples)], dtype=float)
    return {"even": hits[0::2].mean(axis=0).tolist(), "odd": hits[1::2].mean(axis=0).tolist()}


def _passages(spec: str) -> tuple[int | None, int, float]:
    try:
        tokens, kept, weight = spec.split(":")
        return (None if tokens == "blocks" else int(tokens)), int(kept), float(weight)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected TOKENS:KEPT:WEIGHT (e.g. 64:10:4 or blocks:3:0), got {spec!r}")


def _passages_name(passages: tuple) -> str:
    tokens, kept, weight = passages
    size = "blocks" if tokens is None else f"{tokens}-token windows"
    return f"top-{kept} {size}" + (f", weight {weight:g}" if weight else "")


if __name__ == "__main__":
    sys.exit(main())
