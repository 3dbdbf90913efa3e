"""Name → implementation lookups for interchangeable parts (architecture.md: registries)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TypeVar

T = TypeVar("T")


def lookup(registry: Mapping[str, T], name: str, kind: str, error: type[Exception] = ValueError) -> T:
    """``registry[name]``; an unknown name raises ``error`` listing the known ones."""
    try:
        return registry[name]
    except KeyError:
        raise error(f"unknown {kind} {name!r}; known: {', '.join(sorted(registry))}") from None
