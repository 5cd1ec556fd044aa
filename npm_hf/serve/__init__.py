"""Serving an index from several processes or machines: row shards searched by Ray actors (`pip install
'npm-hf[ray]'`; docs/scale_out.md).

    shards      ShardSearcher: the rows [lo, hi) of an index directory, searched by the index's own code (no Ray)
    actors      the shard actors on a Ray cluster: connecting, naming, starting (`serve_index`, what `npm-hf
                serve-index` runs), checking and stopping them (`stop_index`)
    client      `RayShardedIndex`: the index a pipeline takes as `index=`, its searches fanned out to the shards

Not remote code: saved models never carry it. `import npm_hf.serve` works without Ray; using it raises an
ImportError that says what to install.
"""

from .actors import (NAMESPACE, RAY_MISSING, actor_name, connect, require_ray, serve_index, serving_name, start_shards,
                     stop_index)
from .client import RayShardedIndex, merge_top_k
from .shards import ShardSearcher, ShardServingError, index_identity, shard_bounds


__all__ = ["NAMESPACE", "RAY_MISSING", "RayShardedIndex", "ShardSearcher", "ShardServingError", "actor_name",
           "connect", "index_identity", "merge_top_k", "require_ray", "serve_index", "serving_name", "shard_bounds",
           "start_shards", "stop_index"]
