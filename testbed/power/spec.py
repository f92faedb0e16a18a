"""Turning a driver spec from a device profile into a driver object.

A spec is a mapping such as ``{driver: serial-relay, port: /dev/ttyUSB1, channel: 1}``.
The driver classes are dataclasses; their init fields are the keys a spec may have, and
a field without a default is a required key. Fields marked ``internal()`` are for code
(an injected device handle, a progress callback) and are never accepted from a profile.

Every error is a ConfigError that names the section, the driver, the offending key and
the keys that are allowed, so a person can fix the profile without reading code.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

from testbed.errors import ConfigError

_INTERNAL = "testbed.internal"
_Driver = TypeVar("_Driver")


def internal(default: Any = None) -> Any:
    """A dataclass field that code may pass but a profile may not set."""
    return dataclasses.field(default=default, repr=False, compare=False, metadata={_INTERNAL: True})


def spec_keys(cls: type) -> tuple[list[str], list[str]]:
    """(required keys, optional keys) a profile may give for driver class ``cls``."""
    required: list[str] = []
    optional: list[str] = []
    for f in dataclasses.fields(cls):
        if not f.init or f.metadata.get(_INTERNAL):
            continue
        has_default = f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
        (optional if has_default else required).append(f.name)
    return required, optional


def _describe(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(hint) if a is not type(None))
    if origin is list:
        (item,) = typing.get_args(hint) or (Any,)
        return f"a list of {_describe(item).removeprefix('a ').removeprefix('an ')}s"
    return {
        bool: "true or false",
        int: "an integer",
        float: "a number",
        str: "a string",
        Path: "a path",
    }.get(hint, getattr(hint, "__name__", str(hint)))


def _matches(value: Any, hint: Any) -> bool:
    if hint is Any:
        return True
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, a) for a in typing.get_args(hint))
    if origin is list:
        (item,) = typing.get_args(hint) or (Any,)
        return isinstance(value, list) and all(_matches(v, item) for v in value)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if hint is Path:
        return isinstance(value, str | Path)
    if isinstance(hint, type):
        return isinstance(value, hint)
    return True


def build(section: str, drivers: Mapping[str, type[_Driver]], spec: Any, **code_args: Any) -> _Driver:
    """Validate ``spec`` against ``drivers`` and construct the chosen driver.

    ``section`` is the profile section name ("power", "flash") used in messages.
    ``code_args`` are internal fields passed by code (never from the profile).
    Raises ConfigError naming the driver, the bad or missing key and the allowed keys.
    """
    choices = ", ".join(sorted(drivers))
    if not isinstance(spec, Mapping):
        raise ConfigError(
            f"{section}: expected a mapping with a 'driver' key (one of: {choices}), got {type(spec).__name__}"
        )
    name = spec.get("driver")
    if name is None:
        raise ConfigError(f"{section}: missing key 'driver'; set it to one of: {choices}")
    if name not in drivers:
        close = difflib.get_close_matches(str(name), list(drivers), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ConfigError(f"{section}: unknown driver '{name}'{hint}; choose one of: {choices}")
    cls = drivers[name]
    required, optional = spec_keys(cls)
    allowed = required + optional
    where = f"{section} driver '{name}'"
    allowed_text = ", ".join(allowed) if allowed else "(none)"
    values = {k: v for k, v in spec.items() if k != "driver"}
    for key in values:
        if key not in allowed:
            close = difflib.get_close_matches(str(key), allowed, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(f"{where}: unknown key '{key}'{hint}; allowed keys: {allowed_text}")
    for key in required:
        if key not in values:
            raise ConfigError(
                f"{where}: missing key '{key}'; required keys: {', '.join(required)}; allowed keys: {allowed_text}"
            )
    hints = typing.get_type_hints(cls)
    for key, value in values.items():
        hint = hints.get(key, Any)
        if not _matches(value, hint):
            raise ConfigError(f"{where}: key '{key}' must be {_describe(hint)}, got {value!r}")
    try:
        return cls(**values, **code_args)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None
