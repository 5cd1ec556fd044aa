"""A held-out cloze set built from a corpus (the CPU probe's method): entity-like answers that also occur elsewhere
in the corpus, with the query sentences cut out of the documents used for training and for the index.

    queries, documents = build_cloze_set(documents, num_queries=100)
    # queries: [{"masked": "... [MASK] ...", "answer": "Ohio River", "doc_id": ...}]; documents: the rest
    lexical_cloze_baseline(index, queries)  # what retrieval alone answers, no encoder: the floor to beat
"""

import re
from collections import Counter

import numpy as np

from ..inference.prefilter import BM25PassageRetriever, passage_texts
from ..inference.stopwords import STOPWORDS
from .metrics import exact_match


MASK_PLACEHOLDER = "[MASK]"
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"'(])")
_CAPITALISED_RUN = re.compile(r"\b([A-Z][\w\-]*(?:\s+(?:of\s+)?[A-Z][\w\-]*){0,3})\b")
_MONTHS = {"January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
           "November", "December"}
_WORD = re.compile(r"[A-Za-z]{3,}")


def split_sentences(text: str) -> list[str]:
    """Sentences of a text: lines, split after ., ! or ? before a capital or quote."""
    return [s.strip() for line in text.splitlines() for s in _SENTENCE_END.split(line) if s.strip()]


def build_cloze_set(documents: list[dict], num_queries: int = 100, seed: int = 0, min_occurrences: int = 3,
                    max_occurrences: int = 31, min_words: int = 10, max_words: int = 40) -> tuple[list[dict], list[dict]]:
    """Pick at most one cloze query per document and return `(queries, documents without the query sentences)`.

    An answer is a run of 1-4 capitalised words (an inner "of" allowed), not the sentence's first word, not a month
    or the document's title, without a function word at either edge, once in its sentence, and 3-31 times in the
    whole corpus (so it stays retrievable once its sentence is cut). Another sentence with the answer must share
    at least two content words with the query sentence, so that the answer can be found from context.
    """
    if num_queries < 1:
        raise ValueError(f"num_queries must be >= 1, got {num_queries}.")
    sentences = [split_sentences(doc["text"]) for doc in documents]
    everything = "\n".join(doc["text"] for doc in documents)
    counts = Counter()
    rng = np.random.default_rng(seed)
    queries, removed = [], {}
    for number in rng.permutation(len(documents)).tolist():
        doc = documents[number]
        for index in rng.permutation(len(sentences[number])).tolist():
            query = _query_from(sentences[number][index], doc, sentences, everything, counts, min_occurrences,
                                max_occurrences, min_words, max_words)
            if query is not None:
                queries.append(query)
                removed[number] = sentences[number][index]
                break
        if len(queries) == num_queries:
            break
    remaining = [{**doc, "text": doc["text"].replace(removed[i], " ").strip()} if i in removed else doc
                 for i, doc in enumerate(documents)]
    return queries, remaining


def _query_from(sentence, doc, sentences, everything, counts, min_occurrences, max_occurrences, min_words,
                max_words) -> dict | None:
    if not min_words <= len(sentence.split()) <= max_words:
        return None
    for match in _CAPITALISED_RUN.finditer(sentence):
        answer = match.group(1)
        words = answer.split()
        if match.start() == 0 or words[0].lower() in STOPWORDS or words[-1].lower() in STOPWORDS:
            continue
        if answer in _MONTHS or answer == doc.get("title") or sentence.count(answer) != 1:
            continue
        pattern = re.compile(rf"\b{re.escape(answer)}\b")
        if answer not in counts:
            counts[answer] = len(pattern.findall(everything))
        if not min_occurrences <= counts[answer] <= max_occurrences:
            continue
        if not _answerable(sentence, answer, pattern, sentences):
            continue
        return {"masked": sentence[: match.start()] + MASK_PLACEHOLDER + sentence[match.end() :], "answer": answer,
                "doc_id": str(doc.get("id", "")), "sentence": sentence}
    return None


def _answerable(sentence: str, answer: str, pattern, sentences) -> bool:
    content = _content_words(sentence.replace(answer, " "))
    for document in sentences:
        for other in document:
            if other != sentence and answer in other and pattern.search(other):
                if len(content & _content_words(other.replace(answer, " "))) >= 2:
                    return True
    return False


def _content_words(text: str) -> set[str]:
    return {w.lower() for w in _WORD.findall(text) if w.lower() not in STOPWORDS}


def lexical_cloze_baseline(index, queries: list[dict], blocks: int = 3) -> dict:
    """Exact match at 1 and 5 of a baseline without any encoder: BM25's top `blocks` blocks of `index` for each
    query (mask removed), answered with their most frequent capitalised 1-4-word runs that the query lacks."""
    retriever = BM25PassageRetriever(index)
    texts = passage_texts(index, retriever.ranges)
    masked = [query["masked"].replace(MASK_PLACEHOLDER, " ") for query in queries]
    at1 = at5 = 0
    for text, query, (top, _) in zip(masked, queries, retriever.top_passages(masked, blocks)):
        counts = Counter(m.group(1) for b in top for m in _CAPITALISED_RUN.finditer(texts[b]))
        ranked = [phrase for phrase, _ in counts.most_common() if not re.search(rf"\b{re.escape(phrase)}\b", text)]
        at1 += bool(ranked) and exact_match(ranked[0], query["answer"])
        at5 += any(exact_match(phrase, query["answer"]) for phrase in ranked[:5])
    return {"exact_match_at_1": at1 / len(queries), "exact_match_at_5": at5 / len(queries)}
