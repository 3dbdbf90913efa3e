"""The policy's weights as the rollout engines take them: full tensors, one module's parameters at a time.

A ``WeightStream`` is what a weight sync reads (vLLM's native transfer, architecture.md "Scaling out"):
``metadata()`` names every parameter with its full shape and the engines' dtype without moving any
data, and each pass yields ``(name, tensor)`` in that order. Where the backend partitions parameters
(DeepSpeed ZeRO-3: a rank holds an empty placeholder, the full shape is in ``ds_shape``) it passes a
``gather`` that makes a module's parameters whole for the time their tensors are read: every rank
must then iterate the stream in the same order, since each gather is a collective. Each yielded
tensor is a copy, so it stays valid after the gather releases the parameters.

Names are the Hugging Face checkpoint names of ``named_parameters()`` (a tied LM head is listed once,
under the embedding), which vLLM's ``load_weights`` maps onto its fused layers itself.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from itertools import groupby
from typing import ContextManager

import torch

Gather = Callable[[list[torch.nn.Parameter]], ContextManager[object]]


@dataclass(frozen=True)
class WeightMeta:
    """One parameter as it is sent: checkpoint name, the engines' dtype, full shape."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]


def _no_gather(params: list[torch.nn.Parameter]) -> ContextManager[object]:
    return contextlib.nullcontext()


class WeightStream:
    """``model``'s parameters at full shape, cast to ``dtype``, gathered module by module with ``gather``."""

    def __init__(self, model: torch.nn.Module, dtype: torch.dtype, *, gather: Gather = _no_gather,
                 full_shape: Callable[[torch.nn.Parameter], tuple[int, ...]] | None = None) -> None:
        self._params = list(model.named_parameters())
        self._dtype = dtype
        self._gather = gather
        self._full_shape = full_shape or (lambda p: tuple(p.shape))

    def metadata(self) -> list[WeightMeta]:
        """Every parameter, without gathering anything."""
        return [WeightMeta(name, self._dtype, self._full_shape(p)) for name, p in self._params]

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        for _, group in groupby(self._params, key=lambda item: item[0].rpartition(".")[0]):
            named = list(group)
            with self._gather([p for _, p in named]):  # one collective per module (a layer's projection, a norm)
                for name, param in named:
                    full = param.detach().to(self._dtype, copy=True)
                    if tuple(full.shape) != self._full_shape(param):
                        raise RuntimeError(f"{name}: the gather gave shape {tuple(full.shape)}, expected "
                                           f"{self._full_shape(param)} (a partitioned parameter was not made whole)")
                    yield name, full
