"""Opening an NPM index directory and answering from it: the part of an index that remote code needs (see
`npm_hf.inference`)."""

import contextlib
import threading
from pathlib import Path

import faiss
import numpy as np
import torch
from huggingface_hub import snapshot_download
from transformers.utils import logging

from .compact_tokens import read_compact_tokens, token_file_names
from .directory_swap import DirectoryLock, interrupted_swap, recover
from .faiss_io import (FLAT_FILL_MAX_VECTORS, add_vectors, check_positive_int, current_search_parameters, extract_ivf,
                       is_flat, read_faiss_index, search_parameter_names, streamed_exact_search)
from .index_files import (COMPACT_MARKER_FILE, DOCUMENT_OFFSETS_FILE, DOCUMENTS_FILE, ENCODER_SAMPLE_FILE, FAISS_FILE,
                          FORMAT_VERSION,
                          MANIFEST_FILE, POSITIONS_FILE, TOKEN_FILES, DocumentStore, IndexManifest, IndexMismatchError,
                          NPMIndexError, encoder_fingerprint, encoder_sample_matches, read_manifest, sha256_file,
                          tokenizer_fingerprint)
from .segments import (SEGMENTS_BEFORE_COMPACTION, base_manifest, base_of, check_edits, drop_deleted,
                       edit_file_names, fetch_count, join_faiss, open_edits, segments)
from .tokens import SPECIAL
from .validation import check_faiss_file, check_file_names, check_index_arrays
from .vector_codes import CODEC_FILE, NO_VECTORS, CodedVectors, read_codec
from .vector_shards import check_layout, open_vector_shards, vector_layout


logger = logging.get_logger(__name__)

# search_many: FAISS's matrix-product search of a flat index from this many queries on, in blocks of this many
# stored vectors.
_BLAS_MIN_QUERIES = 16
_BLAS_DATABASE_BLOCK = 32768
# verify="fast" hashes files up to this size on every load; larger ones are checked by size (all with "full").
_FAST_VERIFY_MAX_BYTES = 64 << 20
_CHUNK_TOKENS = 1 << 22  # token arrays scanned in chunks of this many tokens


class NPMIndexReader:
    """A token-level index over a reference corpus, opened for answering: load, search, evidence. Open with
    [`NPMIndexReader.load`], [`NPMIndexReader.from_pretrained`] or [`NPMIndexReader.for_model`]. npm_hf's
    [`NPMIndex`] (`npm_hf.index`) is this class plus building and editing."""

    def __init__(self, path: Path, manifest: IndexManifest, token_arrays: dict, positions, vectors, faiss_index,
                 documents, deleted_rows: np.ndarray | None = None, fill_on_first_use: bool = False):
        self.path = Path(path)
        self.manifest = manifest
        self.token_ids = token_arrays["token_ids"]
        self.token_flags = token_arrays["token_flags"]
        self.token_docs = token_arrays["token_docs"]
        self.token_offsets = token_arrays["token_offsets"]
        self.block_size = manifest.block_size
        self.positions = positions
        self.vectors = vectors
        # fill_on_first_use: `faiss_index` is an empty flat index filled from `vectors` when first used, so that a
        # pipeline that never searches the whole index (a pre-filter) never pays for its float32 copy
        self._faiss_index, self._fill_pending, self._fill_lock = faiss_index, fill_on_first_use, threading.Lock()
        self.documents = documents
        # rows of deleted documents (an edited index, `segments`): in the vectors and FAISS, never in a result
        self.deleted_rows = deleted_rows
        self.num_searchable = manifest.num_indexed_tokens - (0 if deleted_rows is None else int(deleted_rows.sum()))
        base_index = base_of(faiss_index)  # an edited index searches its segments beside the base (same kind)
        self.exact_search = isinstance(faiss.downcast_index(base_index), faiss.IndexFlat)
        # an exact index too large to fill into FAISS at load: searched over the memory-mapped vectors
        self.streamed_exact_search = (self.exact_search and faiss_index.ntotal == 0 and not fill_on_first_use
                                      and manifest.num_indexed_tokens > 0)
        self._search_names = search_parameter_names(base_index)
        self._search_defaults = current_search_parameters(base_index)
        self._search_applied = dict(self._search_defaults)
        # nprobe / ef_search are settings of the one FAISS index that threads share: set and search under a lock
        # (another thread's value changed mid-search gave wrong answers and FAISS errors). Flat indexes have none.
        self._search_lock = threading.Lock() if self._search_names else contextlib.nullcontext()

    @property
    def faiss_index(self):
        """The FAISS index over the vector rows (a flat one filled from the vectors on first use)."""
        if self._fill_pending:
            with self._fill_lock:
                if self._fill_pending:
                    try:
                        add_vectors(self._faiss_index, self.vectors)
                    except ValueError as error:  # a non-finite stored vector
                        self._faiss_index.reset()
                        raise self._corrupted_vectors(str(error)) from None
                    self._fill_pending = False
        return self._faiss_index

    @faiss_index.setter
    def faiss_index(self, faiss_index) -> None:
        self._faiss_index, self._fill_pending = faiss_index, False

    def __repr__(self) -> str:
        m = self.manifest
        return (
            f"{type(self).__name__}(path={str(self.path)!r}, documents={m.num_documents}, tokens={m.num_tokens}, "
            f"indexed={m.num_indexed_tokens}, dim={m.hidden_size}, factory={m.faiss_factory!r})"
        )

    @property
    def num_tokens(self) -> int:
        return self.manifest.num_tokens

    @property
    def num_indexed(self) -> int:
        return self.manifest.num_indexed_tokens

    # ------------------------------------------------------------------------------------------------ loading
    @classmethod
    def load(cls, path, verify: str = "fast", previous: "NPMIndexReader | None" = None) -> "NPMIndexReader":
        """Open an index directory. `verify`: "fast" checks every file's size and the checksums of files up to
        64 MiB, "full" hashes every file, "none" only checks sizes. `previous`: this index as loaded before an edit
        that left its base as it was; its filled flat FAISS index is used again instead of being filled anew."""
        path = Path(path)
        if verify not in ("none", "fast", "full"):
            raise ValueError(f"verify={verify!r}; use 'none', 'fast' or 'full'.")
        manifest_path = path / MANIFEST_FILE
        if not manifest_path.is_file() and interrupted_swap(path):
            with DirectoryLock(path, "recovery of an interrupted edit"):
                recover(path, MANIFEST_FILE)
        if not manifest_path.is_file():
            hint = " It looks like an interrupted build; build it again." if path.name.startswith(".") else ""
            raise NPMIndexError(
                f"No NPM index at {path} (missing {MANIFEST_FILE}).{hint} Build one with "
                "`npm-hf build-index --model DIR --corpus FILE` or `npm_hf.build_index(...)`."
            )
        manifest = read_manifest(manifest_path)
        if manifest.format_version > FORMAT_VERSION:
            raise NPMIndexError(
                f"{path} uses index format {manifest.format_version}, newer than this npm_hf supports "
                f"({FORMAT_VERSION}); upgrade npm_hf."
            )
        check_file_names(path, manifest.files)
        check_edits(path, manifest)
        edited, manifest = manifest, base_manifest(manifest)  # the base's own files hold the base's counts
        _verify_files(path, manifest, verify)
        _check_counts(path, edited)  # before any file is decoded by what the counts say
        same_base = _same_base(previous, path, manifest)  # an edit left the base as it was: its arrays serve again
        try:
            if same_base:
                token_arrays, positions = previous.base_token_arrays, previous.base_positions
            elif COMPACT_MARKER_FILE in manifest.files:  # format 3: decoded into memory
                token_arrays, positions = read_compact_tokens(path, manifest.block_size)
            else:  # np.asarray: plain ndarray views of the maps (no copy); np.memmap's indexing is much slower.
                token_arrays = {name: np.asarray(np.load(path / file, mmap_mode="r", allow_pickle=False))
                                for name, file in TOKEN_FILES.items()}
                positions = np.asarray(np.load(path / POSITIONS_FILE, mmap_mode="r", allow_pickle=False))
            vectors = _open_vectors(path, manifest)
            offsets = np.load(path / DOCUMENT_OFFSETS_FILE, allow_pickle=False)
            check_faiss_file(path / FAISS_FILE, manifest.hidden_size)
            faiss_index = read_faiss_index(path / FAISS_FILE)
        except NPMIndexError:
            raise
        except (ValueError, OSError, RuntimeError) as error:
            raise NPMIndexError(f"Index files in {path} are corrupted ({error}); rebuild the index.") from None
        # Flat indexes are stored empty (see build): filled from the vectors here up to FLAT_FILL_MAX_VECTORS,
        # searched by streaming over the memory-mapped vectors above (`search`).
        streamed = is_flat(faiss_index) and faiss_index.ntotal == 0 and len(vectors) > FLAT_FILL_MAX_VECTORS
        reused = previous.base_faiss_index if same_base else None
        if reused is not None and is_flat(reused) and reused.ntotal == manifest.num_indexed_tokens > 0 and not streamed:
            faiss_index = reused  # filled already, and never changed in place
        # an empty flat index is filled from the vectors when first searched (with segments: now, to be joined)
        fill_later = (is_flat(faiss_index) and faiss_index.ntotal == 0 and faiss_index.d == vectors.shape[1]
                      and not streamed and faiss_index is not reused)
        if fill_later and segments(edited):
            fill_later = False
            try:
                add_vectors(faiss_index, vectors)
            except ValueError as error:
                raise NPMIndexError(f"The vectors of the index at {path} are corrupted: {error}. Rebuild the index "
                                    "(NPMIndex.load(path, verify='full') checks every file's checksum).") from None
        faiss_rows = len(vectors) if streamed or fill_later else faiss_index.ntotal
        expected = {
            **{name: (array.shape[:1], (manifest.num_tokens,)) for name, array in token_arrays.items()},
            "positions": (positions.shape, (manifest.num_indexed_tokens,)),
            "vectors": (vectors.shape, (manifest.num_indexed_tokens, manifest.hidden_size)),
            "faiss": ((faiss_rows, faiss_index.d), (manifest.num_indexed_tokens, manifest.hidden_size)),
            "documents": ((len(offsets) - 1,), (manifest.num_documents,)),
        }
        for name, (got, want) in expected.items():
            if tuple(got) != tuple(want):
                raise NPMIndexError(f"{path}: {name} has shape {tuple(got)}, the manifest says {tuple(want)}; rebuild.")
        if not same_base:
            check_index_arrays(path, manifest, token_arrays, positions, offsets,
                               (path / DOCUMENTS_FILE).stat().st_size)
        documents = DocumentStore(path / DOCUMENTS_FILE, offsets)
        parts = open_edits(path, edited, token_arrays, positions, vectors, documents)
        base_faiss = faiss_index
        faiss_index = join_faiss(path, edited, faiss_index, parts.segment_vectors, streamed)
        if len(segments(edited)) > SEGMENTS_BEFORE_COMPACTION:
            logger.warning(f"The index at {path} has {len(segments(edited))} append segments, each searched on its "
                           f"own: compact it (`npm-hf index compact --index {path}`) to search one index again.")
        if not manifest.paragraph_blocks:
            logger.warning(
                f"The index at {path} was built by an npm_hf before 0.2: its blocks are cut from one running token "
                "stream and it indexes mid-word pieces too, unlike the official NPM datastore, so its answers differ "
                "from the reference's. It is answered as before; rebuild it for the faithful index: `npm-hf "
                "build-index --model MODEL --corpus CORPUS --output DIR --overwrite`.")
        reader = cls(path, edited, parts.token_arrays, parts.positions, parts.vectors, faiss_index, parts.documents,
                     deleted_rows=parts.deleted_rows, fill_on_first_use=fill_later)
        # what `previous` hands to the next load (never changed in place: edited views are new arrays)
        reader.base_faiss_index, reader.base_token_arrays, reader.base_positions = base_faiss, token_arrays, positions
        reader.base_files = _base_files(manifest)
        return reader

    @classmethod
    def from_pretrained(cls, name_or_path, subfolder: str = "index", verify: str = "fast",
                        **hub_kwargs) -> "NPMIndexReader":
        """Open the index of a model directory or Hub repo (`<name_or_path>/<subfolder>`).

        `hub_kwargs` (`revision`, `cache_dir`, `token`, `local_files_only`) go to `huggingface_hub.snapshot_download`.
        """
        local = Path(name_or_path) / subfolder
        if Path(name_or_path).is_dir():
            _warn_if_outside(Path(name_or_path), local)
            return cls.load(local, verify=verify)
        # "*" also matches "/": every file under the subfolder, whatever the number of vector shards
        snapshot = snapshot_download(str(name_or_path), allow_patterns=[f"{subfolder}/*"], **hub_kwargs)
        return cls.load(Path(snapshot) / subfolder, verify=verify)

    @classmethod
    def for_model(cls, model, verify: str = "fast", **hub_kwargs) -> "NPMIndexReader":
        """The index that belongs to `model`: in its directory, in its Hub repo at the very commit its weights came
        from, or in the dataset repo and commit its config names (`index_repo_id`, `index_revision`)."""
        config = model.config
        if config.index_repo_id:
            return cls.from_pretrained(config.index_repo_id, subfolder=config.index_subfolder, verify=verify,
                                       repo_type="dataset", revision=config.index_revision, **hub_kwargs)
        commit = getattr(config, "_commit_hash", None)
        if commit and not Path(model.name_or_path).is_dir():
            hub_kwargs.setdefault("revision", commit)
        return cls.from_pretrained(model.name_or_path, subfolder=config.index_subfolder, verify=verify, **hub_kwargs)

    def check_compatible(self, model, tokenizer=None) -> None:
        """Raise IndexMismatchError unless this index was built with `model`'s weights (and `tokenizer`)."""
        if encoder_fingerprint(model) != self.manifest.encoder_fingerprint:
            sample = self.path / ENCODER_SAMPLE_FILE
            if not sample.is_file():  # an index built before the weight sample existed
                precision = ("" if model.dtype == torch.float32 else
                             f" It has no record of its weights that a {model.dtype} model could be checked "
                             "against: load the model in float32 or bfloat16 (dtype=torch.bfloat16), or rebuild "
                             "the index with this version of npm_hf.")
                raise IndexMismatchError(
                    f"The index at {self.path} was built with different encoder weights "
                    f"({self.manifest.encoder_name_or_path!r}) than the model in use ({model.name_or_path!r}). Its "
                    "vectors would not match the queries: rebuild the index with this model (`npm-hf build-index`)."
                    + precision
                )
            if not encoder_sample_matches(model, sample):
                raise IndexMismatchError(
                    f"The index at {self.path} was built with different encoder weights "
                    f"({self.manifest.encoder_name_or_path!r}) than the model in use ({model.name_or_path!r}, "
                    f"{model.dtype}): not even in another precision are they the same. Its vectors would not match "
                    "the queries: rebuild the index with this model (`npm-hf build-index`)."
                )
        if tokenizer is not None and tokenizer_fingerprint(tokenizer) != self.manifest.tokenizer_fingerprint:
            raise IndexMismatchError(
                f"The index at {self.path} was built with a different tokenizer than the one in use; its token ids "
                "would be decoded wrongly. Use the model's own tokenizer or rebuild the index."
            )

    # ---------------------------------------------------------------------------------------------- searching
    def search(self, queries: np.ndarray, k: int, nprobe: int | None = None,
               ef_search: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Top-k vector rows per query by inner product, re-scored exactly from the stored float16 vectors
        (a flat index's own scores are exact already: it holds those vectors in float32).

        `nprobe` (IVF indexes: inverted lists visited) and `ef_search` (HNSW: candidate list size) trade speed for
        recall of approximate indexes, for this call only; None keeps FAISS's default.

        Returns `(scores, rows)` of shape (num_queries, min(k, num_indexed)), best first. Rows FAISS could not
        fill (approximate indexes) are -1 with score -inf.
        """
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        self.check_searchable()
        if not np.isfinite(queries).all():
            raise ValueError(
                "The encoder produced non-finite query vectors (NaN or inf), so no answer can be scored. Usual causes: "
                "float16 overflow (load the model in float32 or bfloat16) or corrupted model weights."
            )
        if self.exact_search:  # a flat index holds the stored vectors themselves: its scores are already exact
            self.check_search_parameters(nprobe, ef_search)
            k = min(int(k), self.num_searchable)
            fetch = fetch_count(k, self.deleted_rows, self.num_indexed)  # deleted rows are dropped below
            try:
                if self.streamed_exact_search:
                    found = streamed_exact_search(self.vectors, queries, fetch)
                else:
                    found = self.faiss_index.search(queries, fetch)
            except ValueError as error:  # a non-finite stored vector
                raise self._corrupted_vectors(str(error)) from None
            found = drop_deleted(*found, self.deleted_rows, k)
        elif self.manifest.vector_dtype == NO_VECTORS:  # k_factor·k candidates (never deleted rows), re-scored
            k_factor = int(self.manifest.vector_codes.get("k_factor", 1))  # from the codes; cut to k below
            candidates = self.candidate_rows(queries, int(k) * k_factor, nprobe=nprobe, ef_search=ef_search)
            found = self.rescore(queries, candidates)
        else:
            found = self.rescore(queries, self.candidate_rows(queries, k, nprobe=nprobe, ef_search=ef_search))
        scores, rows = found
        scores, rows = scores[:, : min(int(k), self.num_searchable)], rows[:, : min(int(k), self.num_searchable)]
        bad = ~np.isfinite(scores) & (rows >= 0)  # never let a NaN score reach an answer
        if bad.any():
            raise self._corrupted_vectors(f"vector row {int(rows[bad][0])} scores {scores[bad][0]}")
        return scores, rows

    def check_searchable(self) -> None:
        """Raise NPMIndexError when no vector row is left to search: every document of the index was deleted."""
        if self.num_searchable == 0:
            raise NPMIndexError(
                f"The index at {self.path} holds no indexed token: every one of its {self.manifest.num_documents} "
                "documents was deleted, so no answer can be found. Add documents (`npm-hf index add`) or build the "
                "index again."
            )

    def _corrupted_vectors(self, detail: str) -> NPMIndexError:
        return NPMIndexError(
            f"The vectors of the index at {self.path} are corrupted ({detail}: non-finite values, e.g. a flipped bit). "
            "Check the files with NPMIndex.load(path, verify='full') and rebuild the index."
        )

    def rescore(self, queries: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Exact inner products of each query with its candidate rows (from the stored float16 vectors), best first;
        rows of -1 (no candidate) score -inf."""
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        found = rows >= 0
        vectors = self.vectors_for_rows(np.where(found, rows, 0).reshape(-1)).reshape(*rows.shape, -1)
        scores = np.einsum("qkd,qd->qk", vectors, queries)
        scores[~found] = -np.inf
        order = np.argsort(-scores, axis=1, kind="stable")
        return np.take_along_axis(scores, order, axis=1), np.take_along_axis(rows, order, axis=1)

    def candidate_rows(self, queries: np.ndarray, k: int, nprobe: int | None = None,
                       ef_search: int | None = None) -> np.ndarray:
        """FAISS's top-k vector rows per query (approximate for compressed indexes; -1 where none was found), deleted
        rows left out."""
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        self.check_searchable()
        k = min(int(k), self.num_searchable)
        with self._search_lock:
            self._configure_search(nprobe, ef_search)
            scores, rows = self.faiss_index.search(queries, fetch_count(k, self.deleted_rows, self.num_indexed))
        return drop_deleted(scores, rows, self.deleted_rows, k)[1]

    def check_search_parameters(self, nprobe: int | None = None, ef_search: int | None = None) -> None:
        """Raise ValueError unless `nprobe` / `ef_search` (None: not set) apply to this index and are in range."""
        factory = self.manifest.faiss_factory
        if nprobe is not None:
            check_positive_int("nprobe", nprobe)
            if "nprobe" not in self._search_names:
                raise ValueError(
                    f"nprobe applies to IVF indexes, and the index at {self.path} is {factory!r}, which has no "
                    "inverted lists. Drop nprobe (CLI: --nprobe), or build an IVF index (e.g. 'IVF1024,SQ8')."
                )
            nlist = extract_ivf(base_of(self.faiss_index)).nlist
            if nprobe > nlist:
                raise ValueError(
                    f"nprobe={nprobe} is more than the {nlist} IVF lists (nlist) of the index at {self.path} "
                    f"({factory!r}); use 1 <= nprobe <= {nlist} (nprobe={nlist} searches every list)."
                )
        if ef_search is not None:
            check_positive_int("ef_search", ef_search)
            if "ef_search" not in self._search_names:
                raise ValueError(
                    f"efSearch applies to HNSW indexes (e.g. 'HNSW32', or an IVF with an HNSW quantizer such as "
                    f"'IVF4096_HNSW32,SQ8'), and the index at {self.path} is {factory!r}. Drop ef_search "
                    "(CLI: --ef-search)."
                )

    def _configure_search(self, nprobe: int | None, ef_search: int | None) -> None:
        """Set FAISS's search parameters for the next search: the given values, else FAISS's defaults."""
        self.check_search_parameters(nprobe, ef_search)
        given = {"nprobe": nprobe, "ef_search": ef_search}
        for name, default in self._search_defaults.items():
            value = int(default if given[name] is None else given[name])
            if self._search_applied[name] != value:
                faiss.ParameterSpace().set_index_parameter(self.faiss_index, self._search_names[name], value)
                self._search_applied[name] = value

    def holds_token_ids(self, ids) -> bool:
        """Whether every token id of `ids` occurs in the index's text (special and deleted tokens aside)."""
        cached = getattr(self, "_held_ids", None)
        if cached is None or cached[0] is not self.manifest:  # once per version of the index, in bounded chunks
            held = np.zeros(0, dtype=bool)
            for lo in range(0, self.num_tokens, _CHUNK_TOKENS):
                chunk = np.asarray(self.token_ids[lo : lo + _CHUNK_TOKENS], dtype=np.int64)
                text = (np.asarray(self.token_flags[lo : lo + _CHUNK_TOKENS]) & SPECIAL) == 0
                seen = np.bincount(chunk[text], minlength=len(held)) > 0
                held = np.pad(held, (0, len(seen) - len(held))) | seen
            self._held_ids = (self.manifest, held)
        held = self._held_ids[1]
        ids = np.asarray(ids, dtype=np.int64)
        return len(ids) > 0 and bool(np.all(ids < len(held))) and bool(held[ids].all())

    def vectors_for_rows(self, rows: np.ndarray) -> np.ndarray:
        """The stored vectors of `rows`, as float32; a non-finite one (a corrupted file) raises NPMIndexError."""
        rows = np.asarray(rows)
        vectors = np.asarray(self.vectors[rows], dtype=np.float32)
        if not np.isfinite(vectors).all():
            bad = ~np.isfinite(vectors).all(axis=-1)
            raise self._corrupted_vectors(f"vector row {int(rows[bad].reshape(-1)[0])}")
        return vectors

    def rows_for_positions(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Vector rows of corpus positions, and whether each position is indexed at all."""
        rows = np.searchsorted(self.positions, positions)
        rows = np.minimum(rows, self.num_indexed - 1)
        indexed = self.positions[rows] == positions
        if self.deleted_rows is not None:
            indexed &= ~self.deleted_rows[rows]
        return rows, indexed

    def block_of(self, positions: np.ndarray) -> np.ndarray:
        return positions // self.block_size

    def block_range(self, block: int) -> tuple[int, int]:
        return block * self.block_size, min((block + 1) * self.block_size, self.num_tokens)

    def evidence(self, start: int, end: int) -> dict:
        """Where the tokens [start, end] (inclusive corpus positions) come from: their document, the block they lie
        in (`block_id`) and the text of that block's part of the document, with `text[start:end]` being the phrase
        itself and `document_text[doc_start:doc_end]` the same phrase in the whole document."""
        doc_index = int(self.token_docs[start])
        document = self.documents[doc_index]
        block = int(start) // self.block_size
        lo, hi = self.block_range(block)
        same_doc = (self.token_docs[lo:hi] == doc_index) & ((self.token_flags[lo:hi] & SPECIAL) == 0)
        window = self.token_offsets[lo:hi][same_doc]
        context_start, context_end = int(window[:, 0].min()), int(window[:, 1].max())
        char_start, char_end = int(self.token_offsets[start, 0]), int(self.token_offsets[end, 1])
        return {
            "doc_id": document["id"],
            "title": document["title"],
            "start": char_start - context_start,
            "end": char_end - context_start,
            "text": document["text"][context_start:context_end],
            "block_id": block,
            "doc_start": char_start,
            "doc_end": char_end,
        }

    def surface_text(self, start: int, end: int) -> str:
        """The corpus text of tokens [start, end] (inclusive positions), as written in the document."""
        document = self.documents[int(self.token_docs[start])]
        return document["text"][int(self.token_offsets[start, 0]) : int(self.token_offsets[end, 1])]

    def search_many(self, queries: np.ndarray, k: int, nprobe: int | None = None,
                    ef_search: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """`search` for a batch of queries (e.g. all of a batched pipeline call's). On a flat index, from 16 queries
        on, FAISS scores them with one matrix product per block of stored vectors rather than one pass over all
        vectors per query (each pass reads every vector from memory: 3-4 times slower at k=4096 on 2 cores). The
        scores can differ from `search`'s in the last float bits (another summation order)."""
        if not self.exact_search or len(queries) < _BLAS_MIN_QUERIES:
            return self.search(queries, k, nprobe=nprobe, ef_search=ef_search)
        names = ("distance_compute_blas_threshold", "distance_compute_blas_query_bs",
                 "distance_compute_blas_database_bs")
        saved = [getattr(faiss.cvar, name) for name in names]
        # FAISS-wide settings, for this call only: BLAS from 1 query; blocks of up to 512 queries by
        # _BLAS_DATABASE_BLOCK vectors (fewer, larger products than FAISS's 4096 x 1024: better on few cores; FAISS
        # allocates a whole block's scores, 64 MiB at most here)
        wanted = (1, min(len(queries), 512), _BLAS_DATABASE_BLOCK)
        try:
            for name, value in zip(names, wanted):
                setattr(faiss.cvar, name, value)
            return self.search(queries, k, nprobe=nprobe, ef_search=ef_search)
        finally:
            for name, value in zip(names, saved):
                setattr(faiss.cvar, name, value)


def _open_vectors(path: Path, manifest: IndexManifest):
    """The float16 vector shards of an index, or (vector_dtype "none") its codes read as decoded vectors."""
    layout = vector_layout(manifest)
    if manifest.vector_dtype != NO_VECTORS:
        return open_vector_shards(path, layout, manifest.hidden_size)
    codec = read_codec(path / CODEC_FILE)
    code_size = manifest.vector_codes.get("code_size")
    if codec.d != manifest.hidden_size or codec.sa_code_size() != code_size:
        raise NPMIndexError(f"{path / CODEC_FILE} encodes {codec.d} dimensions in {codec.sa_code_size()} bytes, the "
                            f"manifest says {manifest.hidden_size} in {code_size}; rebuild the index.")
    return CodedVectors(open_vector_shards(path, layout, code_size, dtype=np.uint8), codec)


def _warn_if_outside(model_dir: Path, index_dir: Path) -> None:
    """Warn when the index folder of a model directory, or a file in it, is a link that leaves the directory: its
    manifest then vouches for files that were not shipped with the model. (In a Hub cache snapshot, files link to
    the repo's blobs: those are inside.)"""
    model_root = model_dir.resolve()
    roots = [model_root]
    if model_root.parent.name == "snapshots":  # huggingface_hub's cache: repo/snapshots/<commit>/ -> repo/blobs/
        roots.append(model_root.parent.parent / "blobs")
    if not index_dir.exists():
        return
    outside = [p for p in [index_dir, *index_dir.iterdir()]
               if not any(p.resolve().is_relative_to(root) for root in roots)]
    if outside:
        logger.warning(f"The index of {model_dir} links outside the model directory ({outside[0]} -> "
                       f"{outside[0].resolve()}): its checksums vouch for files that do not ship with the model. "
                       "Copy the index into the model directory if that is not intended.")


def _base_files(manifest: IndexManifest) -> dict:
    """The counts of the base (the index without its edits) and the manifest entries of its files: equal entries,
    the same base."""
    edits = edit_file_names(manifest)
    return {"counts": (manifest.num_tokens, manifest.num_indexed_tokens, manifest.num_documents),
            **{name: entry for name, entry in manifest.files.items() if name not in edits}}


def _same_base(previous, path: Path, manifest: IndexManifest) -> bool:
    """Whether `previous` was loaded from the same directory with the same base files (counts and checksums)."""
    return (previous is not None and getattr(previous, "base_files", None) is not None
            and Path(previous.path) == path and previous.base_files == _base_files(manifest))


def _check_counts(path: Path, manifest: IndexManifest) -> None:
    """The manifest's counts agree with each other (the arrays' shapes were checked against them)."""
    m = manifest
    problems = []
    if m.block_size < 1 or m.hidden_size < 1:
        problems.append(f"block_size={m.block_size} and hidden_size={m.hidden_size} must be >= 1")
    elif m.num_blocks != -(-m.num_tokens // m.block_size):
        problems.append(f"{m.num_tokens} tokens make {-(-m.num_tokens // m.block_size)} blocks of {m.block_size}, "
                        f"not num_blocks={m.num_blocks}")
    elif m.paragraph_blocks and m.num_tokens % m.block_size:
        problems.append(f"{m.num_tokens} tokens are not whole blocks of block_size={m.block_size}")
    if not 0 <= m.num_indexed_tokens <= m.num_tokens:
        problems.append(f"num_indexed_tokens={m.num_indexed_tokens} is not within 0..num_tokens={m.num_tokens}")
    if not 0 <= m.num_deleted_documents <= m.num_documents:
        problems.append(f"num_deleted_documents={m.num_deleted_documents} is not within 0..{m.num_documents}")
    if problems:
        raise NPMIndexError(f"The manifest of {path} contradicts itself: {'; '.join(problems)}. Rebuild the index.")


def _verify_files(path: Path, manifest: IndexManifest, verify: str) -> None:
    layout = vector_layout(manifest)
    check_layout(path, layout, manifest.num_indexed_tokens)
    for name, expected in manifest.files.items():
        if name == MANIFEST_FILE:
            continue
        file = path / name
        if not file.is_file():
            raise NPMIndexError(f"{path} is incomplete: {name} is missing; rebuild the index.")
        size = file.stat().st_size
        if size != expected["bytes"]:
            raise NPMIndexError(
                f"{file} is {size} bytes, the manifest says {expected['bytes']} (truncated or modified); rebuild."
            )
        if verify == "full" or (verify == "fast" and size <= _FAST_VERIFY_MAX_BYTES):
            if sha256_file(file) != expected["sha256"]:
                raise NPMIndexError(f"{file} is corrupted (checksum mismatch); rebuild the index.")
    required = {*token_file_names(COMPACT_MARKER_FILE in manifest.files), *(s["file"] for s in layout), FAISS_FILE,
                DOCUMENTS_FILE, *([CODEC_FILE] if manifest.vector_dtype == NO_VECTORS else [])}
    missing = required - set(manifest.files)
    if missing:
        raise NPMIndexError(f"The manifest of {path} lists no {sorted(missing)}; rebuild the index.")
