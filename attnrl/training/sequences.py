"""Packing prompt ⧺ response sequences into left-padded tensors and back.

Rows are left-padded so every response ends at the last column: the response tokens of row i
occupy its last ``R_i`` columns, and the logits that predict them sit one column earlier. This
is the layout the rollout engine generates with, so recomputed log-probs match the engine's
(stack-notes.md).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class PackedBatch:
    input_ids: torch.Tensor       # [B, W]
    attention_mask: torch.Tensor  # [B, W]
    response_mask: torch.Tensor   # [B, Rmax], 1 on each row's last R_i entries
    response_ids: torch.Tensor    # [B, Rmax], right-aligned like response_mask
    response_lengths: tuple[int, ...]

    @property
    def response_width(self) -> int:
        return self.response_ids.shape[1]


def pack(prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]], pad_token_id: int) -> PackedBatch:
    """Left-pad ``prompt ⧺ response`` rows; responses must be non-empty."""
    if len(prompts) != len(responses) or not prompts:
        raise ValueError("pack needs equally many (>0) prompts and responses")
    if any(len(r) == 0 for r in responses):
        raise ValueError("every response needs at least one token")
    rows = [list(p) + list(r) for p, r in zip(prompts, responses, strict=True)]
    width = max(len(row) for row in rows)
    rmax = max(len(r) for r in responses)
    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    response_ids = torch.full((len(rows), rmax), pad_token_id, dtype=torch.long)
    response_mask = torch.zeros((len(rows), rmax), dtype=torch.float32)
    for i, (row, response) in enumerate(zip(rows, responses, strict=True)):
        input_ids[i, width - len(row) :] = torch.tensor(row)
        attention_mask[i, width - len(row) :] = 1
        response_ids[i, rmax - len(response) :] = torch.tensor(list(response))
        response_mask[i, rmax - len(response) :] = 1.0
    return PackedBatch(input_ids, attention_mask, response_mask, response_ids, tuple(len(r) for r in responses))


def response_logits(logits: torch.Tensor, batch: PackedBatch) -> torch.Tensor:
    """The logits that predict each response token: [B, Rmax, V], aligned with ``response_ids``."""
    return logits[:, -batch.response_width - 1 : -1]


def right_aligned(values: Sequence[Sequence[float]], width: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Per-row values placed in the last ``len(row)`` columns (the response layout)."""
    out = torch.zeros((len(values), width), dtype=dtype)
    for i, row in enumerate(values):
        if row:
            out[i, width - len(row) :] = torch.tensor(list(row), dtype=dtype)
    return out


def unpack_rows(values: torch.Tensor, lengths: Sequence[int]) -> list[list[float]]:
    """The inverse of ``right_aligned``: each row's last ``length`` values as a list."""
    width = values.shape[1]
    return [values[i, width - n :].tolist() for i, n in enumerate(lengths)]
