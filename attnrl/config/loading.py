"""Reading, merging and writing the run configuration.

Resolution order: schema defaults ⊕ preset delta ⊕ file ⊕ method ⊕ ``--set key=value`` overrides.
A file may name its base with a top-level ``preset:`` key; ``params.yaml`` is a complete
serialisation and needs none. Every error names the key and the file it came from.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from attnrl.config.presets import METHODS, PRESETS
from attnrl.config.schema import RunConfig
from attnrl.errors import ConfigError


def resolve_config(
    *,
    preset: str | None = None,
    path: str | Path | None = None,
    method: str | None = None,
    overrides: Iterable[str] = (),
) -> RunConfig:
    """Build a validated ``RunConfig`` from a preset, a YAML file, a method and dotted overrides."""
    tree: dict[str, Any] = {}
    origin = "defaults"
    file_tree: dict[str, Any] = {}
    if path is not None:
        file_tree = _read_yaml(Path(path))
        origin = str(path)
        preset = file_tree.pop("preset", None) or preset
    if preset is not None:
        if preset not in PRESETS:
            raise ConfigError(f"unknown preset {preset!r}; known presets: {', '.join(sorted(PRESETS))}")
        tree = copy.deepcopy(PRESETS[preset])
        origin = f"preset {preset!r}" if path is None else origin
    _deep_merge(tree, file_tree)
    if method is not None:
        if method not in METHODS:
            raise ConfigError(f"unknown method {method!r}; known methods: {', '.join(sorted(METHODS))}")
        _deep_merge(tree, METHODS[method])
    for override in overrides:
        _apply_override(tree, override)
    return validate_config(tree, origin=origin)


def load_config(path: str | Path, overrides: Iterable[str] = ()) -> RunConfig:
    """Load a run configuration file (for example ``params.yaml``)."""
    return resolve_config(path=path, overrides=overrides)


def validate_config(tree: Mapping[str, Any], *, origin: str) -> RunConfig:
    """Validate a nested mapping; a ``ConfigError`` lists every bad key as ``a.b.c: why``."""
    try:
        return RunConfig.model_validate(tree)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            key = ".".join(str(part) for part in err["loc"]) or "<root>"
            if err["type"] == "extra_forbidden":
                lines.append(f"{key}: unknown key")
            elif not err["loc"] and err["type"] == "value_error":  # a rule across sections names its own fields
                lines.append(str(err["ctx"]["error"]))
            else:
                lines.append(f"{key}: {err['msg']} (got {err.get('input')!r})")
        listed = lines[0] if len(lines) == 1 else "\n  " + "\n  ".join(lines)  # one bad key: one line
        raise ConfigError(f"invalid configuration in {origin}: {listed}") from None


def dump_config(config: RunConfig) -> str:
    """Serialise a configuration as YAML, sections in schema order (the params.yaml layout)."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False, allow_unicode=True, width=100)


class _YamlLoader(yaml.SafeLoader):
    """YAML 1.2 booleans: only true and false. YAML 1.1 (PyYAML's default) also reads off/on/no/yes as booleans,
    so ``algorithm.easy_filter=off`` would arrive as False instead of the choice 'off'."""


_BOOL = "tag:yaml.org,2002:bool"
_YamlLoader.yaml_implicit_resolvers = {
    first: [(tag, pattern) for tag, pattern in resolvers if tag != _BOOL]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_YamlLoader.add_implicit_resolver(_BOOL, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))


def _load_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_YamlLoader)  # noqa: S506 - a SafeLoader subclass


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"configuration file not found: {path}")
    try:
        tree = _load_yaml(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(tree).__name__}")
    return tree


def _deep_merge(base: dict[str, Any], delta: Mapping[str, Any]) -> None:
    for key, value in delta.items():
        if isinstance(value, Mapping) and isinstance(base.get(key), dict):
            _deep_merge(base[key], value)
        else:
            base[key] = copy.deepcopy(value)


def _apply_override(tree: dict[str, Any], override: str) -> None:
    """``a.b.c=value``; a numeric part indexes a list (``data.eval.0.k=8``: the first benchmark's K)."""
    key, sep, raw = override.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {override!r}: expected key.path=value")
    value = _load_yaml(raw) if raw.strip() else None
    parts = key.strip().split(".")
    node: Any = tree
    for depth, part in enumerate(parts):
        last = depth == len(parts) - 1
        where = ".".join(parts[:depth]) or "the configuration"
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(f"override {override!r}: {where} is a list of {len(node)}; "
                                  f"{part!r} is not an index of it (0 to {len(node) - 1})")
            if last:
                node[int(part)] = value
            else:
                node = node[int(part)]
        elif isinstance(node, dict):
            if last:
                node[part] = value
            else:
                node = node.setdefault(part, {})
        else:
            raise ConfigError(f"override {override!r}: {where} is a value ({node!r}), not a section or a list")
