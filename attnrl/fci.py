"""Forward Context Influence (FCI), spec §5.

Two layers:

* pure math on a full attention matrix (:func:`step_attention`, :func:`forward_influence`,
  :func:`mask_scores`): the definition of spec §5.2, used by the tests as the naive reference;
* :class:`FCICollector`: the same numbers computed *streaming* inside an ordinary forward pass
  (spec §5.1: no separate pass). It swaps in an attention function, registered through the
  transformers ``AttentionInterface``, that returns the model's normal attention output and, on
  the side, reduces each layer's attention probabilities to per-step scores in blocks of query
  rows. Extra memory is O(heads × block × L) instead of the O(heads × L²) per layer that the
  official code materialises (spec §5.3).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from types import TracebackType
from typing import Any, Literal

import torch
from torch import Tensor

from attnrl.steps import StepSegmentation

Aggregation = Literal["mean_mean", "mean_sum"]
AGGREGATIONS: tuple[str, ...] = ("mean_mean", "mean_sum")


# --------------------------------------------------------------------------- pure math (spec §5.2)


def _check_aggregation(aggregation: str) -> None:
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {aggregation!r}")


def step_attention(attn: Tensor, boundaries: Sequence[int], aggregation: Aggregation = "mean_mean") -> Tensor:
    """Step-to-step attention α[heads, S, S] from token attention ``attn[heads, L, L]`` (spec §5.2 step 1).

    α[q, k] averages over the query tokens of step q; over the key tokens of step k it averages
    (``"mean_mean"``, the official code) or sums (``"mean_sum"``, attention mass; AMBIG-5).
    ``boundaries`` are step boundaries in the coordinates of ``attn`` with ``boundaries[-1] == L``.
    """
    _check_aggregation(aggregation)
    if attn.shape[-1] != boundaries[-1] or attn.shape[-2] != boundaries[-1]:
        raise ValueError(f"attention is {tuple(attn.shape)} but the steps cover {boundaries[-1]} tokens")
    query_weights = _step_weights(boundaries, mean=True, like=attn)
    key_weights = _step_weights(boundaries, mean=aggregation == "mean_mean", like=attn)
    return query_weights @ attn @ key_weights.T


def _step_weights(boundaries: Sequence[int], *, mean: bool, like: Tensor) -> Tensor:
    """[S, L] matrix with 1/|step s| (or 1) on the tokens of step s."""
    weights = like.new_zeros((len(boundaries) - 1, boundaries[-1]))
    for s, (start, end) in enumerate(zip(boundaries, boundaries[1:])):
        weights[s, start:end] = 1.0 / (end - start) if mean else 1.0
    return weights


def forward_influence(alpha: Tensor, delta: int) -> Tensor:
    """Per-head forward influence y[heads, S]: y_k = Σ_{q ≥ k+Δ} α[q, k], NaN counted as 0 (spec §5.2 step 2)."""
    steps = alpha.shape[-1]
    index = torch.arange(steps, device=alpha.device)
    later = index[:, None] >= index[None, :] + delta  # [q, k]
    return torch.where(later, torch.nan_to_num(alpha, nan=0.0), 0.0).sum(dim=-2)


def mask_scores(y: Tensor, think_step: int, mask_first_step: bool, mask_after_think: bool) -> Tensor:
    """Zero the steps that may not branch (spec §5.2 step 3, AMBIG-4); returns a new tensor.

    The prompt (step 0) always; the first response step if ``mask_first_step``; the ``</think>``
    step and everything after it if ``mask_after_think`` and ``think_step > 0``.
    """
    y = y.clone()
    y[..., 0] = 0.0
    if mask_first_step and y.shape[-1] > 1:
        y[..., 1] = 0.0
    if mask_after_think and think_step > 0:
        y[..., think_step:] = 0.0
    return y


# --------------------------------------------------------------------------- streaming reduction


class _Plan:
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
        # Query rows of steps < Δ influence nothing, so blocks start at step Δ (often skipping the prompt).
        self.first_row = bounds[delta] if delta < steps else self.length
        self.step_of_token = step_of_token.to(device)
        self.cutoff = cutoff.to(device)
        self.row_weight = (1.0 / sizes)[step_of_token].to(device)
        self.key_weight = (1.0 / sizes if aggregation == "mean_mean" else torch.ones(steps)).to(device)


def _sequence_influence(query: Tensor, key: Tensor, plan: _Plan, scaling: float, block_size: int) -> Tensor:
    """Per-head y[heads, S] of one layer for one unpadded sequence (``query[heads, n, d]``, ``key[kv_heads, n, d]``).

    Equals forward_influence(step_attention(softmax(QKᵀ·scaling + causal))) but never holds more
    than ``block_size`` query rows of attention: y is linear in the attention rows, so each block
    of rows adds its share directly, weighted by 1/|S_q| and cut at the end of step q − Δ.
    """
    heads, length, dim = query.shape
    kv_heads = key.shape[0]
    groups = heads // kv_heads
    y = torch.zeros((heads, plan.num_ranges), dtype=torch.float32, device=query.device)
    if plan.first_row >= length:
        return y
    # fp32 like the spec's softmax; the official code also upcasts before reducing.
    key32 = key.float().transpose(1, 2)  # [kv_heads, d, n]
    positions = torch.arange(length, device=query.device)
    # One score buffer for all blocks: allocator churn from per-block sizes would otherwise add to the peak.
    workspace = torch.empty(heads * min(block_size, length - plan.first_row) * length, device=query.device)
    for r0 in range(plan.first_row, length, block_size):
        r1 = min(r0 + block_size, length)
        rows = r1 - r0
        # GQA without repeating K: query heads of one KV group share a matmul (head h ↔ kv head h // groups).
        block = query[:, r0:r1].float().reshape(kv_heads, groups * rows, dim)
        scores = workspace[: heads * rows * r1].view(kv_heads, groups * rows, r1)
        probs = torch.matmul(block, key32[:, :, :r1], out=scores).view(heads, rows, r1)
        probs.mul_(scaling)
        probs.masked_fill_(positions[None, :r1] > positions[r0:r1, None], float("-inf"))
        # In-place softmax: one [heads, rows, r1] buffer instead of two.
        probs.sub_(probs.amax(dim=-1, keepdim=True)).exp_()
        probs.div_(probs.sum(dim=-1, keepdim=True))
        probs.masked_fill_(positions[None, :r1] >= plan.cutoff[r0:r1, None], 0.0)
        per_key = torch.matmul(plan.row_weight[r0:r1], probs)  # Σ over rows of w_i·A[i, j] → [heads, r1]
        y.index_add_(1, plan.step_of_token[:r1], per_key)
        del probs, scores, block, per_key
    return y * plan.key_weight


# --------------------------------------------------------------------------- the collector

_IMPLEMENTATION_PREFIX = "attnrl_fci_"
# Module id → active collector. The registered attention function is global, so it finds the
# collector of the model that is calling it here; unrelated models fall through untouched.
_ACTIVE: dict[int, FCICollector] = {}


def _inner_attention(implementation: str, module: torch.nn.Module) -> Callable[..., Any]:
    """The function that computes the real attention output: SDPA, or the model file's own eager."""
    from transformers import AttentionInterface

    functions = AttentionInterface()
    if implementation == "eager":
        eager = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
        if eager is not None:
            return eager
    return functions["sdpa"]


def _register(original: str) -> str:
    """Register (idempotently) the FCI wrapper for a model currently using ``original``; returns its name.

    An eager model stays eager (bit-identical outputs); anything else runs on SDPA. Flash kernels
    are not wrapped because transformers keys flash-specific behaviour on the substring "flash"
    in the implementation name and would try to load a kernel called after the wrapper.
    """
    from transformers import AttentionInterface, AttentionMaskInterface

    implementation = "eager" if original == "eager" else "sdpa"
    # The name keeps "sdpa" as a substring on purpose: transformers runs its SDPA checks on it.
    name = _IMPLEMENTATION_PREFIX + implementation

    def attention(module: torch.nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Any, **kwargs):
        output = _inner_attention(implementation, module)(module, query, key, value, attention_mask, **kwargs)
        collector = _ACTIVE.get(id(module))
        if collector is not None:
            collector._observe(module, query, key, attention_mask, kwargs.get("scaling"))
        return output

    AttentionInterface.register(name, attention)
    # Without a mask function under the same name, transformers builds NO mask at all for an
    # unknown implementation (it assumes an external backend): padding would silently leak in.
    AttentionMaskInterface.register(name, AttentionMaskInterface()[implementation])
    return name


class FCICollector:
    """Collect FCI scores (spec §5.2) during one ordinary forward of a Hugging Face causal LM.

    Usage::

        with FCICollector(model, segmentations, delta=4, aggregation="mean_mean") as collector:
            out = model(input_ids=ids, attention_mask=mask)
        fci = collector.scores(mask_first_step=True, mask_after_think=True)

    ``segmentations[i]`` describes row i of the batch in unpadded coordinates; rows must be
    LEFT-padded to a common length. Inside the block the model computes its attention output
    with SDPA (with its own eager function if it was eager), so outputs are unchanged; its
    attention implementation is restored on exit, also after an error.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        segmentations: Sequence[StepSegmentation],
        *,
        delta: int = 4,
        aggregation: Aggregation = "mean_mean",
        block_size: int = 256,
    ) -> None:
        _check_aggregation(aggregation)
        if delta < 1:
            raise ValueError(f"delta must be at least 1, got {delta}")
        if block_size < 1:
            raise ValueError(f"block_size must be at least 1, got {block_size}")
        if not segmentations:
            raise ValueError("need at least one segmentation")
        self.model = model
        self.segmentations = list(segmentations)
        self.delta = delta
        self.aggregation = aggregation
        self.block_size = block_size
        self._original: str | None = None
        self._plans: list[_Plan] | None = None
        self._max: list[Tensor | None] = [None] * len(self.segmentations)
        self._seen: set[int] = set()

    # -- context management

    def __enter__(self) -> FCICollector:
        config = self.model.config
        original = config._attn_implementation
        if original.startswith(_IMPLEMENTATION_PREFIX):
            raise RuntimeError("this model is already inside an FCICollector")
        name = _register(original)
        self.model.set_attn_implementation(name)
        if config._attn_implementation != name:
            # set_attn_implementation only logs a warning when a model cannot switch at runtime.
            raise RuntimeError(f"{type(self.model).__name__} cannot switch its attention implementation at runtime")
        self._original = original
        for module in self.model.modules():
            _ACTIVE[id(module)] = self
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        for module in self.model.modules():
            if _ACTIVE.get(id(module)) is self:
                del _ACTIVE[id(module)]
        if self._original is not None:
            self.model.set_attn_implementation(self._original)
            self._original = None

    # -- called from the attention function, once per layer

    def _observe(self, module: torch.nn.Module, query: Tensor, key: Tensor, mask: Any, scaling: float | None) -> None:
        if id(module) in self._seen:
            raise RuntimeError("an FCICollector covers exactly one forward pass; use a new one per forward")
        self._seen.add(id(module))
        batch, heads, length, dim = query.shape
        if batch != len(self.segmentations):
            raise ValueError(f"batch has {batch} rows but {len(self.segmentations)} segmentations were given")
        if key.shape[2] != length:
            raise ValueError("FCI needs a full-sequence forward (no cached prefix): query and key lengths differ")
        if heads % key.shape[1]:
            raise ValueError(f"{heads} query heads are not a multiple of {key.shape[1]} key/value heads")
        pads = [length - seg.length for seg in self.segmentations]
        if self._plans is None:
            # Every layer gets the same mask, so checking the first one is enough (and avoids a sync per layer).
            _check_left_padding(mask, pads, length)
            self._plans = [_Plan(seg, self.delta, self.aggregation, query.device) for seg in self.segmentations]
        scale = float(scaling) if scaling is not None else dim**-0.5
        with torch.no_grad():
            for row, (plan, pad) in enumerate(zip(self._plans, pads)):
                y = _sequence_influence(query[row, :, pad:], key[row, :, pad:], plan, scale, self.block_size)
                best = y.amax(dim=0)
                previous = self._max[row]
                self._max[row] = best if previous is None else torch.maximum(previous, best)

    # -- results

    @property
    def layers_seen(self) -> int:
        """Attention layers that went through the collector so far."""
        return len(self._seen)

    def scores(self, *, mask_first_step: bool = True, mask_after_think: bool = True) -> list[Tensor]:
        """FCI per sequence, ``Tensor[S_i]`` (index 0 = prompt): max over layers and heads, then masked (spec §5.2)."""
        if not self._seen:
            raise RuntimeError("no attention layer ran inside the collector: run the model's forward in the with-block")
        out = []
        for segmentation, best in zip(self.segmentations, self._max):
            assert best is not None
            out.append(mask_scores(best, segmentation.think_step, mask_first_step, mask_after_think))
        return out


def _check_left_padding(mask: Any, pads: Sequence[int], length: int) -> None:
    """Fail loudly when the batch is not left-padded as the segmentations imply (else FCI is silently wrong)."""
    if any(pad < 0 for pad in pads):
        raise ValueError(f"a segmentation is longer than the batch ({length} tokens): {pads}")
    if mask is None:
        if any(pads):
            raise ValueError("rows are shorter than the batch but the model got no attention mask")
        return
    if not isinstance(mask, Tensor) or mask.dim() not in (2, 4):
        return  # e.g. a flex-attention BlockMask: nothing cheap to check
    positions = torch.arange(length, device=mask.device)
    for row, pad in enumerate(pads):
        if mask.dim() == 4:
            last = mask[row if mask.shape[0] > 1 else 0, 0, -1, -length:]
            valid = last if last.dtype == torch.bool else last == 0
        else:
            valid = mask[row, -length:].bool()
        if not torch.equal(valid, positions >= pad):
            raise ValueError(
                f"row {row}: the attention mask does not match {pad} tokens of LEFT padding implied by its segmentation"
            )
