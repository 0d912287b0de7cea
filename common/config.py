"""Configs as nested dataclasses: loaded from TOML with dotted command-line overrides, validated by type and range.

A root config is a dataclass whose fields are section dataclasses; :func:`load_config` (or :func:`parse_cli` for an
entry script) builds it from a TOML file and ``--section.key=value`` overrides. Every key has a type hint that values
are checked against, so a typo or a wrong type fails before any work with a message naming the key (and the file it
came from). A numeric key declares its allowed values in the hint, ``Annotated[int, Range(min=1)]`` or one of the
aliases (``PositiveInt``, ``NonNegativeInt``, ``PositiveFloat``, ``NonNegativeFloat``, ``Fraction``), also inside
``| None``, lists and table values; ``Literal[...]`` keys accept only the values listed. ``train.config`` builds the
training entries' sections on it, ``data.curate.pipeline`` the curation pipeline's.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

from common.atomic import atomic_write_text

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

T = TypeVar("T")


class ConfigError(ValueError):
    """A config file or override that does not fit the config's dataclasses."""


@dataclass(frozen=True)
class Range:
    """The values a numeric key allows, as type-hint metadata: ``Annotated[int, Range(min=1)]``.

    A value must be finite and lie within ``min`` / ``max`` (``<`` / ``>`` with the exclusive flags), or be one of
    ``also``: sentinels outside the range with a meaning of their own, such as -1 = auto.
    """

    min: float | None = None
    max: float | None = None
    min_exclusive: bool = False
    max_exclusive: bool = False
    also: tuple[float, ...] = ()

    def admits(self, value: float) -> bool:
        """True when ``value`` is allowed."""
        if value in self.also:
            return True
        if not math.isfinite(value):
            return False
        if self.min is not None and (value < self.min or (self.min_exclusive and value == self.min)):
            return False
        return self.max is None or not (value > self.max or (self.max_exclusive and value == self.max))

    def describe(self, noun: str = "a value") -> str:
        """The allowed values in words, e.g. ``a value >= 1 or -1`` or ``a finite value in [0, 1)``."""
        if self.min is not None and self.max is not None:
            left, right = "(["[not self.min_exclusive], ")]"[not self.max_exclusive]
            bounds = f"in {left}{self.min}, {self.max}{right}"
        elif self.min is not None:
            bounds = f"{'>' if self.min_exclusive else '>='} {self.min}"
        elif self.max is not None:
            bounds = f"{'<' if self.max_exclusive else '<='} {self.max}"
        else:
            bounds = ""
        return f"{noun} {bounds}".rstrip() + "".join(f" or {v}" for v in self.also)

    def check(self, value: Any, where: str) -> None:
        """Raise ConfigError naming ``where``, the value and the allowed range when ``value`` is outside it."""
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: a Range applies to numbers, got {value!r}")
        if not self.admits(value):
            # NaN and infinities fail every range: say "finite", since "nan is not >= 0" reads like a riddle.
            noun = "a finite value" if isinstance(value, float) else "a value"
            raise ConfigError(f"{where}: expected {self.describe(noun)}, got {value!r}")


# Hints for the common ranges; a key with a sentinel spells it out, e.g. Annotated[int, Range(min=1, also=(-1,))].
PositiveInt = Annotated[int, Range(min=1)]
NonNegativeInt = Annotated[int, Range(min=0)]
PositiveFloat = Annotated[float, Range(min=0, min_exclusive=True)]
NonNegativeFloat = Annotated[float, Range(min=0)]
Fraction = Annotated[float, Range(min=0, max=1)]


# ----------------------------------------------------------------------------------------------------------------
# Validation and coercion.


def _hints(cls: type) -> dict[str, Any]:
    # include_extras keeps the Annotated[..., Range(...)] metadata that get_type_hints strips by default.
    return typing.get_type_hints(cls, include_extras=True)


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check ``value`` against the type hint ``tp``; ints widen to floats, TOML arrays to lists/tuples."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin is Annotated:
        base, *metadata = typing.get_args(tp)
        value = _coerce(value, base, where)
        for extra in metadata:
            if isinstance(extra, Range) and value is not None:
                extra.check(value, where)
        return value
    if origin is typing.Union or origin is types.UnionType:
        return _coerce_union(value, tp, where)
    if origin is Literal:
        # Compared with the type too: True == 1, but a bool is no answer to Literal[0, 1].
        if not any(value == a and type(value) is type(a) for a in typing.get_args(tp)):
            raise ConfigError(f"{where}: expected one of {list(typing.get_args(tp))}, got {value!r}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        args = typing.get_args(tp)
        inner = args[0] if args else Any
        items = [_coerce(v, inner, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a table, got {value!r}")
        key_tp, value_tp = typing.get_args(tp) or (Any, Any)
        return {_coerce(k, key_tp, where): _coerce(v, value_tp, f"{where}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a table, got {value!r}")
        return _build(tp, value, where)
    return _coerce_scalar(value, tp, where)


def _coerce_union(value: Any, tp: Any, where: str) -> Any:
    """``A | B | None``: the first member that accepts ``value``; ``X | None`` keeps X's own message (its range)."""
    args = typing.get_args(tp)
    if value is None and type(None) in args:
        return None
    options = [arg for arg in args if arg is not type(None)]
    if len(options) == 1:
        return _coerce(value, options[0], where)
    for arg in options:
        try:
            return _coerce(value, arg, where)
        except ConfigError:
            pass
    raise ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r}")


def _coerce_scalar(value: Any, tp: Any, where: str) -> Any:
    """bool, int, float (ints widen) and str values."""
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected bool, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected int, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected float, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected str, got {value!r}")
        return value
    raise ConfigError(f"{where}: unsupported config type {tp!r}")


def _build(cls: type[T], table: dict[str, Any], where: str) -> T:
    """Instantiate dataclass ``cls`` from a (partial) table, defaults filling the rest."""
    hints = _hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in table.items():
        if key not in names:
            kind = "section" if not where else "key"
            raise ConfigError(f"{where + ': ' if where else ''}unknown {kind} '{key}' (known: {sorted(names)})")
        kwargs[key] = _coerce(value, hints[key], f"{where}.{key}" if where else key)
    return cls(**kwargs)


def from_dict(cls: type[T], table: dict[str, Any], source: str = "") -> T:
    """Build root config ``cls`` from a nested dict; errors name the offending key and ``source``."""
    try:
        return _build(cls, table, "")
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}" if source else str(e)) from None


def _parse_value(text: str, tp: Any) -> Any:
    """Read a command-line value as TOML (numbers, bools, arrays); strings may be given bare."""
    if text.lower() in ("none", "null"):
        return None
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def _table_value_type(tp: Any) -> Any | None:
    """The value type of a table (dict) field, Any for a bare ``dict``; None for any other type."""
    if tp is dict or typing.get_origin(tp) is dict:
        return (typing.get_args(tp) or (Any, Any))[1]
    return None


def _field_type(cls: type, dotted: str) -> Any:
    """The type hint of ``section.key`` (any depth) in root dataclass ``cls``, or of one key of a table field
    (``--optim.lr_scale.output=10``); an error names unknown parts."""
    tp: Any = cls
    parts = dotted.split(".")
    for i, part in enumerate(parts):
        value_type = _table_value_type(tp)
        if value_type is not None:
            if i == len(parts) - 1:
                return value_type
            table = ".".join(parts[:i])
            raise ConfigError(
                f"--{dotted}: '{table}' is a table of single keys: give --{table}.KEY=value, or the whole table "
                f"as TOML (--{table}='{{\"a.b\" = 1}}') for a key with dots"
            )
        if not dataclasses.is_dataclass(tp):
            raise ConfigError(f"--{dotted}: '{'.'.join(parts[:i])}' is not a section")
        hints = _hints(tp)
        if part not in hints:
            what = "section" if i == 0 else "key"
            raise ConfigError(f"--{dotted}: unknown {what} '{part}' (known: {sorted(hints)})")
        tp = hints[part]
    return tp


def _str_like(tp: Any) -> bool:
    if typing.get_origin(tp) is Annotated:
        return _str_like(typing.get_args(tp)[0])
    if tp is str:
        return True
    if typing.get_origin(tp) is Literal:
        return all(isinstance(a, str) for a in typing.get_args(tp))
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return any(_str_like(a) for a in typing.get_args(tp))
    return False


def apply_overrides(table: dict[str, Any], cls: type, overrides: list[str]) -> dict[str, Any]:
    """Apply ``--section.key=value`` / ``--section.key value`` overrides to a nested dict (checked against cls)."""
    table = json.loads(json.dumps(table))  # deep copy of plain TOML data
    i = 0
    while i < len(overrides):
        arg = overrides[i]
        if not arg.startswith("--"):
            raise ConfigError(f"unexpected argument {arg!r} (overrides look like --section.key=value)")
        body = arg[2:]
        if "=" in body:
            key, text = body.split("=", 1)
            i += 1
        else:
            key = body
            if i + 1 >= len(overrides):
                raise ConfigError(f"--{key}: missing value")
            text = overrides[i + 1]
            i += 2
        key = key.replace("-", "_")
        if "." not in key:
            raise ConfigError(f"unknown option --{key} (config overrides look like --section.key=value)")
        tp = _field_type(cls, key)
        value = _parse_value(text, tp)
        # A string-typed key takes the text verbatim ("1" stays "1"), unless it is explicitly none.
        if _str_like(tp) and not isinstance(value, str) and value is not None:
            value = text
        node = table
        *sections, leaf = key.split(".")
        for s in sections:
            node = node.setdefault(s, {})
        node[leaf] = value
    return table


def load_config(cls: type[T], path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> T:
    """Load root config ``cls`` from a TOML file (optional) and apply dotted overrides."""
    table: dict[str, Any] = {}
    source = ""
    if path:
        source = str(path)
        try:
            with open(path, "rb") as f:
                table = tomllib.load(f)
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{path}: invalid TOML: {e}") from None
        # Validate the file alone first so that its errors name the file.
        from_dict(cls, table, source)
    if overrides:
        table = apply_overrides(table, cls, overrides)
        source = f"{source} + command line" if source else "command line"
    return from_dict(cls, table, source)


def parse_cli(
    cls: type[T], argv: list[str] | None = None, parser: argparse.ArgumentParser | None = None
) -> tuple[T, argparse.Namespace]:
    """Parse ``--config FILE`` plus entry flags of ``parser`` and dotted overrides into ``(config, namespace)``."""
    parser = parser or argparse.ArgumentParser()
    parser.add_argument("--config", default=None, help="TOML run config")
    args, rest = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    try:
        cfg = load_config(cls, args.config, rest)
    except ConfigError as e:
        parser.error(str(e))
    return cfg, args


# ----------------------------------------------------------------------------------------------------------------
# Writing the resolved config.


def to_dict(cfg: Any) -> dict[str, Any]:
    """The config as a nested dict of plain values."""
    return dataclasses.asdict(cfg)


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)  # a JSON string is a valid TOML basic string
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {v!r} as TOML")


def to_toml(cfg: Any) -> str:
    """Render a config as TOML; None values (which TOML lacks) are written as comments."""
    lines: list[str] = []

    def emit(table: dict[str, Any], prefix: str) -> None:
        scalars = {k: v for k, v in table.items() if not isinstance(v, dict)}
        subs = {k: v for k, v in table.items() if isinstance(v, dict)}
        if prefix and scalars:
            lines.append(f"[{prefix}]")
        for k, v in scalars.items():
            lines.append(f"# {k} = null" if v is None else f"{k} = {_toml_value(v)}")
        if prefix and scalars:
            lines.append("")
        for k, v in subs.items():
            emit(v, f"{prefix}.{k}" if prefix else k)

    emit(to_dict(cfg), "")
    return "\n".join(lines)


def save_config(cfg: Any, run_dir: str | os.PathLike) -> None:
    """Write the resolved config as ``config.toml`` and ``config.json`` in the run dir (atomically)."""
    os.makedirs(run_dir, exist_ok=True)
    for name, text in (("config.toml", to_toml(cfg)), ("config.json", json.dumps(to_dict(cfg), indent=2))):
        atomic_write_text(Path(run_dir, name), text + "\n")
