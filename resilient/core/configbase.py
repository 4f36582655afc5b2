"""Typed config sections and the one way to read them from YAML with dotted overrides."""

from __future__ import annotations

import errno
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from resilient.core import beneath
from resilient.core.errors import ConfigError

S = TypeVar("S", bound=BaseModel)


class Section(BaseModel):
    """A config section: unknown keys are errors, floats are finite (`.inf`/`.nan` are refused before any
    rank starts), and each field's docstring documents it."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, frozen=False, allow_inf_nan=False)


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for key in keys[:-1]:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{dotted}: {key!r} is not a section")
        node = child
    node[keys[-1]] = value


def apply_overrides(tree: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `key.sub=value` strings; values are parsed as YAML scalars (50 -> int, true -> bool)."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r} is not of the form key.sub=value")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as err:
            raise ConfigError(f"override {item!r}: not a valid value ({str(err).splitlines()[0]})") from None
        _set_dotted(tree, key.strip(), value)
    return tree


def one_line(err: ValidationError) -> str:
    """A pydantic error as one line naming the first offending key."""
    first = err.errors()[0]
    where = ".".join(str(p) for p in first["loc"])
    msg = first["msg"].removeprefix("Value error, ")
    more = f" (+{err.error_count() - 1} more)" if err.error_count() > 1 else ""
    return f"{where + ': ' if where else ''}{msg}{more}"


def read_tree(path: str | Path | None, *, no_link: bool = False) -> dict[str, Any]:
    """The YAML mapping in `path` (None: empty); every way it can be unreadable is one ConfigError.
    `no_link`: a file the run itself wrote (RUN_DIR/config.yaml), opened without following a link."""
    if path is None:
        return {}
    path = Path(path)
    try:
        raw = beneath.read_beneath(path.parent, path.name) if no_link else path.read_bytes()
        loaded = yaml.safe_load(raw.decode("utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a directory, not a config file") from None
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise ConfigError(f"{path}: is a symbolic link; refusing to read the run's config through it") from None
        raise ConfigError(f"{path}: cannot read ({err.strerror})") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None
    if loaded is not None and not isinstance(loaded, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    return loaded or {}


def parse_section(model: type[S], tree: dict[str, Any], check: Callable[[S], None] | None = None) -> S:
    """Validate a tree as `model` (then `check`); errors become one-line ConfigErrors naming the key."""
    try:
        section = model.model_validate(tree)
        if check is not None:
            check(section)
        return section
    except ValidationError as err:
        raise ConfigError(one_line(err)) from None
    except ValueError as err:
        raise ConfigError(str(err)) from None


def load_section(
    model: type[S],
    path: str | Path | None,
    overrides: list[str] | None = None,
    check: Callable[[S], None] | None = None,
    *,
    no_link: bool = False,
) -> S:
    """Read a YAML config file (None: defaults; `no_link`: see read_tree), apply dotted overrides, validate
    as `model`."""
    return parse_section(model, apply_overrides(read_tree(path, no_link=no_link), overrides or []), check)
