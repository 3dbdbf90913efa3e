"""HTML for ``method_trace``: a response's steps shaded by FCI with the branch points of both criteria
marked, and its tree (segments, continuations, Monte-Carlo values, advantages, rewards) as inline SVG.

Static markup, no script: the report is read offline.
"""

from __future__ import annotations

import html
from collections.abc import Sequence

from attnrl.stages.method_trace import ProblemTrace, SegmentTrace

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
    if not traces:
        return "<p>No problem traced (<code>report.trace_problems: 0</code>).</p>"
    legend = " ".join(f'<span class="mark {name}">{sign}</span> {label}' for name, (sign, label) in MARKS.items())
    intro = (
        "<p>One training step's work on held-out problems with the trained policy: the initial samples, one "
        "response's steps shaded by Forward Context Influence (darker: later steps attend to it more, spec §5), "
        f"where each criterion would branch ({legend}), and the tree rolled out from this run's branch points "
        "with each segment's Monte-Carlo value V and advantage A (spec §9).</p>"
    )
    return intro + "".join(_trace(t) for t in traces)


def _trace(trace: ProblemTrace) -> str:
    esc = html.escape
    samples = "".join("✓" if r == 1.0 else "✗" for r in trace.rewards)
    agree = len({trace.step_of(o) for o in trace.fci_offsets} & {trace.step_of(o) for o in trace.entropy_offsets})
    head = (
        f'<section class="trace" data-problem="{esc(trace.problem_id)}">'
        f"<h3>{esc(trace.benchmark)} #{esc(trace.problem_id)}</h3>"
        f"<p><code>{esc(trace.question)}</code> answer <b>{esc(', '.join(trace.answers))}</b></p>"
        f"<p>{len(trace.rewards)} initial samples {samples} (V(root) = {trace.root_value:.2f}); response "
        f"{trace.response_index + 1} is expanded at the <b>{esc(trace.branching)}</b> branch points. FCI and entropy "
        f"branch in {agree} common step(s) of {len(trace.steps)}.</p>"
    )
    return head + _steps(trace) + _tree_svg(trace) + _segment_table(trace.segments) + "</section>"


def _steps(trace: ProblemTrace) -> str:
    """One row per step; a response without any line break, whose steps are single tokens (spec §4's last
    fallback), runs inline instead, each token shaded and titled with its FCI and entropy."""
    top = max((s.fci for s in trace.steps), default=0.0)
    inline = len(trace.steps) > 1 and all(step.end - step.start == 1 for step in trace.steps)
    rows = []
    for k, step in enumerate(trace.steps, start=1):
        shade = f"background:rgba(230,120,20,{0.75 * (step.fci / top if top > 0 else 0.0):.2f})"
        text = "".join(
            "".join(f'<span class="mark {b}" title="{MARKS[b][1]}">{MARKS[b][0]}</span>' for b in piece.branches)
            + html.escape(piece.text)
            for piece in step.pieces
        )
        scores = f"FCI {step.fci:.3f} · entropy {step.entropy:.2f}"
        if inline:
            rows.append(f'<span class="tok" style="{shade}" title="step {k}: {scores}">{text}</span>')
        else:
            rows.append(f'<div class="step" style="{shade}"><span class="n">{k}</span><span class="t">{text}</span>'
                        f'<span class="s">{scores}</span></div>')
    if inline:
        return (f'<p class="note">This response has no line break, so every token is a step (spec §4, the last '
                f'fallback of step segmentation): its {len(rows)} tokens run inline, each titled with its FCI and '
                f'entropy.</p><div class="steps inline">{"".join(rows)}</div>')
    return f'<div class="steps">{"".join(rows)}</div>'


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


def _tree_svg(trace: ProblemTrace) -> str:
    segments = trace.segments
    if not segments:
        return ""
    places = _layout(segments)
    width = (max(c for c, _ in places) + 1) * COL_W + PAD
    height = (max(r for _, r in places) + 1) * ROW_H + PAD

    def anchor(column: int, row: int) -> tuple[int, int]:
        return PAD + column * COL_W, PAD + row * ROW_H

    parts = [_box(*anchor(0, 0), "#eee", "question", f"V(root) {trace.root_value:.2f}")]
    for traced, (column, row) in zip(segments, places, strict=True):
        segment = traced.node
        x, y = anchor(column, row)
        px, py = anchor(*(places[segment.parent] if segment.parent is not None else (0, 0)))
        parts.append(f'<path d="M{px + BOX_W},{py + BOX_H // 2} C{x - 15},{py + BOX_H // 2} {px + BOX_W + 15},'
                     f'{y + BOX_H // 2} {x},{y + BOX_H // 2}" fill="none" stroke="#999"/>')
        colour = "#d8f0d8" if segment.advantage > 0 else "#f6d6d6" if segment.advantage < 0 else "#eee"
        reward = "" if segment.reward is None else f"  r={segment.reward:.0f}"
        snippet = _one_line(traced.text)
        snippet = snippet if len(snippet) <= SNIPPET else snippet[: SNIPPET - 1] + "…"
        kind = "continuation" if segment.continuation else "segment"
        parts.append(_box(x, y, colour, f"V {segment.value:.2f}  A {segment.advantage:+.2f}{reward}", snippet,
                          title=f"{kind} tokens {segment.start}-{segment.end}, {segment.leaves} leaves"))
    return (f'<svg class="tree" xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
            f'viewBox="0 0 {width} {height}" role="img" aria-label="tree of problem {html.escape(trace.problem_id)}">'
            + "".join(parts) + "</svg>")


def _box(x: int, y: int, fill: str, first: str, second: str, title: str = "") -> str:
    esc = html.escape
    tip = f"<title>{esc(title)}</title>" if title else ""
    return (f'<g>{tip}<rect x="{x}" y="{y}" width="{BOX_W}" height="{BOX_H}" rx="5" fill="{fill}" stroke="#777"/>'
            f'<text x="{x + 6}" y="{y + 18}">{esc(first)}</text><text x="{x + 6}" y="{y + 36}">{esc(second)}</text></g>')


def _one_line(text: str) -> str:
    """Steps joined by " · " (their blank-line separators would take the table's and the boxes' room)."""
    return " · ".join(line.strip() for line in text.splitlines() if line.strip())


def _segment_table(segments: Sequence[SegmentTrace]) -> str:
    rows = "".join(
        f"<tr><td>{'continuation' if s.continuation else 'segment'} {s.start}–{s.end}</td>"
        f"<td>{html.escape(_one_line(traced.text))}</td>"
        f"<td>{s.leaves}</td><td>{s.value:.2f}</td><td>{s.advantage:+.3f}</td>"
        f"<td>{'' if s.reward is None else f'{s.reward:.0f}'}</td></tr>"
        for traced, s in ((t, t.node) for t in segments)
    )
    return ('<table class="segments"><tr><th>node (tokens)</th><th>text</th><th>leaves</th><th>V</th><th>A</th>'
            f"<th>reward</th></tr>{rows}</table>")
