"""A saved BM25 pre-filter read on demand: its vocabulary and its posting lists come from the files by `os.pread`, a
few hundred bytes per query word, and are never held in memory or mapped into the process.

bm25s keeps the word → column mapping of its score matrix as a Python dict parsed from `vocab.json`: about 115
bytes of heap per word, several times the block texts' own size for a 10^6-token index (docs/benchmarks.md, "The
BM25 pre-filter's memory"). Memory-mapping its files instead still costs: each page fault maps the cached pages
around it too (the kernel's fault-around, 64 kB), so a handful of query words map most of a small file. A query
needs only its own words' entries, so the build writes the vocabulary a second time as two arrays, and a query reads
just those:

- `<name>.words.npy`: uint8, the UTF-8 bytes of every word, words in byte order (= code point order), concatenated;
- `<name>.word_ids.npy`: int64 `[num_words + 1, 2]`: column 0 the start of each word in the bytes (the last row
  the end of the last word), column 1 its column in the score matrix (-1 in the last row).

`DiskVocabulary` keeps every `BUCKET`-th word in memory (about 1.5 % of the vocabulary), finds a word's bucket among
them and reads that bucket only: two reads per word. `DiskPostings` reads a column of bm25s's CSC score matrix
(`data`, `indices`, `indptr`) the same way and sums the columns of a query in bm25s's own order, so that the scores
are bm25s's bit for bit.
"""

import os
import weakref
from bisect import bisect_right
from pathlib import Path

import numpy as np


BUCKET = 64  # words per bucket of the vocabulary: one read of the table rows and one of the words per lookup


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


class NpyReader:
    """Rows of a C-ordered `.npy` file of plain numbers, read by `os.pread` (no map, no file position shared
    between threads). Raises ValueError for what is not such a file (object arrays are never unpickled)."""

    def __init__(self, path):
        self.path = Path(path)
        with open(self.path, "rb") as handle:
            try:
                version = np.lib.format.read_magic(handle)
                read_header = {(1, 0): np.lib.format.read_array_header_1_0,
                               (2, 0): np.lib.format.read_array_header_2_0}.get(version)
                if read_header is None:
                    raise ValueError(f"npy format version {version} is not supported")
                shape, fortran_order, dtype = read_header(handle)
            except (ValueError, EOFError) as error:
                raise ValueError(f"{self.path.name} is not a .npy array ({error})") from None
            self.offset = handle.tell()
        if dtype.hasobject:
            raise ValueError(f"{self.path.name} holds Python objects, which are never unpickled")
        if fortran_order and len(shape) > 1:
            raise ValueError(f"{self.path.name} is stored in Fortran order")
        self.shape, self.dtype = tuple(shape), dtype
        self.row_bytes = dtype.itemsize * int(np.prod(shape[1:], dtype=np.int64))
        if self.offset + self.row_bytes * (shape[0] if shape else 1) > self.path.stat().st_size:
            raise ValueError(f"{self.path.name} is shorter than its header says")
        self._fd = os.open(self.path, os.O_RDONLY)
        weakref.finalize(self, os.close, self._fd)

    def __len__(self) -> int:
        return self.shape[0]

    def rows(self, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) as a new array."""
        start, stop = max(0, start), min(stop, len(self))
        if stop <= start:
            return np.empty((0, *self.shape[1:]), dtype=self.dtype)
        data = os.pread(self._fd, (stop - start) * self.row_bytes, self.offset + start * self.row_bytes)
        return np.frombuffer(data, dtype=self.dtype).reshape(stop - start, *self.shape[1:])


class DiskVocabulary:
    """Word → column of a saved BM25 index, read from the files `write_vocabulary` wrote; `get` and `in` answer as
    the dict bm25s loads would."""

    def __init__(self, directory, stem: str):
        words_name, ids_name = vocabulary_files(stem)
        malformed = (f"The BM25 vocabulary files {words_name}, {ids_name} in {directory} are malformed; rebuild the "
                     "pre-filter (`npm-hf index compact`) or the index.")
        try:
            self._bytes = NpyReader(Path(directory) / words_name)
            self._table = NpyReader(Path(directory) / ids_name)
        except ValueError as error:
            raise ValueError(f"{malformed} ({error})") from None
        if (self._bytes.dtype != np.uint8 or len(self._bytes.shape) != 1 or self._table.dtype != np.int64
                or self._table.shape[1:] != (2,) or len(self._table) < 1
                or int(self._table.rows(len(self._table) - 1, len(self._table))[0, 0]) != len(self._bytes)):
            raise ValueError(malformed)
        # the first word of every bucket, read once bucket by bucket (the words themselves stay on disk)
        self._firsts = [self._bucket(b)[1][0] for b in range(-(-len(self) // BUCKET))]

    def __len__(self) -> int:
        return len(self._table) - 1

    def _bucket(self, b: int) -> tuple[np.ndarray, list[bytes]]:
        """The columns and the words of bucket `b`."""
        table = self._table.rows(b * BUCKET, min((b + 1) * BUCKET, len(self)) + 1)
        blob = self._bytes.rows(int(table[0, 0]), int(table[-1, 0])).tobytes()
        starts = (table[:, 0] - table[0, 0]).tolist()
        return table[:-1, 1], [blob[starts[i] : starts[i + 1]] for i in range(len(starts) - 1)]

    def get(self, word: str, default=None):
        key = _encode(word)
        b = bisect_right(self._firsts, key) - 1  # the last bucket whose first word is <= key
        if b < 0:
            return default
        columns, words = self._bucket(b)
        i = bisect_right(words, key) - 1
        return int(columns[i]) if i >= 0 and words[i] == key else default

    def __contains__(self, word: str) -> bool:
        return self.get(word) is not None

    def items(self):
        """(word, column) pairs in byte order of the words, read bucket by bucket."""
        for b in range(len(self._firsts)):
            columns, words = self._bucket(b)
            for word, column in zip(words, columns.tolist()):
                yield word.decode("utf-8", errors="surrogatepass"), column


class DiskPostings:
    """The columns of a saved bm25s score matrix (CSC: `data`, `indices`, `indptr` files) read per query word.

    `scores(columns, num_docs, dtype)` is what bm25s's `get_scores_from_ids` computes over a memory-mapped matrix:
    each column's entries added to a zero vector of `dtype` in the order the columns are given, entry by entry."""

    def __init__(self, directory, data_name: str, indices_name: str, indptr_name: str):
        malformed = (f"The BM25 score matrix in {directory} is malformed ({{}}); rebuild the pre-filter (`npm-hf "
                     "index compact`) or the index.")
        try:
            self._data = NpyReader(Path(directory) / data_name)
            self._indices = NpyReader(Path(directory) / indices_name)
            self._indptr = NpyReader(Path(directory) / indptr_name)
        except ValueError as error:
            raise ValueError(malformed.format(error)) from None
        if any(len(reader.shape) != 1 or reader.dtype.kind not in "iuf"
               for reader in (self._data, self._indices, self._indptr)) or len(self._data) != len(self._indices):
            raise ValueError(malformed.format("its three arrays disagree"))

    @property
    def num_columns(self) -> int:
        return len(self._indptr) - 1

    def scores(self, columns: list[int], num_docs: int, dtype) -> np.ndarray:
        scores = np.zeros(num_docs, dtype=dtype)
        for column in columns:
            if not 0 <= column < self.num_columns:
                raise ValueError(f"BM25 column {column} is outside the score matrix ({self.num_columns} columns)")
            start, end = (int(x) for x in self._indptr.rows(column, column + 2))
            np.add.at(scores, self._indices.rows(start, end), self._data.rows(start, end))
        return scores
