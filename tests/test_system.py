"""The simulated deployment: device profiles, traces, the round's clock, deadline and over-selection."""

import math

import numpy as np
import pytest
import torch

from flexp.client import LocalSpec
from flexp.compression.stage import SignUpdates
from flexp.config import ConfigError, DatasetConfig, FLConfig
from flexp.data import load_dataset
from flexp.engine.threads import ThreadEngine
from flexp.fedavg import Conditions, run_fedavg
from flexp.models import build_model
from flexp.partition import natural
from flexp.stage import Plan, with_stages
from flexp.strategy.fedavg import FedAvg
from flexp.system.clock import schedule
from flexp.system.devices import MBPS, System, drawn, read_trace

SYNTH = DatasetConfig(name="synthetic", users=3, alpha=0.5, beta=0.5, seed=3)
TRACE = "client,samples_per_second,up_mbps,down_mbps\n0,100,1,4\n1,200,2,8\n2,50,0.5,2\n"
DEVICES = [(100, 1, 4), (200, 2, 8), (50, 0.5, 2)]  # TRACE's rows: samples/s, up and down Mbps


def _plan(clients=3, per_round=3):
    return Plan(clients=clients, per_round=per_round, sampling="fixed", rounds=2, seed=1, local_epochs=2,
                batch_size=10)


def test_the_clock_keeps_the_first_m_on_time_and_ends_the_round_as_documented():
    times = {0: 3.0, 1: 1.0, 2: 2.0, 3: 5.0, 4: 2.0}
    cut = schedule(times, wanted=2, deadline=4.0, waiting=False)
    assert (cut.kept, cut.surplus, cut.late, cut.seconds) == ([1, 2], [4, 0], [3], 2.0)  # ties by client id
    assert schedule(times, 5, 4.0, False).seconds == 4.0  # a client is late: the server waited for the deadline
    assert schedule(times, 5, None, False) == schedule(times, 5, None, True)  # no deadline: the slowest ends it
    assert schedule(times, 5, None, False).seconds == 5.0
    assert schedule({1: 1.0}, 3, 9.0, waiting=True).seconds == 9.0  # a sampled client never reports
    assert schedule({}, 3, None, True).seconds == 0.0


def test_over_selection_samples_ceil_m_times_one_plus_o_at_most_k():
    assert System(_plan(10, 3), over_select=0.3).per_round(3) == 4
    assert System(_plan(10, 10), over_select=0.3).per_round(10) == 10
    assert System(_plan(100, 10), over_select=0.3).per_round(10) == 13  # 10 x 1.3 is 13.000000000000002


def test_drawn_devices_are_the_medians_without_spread_and_do_not_depend_on_k():
    flat = drawn(5, seed=1, samples_per_second=1000, up_mbps=10, down_mbps=50, spread=0.0)
    assert (flat.speed == 1000).all() and (flat.up == 10 * MBPS).all() and (flat.down == 50 * MBPS).all()
    few, many = (drawn(k, 1, 1000, 10, 50, 1.0) for k in (5, 10_000))
    assert np.array_equal(few.speed, many.speed[:5]) and np.array_equal(few.up, many.up[:5])
    # the sample median of a log-normal's log has sd ~ 1.2533 spread / sqrt(K) = 0.0125: 6 sd
    assert abs(math.log(np.median(many.speed) / 1000)) < 0.075
    assert np.quantile(many.speed, 0.05) < 1000 / 4  # heavy tailed: exp(-1.645) = 0.19 of the median


def test_a_trace_gives_client_k_device_k_mod_n(tmp_path):
    path = tmp_path / "trace.csv"
    path.write_text(TRACE)
    devices = read_trace(path, 5)
    assert devices.speed.tolist() == [100, 200, 50, 100, 200]
    assert devices.up.tolist() == [MBPS * u for u in (1, 2, 0.5, 1, 2)]


@pytest.mark.parametrize("text, where", [
    ("client,speed\n0,1\n", "line 1: the header must be"),
    ("client,samples_per_second,up_mbps,down_mbps\n0,100,1\n", "line 2: has 3 fields"),
    ("client,samples_per_second,up_mbps,down_mbps\n0,100,1,4\n1,fast,1,4\n", "line 3: '1,fast,1,4' is not"),
    ("client,samples_per_second,up_mbps,down_mbps\n0,100,0,4\n", "line 2: speeds and bandwidths must be positive"),
    ("client,samples_per_second,up_mbps,down_mbps\n0,100,1,4\n0,100,1,4\n", "line 3: client 0 is listed twice"),
    ("client,samples_per_second,up_mbps,down_mbps\n0,100,1,4\n2,100,1,4\n", "lists no device 1"),
    ("client,samples_per_second,up_mbps,down_mbps\n", "line 2: the trace lists no device"),
])
def test_a_malformed_trace_is_one_line_naming_the_key_and_line(tmp_path, text, where):
    path = tmp_path / "trace.csv"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        read_trace(path, 3)
    assert str(err.value).startswith("system.path=") and where in str(err.value)
    assert len(str(err.value).splitlines()) == 1


def _run(tmp_path, fraction=1.0, timed=True, **system):
    """Two rounds of FedAvg with sign compression on 3 synthetic clients whose devices are TRACE's."""
    data = load_dataset(SYNTH, log=lambda s: None)
    parts = natural(data.train_groups, 3)
    fl = FLConfig(clients=3, fraction=fraction, local_epochs=2, batch_size=10, lr=0.05, rounds=2, eval_every=2,
                  target_accuracy=None, stop_at_target=False)
    plan = _plan(per_round=fl.clients_per_round)
    path = tmp_path / "trace.csv"
    path.write_text(TRACE)
    make = lambda: build_model("logreg", data.input_shape, data.num_classes)  # noqa: E731
    torch.manual_seed(0)
    model = make()
    engine = ThreadEngine(make, data.train, LocalSpec(fl.local_epochs, fl.batch_size, fl.lr), workers=1)
    conditions = Conditions(system=System(plan, path=str(path), **system) if timed else None)
    try:
        result = run_fedavg(model, parts, data.test, fl, engine, plan.seed,
                            strategy=with_stages(FedAvg(), {"compression": SignUpdates(plan)}), conditions=conditions)
    finally:
        engine.close()
    params = sum(p.numel() for p in model.parameters())
    sizes = [len(p) for p in parts]
    times = [4 * params / (down * MBPS) + 2 * n / speed + (math.ceil(params / 8) + 4) / (up * MBPS)
             for n, (speed, up, down) in zip(sizes, DEVICES)]
    return result, params, sizes, times


def test_a_rounds_simulated_time_and_bytes_are_the_hand_computation(tmp_path):
    """Each client: 4P bytes down at its bandwidth, E n_k samples at its speed, its sign message (ceil(P/8) bits'
    bytes and a float32 scale) up; the round lasts until the slowest reports."""
    result, params, sizes, times = _run(tmp_path)
    first, last = result.history
    assert first.sim_seconds == pytest.approx(max(times), rel=1e-12)
    assert last.sim_hours == pytest.approx(2 * max(times) / 3600, rel=1e-12)
    assert (first.bytes_down, first.bytes_up) == (3 * 4 * params, 3 * (math.ceil(params / 8) + 4))
    assert (first.clients, first.late, first.surplus) == (3, 0, 0)
    summary = result.summary()
    assert summary["total_sim_hours"] == last.sim_hours
    assert summary["total_mb_up"] == 2 * first.bytes_up / 1e6 and summary["total_mb_down"] == 2 * first.bytes_down / 1e6


def test_a_deadline_leaves_out_the_late_client_and_the_round_lasts_until_the_deadline(tmp_path):
    times = _run(tmp_path)[3]
    order, ranked = np.argsort(times), sorted(times)
    deadline = (ranked[1] + ranked[2]) / 2
    result, params, sizes, _ = _run(tmp_path, deadline=deadline)
    record = result.history[0]
    assert (record.clients, record.late, record.sim_seconds) == (2, 1, deadline)
    assert record.samples == sum(sizes[c] for c in order[:2])  # the two that reported in time
    assert record.bytes_up == 2 * (math.ceil(params / 8) + 4) and record.bytes_down == 3 * 4 * params


def test_over_selection_keeps_the_first_m_to_report(tmp_path):
    result, params, sizes, times = _run(tmp_path, fraction=0.67, over_select=0.5)  # m = 2, 3 sampled
    record, order = result.history[0], np.argsort(times)
    assert (record.clients, record.surplus, record.late) == (2, 1, 0)
    assert record.sim_seconds == pytest.approx(sorted(times)[1], rel=1e-12)
    assert record.samples == sum(sizes[c] for c in order[:2])


def test_the_clock_leaves_the_weights_as_they_are_when_no_client_is_left_out(tmp_path):
    timed, untimed = _run(tmp_path)[0], _run(tmp_path, timed=False)[0]
    assert torch.equal(timed.params, untimed.params)
    assert untimed.history[0].sim_seconds is None and "sim_seconds" not in untimed.history[0].metrics()


def test_the_deadline_check_counts_the_upload_when_its_size_is_known():
    system = System(_plan(), samples_per_second=100, up_mbps=1, down_mbps=1, deadline=2.5)
    system.check_deadline(125_000, [100, 200, 300])  # 1 s down + 1 s training: in time
    with pytest.raises(ConfigError, match="system.deadline=2.5: no client can meet it: the fastest needs 3 s to "
                                          "download the model, train and upload its update"):
        system.check_deadline(125_000, [100, 200, 300], upload_bytes=125_000)


def test_a_round_in_which_every_client_is_late_says_so(tmp_path, caplog):
    times = _run(tmp_path)[3]
    result = _run(tmp_path, deadline=min(times) / 2)[0]
    assert result.history[0].late == 3 and result.history[0].clients == 0
    assert "round 1: every client reported after system.deadline=" in caplog.text
