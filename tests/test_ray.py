"""engine=ray: a pool of resident actors on a two-node local Ray cluster gives the weights of the engine its actors
run (threads, vectorized) exactly, replaces an actor that dies (its clients counted as failed) and honours
engine.device."""

import sys

import pytest
import torch
from conftest import SMALL, mlflow_client, run_cli

from flexp.algorithm import Algorithm
from flexp.client import LocalSpec
from flexp.config import ConfigError, DatasetConfig, FLConfig
from flexp.data import load_dataset
from flexp.engine.ray_pool import RayEngine, import_ray, pool_size, shares
from flexp.engine.threads import ThreadEngine
from flexp.engine.vectorized import VectorizedEngine
from flexp.fedavg import run_fedavg, sample_clients
from flexp.models import build_model
from flexp.partition import natural

FL = FLConfig(clients=8, fraction=0.5, local_epochs=2, batch_size=10, lr=0.05, rounds=3, eval_every=3,
              target_accuracy=None, stop_at_target=False)
SEED = 2


@pytest.fixture(scope="module")
def data():
    return load_dataset(DatasetConfig(name="synthetic", users=8, alpha=0.5, beta=0.5, seed=3))


@pytest.fixture(scope="module")
def cluster():
    """Two Ray nodes of one CPU each on this machine (loopback), shared by the module; engines join it."""
    from ray.cluster_utils import Cluster

    two = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    two.add_node(num_cpus=1)
    two.wait_for_nodes()
    yield two
    two.shutdown()


def _make(data):
    from functools import partial

    return partial(build_model, "2nn", data.input_shape, data.num_classes, 32)


def _run(data, engine, algorithm=None):
    torch.manual_seed(0)
    return run_fedavg(build_model("2nn", data.input_shape, data.num_classes, hidden=32),
                      natural(data.train_groups, 8), data.test, FL, engine, SEED, strategy=algorithm)


def _here(data, engine_class, algorithm=None):
    engine = engine_class(_make(data), data.train, LocalSpec(2, 10, 0.05), workers=2)
    try:
        return _run(data, engine, algorithm).params
    finally:
        engine.close()


def _pool(data, cluster, actor_engine="threads"):
    return RayEngine(_make(data), data.train, LocalSpec(2, 10, 0.05), cluster.address, num_cpus=1,
                     actor_engine=actor_engine)


def test_a_pool_on_two_nodes_equals_the_thread_engine_bit_for_bit(data, cluster):
    """A user algorithm with per-client state (its messages and replies) on one actor per node."""
    import user_algorithm

    import_ray().cloudpickle.register_pickle_by_value(user_algorithm)  # tests/ is not on the workers' path
    threads = _here(data, ThreadEngine, user_algorithm.LocalMomentum())
    engine = _pool(data, cluster)
    try:
        result = _run(data, engine, user_algorithm.LocalMomentum())
        assert len(engine.actors) == 2 and len(set(engine.last_nodes.values())) == 2
        (reply,) = engine.run_round(result.params, [_task(data, 0)])
        assert reply.error is None and reply.params.device == engine.device
    finally:
        engine.close()
    assert torch.equal(result.params, threads)


def test_a_pool_of_vectorized_actors_equals_the_vectorized_engine_bit_for_bit(data, cluster):
    """Each actor runs the batched 2NN kernel on its share: a client's steps do not depend on its group."""
    here = _here(data, VectorizedEngine)
    engine = _pool(data, cluster, "vectorized")
    try:
        assert str(engine.describe(Algorithm())) == "kernel (2 Ray actors of engine=vectorized; batched MLP kernel)"
        result = _run(data, engine)
        assert len(set(engine.last_nodes.values())) == 2
    finally:
        engine.close()
    assert torch.equal(result.params, here)


def _task(data, client):
    from flexp.client import ClientTask

    return ClientTask(client, natural(data.train_groups, 8)[client], seed=1)


def test_an_actor_that_dies_mid_round_is_replaced_and_its_clients_count_as_failed(data, cluster):
    import crashing_algorithm

    import_ray().cloudpickle.register_pickle_by_value(crashing_algorithm)
    chosen = sample_clients(8, 4, SEED, 1)
    engine = _pool(data, cluster)
    try:
        history = _run(data, engine, crashing_algorithm.ExitsInClient(chosen[0], 1)).history
        nodes = set(engine.last_nodes.values())
    finally:
        engine.close()
    lost = next(s for s in shares([_task(data, c) for c in chosen], 2, 2) if 0 in s)  # the dead actor's share
    assert [(r.clients, r.failed_clients) for r in history] == [(4 - len(lost), len(lost)), (4, 0), (4, 0)]
    assert len(nodes) == 2


def test_engine_ray_from_the_command_line_joins_the_cluster(store, cluster):
    proc = run_cli([*SMALL, "engine=ray", f"engine.address={cluster.address}"], store, timeout=300)
    assert proc.returncode == 0, proc.stderr
    client = mlflow_client(store)
    (run,) = client.search_runs([client.get_experiment_by_name("flexp").experiment_id])
    assert run.data.params["engine.name"] == "ray" and run.info.status == "FINISHED"
    assert "1 Ray actor of engine=vectorized, resolved from auto" in run.data.tags["flexp.engine_path"]  # an MLP


def test_what_the_cluster_cannot_hold_is_refused_in_one_line(data, cluster):
    """cuda without a GPU share, actors larger than the cluster (they would wait for ever), an address Ray cannot
    reach or use: one line each."""
    with pytest.raises(ConfigError, match="engine.num_gpus=0.0: engine=ray with engine.device=cuda needs a GPU"):
        RayEngine(_make(data), data.train, LocalSpec(2, 10, 0.05), "local", device="cuda")
    with pytest.raises(ConfigError, match="engine.num_cpus=3: the Ray cluster has 2 CPUs"):
        RayEngine(_make(data), data.train, LocalSpec(2, 10, 0.05), cluster.address, num_cpus=3)
    with pytest.raises(ConfigError, match="engine.actor_engine='ray': must be one of auto, threads, vectorized"):
        RayEngine(_make(data), data.train, LocalSpec(2, 10, 0.05), cluster.address, actor_engine="ray")
    with pytest.raises(ConfigError, match="engine.address='ray://nohost:10001': cannot start or join Ray: "):
        RayEngine(_make(data), data.train, LocalSpec(2, 10, 0.05), "ray://nohost:10001")


def test_the_pool_has_one_actor_per_share_of_the_cluster_and_no_more_than_clients():
    assert pool_size({"CPU": 16.0}, 1.0, 0.0, None) == 16
    assert pool_size({"CPU": 16.0}, 2.0, 0.0, 10) == 8
    assert pool_size({"CPU": 16.0}, 1.0, 0.0, 10) == 10
    assert pool_size({"CPU": 16.0, "GPU": 2.0}, 1.0, 0.25, None) == 8
    assert pool_size({"CPU": 16.0}, 4.0, 1.0, None) == 1  # no GPU: one actor, which waits (and the job with it)


def test_shares_balance_local_work_and_keep_task_order():
    from flexp.client import ClientTask

    tasks = [ClientTask(c, torch.arange(n), 0, epochs) for c, (n, epochs) in
             enumerate([(10, None), (40, None), (10, 3), (20, None), (5, None)])]
    # work 10, 40, 30, 20, 5, the largest first to the least loaded: 40 | 30, 20 | 10, 5 -> 55 | 50
    assert shares(tasks, 2, 1) == [[0, 1, 4], [2, 3]]
    assert shares(tasks, 3, 1) == [[1], [2, 4], [0, 3]]  # 40 | 30, 5 | 20, 10
    assert shares(tasks[:1], 2, 1) == [[0], []]


def test_missing_ray_is_a_one_line_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(ConfigError, match=r'pip install -e "\.\[ray\]"'):
        import_ray()
