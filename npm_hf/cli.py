"""`npm-hf` command line: a thin layer over npm_hf's library functions.

    npm-hf convert --encoder PATH --output DIR [--mode span|single]
    npm-hf convert --checkpoint npm.ckpt --base roberta-large --output DIR
    npm-hf build-index --model DIR --corpus FILE [--output DIR/index] [--block-size 256] [--batch-size N]
                       [--faiss-factory Flat | --faiss-factory auto] [--max-memory 8GB] [--max-shard-size 10GB]
                       [--resume | --overwrite]
    npm-hf index add --index DIR --model DIR --corpus FILE
    npm-hf index delete --index DIR --ids ID1,ID2
    npm-hf fill-mask --model DIR [--top-k 5] [--prefilter bm25|dense] [--prefilter-passage-tokens N] [--nprobe N]
                     [--ef-search N] [--json] "text with a [MASK]"
    npm-hf train --model ENCODER --corpus FILE --output DIR [any TrainingArguments flag, e.g. --max_steps 200]
    npm-hf push --model DIR --repo-id ORG/NAME [--private] [--revision R] [--create-pr] [--index-repo-id ORG/IDX]
                [--dry-run]
    npm-hf demo [--corpus PATH] [--output DIR]
    npm-hf serve-index --index DIR --shards N [--replicas R] [--address auto | HOST:PORT] [--stop]
    npm-hf gradio --model DIR [--index DIR] [--host 127.0.0.1] [--port 7860] [--top-k 5]
    npm-hf evaluate --model DIR --task sst2 [--data PATH] [--corpus PATH | --index DIR | --evidence-corpus]
                    [--max-examples 3000] [--seed 0] [--output results.json] [--update-card] [--paper-protocol]

Under several processes: `torchrun --nproc_per_node N -m npm_hf.cli train ...` (or `accelerate launch`); the same
for build-index, where each process encodes its share of the corpus.
"""

import argparse
import dataclasses
import json
import os
import sys

from transformers import HfArgumentParser, pipeline
from transformers.pipelines import PipelineException

from .api import (TrainDataArguments, build_index, convert_encoder, convert_lightning_checkpoint, load_npm, push_to_hub,
                  train)
from .demo import DemoArguments, run_demo
from .evaluation import EvaluationArguments, evaluate, record_results_in_card, results_to_markdown, save_results
from .index import IndexBuildArguments, IndexLockedError, NPMIndex
from .serve import serve_index, stop_index
from .trainer import NPMTrainingArguments, end_distributed_run
from .web_demo import WebDemoArguments, launch_demo


def _add_dataclass_arguments(parser: argparse.ArgumentParser, cls, skip: tuple[str, ...] = ()) -> None:
    """One `--dashed-name` option per dataclass field, with its type, default and help."""
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        flag = "--" + f.name.replace("_", "-")
        help_text = f.metadata.get("help", "")
        if f.type in (bool, "bool", bool | None):
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=f.default,
                                help=help_text)
        elif f.default is dataclasses.MISSING:
            parser.add_argument(flag, dest=f.name, required=True, help=help_text)
        else:
            kind = next((t for t in (int, float) if f.type in (t, t.__name__, t | None)), str)
            shown = "" if f.default is None else f" (default: {f.default})"  # None: the help text says what happens
            parser.add_argument(flag, dest=f.name, type=kind, default=f.default, help=help_text + shown)


def _dataclass_from(cls, namespace: argparse.Namespace):
    return cls(**{f.name: getattr(namespace, f.name) for f in dataclasses.fields(cls) if hasattr(namespace, f.name)})


def _convert(args) -> None:
    mode = {"mode": args.mode} if args.mode else {}
    if args.checkpoint:
        if not args.base:
            raise ValueError("--checkpoint needs --base, the model it was trained from (e.g. roberta-large).")
        model = convert_lightning_checkpoint(args.checkpoint, args.base, args.output, overwrite=args.overwrite, **mode)
    elif args.encoder:
        model = convert_encoder(args.encoder, args.output, overwrite=args.overwrite, **mode)
    else:
        raise ValueError("Pass --encoder (a Hugging Face encoder) or --checkpoint with --base (an NPM training "
                         "checkpoint).")
    print(f"Saved an NPM ({model.config.mode} mode) to {args.output}")


def _build_index(args) -> None:
    build_args = _dataclass_from(IndexBuildArguments, args)
    index = build_index(args.model, args.corpus, output_dir=args.output, args=build_args)
    m = index.manifest
    processes = int(os.environ.get("WORLD_SIZE", "1"))  # set by torchrun / accelerate launch
    if int(os.environ.get("RANK", "0")) == 0:  # one line from all processes
        print(f"Indexed {m.num_indexed_tokens} tokens of {m.num_documents} documents "
              f"({m.num_skipped_empty_documents} empty skipped) in {m.build_seconds:.1f}s"
              + (f" on {processes} processes" if processes > 1 else "") + f" -> {index.path}")


def _index_add(args) -> None:
    model, tokenizer = load_npm(args.model)
    index = NPMIndex.load(args.index)
    before = (index.manifest.num_documents, index.num_indexed)
    index.add_documents(model, tokenizer, args.corpus, batch_size=args.batch_size,
                        show_progress_bar=args.show_progress_bar)
    print(f"Added {index.manifest.num_documents - before[0]} documents ({index.num_indexed - before[1]} token "
          f"vectors) to {index.path}")


def _index_delete(args) -> None:
    ids = [doc_id.strip() for doc_id in args.ids.split(",") if doc_id.strip()]
    index = NPMIndex.load(args.index)
    before = index.num_indexed
    index.delete_documents(ids)
    print(f"Deleted {len(set(ids))} document ids ({before - index.num_indexed} token vectors) from {index.path}")


def _fill_mask(args) -> None:
    extra = {}
    if args.index:
        extra["index"] = NPMIndex.load(args.index)
    fill = pipeline("fill-mask", model=args.model, device=args.device, **extra)
    decoding = {name: getattr(args, name) for name in ("k", "nprobe", "ef_search", "prefilter", "prefilter_blocks",
                                                       "prefilter_passage_tokens", "prefilter_weight")}
    results = fill(args.text, top_k=args.top_k, targets=args.targets or None, **decoding)
    if args.json:
        print(json.dumps(results, ensure_ascii=False, indent=2))
        return
    for answers in results if results and isinstance(results[0], list) else [results]:
        for rank, answer in enumerate(answers, start=1):
            print(f"{rank}. {answer['phrase']!r}  score={answer['score']:.4f}")
            evidence = answer["evidence"]
            if evidence:
                context = evidence["text"]
                start, end = evidence["start"], evidence["end"]
                snippet = context[max(0, start - 60) : start] + "[" + context[start:end] + "]" + context[end : end + 60]
                print(f"   from {evidence['title'] or evidence['doc_id']!r}: …{snippet}…")


def _train(args, remaining: list[str]) -> None:
    (training_args,) = HfArgumentParser(NPMTrainingArguments).parse_args_into_dataclasses(
        args=[*remaining, "--output_dir", args.output]
    )
    trainer = train(_dataclass_from(TrainDataArguments, args), training_args)
    if trainer.is_world_process_zero():
        print(f"Trained for {trainer.state.global_step} steps; saved the NPM to {args.output}")
    end_distributed_run(trainer)


def _push(args) -> None:
    if args.dry_run:
        plan = push_to_hub(args.model, args.repo_id, dry_run=True, index_repo_id=args.index_repo_id)
        for repo_id, paths in plan.items():
            print(f"Would upload {len(paths)} files to {repo_id}:")
            print("\n".join(f"  {path}" for path in paths))
        print("Nothing was uploaded (--dry-run).")
        return
    commit = push_to_hub(args.model, args.repo_id, private=args.private, revision=args.revision,
                         create_pr=args.create_pr, index_repo_id=args.index_repo_id)
    print(f"Pushed {args.model} to {getattr(commit, 'commit_url', args.repo_id)}")


def _demo(args) -> None:
    report = run_demo(_dataclass_from(DemoArguments, args))
    print(f"Demo NPM: {report['model_dir']}")
    for row in report["evaluation"]:
        print(f"Held-out cloze ({row['num_examples']} queries, pre-filter {row['prefilter']}): exact match "
              f"{100 * row['micro_exact_match']:.1f}% at 1, {100 * row['micro_exact_match_at_5']:.1f}% at 5")
    for query, answers in report["answers"]:
        print(f"\nQuery: {query}   (held-out answer: {answers[0]['gold'] if answers else '?'})")
        for rank, answer in enumerate(answers, start=1):
            evidence = answer["evidence"]
            context = evidence["text"]
            start, end = evidence["start"], evidence["end"]
            snippet = context[max(0, start - 50) : start] + "[" + context[start:end] + "]" + context[end : end + 50]
            print(f"  {rank}. {answer['phrase']!r} ({answer['score']:.3f}) from {evidence['title']!r}: …{snippet}…")
    training = report["training"]
    print("\nStages (seconds when built):")
    for stage in report["stages"]:
        detail = f", {training['steps']} steps" if stage["stage"] == "model" and training.get("trained") else ""
        print(f"  {stage['stage']:<11} {stage['seconds'] or 0:8.1f} s{detail}{' (reused)' if stage['reused'] else ''}")


def _serve_index(args) -> None:
    if args.stop:
        count = stop_index(args.index, name=args.name, address=args.address)
        print(f"Stopped {count} shard actors of {args.name or args.index}.")
        return
    name = serve_index(args.index, args.shards, replicas=args.replicas, address=args.address, name=args.name,
                       actor_index_dir=args.index_on_nodes, num_cpus=args.num_cpus)
    print(f"Serving {args.index} in {args.shards} shards x {args.replicas} replicas as {name!r} (Ray namespace "
          f"npm_hf), until `npm-hf serve-index --index {args.index} --stop`. Attach with "
          f"npm_hf.serve.RayShardedIndex({str(args.index)!r}, num_shards={args.shards}, address=...).")


def _gradio(args) -> None:
    launch_demo(_dataclass_from(WebDemoArguments, args))


def _evaluate(args) -> None:
    results = evaluate(args.model, _dataclass_from(EvaluationArguments, args), index=args.index, corpus=args.corpus)
    if args.output:
        save_results(results, args.output)
    if args.update_card:
        record_results_in_card(args.model, [results])
    print(results_to_markdown([results]))
    if "buckets" in results:
        print("Exact match per answer length (tokens): " + ", ".join(
            f"{name}: {100 * b['exact_match']:.1f} (n={b['count']})" for name, b in results["buckets"].items()))


def _passage_tokens(value: str) -> int | str:
    """--prefilter-passage-tokens: "blocks" or a window size (the pipeline checks the range)."""
    if value == "blocks":
        return value
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f'expected an integer >= 2 or "blocks", got {value!r}') from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="npm-hf", description="Nonparametric Masked Language Models (NPM).")
    commands = parser.add_subparsers(dest="command", required=True)

    convert = commands.add_parser("convert", help="Wrap a plain encoder checkpoint as an NPM directory.")
    convert.add_argument("--encoder", help="Encoder directory or Hub id (BERT/RoBERTa family, facebook/npm).")
    convert.add_argument("--checkpoint", help="Original NPM training checkpoint (.ckpt or .safetensors).")
    convert.add_argument("--base", help="With --checkpoint: the model it was trained from (e.g. roberta-large).")
    convert.add_argument("--output", required=True, help="NPM directory to write.")
    convert.add_argument("--mode", choices=["span", "single"], default=None,
                         help="NPM (span) or NPM-single (default: single for npm-single checkpoints, else span).")
    convert.add_argument("--overwrite", action="store_true", help="Replace an existing output directory.")
    convert.set_defaults(handler=_convert)

    build = commands.add_parser("build-index", help="Encode a reference corpus into the model's index.")
    build.add_argument("--model", required=True, help="NPM directory.")
    build.add_argument("--corpus", required=True, help=".txt (one document per line), .jsonl or a datasets dataset.")
    build.add_argument("--output", default=None, help="Index directory (default: MODEL/index).")
    _add_dataclass_arguments(build, IndexBuildArguments)
    build.set_defaults(handler=_build_index)

    edit = commands.add_parser("index", help="Edit a built index: add or delete documents.")
    edits = edit.add_subparsers(dest="index_command", required=True)
    add = edits.add_parser("add", help="Encode new documents into new blocks of an index (the rest is kept).")
    add.add_argument("--index", required=True, help="Index directory (e.g. MODEL/index).")
    add.add_argument("--model", required=True, help="The NPM directory the index was built with.")
    add.add_argument("--corpus", required=True, help=".txt, .jsonl or a datasets dataset of new documents; ids "
                                                     "must be new to the index.")
    add.add_argument("--batch-size", dest="batch_size", type=int, default=16, help="Blocks per forward pass.")
    add.add_argument("--show-progress-bar", dest="show_progress_bar", action=argparse.BooleanOptionalAction,
                     default=True, help="Show tqdm progress bars.")
    add.set_defaults(handler=_index_add)
    delete = edits.add_parser("delete", help="Remove documents from an index: never retrieved or cited again.")
    delete.add_argument("--index", required=True, help="Index directory (e.g. MODEL/index).")
    delete.add_argument("--ids", required=True, help="Comma-separated document ids, e.g. doc1,doc7.")
    delete.set_defaults(handler=_index_delete)

    fill = commands.add_parser("fill-mask", help="Fill the mask of a text from the reference corpus.")
    fill.add_argument("--model", required=True, help="NPM directory or Hub id.")
    fill.add_argument("--index", default=None, help="Index directory (default: the model's own).")
    fill.add_argument("--top-k", dest="top_k", type=int, default=5, help="Answers to show.")
    fill.add_argument("--k", type=int, default=None,
                      help="Neighbours per query vector (default: the model's decoding_config.json).")
    fill.add_argument("--targets", nargs="+", default=None, help="Only score these answers.")
    fill.add_argument("--prefilter", choices=["none", "bm25", "dense"], default=None,
                      help="Two-stage retrieval: score only the tokens of the best passages (default: the model's).")
    fill.add_argument("--prefilter-blocks", dest="prefilter_blocks", type=int, default=None,
                      help="Passages (blocks, or prefilter_passage_tokens windows) the pre-filter keeps "
                           "(default: the model's, 3).")
    fill.add_argument("--prefilter-passage-tokens", dest="prefilter_passage_tokens", type=_passage_tokens,
                      default=None, help="Pre-filter passages: windows of N tokens, or 'blocks' (default: the model's).")
    fill.add_argument("--prefilter-weight", dest="prefilter_weight", type=float, default=None,
                      help="Logit bias of the best passage's tokens (default: the model's).")
    fill.add_argument("--nprobe", type=int, default=None,
                      help="IVF indexes: inverted lists visited per query (default: the model's, else FAISS's).")
    fill.add_argument("--ef-search", dest="ef_search", type=int, default=None,
                      help="HNSW indexes: efSearch, the search's candidate list size (default: the model's).")
    fill.add_argument("--device", default=None, help="torch device, e.g. cpu or cuda:0.")
    fill.add_argument("--json", action="store_true", help="Print the pipeline output as JSON.")
    fill.add_argument("text", help="Text with the tokenizer's mask token, e.g. [MASK] or <mask>.")
    fill.set_defaults(handler=_fill_mask)

    push = commands.add_parser("push", help="Upload an NPM directory (weights, tokenizer, card, index) to the Hub.")
    push.add_argument("--model", required=True, help="NPM directory with its index.")
    push.add_argument("--repo-id", dest="repo_id", required=True, help="Hub model repo, ORG/NAME.")
    push.add_argument("--private", action="store_true", default=None, help="Create the repo as private.")
    push.add_argument("--revision", default=None, help="Branch to push to.")
    push.add_argument("--create-pr", dest="create_pr", action="store_true", help="Open a pull request instead.")
    push.add_argument("--index-repo-id", dest="index_repo_id", default=None,
                      help="Put the index in this dataset repo (for very large indexes); the config records it.")
    push.add_argument("--dry-run", dest="dry_run", action="store_true",
                      help="List the files that would be uploaded (an allow-list) and upload nothing.")
    push.set_defaults(handler=_push)

    train = commands.add_parser(
        "train", help="Train an NPM with NPMTrainer; any TrainingArguments flag (e.g. --max_steps 200) is accepted.")
    _add_dataclass_arguments(train, TrainDataArguments)
    train.set_defaults(handler=_train, takes_remaining=True)

    demo = commands.add_parser("demo", help="Train a small NPM on the CPU, index a real corpus, measure it on held-out "
                                            "cloze queries and answer a few.")
    _add_dataclass_arguments(demo, DemoArguments)
    demo.set_defaults(handler=_demo)

    serve = commands.add_parser("serve-index", help="Serve an index in row shards from Ray actors on a running "
                                "Ray cluster, for RayShardedIndex clients (docs/scale_out.md); --stop ends them.")
    serve.add_argument("--index", required=True, help="the index directory (the same path on every node, or see "
                       "--index-on-nodes)")
    serve.add_argument("--shards", type=int, default=2, help="row shards, one actor each (default: 2)")
    serve.add_argument("--replicas", type=int, default=1, help="actors per shard, on different nodes (default: 1)")
    serve.add_argument("--address", default="auto", help="the Ray cluster: auto (the one this machine belongs to, "
                       "default) or HOST:PORT of its head")
    serve.add_argument("--name", default=None, help="name to serve under (default: from the index path)")
    serve.add_argument("--index-on-nodes", default=None, help="the index directory as the nodes see it, if elsewhere")
    serve.add_argument("--num-cpus", type=float, default=1, help="CPUs reserved per shard actor (default: 1)")
    serve.add_argument("--stop", action="store_true", help="stop the shards served for --index (or --name)")
    serve.set_defaults(handler=_serve_index)

    web = commands.add_parser("gradio", help="Serve a web demo (Gradio): answers with their highlighted evidence.")
    _add_dataclass_arguments(web, WebDemoArguments)
    web.set_defaults(handler=_gradio)

    evaluate = commands.add_parser("evaluate", help="Zero-shot accuracy / exact match on the paper's tasks.")
    evaluate.add_argument("--model", required=True, help="NPM directory or Hub id, or any masked LM (baseline).")
    evaluate.add_argument("--corpus", default=None, help="Build a temporary index over this corpus and use it.")
    evaluate.add_argument("--index", default=None, help="Index directory (default: the model's own).")
    evaluate.add_argument("--output", default=None, help="Write the results as JSON here.")
    evaluate.add_argument("--update-card", action="store_true",
                          help="Add the results to the Evaluation table of the model directory's card (README.md).")
    _add_dataclass_arguments(evaluate, EvaluationArguments)
    evaluate.set_defaults(handler=_evaluate)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, remaining = parser.parse_known_args(argv)
    if remaining and not getattr(args, "takes_remaining", False):
        parser.error(f"unrecognized arguments: {' '.join(remaining)}")
    try:
        args.handler(args, remaining) if getattr(args, "takes_remaining", False) else args.handler(args)
    except (ValueError, OSError, ImportError, IndexLockedError, PipelineException) as error:
        print(f"npm-hf {args.command}: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
