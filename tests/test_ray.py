"""engine=ray: clients as Ray tasks on a local Ray instance give the thread engine's weights exactly."""

import sys

import pytest
import torch
from conftest import SMALL, mlflow_client, run_cli

from flexp.client import LocalSpec
from flexp.config import ConfigError, DatasetConfig, FLConfig
from flexp.data import load_dataset
from flexp.engine.ray_tasks import RayEngine, import_ray
from flexp.engine.threads import ThreadEngine
from flexp.fedavg import run_fedavg
from flexp.models import build_model
from flexp.partition import natural


def _run(engine_factory, algorithm=None):
    data = load_dataset(DatasetConfig(name="synthetic", users=8, alpha=0.5, beta=0.5, seed=3))
    fl = FLConfig(clients=8, fraction=0.5, local_epochs=2, batch_size=10, lr=0.05, rounds=3, eval_every=3,
                  target_accuracy=None, stop_at_target=False)
    torch.manual_seed(0)
    model = build_model("2nn", data.input_shape, data.num_classes, hidden=32)
    engine = engine_factory(data, LocalSpec(fl.local_epochs, fl.batch_size, fl.lr))
    try:
        return run_fedavg(model, natural(data.train_groups, 8), data.test, fl, engine, 2, strategy=algorithm).params
    finally:
        engine.close()


def _make(data):
    from functools import partial

    return partial(build_model, "2nn", data.input_shape, data.num_classes, 32)


@pytest.fixture(scope="module")
def local_ray():
    """One local Ray instance for the module (RayEngine leaves an instance it did not start running)."""
    ray = import_ray()
    ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()


def test_ray_tasks_equal_the_thread_engine_bit_for_bit(local_ray):
    threads = _run(lambda data, spec: ThreadEngine(_make(data), data.train, spec, workers=2))
    ray = _run(lambda data, spec: RayEngine(_make(data), data.train, spec, "local", num_cpus=1))
    assert torch.equal(ray, threads)


def test_a_user_algorithm_with_per_client_state_on_ray_equals_threads_bit_for_bit(local_ray):
    import user_algorithm

    import_ray().cloudpickle.register_pickle_by_value(user_algorithm)  # tests/ is not on the workers' path
    threads = _run(lambda data, spec: ThreadEngine(_make(data), data.train, spec, workers=2),
                   user_algorithm.LocalMomentum())
    ray = _run(lambda data, spec: RayEngine(_make(data), data.train, spec, "local", num_cpus=1),
               user_algorithm.LocalMomentum())
    assert torch.equal(ray, threads)


def test_engine_ray_from_the_command_line(store):
    proc = run_cli([*SMALL, "engine=ray"], store, timeout=300)
    assert proc.returncode == 0, proc.stderr
    client = mlflow_client(store)
    (run,) = client.search_runs([client.get_experiment_by_name("flexp").experiment_id])
    assert run.data.params["engine.name"] == "ray" and run.info.status == "FINISHED"


def test_missing_ray_is_a_one_line_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(ConfigError, match=r'pip install -e "\.\[ray\]"'):
        import_ray()
