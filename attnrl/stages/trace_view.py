"""HTML for ``method_trace``: a response's steps shaded by FCI with the branch points of both criteria
marked, and its tree (segments, continuations, Monte-Carlo values, advantages, rewards) as inline SVG.

What each trace shows is computed here (shades, the tree's layout); ``templates/traces.html`` marks it up.
Static markup, no script: the report is read offline.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from attnrl.stages.method_trace import ProblemTrace, SegmentTrace
from attnrl.stages.rendering import render

MARKS = {"fci": ("◆", "FCI (ATB) branch point"), "entropy": ("▲", "entropy (TreeRL) branch point")}
BOX_W, BOX_H, COL_W, ROW_H, PAD = 180, 46, 210, 62, 10
SNIPPET = 22

STYLE = """
.trace{border:1px solid #ddd;border-radius:6px;padding:0.6em 1em;margin:1em 0}
.steps{font-family:monospace;margin:0.5em 0}
.step{display:flex;gap:1em;align-items:baseline;padding:2px 6px;border-bottom:1px solid #eee}
.step .n{color:#888;width:2em}.step .t{flex:1;white-space:pre-wrap}.step .s{color:#555;font-size:90%;width:16em}
.steps.inline{white-space:pre-wrap;line-height:1.6}.steps.inline .tok{padding:1px 0}
.mark{font-weight:bold;padding:0 2px}.mark.fci{color:#b00}.mark.entropy{color:#06c}
svg.tree text{font-family:monospace;font-size:11px}
table.segments td:nth-child(2),table.segments th:nth-child(2){text-align:left;font-family:monospace}
"""


def traces_html(traces: Sequence[ProblemTrace]) -> str:
    """The section's HTML (``templates/traces.html``) over what each trace shows."""
    return render("traces.html", traces=[_view(t) for t in traces], marks=MARKS, box_w=BOX_W, box_h=BOX_H)


def _view(trace: ProblemTrace) -> dict[str, Any]:
    agree = len({trace.step_of(o) for o in trace.fci_offsets} & {trace.step_of(o) for o in trace.entropy_offsets})
    return {
        "trace": trace,
        "samples": "".join("✓" if r == 1.0 else "✗" for r in trace.rewards),
        "agree": agree,
        # A response without any line break, whose steps are single tokens (spec §4's last fallback), runs inline.
        "inline": len(trace.steps) > 1 and all(step.end - step.start == 1 for step in trace.steps),
        "steps": _steps(trace),
        "tree": _tree(trace),
        "segments": [{"node": t.node, "text": _one_line(t.text)} for t in trace.segments],
    }


def _steps(trace: ProblemTrace) -> list[dict[str, Any]]:
    """Each step with its shade (its FCI against the response's highest) and its scores."""
    top = max((s.fci for s in trace.steps), default=0.0)
    return [{"step": step, "shade": f"{0.75 * (step.fci / top if top > 0 else 0.0):.2f}",
             "scores": f"FCI {step.fci:.3f} · entropy {step.entropy:.2f}"} for step in trace.steps]


def _layout(segments: Sequence[SegmentTrace]) -> list[tuple[int, int]]:
    """(column, row) per segment: the response's chain along row 0, each continuation below the chain
    segment after its branch point, stacked in rows; column 0 is the question root."""
    places: list[tuple[int, int]] = []
    rows_used: dict[int, int] = {}
    for segment in (s.node for s in segments):
        column = 1 if segment.parent is None else places[segment.parent][0] + 1
        if segment.continuation:
            rows_used[column] = rows_used.get(column, 0) + 1
            places.append((column, rows_used[column]))
        else:
            places.append((column, 0))
    return places


def _tree(trace: ProblemTrace) -> dict[str, Any] | None:
    """The tree's geometry: the SVG's size, a box per node (the question's first) and a curve to each from its
    parent; None without segments."""
    segments = trace.segments
    if not segments:
        return None
    places = _layout(segments)

    def anchor(column: int, row: int) -> tuple[int, int]:
        return PAD + column * COL_W, PAD + row * ROW_H

    boxes = [_box(*anchor(0, 0), "#eee", "question", f"V(root) {trace.root_value:.2f}")]
    paths = []
    for traced, (column, row) in zip(segments, places, strict=True):
        segment = traced.node
        x, y = anchor(column, row)
        px, py = anchor(*(places[segment.parent] if segment.parent is not None else (0, 0)))
        paths.append(f"M{px + BOX_W},{py + BOX_H // 2} C{x - 15},{py + BOX_H // 2} {px + BOX_W + 15},"
                     f"{y + BOX_H // 2} {x},{y + BOX_H // 2}")
        colour = "#d8f0d8" if segment.advantage > 0 else "#f6d6d6" if segment.advantage < 0 else "#eee"
        reward = "" if segment.reward is None else f"  r={segment.reward:.0f}"
        snippet = _one_line(traced.text)
        snippet = snippet if len(snippet) <= SNIPPET else snippet[: SNIPPET - 1] + "…"
        kind = "continuation" if segment.continuation else "segment"
        boxes.append(_box(x, y, colour, f"V {segment.value:.2f}  A {segment.advantage:+.2f}{reward}", snippet,
                          title=f"{kind} tokens {segment.start}-{segment.end}, {segment.leaves} leaves"))
    return {"width": (max(c for c, _ in places) + 1) * COL_W + PAD, "height": (max(r for _, r in places) + 1) * ROW_H + PAD,
            "boxes": boxes, "paths": paths}


def _box(x: int, y: int, fill: str, first: str, second: str, title: str = "") -> dict[str, Any]:
    return {"x": x, "y": y, "fill": fill, "first": first, "second": second, "title": title}


def _one_line(text: str) -> str:
    """Steps joined by " · " (their blank-line separators would take the table's and the boxes' room)."""
    return " · ".join(line.strip() for line in text.splitlines() if line.strip())
