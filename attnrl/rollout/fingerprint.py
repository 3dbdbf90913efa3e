"""Weight fingerprints: proof that a weight sync reached the rollout engine.

A transport that silently does nothing (a wrong name, a cached kernel copy, a no-op backend) would
leave the engine sampling from an old policy while every metric looks normal. After each sync
the engine reports a checksum of every tensor it holds in plain form, and the pool compares it
with the same checksum of the trainer's weights cast to the engine's dtype.

A checksum is (elements, sum, sum of squares) in float64. Both are invariant under the layout
changes engines make: vLLM fuses ``q/k/v_proj`` into ``qkv_proj`` and ``gate/up_proj`` into
``gate_up_proj`` (``packed`` maps a fused name to its parts, and the parts' checksums add up)
and zero-pads the vocabulary. Tied tensors (one storage under two names) count once.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

import torch

Checksum = tuple[int, float, float]  # (elements, sum, sum of squares)
Fingerprint = dict[str, Checksum]

_SLICE = 1 << 24  # elements per float64 slice: bounds the temporary copy for a 150 k-row embedding
RELATIVE_TOLERANCE = 1e-9  # float64 sums of identical values in another order differ by ~1e-15·n


def engine_name(name: str, packed: Mapping[str, Sequence[str]]) -> str:
    """The engine's name for a checkpoint tensor: ``…q_proj.weight`` → ``…qkv_proj.weight``."""
    for fused, parts in packed.items():
        for part in parts:
            marker = f".{part}."
            if marker in name:
                return name.replace(marker, f".{fused}.")
    return name


def checksum(tensor: torch.Tensor, dtype: torch.dtype | None = None) -> Checksum:
    """(elements, Σx, Σx²) of ``tensor`` as stored in ``dtype`` (default: its own), in float64."""
    flat = tensor.detach().reshape(-1)
    if dtype is not None and flat.dtype != dtype:
        flat = flat.to(dtype)
    total = squares = 0.0
    for start in range(0, flat.numel(), _SLICE):
        part = flat[start : start + _SLICE].double()
        total += float(part.sum())
        squares += float(part.square().sum())
    return flat.numel(), total, squares


class FingerprintBuilder:
    """Checksums added one tensor at a time (a weight stream that never holds the whole model), then
    ``result()``: what ``fingerprint`` returns for the same tensors."""

    def __init__(self, *, packed: Mapping[str, Sequence[str]] | None = None, dtype: torch.dtype | None = None) -> None:
        self._packed = packed or {}
        self._dtype = dtype
        self._sums: dict[str, list[float]] = {}

    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Count ``tensor`` under its engine name (parts of a fused tensor add up); an empty tensor (an engine's
        repacked placeholder) is left out. Each tensor once: a streamed copy's storage may be reused by the next."""
        if tensor.numel() == 0:
            return
        count, total, squares = checksum(tensor, self._dtype)
        entry = self._sums.setdefault(engine_name(name, self._packed), [0, 0.0, 0.0])
        entry[0] += count
        entry[1] += total
        entry[2] += squares

    def result(self) -> Fingerprint:
        return {name: (int(c), t, s) for name, (c, t, s) in self._sums.items()}


def fingerprint(
    tensors: Iterable[tuple[str, torch.Tensor]],
    *,
    packed: Mapping[str, Sequence[str]] | None = None,
    dtype: torch.dtype | None = None,
) -> Fingerprint:
    """Checksums by engine name; parts of a fused tensor are summed, tied duplicates skipped,
    empty tensors (an engine's repacked placeholders) left out."""
    builder = FingerprintBuilder(packed=packed, dtype=dtype)
    seen: set[tuple[int, tuple[int, ...]]] = set()
    for name, tensor in tensors:
        storage = (tensor.data_ptr(), tuple(tensor.shape))
        if storage not in seen:
            seen.add(storage)
            builder.add(name, tensor)
    return builder.result()


def mismatches(expected: Fingerprint, actual: Fingerprint) -> list[str]:
    """Names the engine holds whose checksum differs from the trainer's (or that the trainer
    does not have); an empty list means the sync is proven for every tensor the engine exposes."""
    bad = []
    for name, (count, total, squares) in sorted(actual.items()):
        if name not in expected:
            bad.append(f"{name}: not among the trainer's weights")
            continue
        want_count, want_total, want_squares = expected[name]
        scale = math.sqrt(max(count, want_count) * max(squares, want_squares))  # >= Σ|x| (Cauchy–Schwarz)
        if (abs(total - want_total) > RELATIVE_TOLERANCE * scale + 1e-30
                or abs(squares - want_squares) > RELATIVE_TOLERANCE * max(squares, want_squares) + 1e-30):
            bad.append(f"{name}: engine sum {total:.12g} / squares {squares:.12g}, "
                       f"trainer {want_total:.12g} / {want_squares:.12g}")
    return bad
