"""Shard actors on a Ray cluster: connecting, naming, starting and checking them, and stopping them.

Each shard of an index is a `ShardActor` (a `ShardSearcher`, `npm_hf.serve.shards`, as a Ray actor), named
`{name}:shard-{s}-of-{n}:replica-{r}` in the Ray namespace `npm_hf`, where `name` defaults to the index folder's
name and a hash of its path (`serving_name`). `serve_index` / `npm-hf serve-index` start them detached, so that
they outlive the command and clients attach to them by name (`stop_index` / `--stop` ends them); a
`RayShardedIndex` without such actors starts its own (`start_shards`). Actors are started with strings and
numbers only and describe themselves in JSON (`describe_shards` checks every key); replicas of one shard are placed
on different nodes.
"""

import functools
import hashlib
import json
import socket
import time
from pathlib import Path

import numpy as np
from transformers.utils import logging

from ..inference.reader import NPMIndexReader
from .shards import DESCRIPTION_KEYS, ShardSearcher, ShardServingError, index_identity, shard_bounds


try:
    import ray
    from ray.exceptions import GetTimeoutError, RayActorError
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
        # None: a new instance ("local"), never a cluster that happens to run on this machine (that is "auto")
        ray.init(address=address or "local", log_to_driver=False, logging_level="warning",
                 **({"include_dashboard": False} if address in (None, "local") else {}))
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


def named_actors(name: str) -> dict[tuple[int, int, int], str]:
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
    check_count("replicas", replicas)
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
                node = nodes[(s + r) % len(nodes)] if nodes else None
                options["scheduling_strategy"] = (NodeAffinitySchedulingStrategy(node, soft=False) if node
                                                  else "SPREAD")
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
                    f"{where} failed to load the index ({error_cause(error)}). The index directory must be readable at "
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


def error_cause(error) -> str:
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
    for actor in named_actors(name or serving_name(index_dir)).values():
        try:
            ray.kill(ray.get_actor(actor, namespace=NAMESPACE))
            stopped += 1
        except ValueError:
            pass  # gone meanwhile
    return stopped


def check_count(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}.")
