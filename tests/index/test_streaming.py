"""Streamed corpora (issue 19): IterableDatasets, `Dataset.to_iterable_dataset()` and generators build the index
that the same documents in memory build; a stream cannot resume, and says so."""

import json
import os

import datasets
import numpy as np
import pytest

import npm_hf.index.build as index_build
from npm_hf import IndexBuildArguments, NPMIndex



def read_jsonl(path):
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle]


ARGS = dict(block_size=16, batch_size=2, blocks_per_unit=2, show_progress_bar=False)
ARRAYS = ("token_ids", "token_flags", "token_docs", "token_offsets", "positions")


@pytest.fixture(scope="module")
def corpus_jsonl(tmp_path_factory, corpus):
    path = tmp_path_factory.mktemp("stream") / "corpus.jsonl"
    documents = [{**doc, "id": f"{doc['id']}-{copy}"} for copy in range(2) for doc in corpus]  # ids stay unique
    path.write_text("".join(json.dumps(doc) + "\n" for doc in documents), encoding="utf-8")
    return path


def streams(path):
    """Each streamed form of the corpus in `path`, by name (made afresh: a generator is read once)."""
    records = read_jsonl(path)
    return {
        "to_iterable_dataset": lambda: datasets.Dataset.from_list(records).to_iterable_dataset(num_shards=1),
        "streaming load_dataset": lambda: datasets.load_dataset("json", data_files=str(path), split="train",
                                                                streaming=True),
        "generator of dicts": lambda: (record for record in records),
        "iterator of strings": lambda: iter([record["text"] for record in records]),
    }


@pytest.mark.parametrize("form", list(streams(os.devnull)))
def test_a_streamed_corpus_builds_the_index_of_the_same_documents_in_memory(tmp_path, model_and_tokenizer,
                                                                            corpus_jsonl, form):
    model, tokenizer = model_and_tokenizer
    records = read_jsonl(corpus_jsonl)
    in_memory = ([r["text"] for r in records] if form == "iterator of strings"
                 else datasets.Dataset.from_list(records))
    reference = NPMIndex.build(model, tokenizer, in_memory, tmp_path / "reference", IndexBuildArguments(**ARGS))
    stream = streams(corpus_jsonl)[form]()
    assert index_build.corpus_fingerprint(stream) != index_build.corpus_fingerprint(stream)  # never matches
    built = NPMIndex.build(model, tokenizer, streams(corpus_jsonl)[form](), tmp_path / "index",
                           IndexBuildArguments(**ARGS))
    assert built.num_tokens == reference.num_tokens > 0
    for name in ARRAYS:
        np.testing.assert_array_equal(np.asarray(getattr(built, name)), np.asarray(getattr(reference, name)))
    np.testing.assert_array_equal(np.asarray(built.vectors[:]), np.asarray(reference.vectors[:]))
    assert read_jsonl(tmp_path / "index" / "documents.jsonl") == read_jsonl(tmp_path / "reference" /
                                                                            "documents.jsonl")
    queries = np.asarray(reference.vectors[::7], dtype=np.float32)
    for got, want in zip(built.search(queries, 8), reference.search(queries, 8)):
        np.testing.assert_array_equal(got, want)


def test_a_stream_refuses_resume_and_leaves_nothing_to_resume(tmp_path, model_and_tokenizer, corpus_jsonl,
                                                             kill_encoding_after):
    model, tokenizer = model_and_tokenizer
    for make in streams(corpus_jsonl).values():
        with pytest.raises(ValueError, match=r"resume=True \(CLI: --resume\) needs a corpus that can be read "
                                             r"again.*\.jsonl.*datasets\.Dataset.*overwrite=True"):
            NPMIndex.build(model, tokenizer, make(), tmp_path / "index", IndexBuildArguments(resume=True, **ARGS))
        assert os.listdir(tmp_path) == []
    encoded = kill_encoding_after(2)  # a kill while encoding, as in test_build
    with pytest.raises(KeyboardInterrupt):
        NPMIndex.build(model, tokenizer, streams(corpus_jsonl)["generator of dicts"](), tmp_path / "index",
                       IndexBuildArguments(**ARGS))
    assert len(encoded) == 2 and os.listdir(tmp_path) == []  # a stream's partial build could never resume


def test_a_document_too_long_for_max_memory_is_refused_before_tokenizing(tmp_path, model_and_tokenizer):
    """Issue 21: a long document is tokenized in windows, and one whose records would not fit --max-memory is
    refused by name, before any of it is tokenized."""
    from npm_hf.index.memory import TOKENIZE_BYTES_PER_CHAR, process_resident_bytes

    model, tokenizer = model_and_tokenizer
    text = " ".join(["Texas borders New Mexico."] * 12_000)  # 311,999 characters, one line
    budget = process_resident_bytes() + TOKENIZE_BYTES_PER_CHAR * len(text) // 2
    corpus = [{"id": "short", "text": "Texas is a state."}, {"id": "huge", "text": text}]
    with pytest.raises(ValueError, match=r"Document 'huge' has 311999 characters: tokenizing it needs about "
                                         r"6\.2MB.*Split it into several documents.*--max-memory"):
        NPMIndex.build(model, tokenizer, corpus, tmp_path / "index",
                       IndexBuildArguments(max_memory=str(budget), **ARGS))
    assert os.listdir(tmp_path) == []
