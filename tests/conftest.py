"""Tiny BERT (WordPiece) and RoBERTa (byte-level BPE) tokenizers and encoders built in code, no downloads."""

import json
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import BertWordPieceTokenizer, ByteLevelBPETokenizer
from transformers import BertConfig, BertModel, BertTokenizer, RobertaConfig, RobertaForMaskedLM, RobertaTokenizer

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
    trainer.train_from_iterator(TRAINING_TEXT, vocab_size=150, min_frequency=1,
                                special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"])
    return BertTokenizer(vocab=trainer.get_vocab())


def _tiny_roberta_tokenizer(tmp_path_factory):
    trainer = ByteLevelBPETokenizer()
    trainer.train_from_iterator(TRAINING_TEXT, vocab_size=330, min_frequency=2,
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
    """Reference NPM scores computed naively over every indexed token (method §3), for k >= N checks."""

    class BruteForce:
        @staticmethod
        def logits(index, query, scale):
            vectors = np.asarray(index.vectors, dtype=np.float64)
            return vectors @ np.asarray(query, dtype=np.float64) * scale

        @classmethod
        def single(cls, index, query, scale, temperature):
            probs = softmax(cls.logits(index, query, scale) / temperature)
            totals = defaultdict(float)
            for row, position in enumerate(index.positions):
                totals[int(index.token_ids[position])] += probs[row]
            return dict(totals)

        @classmethod
        def spans(cls, index, tokenizer, q_start, q_end, scale, temperature, max_len, alpha=0.0, stopwords=None,
                  scoring="sum", aggregation="sum"):
            p_start = softmax(cls.logits(index, q_start, scale) / temperature)
            p_end = softmax(cls.logits(index, q_end, scale) / temperature)
            row_of = {int(p): r for r, p in enumerate(index.positions)}
            flags, ids, n = np.asarray(index.token_flags), np.asarray(index.token_ids), index.num_tokens
            block = np.arange(n) // index.manifest.block_size  # blocks: consecutive runs of block_size tokens
            totals, lengths = defaultdict(float), {}
            for s in range(n):
                if flags[s] & SPECIAL or not flags[s] & WORD_START:
                    continue
                for e in range(s, min(s + max_len, n)):
                    if flags[e] & SPECIAL or block[e] != block[s]:
                        break
                    if not flags[e] & WORD_END:
                        continue
                    if stopwords is not None and not stopwords(s, e):
                        continue
                    text = tokenizer.decode([int(i) for i in ids[s : e + 1]]).strip()
                    score = p_start[row_of[s]] * p_end[row_of[e]] if scoring == "product" else \
                        p_start[row_of[s]] + p_end[row_of[e]]
                    totals[text] = max(totals[text], score) if aggregation == "max" else totals[text] + score
                    lengths[text] = e - s + 1
            scored = {text: value * lengths[text] ** alpha for text, value in totals.items()}
            total = sum(scored.values())
            return {text: value / total for text, value in scored.items()}

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
    """A factory: the NPM pipeline of an NPM directory (its own index), with config fields overridden."""
    from transformers import AutoTokenizer

    from npm_hf.pipeline import NonparametricFillMaskPipeline

    def make(npm_dir, **config_overrides):
        model = npm_hf.NPMModel.from_pretrained(npm_dir)
        for key, value in config_overrides.items():
            setattr(model.config, key, value)
        return NonparametricFillMaskPipeline(model=model, tokenizer=AutoTokenizer.from_pretrained(npm_dir),
                                             index=npm_hf.NPMIndex.load(npm_dir / "index"))

    return make
