"""Model cards built from data: each step (convert, index build, training, evaluation) merges its facts into
`npm_card.json` beside the weights and the README is re-rendered from them.

An existing README keeps everything outside the `<!-- npm-hf:start -->` … `<!-- npm-hf:end -->` block and every
YAML key it set; a card problem is logged, never raised, so it cannot break a save.
"""

import dataclasses
import json
import os
import uuid
from pathlib import Path

from huggingface_hub import EvalResult, ModelCard, ModelCardData
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id
from transformers import TrainerCallback
from transformers.utils import logging


logger = logging.get_logger(__name__)

CARD_FILE = "README.md"
FACTS_FILE = "npm_card.json"
TEMPLATE = Path(__file__).with_name("model_card_template.md")
START, END = "<!-- npm-hf:start -->", "<!-- npm-hf:end -->"
TAGS = ["npm", "nonparametric", "retrieval", "fill-mask"]
DECODING_FILE = "decoding_config.json"  # npm_hf.inference.decoding.DECODING_CONFIG_FILE
EXAMPLE = "Hagios Demetrios is located in {mask}."
# Trainer arguments a time-budgeted run (max_train_minutes) does not go by: its max_steps is a placeholder
TIME_BUDGET_PLACEHOLDERS = ("max_steps", "num_train_epochs")


def update_model_card(model_dir, **facts) -> bool:
    """Merge `facts` (base_model, model_id, mode, index, training, eval_results, baselines, versions, license,
    datasets, language) into the directory's card facts and re-render its README. Returns whether the card was
    written. `baselines` are other models' results on the same data, eval_results' keys plus `model`: shown in the
    text, never in the model-index metadata."""
    try:
        model_dir = Path(model_dir)
        stored = load_card_facts(model_dir)
        if facts.get("index") is not None:  # the facts of one index, measured together: a new index replaces them
            stored.pop("index", None)
        merged = _merge(stored, facts)
        _write_atomically(model_dir / FACTS_FILE, json.dumps(merged, indent=2, sort_keys=True))
        shown = {**directory_facts(model_dir, merged), **merged}
        _write_atomically(model_dir / CARD_FILE, render_model_card(shown, model_dir / CARD_FILE))
        return True
    except Exception as error:  # a card must never break a save
        logger.warning(f"Could not write the model card in {model_dir}: {error}")
        return False


def directory_facts(model_dir, facts: dict | None = None) -> dict:
    """Facts the card reads from the directory's own files at each rendering (they are the truth, so they are not
    copied into npm_card.json): the decoding settings (decoding_config.json) and, unless the facts hold an
    example, one with the tokenizer's own mask token (tokenizer_config.json)."""
    model_dir, found = Path(model_dir), {}
    try:
        found["decoding"] = json.loads((model_dir / DECODING_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        pass
    mask = mask_token_of(model_dir)
    if mask and not (facts or {}).get("example"):
        found["example"] = EXAMPLE.format(mask=mask)
    return found


def mask_token_of(model_dir) -> str | None:
    """The mask token named in a directory's tokenizer_config.json (None where there is none)."""
    try:
        token = json.loads((Path(model_dir) / "tokenizer_config.json").read_text(encoding="utf-8")).get("mask_token")
    except (OSError, ValueError, AttributeError):
        return None
    token = token.get("content") if isinstance(token, dict) else token
    return token if isinstance(token, str) and token else None


def load_card_facts(model_dir) -> dict:
    path = Path(model_dir) / FACTS_FILE
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def render_model_card(facts: dict, existing_readme: Path | None = None) -> str:
    """The README text for `facts`, keeping the user's parts of an existing README."""
    data = ModelCardData(
        library_name="transformers", pipeline_tag="fill-mask", tags=list(TAGS),
        base_model=_hub_repo_id(facts.get("base_model")),
        license=facts.get("license"), datasets=facts.get("datasets"), language=facts.get("language"),
        model_name=facts.get("model_id"), eval_results=_eval_results(facts.get("eval_results", [])) or None,
    )
    variables = {
        "model_name": facts.get("model_id") or "NPM",
        "model_id": facts.get("model_id") or "path/to/this-model",
        "mode": facts.get("mode", "span"),
        "base_model": facts.get("base_model"),
        "example": facts.get("example") or EXAMPLE.format(mask="<mask>"),
        "index": facts.get("index"),
        "decoding": facts.get("decoding"),
        "training": facts.get("training"),
        "eval_results": facts.get("eval_results"),
        "baselines": facts.get("baselines"),
        "npm_hf_version": facts.get("versions", {}).get("npm_hf", ""),
    }
    card = ModelCard.from_template(data, template_path=str(TEMPLATE), **variables)
    if existing_readme is None or not Path(existing_readme).is_file():
        return str(card)
    return _merge_into_existing(ModelCard.load(existing_readme), card)


def _merge_into_existing(existing: ModelCard, fresh: ModelCard) -> str:
    """The user's README with our YAML keys added (theirs win on conflicts, tags are united, except the evaluation
    results: ours are rendered from the card facts, which hold every result recorded, so an older rendering of them
    must not win) and our block replaced."""
    ours, theirs = fresh.data.to_dict(), existing.data.to_dict()
    header = {**ours, **theirs, "tags": sorted(set(ours.get("tags", [])) | set(theirs.get("tags") or []))}
    if "model-index" in ours:
        header["model-index"] = ours["model-index"]
    block = fresh.text[fresh.text.index(START) : fresh.text.index(END) + len(END)]
    text = existing.text
    if START in text and END in text:
        text = text[: text.index(START)] + block + text[text.index(END) + len(END) :]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    return f"---\n{ModelCardData(**header).to_yaml()}\n---\n{text}"


def _hub_repo_id(name: str | None) -> str | None:
    """`name` when it can be a Hub repo id: the Hub rejects a card whose `base_model` is a local path (the card's
    text still names the path)."""
    if not name or os.path.isabs(name) or name.startswith(("~", ".")) or Path(name).exists():
        return None
    try:
        validate_repo_id(name)
    except HFValidationError:
        return None
    return name


def _eval_results(results: list[dict]) -> list[EvalResult]:
    return [
        EvalResult(task_type="fill-mask", dataset_type=r["dataset"], dataset_name=r["dataset"],
                   metric_type=r["metric"], metric_value=r["value"], task_name=r.get("task"))
        for r in results
    ]


def _merge(base: dict, update: dict) -> dict:
    merged = dict(base)
    for key, value in update.items():
        if value is None:
            continue
        merged[key] = _merge(merged[key], value) if isinstance(value, dict) and isinstance(merged.get(key), dict) \
            else value
    return merged


def _write_atomically(path: Path, text: str) -> None:
    staging = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    staging.write_text(text, encoding="utf-8")
    os.replace(staging, path)


class NPMModelCardCallback(TrainerCallback):
    """Records the training run (hyper-parameters that differ from the defaults, steps, loss curve summary) in the
    card of the Trainer's output directory at the end of training."""

    def __init__(self):
        self.losses: list[float] = []
        self.hyperparameters: dict = {}

    def on_train_begin(self, args, state, control, **kwargs):
        defaults = {f.name: f.default for f in dataclasses.fields(type(args)) if f.default is not dataclasses.MISSING}
        shown = ("learning_rate", "per_device_train_batch_size", "gradient_accumulation_steps", "max_steps",
                 "num_train_epochs", "warmup_steps", "weight_decay", "max_grad_norm", "lr_scheduler_type", "seed",
                 "mask_ratio", "geometric_p", "max_masked_span_length", "bf16", "fp16", "key_gradients",
                 "freeze_embeddings", "salient_span_ratio", "max_train_minutes", "schedule_by_time")
        current = args.to_dict()
        if current.get("max_train_minutes"):  # the budget ends the run; its max_steps only has to be large
            shown = tuple(name for name in shown if name not in TIME_BUDGET_PLACEHOLDERS)
        self.hyperparameters = {name: current[name] for name in shown
                                if name in current and (name not in defaults or current[name] != defaults[name]
                                                        or name in ("learning_rate", "per_device_train_batch_size"))}
        self.hyperparameters["world_size"] = args.world_size

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.losses.append(round(float(logs["loss"]), 4))

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if not state.is_world_process_zero:
            return
        loss = {"first": self.losses[0], "last": self.losses[-1], "min": min(self.losses)} if self.losses else None
        config = getattr(model, "config", None)
        mask = getattr(kwargs.get("processing_class"), "mask_token", None)
        update_model_card(args.output_dir, model_id=str(args.output_dir), mode=getattr(config, "mode", None),
                          example=EXAMPLE.format(mask=mask) if isinstance(mask, str) and mask else None,
                          base_model=load_card_facts(args.output_dir).get("base_model") or
                          getattr(config, "_name_or_path", None) or None,
                          training={"steps": state.global_step, "loss": loss, "hyperparameters": self.hyperparameters})
