"""`RayShardedIndex` on a real multi-node Ray cluster on this machine: a head and two worker nodes, each a raylet
of its own over 127.0.0.1 (`ray.cluster_utils.Cluster`). Marked `ray` (CI runs them after the slow tests).

Every wait on the cluster is bounded: the client's own timeouts (`search_timeout_s`, `start_timeout_s`) and the
cluster's start-up, which alone is retried (a loaded machine can be slow to bring up raylets)."""

import threading
import time

import numpy as np
import pytest
from transformers import pipeline


ray = pytest.importorskip("ray")
from ray.cluster_utils import Cluster  # noqa: E402

import npm_hf  # noqa: E402
from npm_hf.cli import main as cli_main  # noqa: E402
from npm_hf.inference.pipeline import NonparametricFillMaskPipeline  # noqa: E402
from npm_hf.serve import NAMESPACE, RayShardedIndex, ShardServingError, serving_name, stop_index  # noqa: E402


pytestmark = [pytest.mark.ray, pytest.mark.parametrize("encoder_dir", ["bert"], indirect=True)]

WORKERS = 2
NODE = {"num_cpus": 2, "node_ip_address": "127.0.0.1"}
# dead nodes are noticed within seconds, not the default ~30 s
SYSTEM_CONFIG = {"health_check_initial_delay_ms": 1000, "health_check_period_ms": 1000,
                 "health_check_failure_threshold": 3}
START_ATTEMPTS, START_TIMEOUT_S = 3, 180


def start_cluster() -> Cluster:
    """A head (no CPU: it hosts no shard) and WORKERS worker nodes; retried, as raylets can be slow to come up."""
    last = None
    for attempt in range(START_ATTEMPTS):
        cluster = None
        try:
            cluster = Cluster(initialize_head=True, head_node_args={
                "num_cpus": 0, "node_ip_address": "127.0.0.1", "_system_config": SYSTEM_CONFIG})
            for _ in range(WORKERS):
                cluster.add_node(**NODE)
            cluster.wait_for_nodes(timeout=START_TIMEOUT_S)
            ray.init(address=cluster.address, log_to_driver=False)
            return cluster
        except Exception as error:  # noqa: BLE001 (start-up only: any failure gets a fresh cluster)
            last = error
            if ray.is_initialized():
                ray.shutdown()
            if cluster is not None:
                cluster.shutdown()
            time.sleep(5 * (attempt + 1))
    raise RuntimeError(f"No Ray cluster started in {START_ATTEMPTS} attempts: {last}")


@pytest.fixture(scope="module")
def cluster():
    with pytest.MonkeyPatch.context() as patch:
        # Ray turns 127.0.0.1 into the machine's outward address, which its raylets here do not listen on
        patch.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        patch.setattr(ray._private.ray_constants, "ENABLE_RAY_CLUSTER", False)
        cluster = start_cluster()
        try:
            yield cluster
        finally:
            ray.shutdown()
            cluster.shutdown()


def worker_of(cluster, node_id: str):
    return next(node for node in cluster.list_all_nodes() if node.node_id == node_id)


def replace_node(cluster, node) -> None:
    """Remove a worker node (its raylet and actors die) and add a fresh one, so the next test has WORKERS again."""
    cluster.remove_node(node)
    cluster.add_node(**NODE)
    cluster.wait_for_nodes(timeout=START_TIMEOUT_S)


def named_actors_left(timeout_s: float = 30) -> list:
    """The named actors still alive once those just stopped are gone (ray.kill returns before they are)."""
    deadline = time.monotonic() + timeout_s
    while (left := ray.util.list_named_actors(all_namespaces=True)) and time.monotonic() < deadline:
        time.sleep(0.5)
    return left


def queries(mask: str) -> list[str]:
    return [f"Abraham Lincoln was born in {mask}.", f"The Chihuahuan Desert covers parts of New Mexico and {mask}.",
            f"Hagios Demetrios is located in {mask}.", f"The Rio Grande flows through New {mask}."]


def fill_mask(npm_dir, index, **decoding):
    """The pipeline as users make it (README): transformers' pipeline("fill-mask", ..., index=...)."""
    fill = pipeline("fill-mask", model=str(npm_dir), index=index, **decoding)
    assert isinstance(fill, NonparametricFillMaskPipeline) and fill.index is index
    return fill


def query_vectors(index, count=6, seed=0):
    rng = np.random.default_rng(seed)
    rows = rng.choice(index.num_indexed, size=count, replace=False)
    return (index.vectors_for_rows(rows) + rng.normal(scale=0.1, size=(count, index.manifest.hidden_size))
            ).astype(np.float32)


def canonical(scores, rows):
    order = np.lexsort((np.where(rows >= 0, rows, np.iinfo(np.int64).max), -scores), axis=1)
    return np.take_along_axis(scores, order, axis=1), np.take_along_axis(rows, order, axis=1)


def test_answers_are_the_local_index_answers(cluster, npm_dir, mask):
    local = npm_hf.NPMIndex.load(npm_dir / "index")
    with RayShardedIndex(npm_dir / "index", num_shards=3) as sharded:
        assert len({node for shard in sharded.placement() for node in shard}) == WORKERS  # spread over the nodes
        vectors = query_vectors(local)
        for k in (3, 8, local.num_indexed, local.num_indexed + 5):  # k >= the number of shards, up to every row
            for many in (False, True):
                got = (sharded.search_many if many else sharded.search)(vectors, k)
                want = canonical(*(local.search_many if many else local.search)(vectors, k))
                np.testing.assert_array_equal(got[1], want[1])
                np.testing.assert_array_equal(got[0], want[0])
        for k in (8, 4096):  # 4096: more than the indexed tokens, every score exact
            ray_fill, local_fill = fill_mask(npm_dir, sharded, k=k), fill_mask(npm_dir, local, k=k)
            for text in queries(mask):
                assert ray_fill(text, top_k=5) == local_fill(text, top_k=5)
            texts = queries(mask)
            assert ray_fill(texts, batch_size=4, top_k=3) == local_fill(texts, batch_size=4, top_k=3)


def test_searches_from_several_threads(cluster, npm_dir):
    local = npm_hf.NPMIndex.load(npm_dir / "index")
    vectors = query_vectors(local, count=8, seed=1)
    want = canonical(*local.search(vectors, 10))
    results, errors = [], []

    def work():
        try:
            for _ in range(5):
                results.append(sharded.search(vectors, 10))
        except Exception as error:  # noqa: BLE001 (reported below)
            errors.append(error)

    with RayShardedIndex(npm_dir / "index", num_shards=2, replicas=2) as sharded:
        threads = [threading.Thread(target=work) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
    assert not errors and len(results) == 20
    for scores, rows in results:
        np.testing.assert_array_equal(rows, want[1])
        np.testing.assert_array_equal(scores, want[0])


def test_a_lost_node_without_replicas_is_a_clear_error(cluster, npm_dir):
    local = npm_hf.NPMIndex.load(npm_dir / "index")
    vectors = query_vectors(local)
    with RayShardedIndex(npm_dir / "index", num_shards=2, search_timeout_s=30) as sharded:
        sharded.search(vectors, 5)
        node = sharded.placement()[0][0]
        replace_node(cluster, worker_of(cluster, node))
        started = time.monotonic()
        with pytest.raises(ShardServingError, match=r"Shard 0 of 2 .* no live replica.*replicas >= 2"):
            sharded.search(vectors, 5)
        assert time.monotonic() - started < 60


def test_replicas_keep_the_answers_when_a_node_is_lost(cluster, npm_dir, mask):
    local = npm_hf.NPMIndex.load(npm_dir / "index")
    with RayShardedIndex(npm_dir / "index", num_shards=2, replicas=2, search_timeout_s=30) as sharded:
        placement = sharded.placement()
        assert all(len(set(shard)) == 2 for shard in placement)  # the replicas of a shard on different nodes
        fill = fill_mask(npm_dir, sharded)
        before = [fill(text, top_k=5) for text in queries(mask)]
        replace_node(cluster, worker_of(cluster, placement[0][0]))
        for _ in range(3):  # every replica turn: the lost one is never asked again
            assert [fill(text, top_k=5) for text in queries(mask)] == before
        assert before == [fill_mask(npm_dir, local)(text, top_k=5) for text in queries(mask)]


def test_an_unreachable_address_names_the_fix(cluster, npm_dir):
    started = time.monotonic()
    with pytest.raises(ShardServingError, match=r"No Ray cluster answers at 127\.0\.0\.1:9.*ray start --head"):
        RayShardedIndex(npm_dir / "index", num_shards=2, address="127.0.0.1:9")
    assert time.monotonic() - started < 30
    with pytest.raises(ShardServingError, match="not a Ray address"):
        RayShardedIndex(npm_dir / "index", num_shards=2, address="nowhere")


def test_a_shard_that_fails_to_load_names_the_fix(cluster, npm_dir, index_copy, tmp_path):
    with pytest.raises(ShardServingError, match=r"Shard 0 of 2 .*failed to load the index .*No NPM index at .*"
                                                r"actor_index_dir"):
        RayShardedIndex(npm_dir / "index", num_shards=2, actor_index_dir=tmp_path / "missing")
    (index_copy / "token_ids.npy").write_bytes(b"\x93NUMPY")  # truncated
    with pytest.raises(ShardServingError, match=r"failed to load the index .*(truncated|rebuild)"):
        RayShardedIndex(npm_dir / "index", num_shards=2, actor_index_dir=index_copy)
    assert not named_actors_left()  # what started was stopped


def test_shards_of_another_index_are_refused(cluster, npm_dir, index_copy):
    npm_hf.NPMIndex.load(index_copy).delete_documents(["texas"])  # another version of the same index
    with pytest.raises(ShardServingError, match=r"serves another index, or another version of it.*--stop"):
        RayShardedIndex(npm_dir / "index", num_shards=2, actor_index_dir=index_copy)
    assert not named_actors_left()


def test_serve_index_command_starts_named_shards_a_client_attaches_to(cluster, npm_dir, index_copy, capsys):
    address = cluster.address
    try:
        assert cli_main(["serve-index", "--index", str(index_copy), "--shards", "2", "--address", address]) == 0
        name = serving_name(index_copy)
        assert name in capsys.readouterr().out
        served = {a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["namespace"] == NAMESPACE}
        assert served == {f"{name}:shard-{s}-of-2:replica-0" for s in range(2)}
        local = npm_hf.NPMIndex.load(index_copy)
        vectors = query_vectors(local)
        with RayShardedIndex(index_copy, num_shards=2, address=address) as attached:
            np.testing.assert_array_equal(attached.search(vectors, 6)[1], canonical(*local.search(vectors, 6))[1])
        # close() leaves actors it attached to running
        assert len(ray.util.list_named_actors(all_namespaces=True)) == 2
        with pytest.raises(ShardServingError, match=r"cut into \[2\] shards, not num_shards=3"):
            RayShardedIndex(index_copy, num_shards=3, address=address)
        npm_hf.NPMIndex.load(index_copy).delete_documents(["texas"])  # the served shards are now of an old version
        with pytest.raises(ShardServingError, match="another version of it"):
            RayShardedIndex(index_copy, num_shards=2, address=address)
    finally:
        assert cli_main(["serve-index", "--index", str(index_copy), "--address", address, "--stop"]) == 0
    assert not named_actors_left()
    assert stop_index(index_copy, address=address) == 0
