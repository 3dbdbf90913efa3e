"""The ``Problem`` record every stage passes around (spec §2.3, §2.4).

A problem is a chat prompt plus the list of accepted final answers. Real data keeps answers
messy (trailing newlines, LaTeX, several accepted forms), so the record strips surrounding
whitespace and refuses anything it could not grade: an empty prompt or one of control characters
only, no answer, a non-string answer.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from attnrl.errors import DataError

ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class Problem:
    """One math problem.

    Attributes:
        id: unique within its source; ``extra_info.index`` in verl parquet files.
        prompt: chat messages, each ``{"role": ..., "content": ...}``; the last is the user turn.
        answers: accepted final answers, whitespace-stripped, at least one.
        source: benchmark or dataset name (verl ``data_source``); metrics group by it.
        split: ``train`` or ``test`` (verl ``extra_info.split``).
        level: difficulty level where the source defines one (the synthetic task), else None.
    """

    id: str
    prompt: tuple[dict[str, str], ...]
    answers: tuple[str, ...]
    source: str
    split: str
    level: int | None = field(default=None)

    @property
    def question(self) -> str:
        """The text of the last user message."""
        return self.prompt[-1]["content"]

    @property
    def uid(self) -> str:
        """A key unique across sources: ``source/id``."""
        return f"{self.source}/{self.id}"


def make_problem(
    *,
    id: Any,
    prompt: Any,
    answers: Any,
    source: Any,
    split: Any,
    level: Any = None,
    where: str,
) -> Problem:
    """Validate raw fields and build a ``Problem``.

    ``where`` locates the record for error messages, for example ``"data/x.parquet row 12"``.
    Raises ``DataError`` naming ``where`` and the field at fault.
    """
    if id is None or (isinstance(id, str) and not id.strip()):
        raise DataError(f"{where}: field 'id' is missing or empty")
    if not isinstance(source, str) or not source.strip():
        raise DataError(f"{where}: field 'source' must be a non-empty string, got {source!r}")
    if not isinstance(split, str) or not split.strip():
        raise DataError(f"{where}: field 'split' must be a non-empty string, got {split!r}")
    if level is not None and (isinstance(level, bool) or not isinstance(level, int)):
        raise DataError(f"{where}: field 'level' must be an integer or null, got {level!r}")
    return Problem(
        id=str(id).strip(),
        prompt=_validate_prompt(prompt, where),
        answers=_validate_answers(answers, where),
        source=source.strip(),
        split=split.strip(),
        level=level,
    )


def _validate_prompt(prompt: Any, where: str) -> tuple[dict[str, str], ...]:
    if isinstance(prompt, str):
        prompt = [{"role": "user", "content": prompt}]
    if not isinstance(prompt, Sequence) or isinstance(prompt, (bytes, dict)) or len(prompt) == 0:
        raise DataError(f"{where}: field 'prompt' must be a non-empty list of chat messages, got {prompt!r}")
    messages = []
    for i, message in enumerate(prompt):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise DataError(f"{where}: prompt message {i} must have 'role' and 'content', got {message!r}")
        role, content = message["role"], message["content"]
        if role not in ROLES:
            raise DataError(f"{where}: prompt message {i} has unknown role {role!r}; known: {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise DataError(f"{where}: prompt message {i} content must be a string, got {type(content).__name__}")
        messages.append({"role": str(role), "content": content})
    if messages[-1]["role"] != "user":
        raise DataError(f"{where}: the last prompt message must be the user turn, got role {messages[-1]['role']!r}")
    content = messages[-1]["content"]
    if not content.strip():
        raise DataError(f"{where}: field 'prompt' is empty (the user message has no text)")
    if not has_text(content):
        raise DataError(f"{where}: field 'prompt' has no text, only control characters ({content[:40]!r})")
    return tuple(messages)


def has_text(text: str) -> bool:
    """Whether ``text`` holds a character that is neither whitespace nor a control or format character
    (Unicode category C: NUL, escapes, zero-width marks): what a person or a tokenizer could read."""
    return any(not ch.isspace() and unicodedata.category(ch)[0] != "C" for ch in text)


def _validate_answers(answers: Any, where: str) -> tuple[str, ...]:
    # Train files store one string, eval files an array of accepted strings (spec §2.3).
    if isinstance(answers, str):
        answers = [answers]
    elif hasattr(answers, "tolist"):
        answers = answers.tolist()
    if not isinstance(answers, (list, tuple)) or len(answers) == 0:
        raise DataError(f"{where}: field 'answers' must be a string or a non-empty list of strings, got {answers!r}")
    cleaned = []
    for i, answer in enumerate(answers):
        if not isinstance(answer, str):
            raise DataError(
                f"{where}: answer {i} must be a string, got {type(answer).__name__} {answer!r}"
            )
        if not answer.strip():
            raise DataError(f"{where}: answer {i} is empty")
        if not has_text(answer):
            raise DataError(f"{where}: answer {i} has no text, only control characters ({answer[:40]!r})")
        cleaned.append(answer.strip())
    return tuple(cleaned)
