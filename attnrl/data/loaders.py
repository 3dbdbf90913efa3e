"""Problem loaders behind a registry: verl parquet (spec §2.3), jsonl, Hugging Face datasets,
and the synthetic embedded task.

Every loader returns validated ``Problem`` records or raises ``DataError`` naming the file and
row. Stray whitespace around answers is stripped; the verl quirk that the ground truth is a
list in eval files and a string in train files is absorbed here.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal

import pyarrow as pa
import pyarrow.parquet as pq

from attnrl.config.schema import DataConfig, SourceSpec
from attnrl.data.problem import Problem, make_problem
from attnrl.data.synthetic import generate_problems
from attnrl.errors import DataError
from attnrl.utils.atomic import atomic_path
from attnrl.utils.registry import lookup

logger = logging.getLogger(__name__)
InvalidRowPolicy = Literal["error", "skip"]

VERL_COLUMNS = ("data_source", "prompt", "ability", "reward_model", "extra_info")

Loader = Callable[[SourceSpec, DataConfig, str, int], list[Problem]]


def load_verl_parquet(
    path: str | Path, *, limit: int | None = None, on_invalid: InvalidRowPolicy = "error"
) -> list[Problem]:
    """Read a verl-layout parquet file (columns of spec §2.3).

    ``on_invalid="skip"`` drops rows that cannot be graded (real training data has a few rows
    with an empty ground truth) with one warning each, instead of stopping.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        table = pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise DataError(f"{path}: not a readable parquet file: {exc}") from None
    missing = [c for c in ("data_source", "prompt", "reward_model", "extra_info") if c not in table.column_names]
    if missing:
        raise DataError(f"{path}: missing column(s) {missing}; a verl parquet file has {list(VERL_COLUMNS)}")
    rows = table.slice(0, limit).to_pylist() if limit else table.to_pylist()
    problems = []
    for i, row in enumerate(rows):
        with _row_policy(on_invalid, problems):
            problems.append(_verl_row(row, f"{path} row {i}"))
    return problems


def _verl_row(row: dict[str, Any], where: str) -> Problem:
    reward_model = row["reward_model"] or {}
    extra = row["extra_info"] or {}
    if reward_model.get("ground_truth") is None:
        raise DataError(f"{where}: field 'reward_model.ground_truth' is missing")
    if extra.get("index") is None:
        raise DataError(f"{where}: field 'extra_info.index' is missing")
    return make_problem(
        id=extra["index"],
        prompt=row["prompt"],
        answers=reward_model["ground_truth"],
        source=row["data_source"],
        split=extra.get("split") or "train",
        level=extra.get("level"),
        where=where,
    )


@contextlib.contextmanager
def _row_policy(on_invalid: InvalidRowPolicy, problems: list[Problem]) -> Iterator[None]:
    """Raise on a bad row, or log and skip it, as the source's policy says."""
    if on_invalid not in ("error", "skip"):
        raise ValueError(f"on_invalid must be 'error' or 'skip', got {on_invalid!r}")
    try:
        yield
    except DataError as exc:
        if on_invalid == "error":
            raise
        logger.warning("skipping invalid row: %s", exc)


def load_jsonl(
    path: str | Path,
    *,
    split: str = "train",
    source: str | None = None,
    prompt_suffix: str = "",
    limit: int | None = None,
    on_invalid: InvalidRowPolicy = "error",
) -> list[Problem]:
    """Read one problem per line: ``{"prompt": str | messages, "answer": str | [str], "id"?, "source"?, "split"?}``.

    A plain-string prompt becomes one user message with ``prompt_suffix`` appended (spec §2.4).
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    problems = []
    with path.open() as handle:
        for line_number, line in enumerate(handle, start=1):
            if limit is not None and len(problems) >= limit:
                break
            if not line.strip():
                continue
            with _row_policy(on_invalid, problems):
                problems.append(_jsonl_row(line, f"{path} line {line_number}", line_number - 1,
                                           split=split, source=source or path.stem, prompt_suffix=prompt_suffix))
    return problems


def _jsonl_row(line: str, where: str, index: int, *, split: str, source: str, prompt_suffix: str) -> Problem:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise DataError(f"{where}: not valid JSON: {exc.msg}") from None
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object")
    for required in ("prompt", "answer"):
        if required not in record:
            raise DataError(f"{where}: field {required!r} is missing")
    prompt = record["prompt"]
    if isinstance(prompt, str) and prompt.strip():
        prompt = prompt + prompt_suffix
    return make_problem(
        id=record.get("id", index),
        prompt=prompt,
        answers=record["answer"],
        source=record.get("source") or source,
        split=record.get("split") or split,
        level=record.get("level"),
        where=where,
    )


def load_hf_dataset(spec: SourceSpec, prompt_suffix: str) -> list[Problem]:
    """Load a Hugging Face dataset by name (online) or from a local dataset directory."""
    try:
        import datasets
    except ImportError:  # pragma: no cover - datasets is in the lock; this is for slim installs
        raise DataError("source kind 'hf' needs the 'datasets' package: pip install datasets") from None
    try:
        dataset = datasets.load_dataset(spec.path, split=spec.split)
    except Exception as exc:  # datasets raises many types (network, missing split, format)
        raise DataError(f"hf dataset {spec.path!r} split {spec.split!r}: cannot load: {exc}") from None
    for field in (spec.prompt_field, spec.answer_field):
        if field not in dataset.column_names:
            raise DataError(
                f"hf dataset {spec.path!r}: column {field!r} not found; columns: {dataset.column_names}"
            )
    if spec.limit is not None:
        dataset = dataset.select(range(min(spec.limit, len(dataset))))
    problems: list[Problem] = []
    for i, row in enumerate(dataset):
        question = row[spec.prompt_field]
        with _row_policy(spec.on_invalid, problems):
            problems.append(
                make_problem(
                    id=row.get("id", i),
                    prompt=question + prompt_suffix if isinstance(question, str) and question.strip() else question,
                    answers=row[spec.answer_field],
                    source=spec.name or spec.path,
                    split=spec.split,
                    where=f"hf dataset {spec.path!r} row {i}",
                )
            )
    return problems


def _synthetic(spec: SourceSpec, data: DataConfig, split: str, seed: int) -> list[Problem]:
    problems = generate_problems(data.synthetic, split=split, seed=seed, name=spec.name or "synthetic")
    return problems[: spec.limit] if spec.limit else problems


def _verl(spec: SourceSpec, data: DataConfig, split: str, seed: int) -> list[Problem]:
    return _named(load_verl_parquet(spec.path, limit=spec.limit, on_invalid=spec.on_invalid), spec)


def _jsonl(spec: SourceSpec, data: DataConfig, split: str, seed: int) -> list[Problem]:
    return load_jsonl(
        spec.path,
        split=spec.split,
        source=spec.name,
        prompt_suffix=data.prompt_suffix,
        limit=spec.limit,
        on_invalid=spec.on_invalid,
    )


def _hf(spec: SourceSpec, data: DataConfig, split: str, seed: int) -> list[Problem]:
    return load_hf_dataset(spec, data.prompt_suffix)


def _named(problems: list[Problem], spec: SourceSpec) -> list[Problem]:
    if spec.name is None:
        return problems
    return [replace(p, source=spec.name) for p in problems]


LOADERS: dict[str, Loader] = {"synthetic": _synthetic, "verl_parquet": _verl, "jsonl": _jsonl, "hf": _hf}


def load_source(spec: SourceSpec, data: DataConfig, *, split: str, seed: int) -> list[Problem]:
    """Load one configured source. ``split`` says which side (train/test) the synthetic task draws."""
    return lookup(LOADERS, spec.kind, "source kind", DataError)(spec, data, split, seed)


def problems_to_table(problems: list[Problem]) -> pa.Table:
    """The verl parquet layout (spec §2.3); ground truth always a list, plus ``extra_info.level``."""
    return pa.Table.from_pylist(
        [
            {
                "data_source": p.source,
                "prompt": list(p.prompt),
                "ability": "math",
                "reward_model": {"style": "rule", "ground_truth": list(p.answers)},
                "extra_info": {"index": p.id, "split": p.split, "level": p.level},
            }
            for p in problems
        ]
    )


def write_problems(problems: list[Problem], path: str | Path) -> Path:
    """Write problems as verl parquet atomically, reading the file back before it replaces ``path``."""
    with atomic_path(path, validate=lambda tmp: _check_roundtrip(tmp, len(problems))) as tmp:
        pq.write_table(problems_to_table(problems), tmp)
    return Path(path)


def _check_roundtrip(path: Path, expected: int) -> None:
    got = len(load_verl_parquet(path))
    if got != expected:
        raise DataError(f"{path}: wrote {expected} problems but read back {got}")
