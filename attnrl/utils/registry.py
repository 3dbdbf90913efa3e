"""Name → implementation lookups for interchangeable parts (architecture.md: registries).

``extension`` is how the core reaches what another layer implements (the DeepSpeed backend, the Ray
rollout pool, the distributed runtime): infra declares them as entry points of the group
``attnrl.extensions`` in pyproject.toml, so the core names an extension point, never an infra module,
and imports nothing heavy until it is used. A process without attnrl's package metadata (a script run
from a checkout with ``PYTHONPATH``) registers what it needs with ``provide``.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from importlib.metadata import entry_points
from typing import Any, TypeVar

from attnrl.errors import ConfigError

T = TypeVar("T")
EXTENSIONS = "attnrl.extensions"  # the entry-point group
_PROVIDED: dict[str, Any] = {}


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


def provide(name: str, implementation: Any) -> None:
    """Register ``implementation`` as the extension ``name`` in this process, before any entry point."""
    _PROVIDED[name] = implementation


def extension(name: str, what: str) -> Any:
    """The implementation of the extension point ``name``; a ``ConfigError`` names ``what`` (the setting that
    asked for it) when nothing provides it or it cannot be imported (its layer's dependencies missing)."""
    if name in _PROVIDED:
        return _PROVIDED[name]
    points = entry_points(group=EXTENSIONS, name=name)
    if not points:
        raise ConfigError(f"{what} needs the extension {name!r}, and no installed package provides it (entry points "
                          f"{EXTENSIONS!r}: install attnrl with `pip install -e .`, or call provide() first)")
    (point,) = points
    try:
        return point.load()
    except ImportError as exc:
        raise ConfigError(f"{what} needs the extension {name!r} ({point.value}), which cannot be imported: {exc}") \
            from exc
