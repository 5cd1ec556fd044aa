"""The answer stage of the fill-mask pipeline alone (spans, phrases, decoding, evidence: `postprocess`), timed per
query after the encoder forward and the search are done, and its answers written or compared (issue 20, part 3).

    python benchmarks/answer_stage.py --model NPM_DIR --cloze cloze.jsonl [cloze2.jsonl ...]
        [--decoding '{"span_stopwords": "any"}' ...] [--repeats 3] [--profile 25]
        [--write answers.json | --compare answers.json]

Each `--decoding` is a JSON object of decoding settings over the model's own; every query is answered under each
(top 5, with evidence). `--write` saves the answers; `--compare` checks that this code gives exactly the same answers
as the code that wrote the file (scores compared as floats, bit for bit) and exits 1 listing the first differences
otherwise: a speed-up of the answer stage must leave every answer identical. `--profile N` prints the N functions of
the answer stage with the most cumulative time (cProfile), to stderr.
"""

import argparse
import cProfile
import io
import json
import pstats
import sys
import time

import numpy as np

import npm_hf
from npm_hf import NonparametricFillMaskPipeline
from npm_hf.evaluation.cloze import MASK_PLACEHOLDER


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--cloze", nargs="+", required=True)
    parser.add_argument("--decoding", nargs="+", default=["{}"], type=json.loads)
    parser.add_argument("--repeats", type=int, default=3, help="Timed passes over the queries (best per query).")
    parser.add_argument("--profile", type=int, default=0)
    parser.add_argument("--write", default=None)
    parser.add_argument("--compare", default=None)
    args = parser.parse_args(argv)
    npm, tokenizer = npm_hf.load_npm(args.model)
    fill = NonparametricFillMaskPipeline(model=npm, tokenizer=tokenizer, index=npm_hf.NPMIndex.for_model(npm))
    texts = [json.loads(line)["masked"].replace(MASK_PLACEHOLDER, tokenizer.mask_token)
             for path in args.cloze for line in open(path, encoding="utf-8")]
    answers, rows = {}, []
    for settings in args.decoding:
        decoding = fill.decoding.update(**settings)
        outputs = fill.forward_batch([fill.preprocess(text) for text in texts])
        fill.search_batch(outputs, decoding)
        fill.postprocess(outputs[0], top_k=5, decoding=decoding)  # warm-up: lazy tables
        best = np.full(len(outputs), np.inf)
        for _ in range(args.repeats):
            for q, output in enumerate(outputs):
                started = time.perf_counter()
                fill.postprocess(output, top_k=5, decoding=decoding)
                best[q] = min(best[q], time.perf_counter() - started)
        if args.profile:
            profile = cProfile.Profile()
            profile.runcall(lambda: [fill.postprocess(output, top_k=5, decoding=decoding) for output in outputs])
            report = io.StringIO()
            pstats.Stats(profile, stream=report).sort_stats("cumulative").print_stats(args.profile)
            print(f"--- profile of {json.dumps(settings)}\n{report.getvalue()}", file=sys.stderr)
        key = json.dumps(settings, sort_keys=True)
        answers[key] = [fill.postprocess(output, top_k=5, decoding=decoding) for output in outputs]
        rows.append({"decoding": settings, "queries": len(outputs), "ms_per_query": round(best.mean() * 1e3, 3),
                     "answers": sum(len(a) for a in answers[key])})
        print(json.dumps(rows[-1]), flush=True)
    answers = json.loads(json.dumps(answers))  # as a file holds them (tuples become lists)
    if args.write:
        with open(args.write, "w", encoding="utf-8") as handle:
            json.dump(answers, handle)
    if args.compare:
        with open(args.compare, encoding="utf-8") as handle:
            before = json.load(handle)
        differences = [(key, q) for key in answers for q, (got, want) in enumerate(zip(answers[key], before[key]))
                       if got != want] + [(key, None) for key in answers if len(answers[key]) != len(before[key])]
        total = sum(len(a) for a in answers.values())
        print(json.dumps({"compared_queries": total, "identical": not differences, "differences": differences[:10]}))
        return 1 if differences else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
