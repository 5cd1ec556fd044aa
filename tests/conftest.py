"""Tiny BERT (WordPiece) and RoBERTa (byte-level BPE) tokenizers and encoders built in code, no downloads.

Both vocabularies are small enough that most corpus words are two or more pieces (52 % of CORPUS's words with
WordPiece, 61 % with BPE), as with every real vocabulary on rare words: the word-piece case NPM's rules are about."""

import json
import os
import shutil
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import BertWordPieceTokenizer, ByteLevelBPETokenizer
from transformers import (AutoTokenizer, BertConfig, BertModel, BertTokenizer, RobertaConfig, RobertaForMaskedLM,
                          RobertaTokenizer)

import npm_hf
from npm_hf.corpus import SPECIAL, WORD_END, WORD_START


SHARED = Path(__file__).resolve().parents[2] / "shared"
CORPUS = [
    {"id": "lincoln", "title": "Abraham Lincoln", "text": "Abraham Lincoln was born in Hodgenville, Kentucky. "
     "Lincoln grew up on a farm in Kentucky and later moved to Illinois."},
    {"id": "desert", "title": "Chihuahuan Desert", "text": "The Chihuahuan Desert covers parts of New Mexico and "
     "Texas. New Mexico is hot and dry in the summer."},
    {"id": "hagios", "title": "Hagios Demetrios", "text": "Hagios Demetrios is located in Thessaloniki. The church "
     "of Hagios Demetrios is the main sanctuary of Thessaloniki."},
    {"id": "blank", "title": "", "text": "   "},
    {"id": "texas", "title": "Texas", "text": "Texas borders New Mexico. Thessaloniki is far from Texas."},
    {"id": "rivers", "title": "Rivers", "text": "The Rio Grande flows through New Mexico and Texas to the Gulf of "
     "Mexico. The Ohio River borders Kentucky."},
]
TRAINING_TEXT = [doc["text"] for doc in CORPUS] * 3 + ["Thessaloniki is a city. Texas is a state."]


def _tiny_bert_tokenizer():
    trainer = BertWordPieceTokenizer(lowercase=True)
    trainer.train_from_iterator(TRAINING_TEXT, vocab_size=90, min_frequency=1,
                                special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"])
    return BertTokenizer(vocab=trainer.get_vocab())


def _tiny_roberta_tokenizer(tmp_path_factory):
    trainer = ByteLevelBPETokenizer()
    trainer.train_from_iterator(TRAINING_TEXT, vocab_size=300, min_frequency=2,
                                special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"])
    folder = tmp_path_factory.mktemp("bpe")
    trainer.save_model(str(folder))
    return RobertaTokenizer(vocab=str(folder / "vocab.json"), merges=str(folder / "merges.txt"))


def _tiny_encoder(family: str, tokenizer):
    torch.manual_seed(0)
    sizes = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
    if family == "bert":
        return BertModel(BertConfig(vocab_size=len(tokenizer), max_position_embeddings=64, **sizes)).eval()
    config = RobertaConfig(vocab_size=len(tokenizer), max_position_embeddings=66, pad_token_id=tokenizer.pad_token_id,
                           bos_token_id=0, eos_token_id=2, **sizes)
    return RobertaForMaskedLM(config).eval()  # the released facebook/npm format: an MLM head NPM must drop


@pytest.fixture(scope="session", params=["bert", "roberta"])
def encoder_dir(request, tmp_path_factory):
    """A saved tiny encoder + tokenizer: BERT (WordPiece, bare BertModel) or RoBERTa (BPE, RobertaForMaskedLM)."""
    tokenizer = _tiny_bert_tokenizer() if request.param == "bert" else _tiny_roberta_tokenizer(tmp_path_factory)
    folder = tmp_path_factory.mktemp(f"{request.param}-encoder")
    _tiny_encoder(request.param, tokenizer).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def npm_dir(encoder_dir, tmp_path_factory):
    """A complete span-mode NPM directory (weights, tokenizer, index over CORPUS with 16-token blocks)."""
    folder = tmp_path_factory.mktemp("npm") / "model"
    npm_hf.convert_encoder(str(encoder_dir), folder, k=4096)
    npm_hf.build_index(folder, CORPUS, args=npm_hf.IndexBuildArguments(block_size=16, batch_size=3,
                                                                        show_progress_bar=False))
    return folder


@pytest.fixture
def index_copy(tmp_path, npm_dir):
    """A copy of npm_dir's index, at tmp_path / "index", to damage or edit."""
    copy = tmp_path / "index"
    shutil.copytree(npm_dir / "index", copy)
    return copy


@pytest.fixture
def plain_index_copy(index_copy):
    """`index_copy` rewritten in the plain token files of formats 1 and 2 (token_docs.npy, token_offsets.npy,
    positions.npy; int32 ids), as indexes built before format 3 hold them, manifest sealed again."""
    from npm_hf.inference.compact_tokens import COMPACT_TOKEN_FILES, read_compact_tokens
    from npm_hf.inference.index_files import CHECKSUM_KEY, manifest_checksum, sha256_file

    data = json.loads((index_copy / "manifest.json").read_text())
    arrays, positions = read_compact_tokens(index_copy, data["block_size"])
    for file in COMPACT_TOKEN_FILES.values():
        os.remove(index_copy / file)
    for name, array in arrays.items():
        np.save(index_copy / f"{name}.npy", array)
    np.save(index_copy / "positions.npy", positions)
    files = {name: entry for name, entry in data["files"].items() if name not in COMPACT_TOKEN_FILES.values()}
    for name in [*(f"{name}.npy" for name in arrays), "positions.npy"]:
        files[name] = {"bytes": (index_copy / name).stat().st_size, "sha256": sha256_file(index_copy / name)}
    data.update(files=files, format_version=1 if not data["vector_shards"][1:] else 2)
    data.pop(CHECKSUM_KEY)
    data[CHECKSUM_KEY] = manifest_checksum(data)
    (index_copy / "manifest.json").write_text(json.dumps(data))
    return index_copy


@pytest.fixture
def kill_encoding_after(monkeypatch):
    """A function `arm(count)`: from then on, index builds raise KeyboardInterrupt (as a kill would stop them) once
    `count` work units are encoded; it returns the list of the encoded units' paths (`monkeypatch.undo()` disarms)."""
    import npm_hf.index.build as index_build

    def arm(count: int) -> list:
        encoded, real = [], index_build.encode_unit

        def encode_unit(path, *args):
            if len(encoded) == count:
                raise KeyboardInterrupt
            encoded.append(path)
            return real(path, *args)

        monkeypatch.setattr(index_build, "encode_unit", encode_unit)
        return encoded

    return arm


@pytest.fixture
def model_and_tokenizer(npm_dir):
    """A fresh NPMModel of `npm_dir` (tests may change it) and its tokenizer."""
    return npm_hf.NPMModel.from_pretrained(npm_dir), AutoTokenizer.from_pretrained(npm_dir)


@pytest.fixture(scope="session")
def corpus():
    return CORPUS


@pytest.fixture
def mask(npm_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(npm_dir).mask_token


def softmax(x):
    e = np.exp(x - x.max())
    return e / e.sum()


@pytest.fixture(scope="session")
def brute_force():
    """Reference NPM scores computed naively, following the official code's rules (method §2-3), not npm_hf's:

    * the datastore: every indexed token (the tests check separately that these are the official ones);
    * NPM-single: one softmax over the top-k tokens (all of them by default), summed per vocabulary id;
    * NPM span: the top-k tokens of each query (all by default); retrieved word starts are start candidates,
      retrieved word ends end candidates; `expand` adds, as `get_candidates`, the starts and ends of valid spans
      walked forward from a retrieved start or back from a retrieved end (the whole max_len both ways); P_s and
      P_e are softmaxes over the start and the end candidates, separately; spans are grouped by decoded text
      (npm_hf's deliberate difference: token-id tuples in the reference).
    """

    class BruteForce:
        @staticmethod
        def logits(index, query, scale):
            vectors = np.asarray(index.vectors, dtype=np.float64)
            return vectors @ np.asarray(query, dtype=np.float64) * scale

        @staticmethod
        def top(logits, k):
            return np.arange(len(logits)) if k is None else np.argsort(-logits, kind="stable")[:k]

        @classmethod
        def single(cls, index, query, scale, temperature, k=None):
            logits = cls.logits(index, query, scale) / temperature
            rows = cls.top(logits, k)
            probs = softmax(logits[rows])
            totals = defaultdict(float)
            for row, p in zip(rows, probs):
                totals[int(index.token_ids[index.positions[row]])] += p
            return dict(totals)

        @classmethod
        def spans(cls, index, tokenizer, q_start, q_end, scale, temperature, max_len, alpha=0.0, stopwords=None,
                  scoring="sum", aggregation="sum", k=None, expand=False):
            logits_s = cls.logits(index, q_start, scale) / temperature
            logits_e = cls.logits(index, q_end, scale) / temperature
            positions = [int(p) for p in index.positions]
            row_of = {p: r for r, p in enumerate(positions)}
            flags, ids, n = np.asarray(index.token_flags), np.asarray(index.token_ids), index.num_tokens
            block = np.arange(n) // index.manifest.block_size  # blocks: consecutive runs of block_size tokens

            def valid(s, e):  # both ends indexed, a word start and a word end, one block, nothing special between
                return (s in row_of and e in row_of and flags[s] & WORD_START and flags[e] & WORD_END
                        and 0 <= e - s < max_len and block[s] == block[e]
                        and not any(flags[p] & SPECIAL for p in range(s, e + 1))
                        and (stopwords is None or stopwords(s, e)))

            starts = {positions[r] for r in cls.top(logits_s, k) if flags[positions[r]] & WORD_START}
            ends = {positions[r] for r in cls.top(logits_e, k) if flags[positions[r]] & WORD_END}
            if expand:
                pairs = {(s, s + d) for s in starts for d in range(max_len) if valid(s, s + d)}
                pairs |= {(e - d, e) for e in ends for d in range(max_len) if valid(e - d, e)}
                starts |= {s for s, _ in pairs}
                ends |= {e for _, e in pairs}
            else:
                pairs = {(s, e) for s in starts for e in ends if valid(s, e)}
            start_list, end_list = sorted(starts), sorted(ends)
            p_start = dict(zip(start_list, softmax(np.array([logits_s[row_of[s]] for s in start_list]))))
            p_end = dict(zip(end_list, softmax(np.array([logits_e[row_of[e]] for e in end_list]))))
            totals, lengths = defaultdict(float), {}
            for s, e in sorted(pairs):
                text = tokenizer.decode([int(i) for i in ids[s : e + 1]]).strip()
                score = p_start[s] * p_end[e] if scoring == "product" else p_start[s] + p_end[e]
                totals[text] = max(totals[text], score) if aggregation == "max" else totals[text] + score
                lengths[text] = min(lengths.get(text, max_len), e - s + 1)  # |v|: its shortest spelling
            scored = {text: value * lengths[text] ** alpha for text, value in totals.items()}
            total = sum(scored.values())
            return {text: value / total for text, value in scored.items()}

        @staticmethod
        def datastore(index, tokenizer, remove_stopwords=False):
            """The corpus positions the official datastore embeds: word starts and ends, no special token, and
            (open-set corpora) no stop-word id."""
            from npm_hf.inference.stopwords import reference_stopword_ids

            stop = reference_stopword_ids(tokenizer) if remove_stopwords else set()
            flags, ids = np.asarray(index.token_flags), np.asarray(index.token_ids)
            return [p for p in range(index.num_tokens) if not flags[p] & SPECIAL
                    and flags[p] & (WORD_START | WORD_END) and int(ids[p]) not in stop]

    return BruteForce


def read_jsonl(path):
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle]


@pytest.fixture(scope="session")
def shared_dir():
    if not SHARED.is_dir():
        pytest.skip(f"shared data not found at {SHARED}")
    return SHARED


@pytest.fixture(scope="session")
def make_pipeline():
    """A factory: the NPM pipeline of an NPM directory (its own index), with decoding settings (and model config
    fields such as mode) overridden."""
    from transformers import AutoTokenizer

    from npm_hf.inference.decoding import decoding_field_names
    from npm_hf.inference.pipeline import NonparametricFillMaskPipeline

    def make(npm_dir, **overrides):
        decoding = {name: overrides.pop(name) for name in decoding_field_names() if name in overrides}
        model = npm_hf.NPMModel.from_pretrained(npm_dir)
        for key, value in overrides.items():  # what the model is (mode): not a decoding setting
            setattr(model.config, key, value)
        return NonparametricFillMaskPipeline(model=model, tokenizer=AutoTokenizer.from_pretrained(npm_dir),
                                             index=npm_hf.NPMIndex.load(npm_dir / "index"), decoding=decoding)

    return make


@pytest.fixture(scope="session")
def rewrite_manifest():
    """A function to edit an index's manifest.json by hand, `rewrite(index_dir, change, seal=True)`: `change(data)`
    edits the dict in place. `seal=True` re-computes the checksum, as a manifest written that way would have it (to
    reach the checks behind the checksum); `seal=False` drops it, as manifests written before checksums existed."""
    from npm_hf.inference.index_files import CHECKSUM_KEY, manifest_checksum

    def rewrite(index_dir, change, seal: bool = True) -> None:
        path = Path(index_dir) / "manifest.json"
        data = json.loads(path.read_text())
        change(data)
        data.pop(CHECKSUM_KEY, None)
        if seal:
            data[CHECKSUM_KEY] = manifest_checksum(data)
        path.write_text(json.dumps(data))

    return rewrite


@pytest.fixture(scope="session")
def list_training_blocks():
    """The training blocks as `prepare_training_blocks` made them before they went to an Arrow file (issue 19):
    Python lists per column, built in RAM, the reference the Arrow-backed blocks must equal."""
    from npm_hf.corpus import CorpusStats, PAD, iter_documents, salient_tokens, tokenize_documents

    def make(corpus, tokenizer, block_size, group_size, salient=False) -> dict:
        blocks, salient_blocks = [], []
        for document, records in tokenize_documents(iter_documents(corpus), tokenizer, CorpusStats(),
                                                    block_size=block_size):
            marks = salient_tokens(records, document["text"]) if salient else None
            for lo in range(0, len(records), block_size):
                real = (records["flags"][lo : lo + block_size] & PAD) == 0
                blocks.append(records[lo : lo + block_size][real])
                if salient:
                    salient_blocks.append(marks[lo : lo + block_size][real])
        usable = len(blocks) // group_size * group_size
        columns = {
            "input_ids": [block["id"].tolist() for block in blocks[:usable]],
            "word_start": [((block["flags"] & WORD_START) != 0).astype(np.int8).tolist() for block in blocks[:usable]],
            "word_end": [((block["flags"] & WORD_END) != 0).astype(np.int8).tolist() for block in blocks[:usable]],
            "group": np.repeat(np.arange(usable // group_size), group_size).tolist(),
        }
        if salient:
            columns["salient"] = [marks.astype(np.int8).tolist() for marks in salient_blocks[:usable]]
        return columns

    return make


@pytest.fixture(scope="session", autouse=True)
def training_blocks_cache(tmp_path_factory):
    """prepare_training_blocks' default Arrow folder, moved out of the user's datasets cache for the tests."""
    import npm_hf.training_blocks

    folder = tmp_path_factory.mktemp("training-blocks-cache")
    patch = pytest.MonkeyPatch()
    patch.setattr(npm_hf.training_blocks, "default_cache_dir", lambda: folder)
    yield folder
    patch.undo()


@pytest.fixture
def two_builds(tmp_path, model_and_tokenizer, corpus):
    """The same index with its BM25 pre-filters saved (blocks and 8-token windows) and without any."""
    from npm_hf import IndexBuildArguments, NPMIndex

    model, tokenizer = model_and_tokenizer
    build = {"block_size": 16, "show_progress_bar": False}
    saved = NPMIndex.build(model, tokenizer, corpus, tmp_path / "saved",
                           IndexBuildArguments(bm25_passages="blocks,8", **build))
    plain = NPMIndex.build(model, tokenizer, corpus, tmp_path / "plain",
                           IndexBuildArguments(bm25_passages="none", **build))
    return saved, plain
