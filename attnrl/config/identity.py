"""What identifies a resolved configuration: its digest, and the keys in which two of them differ.

A pipeline run resolves its configuration once and every stage of the run uses that resolution
(``flows/pipeline.py``); the digest names it in the run's log, and ``changed_keys`` says what an
edit of ``params.yaml`` during the run changed, before anything is recorded with DVC.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping

from attnrl.config.schema import RunConfig


def flat_tree(tree: Mapping[str, object], prefix: str = "") -> dict[str, object]:
    """A nested configuration mapping as ``{"section.key": value}``."""
    flat: dict[str, object] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flat_tree(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def changed_keys(before: Mapping[str, object] | RunConfig, after: Mapping[str, object] | RunConfig) -> list[str]:
    """The dotted keys whose values differ between two configurations (or nested mappings), sorted."""
    old, new = flat_tree(_tree(before)), flat_tree(_tree(after))
    return sorted(k for k in set(old) | set(new) if old.get(k, _MISSING) != new.get(k, _MISSING))


def config_digest(config: RunConfig) -> str:
    """sha256 of the configuration's canonical JSON: equal digests, equal configurations."""
    canonical = json.dumps(config.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def _tree(config: Mapping[str, object] | RunConfig) -> Mapping[str, object]:
    return config.model_dump(mode="json") if isinstance(config, RunConfig) else config


_MISSING = object()  # a key one side lacks differs from any value, None included
