"""Branch-point selection for one initial response (spec §6, §6.6, §13).

A selector looks at one response (its steps, their FCI scores or its token entropies) and returns
the token offsets *within the response* where Monte-Carlo continuations start. The prefix of a
continuation is ``response[:offset]``, so the token (or step) at ``offset`` is itself re-sampled
(spec §6.4). Every returned offset satisfies ``0 < offset < response_len``.

Selectors, keyed by ``AlgorithmConfig.branching``:

* ``fci``: AttnRL's ATB (spec §6.1–§6.3): the earliest high-FCI steps, with the code-only position
  and spacing rules and the step fallbacks.
* ``entropy``: the TreeRL baseline in the AttnRL codebase (spec §6.6, §13.2): top-N entropy tokens.
* ``random``: an ablation, N random step starts.
* ``none``: GRPO (spec §13.1), no branching.

Resolved ambiguities (spec §16):

* AMBIG-3: the threshold is the ``quantile`` (0.8) quantile of the FCI over *all* response steps,
  forced zeros included, and candidates are walked in position order, not score order.
* AMBIG-14(e): the official fallback loops forever when the response has no step after the first
  one. Here the duplicate-allowing fallback only runs when such a step exists; otherwise the
  selector returns what it has, which for a one-step response is ``[]`` (the response is then not
  branched). Callers must accept fewer than N offsets, and duplicate offsets from that fallback.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from attnrl.utils.registry import lookup


@dataclass(frozen=True)
class ResponseView:
    """What a selector may know about one response (spec §4 steps, §5.2 FCI, §6.6 entropy).

    Offsets are token offsets within the response (0 = first response token). Steps tile the
    response: step ``i`` covers ``[step_offsets[i], step_ends[i])`` and the first step starts at 0.
    """

    prompt_len: int
    response_len: int
    step_offsets: tuple[int, ...]
    step_ends: tuple[int, ...]
    fci: tuple[float, ...] | None = None
    entropies: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        if self.prompt_len < 0 or self.response_len < 0:
            raise ValueError(f"prompt_len and response_len must be >= 0, got {self.prompt_len}, {self.response_len}")
        _check_steps(self.step_offsets, self.step_ends, self.response_len)
        if self.fci is not None:
            if len(self.fci) != len(self.step_offsets):
                raise ValueError(f"fci has {len(self.fci)} values for {len(self.step_offsets)} response steps")
            if not all(math.isfinite(v) for v in self.fci):
                raise ValueError("fci values must be finite")
        if self.entropies is not None and len(self.entropies) != self.response_len:
            raise ValueError(f"entropies has {len(self.entropies)} values for {self.response_len} response tokens")

    @property
    def num_steps(self) -> int:
        return len(self.step_offsets)


def _check_steps(offsets: Sequence[int], ends: Sequence[int], response_len: int) -> None:
    if len(offsets) != len(ends):
        raise ValueError(f"{len(offsets)} step offsets but {len(ends)} step ends")
    if offsets and offsets[0] != 0:
        raise ValueError(f"the first response step must start at offset 0, got {offsets[0]}")
    for i, (start, end) in enumerate(zip(offsets, ends, strict=True)):
        if not start < end <= response_len:
            raise ValueError(f"step {i}: [{start}, {end}) is empty or outside a response of {response_len} tokens")
        if i and start < ends[i - 1]:
            raise ValueError(f"step {i} starts at {start}, before step {i - 1} ends at {ends[i - 1]}")


@dataclass(frozen=True)
class BranchSettings:
    """Selector parameters (spec §6.2, §12): N points, FCI quantile, position and spacing rules."""

    num_points: int
    quantile: float = 0.8
    min_position: int = 512
    min_spacing: int = 512

    def __post_init__(self) -> None:
        if self.num_points < 0:
            raise ValueError(f"num_points must be >= 0, got {self.num_points}")
        if not 0.0 <= self.quantile <= 1.0:
            raise ValueError(f"quantile must be in [0, 1], got {self.quantile}")
        if self.min_position < 0 or self.min_spacing < 0:
            raise ValueError("min_position and min_spacing must be >= 0")

    @classmethod
    def from_config(cls, algorithm: Any) -> BranchSettings:
        """Settings from an ``AlgorithmConfig`` (duck-typed to keep this module config-free)."""
        return cls(
            num_points=algorithm.num_branch_points,
            quantile=algorithm.fci_quantile,
            min_position=algorithm.min_branch_position,
            min_spacing=algorithm.min_branch_spacing,
        )


BranchSelector = Callable[[ResponseView, BranchSettings, random.Random], list[int]]


# --- fci (ATB) --------------------------------------------------------------------------------


def fci_threshold(fci: Sequence[float], quantile: float) -> float:
    """τ of spec §6.1: the quantile with torch's linear interpolation, lifted off zero.

    When most steps are zero (the first step and the post-``</think>`` part are forced to zero,
    spec §5.2) the quantile can be 0, which would make every step a candidate; the code then uses
    the smallest positive score instead, so only scored steps qualify.
    """
    # float64: the scores arrive as Python floats; keep their value exactly through the quantile.
    tau = float(torch.quantile(torch.tensor(list(fci), dtype=torch.float64), quantile).item())
    if tau == 0.0:
        positive = [v for v in fci if v > 0.0]
        if positive:
            tau = min(positive)
    return tau


def fci_candidates(view: ResponseView, quantile: float) -> list[int]:
    """Step indices with FCI ≥ τ in ascending order, the first response step excluded (spec §6.1)."""
    if view.fci is None:
        raise ValueError("the 'fci' selector needs view.fci (FCI per response step), but it is None")
    if not view.fci:
        return []
    tau = fci_threshold(view.fci, quantile)
    return [k for k in range(1, view.num_steps) if view.fci[k] >= tau]


def _far_enough(view: ResponseView, k: int, accepted: Sequence[int], min_spacing: int) -> bool:
    """Gap = start of the later step minus end of the earlier one, against every accepted step."""
    for j in accepted:
        early, late = (j, k) if j < k else (k, j)
        if view.step_offsets[late] - view.step_ends[early] < min_spacing:
            return False
    return True


def _accept_earliest(view: ResponseView, candidates: Sequence[int], settings: BranchSettings) -> list[int]:
    """Spec §6.2: walk candidates earliest first, keep those passing position and spacing."""
    accepted: list[int] = []
    for k in candidates:
        if len(accepted) >= settings.num_points:
            break
        if view.prompt_len + view.step_offsets[k] < settings.min_position:
            continue
        if _far_enough(view, k, accepted, settings.min_spacing):
            accepted.append(k)
    return accepted


def _fill_from_steps(view: ResponseView, offsets: list[int], n: int) -> list[int]:
    """Spec §6.3 fallbacks: steps 2, 3, … without duplicates, then cycling with duplicates.

    AMBIG-14(e): with no step after the first there is nothing to cycle over, so stop short
    instead of looping forever.
    """
    later_starts = list(view.step_offsets[1:])
    for start in later_starts:
        if len(offsets) >= n:
            return offsets
        if start not in offsets:
            offsets.append(start)
    if not later_starts:
        return offsets
    i = 0
    while len(offsets) < n:
        offsets.append(later_starts[i % len(later_starts)])
        i += 1
    return offsets


def select_fci(view: ResponseView, settings: BranchSettings, rng: random.Random) -> list[int]:
    """AttnRL ATB (spec §6.1–§6.3): earliest high-FCI steps, then step fallbacks. ``rng`` unused."""
    del rng  # deterministic; the code's `shuffle` option is off (spec §6.1)
    if settings.num_points == 0 or view.num_steps == 0:
        return []
    accepted = _accept_earliest(view, fci_candidates(view, settings.quantile), settings)
    offsets = [view.step_offsets[k] for k in accepted]
    return sorted(_fill_from_steps(view, offsets, settings.num_points))


# --- entropy (TreeRL baseline) -----------------------------------------------------------------


def select_entropy(view: ResponseView, settings: BranchSettings, rng: random.Random) -> list[int]:
    """TreeRL baseline (spec §6.6): the N highest-entropy token offsets.

    The last token is excluded (as in the code: re-sampling EOS is no branch) and so is offset 0
    (an empty prefix would just be another initial sample). Ties go to the earlier token so the
    result does not depend on sort stability. Fewer than N offsets come back when the response
    has fewer than N + 2 tokens. No step, think-boundary or distance rule applies.
    """
    del rng
    if view.entropies is None:
        raise ValueError("the 'entropy' selector needs view.entropies (per-token entropy), but it is None")
    positions = range(1, view.response_len - 1)
    ranked = sorted(positions, key=lambda t: (-view.entropies[t], t))
    return sorted(ranked[: settings.num_points])


# --- random and none ---------------------------------------------------------------------------


def select_random(view: ResponseView, settings: BranchSettings, rng: random.Random) -> list[int]:
    """Ablation: N distinct random step starts (first step excluded), drawn from ``rng``.

    With fewer later steps than N, all of them are used and the rest are distinct random token
    offsets in (0, R). No position or spacing rule applies.
    """
    n = settings.num_points
    starts = list(view.step_offsets[1:])
    if len(starts) >= n:
        return sorted(rng.sample(starts, n))
    taken = set(starts)
    pool = [t for t in range(1, view.response_len) if t not in taken]
    extra = rng.sample(pool, min(n - len(starts), len(pool)))
    return sorted(starts + extra)


def select_none(view: ResponseView, settings: BranchSettings, rng: random.Random) -> list[int]:
    """GRPO (spec §13.1): outcome supervision only, never branch."""
    return []


BRANCH_SELECTORS: dict[str, BranchSelector] = {
    "fci": select_fci,
    "entropy": select_entropy,
    "random": select_random,
    "none": select_none,
}


def get_branch_selector(name: str) -> BranchSelector:
    """The selector registered under ``name`` (``AlgorithmConfig.branching``)."""
    return lookup(BRANCH_SELECTORS, name, "branch selector")
