"""`RayShardedIndex`: an index whose searches run in Ray shard actors, for the pipeline's `index=`.

    index = RayShardedIndex("model/index", num_shards=4, replicas=2, address="auto")
    fill = pipeline("fill-mask", model="model", index=index)

The client fans a search out to one replica of every shard (`npm_hf.serve.actors`), merges their top-k by score
(ties by row, as the streamed exact search) and hands the pipeline the `(scores, rows)` a local index gives.
Everything else the pipeline reads (token arrays, evidence, vectors of pre-filtered passages) it reads from its own
memory-mapped copy of the index directory, which must be the same index: every shard reports the checksum of its
manifest and its rows, and a shard of another index (or of another version of it) is refused.

What travels: the queries as one float32 numpy array (`ray.put` once per search, shared by the shards), and per
shard two numpy arrays back (float32 scores, int64 rows). Ray stores numpy arrays as raw buffers in its object
store (pickle protocol 5 with the buffer out of band: only dtype and shape are in the pickled header, no Python
object of npm_hf is ever serialized). The client accepts only float32/int64 arrays of the expected shape, rows
inside the shard's range, finite scores. Ray's own protocol is still pickle-based: serve shards on a cluster you
trust, as any Ray cluster.
"""

import threading

import numpy as np
from transformers.utils import logging

from ..inference.faiss_io import is_flat
from ..inference.reader import NPMIndexReader
from .actors import (NAMESPACE, check_count, connect, describe_shards, error_cause, named_actors, ray, require_ray,
                     serving_name, start_shards)
from .shards import ShardServingError, shard_bounds


if ray is not None:
    from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

logger = logging.get_logger(__name__)

class RayShardedIndex(NPMIndexReader):
    """An index whose searches run in Ray actors, one per row shard (and replica), usable wherever an
    `NPMIndexReader` is, e.g. `pipeline("fill-mask", model=..., index=RayShardedIndex(...))`.

    Args:
        index_dir: the index directory (its token arrays and documents are read here, its vectors by the shards).
        num_shards: how many row shards the vectors are cut into (contiguous ranges of rows, as even as possible).
        replicas: actors per shard, on different nodes: a search goes to one of them, and to another when one is
            lost (node failure), so that answers stay the same.
        address: the Ray cluster ("auto": the one on this machine, "HOST:PORT": its head, None: a local Ray
            instance started here); a process already connected to Ray keeps that connection.
        name: the name the shards are served under (default: from the index path, as `npm-hf serve-index`). When
            actors of that name run, the client attaches to them; otherwise it starts its own.
        actor_index_dir: where the nodes find the index, if not at `index_dir`.
        search_timeout_s: the most a shard may take to answer one search before its replica counts as lost.
    """

    def __init__(self, index_dir, num_shards: int = 2, replicas: int = 1, address: str | None = None,
                 name: str | None = None, actor_index_dir=None, num_cpus: float = 1, verify: str = "fast",
                 start_timeout_s: float = 300, search_timeout_s: float = 60):
        require_ray()
        check_count("num_shards", num_shards)
        check_count("replicas", replicas)
        local = NPMIndexReader.load(index_dir, verify=verify)
        self.__dict__.update(local.__dict__)
        if is_flat(self.faiss_index):
            self.faiss_index.reset()  # the shards hold the vectors for search; this copy only reads metadata
        self.bounds = shard_bounds(self.num_indexed, num_shards)
        self.name = name or serving_name(index_dir)
        self.search_timeout_s = search_timeout_s
        self._lock = threading.Lock()  # guards the replica choice and the lost replicas, shared by threads
        self._turn = [0] * num_shards
        self._lost = {}  # (shard, replica) -> why
        connect(address)
        self._owned = False
        handles = self._attach(num_shards, start_timeout_s)
        if handles is None:
            handles = start_shards(self.path, num_shards, replicas, name=self.name, actor_index_dir=actor_index_dir,
                                   num_cpus=num_cpus, verify=verify, start_timeout_s=start_timeout_s)
            self._owned = True
        self.replicas = handles

    def _attach(self, num_shards: int, timeout_s: float) -> list[list] | None:
        """Handles of running named shards of this index, checked; None when none runs."""
        found = named_actors(self.name)
        if not found:
            return None
        counts = sorted({total for _, total, _ in found})
        if counts != [num_shards]:
            raise ShardServingError(
                f"The shards served as {self.name!r} are cut into {counts} shards, not num_shards={num_shards}: "
                f"attach with num_shards={counts[0]}, or stop them (`npm-hf serve-index --index {self.path} --stop`) "
                "and serve again.")
        handles = []
        for s in range(num_shards):
            names = [found[key] for key in sorted(found) if key[0] == s]
            if not names:
                raise ShardServingError(f"Shard {s} of the {num_shards} served as {self.name!r} is missing: stop "
                                        f"them (`npm-hf serve-index --index {self.path} --stop`) and serve again.")
            handles.append([ray.get_actor(actor, namespace=NAMESPACE) for actor in names])
        describe_shards(handles, self, self.bounds, timeout_s)
        logger.info(f"Attached to the {num_shards} shards served as {self.name!r}.")
        return handles

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(path={str(self.path)!r}, shards={len(self.bounds)}, "
                f"replicas={len(self.replicas[0])}, indexed={self.num_indexed})")

    @property
    def num_shards(self) -> int:
        return len(self.bounds)

    def placement(self) -> list[list[str]]:
        """The node id of every replica of every shard."""
        return [ray.get([h.node_id.remote() for h in replicas], timeout=self.search_timeout_s)
                for replicas in self.replicas]

    def close(self) -> None:
        """Stop the shard actors this client started (not those it attached to)."""
        if self._owned:
            for handle in (h for replicas in self.replicas for h in replicas):
                ray.kill(handle)
            self._owned = False

    def __enter__(self) -> "RayShardedIndex":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------------------------------------ searching
    def search(self, queries: np.ndarray, k: int, nprobe: int | None = None,
               ef_search: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """`NPMIndexReader.search`, answered by the shards: each returns its top-k, merged by score."""
        return self._search(queries, k, nprobe, ef_search, many=False)

    def search_many(self, queries: np.ndarray, k: int, nprobe: int | None = None,
                    ef_search: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """`NPMIndexReader.search_many`, answered by the shards (each with its own `search_many`)."""
        return self._search(queries, k, nprobe, ef_search, many=True)

    def _search(self, queries, k, nprobe, ef_search, many: bool):
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        check_count("k", k)
        width = min(int(k), self.num_indexed)
        if width == 0:
            return np.zeros((len(queries), 0), dtype=np.float32), np.zeros((len(queries), 0), dtype=np.int64)
        if queries.ndim != 2 or queries.shape[1] != self.manifest.hidden_size:
            raise ValueError(f"Queries must be (n, {self.manifest.hidden_size}) vectors, got shape {queries.shape}.")
        if not np.isfinite(queries).all():
            raise ValueError(
                "The encoder produced non-finite query vectors (NaN or inf), so no answer can be scored. Usual causes: "
                "float16 overflow (load the model in float32 or bfloat16) or corrupted model weights.")
        self.check_search_parameters(nprobe, ef_search)
        shared = ray.put(queries)
        args = (shared, int(k), int(nprobe or 0), int(ef_search or 0), many)
        pending = [self._submit(s, args) for s in range(self.num_shards)]
        parts = []
        for s in range(self.num_shards):
            while True:
                replica, refs = pending[s]
                try:
                    scores, rows = ray.get(refs, timeout=self.search_timeout_s)
                except RayActorError as error:  # its process or node is gone
                    self._lose(s, replica, error_cause(error))
                    pending[s] = self._submit(s, args)
                    continue
                except GetTimeoutError:
                    self._lose(s, replica, f"no answer within search_timeout_s={self.search_timeout_s} s")
                    pending[s] = self._submit(s, args)
                    continue
                except RayTaskError as error:  # the search itself raised: the same error as a local search
                    raise error.as_instanceof_cause() from None
                parts.append(self._checked(s, scores, rows, len(queries), width))
                break
        return merge_top_k(parts, width)

    def _submit(self, shard: int, args):
        """Send the search to the next live replica of `shard` (round robin): (replica, its two object refs)."""
        with self._lock:
            live = [r for r in range(len(self.replicas[shard])) if (shard, r) not in self._lost]
            if not live:
                lo, hi = self.bounds[shard]
                why = "; ".join(f"replica {r}: {self._lost[shard, r]}" for r in range(len(self.replicas[shard])))
                raise ShardServingError(
                    f"Shard {shard} of {self.num_shards} (rows {lo}:{hi}) of the index at {self.path} has no live "
                    f"replica ({why}): its node was lost or its actor stopped, and its rows cannot be searched. "
                    f"Serve the index again (`npm-hf serve-index --index {self.path} --shards {self.num_shards}`, or "
                    "a new RayShardedIndex), with replicas >= 2 to survive losing a node.")
            replica = live[self._turn[shard] % len(live)]
            self._turn[shard] += 1
        handle = self.replicas[shard][replica]
        return replica, handle.search.options(num_returns=2).remote(*args)

    def _lose(self, shard: int, replica: int, why: str) -> None:
        with self._lock:
            if (shard, replica) not in self._lost:
                logger.warning(f"Shard {shard} replica {replica} of {self.path} is lost ({why}); using the others.")
                self._lost[shard, replica] = why

    def _checked(self, shard: int, scores, rows, num_queries: int, width: int):
        """A shard's answer, if it is one: float32 scores and int64 rows of one shape (n, <= width), rows inside the
        shard's range (IVF shards may leave -1: not found), finite scores where a row was found, best first."""
        lo, hi = self.bounds[shard]
        problem = None
        if type(scores) is not np.ndarray or type(rows) is not np.ndarray:
            problem = f"{type(scores).__name__} and {type(rows).__name__}, not numpy arrays"
        elif scores.dtype != np.float32 or rows.dtype != np.int64:
            problem = f"{scores.dtype} scores and {rows.dtype} rows, not float32 and int64"
        elif scores.shape != rows.shape or scores.ndim != 2 or len(scores) != num_queries or scores.shape[1] > width:
            problem = f"shapes {scores.shape} and {rows.shape} for {num_queries} queries and k={width}"
        else:
            found = rows >= 0
            if np.any(rows[found] < lo) or np.any(rows[found] >= hi) or np.any(rows[~found] != -1):
                problem = f"rows outside its range {lo}:{hi}"
            elif not np.isfinite(scores[found]).all():
                problem = "non-finite scores of found rows"
        if problem is not None:
            raise ShardServingError(
                f"Shard {shard} of the index at {self.path} answered {problem}: it runs another npm_hf version or is "
                "corrupted. Install the same npm_hf on every node and serve the index again.")
        return np.where(rows >= 0, scores, -np.inf).astype(np.float32), rows


def merge_top_k(parts: list[tuple[np.ndarray, np.ndarray]], width: int) -> tuple[np.ndarray, np.ndarray]:
    """The top `width` of the shards' answers per query, best first, ties by row (not found: -1, -inf, last)."""
    scores = np.concatenate([p[0] for p in parts], axis=1)
    rows = np.concatenate([p[1] for p in parts], axis=1)
    if scores.shape[1] < width:
        pad = width - scores.shape[1]
        scores = np.pad(scores, ((0, 0), (0, pad)), constant_values=-np.inf)
        rows = np.pad(rows, ((0, 0), (0, pad)), constant_values=-1)
    order = np.lexsort((np.where(rows >= 0, rows, np.iinfo(np.int64).max), -scores), axis=1)[:, :width]
    return np.take_along_axis(scores, order, axis=1), np.take_along_axis(rows, order, axis=1)
