"""The vocabulary of a saved BM25 pre-filter, looked up on disk instead of held in memory.

bm25s keeps the word → column mapping of its score matrix as a Python dict parsed from `vocab.json`: about 115
bytes of heap per word, several times the block texts' own size for a 10^6-token index (docs/benchmarks.md, "The
BM25 pre-filter's memory"). A query needs only a handful of its words, so the build writes the vocabulary a second
time as two memory-mapped arrays, and a query binary-searches them:

- `<name>.words.npy`: uint8, the UTF-8 bytes of every word, words in byte order (= code point order), concatenated;
- `<name>.word_ids.npy`: int64 `[num_words + 1, 2]`: column 0 the start of each word in the bytes (the last row
  the end of the last word), column 1 its column in the score matrix (-1 in the last row).

A lookup reads about 2 log2(num_words) entries (16 for 43,000 words) and the words it compares against.
"""

import os
from pathlib import Path

import numpy as np


def vocabulary_files(stem: str) -> tuple[str, str]:
    """The two file names of the vocabulary saved next to the BM25 files called `<stem>.*`."""
    return f"{stem}.words.npy", f"{stem}.word_ids.npy"


def _encode(word: str) -> bytes:
    return word.encode("utf-8", errors="surrogatepass")


def write_vocabulary(vocab: dict, directory, stem: str) -> list[str]:
    """Write `vocab` (word → column) as the two files `vocabulary_files(stem)` in `directory` (each through a
    temporary name); returns their names."""
    words = sorted(vocab, key=_encode)
    encoded = [_encode(word) for word in words]
    ends = np.cumsum([len(word) for word in encoded], dtype=np.int64)
    table = np.empty((len(words) + 1, 2), dtype=np.int64)
    table[0, 0] = 0
    table[1:, 0] = ends
    table[:-1, 1] = [int(vocab[word]) for word in words]
    table[-1, 1] = -1
    blob = np.frombuffer(b"".join(encoded), dtype=np.uint8)
    names = vocabulary_files(stem)
    for name, array in zip(names, (blob, table)):
        path = Path(directory) / name
        partial = path.with_name(path.name + ".partial")
        with open(partial, "wb") as handle:
            np.save(handle, array)
        os.replace(partial, path)
    return list(names)


class DiskVocabulary:
    """Word → column of a saved BM25 index, read from the memory-mapped files `write_vocabulary` wrote; `get` and
    `in` answer as the dict bm25s loads would."""

    def __init__(self, directory, stem: str):
        words_name, ids_name = vocabulary_files(stem)
        malformed = (f"The BM25 vocabulary files {words_name}, {ids_name} in {directory} are malformed; rebuild the "
                     "pre-filter (`npm-hf index compact`) or the index.")
        try:
            self._bytes = np.load(Path(directory) / words_name, mmap_mode="r", allow_pickle=False)
            self._table = np.load(Path(directory) / ids_name, mmap_mode="r", allow_pickle=False)
        except ValueError as error:  # e.g. an object array, which is never unpickled
            raise ValueError(f"{malformed} ({error})") from None
        if (self._bytes.dtype != np.uint8 or self._bytes.ndim != 1 or self._table.dtype != np.int64
                or self._table.ndim != 2 or self._table.shape[1] != 2 or len(self._table) < 1
                or int(self._table[-1, 0]) != len(self._bytes)):
            raise ValueError(malformed)

    def __len__(self) -> int:
        return len(self._table) - 1

    def _word(self, i: int) -> bytes:
        start, end = int(self._table[i, 0]), int(self._table[i + 1, 0])
        return self._bytes[start:end].tobytes()

    def get(self, word: str, default=None):
        key = _encode(word)
        lo, hi = 0, len(self)
        while lo < hi:  # the first word >= key
            mid = (lo + hi) // 2
            if self._word(mid) < key:
                lo = mid + 1
            else:
                hi = mid
        if lo < len(self) and self._word(lo) == key:
            return int(self._table[lo, 1])
        return default

    def __contains__(self, word: str) -> bool:
        return self.get(word) is not None
