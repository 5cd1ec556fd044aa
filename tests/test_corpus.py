"""Corpus readers and word-boundary flags for WordPiece and byte-level BPE tokenizers."""

import json

import datasets
import numpy as np
import pytest
from transformers import AutoTokenizer

import npm_hf
from npm_hf.corpus import (LINE_START, PAD, SPECIAL, TOKEN_DTYPE, WORD_END, WORD_START, CorpusStats, iter_documents,
                           pack_paragraphs, paragraphs, text_windows, tokenize_documents)


def flags_by_token(tokenizer, text):
    stats = CorpusStats()
    ((_, records),) = list(tokenize_documents([{"id": "0", "title": "", "text": text}], tokenizer, stats))
    tokens = tokenizer.convert_ids_to_tokens(records["id"].tolist())
    return [(token, int(flag)) for token, flag in zip(tokens, records["flags"])], records


def test_wordpiece_continuations_are_not_boundaries(encoder_dir):
    tokenizer = AutoTokenizer.from_pretrained(encoder_dir)
    text = "Hodgenville is in New Mexico."
    flagged, records = flags_by_token(tokenizer, text)
    assert flagged[0][1] == SPECIAL and flagged[-1][1] == SPECIAL
    words = []
    for (token, flag), (start, end) in zip(flagged, zip(records["start"], records["end"])):
        if flag & WORD_START:
            words.append([start, end])
        elif not flag & SPECIAL and end > start:
            assert words, token
            words[-1][1] = end
        if flag & WORD_END:
            assert words[-1][1] == end
    # Boundaries group the pieces back into exactly the words of the text.
    assert [text[s:e] for s, e in words] == ["Hodgenville", "is", "in", "New", "Mexico", "."]
    continuation = [flag for token, flag in flagged if token.startswith("##")]
    assert all(not flag & WORD_START for flag in continuation)


def test_bpe_space_pieces_are_never_boundaries(encoder_dir):
    tokenizer = AutoTokenizer.from_pretrained(encoder_dir)
    flagged, records = flags_by_token(tokenizer, "Thessaloniki is hot and Zzyzx dry.")
    for (token, flag), start, end in zip(flagged, records["start"], records["end"]):
        if end == start and not flag & SPECIAL:  # a bare "Ġ" piece
            assert flag == 0, token
        if token.startswith("Ġ") and len(token) > 1:
            assert flag & WORD_START, token
    starts = [records["start"][i] for i, (_, f) in enumerate(flagged) if f & WORD_START]
    assert starts == [0, 13, 16, 20, 24, 30, 33]


def test_line_starts_mark_the_first_visible_token_after_a_line_break(encoder_dir):
    tokenizer = AutoTokenizer.from_pretrained(encoder_dir)
    text = "Texas borders:\n* New Mexico\n\n  Kentucky is far.\n"
    flagged, records = flags_by_token(tokenizer, text)
    marked = [i for i, (_, flag) in enumerate(flagged) if flag & LINE_START]
    first_visible = [records["start"][i] + len(text[records["start"][i]:]) - len(text[records["start"][i]:].lstrip())
                     for i in marked]
    assert first_visible == [text.index("*"), text.index("Kentucky")]  # none for the first line nor the last break
    assert all(flagged[i][1] & WORD_START for i in marked)


def test_readers_agree_on_every_format(tmp_path):
    rows = [{"id": "a", "title": "A", "text": "first text"}, {"text": "second text"}]
    jsonl = tmp_path / "c.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n", encoding="utf-8")
    txt = tmp_path / "c.txt"
    txt.write_text("first text\nsecond text\n", encoding="utf-8")
    dataset = datasets.Dataset.from_list([{"id": "a", "title": "A", "text": "first text"},
                                          {"id": None, "title": None, "text": "second text"}])
    dataset.save_to_disk(tmp_path / "saved")
    expected = [{"id": "a", "title": "A", "text": "first text"}, {"id": "1", "title": "", "text": "second text"}]
    assert list(iter_documents(str(jsonl))) == expected
    assert list(iter_documents(dataset)) == expected
    assert list(iter_documents(str(tmp_path / "saved"))) == expected
    assert list(iter_documents(datasets.DatasetDict({"train": dataset}))) == expected
    assert [d["text"] for d in iter_documents(str(txt))] == ["first text", "second text"]
    assert [d["text"] for d in iter_documents(["first text", "second text"])] == ["first text", "second text"]


def test_non_utf8_file_names_the_line(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("fine\ncaf\xe9\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"line 2: not valid UTF-8.*iconv"):
        list(iter_documents(str(path)))


@pytest.mark.parametrize("content, message", [
    ('{"text": "ok"}\n{not json}\n', "line 2: not valid JSON"),
    ('{"body": "no text field"}\n', "line 1: every document needs a string 'text' field"),
])
def test_bad_jsonl_is_reported_with_its_line(tmp_path, content, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(ValueError, match=message):
        list(iter_documents(str(path)))


def test_unsupported_inputs(tmp_path):
    (tmp_path / "corpus.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match="Unsupported corpus file"):
        list(iter_documents(str(tmp_path / "corpus.csv")))
    with pytest.raises(TypeError, match="Unsupported corpus type int"):
        list(iter_documents(42))
    with pytest.raises(ValueError, match="has no split 'train'"):
        list(iter_documents(datasets.DatasetDict({"test": datasets.Dataset.from_list([{"text": "x"}])})))


def test_slow_tokenizers_are_rejected():
    class Slow:
        is_fast = False

    with pytest.raises(ValueError, match="needs a fast"):
        list(tokenize_documents([{"id": "0", "title": "", "text": "x"}], Slow(), CorpusStats()))


def test_empty_documents_are_counted_not_tokenized(encoder_dir):
    tokenizer = AutoTokenizer.from_pretrained(encoder_dir)
    stats = CorpusStats()
    docs = [{"id": str(i), "title": "", "text": t} for i, t in enumerate(["Texas", " \n\t", "", "New Mexico"])]
    kept = [doc["id"] for doc, _ in tokenize_documents(docs, tokenizer, stats)]
    assert kept == ["0", "3"] and stats.num_skipped_empty == 2 and stats.num_documents == 2
    assert stats.num_tokens == len(tokenizer("Texas")["input_ids"]) + len(tokenizer("New Mexico")["input_ids"])


# ---------------------------------------------------------------------------------------------- blocks
def reference_packing(lengths, block_size):
    """The official create_blocks_from_plain_text rule on paragraph lengths: the block lengths it makes."""
    blocks = [0]
    for n in lengths:
        if blocks[-1] + n <= block_size:
            blocks[-1] += n
        elif n <= block_size:
            blocks.append(n)
        else:
            while n > block_size:
                room = block_size - blocks[-1]
                blocks[-1] += room
                n -= room
                blocks.append(0)
            blocks[-1] += n
    return [b for b in blocks if b]


@pytest.mark.parametrize("seed", range(5))
def test_paragraph_packing_follows_the_official_rule(seed):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, 40, size=12).tolist() + [55, 3, 16, 16, 33]
    rng.shuffle(lengths)
    pieces, next_id = [], 100
    for n in lengths:
        records = np.zeros(n, dtype=TOKEN_DTYPE)
        records["id"] = np.arange(next_id, next_id + n)
        next_id += n
        pieces.append(records)
    packed = pack_paragraphs(pieces, 16, pad_id=1)
    assert len(packed) % 16 == 0
    blocks = packed.reshape(-1, 16)
    real = (blocks["flags"] & PAD) == 0
    assert [int(r.sum()) for r in real] == reference_packing(lengths, 16)
    assert np.all(np.diff(real.astype(int), axis=1) <= 0)  # padding only at a block's end
    assert blocks["id"][real].tolist() == list(range(100, next_id))  # every token once, in order
    assert np.all(blocks["id"][~real] == 1) and np.all(blocks["flags"][~real] == SPECIAL | PAD)


def test_documents_are_packed_paragraph_by_paragraph(encoder_dir):
    tokenizer = AutoTokenizer.from_pretrained(encoder_dir)
    documents = [{"id": "a", "title": "", "text": "Texas borders New Mexico.\n\nThe Rio Grande flows to the Gulf."},
                 {"id": "b", "title": "", "text": "Hagios Demetrios is the main sanctuary of Thessaloniki. " * 3}]
    out = list(tokenize_documents(documents, tokenizer, CorpusStats(), block_size=32))
    for document, records in out:
        units = [tokenizer(line)["input_ids"] for _, line in paragraphs(document["text"])]
        real = records[(records["flags"] & PAD) == 0]
        assert real["id"].tolist() == [i for ids in units for i in ids]  # each paragraph with its own specials
        assert len(records) % 32 == 0
        words = real[(real["flags"] & SPECIAL) == 0]
        for token, start, end in zip(words["id"], words["start"], words["end"]):  # offsets into the document
            piece = tokenizer.decode([int(token)]).replace("##", "").strip().lower()
            assert piece in document["text"][start:end].lower() or not piece.isalnum()
    assert len(paragraphs(documents[0]["text"])) == 2  # the blank line is no paragraph
    a_blocks, b_blocks = out[0][1].reshape(-1, 32), out[1][1].reshape(-1, 32)
    first, second = (len(tokenizer(line)["input_ids"]) for _, line in paragraphs(documents[0]["text"]))
    assert first <= 32 and second <= 32 < first + second  # so the second paragraph starts a block: never split
    assert len(a_blocks) == 2 and a_blocks[1]["id"][0] == tokenizer.cls_token_id
    assert len(b_blocks) > 1 and all(((block["flags"] & PAD) == 0).all() for block in b_blocks[:-1])  # a long one


def test_no_block_holds_two_documents(npm_dir):
    index = npm_hf.NPMIndex.load(npm_dir / "index")
    docs, flags = np.asarray(index.token_docs), np.asarray(index.token_flags)
    for block in range(index.manifest.num_blocks):
        lo, hi = index.block_range(block)
        assert len(set(docs[lo:hi][(flags[lo:hi] & PAD) == 0].tolist())) == 1


def test_training_blocks_are_packed_paragraphs(encoder_dir):
    tokenizer = AutoTokenizer.from_pretrained(encoder_dir)
    documents = [f"Person {i} was born in Texas.\nPerson {i} moved to Kentucky later." for i in range(24)]
    blocks = npm_hf.prepare_training_blocks(documents, tokenizer, block_size=40, group_size=4)
    pad = tokenizer.pad_token_id
    per_document = [list(tokenize_documents([{"id": str(i), "title": "", "text": t}], tokenizer, CorpusStats(),
                                            block_size=40))[0][1] for i, t in enumerate(documents)]
    want = [b["id"][(b["flags"] & PAD) == 0].tolist() for records in per_document for b in records.reshape(-1, 40)]
    assert blocks["input_ids"] == want[: len(blocks)]
    assert all(len(ids) <= 40 and pad not in ids for ids in blocks["input_ids"])
    assert all(ids[0] == tokenizer.cls_token_id for ids in blocks["input_ids"])  # each block starts a paragraph


# ------------------------------------------------------------------------------------------ long documents
def long_line(seed: int, words: int) -> str:
    """One paragraph of `words` words with the separators that matter at a cut: single and repeated spaces,
    tabs, punctuation, a non-breaking space, a combining accent after a space, and a word longer than a window."""
    rng = np.random.default_rng(seed)
    vocabulary = ["Hodgenville", "Kentucky,", "New", "Mexico.", "Thessaloniki's", "Zzyzx", "(Texas)", "is", "a",
                  "café", "1,234", "Rio-Grande", "x" * 120]
    separators = [" "] * 12 + ["  ", "\t", " \u00a0", " \u0301", ", "]
    parts = [vocabulary[i] + separators[j] for i, j in zip(rng.integers(0, len(vocabulary), words),
                                                           rng.integers(0, len(separators), words))]
    return "".join(parts).strip()


def test_text_windows_cut_only_after_a_word_at_whitespace():
    line = long_line(0, 400)
    windows = text_windows(line, 50)
    assert windows[0][0] == 0 and windows[-1][1] == len(line) and len(windows) > 40
    assert all(a[1] == b[0] for a, b in zip(windows, windows[1:]))  # contiguous, nothing lost
    for _, cut in windows[:-1]:
        assert line[cut].isspace() and not line[cut - 1].isspace() and line[cut + 1] != "\u0301"
    assert max(hi - lo for lo, hi in windows) > 50  # the 120-character word runs on to the next safe cut
    assert text_windows("x" * 500, 50) == [(0, 500)]  # no safe cut at all: one window
    assert text_windows("short text", 50) == [(0, 10)]


@pytest.mark.parametrize("block_size", [None, 16])
def test_long_documents_tokenize_in_windows_exactly_as_whole(encoder_dir, block_size):
    """Issue 21: a long paragraph is tokenized in windows of bounded size; at every join the ids, flags and
    offsets are those of tokenizing it whole (WordPiece and byte-level BPE)."""
    tokenizer = AutoTokenizer.from_pretrained(encoder_dir)
    documents = [{"id": "long", "title": "", "text": long_line(1, 3000)},
                 {"id": "mixed", "title": "", "text": "Texas borders New Mexico.\n" + long_line(2, 800)
                  + "\n\nThe Ohio River borders Kentucky.\n" + long_line(3, 500)},
                 {"id": "short", "title": "", "text": "Thessaloniki is a city."}]
    whole = list(tokenize_documents(documents, tokenizer, CorpusStats(), block_size=block_size,
                                    window_chars=10**9))
    assert len(text_windows(documents[0]["text"], 64)) > 200
    windowed = list(tokenize_documents(documents, tokenizer, CorpusStats(), block_size=block_size, window_chars=64))
    assert [d["id"] for d, _ in windowed] == ["long", "mixed", "short"]
    for (_, expected), (_, got) in zip(whole, windowed):
        assert got.dtype == expected.dtype and len(got) == len(expected)
        for field in TOKEN_DTYPE.names:
            assert np.array_equal(got[field], expected[field]), field
    # whole-document tokenization of the long paragraph: the same ids (one [CLS]/<s> ... [SEP]/</s> pair)
    ids = tokenizer(documents[0]["text"])["input_ids"]
    real = whole[0][1][(whole[0][1]["flags"] & PAD) == 0]
    assert real["id"].tolist() == ids
