"""Reading a reference corpus and cutting it into NPM blocks.

A corpus is a sequence of documents `{"id", "title", "text"}`. As in the official code
(`preprocess/create_blocks_from_plain_text`, method §2), each paragraph (a line with visible text) is tokenized as its
own sequence with its special tokens (`[CLS] … [SEP]` / `<s> … </s>`), and a document's paragraphs are packed greedily
into blocks of at most `block_size` tokens: a paragraph that fits joins the current block, one that does not but fits
a block starts a new one, and only a paragraph longer than a block is split (it fills the current block, then
continues in new ones). A block never holds two documents; a paragraph that contains the mask token is skipped.
Stored blocks are padded to `block_size` with PAD tokens (special, never attended to, never indexed), so block b is
always the positions `[b * block_size, (b + 1) * block_size)`.
"""

import collections.abc
import functools
import json
import os
import re
import unicodedata
from dataclasses import dataclass
from typing import Iterable, Iterator

import numpy as np
from transformers.utils import logging

from .inference.tokens import LINE_START, PAD, SPECIAL, TOKEN_DTYPE, WORD_END, WORD_START


logger = logging.get_logger(__name__)


@dataclass
class CorpusStats:
    num_documents: int = 0
    num_skipped_empty: int = 0
    num_tokens: int = 0  # stored tokens, padding included
    num_padding: int = 0
    num_skipped_paragraphs: int = 0  # paragraphs holding the mask token (the official code skips them too)


def iter_documents(corpus, split: str = "train", text_column: str = "text") -> Iterator[dict]:
    """Yield `{"id", "title", "text"}` dicts from any supported corpus.

    `corpus` may be a list of strings or dicts, a `datasets.Dataset`, a streamed one (`datasets.IterableDataset`,
    e.g. `load_dataset(..., streaming=True)` or `Dataset.to_iterable_dataset()`), a generator or other iterator of
    strings or dicts, a `.txt` file (one document per line), a `.jsonl` file (`text`, optional `id` and `title`),
    a directory saved with `Dataset.save_to_disk`, or a name that `datasets.load_dataset` understands. Documents
    are read one at a time: nothing but the current batch is held in memory.
    """
    if isinstance(corpus, (str, os.PathLike)):
        yield from _iter_path(os.fspath(corpus), split, text_column)
        return
    for number, item in enumerate(_as_iterable(corpus, split)):
        yield _normalise(item, number, source="corpus", text_column=text_column)


def _as_iterable(corpus, split: str) -> Iterable:
    import datasets

    if isinstance(corpus, (datasets.DatasetDict, datasets.IterableDatasetDict)):
        if split not in corpus:
            raise ValueError(f"The corpus {type(corpus).__name__} has no split {split!r}; "
                             f"available: {sorted(corpus)}.")
        return corpus[split]
    if is_stream(corpus) or isinstance(corpus, (datasets.Dataset, list, tuple)):
        return corpus
    raise TypeError(
        f"Unsupported corpus type {type(corpus).__name__}: pass a list of strings or dicts, a datasets.Dataset or "
        "IterableDataset, a generator (or other iterator) of strings or dicts, or a path to a .txt / .jsonl file or "
        "a saved dataset."
    )


def is_stream(corpus) -> bool:
    """Whether `corpus` is read as it goes, without a length or a fingerprint: a `datasets.IterableDataset`
    (streamed, or `Dataset.to_iterable_dataset()`), an `IterableDatasetDict`, or a generator / iterator (which can be
    read only once)."""
    import datasets

    return isinstance(corpus, (datasets.IterableDataset, datasets.IterableDatasetDict, collections.abc.Iterator))


def _iter_path(path: str, split: str, text_column: str) -> Iterator[dict]:
    if os.path.isfile(path):
        if path.endswith(".jsonl"):
            for number, holder in _read_utf8_lines(path):
                line = holder.pop()
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as error:
                    raise ValueError(f"{path}, line {number}: not valid JSON ({error.msg}).") from None
                del line  # a long document's line is not kept beside its parsed text
                yield _normalise(record, number - 1, source=f"{path}, line {number}", text_column=text_column)
                del record
        elif path.endswith(".txt"):
            for number, holder in _read_utf8_lines(path):
                text = holder.pop().rstrip("\r\n")
                yield {"id": str(number - 1), "title": "", "text": text}
                del text
        else:
            raise ValueError(
                f"Unsupported corpus file {path!r}: use a .txt file (one document per line), a .jsonl file with a "
                "'text' field, or a datasets dataset directory."
            )
        return
    import datasets

    saved_markers = ("state.json", "dataset_dict.json")
    if os.path.isdir(path) and any(os.path.exists(os.path.join(path, name)) for name in saved_markers):
        loaded = datasets.load_from_disk(path)
    elif os.path.isdir(path) or not os.path.exists(path):
        try:
            loaded = datasets.load_dataset(path, split=split)
        except Exception as error:  # datasets raises many types; all mean "cannot read this corpus"
            raise ValueError(f"Cannot read the corpus {path!r} as a file or a datasets dataset: {error}") from error
    else:
        raise ValueError(f"Unsupported corpus path {path!r}.")
    for number, item in enumerate(_as_iterable(loaded, split)):
        yield _normalise(item, number, source=f"{path}[{number}]", text_column=text_column)


def _read_utf8_lines(path: str) -> Iterator[tuple[int, list[str]]]:
    """`(line number, [line])` for every line of a UTF-8 file. The line comes in a list the caller empties, so that
    no other reference keeps a long line (a whole document of a .jsonl file) alive while the caller works."""
    with open(path, "rb") as handle:
        number = 0
        for raw in handle:  # (not enumerate(): its cached result tuple would keep the last line alive)
            number += 1
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as error:
                raise ValueError(
                    f"{path}, line {number}: not valid UTF-8 (byte {error.start}: "
                    f"{raw[error.start:error.start + 4]!r})."
                    f" Convert the file to UTF-8 first, e.g. `iconv -f latin1 -t utf-8 {path} > corpus.utf8.txt`."
                ) from None
            del raw
            holder = [line]
            del line
            yield number, holder


def _normalise(item, number: int, source: str, text_column: str) -> dict:
    if isinstance(item, str):
        return {"id": str(number), "title": "", "text": item}
    if not isinstance(item, dict) or not isinstance(item.get(text_column), str):
        raise ValueError(
            f"{source}: every document needs a string {text_column!r} field (optional 'id' and 'title'); "
            f"got {type(item).__name__} {str(item)[:80]!r}."
        )
    doc_id = item.get("id")
    title = item.get("title")
    return {
        "id": str(number) if doc_id is None else str(doc_id),
        "title": "" if title is None else str(title),
        "text": item[text_column],
    }


# Characters tokenized per tokenizer call at most (a longer paragraph is cut into windows of about this size). A
# fast tokenizer's Python-side output costs ~200 bytes per character (ids, offsets, word ids as Python objects):
# about 25 MB at this size, however long a document is.
TOKENIZE_WINDOW_CHARS = 1 << 17
# A safe cut: a whitespace character after a non-whitespace one. BERT's whitespace-and-punctuation split and
# byte-level BPE's regex (both tested, tests/test_corpus.py) end a pre-token there, so text on either side
# tokenizes exactly as in the whole paragraph.
_SAFE_CUT = re.compile(r"(?<=\S)\s")


def tokenize_documents(documents: Iterable[dict], tokenizer, stats: CorpusStats, block_size: int | None = None,
                       batch_size: int = 64, window_chars: int = TOKENIZE_WINDOW_CHARS):
    """Yield `(document, token_records)` for every document with text, counting skipped ones in `stats`.

    Each paragraph is tokenized with its special tokens; with `block_size`, a document's paragraphs are packed into
    blocks of that many tokens, padded with PAD tokens (see the module docstring), else they simply follow each
    other. Offsets are characters of the document's text. Word boundaries come from the fast tokenizer's word ids,
    which mark the pre-tokenizer's words generically: WordPiece `##` continuations and BPE pieces without a leading
    `Ġ` are not word starts. A paragraph longer than `window_chars` is tokenized in windows cut at whitespace
    (`text_windows`), which gives the same tokens as tokenizing it whole in bounded memory.
    """
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(
            f"{type(tokenizer).__name__} is a slow tokenizer; NPM needs a fast (Rust) tokenizer for word "
            "boundaries and character offsets. Load it with AutoTokenizer.from_pretrained(..., use_fast=True)."
        )
    if block_size is not None and block_size < 3:
        raise ValueError(f"block_size must be >= 3 (room for special tokens), got {block_size}.")
    if window_chars < 2:
        raise ValueError(f"window_chars must be >= 2, got {window_chars}.")
    batch, characters = [], 0
    for document in documents:
        if not document["text"].strip():
            stats.num_skipped_empty += 1
            continue
        batch.append(document)
        characters += len(document["text"])
        if len(batch) == batch_size or characters >= window_chars:
            yield from _tokenize_batch(batch, tokenizer, stats, block_size, window_chars)
            batch, characters = [], 0
    if batch:
        yield from _tokenize_batch(batch, tokenizer, stats, block_size, window_chars)


def paragraphs(text: str) -> list[tuple[int, str]]:
    """`(character offset, line)` of every line of `text` that holds visible text: the units tokenized alone."""
    found, offset = [], 0
    for line in text.split("\n"):
        if line.strip():
            found.append((offset, line))
        offset += len(line) + 1
    return found


def text_windows(line: str, window_chars: int) -> list[tuple[int, int]]:
    """`[start, stop)` character ranges that cover `line`, each cut at the last safe place (a whitespace character
    after a non-whitespace one, not before a combining mark) within `window_chars` of its start; a window with no
    safe place in reach runs on to the next one (the rest of the line if there is none)."""
    windows, start = [], 0
    while len(line) - start > window_chars:
        cut = _last_safe_cut(line, start + 1, start + window_chars)
        if cut is None:
            found = _SAFE_CUT.search(line, start + window_chars)
            while found is not None and _before_combining(line, found.start()):
                found = _SAFE_CUT.search(line, found.start() + 1)
            if found is None:
                break
            cut = found.start()
        windows.append((start, cut))
        start = cut
    windows.append((start, len(line)))
    return windows


def _before_combining(line: str, cut: int) -> bool:
    return cut + 1 < len(line) and unicodedata.combining(line[cut + 1]) != 0


def _last_safe_cut(line: str, lo: int, hi: int, step: int = 4096) -> int | None:
    """The last safe cut in `[lo, hi)`, searched backwards in steps (a window's end is usually near a space)."""
    while hi > lo:
        begin = max(lo, hi - step)
        cuts = [m.start() for m in _SAFE_CUT.finditer(line, begin, hi) if not _before_combining(line, m.start())]
        if cuts:
            return cuts[-1]
        hi = begin
    return None


def _tokenize_batch(batch: list[dict], tokenizer, stats: CorpusStats, block_size: int | None, window_chars: int):
    units = [(d, offset, line) for d, document in enumerate(batch) for offset, line in paragraphs(document["text"])]
    windows = [(u, lo, hi) for u, (_, _, line) in enumerate(units) for lo, hi in text_windows(line, window_chars)]
    per_unit = [[] for _ in units]  # the records of each window, in order
    mask_id = tokenizer.mask_token_id
    masked = set()
    for call in _calls(windows, window_chars):
        encoded = tokenizer(
            [units[u][2][lo:hi] for u, lo, hi in call],
            add_special_tokens=True,
            return_offsets_mapping=True,
            return_special_tokens_mask=True,
            return_attention_mask=False,
            return_token_type_ids=False,
            verbose=False,
        )
        for w, (u, lo, hi) in enumerate(call):
            ids = encoded["input_ids"][w]
            if mask_id is not None and mask_id in ids:
                masked.add(u)
                continue
            records = np.zeros(len(ids), dtype=TOKEN_DTYPE)
            records["id"] = ids
            offsets = np.asarray(encoded["offset_mapping"][w], dtype=np.int64).reshape(-1, 2)
            records["flags"] = word_flags(encoded.word_ids(w), encoded["special_tokens_mask"][w], offsets,
                                          units[u][2][lo:hi])
            real = (records["flags"] & SPECIAL) == 0
            shift = units[u][1] + lo  # characters of the document before this window
            records["start"] = np.where(real, offsets[:, 0] + shift, 0)
            records["end"] = np.where(real, offsets[:, 1] + shift, 0)
            del offsets, real
            inside = [i for i, sequence in enumerate(encoded.sequence_ids(w)) if sequence is not None]
            per_unit[u].append((records, (inside[0], inside[-1] + 1) if inside else None))
        del encoded
    per_document = [[] for _ in batch]
    for u, (d, _, _) in enumerate(units):
        if u in masked:
            stats.num_skipped_paragraphs += 1
            continue
        records = _join_windows(per_unit[u], tokenizer)
        per_unit[u] = None
        if per_document[d]:  # a line break separates it from the previous paragraph
            visible = np.flatnonzero(records["flags"] & (WORD_START | WORD_END))
            if len(visible):
                records["flags"][visible[0]] |= LINE_START
        per_document[d].append(records)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    for d, document in enumerate(batch):
        pieces = per_document[d]
        per_document[d] = None
        if not pieces:
            stats.num_skipped_empty += 1
            continue
        records = np.concatenate(pieces) if block_size is None else pack_paragraphs(pieces, block_size, pad_id)
        del pieces
        stats.num_documents += 1
        stats.num_tokens += len(records)
        stats.num_padding += int(((records["flags"] & PAD) != 0).sum())
        yield document, records


def _calls(windows: list[tuple[int, int, int]], window_chars: int):
    """The windows in runs of at most `window_chars` characters (a longer window alone): one tokenizer call each."""
    call, characters = [], 0
    for window in windows:
        size = window[2] - window[1]
        if call and characters + size > window_chars:
            yield call
            call, characters = [], 0
        call.append(window)
        characters += size
    if call:
        yield call


def _join_windows(windows: list[tuple[np.ndarray, tuple[int, int] | None]], tokenizer) -> np.ndarray:
    """One paragraph's records from those of its windows, each given with the range of its tokens that come from
    the text (None: none do): the template's special tokens are kept only before the first window's text and
    after the last one's. The windows are released as they are copied (`windows` is emptied), so the paragraph
    is held about once, not twice."""
    if len(windows) == 1:
        return windows.pop()[0]
    ranges = []
    for number, (records, inside) in enumerate(windows):
        if inside is None:  # a window whose text made no token (e.g. only characters the normalizer drops)
            prefix = _template_prefix_length(tokenizer)
            inside = (prefix, prefix)
        ranges.append((0 if number == 0 else inside[0], len(records) if number == len(windows) - 1 else inside[1]))
    joined = np.empty(sum(hi - lo for lo, hi in ranges), dtype=TOKEN_DTYPE)
    row = 0
    windows.reverse()
    for lo, hi in ranges:
        records = windows.pop()[0]
        joined[row : row + hi - lo] = records[lo:hi]
        row += hi - lo
        del records
    return joined


def _template_prefix_length(tokenizer) -> int:
    """How many special tokens the tokenizer's template puts before a text ([CLS], <s>: 1)."""
    sequence_ids = tokenizer("a", add_special_tokens=True).sequence_ids()
    return next(i for i, sequence in enumerate(sequence_ids) if sequence is not None)


def pack_paragraphs(pieces: list[np.ndarray], block_size: int, pad_id: int) -> np.ndarray:
    """One document's paragraph records packed into blocks of `block_size` (the official rule, module docstring),
    each block padded to `block_size` with PAD tokens."""
    blocks, current, used = [], [], 0
    for tokens in pieces:
        if used + len(tokens) <= block_size:
            current.append(tokens)
            used += len(tokens)
            continue
        if len(tokens) <= block_size:
            blocks.append(current)
            current, used = [tokens], len(tokens)
            continue
        while len(tokens) > block_size:  # too long for any block: fill this one, continue in new ones
            room = block_size - used
            current.append(tokens[:room])
            tokens = tokens[room:]
            blocks.append(current)
            current, used = [], 0
        current, used = [tokens], len(tokens)
    blocks.append(current)
    padded = []
    for block in blocks:
        used = sum(len(part) for part in block)
        if used == 0:
            continue
        padding = np.zeros(block_size - used, dtype=TOKEN_DTYPE)
        padding["id"], padding["flags"] = pad_id, SPECIAL | PAD
        padded.extend([*block, padding])
    return np.concatenate(padded)


@functools.cache
def _whitespace_codepoints() -> np.ndarray:
    return np.array([c for c in range(0x3100) if chr(c).isspace()], dtype=np.uint32)  # none above U+3000


def word_flags(word_ids: list, special_tokens_mask: list, offsets: np.ndarray, text: str) -> np.ndarray:
    """WORD_START / WORD_END / SPECIAL / LINE_START bits per token from a fast tokenizer's word ids.

    A word starts at its first and ends at its last token that covers visible text: whitespace-only pieces
    (a bare BPE "Ġ", a newline token) are never boundaries, so no span starts or ends with whitespace. LINE_START
    marks a visible token with a line break between it and the previous visible one (lists, tables and headings of
    a document are lines: `NPMConfig.spans_cross_lines=False` keeps answers within one).
    """
    special = np.asarray(special_tokens_mask, dtype=bool) | np.array([w is None for w in word_ids], dtype=bool)
    words = np.array([-1 if w is None else w for w in word_ids], dtype=np.int64)
    # A token is visible when its character range holds a non-space character (prefix counts, vectorised).
    codepoints = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    non_space = np.concatenate([[0], np.cumsum(~np.isin(codepoints, _whitespace_codepoints()))])
    visible = non_space[offsets[:, 1]] > non_space[offsets[:, 0]]
    covering = np.flatnonzero(~special & visible)
    covered_words = words[covering]
    flags = np.zeros(len(words), dtype=np.uint8)
    flags[covering[covered_words != np.concatenate([[-2], covered_words[:-1]])]] |= WORD_START
    flags[covering[covered_words != np.concatenate([covered_words[1:], [-2]])]] |= WORD_END
    newlines = np.concatenate([[0], np.cumsum(codepoints == ord("\n"))])
    previous_end = offsets[covering[:-1], 1]
    flags[covering[1:][newlines[offsets[covering[1:], 1]] > newlines[previous_end]]] |= LINE_START
    flags[special] = SPECIAL
    return flags


_SENTENCE_OPENERS = frozenset(".!?:;\n")
_BRIDGES = frozenset({"of", "-", "&"})  # may join two capitalised words into one name ("Bank of America")


def salient_tokens(records: np.ndarray, text: str) -> np.ndarray:
    """Which tokens belong to a name-like run: words that begin with a capital letter and do not open a sentence,
    joined through "of", "-" and "&" ("Republic of Texas", "Mid-Atlantic Ridge"). Casing is read from the document
    text, so this works with uncased tokenizers too. Salient span masking (REALM) masks such runs first."""
    flags = records["flags"]
    capitalised = np.zeros(len(records), dtype=bool)
    bridge = np.zeros(len(records), dtype=bool)
    word_starts = np.flatnonzero((flags & WORD_START) != 0)
    word_ends = np.flatnonzero((flags & WORD_END) != 0)
    for first, last in zip(word_starts, word_ends):
        begin, end = int(records["start"][first]), int(records["end"][last])
        before = text[:begin].rstrip(" \t\"'(\u201c\u2018")
        if text[begin].isupper() and before and before[-1] not in _SENTENCE_OPENERS:
            capitalised[first : last + 1] = True
        elif text[begin:end].lower() in _BRIDGES:
            bridge[first : last + 1] = True
    joined = bridge & np.concatenate([[False], capitalised[:-1]]) & np.concatenate([capitalised[1:], [False]])
    return capitalised | joined
