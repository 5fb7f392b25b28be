"""strategy=fedbuff on the simulated clock: staleness on a hand-made timeline, the staleness weights, the exact
reduction to synchronous FedAvg, discarding, and the same weights whatever the worker count or engine."""

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from flexp.api import compose, run
from flexp.asynchronous import AsyncSettings, draw_clients, run_async
from flexp.client import ClientResult
from flexp.config import FLConfig
from flexp.data import Split
from flexp.fedavg import Conditions, sample_clients
from flexp.strategy.fedbuff import FedBuff, buffered_step, staleness_weight
from flexp.system.devices import Profiles

SMALL = ["dataset=synthetic", "dataset.users=20", "dataset.samples_per_user=60", "model=2nn", "model.hidden=16",
         "fl.clients=20", "fl.fraction=0.25", "fl.local_epochs=2", "fl.batch_size=10", "fl.lr=0.1", "fl.rounds=4",
         "system=uniform"]


def test_each_staleness_weight_is_the_hand_computed_one():
    assert [staleness_weight("constant", s, 0.5, 4) for s in (0, 3, 50)] == [1.0, 1.0, 1.0]
    assert [staleness_weight("polynomial", s, 0.5, 4) for s in (0, 3, 8)] == [1.0, 0.5, 1 / 3]
    assert [staleness_weight("polynomial", s, 1.0, 4) for s in (0, 1, 4)] == [1.0, 0.5, 0.2]
    assert [staleness_weight("hinge", s, 0.5, 2) for s in (0, 2, 4, 8)] == [1.0, 1.0, 0.5, 0.25]


def test_the_buffered_step_is_the_hand_computed_one():
    """w + lr sum n_k s_k (p_k - w) / sum n_k: (0,0) + 2 ((1 (2,0) + 3 0.5 (0,4)) / 4) = (1, 3)."""
    start = torch.zeros(2)
    new = buffered_step(start, [torch.tensor([2.0, 0.0]), torch.tensor([0.0, 4.0])], [1, 3], [1.0, 0.5], 2.0)
    assert torch.equal(new, torch.tensor([1.0, 3.0]))


def test_with_nobody_busy_the_draw_is_the_synchronous_sample():
    assert all(draw_clients(50, 7, set(), 3, d) == sample_clients(50, 7, 3, d) for d in range(1, 20))
    busy = {0, 5, 9}
    drawn = draw_clients(10, 7, busy, 3, 4)
    assert len(drawn) == 7 and not busy & set(drawn) and drawn == sorted(drawn)


class PlusOne:
    """An engine whose every client moves each weight by +1 from where it started (its n_k: its samples)."""

    name = "plus-one"

    def __init__(self):
        self.calls = []

    def run_round(self, global_params, tasks, algorithm=None, **state):
        self.calls.append([t.client for t in tasks])
        return [ClientResult(t.client, global_params + 1, len(t.indices), 0.0) for t in tasks]


ROUNDING = 21 * 2**-22  # 5 steps of 4 float32 roundings (p, p - start, w + that, the step's cast) of values < 8,
# and the final difference: 21 half-ulps of 8


def _timeline(strategy, max_staleness=None, steps=5):
    """Four clients of 4 samples each at 1, 2, 4 and 8 samples/s (instant transfers: 4, 2, 1, 0.5 s a run), all
    training at once (concurrency 4)."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(2, 1))
    start = torch.nn.utils.parameters_to_vector(model.parameters()).detach().clone()
    inf = np.full(4, np.inf)
    system = SimpleNamespace(profiles=Profiles(np.array([1.0, 2.0, 4.0, 8.0]), inf, inf))
    fl = FLConfig(clients=4, fraction=1.0, local_epochs=1, batch_size=2, lr=0.1, rounds=steps, eval_every=100,
                  target_accuracy=None, stop_at_target=False)
    test = Split(torch.zeros(2, 1, 2), torch.zeros(2, dtype=torch.int64))
    engine = PlusOne()
    result = run_async(model, list(torch.arange(16).reshape(4, 4)), test, fl, engine, 0,
                       AsyncSettings(4, max_staleness), strategy=strategy, conditions=Conditions(system=system))
    return result, result.params - start, engine


def test_staleness_on_a_hand_made_timeline():
    """Client k reports every 4/2^k s. Buffer of one: 0.5 s client 3 (from step 0) -> step 1, client 3 restarts
    from step 1; 1.0 s client 2 (from 0: s=1) -> step 2, then client 3 (from 1: s=1) -> step 3, clients 2 and 3
    restart from step 3; 1.5 s client 3 (s=0) -> step 4, restarts; 2.0 s client 1 (from 0: s=4) -> step 5."""
    result, moved, engine = _timeline(FedBuff(buffer_size=1, staleness="polynomial", a=0.5))
    history = result.history
    assert [r.extra["staleness_mean"] for r in history] == [0, 1, 1, 0, 4]
    assert [round(r.sim_hours * 3600, 9) for r in history] == [0.5, 1.0, 1.0, 1.5, 2.0]
    assert [round(r.sim_seconds, 9) for r in history] == [0.5, 0.5, 0.0, 0.5, 0.5]
    assert engine.calls == [[0, 1, 2, 3], [3], [2, 3]]  # clients that start together train together, when first
    # needed: client 3's run from step 4 would report after step 5, the last, and never trains
    expected = 1 + 2 / math.sqrt(2) + 1 + 1 / math.sqrt(5)  # each step adds its update's weight (1+s)^-1/2
    assert torch.allclose(moved, torch.full_like(moved, expected), rtol=0, atol=ROUNDING)
    assert result.texts["staleness.csv"] == "staleness,aggregated,discarded\n0,2,0\n1,2,0\n4,1,0\n"


def test_updates_older_than_max_staleness_are_discarded_and_counted():
    """max_staleness 0: at 1.0 s client 2 (s=1) is discarded, at 2.0 s clients 1 (s=3) and 2 (s=1)."""
    result, moved, _ = _timeline(FedBuff(buffer_size=1, staleness="constant"), max_staleness=0, steps=4)
    assert [r.extra["discarded"] for r in result.history] == [0, 1, 0, 2]
    assert [r.extra["staleness_max"] for r in result.history] == [0, 0, 0, 0]
    assert torch.allclose(moved, torch.full_like(moved, 4.0), rtol=0, atol=ROUNDING)
    assert result.texts["staleness.csv"] == "staleness,aggregated,discarded\n0,4,0\n1,0,2\n3,0,1\n"


@pytest.mark.parametrize("data", [[], ["data.arrival=linear", "data.arrival_full_at=3"]], ids=["all", "arriving"])
def test_buffer_equal_to_concurrency_on_equal_devices_is_synchronous_fedavg_bit_for_bit(data):
    """20 clients of 60 samples on one device: m=5 train at once and all report together, every round (with new
    data arriving, each holds the same share of it in step t as in round t)."""
    sync = run(compose([*SMALL, *data]))
    fedbuff = run(compose([*SMALL, *data, "strategy=fedbuff", "strategy.buffer_size=5",
                           "strategy.staleness=polynomial"]))
    assert torch.equal(fedbuff.params, sync.params)
    assert [r.bytes_up for r in fedbuff.history] == [r.bytes_up for r in sync.history]
    assert [r.bytes_down for r in fedbuff.history] == [r.bytes_down for r in sync.history]
    assert [r.extra["staleness_max"] for r in fedbuff.history] == [0.0] * 4


HEAVY = [*SMALL, "strategy=fedbuff", "strategy.buffer_size=3", "async.concurrency=6", "system=heavy_tailed",
         "fl.rounds=6"]


def test_the_weights_do_not_depend_on_the_worker_count_and_the_clock_not_on_the_engine():
    """Heavy-tailed devices: clients report one by one and start from different server steps."""
    one = run(compose([*HEAVY, "engine=threads", "engine.workers=1"]))
    two = run(compose([*HEAVY, "engine=threads", "engine.workers=2"]))
    vectorized = run(compose([*HEAVY, "engine=vectorized"]))
    assert torch.equal(one.params, two.params)
    assert max(r.extra["staleness_max"] for r in one.history) >= 2
    clock = [[(r.sim_hours, r.extra["staleness_mean"], r.bytes_up) for r in x.history] for x in (one, vectorized)]
    assert clock[0] == clock[1]  # the schedule depends on sizes, never on how kernels round


def test_sigkill_mid_buffer_then_resume_is_bit_identical(tmp_path):
    """Killed while the clients of the next server step train: the checkpoint holds the clock, the clients in
    flight (their replies) and the weights they started from; the resumed run ends where an uninterrupted one
    (here, in-process) does."""
    from conftest import mlflow_client, run_cli
    from test_resume import _checkpoint_dirs, _run_and_kill, _wait_for_status

    from flexp import checkpoint

    args = [*HEAVY, "fl.rounds=10", "tracking.log_model=false"]
    _run_and_kill(tmp_path, args, at_round=4)
    (killed_dir,) = _checkpoint_dirs(tmp_path)
    saved = checkpoint.load(killed_dir)
    assert 4 <= saved.state.round < 10 and saved.state.loop["flying"]
    client = mlflow_client(tmp_path)
    _wait_for_status(client, saved.run_id, "KILLED")
    proc = run_cli([f"resume={killed_dir}"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    resumed = checkpoint.load(killed_dir).state
    clean = run(compose(args))
    assert torch.equal(resumed.params, clean.params)
    assert [(r.sim_hours, r.extra) for r in resumed.history] == [(r.sim_hours, r.extra) for r in clean.history]
    staleness = client.download_artifacts(saved.run_id, "staleness.csv", str(tmp_path))
    assert open(staleness).read() == clean.texts["staleness.csv"]


def test_a_codec_encodes_each_asynchronous_update():
    """compression=quantize at 8 bits: each step's uploads are about a quarter of the float32 ones."""
    plain = run(compose(HEAVY))
    quantized = run(compose([*HEAVY, "compression=quantize", "compression.bits=8"]))
    ratios = [p.bytes_up / q.bytes_up for p, q in zip(plain.history, quantized.history)]
    assert all(3.9 < r < 4.0 for r in ratios), ratios  # 1 byte for 4, plus a scale and offset per 1,024 values
    assert [r.sim_hours for r in quantized.history] != [r.sim_hours for r in plain.history]  # uploads are faster


def test_the_run_name_says_the_buffer_the_concurrency_and_the_staleness_limit():
    from flexp.api import experiment
    from flexp.job import run_name

    assert " fedbuff buf3 of 6 ms3 heavy_tailed " in run_name(experiment(compose([*HEAVY, "async.max_staleness=3"])))
    assert " fedbuff buf5 of 5 uniform " in run_name(experiment(compose([*SMALL, "strategy=fedbuff",
                                                                          "strategy.buffer_size=5"])))
