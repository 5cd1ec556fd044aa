"""An index served in row shards by Ray actors, and the client that answers the pipeline from them.

    index = RayShardedIndex("model/index", num_shards=4, replicas=2, address="auto")
    fill = pipeline("fill-mask", model="model", index=index)

Each shard is an actor (`ShardSearcher`: the index memory-mapped, its rows [lo, hi) searched by the index's own
code); the client fans a search out to one replica of every shard, merges their top-k by score (ties by row, as
the streamed exact search) and hands the pipeline the `(scores, rows)` a local index gives. Everything else the
pipeline reads (token arrays, evidence, vectors of pre-filtered passages) it reads from its own memory-mapped copy of
the index directory, which must be the same index: every shard reports the checksum of its manifest and its rows,
and a shard of another index (or of another version of it) is refused.

What travels: the queries as one float32 numpy array (`ray.put` once per search, shared by the shards), and per
shard two numpy arrays back (float32 scores, int64 rows). Ray stores numpy arrays as raw buffers in its object
store (pickle protocol 5 with the buffer out of band: only dtype and shape are in the pickled header, no Python
object of npm_hf is ever serialized); actors are started with strings and ints only and describe themselves in JSON.
The client accepts only float32/int64 arrays of the expected shape, rows inside the shard's range, finite scores.
Ray's own protocol is still pickle-based: serve shards on a cluster you trust, as any Ray cluster.

`serve_index` / `npm-hf serve-index` start named, detached shard actors that outlive the command; a client with the
same index directory and number of shards attaches to them (`stop_index` / `--stop` ends them). Without such
actors the client starts its own and stops them on `close()` (or when its process exits).
"""

import functools
import hashlib
import json
import socket
import threading
import time
from pathlib import Path

import numpy as np
from transformers.utils import logging

from ..inference.faiss_io import is_flat
from ..inference.reader import NPMIndexReader
from .shards import DESCRIPTION_KEYS, ShardSearcher, ShardServingError, index_identity, shard_bounds


try:
    import ray
    from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
except ImportError:  # npm_hf works without Ray; only serving needs it
    ray = None

logger = logging.get_logger(__name__)

NAMESPACE = "npm_hf"  # the Ray namespace of every shard actor
RAY_MISSING = ("Serving an index on Ray needs the ray package, which is not installed: pip install 'npm-hf[ray]' "
               "(or pip install 'ray>=2.40').")


def require_ray() -> None:
    if ray is None:
        raise ImportError(RAY_MISSING)


class ShardActor(ShardSearcher):
    """A shard as a Ray actor (`ray.remote(ShardActor)`): the searcher, and where it runs."""

    def node_id(self) -> str:
        return ray.get_runtime_context().get_node_id()


@functools.cache
def _actor_class():
    """The Ray actor class of a shard (made once; needs ray). Not restarted by Ray: a lost replica is the
    client's to route around, and a restart elsewhere would not be checked."""
    return ray.remote(max_restarts=0, max_task_retries=0)(ShardActor)


# ---------------------------------------------------------------------------------------------------- the cluster
def connect(address: str | None) -> None:
    """Join the Ray cluster at `address` ("auto": the one running on this machine; "host:port": its GCS; None: a
    new local Ray instance), unless this process is connected already."""
    require_ray()
    if address not in (None, "auto", "local") and not str(address).startswith("ray://"):
        _check_reachable(str(address))
    if ray.is_initialized():
        return
    try:
        ray.init(address=address, log_to_driver=False, logging_level="warning",
                 **({"include_dashboard": False} if address is None else {}))
    except ConnectionError as error:
        raise ShardServingError(
            f"Cannot connect to a Ray cluster at address={address!r} ({error}). Start one (`ray start --head` on "
            "the head machine, `ray start --address HEAD:6379` on the others), check its address with `ray status`, "
            "or pass address=None to start a Ray instance in this process.") from None


def _check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """Fail fast, with a clear error, when nothing listens at host:port (Ray itself retries for a long time)."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ShardServingError(f"address={address!r} is not a Ray address: use 'auto', 'HOST:PORT' (the head's GCS "
                                "port, 6379 by default) or None for a local Ray instance.")
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as error:
        raise ShardServingError(
            f"No Ray cluster answers at {address} ({error.strerror or error}). Is it running? Start it with "
            f"`ray start --head --port {port}` on {host}, check the address with `ray status`, or pass address=None "
            "to start a Ray instance in this process.") from None


def serving_name(index_dir) -> str:
    """The default name of the shards of the index at `index_dir`: its folder name and a hash of its full path."""
    path = Path(index_dir).resolve()
    return f"{path.name}-{hashlib.sha256(str(path).encode()).hexdigest()[:10]}"


def actor_name(name: str, shard: int, num_shards: int, replica: int) -> str:
    return f"{name}:shard-{shard}-of-{num_shards}:replica-{replica}"


def _named_actors(name: str) -> dict[tuple[int, int, int], str]:
    """(shard, num_shards, replica) -> actor name of the live named shard actors called `name`."""
    found = {}
    for entry in ray.util.list_named_actors(all_namespaces=True):
        if entry["namespace"] != NAMESPACE or not entry["name"].startswith(name + ":shard-"):
            continue
        try:
            shard_part, replica_part = entry["name"][len(name) + 1 :].split(":")
            shard, total = shard_part[len("shard-"):].split("-of-")
            found[int(shard), int(total), int(replica_part[len("replica-"):])] = entry["name"]
        except ValueError:
            continue  # another naming scheme: not ours
    return found


def _worker_nodes(num_cpus: float) -> list[str]:
    """Ids of the live nodes that can host a shard actor, in a stable order."""
    return sorted(node["NodeID"] for node in ray.nodes()
                  if node.get("Alive") and node.get("Resources", {}).get("CPU", 0) >= num_cpus)


def start_shards(index_dir, num_shards: int, replicas: int = 1, name: str | None = None, detached: bool = False,
                 actor_index_dir=None, num_cpus: float = 1, verify: str = "fast",
                 start_timeout_s: float = 300) -> list[list]:
    """Start `replicas` actors for each of `num_shards` row shards of the index at `index_dir` (on the connected
    cluster); returns their handles per shard, once every one has loaded its shard. Replicas of a shard go to
    different nodes. `actor_index_dir`: where the nodes find the index (default: `index_dir`). On any failure the
    actors started are stopped again."""
    require_ray()
    _check_count("replicas", replicas)
    reader = NPMIndexReader.load(index_dir, verify="none")
    bounds = shard_bounds(reader.num_indexed, num_shards)
    name = name or serving_name(index_dir)
    path = str(Path(actor_index_dir or index_dir).resolve())
    nodes = _worker_nodes(num_cpus) if replicas > 1 else []
    if replicas > 1 and len(nodes) < replicas:
        raise ShardServingError(f"replicas={replicas} need as many nodes with {num_cpus} free CPU each (a replica "
                                f"per node); the cluster has {len(nodes)}. Add nodes or lower replicas.")
    actor_class, handles = _actor_class(), []
    try:
        for s, (lo, hi) in enumerate(bounds):
            handles.append([])
            for r in range(replicas):
                options = {"name": actor_name(name, s, num_shards, r), "namespace": NAMESPACE, "num_cpus": num_cpus,
                           "lifetime": "detached" if detached else None}
                options["scheduling_strategy"] = (NodeAffinitySchedulingStrategy(nodes[(s + r) % len(nodes)], soft=False)
                                                  if nodes else "SPREAD")
                try:
                    handles[-1].append(actor_class.options(**options).remote(path, lo, hi, verify))
                except ValueError as error:  # the name is taken
                    raise ShardServingError(
                        f"A shard actor named {options['name']!r} exists already ({error}): attach to it (same "
                        f"num_shards), or stop it first (`npm-hf serve-index --index {index_dir} --stop`).") from None
        describe_shards(handles, reader, bounds, start_timeout_s)
    except BaseException:
        for handle in (h for shard in handles for h in shard):
            ray.kill(handle)
        raise
    return handles


def describe_shards(handles: list[list], reader, bounds, timeout_s: float) -> None:
    """Check that every replica of every shard loaded, serves this index (same manifest checksum) and these rows."""
    identity = index_identity(reader)
    deadline = time.monotonic() + timeout_s
    for s, replicas in enumerate(handles):
        for r, handle in enumerate(replicas):
            where = f"Shard {s} of {len(handles)} (rows {bounds[s][0]}:{bounds[s][1]}, replica {r})"
            try:
                text = ray.get(handle.describe.remote(), timeout=max(deadline - time.monotonic(), 1.0))
            except RayActorError as error:
                raise ShardServingError(
                    f"{where} failed to load the index ({_cause(error)}). The index directory must be readable at "
                    "the same path on every node (or pass the path the nodes see: actor_index_dir=...), complete "
                    f"and of this npm_hf version; `npm-hf serve-index --index {reader.path} --stop` clears old "
                    "shards.") from None
            except GetTimeoutError:
                raise ShardServingError(
                    f"{where} did not start within {timeout_s:.0f} s (no node with a free CPU for it? see `ray "
                    "status`). Add nodes, lower num_shards or replicas, or raise start_timeout_s.") from None
            info = _parse_description(text, where)
            if info["identity"] != identity:
                raise ShardServingError(
                    f"{where} serves another index, or another version of it, than the one at {reader.path} (its "
                    f"manifest checksum is {info['identity']}, this index's {identity}; it serves {info['path']}). "
                    f"Stop the old shards (`npm-hf serve-index --index {reader.path} --stop`) and start them again.")
            if (info["lo"], info["hi"]) != tuple(bounds[s]):
                raise ShardServingError(
                    f"{where} serves rows {info['lo']}:{info['hi']}, not {bounds[s][0]}:{bounds[s][1]}: it was "
                    "started for another number of shards. Attach with the number of shards it was served with, or "
                    "stop and restart them.")


def _parse_description(text, where: str) -> dict:
    try:
        info = json.loads(text) if isinstance(text, str) else None
    except ValueError:
        info = None
    if not isinstance(info, dict) or set(info) != set(DESCRIPTION_KEYS) or not all(
            isinstance(info[key], int) and not isinstance(info[key], bool) for key in ("lo", "hi", "num_indexed")):
        raise ShardServingError(f"{where} described itself as {str(text)[:200]!r}, not as an npm_hf shard: it runs "
                                "another npm_hf version. Install the same npm_hf on every node and restart the shards.")
    return info


def _cause(error) -> str:
    """The last line of an actor's error (for a failed __init__: the exception it raised)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[-1] if lines else type(error).__name__


def serve_index(index_dir, num_shards: int, replicas: int = 1, address: str | None = "auto", name: str | None = None,
                actor_index_dir=None, num_cpus: float = 1, verify: str = "fast",
                start_timeout_s: float = 300) -> str:
    """Start named, detached shard actors of the index at `index_dir` on the Ray cluster at `address`; they run
    until stopped (`stop_index`). Returns the name a `RayShardedIndex(index_dir, num_shards=...)` attaches by."""
    connect(address)
    name = name or serving_name(index_dir)
    start_shards(index_dir, num_shards, replicas, name=name, detached=True, actor_index_dir=actor_index_dir,
                 num_cpus=num_cpus, verify=verify, start_timeout_s=start_timeout_s)
    return name


def stop_index(index_dir=None, name: str | None = None, address: str | None = "auto") -> int:
    """Stop the named shard actors of the index at `index_dir` (or called `name`); returns how many were stopped."""
    if index_dir is None and name is None:
        raise ValueError("Pass the index directory (or the name its shards were served under) to stop.")
    connect(address)
    stopped = 0
    for actor in _named_actors(name or serving_name(index_dir)).values():
        try:
            ray.kill(ray.get_actor(actor, namespace=NAMESPACE))
            stopped += 1
        except ValueError:
            pass  # gone meanwhile
    return stopped


def _check_count(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}.")


# ----------------------------------------------------------------------------------------------------- the client
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
        _check_count("num_shards", num_shards)
        _check_count("replicas", replicas)
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
        found = _named_actors(self.name)
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
        _check_count("k", k)
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
                    self._lose(s, replica, _cause(error))
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
        return _merge(parts, width)

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


def _merge(parts: list[tuple[np.ndarray, np.ndarray]], width: int) -> tuple[np.ndarray, np.ndarray]:
    """The top `width` of the shards' answers per query, best first, ties by row (not found: -1, -inf, last)."""
    scores = np.concatenate([p[0] for p in parts], axis=1)
    rows = np.concatenate([p[1] for p in parts], axis=1)
    if scores.shape[1] < width:
        pad = width - scores.shape[1]
        scores = np.pad(scores, ((0, 0), (0, pad)), constant_values=-np.inf)
        rows = np.pad(rows, ((0, 0), (0, pad)), constant_values=-1)
    order = np.lexsort((np.where(rows >= 0, rows, np.iinfo(np.int64).max), -scores), axis=1)[:, :width]
    return np.take_along_axis(scores, order, axis=1), np.take_along_axis(rows, order, axis=1)
