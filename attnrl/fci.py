"""Forward Context Influence (FCI), spec §5.

Two layers:

* pure math on a full attention matrix (:func:`step_attention`, :func:`forward_influence`,
  :func:`mask_scores`): the definition of spec §5.2, used by the tests as the naive reference;
* :class:`FCICollector`: the same numbers computed *streaming* inside an ordinary forward pass
  (spec §5.1: no separate pass). It swaps in an attention function, registered through the
  transformers ``AttentionInterface``, that computes each layer's attention output and, from the
  same probabilities, per-step scores, in blocks of query rows (``attnrl.fci_kernel``). Extra
  memory is O(heads × block × L) instead of the O(heads × L²) per layer that the official code
  materialises (spec §5.3). Left-padded and padding-free (packed) batches are both accepted.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from types import TracebackType
from typing import Any, Literal

import torch
from torch import Tensor

from attnrl.fci_kernel import (
    CPU_BLOCK_ROWS,
    PRECISIONS,
    Precision,
    StepPlan,
    attention_with_influence,
    block_rows,
    default_precision,
)
from attnrl.model.attention_swap import AttentionSwap
from attnrl.steps import StepSegmentation
from attnrl.training.sequences import Span

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


# --------------------------------------------------------------------------- the collector

_IMPLEMENTATION_PREFIX = "attnrl_fci_"
# Module id → active collector. The registered attention function is global, so it finds the
# collector of the model that is calling it here.
_ACTIVE: dict[int, FCICollector] = {}


class _Layout:
    """What the collector's mask function hands each layer instead of a [rows, 1, L, L] mask.

    The fused attention needs only where each sequence lies (the spans); the padding mask and the
    mask function transformers built are kept to check that the batch really is laid out that way.
    """

    def __init__(self, padding: Tensor | None, mask_function: Callable[..., Any] | None) -> None:
        self.padding = padding
        self.mask_function = mask_function


def _layout_mask(**kwargs: Any) -> _Layout:
    return _Layout(kwargs.get("attention_mask"), kwargs.get("mask_function"))


def _register(original: str) -> str:
    """Register (idempotently) the FCI attention for a model currently using ``original``; returns its name.

    The name keeps "eager" or "sdpa" as a substring because transformers runs its implementation
    checks on it. Flash kernels are not named because transformers keys flash-specific behaviour on
    the substring "flash" and would try to load a kernel called after the wrapper.
    """
    from transformers import AttentionInterface, AttentionMaskInterface

    name = _IMPLEMENTATION_PREFIX + ("eager" if original == "eager" else "sdpa")

    def attention(module: torch.nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Any, **kwargs):
        collector = _ACTIVE.get(id(module))
        if collector is None:
            raise RuntimeError(f"{name} is the attention of a model inside an FCICollector; this one is not")
        return collector._attend(module, query, key, value, attention_mask, kwargs), None

    AttentionInterface.register(name, attention)
    # Without a mask function under the same name, transformers builds no mask and checks nothing;
    # this one builds no [L, L] mask either, only hands over what the layout check needs.
    AttentionMaskInterface.register(name, _layout_mask)
    return name


class FCICollector:
    """Collect FCI scores (spec §5.2) during one ordinary no-grad forward of a Hugging Face causal LM.

    Usage::

        with FCICollector(model, segmentations, delta=4, aggregation="mean_mean") as collector:
            out = model(input_ids=ids, attention_mask=mask)
        fci = collector.scores(mask_first_step=True, mask_after_think=True)

    ``segmentations[i]`` describes sequence i in its own (unpadded) coordinates; ``spans[i]``
    (``sequences.Span``: row, start, length) says where it lies in the batch. Without spans, rows
    are LEFT-padded, one sequence per row. Padding-free batches (several spans in a row, position
    ids restarting at each) are supported. Inside the block every attention layer runs the fused
    kernel of ``attnrl.fci_kernel`` on each span: its output equals the model's own attention up to
    fp32 rounding, and its buffers are O(heads × block × L). ``block_size`` and ``precision`` default
    to the device's (small fp32 blocks on CPU; on CUDA the largest blocks a 1 GiB workspace holds, and
    half-precision matmuls with fp32 scores for a bf16/fp16 model). The model's attention implementation is
    restored on exit, also after an error.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        segmentations: Sequence[StepSegmentation],
        *,
        delta: int = 4,
        aggregation: Aggregation = "mean_mean",
        block_size: int | None = None,
        spans: Sequence[Span] | None = None,
        precision: Precision | None = None,
    ) -> None:
        _check_aggregation(aggregation)
        if delta < 1:
            raise ValueError(f"delta must be at least 1, got {delta}")
        if block_size is not None and block_size < 1:
            raise ValueError(f"block_size must be at least 1, got {block_size}")
        if precision is not None and precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        if not segmentations:
            raise ValueError("need at least one segmentation")
        if spans is not None:
            if len(spans) != len(segmentations):
                raise ValueError(f"{len(spans)} spans for {len(segmentations)} segmentations")
            for i, (span, seg) in enumerate(zip(spans, segmentations)):
                if span.length != seg.length:
                    raise ValueError(f"span {i} covers {span.length} tokens but its segmentation {seg.length}")
        self.model = model
        self.segmentations = list(segmentations)
        self.spans = None if spans is None else list(spans)
        self.delta = delta
        self.aggregation = aggregation
        self.block_size = block_size  # None: per device (fci_kernel.CPU_BLOCK_ROWS, or block_rows on a GPU)
        self.precision = precision  # None: per device and dtype (fci_kernel.default_precision)
        self._swap: AttentionSwap | None = None
        self._plans: list[StepPlan] | None = None
        self._max: list[Tensor | None] = [None] * len(self.segmentations)
        self._seen: set[int] = set()

    # -- context management

    def __enter__(self) -> FCICollector:
        original = self.model.config._attn_implementation
        if original.startswith(_IMPLEMENTATION_PREFIX):
            raise RuntimeError("this model is already inside an FCICollector")
        self._swap = AttentionSwap(self.model, _register(original), _ACTIVE, self)
        self._swap.enter()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        if self._swap is not None:
            self._swap.exit()
            self._swap = None

    # -- called from the attention function, once per layer

    def _attend(
        self, module: torch.nn.Module, query: Tensor, key: Tensor, value: Tensor, layout: Any, kwargs: dict[str, Any]
    ) -> Tensor:
        if id(module) in self._seen:
            raise RuntimeError("an FCICollector covers exactly one forward pass; use a new one per forward")
        self._seen.add(id(module))
        _check_plain_causal(module, query, kwargs)
        batch, heads, length, dim = query.shape
        if key.shape[2] != length:
            raise ValueError("FCI needs a full-sequence forward (no cached prefix): query and key lengths differ")
        if heads % key.shape[1]:
            raise ValueError(f"{heads} query heads are not a multiple of {key.shape[1]} key/value heads")
        if self._plans is None:
            if self.spans is None:
                if batch != len(self.segmentations):
                    raise ValueError(f"batch has {batch} rows but {len(self.segmentations)} segmentations were given")
                self.spans = [Span(row, length - seg.length, seg.length) for row, seg in enumerate(self.segmentations)]
            # Every layer gets the same layout, so checking the first one is enough.
            _check_layout(layout, self.spans, batch, length)
            self._plans = [StepPlan(seg, self.delta, self.aggregation, query.device) for seg in self.segmentations]
        scale = float(kwargs["scaling"]) if kwargs.get("scaling") is not None else dim**-0.5
        # transformers' layout for attention outputs: [batch, length, heads, head_dim]. Positions outside
        # every span (padding) get zeros; nothing valid attends to them.
        out = query.new_zeros((batch, length, heads, value.shape[-1]))
        precision = self.precision or default_precision(query)
        with torch.no_grad():
            for row, (plan, span) in enumerate(zip(self._plans, self.spans)):
                a, b = span.start, span.start + span.length
                part = (span.row, slice(None), slice(a, b))
                rows = self.block_size or (block_rows(span.length, heads) if query.is_cuda else CPU_BLOCK_ROWS)
                o, y = attention_with_influence(query[part], key[part], value[part], plan, scale, rows, precision)
                out[span.row, a:b] = o.transpose(0, 1)
                best = y.amax(dim=0)
                previous = self._max[row]
                self._max[row] = best if previous is None else torch.maximum(previous, best)
        return out

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


def _check_plain_causal(module: torch.nn.Module, query: Tensor, kwargs: dict[str, Any]) -> None:
    """The fused kernel is plain causal softmax attention; refuse layers that are anything else."""
    if torch.is_grad_enabled() and query.requires_grad:
        raise RuntimeError("FCI is collected in a no-grad forward (the scoring pass, spec §5.1)")
    if not getattr(module, "is_causal", True):
        raise ValueError(f"{type(module).__name__} is not causal")
    for name in ("sliding_window", "softcap", "s_aux"):
        if kwargs.get(name) is not None:
            raise ValueError(f"FCI's attention kernel does not implement {name} (layer {type(module).__name__})")
    if kwargs.get("dropout"):
        raise ValueError("FCI needs an eval-mode forward: attention dropout is active")


def _check_layout(layout: Any, spans: Sequence[Span], batch: int, length: int) -> None:
    """Fail loudly when the batch is not laid out as the spans say (FCI and outputs would be silently wrong)."""
    if any(span.start < 0 or span.start + span.length > length or not 0 <= span.row < batch for span in spans):
        raise ValueError(f"a segmentation does not fit the batch ({batch} rows of {length} tokens)")
    if not isinstance(layout, _Layout):
        raise ValueError("the attention got no layout from the FCI mask function (a prepared 4D mask was passed?)")
    valid = torch.zeros((batch, length), dtype=torch.bool)
    for span in spans:
        valid[span.row, span.start:span.start + span.length] = True
    if layout.padding is not None:
        if not torch.equal(layout.padding.bool().cpu()[:, -length:], valid):
            raise ValueError("the attention mask does not match the spans (LEFT padding by default, one row each)")
    elif not bool(valid.all()):
        raise ValueError("rows are shorter than the batch but the model got no attention mask")
    rows_with_several = {span.row for span in spans if sum(s.row == span.row for s in spans) > 1}
    if not rows_with_several:
        return
    # Padding-free rows: transformers must have seen the restarting position ids, or every sequence
    # would attend to the ones before it.
    function = layout.mask_function
    if function is None:
        raise ValueError("packed sequences but no mask function: position ids must restart at each sequence")
    def attends(row: int, query: int, key: int) -> bool:
        index = [torch.tensor(i) for i in (row, 0, query, key)]  # transformers' mask functions take tensors
        return bool(function(*index))

    for span in spans:
        if span.row in rows_with_several and span.start > 0:
            last = span.start + span.length - 1
            if attends(span.row, last, span.start - 1) or not attends(span.row, last, span.start):
                raise ValueError(
                    f"packed sequence at row {span.row}, column {span.start}: the attention does not keep it apart "
                    "from the one before (position ids must restart at 0 for every sequence)"
                )
