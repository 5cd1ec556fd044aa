"""Stop words: which vocabulary ids count as function words or punctuation.

Two sets, because the official code and npm_hf's own span rules ask different questions:

* `stopword_ids`: ids whose text is a stop word, however the word is split; `span_stopwords="edges"` / `"any"`
  apply it to whole-word tokens only (a word whose first piece happens to read "the" is not a stop word).
* `reference_stopword_ids`: the official code's notion (method §2), a fixed id list: the word-initial form of each
  stop word (" the", " of", "[the]" but not "##the" or a BPE piece without its leading space) and every punctuation
  piece. It decides which tokens a `remove_stopwords` index leaves out and which spans
  `span_stopwords="reference"` rejects (any span holding one of these ids, wherever it sits in a word). The
  official list of 211 RoBERTa ids is not in its repository; this rebuilds the same kind of list for any tokenizer.

And two tables for npm_hf's punctuation rules: `symbol_pieces` (pieces with no letter or digit: a span may not start
or end with a word made of them) and `joiner_pieces` (the marks `span_punctuation="inner"` lets inside a span, between
two words, where they join a number, date or name).
"""

import unicodedata

import numpy as np


STOPWORDS = frozenset(
    """a about above after again against all am an and any are as at be because been before being below between both
    but by can could did do does doing down during each few for from further had has have having he her here hers
    herself him himself his how i if in into is it its itself just me more most my myself no nor not now of off on
    once only or other our ours ourselves out over own same she should so some such than that the their theirs them
    themselves then there these they this those through to too under until up very was we were what when where which
    while who whom why will with would you your yours yourself yourselves 's 't . , ; : ! ? ' " ( ) [ ] - -- ...
    """.split()
)


# Marks that may join two words of one number, date or name ("May 16, 1929", "Austin, Texas", "Procter & Gamble",
# "1914 – 1918") and the period of an abbreviation ("St. Louis", "J. Edgar Hoover"): `joiner_pieces`' values.
JOINERS = frozenset(", & / - \u2013 \u2014".split())
ABBREVIATION_MARK = "."
JOINER, ABBREVIATION = 1, 2
LONGEST_ABBREVIATION = 3  # characters of the word before an abbreviation's period ("St", "Mt", "Jr", "J")


def stopword_ids(tokenizer) -> frozenset:
    """Vocabulary ids whose text is a stop word or punctuation."""
    vocab = tokenizer.get_vocab()
    ids = list(vocab.values())
    words = tokenizer.batch_decode([[i] for i in ids])
    return frozenset(i for i, word in zip(ids, words) if word.strip().lower() in STOPWORDS)


def pieces_after_a_word(tokenizer) -> list[str]:
    """Each vocabulary id's text as decoded right after a word (`decode([anchor, id])` less the anchor's text), listed
    by id: a word-initial piece begins with a space (BPE pieces with the leading-space marker, WordPiece pieces
    without `##`), a continuation piece does not."""
    size = max(len(tokenizer), max(tokenizer.get_vocab().values()) + 1)
    anchor = tokenizer.convert_tokens_to_ids(tokenizer.tokenize("a"))[0]
    prefix = tokenizer.decode([anchor])
    pairs = tokenizer.batch_decode([[anchor, i] for i in range(size)])
    return [text[len(prefix):] if text.startswith(prefix) else text for text in pairs]


def reference_stopword_ids(tokenizer) -> frozenset:
    """The official code's kind of stop-word id list for `tokenizer`: word-initial stop-word pieces
    (`pieces_after_a_word`) and punctuation."""
    ids = sorted(tokenizer.get_vocab().values())
    alone = tokenizer.batch_decode([[i] for i in ids])
    after = pieces_after_a_word(tokenizer)
    special = set(tokenizer.all_special_ids)
    chosen = set()
    for i, word in zip(ids, alone):
        text = word.strip()
        if i in special or not text:
            continue
        if all(unicodedata.category(c).startswith("P") for c in text):
            chosen.add(i)
        elif text.lower() in STOPWORDS and after[i][:1].isspace():
            chosen.add(i)
    return frozenset(chosen)


def symbol_pieces(tokenizer, pieces: list[str] | None = None) -> np.ndarray:
    """A boolean table over the vocabulary: pieces whose text holds no letter or digit (punctuation, symbols, "|",
    "%"). Pieces that decode to part of a character (byte-level BPE's fragments of one UTF-8 character) and pieces
    that are only whitespace are not symbols, the unknown token is: a word is a symbol when all of its pieces are.
    `pieces`:
    `pieces_after_a_word(tokenizer)`, when the caller has it."""
    pieces = pieces_after_a_word(tokenizer) if pieces is None else pieces
    table = np.zeros(_vocabulary_size(tokenizer), dtype=bool)
    for i, piece in enumerate(pieces):
        text = piece.strip()
        table[i] = bool(text) and "\ufffd" not in text and not any(c.isalnum() for c in text)
    table[list(tokenizer.all_special_ids)] = False
    if tokenizer.unk_token_id is not None:  # its text is not known: "|" read by a vocabulary without it, say
        table[tokenizer.unk_token_id] = True
    return table


def joiner_pieces(tokenizer, pieces: list[str] | None = None) -> np.ndarray:
    """A table over the vocabulary: JOINER for the pieces that are one of JOINERS, ABBREVIATION for the period, 0
    for the rest (with or without the space a piece may carry). `pieces`: as for `symbol_pieces`."""
    pieces = pieces_after_a_word(tokenizer) if pieces is None else pieces
    table = np.zeros(_vocabulary_size(tokenizer), dtype=np.uint8)
    for i, piece in enumerate(pieces):
        text = piece.strip()
        table[i] = JOINER if text in JOINERS else ABBREVIATION if text == ABBREVIATION_MARK else 0
    return table


def _vocabulary_size(tokenizer) -> int:
    return max(max(tokenizer.get_vocab().values()) + 1, len(tokenizer))


def id_table(tokenizer, ids) -> np.ndarray:
    """A boolean table over `tokenizer`'s vocabulary, True at `ids` (for vectorised lookups of token arrays)."""
    table = np.zeros(_vocabulary_size(tokenizer), dtype=bool)
    table[list(ids)] = True
    return table
