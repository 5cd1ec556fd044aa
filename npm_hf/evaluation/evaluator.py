"""`npm_hf.evaluate`: zero-shot closed-set classification and open-set knowledge probing (method §3.2, §3.3).

An NPM is scored by retrieval from its index; any other masked LM (`AutoModelForMaskedLM`) goes through the stock
fill-mask pipeline on the same examples, so a model and its base can be compared in one harness.
"""

import json
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoModel, AutoModelForMaskedLM, AutoTokenizer, FillMaskPipeline
from transformers.utils import logging

from ..api import build_index
from ..fill_mask import is_npm_model
from ..hub_cards import load_card_facts, update_model_card
from ..index import IndexBuildArguments, NPMIndex
from ..inference.decoding import NPMDecodingConfig, as_decoding_config
from ..inference.pipeline import NonparametricFillMaskPipeline
from ..version import __version__
from . import metrics
from .tasks import Task, get_task, load_examples


logger = logging.get_logger(__name__)

PAPER_K = 4096
PAPER_CLOSED_TEMPERATURE = 5.0
PAPER_PREFILTER_BLOCKS = 3
SEARCH_BATCH = 64  # texts whose query vectors go to FAISS in one call
TOP_N = 5  # open-set answers kept per text (exact match at 1 and at TOP_N)


@dataclass
class EvaluationArguments:
    """What to evaluate and how (`npm_hf.evaluate`, `npm-hf evaluate`)."""

    task: str = field(metadata={"help": "sst2, mr, rt, cr, amazon, subj, agn, yahoo, rte, lama-trex or lama-google-re."})
    data: str | None = field(default=None, metadata={"help": "Data file, folder, or Hub dataset id."})
    data_dir: str | None = field(
        default=None, metadata={"help": "Folder with the offline copies of the task data (default: $NPM_HF_DATA_DIR)."}
    )
    max_examples: int = field(default=3000, metadata={"help": "Closed-set examples sampled (the paper: 3000)."})
    max_examples_per_bucket: int = field(
        default=1000, metadata={"help": "Open-set examples sampled per answer-length bucket (the paper: 1000)."}
    )
    seed: int = field(default=0, metadata={"help": "Seed of the example sample."})
    batch_size: int = field(default=16, metadata={"help": "Inputs encoded per forward pass."})
    k: int | None = field(default=None,
                          metadata={"help": "Neighbours per query vector (default: the model's decoding settings)."})
    temperature: float | None = field(default=None, metadata={"help": "Softmax temperature (default: config)."})
    apply_temperature_twice: bool | None = field(
        default=None, metadata={"help": "The official closed-set T^2 quirk (default: config)."}
    )
    span_stopwords: str | None = field(
        default=None, metadata={"help": "Open-set span filter: none, reference (the paper), any or edges (default: "
                                        "config)."}
    )
    fuzzy_verbalizer: bool = field(
        default=False, metadata={"help": "Score each label by a list of synonyms (closed-set tasks that have one)."}
    )
    prefilter: str | None = field(
        default=None,
        metadata={"help": "Open-set candidates: 'none' (FAISS top-k over the whole index), 'bm25' (the paper: top "
                          "blocks by BM25) or 'dense' (top blocks by mean-pooled embedding) (default: config)."},
    )
    prefilter_blocks: int | None = field(default=None, metadata={"help": "Passages kept by the pre-filter: blocks, "
                                                                          "or config.prefilter_passage_tokens windows "
                                                                          "(default: config, 3)."})
    prefilter_weight: float | None = field(
        default=None, metadata={"help": "Weight of the pre-filter's passage relevance in the token logits (0: a "
                                        "restriction only; default: config). Lexical tasks such as LAMA over "
                                        "evidence sentences gain from more of it than the demo's cloze set."})
    evidence_corpus: bool = field(
        default=False,
        metadata={"help": "LAMA tasks: retrieve from an index over the evaluated facts' own evidence sentences "
                          "(the oracle setting), built in a temporary folder."},
    )
    paper_protocol: bool = field(
        default=False,
        metadata={"help": "The paper's settings: k=4096; closed set T=5 with the T^2 quirk and fuzzy verbalisers; "
                          "open set T=1, spans without any stop-word id, BM25 top-3 pre-filter, over an index "
                          "without stop words (build-index --remove-stopwords; one built from --corpus is)."},
    )
    device: str | None = field(default=None, metadata={"help": "torch device, e.g. cpu or cuda:0 (default: cpu)."})
    show_progress_bar: bool = field(default=True, metadata={"help": "Show tqdm progress bars."})

    def __post_init__(self):
        self.task = get_task(self.task).name  # fails early on unknown tasks
        for name in ("max_examples", "max_examples_per_bucket", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"EvaluationArguments.{name} must be >= 1, got {getattr(self, name)}.")
        NPMDecodingConfig().update(**self.decoding_overrides())  # checked where every decoding setting is
        if self.prefilter in ("bm25", "dense") and get_task(self.task).kind == "closed":
            raise ValueError(f"Task {self.task!r} is closed-set: its label words are scored over the FAISS top-k of "
                             "the whole index, as in the paper; the pre-filter is for open-set tasks (LAMA, cloze). "
                             "Drop prefilter (CLI: --prefilter).")
        if self.evidence_corpus and get_task(self.task).evidence is None:
            raise ValueError(f"Task {self.task!r} has no evidence sentences; evidence_corpus is for the LAMA tasks.")
        if self.paper_protocol:
            self._apply_paper_protocol()

    def decoding_overrides(self) -> dict:
        """The run's decoding settings (`NPMDecodingConfig` fields) over the model's own; None = the model's."""
        names = ("k", "temperature", "apply_temperature_twice", "span_stopwords", "prefilter", "prefilter_blocks",
                 "prefilter_weight")
        overrides = {name: getattr(self, name) for name in names if getattr(self, name) is not None}
        if self.paper_protocol:  # the paper's pre-filter: whole blocks, a restriction only
            overrides |= {"prefilter_passage_tokens": "blocks", "prefilter_weight": 0.0}
        return overrides

    def _apply_paper_protocol(self) -> None:
        self.k = PAPER_K
        if get_task(self.task).kind == "closed":
            self.temperature, self.apply_temperature_twice = PAPER_CLOSED_TEMPERATURE, True
            self.fuzzy_verbalizer = get_task(self.task).fuzzy_words is not None
        else:
            self.temperature, self.apply_temperature_twice, self.span_stopwords = 1.0, False, "reference"
            self.prefilter, self.prefilter_blocks = "bm25", PAPER_PREFILTER_BLOCKS


def evaluate(model, args: EvaluationArguments, tokenizer=None, index=None, corpus=None,
             decoding: NPMDecodingConfig | dict | None = None) -> dict:
    """Evaluate `model` (an NPM or any masked LM: a loaded model, a directory or a Hub id) on `args.task`.

    An NPM retrieves from `index` (an `NPMIndex`), else from an index built over `corpus` (any corpus
    `npm_hf.build_index` takes, in a temporary folder), else from its own index, and decodes with its own decoding
    settings, then `decoding`, then the settings `args` gives. Returns a JSON-serialisable dict (see
    `results_to_markdown`).
    """
    task = get_task(args.task)
    examples, source = load_examples(task, args.data, args.data_dir)
    model, tokenizer = _load(model, tokenizer)
    if task.kind == "closed":
        examples, buckets = _sample(examples, args.max_examples, args.seed), None
    else:
        examples, buckets = _sample_per_bucket(examples, tokenizer, args)
    if args.evidence_corpus:
        if index is not None or corpus is not None:
            raise ValueError("evidence_corpus builds its own index; do not also pass an index or a corpus.")
        corpus = evidence_documents(task, examples)
    with tempfile.TemporaryDirectory(prefix="npm-eval-index-") as scratch:
        scorer = _scorer(model, tokenizer, args, index, corpus, scratch, decoding)
        started = time.perf_counter()
        if task.kind == "closed":
            results = _evaluate_closed(task, examples, scorer, args)
        else:
            results = _evaluate_open(task, examples, buckets, scorer, args)
        seconds = time.perf_counter() - started
        settings = {**asdict(args), **scorer.settings()}  # the effective values
        if task.kind == "closed" and "prefilter" in settings:  # label scoring never pre-filters (see label_scores)
            settings["prefilter"], settings["prefilter_blocks"] = "none", None
    results.update({
        "task": task.name, "model": _model_name(model), "model_type": scorer.kind, "data": source,
        "paper_corpus": task.paper_corpus, "settings": settings,
        "seconds": round(seconds, 3), "npm_hf_version": __version__,
    })
    return results


# --------------------------------------------------------------------------------------------- closed set
def _evaluate_closed(task: Task, examples: list[dict], scorer, args: EvaluationArguments) -> dict:
    words = task.fuzzy_words if args.fuzzy_verbalizer and task.fuzzy_words else task.label_words
    shortest = min(len(group) for group in words)  # as the official loader: every label gets as many words
    words = tuple(group[:shortest] for group in words)
    texts = [task.template(example, scorer.mask_token) for example in examples]
    scores = scorer.label_scores(texts, words, args)
    predictions = scores.argmax(axis=1).tolist()
    references = [example["label"] for example in examples]
    majority = int(np.bincount(references, minlength=task.num_labels).argmax())
    return {
        "metric": "accuracy",
        "score": metrics.accuracy(predictions, references),
        "majority_baseline": metrics.accuracy([majority] * len(references), references),
        "num_examples": len(examples),
        "label_words": [list(group) for group in words],
        "predictions": predictions,
    }


# ----------------------------------------------------------------------------------------------- open set
def _evaluate_open(task: Task, examples: list[dict], buckets: list[str], scorer, args: EvaluationArguments) -> dict:
    texts = [task.template(example, scorer.mask_token) for example in examples]
    ranked = scorer.predict_answers(texts, args)  # up to TOP_N answers per text, best first
    references = [example["answer"] for example in examples]
    result = metrics.bucketed_exact_match([answers[0] if answers else "" for answers in ranked], references, buckets)
    # top-N: an item counts when any of its answers matches, i.e. as if that answer had been the prediction
    best_of_n = [next((a for a in answers if metrics.exact_match(a, ref)), answers[0] if answers else "")
                 for answers, ref in zip(ranked, references)]
    at_n = metrics.bucketed_exact_match(best_of_n, references, buckets)
    return {"metric": "macro_exact_match", "score": result.pop("macro_exact_match"), **result,
            f"macro_exact_match_at_{TOP_N}": at_n["macro_exact_match"],
            f"micro_exact_match_at_{TOP_N}": at_n["micro_exact_match"],
            "num_examples": len(examples), "predictions": [answers[:TOP_N] for answers in ranked]}


def _sample_per_bucket(examples: list[dict], tokenizer, args: EvaluationArguments) -> tuple[list[dict], list[str]]:
    """Up to `max_examples_per_bucket` examples per answer-length bucket (in the model's tokens), as the paper."""
    lengths = [len(tokenizer(e["answer"], add_special_tokens=False)["input_ids"]) for e in examples]
    buckets = [metrics.length_bucket(n) for n in lengths]
    rng, chosen = np.random.default_rng(args.seed), []
    for bucket in metrics.LENGTH_BUCKETS:
        members = [i for i, b in enumerate(buckets) if b == bucket]
        if len(members) > args.max_examples_per_bucket:
            members = rng.choice(members, size=args.max_examples_per_bucket, replace=False).tolist()
        chosen.extend(members)
    chosen.sort()
    return [examples[i] for i in chosen], [buckets[i] for i in chosen]


def evidence_documents(task: Task, examples: list[dict]) -> list[dict]:
    """The evidence sentences of the given examples as a corpus (each distinct text once)."""
    texts = dict.fromkeys(text for example in examples for text in task.evidence(example))
    return [{"id": f"{task.name}-evidence-{i}", "title": "", "text": text} for i, text in enumerate(texts)]


def _sample(examples: list[dict], limit: int, seed: int) -> list[dict]:
    if len(examples) <= limit:
        return examples
    chosen = np.sort(np.random.default_rng(seed).choice(len(examples), size=limit, replace=False))
    return [examples[i] for i in chosen]


# ------------------------------------------------------------------------------------------------ scorers
class Scorer:
    """Turns task inputs into label scores (closed set) or ranked answers (open set) through a fill-mask pipeline."""

    kind = ""

    def __init__(self, pipe, show_progress_bar: bool = True):
        self.pipe = pipe
        self.mask_token = pipe.tokenizer.mask_token
        self.show_progress_bar = show_progress_bar


class NPMScorer(Scorer):
    """Scores inputs with an NPM: batched encoding, then retrieval from its index."""

    kind = "npm"

    def settings(self) -> dict:
        decoding, manifest = self.pipe.decoding, self.pipe.index.manifest
        names = ("k", "temperature", "apply_temperature_twice", "span_stopwords", "prefilter", "prefilter_blocks",
                 "prefilter_passage_tokens", "prefilter_weight")
        return {"mode": self.pipe.model.config.mode, **{name: getattr(decoding, name) for name in names},
                "index_tokens": manifest.num_tokens, "index_documents": manifest.num_documents,
                "faiss_factory": manifest.faiss_factory}

    def forward(self, texts: list[str], batch_size: int) -> list[dict]:
        """Batched encoding; per text, what the pipeline's `postprocess` takes (query vectors, pooled embedding)."""
        prepared = [self.pipe.preprocess(text) for text in texts]
        for text, item in zip(texts, prepared):
            if len(item["queries"]) != 1:
                raise ValueError(f"Evaluation inputs need exactly one mask; got {len(item['queries'])} in {text!r}.")
        outputs = []
        for lo in tqdm(range(0, len(prepared), batch_size), desc="Encoding queries", unit="batch",
                       disable=not self.show_progress_bar):
            outputs.extend(self.pipe.forward_batch(prepared[lo : lo + batch_size]))
        return outputs

    def label_scores(self, texts: list[str], words, args: EvaluationArguments) -> np.ndarray:
        phrases = [[self._phrase_ids(word) for word in group] for group in words]
        flat = [phrase for group in phrases for phrase in group]
        owner = np.repeat(np.arange(len(phrases)), [len(group) for group in phrases])
        scores = np.zeros((len(texts), len(phrases)))
        closed_set = self.pipe.decoding.update(prefilter="none")  # FAISS top-k over the whole index
        outputs = self.searched(self.forward(texts, args.batch_size), closed_set)
        predictor = self.pipe.predictor.using(closed_set)
        for row, output in enumerate(tqdm(outputs, desc="Scoring labels", disable=not self.show_progress_bar)):
            probabilities = predictor.phrase_probabilities(output["query_vectors"][0], flat, hits=output["hits"][0])
            scores[row] = np.bincount(owner, weights=probabilities, minlength=len(phrases))
        return scores

    def searched(self, outputs: list[dict], decoding=None) -> list[dict]:
        """`outputs` with their FAISS hits attached, SEARCH_BATCH texts per FAISS call (none where `decoding`,
        default the pipeline's, pre-filters)."""
        for lo in range(0, len(outputs), SEARCH_BATCH):
            self.pipe.search_batch(outputs[lo : lo + SEARCH_BATCH], decoding)
        return outputs

    def predict_answers(self, texts: list[str], args: EvaluationArguments) -> list[list[str]]:
        if self.pipe.model.config.mode != "span":
            raise ValueError("Open-set tasks need a span-mode NPM (NPM-single answers single tokens only, as in the "
                             "paper); set config.mode='span'.")
        outputs = self.searched(self.forward(texts, args.batch_size))  # no hits where a pre-filter applies
        return [[answer["phrase"] for answer in self.pipe.postprocess(output, top_k=TOP_N)]
                for output in tqdm(outputs, desc="Predicting spans", disable=not self.show_progress_bar)]

    def _phrase_ids(self, word: str) -> list[int]:
        ids = self.pipe.tokenizer(word, add_special_tokens=False)["input_ids"]
        if not ids:
            raise ValueError(f"The label word {word!r} tokenizes to nothing with this tokenizer; choose another word.")
        return ids


class MaskedLMScorer(Scorer):
    """The parametric baseline: any masked LM through the stock `FillMaskPipeline` (single-token answers)."""

    kind = "masked-lm"

    def settings(self) -> dict:
        return {"mode": "parametric"}

    def label_scores(self, texts: list[str], words, args: EvaluationArguments) -> np.ndarray:
        first_ids = {}  # the stock pipeline scores a word by its first token (it warns about longer ones)
        for group in words:
            for word in group:
                ids = self.pipe.tokenizer(word, add_special_tokens=False)["input_ids"]
                if not ids:
                    raise ValueError(f"The label word {word!r} tokenizes to nothing with this tokenizer.")
                first_ids[word] = ids[0]
        targets = list(dict.fromkeys(self.pipe.tokenizer.convert_ids_to_tokens(list(first_ids.values()))))
        scores = np.zeros((len(texts), len(words)))
        outputs = self._run(texts, targets=targets, top_k=len(targets), batch_size=args.batch_size)
        for row, answers in enumerate(tqdm(outputs, total=len(texts), desc="Scoring labels",
                                           disable=not self.show_progress_bar)):
            by_token = {answer["token"]: answer["score"] for answer in answers}
            for label, group in enumerate(words):
                scores[row, label] = sum(by_token.get(first_ids[word], 0.0) for word in group)
        return scores

    def predict_answers(self, texts: list[str], args: EvaluationArguments) -> list[list[str]]:
        outputs = self._run(texts, top_k=TOP_N, batch_size=args.batch_size)
        return [[answer["token_str"].strip() for answer in output]
                for output in tqdm(outputs, total=len(texts), desc="Predicting", disable=not self.show_progress_bar)]

    def _run(self, texts: list[str], **kwargs) -> list[list[dict]]:
        """The stock pipeline's answers, one list per text (it unwraps the list of a single input)."""
        outputs = self.pipe(texts, **kwargs)
        outputs = [outputs] if len(texts) == 1 else outputs
        return [output if isinstance(output, list) else [output] for output in outputs]


def _load(model, tokenizer):
    if isinstance(model, (str, os.PathLike)):
        name = str(model)
        tokenizer = tokenizer or AutoTokenizer.from_pretrained(name)
        if AutoConfig.from_pretrained(name).model_type == "npm":
            model = AutoModel.from_pretrained(name)
        else:
            model = AutoModelForMaskedLM.from_pretrained(name)
    elif tokenizer is None:
        tokenizer = AutoTokenizer.from_pretrained(model.name_or_path)
    if tokenizer.mask_token is None:
        raise ValueError("The tokenizer has no mask token; evaluation needs a masked language model's tokenizer.")
    return model.eval(), tokenizer


def _scorer(model, tokenizer, args: EvaluationArguments, index, corpus, scratch: str, decoding=None):
    if args.device is not None:
        model.to(args.device)  # before any index build, which encodes on the model's device
    if not is_npm_model(model):
        if index is not None or corpus is not None:
            raise ValueError("An index or corpus was given for a model that is not an NPM: parametric masked LMs "
                             "do not retrieve. Convert it first (npm-hf convert) to evaluate it as an NPM.")
        return MaskedLMScorer(FillMaskPipeline(model=model, tokenizer=tokenizer, device=args.device),
                              args.show_progress_bar)
    paper_open_set = args.paper_protocol and get_task(args.task).kind != "closed"
    if index is None and corpus is not None:
        index = build_index(model, corpus, output_dir=Path(scratch) / "index", tokenizer=tokenizer,
                            args=IndexBuildArguments(block_size=min(256, model.config.max_input_length),
                                                     remove_stopwords=paper_open_set,
                                                     show_progress_bar=args.show_progress_bar))
    if index is None:
        try:
            index = NPMIndex.for_model(model)
        except (OSError, ValueError) as error:  # no index folder / not on the Hub / not a valid index
            raise ValueError(f"The model has no index ({error}); pass a corpus (--corpus) or an index (--index) "
                             "to evaluate it.") from None
    elif isinstance(index, (str, os.PathLike)):  # a folder; index objects (NPMIndex, wrappers of it) pass as they are
        index = NPMIndex.load(index)
    manifest = getattr(index, "manifest", None)
    if paper_open_set and not getattr(manifest, "stopwords_removed", False):
        raise ValueError(
            "The paper protocol's open-set evaluation retrieves from an index without stop-word tokens (the official "
            "open-set datastore: they are in neither softmax), and this index has them. Build one with `npm-hf "
            "build-index --model MODEL --corpus CORPUS --output DIR --remove-stopwords` (IndexBuildArguments("
            "remove_stopwords=True)) and pass it as --index, or pass --corpus to have one built.")
    base = as_decoding_config(decoding, base=NPMDecodingConfig.for_model(model))
    pipe = NonparametricFillMaskPipeline(model=model, tokenizer=tokenizer, index=index, device=args.device,
                                         decoding=base.update(**args.decoding_overrides()))
    return NPMScorer(pipe, args.show_progress_bar)


def _model_name(model) -> str:
    return str(getattr(model, "name_or_path", "") or type(model).__name__)


# ------------------------------------------------------------------------------------------------- output
def save_results(results: dict | list[dict], path) -> Path:
    """Write results as JSON atomically (temporary name, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(temporary, path)
    return path


RETRIEVAL_NAMES = {"none": "FAISS top-k", "bm25": "BM25 blocks + exact", "dense": "dense blocks + exact"}


def _retrieval_name(result: dict) -> str:
    if result["model_type"] == "masked-lm":
        return "parametric"
    name = RETRIEVAL_NAMES.get(result["settings"].get("prefilter"), "")
    return name + (" (evidence corpus)" if result["settings"].get("evidence_corpus") else "")


def record_results_in_card(model_dir, results: list[dict]) -> None:
    """Add evaluation results to the Evaluation table of a local model directory's card (README.md): one row per
    metric, named by task, metric and retrieval; a result measured again replaces its old rows."""
    if not Path(model_dir).is_dir():
        raise ValueError(f"Cannot record results in the card of {model_dir!r}: it is not a local model directory "
                         "(for a Hub model, download it first, then push the updated card).")
    rows = []
    for r in results:
        at_n = r.get(f"macro_exact_match_at_{TOP_N}", r.get(f"micro_exact_match_at_{TOP_N}"))
        for metric, value in ((r["metric"], r["score"]), (f"{r['metric']}@{TOP_N}", at_n)):
            if value is not None:
                rows.append({"task": r["task"], "dataset": f"{r['task']} ({r['num_examples']} examples)",
                             "metric": f"{metric} ({_retrieval_name(r)})", "value": round(100 * value, 1)})
    replaced = {(row["task"], row["metric"]) for row in rows}
    kept = [row for row in load_card_facts(model_dir).get("eval_results", [])
            if (row.get("task"), row.get("metric")) not in replaced]
    if not update_model_card(model_dir, eval_results=kept + rows):
        raise OSError(f"Could not write the model card in {model_dir}; see the warning above.")


def results_to_markdown(results: list[dict]) -> str:
    """A Markdown table of evaluation results (one row per result)."""
    lines = [f"| Task | Model | Retrieval | Metric | Score | Score@{TOP_N} | Majority | Examples |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        majority = f"{100 * r['majority_baseline']:.1f}" if "majority_baseline" in r else "–"
        retrieval = _retrieval_name(r)
        at_n = r.get(f"macro_exact_match_at_{TOP_N}")
        at_n = "–" if at_n is None else f"{100 * at_n:.1f}"
        lines.append(f"| {r['task']} | {r['model']} | {retrieval} | {r['metric']} | {100 * r['score']:.1f} | {at_n} | "
                     f"{majority} | {r['num_examples']} |")
    return "\n".join(lines)
