"""Name → implementation lookups for interchangeable parts (architecture.md: registries)."""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any, TypeVar

from attnrl.errors import ConfigError

T = TypeVar("T")


def lookup(registry: Mapping[str, T], name: str, kind: str, error: type[Exception] = ValueError) -> T:
    """``registry[name]``; an unknown name raises ``error`` listing the known ones."""
    try:
        return registry[name]
    except KeyError:
        raise error(f"unknown {kind} {name!r}; known: {', '.join(sorted(registry))}") from None


def load_object(path: str, what: str) -> Any:
    """Import ``"package.module:attribute"``; a ``ConfigError`` names ``what`` when it cannot.

    Implementations that need heavy systems (DeepSpeed, Ray) are registered this way, so the pure
    core names them without importing them.
    """
    module_name, sep, attribute = path.partition(":")
    if not sep or not module_name or not attribute:
        raise ConfigError(f"{what} must look like 'package.module:attribute', got {path!r}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"{what} {path!r}: cannot import module {module_name!r}: {exc}") from exc
    if not hasattr(module, attribute):
        raise ConfigError(f"{what} {path!r}: module {module_name!r} has no {attribute!r}")
    return getattr(module, attribute)
