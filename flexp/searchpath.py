"""Where flexp's configs live, and every config dir a command line puts on Hydra's search path."""

from __future__ import annotations

from pathlib import Path

PACKAGE = Path(__file__).resolve().parent


def shipped(name: str) -> Path:
    """flexp/<name> in an installed wheel; the repository's top-level <name>/ in a source checkout."""
    inside = PACKAGE / name
    return inside if inside.is_dir() else PACKAGE.parent / name


CONF_DIR = shipped("conf")
SWEEPS_DIR = shipped("sweeps")
SEARCHPATH = "hydra.searchpath="
CONFIG_DIR_FLAGS = ("--config-dir", "-cd")


def flag_value(argv: list[str], flags: tuple[str, ...]) -> str | None:
    """The value of `FLAG VALUE` or `FLAG=VALUE` for any of flags, as Hydra's argparse reads it."""
    for i, arg in enumerate(argv):
        name, sep, value = arg.partition("=")
        if name in flags:
            return value if sep else (argv[i + 1] if i + 1 < len(argv) else None)
    return None


def user_searchpath(argv: list[str]) -> list[str] | None:
    """The entries of the user's `hydra.searchpath=[...]`; None if there is none or Hydra cannot parse it."""
    arg = next((a for a in argv if a.startswith(SEARCHPATH)), None)
    if arg is None:
        return None
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    try:
        value = OverridesParser.create().parse_override(arg).value()
    except HydraException:
        return None
    return [str(v) for v in value] if isinstance(value, list) else None


def searchpath_entries(argv: list[str]) -> list[str]:
    """flexp's sweeps/ first, then the user's own hydra.searchpath entries."""
    ours = f"file://{SWEEPS_DIR}"
    return [ours, *(e for e in user_searchpath(argv) or [] if e != ours)]


def with_sweeps_on_search_path(argv: list[str]) -> list[str]:
    """argv with flexp's sweeps/ (so `+sweep=table1` resolves) and the user's dirs in one hydra.searchpath.

    A new one goes beside the other overrides, since Hydra's parser wants them in one run (`-m a=1 --cfg job`).
    """
    if any(a.startswith(SEARCHPATH) for a in argv) and user_searchpath(argv) is None:
        return argv
    quoted = ",".join("'" + e.replace("'", "\\'") + "'" for e in searchpath_entries(argv))
    override = f"{SEARCHPATH}[{quoted}]"
    kept = [a for a in argv if not a.startswith(SEARCHPATH)]
    first = next((i for i, a in enumerate(kept) if "=" in a and not a.startswith("-")), len(kept))
    return [*kept[:first], override, *kept[first:]]


def entry_dir(entry: str) -> Path | None:
    """The directory a search path entry (file://DIR or pkg://module) names, if it is one here."""
    scheme, sep, rest = entry.partition("://")
    if not sep:
        return None
    if scheme == "file":
        return Path(rest).expanduser()
    if scheme == "pkg":
        from importlib.resources import files

        try:
            return Path(str(files(rest.replace("/", "."))))
        except (ImportError, TypeError, ValueError):
            return None
    return None


def search_dirs(argv: list[str]) -> list[Path]:
    """Every config dir Hydra will search for this command line, in Hydra's order: flexp's conf/, --config-dir,
    then hydra.searchpath (flexp's sweeps/ and the user's entries)."""
    config_dir = flag_value(argv, CONFIG_DIR_FLAGS)
    dirs = [CONF_DIR, *([Path(config_dir).expanduser()] if config_dir else [])]
    dirs += [d for d in map(entry_dir, searchpath_entries(argv)) if d is not None]
    return [d.resolve() for d in dirs if d.is_dir()]


def group_options(group: str, dirs: list[Path]) -> list[str]:
    """The options of a config group: the yaml files in <dir>/<group>/ over all dirs, sorted."""
    return sorted({p.stem for d in dirs for p in (d / group).glob("*.yaml")})
