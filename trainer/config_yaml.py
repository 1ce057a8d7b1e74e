"""Reading YAML and `key=value` overrides into nested dataclasses, and writing them back.

Generic over the dataclasses: trainer.config applies it to ExperimentConfig.
Every unknown key or mistyped value raises ConfigError naming the key.
"""

import dataclasses
import math
import typing

import yaml

from data_pipeline.textfile import TextFileError, read_utf8
from trainer.config_checks import ConfigError


def _coerce(key: str, raw, typ):
    """Checks (and, for str fields, converts) one value against a field type."""
    if typ is bool:
        if isinstance(raw, bool):
            return raw
    elif typ is int:
        if isinstance(raw, int) and not isinstance(raw, bool):
            return raw
    elif typ is float:
        # inf and nan pass every `> 0` check and break the schedule or the loss later.
        if isinstance(raw, (int, float)) and not isinstance(raw, bool) and math.isfinite(raw):
            return float(raw)
        if isinstance(raw, float):
            raise ConfigError(f"{key}={raw!r}: expected a finite number")
        # YAML 1.1 reads 5e-4 (no dot) as a string: the usual way to write a weight decay.
        number = _float_literal(raw)
        if number is not None:
            return number
    elif typ is str:
        if raw is None:
            return ""
        if not isinstance(raw, (dict, list)):
            return str(raw)
    raise ConfigError(f"{key}={raw!r}: expected {typ.__name__}")


def _float_literal(raw) -> float | None:
    """A string such as `5e-4` as a finite float; None for anything else."""
    if not isinstance(raw, str):
        return None
    try:
        number = float(raw)
    except ValueError:
        return None
    return number if math.isfinite(number) else None


def _apply(obj, key: str, value) -> None:
    """Sets dotted `key` on a nested dataclass, checking the key and the type."""
    *parents, leaf = key.split(".")
    target = obj
    for i, part in enumerate(parents):
        sub = getattr(target, part, None) if part in {f.name for f in dataclasses.fields(target)} else None
        if not dataclasses.is_dataclass(sub):
            raise ConfigError(f"unknown config key {'.'.join(parents[: i + 1])!r}")
        target = sub
    hints = typing.get_type_hints(type(target))
    if leaf not in {f.name for f in dataclasses.fields(target)}:
        raise ConfigError(f"unknown config key {key!r}")
    typ = hints[leaf]
    if dataclasses.is_dataclass(typ):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}={value!r}: expected a mapping")
        for k, v in value.items():
            _apply(obj, f"{key}.{k}", v)
        return
    setattr(target, leaf, _coerce(key, value, typ))


def parse_override(text: str) -> tuple[str, object]:
    """`a.b=value` to (key, value); the value is read as a YAML scalar."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {text!r} is not key=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def load_into(cfg, path: str | None, overrides: typing.Sequence[str] = ()):
    """Applies a YAML file (none for None), then the overrides, to the dataclass `cfg`; returns it."""
    if path:
        try:
            data = yaml.safe_load(read_utf8(path))
        except TextFileError as e:
            raise ConfigError(f"config file {path!r}: {e}") from None
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" line {mark.line + 1}" if mark else ""
            raise ConfigError(f"config file {path!r}{where}: not valid YAML") from None
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise ConfigError(f"config file {path!r}: expected a mapping at the top level")
        for key, value in data.items():
            _apply(cfg, str(key), value)
    for text in overrides:
        _apply(cfg, *parse_override(text))
    return cfg


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def dump_yaml(cfg) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)

