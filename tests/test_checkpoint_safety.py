"""Checkpoints are tensors and plain data: a stateful strategy resumes from one bit for bit, and a file that is not
a flexp checkpoint (a pickle with a payload, random bytes, another program's torch file) is refused in one line
without anything in it running."""

import logging
import pickle
from dataclasses import replace

import pytest
import torch
from conftest import SMALL, run_cli
from omegaconf import OmegaConf
from user_algorithm import LocalMomentum

from flexp import checkpoint
from flexp.config import parse_config
from flexp.job import checkpointer, prepare, train
from flexp.strategy import make_strategy


def small_config(*overrides: str):
    from hydra import compose, initialize_config_dir

    from flexp.__main__ import CONF_DIR

    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        tree = OmegaConf.to_container(compose("config", [*SMALL, "fl.rounds=4", *overrides]), resolve=True)
    tree.pop("hydra", None)
    return parse_config(tree)


class Payload:
    """Unpickling this opens (creates) `marker`: the proof that a loader ran code from the file."""

    def __init__(self, marker) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def _run(cfg, resume=None, on_state=lambda s: None):
    return train(cfg, prepare(cfg), lambda r: None, resume, on_state)


@pytest.mark.parametrize("strategy", ["fedavgm", "fedadam", "scaffold"])
def test_a_stateful_strategy_resumes_from_a_checkpoint_bit_for_bit(tmp_path, strategy):
    cfg = small_config(f"strategy={strategy}")

    def save_round_2(state):
        if state.round == 2:
            checkpoint.save(tmp_path, checkpoint.Checkpoint(state, "run", cfg.raw, checkpoint.rng_states()))

    whole = _run(cfg, on_state=save_round_2)
    saved = checkpoint.load(tmp_path)
    assert saved.state.round == 2 and saved.state.strategy.state_dict()
    resumed = _run(cfg, resume=saved.state)
    assert torch.equal(resumed.params, whole.params)
    assert [r.round for r in resumed.history] == [1, 2, 3, 4]
    assert resumed.history[:2] == whole.history[:2]

    fresh = make_strategy(cfg.strategy, cfg.fl.clients, cfg.fl.lr)
    forgetful = _run(cfg, resume=replace(checkpoint.load(tmp_path).state, strategy=fresh))
    assert not torch.equal(forgetful.params, whole.params), "the strategy's state made no difference to the test"


def test_a_checkpoint_is_replaced_atomically(tmp_path):
    from flexp.fedavg import ServerState
    from flexp.strategy.fedavg import FedAvg

    raw = small_config().raw
    checkpoint.save(tmp_path, checkpoint.Checkpoint(ServerState(1, torch.ones(3), FedAvg(), []), "abc", raw))
    checkpoint.save(tmp_path, checkpoint.Checkpoint(ServerState(2, torch.zeros(3), FedAvg(), []), "abc", raw))
    assert [p.name for p in tmp_path.iterdir()] == [checkpoint.FILE]
    assert checkpoint.load(tmp_path).state.round == 2


def _write(directory, kind, marker):
    path = directory / checkpoint.FILE
    if kind == "pickle":
        path.write_bytes(pickle.dumps({"format": checkpoint.FORMAT, "x": Payload(marker)}, protocol=2))
    elif kind == "torch pickle":
        torch.save({"format": checkpoint.FORMAT, "x": Payload(marker)}, path)
    elif kind == "random bytes":
        path.write_bytes(torch.randint(0, 256, (512,), generator=torch.Generator().manual_seed(0),
                                       dtype=torch.uint8).numpy().tobytes())
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "other torch file":
        torch.save({"weight": torch.ones(3)}, path)
    return path


@pytest.mark.parametrize("kind", ["pickle", "torch pickle", "random bytes", "empty", "other torch file"])
def test_a_file_that_is_not_a_checkpoint_is_refused_without_running_it(tmp_path, kind):
    marker = tmp_path / "marker"
    path = _write(tmp_path, kind, marker)
    with pytest.raises(checkpoint.CheckpointError) as info:
        checkpoint.load(tmp_path)
    assert len(str(info.value).splitlines()) == 1
    assert not marker.exists()
    if kind == "pickle":
        pickle.loads(path.read_bytes())
    elif kind == "torch pickle":
        torch.load(path, weights_only=False)
    assert marker.exists() == ("pickle" in kind), "the payload would not have run anyway"


def _real_payload(tmp_path):
    cfg = small_config("strategy=scaffold", "fl.rounds=1")
    _run(cfg, on_state=lambda s: checkpoint.save(tmp_path, checkpoint.Checkpoint(s, "r", cfg.raw,
                                                                               checkpoint.rng_states())))
    return torch.load(tmp_path / checkpoint.FILE, weights_only=True)


@pytest.mark.parametrize("change, why", [
    ({"version": 1}, "format version 1"),
    ({"params": [1.0, 2.0]}, "['params']"),
    ({"history": [{"round": 1}]}, "RoundRecord"),
    ({"strategy": {"c_i": {"zero": torch.zeros(3)}}}, "client ids"),
    ({"strategy": {"c": [0.0]}}, "not tensors"),
    ({"config": {"mode": "federated"}}, "ConfigError"),
    ({"rng": {"numpy": torch.zeros(3)}}, "unknown entries"),
])
def test_a_checkpoint_with_a_wrong_entry_is_refused_in_one_line(tmp_path, change, why):
    payload = _real_payload(tmp_path) | change
    torch.save(payload, tmp_path / checkpoint.FILE)
    with pytest.raises(checkpoint.CheckpointError, match=why.replace("[", r"\[").replace("]", r"\]")) as info:
        checkpoint.load(tmp_path)
    assert len(str(info.value).splitlines()) == 1


def test_a_checkpoint_holds_only_tensors_and_plain_data(tmp_path):
    payload = _real_payload(tmp_path)
    assert checkpoint.is_plain(payload) and payload["version"] == checkpoint.VERSION
    assert set(payload["strategy"]) == {"c", "c_i"} and set(payload["strategy"]["c_i"]) == {checkpoint.STORE_KEY}
    for name in payload["strategy"]["c_i"][checkpoint.STORE_KEY]:  # the clients' c_i, beside it, weights-only too
        entries = torch.load(tmp_path / name, weights_only=True)
        assert entries and all(type(k) is int and isinstance(v, torch.Tensor) for k, v in entries.items())
    assert not checkpoint.is_plain({"x": Payload(tmp_path / "m")}) and not checkpoint.is_plain({"x": 1j})


def test_resume_of_a_tampered_checkpoint_is_one_line_and_runs_nothing(tmp_path):
    marker, folder = tmp_path / "marker", tmp_path / "colleague"
    folder.mkdir()
    _write(folder, "pickle", marker)
    proc = run_cli([f"resume={folder}"], tmp_path)
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "resume=" in lines[0] and "nothing in it ran" in lines[0], proc.stderr
    assert not marker.exists()


class Forgetful(LocalMomentum):
    """LocalMomentum whose state_dict keeps its round counter but not its clients' velocities."""

    def state_dict(self):
        return {"rounds": self.rounds}

    def load_state_dict(self, state):
        self.rounds = state["rounds"]


def _unsaved_state_warnings(tmp_path, caplog, overrides, algorithm=None):
    """The warnings of a run of SMALL + `overrides` (with `algorithm` in place of the configured one) that writes a
    checkpoint every round, as the job does."""
    cfg = small_config("fl.rounds=3", *overrides)
    ready = prepare(cfg)
    ready = replace(ready, algorithm=algorithm) if algorithm is not None else ready
    caplog.set_level(logging.WARNING, logger="flexp")
    train(cfg, ready, lambda r: None, None, checkpointer(cfg, tmp_path, "run", ready.algorithm))
    assert (tmp_path / checkpoint.FILE).is_file()
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


def test_state_that_state_dict_leaves_out_is_a_warning_once_at_the_first_checkpoint(tmp_path, caplog):
    (warning,) = _unsaved_state_warnings(tmp_path, caplog, ["engine=threads"], Forgetful())
    assert warning.startswith("Forgetful keeps tensors in velocity that its state_dict() does not return")
    assert "resume" in warning and "rounds" not in warning.split("return")[0]


@pytest.mark.parametrize("overrides", [["strategy=fedavg"], ["strategy=fedprox", "strategy.mu=0.1"],
                                       ["strategy=fedavgm"], ["strategy=fedadam"], ["strategy=scaffold"],
                                       ["strategy=scaffold", "attack.name=label_flip", "attack.fraction=0.3"]])
def test_built_in_strategies_checkpoint_without_a_warning(tmp_path, caplog, overrides):
    assert _unsaved_state_warnings(tmp_path, caplog, overrides) == []


def test_a_wrapped_algorithms_unsaved_state_is_named_through_its_attacker(tmp_path, caplog):
    from flexp.strategy.sign_flip import SignFlip

    attacked = SignFlip(Forgetful(), frozenset({1}), 1.0)
    (warning,) = _unsaved_state_warnings(tmp_path, caplog, ["engine=threads"], attacked)
    assert warning.startswith("SignFlip (around Forgetful) keeps tensors in inner.velocity that")
