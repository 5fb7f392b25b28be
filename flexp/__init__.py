"""flexp: federated-learning experiments from Hydra configs. Python API (imported on first use, so `import flexp`
and `python -m flexp` stay quick): `flexp.compose(overrides) -> config`, `flexp.run(cfg) -> flexp.Result`."""

from __future__ import annotations

from typing import Any

__all__ = ["Result", "compose", "run"]


def __getattr__(name: str) -> Any:
    """compose, run and Result from flexp.api, imported on first use."""
    if name in ("compose", "run", "Result"):
        from flexp import api

        return getattr(api, name)
    raise AttributeError(f"module 'flexp' has no attribute {name!r}")
