"""YAML -> Config, with `section.key=value` overrides and type checking."""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path

import yaml

from .aliases import alias_of, megatron_paths, megatron_split
from ..errors import closest
from .schema import SECTIONS, Config, ConfigError


def _section_of(name: str) -> str | None:
    hints = typing.get_type_hints(Config)
    return next(
        (f"{s}.{name}" for s in SECTIONS if name in {f.name for f in dataclasses.fields(hints[s])}),
        None,
    )


def _unknown(key: str, name: str, value, options, what: str = "unknown key") -> ConfigError:
    """A Megatron-LM / GPT-NeoX name gets its key here; one of ours without its section gets the section;
    a GPT-NeoX file gets import-neox; anything else the closest valid key."""
    alias = alias_of(name)
    if alias is not None:
        ours, text = alias
        return ConfigError(key, value, f"{what}: {text}", f"write {ours} instead")
    ours = _section_of(name.replace("-", "_")) if "." not in key else None
    if ours is not None:
        return ConfigError(key, value, what, f"write {ours}")
    if "-" in name:
        return ConfigError(
            key,
            value,
            f"{what} (a GPT-NeoX style name)",
            "a GPT-NeoX config converts with `megatron-sep import-neox --config FILE --out DIR`",
        )
    return ConfigError(key, value, what, closest(name, options))


def _type_name(tp) -> str:
    if typing.get_origin(tp) is typing.Union:
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    names = {
        dict: "mapping",
        type(None): "null",
        int: "integer",
        float: "number",
        str: "string",
        bool: "boolean",
    }
    return names.get(tp) or getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(key: str, value, tp):
    """Return value checked against the annotation tp (int->float widening allowed)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Union:
        errors = []
        for option in args:
            try:
                return _coerce(key, value, option)
            except ConfigError as e:
                errors.append(e)
        raise ConfigError(
            key,
            value,
            f"has the wrong type (expected {_type_name(tp)})",
            f"give a value of type {_type_name(tp)}",
        )
    if tp is type(None):
        if value is None:
            return None
        raise ConfigError(key, value, "expected null", "use null")
    if origin is typing.Literal:
        if value in args:
            return value
        raise ConfigError(
            key,
            value,
            "is not one of " + ", ".join(map(repr, args)),
            "use one of the listed values",
        )
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(key, value, "expected a list", "write it as [a, b, ...]")
        return [_coerce(f"{key}[{i}]", v, args[0]) for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads `3e-4` (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
    elif tp is dict:
        if isinstance(value, dict):
            return value
    else:
        raise TypeError(f"unsupported config annotation {tp}")
    raise ConfigError(
        key,
        value,
        f"has the wrong type (expected {_type_name(tp)})",
        f"give a value of type {_type_name(tp)}",
    )


def _build_section(name: str, cls, values: dict):
    if not isinstance(values, dict):
        raise ConfigError(
            name, values, "a section must be a mapping", f"write `{name}:` followed by keys"
        )
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        if key not in fields:
            raise _unknown(f"{name}.{key}", key, value, fields)
        kwargs[key] = _coerce(f"{name}.{key}", value, hints[key])
    return cls(**kwargs)


def parse_override(text: str) -> tuple[list[str], object]:
    if "=" not in text:
        raise ConfigError(
            text,
            None,
            "an override must look like section.key=value",
            "write e.g. --set optim.lr=3e-4",
        )
    key, raw = text.split("=", 1)
    parts = key.strip().split(".")
    if len(parts) != 2 or not all(parts):
        hint = (
            alias_of(parts[-1]) or _section_of(parts[-1].replace("-", "_"))
            if len(parts) == 1
            else None
        )
        if hint is not None:
            raise _unknown(key, parts[-1], raw, (), "an override key must be section.key")
        raise ConfigError(
            key, raw, "an override key must be section.key", "write e.g. --set optim.lr=3e-4"
        )
    try:
        return parts, yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as e:
        raise ConfigError(
            key,
            raw,
            f"the value is not valid YAML ({yaml_problem(e)})",
            "quote it, or write a list as [a, b] and a string in quotes",
        ) from None


def set_value(raw: dict, section: str, key: str, value) -> None:
    """raw[section][key] = value in a raw config mapping (an empty section becomes a mapping)."""
    if raw.get(section) is None:
        raw[section] = {}
    if not isinstance(raw[section], dict):
        raise ConfigError(section, raw[section], "a section must be a mapping", "fix the YAML file")
    raw[section][key] = value


def config_from_dict(raw: dict, overrides: typing.Sequence[str] = ()) -> Config:
    raw = {
        k: dict(v or {}) if isinstance(v, dict) or v is None else v for k, v in (raw or {}).items()
    }
    for text in overrides:
        (section, key), value = parse_override(text)
        set_value(raw, section, key, value)
    if isinstance(raw.get("data"), dict):  # Megatron's forms of data.split and data.paths
        d = raw["data"]
        if "split" in d:
            d["split"] = megatron_split(d["split"])
        if "paths" in d:
            d["paths"], weights = megatron_paths(d["paths"], d.get("weights"))
            if weights is not None:
                d["weights"] = weights
    hints = typing.get_type_hints(Config)
    sections = {}
    for name, values in raw.items():
        if name not in SECTIONS:
            raise _unknown(name, name, values, SECTIONS, "unknown config section")
        sections[name] = _build_section(name, hints[name], values)
    cfg = Config(**sections)
    cfg.check()
    return cfg


def yaml_problem(e: yaml.YAMLError) -> str:
    """A YAML error in one line: where and what."""
    mark = getattr(e, "problem_mark", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
    return where + (getattr(e, "problem", None) or str(e).splitlines()[0])


def read_yaml(path: Path, key: str, fix: str):
    """A YAML file's content; a binary or broken file is one ConfigError naming it (`fix`: for a binary one)."""
    data = path.read_bytes()
    try:
        if b"\0" in data:  # UTF-8 allows NUL, YAML does not: a binary file
            raise UnicodeDecodeError(
                "utf-8", data, data.index(b"\0"), data.index(b"\0") + 1, "NUL byte"
            )
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(
            key,
            str(path),
            f"is a binary file, not YAML text (byte {e.start} is 0x{data[e.start]:02x})",
            fix,
        ) from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(
            key, str(path), f"is not valid YAML ({yaml_problem(e)})", "fix the YAML syntax"
        ) from None


def load_config(path: str | Path | None, overrides: typing.Sequence[str] = ()) -> Config:
    return config_from_dict({} if path is None else read_config_file(path), overrides)


def read_config_file(path: str | Path) -> dict:
    """A config file's sections as written (not checked yet: config_from_dict checks them)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError("--config", str(path), "file not found", "pass the path of a YAML config")
    raw = read_yaml(path, "--config", "pass the path of a YAML config") or {}
    if not isinstance(raw, dict):
        raise ConfigError("--config", str(path), "must hold a mapping of sections", "see configs/")
    return raw


def config_to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False)
