"""Blocked causal attention that also yields each head's forward context influence (spec §5.2, §5.3).

One attention layer over one unpadded sequence, query rows in blocks: each block's scores
softmax(QKᵀ·scaling + causal) exist once, as a [heads, block, L] buffer, and serve twice: for the
layer's attention output (P·V) and for FCI. FCI per head is linear in the attention rows,
y_k = Σ_i w_i Σ_{j∈S_k} A[i, j] over query rows i of steps ≥ k + Δ (w_i = 1/|S_q|), so every
block adds its share as one weighted column sum of its rows, with the keys of steps later than
q − Δ zeroed first. Extra memory is O(heads × block × L) instead of the O(heads × L²) per layer
the official code materialises (spec §5.3), and the exponentials the output needs anyway are not
computed a second time: that reuse is what keeps FCI's time close to a plain forward.

Numerics, two paths (``precision``):

* ``fp32`` (CPU, fp32 models): Q, K and V in fp32, exp2 on log2-scaled scores (the same values as exp,
  and several times faster on CPU), outputs equal to SDPA's up to fp32 rounding; on CUDA the matmuls
  use TF32 where ``torch.backends.cuda.matmul.allow_tf32`` allows it;
* ``input`` (CUDA, bf16/fp16 models): the two matmuls take Q, K and V (and P for P·V) in the model's
  dtype on the tensor cores and write fp32 (``out_dtype``): scores, softmax, normaliser and FCI stay
  fp32, as FlashAttention keeps them. With fp32 inputs it computes what ``fp32`` does.

Block rows: small blocks keep a CPU's caches warm (``CPU_BLOCK_ROWS``); a GPU wants as few, large
matmuls as its memory allows (``block_rows``: the rows whose fp32 scores fit ``workspace_bytes``).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

from attnrl.steps import StepSegmentation

LOG2E = 1.0 / math.log(2.0)


class StepPlan:
    """Per-sequence token → step tables on one device, built once per forward."""

    def __init__(self, segmentation: StepSegmentation, delta: int, aggregation: str, device: torch.device) -> None:
        bounds = segmentation.boundaries
        sizes = torch.tensor([end - start for start, end in zip(bounds, bounds[1:])], dtype=torch.float32)
        steps = len(sizes)
        step_of_token = torch.repeat_interleave(torch.arange(steps), sizes.long())
        # A query token of step q counts keys of steps ≤ q − Δ, i.e. keys before the end of step q − Δ.
        step_ends = torch.tensor(bounds[1:], dtype=torch.long)
        cutoff = torch.where(step_of_token >= delta, step_ends[(step_of_token - delta).clamp(min=0)], 0)
        self.num_ranges = steps
        self.length = segmentation.length
        # Query rows of steps < Δ influence nothing (their cutoff is 0).
        self.first_row = bounds[delta] if delta < steps else self.length
        self.cutoff_cpu = cutoff  # block bounds are read on the host: no device sync per block
        self.cutoff = cutoff.to(device)
        self.step_of_token = step_of_token.to(device)
        self.row_weight = (1.0 / sizes)[step_of_token].to(device)
        self.key_weight = (1.0 / sizes if aggregation == "mean_mean" else torch.ones(steps)).to(device)
        self.positions = torch.arange(self.length, device=device)


Precision = Literal["fp32", "input"]
PRECISIONS: tuple[str, ...] = ("fp32", "input")
CPU_BLOCK_ROWS = 128  # query rows per block on CPU (benchmarks/fci.py)
GPU_WORKSPACE_BYTES = 1 << 30  # fp32 scores of one block on a GPU: 1 GiB


def block_rows(length: int, heads: int, workspace_bytes: int = GPU_WORKSPACE_BYTES, multiple: int = 64) -> int:
    """The most query rows (a multiple of ``multiple``, at least that) whose fp32 scores [heads, rows, length]
    fit ``workspace_bytes``: on a GPU, the fewer and larger the matmuls the better."""
    fits = workspace_bytes // (4 * heads * max(length, 1))
    return max(multiple, fits // multiple * multiple)


def default_precision(query: Tensor) -> Precision:
    """``input`` where tensor cores take the model's half-precision dtype (CUDA), else ``fp32``."""
    return "input" if query.is_cuda and query.dtype in (torch.bfloat16, torch.float16) else "fp32"


_MIXED_MATMUL: dict[str, bool] = {}  # device type -> whether torch.bmm takes out_dtype there


def _matmul_fp32(a: Tensor, b: Tensor, out: Tensor) -> Tensor:
    """a @ b written as fp32 into ``out``: fp32 inputs directly; half-precision inputs with fp32 accumulation and
    output where torch has it (``bmm(..., out_dtype=float32)``, CUDA), else upcast first (CPU kernels have none)."""
    if a.dtype == torch.float32:
        return torch.matmul(a, b, out=out)
    kind = a.device.type
    if mixed_matmul(kind):
        try:
            return torch.bmm(a, b, out_dtype=torch.float32, out=out)
        except (TypeError, NotImplementedError):  # a torch without the overload: upcast from now on
            _MIXED_MATMUL[kind] = False
    return torch.matmul(a.float(), b.float(), out=out)


def mixed_matmul(device_type: str) -> bool:
    """Whether half-precision matmuls on this device type write fp32 directly (False once the overload failed)."""
    return _MIXED_MATMUL.get(device_type, device_type == "cuda")


def attention_with_influence(
    query: Tensor, key: Tensor, value: Tensor, plan: StepPlan, scaling: float, block_size: int,
    precision: Precision = "fp32",
) -> tuple[Tensor, Tensor]:
    """Causal attention output [heads, n, d_v] (query's dtype) and per-head influence y [heads, S] (fp32).

    ``query[heads, n, d]``, ``key``/``value[kv_heads, n, d]`` of one sequence; grouped-query heads
    share their KV head (head h ↔ kv head h // groups) without repeating K or V. y equals
    forward_influence(step_attention(softmax(QKᵀ·scaling + causal))) scaled by the key weights.
    ``precision`` picks the matmuls' input dtype (module docstring); both keep the scores fp32.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    heads, length, dim = query.shape
    kv_heads = key.shape[0]
    groups = heads // kv_heads
    device = query.device
    mixed = precision == "input"
    compute = query.dtype if mixed else torch.float32
    key_t = key.to(compute).transpose(1, 2)  # [kv_heads, d, n]
    values = value.to(compute)
    out = torch.empty((heads, length, value.shape[-1]), dtype=torch.float32, device=device)
    y = torch.zeros((heads, plan.num_ranges), dtype=torch.float32, device=device)
    rows = min(block_size, length)
    # One buffer for all blocks: allocator churn from per-block sizes would otherwise add to the peak.
    workspace = torch.empty(heads * rows * length, dtype=torch.float32, device=device)
    above_diagonal = torch.ones((rows, rows), dtype=torch.bool, device=device).triu_(1)
    for r0 in range(0, length, block_size):
        r1 = min(r0 + block_size, length)
        m = r1 - r0
        target = workspace[: heads * m * r1].view(kv_heads, groups * m, r1)
        if mixed:  # the query as the model made it; the log2 scale goes onto the fp32 scores
            scores = _matmul_fp32(query[:, r0:r1].reshape(kv_heads, groups * m, dim), key_t[:, :, :r1], target)
        else:  # log2 domain: exp2(x·log2 e) = exp(x), so the scores are scaled once, on the small query block
            block = (query[:, r0:r1].float() * (scaling * LOG2E)).reshape(kv_heads, groups * m, dim)
            scores = torch.matmul(block, key_t[:, :, :r1], out=target)
        probs = scores.view(heads, m, r1)
        probs[:, :, r0:r1].masked_fill_(above_diagonal[:m, :m], float("-inf"))  # causal: only the diagonal tile
        probs.sub_(probs.amax(dim=-1, keepdim=True))
        if mixed:
            probs.mul_(scaling * LOG2E)
        probs.exp2_()  # unnormalised; in place, one buffer
        norm = probs.sum(dim=-1)  # [heads, m]
        if mixed:
            weighted = _matmul_fp32(scores.to(compute), values[:, :r1], torch.empty((kv_heads, groups * m, values.shape[-1]),
                                                                                 dtype=torch.float32, device=device))
        else:
            weighted = torch.matmul(scores, values[:, :r1])
        out[:, r0:r1] = weighted.view(heads, m, -1) / norm[..., None]
        if r1 > plan.first_row:
            _add_influence(y, probs, norm, r0, r1, plan)
    return out.to(query.dtype), y * plan.key_weight


def _add_influence(y: Tensor, probs: Tensor, norm: Tensor, r0: int, r1: int, plan: StepPlan) -> None:
    """Add rows r0..r1's weighted attention to y; zeroes the keys past each row's cutoff in ``probs``."""
    skip = max(r0, plan.first_row) - r0
    cutoff = plan.cutoff_cpu[r0 + skip:r1]
    widest, narrowest = int(cutoff.max()), int(cutoff.min())
    if widest == 0:
        return
    probs = probs[:, skip:, :widest]
    if widest > narrowest:
        # Only keys between the block's smallest and largest cutoff depend on the row.
        later = plan.positions[None, narrowest:widest] >= plan.cutoff[r0 + skip:r1, None]
        probs[:, :, narrowest:widest].masked_fill_(later, 0.0)
    weights = plan.row_weight[r0 + skip:r1] / norm[:, skip:]  # w_i / Z_i: normalises and weighs each row
    per_key = torch.bmm(weights[:, None, :], probs).squeeze(1)  # Σ_i w_i·A[i, j] → [heads, widest]
    y.index_add_(1, plan.step_of_token[:widest], per_key)
