"""Declared components: a config section naming a class by `_target_` with its keyword arguments.

A built-in (conf/<group>/<option>.yaml) and a user's own are declared the same way, so each extension lives in one
place: its config file and its class. The class checks its own arguments, raising `Invalid`; the builder turns
that into one line naming `<section>.<argument>`.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from flexp.config import ConfigError

NONE = "none"  # the option that turns a section off (conf/<group>/none.yaml)


class Invalid(ValueError):
    """A component's constructor refusing one of its arguments (the builder names it `<section>.<argument>`)."""

    def __init__(self, argument: str, value: Any, why: str) -> None:
        super().__init__(f"{argument}={value!r}: {why}")
        self.argument, self.value, self.why = argument, value, why


@dataclass(frozen=True)
class Component:
    """A validated `_target_` section: where it sits, the name it goes by, the callable and its arguments."""

    section: str
    name: str
    target: str
    kwargs: Mapping[str, Any] = field(default_factory=dict)


def parse_component(tree: Mapping[str, Any], section: str, supplied: tuple[str, ...] = (),
                    kind: type | None = None) -> Component | None:
    """The section's component, checked against its callable's signature (`supplied`: arguments flexp passes);
    None when the section is absent, null or `name: none`."""
    from flexp.config import ConfigError, check_arguments, target_name  # flexp.config holds Component sections

    node = tree.get(section)
    if isinstance(node, Mapping) and node.get("name") == NONE and "_target_" not in node:
        extra = sorted(str(k) for k in node if k != "name")
        if extra:
            raise ConfigError(f"{section}.{extra[0]}", None, f"is set but {section}=none is chosen (choose an option "
                                                             f"of conf/{section}/ first)")
        return None
    if node is None:
        return None
    if not isinstance(node, Mapping):
        raise ConfigError(section, node, f"must be a mapping with a _target_ (e.g. {section}=<option>)")
    target = node.get("_target_")
    if target == "???":
        raise ConfigError(f"{section}._target_", None, f"is missing: {section}=custom needs "
                                                       f"{section}._target_=module.Class")
    if not isinstance(target, str) or not target.strip():
        raise ConfigError(f"{section}._target_", target, "must name a class or a callable (module.Name)")
    kwargs = {k: v for k, v in node.items() if k not in ("_target_", "name")}
    for key, value in kwargs.items():
        if value == "???":
            raise ConfigError(f"{section}.{key}", None, "is missing")
    check_arguments(f"{section}._target_", target, kwargs, supplied, kind)
    name = node.get("name")
    return Component(section, name if isinstance(name, str) and name else target_name(target), target, kwargs)


def build(component: Component, **supplied: Any) -> Any:
    """Instantiate the component with its arguments, plus each `supplied` one its callable takes and the config
    does not set; an Invalid argument or any other failure becomes a one-line ConfigError."""
    from hydra.utils import instantiate

    from flexp.config import ConfigError
    from flexp.models import accepts, first_line, locate

    func = locate(component.target, f"{component.section}._target_")
    extra = {k: v for k, v in supplied.items() if k not in component.kwargs and accepts(func, k)}
    node = {"_target_": component.target, "_partial_": True, **component.kwargs}
    try:  # supplied objects go to the call, not through OmegaConf (which would turn a dataclass into a dict)
        return instantiate(node, _convert_="all")(**extra)
    except Exception as err:
        cause = root_cause(err)
        if isinstance(cause, Invalid):
            raise ConfigError(f"{component.section}.{cause.argument}", cause.value, cause.why) from None
        if isinstance(cause, ConfigError):
            raise cause from None
        raise ConfigError(f"{component.section}._target_", component.target,
                          f"failed to build ({first_line(err)})") from None


def root_cause(err: BaseException) -> BaseException:
    """The innermost cause (Hydra wraps a constructor's exception in its own)."""
    while err.__cause__ is not None:
        err = err.__cause__
    return err


def number(argument: str, value: Any, low: float | None = None, high: float | None = None,
           strict_low: bool = False) -> float:
    """`value` as a float, or Invalid: a finite number from `low` (above it when strict_low) to `high`."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise Invalid(argument, value, "must be a finite number")
    if low is not None and (value <= low if strict_low else value < low):
        raise Invalid(argument, value, f"must be {'>' if strict_low else '>='} {low}")
    if high is not None and value > high:
        raise Invalid(argument, value, f"must be <= {high}")
    return float(value)


def integer(argument: str, value: Any, low: int | None = None) -> int:
    """`value` as an int (a whole float too), or Invalid: an integer from `low`."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not float(value).is_integer():
        raise Invalid(argument, value, "must be an integer")
    if low is not None and value < low:
        raise Invalid(argument, value, f"must be >= {low}")
    return int(value)


@functools.cache
def builtin_options(group: str) -> dict[str, dict[str, Any]]:
    """flexp's own options of a group by name: each conf/<group>/<name>.yaml that declares a `_target_`, as read."""
    from omegaconf import OmegaConf

    from flexp.searchpath import CONF_DIR

    files = sorted((CONF_DIR / group).glob("*.yaml"))
    nodes = {path.stem: OmegaConf.to_container(OmegaConf.load(path)) for path in files}
    return {name: node for name, node in nodes.items() if isinstance(node, dict) and "_target_" in node}


def builtin(group: str, option: str, **kwargs: Any) -> Component:
    """The built-in `option` as its file declares it, `kwargs` replacing or adding keyword arguments."""
    node = {**builtin_options(group)[option], **kwargs}
    rest = {k: v for k, v in node.items() if k not in ("_target_", "name")}
    return Component(group, node.get("name", option), node["_target_"], rest)


def as_declared(node: Mapping[str, Any], section: str) -> Mapping[str, Any]:
    """`node` (a section whose group is `section`) named as its `_target_` is: a user's `_target_` set over a
    built-in's file goes by its class's name, and a built-in's name alone (a config written before built-ins
    carried their `_target_`) takes its file's. A built-in's name over another built-in's class is refused: the
    name does not choose the class."""
    from flexp.config import ConfigError, target_name

    known = {name: option["_target_"] for name, option in builtin_options(section).items()}
    name, target = node.get("name"), node.get("_target_")
    if not isinstance(name, str) or name not in known or target == known[name]:
        return node
    if target is None:
        return {**node, "_target_": known[name]}
    owner = next((option for option, its in known.items() if its == target), None)
    if owner is not None:
        raise ConfigError(f"{section}.name", name, f"names the built-in {known[name]}, but {section}._target_ is "
                                                   f"{target}: choose one with {section}={name} or {section}={owner}")
    return {**node, "name": target_name(target)}


def naming_takers(err: ConfigError, group: str) -> ConfigError:
    """`err`, if it refuses an unknown `<group>.<key>`, saying which built-in options take that key."""
    from flexp.config import ConfigError

    key = err.key.removeprefix(f"{group}.")
    takers = [name for name, node in builtin_options(group).items() if key in node and key != "name"]
    if err.value is not None or not takers or not str(err).startswith(f"{err.key}: unknown key"):
        return err
    return ConfigError(err.key, None, f"{str(err).partition(': ')[2]} ({group}={' or '.join(takers)} takes it)")
