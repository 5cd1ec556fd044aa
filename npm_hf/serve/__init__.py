"""Serving an index from several processes or machines: row shards searched by Ray actors (`pip install
'npm-hf[ray]'`; docs/scale_out.md).

    shards      ShardSearcher: the rows [lo, hi) of an index directory, searched by the index's own code (no Ray)
    ray_index   the shard actors, `RayShardedIndex` (the client a pipeline takes as `index=`), `serve_index` and
                `stop_index` (what `npm-hf serve-index` runs)

Not remote code: saved models never carry it. `import npm_hf.serve` works without Ray; using it raises an
ImportError that says what to install.
"""

from .ray_index import (NAMESPACE, RAY_MISSING, RayShardedIndex, actor_name, connect, require_ray, serve_index,
                        serving_name, start_shards, stop_index)
from .shards import ShardSearcher, ShardServingError, index_identity, shard_bounds


__all__ = ["NAMESPACE", "RAY_MISSING", "RayShardedIndex", "ShardSearcher", "ShardServingError", "actor_name",
           "connect", "index_identity", "require_ray", "serve_index", "serving_name", "shard_bounds", "start_shards",
           "stop_index"]
