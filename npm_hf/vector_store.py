"""Serve the candidate search of an [`NPMIndex`] from a Qdrant collection (a vector database that shards and
replicates across machines), keeping everything else (token metadata, evidence, exact re-scoring) in the index.

    from qdrant_client import QdrantClient
    from npm_hf.vector_store import QdrantSearchIndex, upload_index

    client = QdrantClient(":memory:")          # or QdrantClient(path="qdrant-data"), or QdrantClient(url=..., api_key=...)
    index = NPMIndex.load("my-npm/index")
    upload_index(index, client)                # once: vector row i becomes point i of collection "npm-<fingerprint>"
    fill = NonparametricFillMaskPipeline(model, tokenizer, index=QdrantSearchIndex(index, client))

Points: id = vector row, vector = the stored float16 row as float32, distance = DOT (raw inner product, as FAISS's
IndexFlatIP). The collection's metadata records which index it was built from; a collection of another index, or an
unfinished upload, is refused. See docs/scale_out.md for serving 10^9-10^10 tokens this way.
"""

import hashlib
import json

import numpy as np
from transformers.utils import logging

from .inference.index_files import NPMIndexError


logger = logging.get_logger(__name__)

_METADATA_KEY = "npm_hf_index"  # collection metadata: {"fingerprint", "encoder_fingerprint", "num_indexed", ...}
_UPLOAD_BATCH = 1024
_QUERY_BATCH = 64  # query vectors per query_batch_points request


def _qdrant():
    """The qdrant_client module, imported only when a Qdrant index is used."""
    try:
        import qdrant_client
        from qdrant_client import models
    except ImportError:
        raise ImportError(
            "Serving an NPM index from Qdrant needs the qdrant-client package: pip install 'npm-hf[qdrant]' "
            "(or pip install qdrant-client)."
        ) from None
    return qdrant_client, models


def index_fingerprint(index) -> str:
    """Identify the searchable content of an index: its encoder, tokenizer, the checksum of its vectors and its
    edits (append segments, tombstones: an edit with add_documents / delete_documents changes it)."""
    manifest = index.manifest
    vectors = manifest.files.get("vectors.npy", {}).get("sha256", "")
    tombstones = manifest.edits.get("tombstones")
    edits = json.dumps([manifest.edits.get("segments", []), manifest.files.get(tombstones) if tombstones else None],
                       sort_keys=True)
    parts = (manifest.encoder_fingerprint, manifest.tokenizer_fingerprint, vectors, str(manifest.num_indexed_tokens),
             str(manifest.hidden_size), edits)
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def collection_name_for(index) -> str:
    return f"npm-{index_fingerprint(index)[:16]}"


def _index_metadata(index, complete: bool) -> dict:
    m = index.manifest
    return {"fingerprint": index_fingerprint(index), "encoder_fingerprint": m.encoder_fingerprint,
            "num_indexed": int(m.num_indexed_tokens), "hidden_size": int(m.hidden_size),
            "encoder_name_or_path": m.encoder_name_or_path, "complete": complete}


def _collection_metadata(client, name: str) -> dict | None:
    """The npm_hf metadata of collection `name` (None: the collection was not made by upload_index)."""
    metadata = client.get_collection(name).config.metadata or {}
    return metadata.get(_METADATA_KEY)


def _check_collection(client, name: str, index) -> None:
    """Raise NPMIndexError unless collection `name` holds all of `index`'s vectors, uploaded by upload_index."""
    if not client.collection_exists(name):
        raise NPMIndexError(
            f"The Qdrant collection {name!r} does not exist. Upload the index first: "
            "npm_hf.vector_store.upload_index(index, client)."
        )
    stored = _collection_metadata(client, name)
    if stored is None:
        raise NPMIndexError(
            f"The Qdrant collection {name!r} has no npm_hf metadata, so it cannot be matched to the index at "
            f"{index.path}. Upload the index into a new collection with npm_hf.vector_store.upload_index."
        )
    if stored.get("fingerprint") != index_fingerprint(index):
        raise NPMIndexError(
            f"The Qdrant collection {name!r} was built from another index (encoder "
            f"{stored.get('encoder_name_or_path')!r}, {stored.get('num_indexed')} vectors) than the one at "
            f"{index.path} ({index.manifest.encoder_name_or_path!r}, {index.num_indexed} vectors); its rows would "
            "point at the wrong tokens. Use this index's own collection (upload_index(index, client) names it), or "
            "replace this one with upload_index(index, client, collection_name=..., overwrite=True)."
        )
    count = client.count(name, exact=True).count
    if not stored.get("complete") or count != index.num_indexed:
        raise NPMIndexError(
            f"The Qdrant collection {name!r} holds {count} of the index's {index.num_indexed} vectors (an upload "
            "that did not finish); run upload_index(index, client) again to complete it."
        )


def upload_index(index, client, collection_name: str | None = None, batch_size: int = _UPLOAD_BATCH,
                 overwrite: bool = False, show_progress_bar: bool = True, **collection_kwargs) -> str:
    """Stream the vectors of `index` into a Qdrant collection (point id = vector row) and return its name.

    `collection_name` defaults to `npm-<fingerprint>`. An existing collection of the same index is completed (upserts
    by row are idempotent, so an interrupted upload is simply run again) or left as it is when complete; one of
    another index is refused unless `overwrite=True`. `on_disk` and `datatype` (e.g. `models.Datatype.FLOAT16`) go to
    the collection's `VectorParams`, the other `collection_kwargs` to `create_collection` (cluster settings such as
    `shard_number`, `replication_factor`, `hnsw_config`, `quantization_config`).
    """
    from tqdm.auto import tqdm

    _, models = _qdrant()
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    name = collection_name or collection_name_for(index)
    fingerprint = index_fingerprint(index)
    if client.collection_exists(name):
        stored = _collection_metadata(client, name) or {}
        if overwrite:
            client.delete_collection(name)
        elif stored.get("fingerprint") != fingerprint:
            raise NPMIndexError(
                f"The Qdrant collection {name!r} already holds vectors of another index (fingerprint "
                f"{str(stored.get('fingerprint'))[:16]}, this index {fingerprint[:16]}). Choose another "
                "collection_name, or pass overwrite=True to replace it."
            )
        elif stored.get("complete"):
            logger.info(f"The Qdrant collection {name!r} already holds this index; nothing to upload.")
            return name
    if not client.collection_exists(name):
        vectors_config = models.VectorParams(size=index.manifest.hidden_size, distance=models.Distance.DOT,
                                             on_disk=collection_kwargs.pop("on_disk", None),
                                             datatype=collection_kwargs.pop("datatype", None))
        client.create_collection(name, vectors_config=vectors_config,
                                 metadata={_METADATA_KEY: _index_metadata(index, complete=False)}, **collection_kwargs)
    if index.deleted_rows is not None:
        raise NPMIndexError(
            f"The index at {index.path} has deleted documents whose vectors are still in its files (until "
            f"compaction); upload it once compacted: `npm-hf index compact --index {index.path}` or index.compact()."
        )
    total = index.num_indexed
    with tqdm(total=total, desc=f"Uploading to Qdrant {name}", unit="vec", disable=not show_progress_bar) as progress:
        for lo in range(0, total, batch_size):
            rows = np.arange(lo, min(lo + batch_size, total))
            # .tolist(): plain floats travel over both REST and gRPC; the local mode stores them as they are.
            client.upsert(name, models.Batch(ids=rows.tolist(), vectors=index.vectors_for_rows(rows).tolist()),
                          wait=True)
            progress.update(len(rows))
    client.update_collection(name, metadata={_METADATA_KEY: _index_metadata(index, complete=True)})
    logger.info(f"Uploaded {total} vectors of {index.path} to the Qdrant collection {name!r}.")
    return name


class QdrantSearchIndex:
    """An [`NPMIndex`] whose candidate search runs in a Qdrant collection; every other attribute (token arrays,
    vectors for exact re-scoring, evidence, check_compatible, editing) is the wrapped index's.

    Args:
        index (`NPMIndex`): the loaded index whose vectors were uploaded with [`upload_index`].
        client (`qdrant_client.QdrantClient`): local (`QdrantClient(":memory:")`, `QdrantClient(path=...)`) or
            remote (`QdrantClient(url=..., api_key=...)`); the calls are the same.
        collection_name (`str`, *optional*): defaults to the one upload_index gives this index.
        exact (`bool`): ask Qdrant for exhaustive search instead of its HNSW graph (a server option; the local mode
            always searches exhaustively).
    """

    def __init__(self, index, client, collection_name: str | None = None, exact: bool = False):
        _qdrant()
        self._index = index
        self.client = client
        self.collection_name = collection_name or collection_name_for(index)
        self.exact = exact
        _check_collection(client, self.collection_name, index)
        self._fingerprint = index_fingerprint(index)

    def __getattr__(self, name):
        if name == "_index":  # not set yet (e.g. during unpickling): no recursion
            raise AttributeError(name)
        return getattr(self._index, name)

    def __repr__(self) -> str:
        return f"QdrantSearchIndex(collection={self.collection_name!r}, index={self._index!r})"

    @property
    def exact_search(self) -> bool:
        return False  # candidates come from Qdrant and are re-scored from the stored vectors

    def check_search_parameters(self, nprobe: int | None = None, ef_search: int | None = None) -> None:
        """Raise ValueError unless the knobs apply: Qdrant has no IVF lists (no nprobe); ef_search is HNSW's hnsw_ef."""
        if nprobe is not None:
            raise ValueError(
                f"nprobe applies to FAISS IVF indexes; the Qdrant collection {self.collection_name!r} is searched with "
                "HNSW. Drop nprobe (CLI: --nprobe) and use ef_search (Qdrant's hnsw_ef) instead."
            )
        if ef_search is not None and (isinstance(ef_search, bool) or not isinstance(ef_search, (int, np.integer))
                                      or ef_search < 1):
            raise ValueError(f"ef_search must be a positive integer, got {ef_search!r}.")

    def candidate_rows(self, queries: np.ndarray, k: int, nprobe: int | None = None,
                       ef_search: int | None = None) -> np.ndarray:
        """Qdrant's top-k vector rows per query, shape (num_queries, min(k, num_indexed)); -1 where none was found."""
        _, models = _qdrant()
        self.check_search_parameters(nprobe, ef_search)
        self._check_unchanged()
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if queries.ndim != 2 or queries.shape[1] != self.manifest.hidden_size:
            raise ValueError(f"queries must have shape (num_queries, {self.manifest.hidden_size}), got "
                             f"{queries.shape}; pass one vector as queries[None, :].")
        limit = min(int(k), self.num_indexed)
        params = models.SearchParams(hnsw_ef=None if ef_search is None else int(ef_search), exact=self.exact)
        rows = np.full((len(queries), limit), -1, dtype=np.int64)
        for lo in range(0, len(queries), _QUERY_BATCH):
            requests = [models.QueryRequest(query=q.tolist(), limit=limit, params=params, with_payload=False,
                                            with_vector=False) for q in queries[lo : lo + _QUERY_BATCH]]
            for i, response in enumerate(self.client.query_batch_points(self.collection_name, requests), start=lo):
                ids = [point.id for point in response.points]
                rows[i, : len(ids)] = ids
        return rows

    def search(self, queries: np.ndarray, k: int, nprobe: int | None = None,
               ef_search: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """`NPMIndex.search`'s contract: `(scores, rows)` of shape (num_queries, min(k, num_indexed)), best first,
        scores exact inner products with the stored float16 vectors, -1 / -inf where Qdrant returned fewer."""
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        # Exact re-scoring from the stored vectors (as NPMIndex does for compressed FAISS indexes): the scores do not
        # depend on how the database stores or quantizes its copy.
        return self.rescore(queries, self.candidate_rows(queries, k, nprobe=nprobe, ef_search=ef_search))

    search_many = search  # a batch is one query_batch_points call already (not the wrapped index's FAISS search)

    def _check_unchanged(self) -> None:
        if index_fingerprint(self._index) != self._fingerprint:
            raise NPMIndexError(
                f"The index at {self._index.path} changed (add_documents / delete_documents) after its Qdrant "
                f"collection {self.collection_name!r} was checked; upload it again (upload_index(index, client)) "
                "and wrap the index anew."
            )
