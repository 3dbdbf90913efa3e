"""Pure string helpers of the rule-based verifier (spec §8, steps 2-4).

Nothing here parses mathematics: these functions only cut the final answer out of a model
response and put it in a canonical spelling for the cheap exact-match path. Everything
semantic (``\\frac12`` against ``0.5``) is left to Math-Verify in ``verifier.py``.
"""

from __future__ import annotations

import re

THINK_END = "</think>"

# Both spellings mark a final answer in MATH-style solutions; ``\fbox`` shows up in
# Hendrycks-MATH references and occasionally in model outputs. The look-ahead rejects
# longer command names that merely start with "boxed".
_BOX_RE = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")

# ``\left`` / ``\right`` only size delimiters. The look-ahead keeps ``\leftarrow`` and
# ``\rightarrow`` intact, which are different symbols.
_SIZING_RE = re.compile(r"\\(?:left|right)(?![A-Za-z])")
_WHITESPACE_RE = re.compile(r"\s+")


def extract_solution(response: str) -> str:
    """Return the part of ``response`` that is graded (spec §8 step 2).

    Reasoning models think first and answer after ``</think>``; anything boxed inside the
    thinking is a draft. The text after the last ``</think>`` is the solution; a response
    without the tag is graded whole (the released run applies no format penalty).
    """
    cut = response.rfind(THINK_END)
    if cut < 0:
        return response
    return response[cut + len(THINK_END) :]


def last_boxed(text: str) -> str | None:
    """Return the content of the last ``\\boxed{...}`` / ``\\fbox{...}`` in ``text`` (spec §8 step 4).

    Braces are matched with a depth counter so nested groups such as
    ``\\boxed{\\frac{\\pi}{2}}`` come back whole; escaped braces (``\\{``, ``\\}``) are
    literal characters and do not count. ``\\boxed 5`` (a space, then one token) is also
    accepted, as LaTeX itself accepts it. Returns None when there is no box, or when the last
    box never closes (typically a response truncated at the length limit).
    """
    candidates = [m.end() for m in _BOX_RE.finditer(text) if _opens_box(text, m.end())]
    if not candidates:
        return None
    return _box_content(text, candidates[-1])


def _opens_box(text: str, pos: int) -> bool:
    # A bare mention such as "\boxed." is not an answer; a box needs a group or a spaced token.
    return pos < len(text) and (text[pos] == "{" or text[pos].isspace())


def _box_content(text: str, pos: int) -> str | None:
    while pos < len(text) and text[pos].isspace():
        pos += 1
    if pos >= len(text):
        return None
    if text[pos] != "{":
        return _single_token(text, pos)
    depth = 0
    i = pos
    while i < len(text):
        char = text[i]
        if char == "\\":
            # Skip the escaped character so "\{" and "\\" never move the depth counter.
            i += 2
            continue
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0:
                return text[pos + 1 : i].strip()
        i += 1
    return None


def _single_token(text: str, pos: int) -> str | None:
    end = pos
    # "$" ends the token too: "$\boxed 5$" is the common inline form.
    while end < len(text) and not text[end].isspace() and text[end] != "$":
        end += 1
    token = text[pos:end]
    return token or None


def normalise_answer(answer: str) -> str:
    """Canonical spelling for the exact-match fast path (spec §8 step 4, "direct membership").

    Only removes what cannot change a value: surrounding whitespace and ``$`` delimiters,
    ``\\left`` / ``\\right`` sizing, runs of whitespace (collapsed to one space, never
    removed, so ``1 000`` and ``1000`` stay distinct) and one trailing sentence period.
    It never drops digits, commas, units or signs, so two different numbers never become
    equal; anything subtler goes to Math-Verify.
    """
    s = answer.strip()
    s = s.strip("$").strip()
    s = _SIZING_RE.sub("", s)
    s = _WHITESPACE_RE.sub(" ", s).strip()
    if s.endswith(".") and not s.endswith(".."):
        s = s[:-1].rstrip()
    return s
