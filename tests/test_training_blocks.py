"""Training blocks in a memory-mapped Arrow file (issue 19): the same blocks as the in-RAM lists they replace, from
every corpus form, streamed ones included."""

import os

import datasets
import numpy as np
import pytest
from transformers import AutoTokenizer

import npm_hf.training_blocks as training_blocks
from npm_hf.corpus import CorpusStats, iter_documents, tokenize_documents
from npm_hf import prepare_training_blocks


def documents(corpus, count: int) -> list[dict]:
    """The test corpus `count` times over, with names in mid-sentence (salient runs) and two-paragraph texts."""
    return [{"id": f"{doc['id']}-{i}", "title": doc["title"],
             "text": f"{doc['text']}\nIn year {i} the Republic of Texas met Hagios Demetrios."}
            for i in range(count) for doc in corpus]


@pytest.mark.parametrize("salient", [False, True])
@pytest.mark.parametrize("chunk_blocks", [1024, 6])
def test_arrow_blocks_equal_the_list_blocks(encoder_dir, corpus, tmp_path, monkeypatch, list_training_blocks, salient,
                                            chunk_blocks):
    monkeypatch.setattr(training_blocks, "CHUNK_BLOCKS", chunk_blocks)  # 6: many record batches (whole groups)
    tokenizer = AutoTokenizer.from_pretrained(encoder_dir)
    corpus = documents(corpus, 7) + ["Texas."]
    made = sum(len(records) // 16 for _, records in tokenize_documents(iter_documents(corpus), tokenizer,
                                                                      CorpusStats(), block_size=16))
    group = next(g for g in (3, 4, 5, 7) if made % g)  # so that a trailing incomplete group is dropped
    want = list_training_blocks(corpus, tokenizer, block_size=16, group_size=group, salient=salient)
    got = prepare_training_blocks(corpus, tokenizer, block_size=16, group_size=group, salient=salient,
                                  cache_dir=tmp_path)
    assert len(got) == len(want["input_ids"]) == made // group * group > 4 * 6
    assert got.to_dict() == want
    assert list(got.features) == list(want)


def test_blocks_are_memory_mapped_and_named_by_their_content(encoder_dir, corpus, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(encoder_dir)
    blocks = prepare_training_blocks(documents(corpus, 3), tokenizer, block_size=16, group_size=4, cache_dir=tmp_path)
    assert isinstance(blocks._data, datasets.table.MemoryMappedTable)
    (path,) = [entry["filename"] for entry in blocks.cache_files]
    assert os.listdir(tmp_path) == [os.path.basename(path)] and os.path.basename(path).startswith("blocks-")
    again = prepare_training_blocks(documents(corpus, 3), tokenizer, block_size=16, group_size=4, cache_dir=tmp_path)
    assert [entry["filename"] for entry in again.cache_files] == [path] and os.listdir(tmp_path) == [
        os.path.basename(path)]
    other = prepare_training_blocks(documents(corpus, 3), tokenizer, block_size=16, group_size=2, cache_dir=tmp_path)
    assert other.cache_files[0]["filename"] != path and len(os.listdir(tmp_path)) == 2
    assert blocks.to_dict() == again.to_dict()


def test_streamed_corpora_give_the_blocks_of_the_same_documents_in_memory(encoder_dir, corpus, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(encoder_dir)
    corpus = documents(corpus, 5)
    want = prepare_training_blocks(corpus, tokenizer, block_size=16, group_size=4, cache_dir=tmp_path).to_dict()
    path = tmp_path / "corpus.jsonl"
    datasets.Dataset.from_list(corpus).to_json(path)
    streams = {"to_iterable_dataset": datasets.Dataset.from_list(corpus).to_iterable_dataset(num_shards=2),
               "streaming load_dataset": datasets.load_dataset("json", data_files=str(path), split="train",
                                                               streaming=True),
               "generator": (doc for doc in corpus),
               "iterator of strings": iter([doc["text"] for doc in corpus])}
    for name, stream in streams.items():
        got = prepare_training_blocks(stream, tokenizer, block_size=16, group_size=4, cache_dir=tmp_path / name)
        assert got.to_dict() == want, name  # (ids and titles do not change blocks)


def test_too_small_a_corpus_or_cache_folder_leaves_nothing(encoder_dir, corpus, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(encoder_dir)
    with pytest.raises(ValueError, match="fewer than one group of 16 blocks; add text or lower group_size"):
        prepare_training_blocks(["Texas borders New Mexico."], tokenizer, block_size=16, cache_dir=tmp_path / "c")
    assert os.listdir(tmp_path / "c") == []
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(ValueError, match="Cannot create the training-blocks cache folder.*pass cache_dir="):
        prepare_training_blocks(documents(corpus, 3), tokenizer, block_size=16, cache_dir=tmp_path / "file" / "x")
    with pytest.raises(TypeError, match="Unsupported corpus type dict.*generator"):
        prepare_training_blocks({"text": "x"}, tokenizer, block_size=16, cache_dir=tmp_path / "c")
    assert os.listdir(tmp_path / "c") == []
