"""Figure P3d: indexes without float16 vectors (`IndexBuildArguments(vectors="none")`), their quality and size.

    python benchmarks/compact_index.py [--quick] [--factories "F1;F2"] [--plot docs/compact_index.png]

Over the P1 index of `benchmarks/run.py` (10^6 tokens; 10^5 with --quick), each compact variant is made from the
index's own float16 vectors (no re-encoding: the first stage trained on a sample and filled, the refine codes of
every vector written, the token files converted to format 3) into a real index directory, loaded with
`NPMIndex.load` and compared with exact search (Flat, float16):

    agreement    top-1 of `index.search` (k=4096) is an exact top-1 (same row or a tie in exact score), for 2 token
                 vectors each of real sentences encoded on their own (as figure P3)
    answers      identical top-1 answer (token_str) of the fill-mask pipeline (span mode, k=4096) over cloze
                 queries of the indexed text, against the exact index
    bytes/token  every file of the index directory (metadata, documents, BM25 pre-filter, FAISS, codes) / indexed
    latency      median `index.search` milliseconds per query of 2 vectors, k=4096

Prints one JSON line per index, then "P3d": the bytes/token of the smallest index with >= 95 % agreement and
>= 95 % identical answers (goal <= 64), and writes the plot (matplotlib) with --plot.
"""

import argparse
import dataclasses
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


sys.path.insert(0, str(Path(__file__).resolve().parent))
import run  # noqa: E402  (the corpus, model, queries and index of the other figures)


K = 4096
GOAL_BYTES = 64
GOAL_AGREEMENT = 0.95


def default_factories(nlist: int, hidden: int) -> list[str]:
    return [f"IVF{nlist},PQ16np,Refine(SQ8)", f"IVF{nlist},PQ16np,Refine(SQ6)", f"IVF{nlist},PQ16np,Refine(SQ4)",
            f"IVF{nlist},PQ16np,Refine(PQ{hidden // 4}np)", f"IVF{nlist},PQ16np,Refine(PQ64np)",
            "PQ32x4fs,Refine(PQ48np)", f"IVF{nlist},PQ16np"]


def compact_variant(exact, factory: str, path: Path, train: int, nprobe: int | None = None):
    """A vectors='none' index directory at `path` over the files and vectors of `exact` (see the docstring)."""
    import faiss

    from npm_hf import NPMIndex
    from npm_hf.index.coded_build import coded_agreement, default_nprobe, stage_factories, write_codes
    from npm_hf.index.writing import compact_token_files, publish
    from npm_hf.inference.compact_tokens import compact_tokens_present
    from npm_hf.inference.index_files import FAISS_FILE, FORMAT_VERSION, IVFDATA_FILE, MANIFEST_FILE

    staging = path.parent / f".{path.name}.staging"
    shutil.rmtree(staging, ignore_errors=True)
    skip = {MANIFEST_FILE, FAISS_FILE, IVFDATA_FILE, *(s["file"] for s in exact.manifest.vector_shards)}
    if not exact.manifest.vector_shards:
        skip.add("vectors.npy")
    staging.mkdir(parents=True)
    for name in exact.manifest.files:
        if name not in skip:
            os.link(exact.path / name, staging / name)
    if not compact_tokens_present(staging):
        compact_token_files(staging, exact.manifest.block_size)
    hidden, vectors = exact.manifest.hidden_size, exact.vectors
    base_factory, codec_factory = stage_factories(factory)
    base = faiss.index_factory(hidden, base_factory, faiss.METRIC_INNER_PRODUCT)
    nprobe = nprobe or default_nprobe(base)
    if nprobe and default_nprobe(base):
        faiss.extract_index_ivf(base).nprobe = nprobe
    sample = np.sort(np.random.default_rng(0).choice(len(vectors), min(train, len(vectors)), replace=False))
    if not base.is_trained:
        base.train(np.asarray(vectors[sample], dtype=np.float32))
    for lo in range(0, len(vectors), 65536):
        base.add(np.asarray(vectors[lo : lo + 65536], dtype=np.float32))
    faiss.write_index(base, str(staging / FAISS_FILE))
    del base
    codes = write_codes(staging, vectors, codec_factory, hidden, train, 0, "10GB")
    codes["facts"].update(coded_agreement(staging, vectors, codes["layout"], codes["facts"]))
    manifest = dataclasses.replace(exact.manifest, format_version=FORMAT_VERSION, faiss_factory=factory,
                                   vector_dtype="none", vector_shards=codes["layout"], vector_codes=codes["facts"])
    publish(staging, path, manifest)
    return NPMIndex.load(path)


def top1_agrees(index, exact_vectors, query_vectors, reference) -> float:
    agrees = []
    for q, (best_scores, best_rows) in zip(query_vectors, reference):
        _, rows = index.search(q, K)
        exact_of_top = np.einsum("qd,qd->q", np.asarray(exact_vectors[rows[:, 0]], dtype=np.float32), q)
        agrees.append((rows[:, 0] == best_rows[:, 0]) | (exact_of_top >= best_scores[:, 0] * (1 - 1e-6)))
    return float(np.concatenate(agrees).mean())


def latency_ms(index, query_vectors) -> float:
    index.search(query_vectors[0], K)
    times = []
    for q in query_vectors:
        began = time.perf_counter()
        index.search(q, K)
        times.append(time.perf_counter() - began)
    return statistics.median(times) * 1e3


def answers(model, tokenizer, index, queries: list[str]) -> list[str]:
    from npm_hf import NonparametricFillMaskPipeline

    fill = NonparametricFillMaskPipeline(model=model, tokenizer=tokenizer, index=index, decoding={"k": K})
    return [fill(query, top_k=1)[0]["token_str"] for query in queries]


def index_bytes(index) -> int:
    return sum(p.stat().st_size for p in index.path.iterdir() if p.is_file())


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.8))
    xs = [r["bytes_per_token"] for r in results]
    ax.plot(xs, [r["agreement"] for r in results], "o", label="top-1 agreement with exact search (k=4096)")
    ax.plot(xs, [r["answer_agreement"] for r in results], "s", label="identical top-1 fill-mask answers")
    for r in results:
        ax.annotate(f"{r['label']}\n{r['latency_ms']:.0f} ms", (r["bytes_per_token"], r["agreement"]), fontsize=6,
                    xytext=(3, -12), textcoords="offset points")
    ax.axhline(GOAL_AGREEMENT, color="grey", lw=0.8, ls="--")
    ax.axvline(GOAL_BYTES, color="grey", lw=0.8, ls=":")
    ax.set_xscale("log")
    ax.set_xlabel("bytes on disk per indexed token (every file of the index)")
    ax.set_ylabel("fraction of queries")
    ax.set_title(f"Indexes without float16 vectors, MiniLM d=384, {results[0]['num_indexed']:,} indexed tokens")
    ax.legend(fontsize=8, loc="center left")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=130)


def measure(model, tokenizer, exact, chosen: list[dict], settings: dict, factories: list[str] | None,
            num_queries: int, workdir: Path, plot_path: Path | None = None, nprobe: int | None = None) -> list[dict]:
    """The P3d lines (see the module docstring) for the exact index `exact` over the documents `chosen`."""
    sentences = run.cloze_queries(chosen, None, num_queries)
    cloze = run.cloze_queries(chosen, tokenizer.mask_token, num_queries)
    query_vectors = run.p3_queries(model, tokenizer, sentences)
    reference = [exact.search(q, K) for q in query_vectors]
    exact_answers = answers(model, tokenizer, exact, cloze)
    results = [{"label": "Flat, float16 vectors (exact)", "factory": "Flat", "agreement": 1.0,
                "answer_agreement": 1.0, "bytes_per_token": index_bytes(exact) / exact.num_indexed,
                "latency_ms": latency_ms(exact, query_vectors), "num_indexed": exact.num_indexed}]
    print(json.dumps({"figure": "P3d Flat fp16", **results[0]}), flush=True)
    nlist = settings["p3_nlist"]
    factories = factories or default_factories(nlist, exact.manifest.hidden_size)
    for factory in factories:
        started = time.perf_counter()
        variant = compact_variant(exact, factory, workdir / f"v{len(results)}", settings["p3_train"], nprobe)
        built = time.perf_counter() - started
        got = answers(model, tokenizer, variant, cloze)
        result = {"label": factory + (f" nprobe {nprobe}" if nprobe and "IVF" in factory else ""), "factory": factory,
                  "agreement": top1_agrees(variant, exact.vectors, query_vectors, reference),
                  "answer_agreement": float(np.mean([a == b for a, b in zip(got, exact_answers)])),
                  "bytes_per_token": index_bytes(variant) / variant.num_indexed,
                  "latency_ms": latency_ms(variant, query_vectors), "num_indexed": variant.num_indexed,
                  "build_agreement": variant.manifest.vector_codes["top1_agreement"],
                  "files": {p.name: round(p.stat().st_size / variant.num_indexed, 2)
                            for p in sorted(variant.path.iterdir()) if p.is_file()},
                  "made_in_s": round(built, 1)}
        results.append(result)
        print(json.dumps({"figure": f"P3d {factory}", **result}), flush=True)
        shutil.rmtree(variant.path, ignore_errors=True)
    meeting = [r for r in results[1:] if r["agreement"] >= GOAL_AGREEMENT and r["answer_agreement"] >= GOAL_AGREEMENT]
    best = min(meeting, key=lambda r: r["bytes_per_token"]) if meeting else None
    run.emit("P3d", best["bytes_per_token"] if best else float("nan"), f"<= {GOAL_BYTES}",
             (f"bytes on disk per indexed token of the smallest index without vectors with >= 95 % top-1 agreement "
              f"and >= 95 % identical answers: {best['factory']} ({best['agreement']:.3f} / "
              f"{best['answer_agreement']:.3f})" if best else "no index without vectors reached 95 % on both")
             + f"; {exact.num_indexed} indexed tokens, {len(query_vectors)} sentences x 2 vectors, {len(cloze)} "
               "cloze queries, k=4096, measured on a loaded 2-core machine")
    if plot_path:
        plot(results, plot_path)
    return results


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="The 10^5-token index (the full run: 10^6).")
    parser.add_argument("--factories", default=None, help="';'-separated factories (default: a curve of them).")
    parser.add_argument("--queries", type=int, default=100, help="Sentences (x 2 vectors) and cloze queries.")
    parser.add_argument("--index", type=Path, default=None, help="A built P1 index to reuse (else built here).")
    parser.add_argument("--model", type=Path, default=None,
                        help="The NPM model directory of --index; without --index, the P1 index is built here with "
                             "this model (e.g. a trained NPM) instead of the untrained MiniLM.")
    parser.add_argument("--nprobe", type=int, default=None, help="IVF lists searched (default: a quarter).")
    parser.add_argument("--plot-from", type=Path, nargs="*", default=None,
                        help="Only plot (to --plot) the index lines of earlier runs' outputs (one or more files).")
    parser.add_argument("--plot", type=Path, default=None, help="Write the quality/size plot (PNG) here.")
    args = parser.parse_args(argv)
    if args.plot_from:
        lines = [json.loads(line) for path in args.plot_from for line in path.read_text().splitlines()
                 if line.startswith("{") and '"bytes_per_token"' in line]
        unique = {line["label"]: line for line in lines}  # a label measured twice: the last run
        plot(sorted(unique.values(), key=lambda line: line["factory"] != "Flat"), args.plot)
        return
    settings = run.SETTINGS["quick" if args.quick else "full"]
    run.quiet_libraries()
    from npm_hf import NPMIndex, load_npm

    documents = run.load_corpus()
    with tempfile.TemporaryDirectory(prefix="npm_hf-p3d-") as tmp:
        workdir = Path(tmp)
        if args.index is None:
            if args.model is None:
                model, tokenizer = run.make_model(workdir)
            else:
                model, tokenizer = load_npm(args.model)
                model.eval()
            counts = run.token_counts(documents, tokenizer)
            chosen = run.take_documents(documents, counts, settings["p1_tokens"])
            _, exact = run.build_seconds(model, tokenizer, chosen, workdir / "p1-index")
        else:
            model, tokenizer = load_npm(args.model)
            model.eval()
            exact = NPMIndex.load(args.index)
            counts = run.token_counts(documents, tokenizer)
            chosen = run.take_documents(documents, counts, settings["p1_tokens"])
        measure(model, tokenizer, exact, chosen, settings, args.factories.split(";") if args.factories else None,
                args.queries, workdir, args.plot, args.nprobe)


if __name__ == "__main__":
    main()
