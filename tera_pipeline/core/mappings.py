"""Config data as plain mappings: a YAML file's top-level mapping (every way it can be wrong
named in one line), merging sections and dotted-key overrides into it, and the validated
section they fill (``Section``)."""

from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict

from tera_pipeline.core.errors import TeraError


class Section(BaseModel):
    """A section of the config: unknown fields refused, frozen, finite numbers only."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class ConfigError(TeraError, ValueError):
    """A config file that cannot be read as a job config; the message is one line naming it."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).splitlines()))


_KINDS = {list: "list", tuple: "list", str: "string", int: "number", float: "number"}


def read_yaml_mapping(path: Path, what: str = "job config") -> dict:
    """The top-level mapping of a YAML file (an empty file is ``{}``). Binary or non-UTF-8 data,
    malformed YAML and a top level that is not a mapping raise a ``ConfigError`` naming the
    file; a missing or unreadable file raises ``OSError``."""
    path = Path(path)
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise ConfigError(
            f"{path}: not a YAML {what}: not UTF-8 text "
            f"(byte 0x{raw[err.start]:02x} at offset {err.start})"
        ) from None
    if "\0" in text:
        raise ConfigError(f"{path}: not a YAML {what}: binary data (NUL bytes)")
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err).strip().splitlines()[0]
        raise ConfigError(f"{path}: malformed YAML{where}: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        kind = "boolean" if isinstance(data, bool) else _KINDS.get(type(data), type(data).__name__)
        raise ConfigError(
            f"{path}: a {what} must be a mapping of sections (volume:, storage:, ...), "
            f"not a YAML {kind}"
        )
    return data


def merge_nested(base: dict, top: dict) -> dict:
    """``base`` with ``top``'s values on top, merged section by section."""
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            value = merge_nested(out[key], value)
        out[key] = value
    return out


def merge(data: dict, overrides: dict) -> dict:
    """Merge dotted-key overrides ("storage.block": (8, 64, 64)) into nested config data."""
    out = dict(data)
    for key, value in overrides.items():
        if value is None:
            continue
        *parents, leaf = key.split(".")
        node = out
        for depth, p in enumerate(parents):
            child = node.get(p, {})
            if not isinstance(child, dict):
                section = ".".join(parents[: depth + 1])
                raise ConfigError(
                    f"config section {section!r} must be a mapping of fields, got {child!r}"
                )
            node[p] = dict(child)  # copied: the caller's data is left as it was
            node = node[p]
        node[leaf] = value
    return out
