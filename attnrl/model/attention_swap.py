"""Run a model's attention layers through our own function for the length of a block.

FCI (spec §5.1: scores inside the ordinary forward) and the disruption analysis (spec §5.3) both register an
attention function with transformers' ``AttentionInterface`` and switch the model to it. The function is
global, so it finds the object that serves a layer through ``owners``: module id -> owner, filled for every
module of the model while the block runs. The model's own implementation is restored on exit, also after
an error.
"""

from __future__ import annotations

from typing import Any

import torch


class AttentionSwap:
    """``enter()`` switches ``model`` to the registered implementation ``name`` with ``owner`` serving its
    layers; ``exit()`` undoes it."""

    def __init__(self, model: torch.nn.Module, name: str, owners: dict[int, Any], owner: Any) -> None:
        self.model, self.name, self.owners, self.owner = model, name, owners, owner
        self.original: str | None = None

    def enter(self) -> None:
        config = self.model.config
        original = config._attn_implementation
        self.model.set_attn_implementation(self.name)
        if config._attn_implementation != self.name:
            # set_attn_implementation only logs a warning when a model cannot switch at runtime.
            raise RuntimeError(f"{type(self.model).__name__} cannot switch its attention implementation at runtime")
        self.original = original
        for module in self.model.modules():
            self.owners[id(module)] = self.owner

    def exit(self) -> None:
        for module in self.model.modules():
            if self.owners.get(id(module)) is self.owner:
                del self.owners[id(module)]
        if self.original is not None:
            self.model.set_attn_implementation(self.original)
            self.original = None
