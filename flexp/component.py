"""Declared components: a config section naming a class by `_target_` with its keyword arguments.

A built-in (conf/<group>/<option>.yaml) and a user's own are declared the same way, so each extension lives in one
place: its config file and its class. The class checks its own arguments, raising `Invalid`; the builder turns
that into one line naming `<section>.<argument>`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from flexp.config import ConfigError, check_arguments, target_name

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
