"""A web demo of an NPM (Gradio): type a text with a mask, see the top answers with their scores as bars, each with
the passage it was retrieved from, the answer highlighted in it, and the document's title.

`npm-hf gradio --model DIR` serves it; `spaces/npm-demo/app.py` is the same demo as a Hugging Face Space. Gradio is
an optional dependency (`pip install "npm-hf[gradio]"`); the rest of npm_hf works without it.
"""

import html
import os
from dataclasses import dataclass, field

from transformers.utils import logging

from .api import load_npm
from .index import NPMIndex
from .inference.decoding import CHOICES
from .inference.pipeline import NonparametricFillMaskPipeline


logger = logging.get_logger(__name__)

PASSAGE_CONTEXT_CHARS = 300  # characters of the passage shown on each side of the answer
MAX_TOP_K = 20
CSS = """
.npm-answer { margin: 0 0 1.1em 0; }
.npm-head { display: flex; gap: .6em; align-items: baseline; font-size: 1.05em; }
.npm-rank { color: #888; min-width: 1.5em; }
.npm-phrase { font-weight: 600; }
.npm-score { margin-left: auto; font-variant-numeric: tabular-nums; color: #555; }
.npm-bar { background: #eee; border-radius: 3px; height: .55em; margin: .25em 0 .35em 0; }
.npm-bar-fill { background: #f59e0b; border-radius: 3px; height: 100%; }
.npm-source { color: #555; font-size: .9em; }
.npm-passage { margin: .2em 0 0 0; line-height: 1.45; }
.npm-passage mark { background: #fde68a; padding: 0 .15em; border-radius: 2px; }
.npm-message { color: #b45309; }
"""


@dataclass
class WebDemoArguments:
    """What `npm-hf gradio` serves and where."""

    model: str = field(metadata={"help": "NPM directory or Hub id (with its index)."})
    index: str | None = field(default=None, metadata={"help": "Index directory (default: the model's own)."})
    host: str = field(default="127.0.0.1", metadata={"help": "Address to listen on (0.0.0.0: every interface)."})
    port: int = field(default=7860, metadata={"help": "Port to listen on (1-65535)."})
    top_k: int = field(default=5, metadata={"help": f"Answers shown at first (1-{MAX_TOP_K}; a control in the page)."})
    device: str | None = field(default=None, metadata={"help": "torch device, e.g. cpu or cuda:0."})

    def __post_init__(self):
        if not str(self.model).strip():
            raise ValueError("--model is empty; pass an NPM directory or Hub id.")
        if not str(self.host).strip():
            raise ValueError("--host is empty; pass an address such as 127.0.0.1 or 0.0.0.0.")
        if isinstance(self.port, bool) or not isinstance(self.port, int) or not 1 <= self.port <= 65535:
            raise ValueError(f"--port must be an integer in 1-65535, got {self.port!r}.")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or not 1 <= self.top_k <= MAX_TOP_K:
            raise ValueError(f"--top-k must be an integer in 1-{MAX_TOP_K}, got {self.top_k!r}.")


def load_fill_mask(model: str, index: str | None = None, device: str | None = None) -> NonparametricFillMaskPipeline:
    """The NPM fill-mask pipeline the demo answers with: the model and its own index (or `index`)."""
    try:
        npm, tokenizer = load_npm(model)
    except OSError as error:  # neither a directory nor a reachable Hub repo
        raise ValueError(f"Cannot load the NPM {model!r}: pass an NPM directory (npm-hf convert/train) or Hub id "
                         f"({str(error).splitlines()[0]})") from None
    reader = NPMIndex.load(index) if index else NPMIndex.for_model(npm)
    return NonparametricFillMaskPipeline(model=npm, tokenizer=tokenizer, index=reader, device=device)


def render_answers(answers: list[dict]) -> str:
    """HTML of the answers, best first: rank, phrase, score and a bar as long as the score, the document title, and
    the passage around the answer with the answer in a <mark>. Every corpus text is escaped."""
    if not answers:
        return '<p class="npm-message">No answer: nothing in the index matched.</p>'
    parts = ['<div class="npm-answers">']
    for rank, answer in enumerate(answers, start=1):
        score = float(answer["score"])
        evidence = answer.get("evidence") or {}
        parts.append(f'<div class="npm-answer" data-rank="{rank}">')
        parts.append(f'<div class="npm-head"><span class="npm-rank">{rank}.</span>'
                     f'<span class="npm-phrase">{html.escape(answer["phrase"])}</span>'
                     f'<span class="npm-score">{score:.4f}</span></div>')
        width = 100 * min(max(score, 0.0), 1.0)
        parts.append(f'<div class="npm-bar"><div class="npm-bar-fill" style="width: {width:.1f}%"></div></div>')
        if evidence:
            title = evidence.get("title") or evidence.get("doc_id") or "untitled document"
            parts.append(f'<div class="npm-source">from <span class="npm-title">{html.escape(str(title))}</span>'
                         f'</div>')
            parts.append(f'<p class="npm-passage">{highlight(evidence["text"], evidence["start"], evidence["end"])}'
                         '</p>')
        parts.append("</div>")
    parts.append("</div>")
    return "".join(parts)


def highlight(text: str, start: int, end: int, context: int = PASSAGE_CONTEXT_CHARS) -> str:
    """`text[start:end]` in a <mark>, with up to `context` characters on each side (… where cut), escaped."""
    if not 0 <= start <= end <= len(text):
        raise ValueError(f"Evidence span {start}..{end} lies outside its passage of {len(text)} characters.")
    lo, hi = max(0, start - context), min(len(text), end + context)
    before = ("…" if lo > 0 else "") + html.escape(text[lo:start])
    after = html.escape(text[end:hi]) + ("…" if hi < len(text) else "")
    return f'{before}<mark class="npm-evidence">{html.escape(text[start:end])}</mark>{after}'


class WebDemo:
    """The demo's logic, apart from Gradio: `answer(text, top_k, prefilter, k)` returns the HTML shown."""

    def __init__(self, fill_mask: NonparametricFillMaskPipeline):
        self.fill_mask = fill_mask
        self.mask_token = fill_mask.tokenizer.mask_token
        self.default_k = fill_mask.decoding.k
        self.default_prefilter = fill_mask.decoding.prefilter

    def example(self) -> str:
        return f"Hagios Demetrios is located in {self.mask_token}."

    def answer(self, text: str, top_k: int = 5, prefilter: str | None = None, k: int | None = None) -> str:
        """The answers to `text` as HTML; a bad input gives a message saying what to change, not an exception."""
        text = (text or "").strip()
        if not text:
            return _message(f"Type a text with one {self.mask_token} where the answer goes.")
        if self.mask_token not in text:
            return _message(f"The text has no mask: put {self.mask_token} where the answer goes.")
        try:
            top_k = _whole_number("top-k", top_k, 1, MAX_TOP_K)
            k = self.default_k if k in (None, "") else _whole_number("k", k, 1, None)
            prefilter = prefilter or self.default_prefilter
            if prefilter not in CHOICES["prefilter"]:
                raise ValueError(f"pre-filter must be one of {', '.join(CHOICES['prefilter'])}, got {prefilter!r}.")
            answers = self.fill_mask(text, top_k=top_k, k=k, prefilter=prefilter)
        except ValueError as error:
            return _message(str(error))
        if answers and isinstance(answers[0], list):  # several masks: the demo shows the first one's answers
            answers = answers[0]
        return render_answers(answers)


def _whole_number(name: str, value, lo: int, hi: int | None) -> int:
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < lo or (hi is not None and value > hi):
        allowed = f"{lo}-{hi}" if hi is not None else f">= {lo}"
        raise ValueError(f"{name} must be a whole number {allowed}, got {value!r}.")
    return value


def _message(text: str) -> str:
    return f'<p class="npm-message">{html.escape(text)}</p>'


def _gradio():
    try:
        import gradio
    except ImportError:
        raise ImportError('The web demo needs Gradio: pip install "npm-hf[gradio]"') from None
    return gradio


def build_demo(demo: WebDemo, top_k: int = 5, title: str = "NPM: answers retrieved from a corpus"):
    """The Gradio Blocks of `demo`: a text box with a mask, the decoding options as controls, the answers."""
    gr = _gradio()
    with gr.Blocks(title=title, analytics_enabled=False) as blocks:
        gr.Markdown(f"## {title}\nType a text with **{html.escape(demo.mask_token)}** where the answer goes. Each "
                    "answer is a phrase of the reference corpus, shown in the passage it was retrieved from.")
        with gr.Row():
            text = gr.Textbox(label="Text with a mask", value=demo.example(), lines=1, scale=4, elem_id="npm-text")
            submit = gr.Button("Fill the mask", variant="primary", scale=1, elem_id="npm-submit")
        with gr.Row():
            top = gr.Slider(1, MAX_TOP_K, value=top_k, step=1, label="Answers (top-k)", elem_id="npm-top-k")
            prefilter = gr.Dropdown(list(CHOICES["prefilter"]), value=demo.default_prefilter,
                                    label="Pre-filter (none: the whole index)", elem_id="npm-prefilter")
            k = gr.Number(value=demo.default_k, precision=0, minimum=1, label="Neighbours per query vector (k)",
                          elem_id="npm-k")
        answers = gr.HTML(elem_id="npm-answers")
        inputs = [text, top, prefilter, k]
        submit.click(demo.answer, inputs=inputs, outputs=answers)
        text.submit(demo.answer, inputs=inputs, outputs=answers)
    return blocks


def launch_demo(args: WebDemoArguments, **launch_kwargs):
    """Load the model, build the demo and serve it (blocks until stopped, unless `prevent_thread_lock=True`)."""
    blocks = build_demo(WebDemo(load_fill_mask(args.model, args.index, args.device)), top_k=args.top_k)
    logger.info(f"Serving the NPM demo of {args.model} on http://{args.host}:{args.port}")
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    return blocks.launch(server_name=args.host, server_port=args.port, css=CSS, **launch_kwargs)
