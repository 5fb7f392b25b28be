"""Per-client state off RAM: a store that spills past its budget, reads back exactly, and checkpoints only what
changed."""

import torch
from conftest import SMALL

from flexp import checkpoint
from flexp.client_state import ClientStore


def _tensor(seed, n=1000, dtype=torch.float32):
    return torch.randn(n, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def test_a_store_over_its_budget_spills_the_least_recently_used_and_reads_them_back_exactly(tmp_path):
    store = ClientStore(budget_bytes=2 * 4000, directory=tmp_path)
    values = {c: _tensor(c, dtype=torch.float64 if c == 3 else torch.float32) for c in range(5)}
    for client, value in values.items():
        store[client] = value.clone()
    assert store.held <= 2 * 8000 and len(store.spilled) >= 3 and len(store) == 5
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(f"{c}.bin" for c in store.spilled)
    store[0]  # noqa: B018 - reading client 0 makes it the most recently used
    assert 0 in store.memory
    for client, value in values.items():
        assert torch.equal(store[client], value) and store[client].dtype == value.dtype
    del store[1]
    assert 1 not in store and len(store) == 4 and not (tmp_path / "1.bin").exists()
    assert store.nbytes() == 3 * 4000 + 8000


def test_changes_are_the_clients_set_or_deleted_since_the_last_take():
    store = ClientStore()
    store[4], store[7] = _tensor(4), _tensor(7)
    assert sorted(store.take_changes()) == [4, 7] and store.take_changes() == {}
    store[7] = _tensor(8)
    del store[4]
    changes = store.take_changes()
    assert changes[4] is None and torch.equal(changes[7], _tensor(8))


def _scaffold(tmp_path, name, *extra):
    """A short SCAFFOLD run with its checkpoints; (its final weights, its output dir, its algorithm)."""
    from test_api import Recorder

    from flexp.api import compose, experiment
    from flexp.job import execute, prepare

    cfg = experiment(compose([*SMALL, "model=2nn", "model.hidden=8", "strategy=scaffold", "fl.fraction=0.3",
                              "fl.rounds=4", *extra]))
    out, ready = tmp_path / name, prepare(cfg)
    return execute(cfg, Recorder(), {}, "", output_dir=out, ready=ready).params, out, ready.algorithm


def test_spilled_state_trains_bit_identically_and_checkpoints_only_what_changed(tmp_path):
    in_ram, _, _ = _scaffold(tmp_path, "ram")
    spilled, out, scaffold = _scaffold(tmp_path, "spill", "checkpoint.client_state_mb=0.001")
    assert torch.equal(in_ram, spilled)
    assert scaffold.c_i.spilled  # it did spill, into files removed when the run ended
    assert not list((out / checkpoint.STATE_DIR / "spill").rglob("*.bin"))
    saved = checkpoint.load(out)
    c_i = saved.state.strategy.state_dict()["c_i"]
    assert isinstance(c_i, ClientStore) and len(c_i) >= 3  # every client that took part, nothing else
    files = sorted(p.name for p in (out / checkpoint.STATE_DIR / "c_i").iterdir())
    assert files[0].startswith("base-r") and all(f.startswith("delta-r") for f in files[1:])
    per_client = next(iter(c_i.values())).numel() * 4
    for name in files[1:]:  # a delta holds the round's 3 clients, not every client so far
        entries = torch.load(out / checkpoint.STATE_DIR / "c_i" / name, weights_only=True)
        assert len(entries) == 3 and sum(t.numel() * 4 for t in entries.values()) == 3 * per_client


def test_lazily_created_state_equals_eagerly_created_state():
    from test_api import _execute

    from flexp.strategy.scaffold import Scaffold

    eager = Scaffold(10, 0.1)
    for client in range(10):
        eager.c_i[client] = torch.zeros(610)  # the logreg's weights: every client's c_i made up front, at zero
    lazy = Scaffold(10, 0.1)
    _execute(["strategy=scaffold"], algorithm=lazy)
    _execute(["strategy=scaffold"], algorithm=eager)
    assert lazy.c is not None and torch.equal(lazy.c, eager.c)  # c moves with every reply's c_i
    assert 0 < len(lazy.c_i) < 10 and all(torch.equal(lazy.c_i[k], eager.c_i[k]) for k in lazy.c_i)


def test_a_checkpoint_whose_client_state_file_is_gone_is_refused_in_one_line(tmp_path):
    import pytest

    _, out, _ = _scaffold(tmp_path, "run")
    next((out / checkpoint.STATE_DIR / "c_i").glob("base-*.pt")).unlink()
    with pytest.raises(checkpoint.CheckpointError, match="client state file client_state/c_i/base-r1.pt cannot be"):
        checkpoint.load(out)


def test_a_checkpoint_loads_on_the_cpu_and_a_resume_moves_all_of_it_to_the_runs_device(tmp_path):
    """Whatever device wrote it, a checkpoint reads onto the CPU; a resumed run on another device gets the weights,
    the algorithm's tensors and every client's stored state there (the meta device stands in for a GPU here)."""
    from flexp.job import on_device

    _, out, _ = _scaffold(tmp_path, "run", "checkpoint.client_state_mb=0.001")
    saved = checkpoint.load(out).state
    state = saved.strategy.state_dict()
    assert saved.params.device.type == "cpu" and state["c"].device.type == "cpu"
    moved = on_device(saved, torch.device("meta"))
    state = moved.strategy.state_dict()
    assert moved.params.device.type == "meta" and state["c"].device.type == "meta"
    assert len(state["c_i"]) >= 3 and all(state["c_i"][k].device.type == "meta" for k in state["c_i"])


def test_deltas_replay_to_the_store_and_are_rewritten_whole_once_they_outgrow_it(tmp_path):
    store = ClientStore()
    store[0], store[1] = _tensor(0), _tensor(1)
    names = []
    for round_ in range(1, 12):
        store[round_ % 2] = _tensor(100 + round_)  # one client of two changes a round
        if round_ == 6:
            del store[1]
            store[2] = _tensor(2)
        saved = checkpoint.written_stores({"c_i": store}, tmp_path, round_)
        checkpoint.prune_store_files(tmp_path, saved)
        names.append([name.rsplit("/", 1)[1] for name in saved["c_i"][checkpoint.STORE_KEY]])
        replayed = checkpoint.read_stores(saved, tmp_path)["c_i"]
        assert replayed.keys() == store.keys() and all(torch.equal(replayed[c], store[c]) for c in store)
    assert names[0] == ["base-r1.pt"] and names[1] == ["base-r1.pt", "delta-r2.pt"]
    rewritten = [n[0] for n in names if len(n) == 1]
    assert len(rewritten) >= 2 and all(len(n) <= 2 + checkpoint.COMPACT * 2 for n in names)
    on_disk = {p.name for p in (tmp_path / checkpoint.STATE_DIR / "c_i").iterdir()}
    assert on_disk == set(names[-1])  # what no checkpoint names any more is gone


def test_an_algorithm_sent_to_workers_leaves_its_client_stores_behind():
    import pickle

    from flexp.client_state import client_side_only
    from flexp.strategy.scaffold import Scaffold

    scaffold = Scaffold(10, 0.1)
    scaffold.c_i[3] = _tensor(3)
    with client_side_only():
        shipped = pickle.loads(pickle.dumps(scaffold))
    assert len(shipped.c_i) == 0 and shipped.lr == scaffold.lr
    kept = pickle.loads(pickle.dumps(scaffold))  # a copy otherwise keeps every entry
    assert torch.equal(kept.c_i[3], scaffold.c_i[3])
