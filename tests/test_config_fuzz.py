"""Hostile config: any value for any numeric key either validates or is refused naming that key, never a crash."""

import copy
from dataclasses import fields

import pytest
from conftest import SMALL, run_cli
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from omegaconf import OmegaConf

from flexp.component import builtin_options
from flexp.config import SECTIONS, ConfigError, parse_config

# (key, the built-in strategy whose argument it is: None for a section's own field)
NUMERIC_KEYS = [*sorted((f"{section}.{f.name}", None) for section, cls in SECTIONS.items() for f in fields(cls)
                        if any(t in str(f.type) for t in ("int", "float")) and section != "tracking"),
                *sorted((f"strategy.{key}", option) for option, node in builtin_options("strategy").items()
                        for key, value in node.items() if type(value) in (int, float))]
VALUES = st.one_of(st.integers(min_value=-10**12, max_value=10**12), st.floats(allow_nan=True, allow_infinity=True),
                   st.booleans(), st.none(), st.text(max_size=8), st.lists(st.integers(), max_size=2))


@pytest.fixture(scope="module")
def base_tree():
    from hydra import compose, initialize_config_dir

    from flexp.__main__ import CONF_DIR

    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        tree = OmegaConf.to_container(compose("config", SMALL), resolve=True)
    tree.pop("hydra", None)
    return tree


def test_the_numeric_keys_cover_every_section():
    assert {"fl.lr", "fl.fraction", "strategy.mu", "attack.fraction", "data.arrival_start", "checkpoint.every",
            "clients.dropout", "engine.workers", "strategy.trim", "strategy.keep"} <= {k for k, _ in NUMERIC_KEYS}
    assert {option for _, option in NUMERIC_KEYS} >= {"fedprox", "scaffold", "fedadam", "fedavgm", "multikrum"}


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(key_option=st.sampled_from(NUMERIC_KEYS), value=VALUES)
def test_any_value_validates_or_names_its_key(base_tree, key_option, value):
    key, option = key_option
    tree = copy.deepcopy(base_tree)
    if option is not None:
        tree["strategy"] = dict(builtin_options("strategy")[option])
    section, name = key.split(".")
    tree.setdefault(section, {})[name] = value
    try:
        parse_config(tree)
    except ConfigError as err:
        assert str(err).startswith(key), (key, value, str(err))


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(key=st.sampled_from(["fl.lr", "fl.fraction", "fl.rounds", "strategy.mu", "clients.dropout", "attack.scale"]),
       value=st.sampled_from(["-1", "nan", "inf", "'1e999'", "abc", "[1,2]"]))
def test_the_cli_refuses_bad_numbers_in_one_line(tmp_path_factory, key, value):
    fedprox = ["strategy=fedprox"] if key == "strategy.mu" else []
    proc = run_cli([*SMALL, *fedprox, f"{key}={value}"], tmp_path_factory.mktemp("fuzz"))
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and key in lines[0], (key, value, proc.stderr)
