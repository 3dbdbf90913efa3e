"""Training checkpoints: weights, optimizer, loop state; written atomically, newest found on resume.

Layout: ``<run>/checkpoints/step_000010/{model/, optimizer/, loop_state.json, lineage.json}`` plus
``<run>/checkpoints/latest`` naming the newest complete one. ``model/`` is a ``save_pretrained``
directory of the exported (under ZeRO-3: gathered) weights, what the rollout engine and the
evaluate stage read; ``optimizer/`` is whatever the backend needs beyond it to continue exactly
(``OptimizerBackend.save``: optimizer state, and fp32 master weights when training in bf16). A
checkpoint directory appears only once complete (temporary path, then rename), so a killed save
never leaves a half one that a resume would pick up.

Nothing in a checkpoint is a pickle that can run code: ``model/`` is safetensors, ``loop_state.json`` is
JSON with a format name and version (``LOOP_STATE_VERSION``), validated field by field against
``LoopState`` when read, and the optimizer files load with ``weights_only=True``
(``attnrl/utils/tensor_files.py``). A checkpoint of another format or version is refused with the file
and the version named; it is not guessed at.

Who writes ``model/`` and ``optimizer/`` is a ``StateWriter``: ``trainer_state`` for a trainer in this
process; a ``TrainerGroup`` (``infra/trainer_group.py``) has rank 0 write the model and every rank
its DeepSpeed partition, into the same temporary directory (on several nodes it must be shared).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import pydantic
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from attnrl.errors import CheckpointError
from attnrl.lineage import write_lineage
from attnrl.training.backend import OptimizerBackend
from attnrl.training.loop import LoopState
from attnrl.utils.atomic import atomic_path

LATEST = "latest"
MODEL_DIR = "model"
OPTIMIZER_DIR = "optimizer"
LOOP_STATE_FILE = "loop_state.json"
LOOP_STATE_FORMAT = "attnrl-loop-state"
LOOP_STATE_VERSION = 1  # raise it when LoopState or anything it holds changes shape
StateWriter = Callable[[Path], None]  # writes model/ and optimizer/ into a checkpoint directory


class _LoopStateFile(pydantic.BaseModel):
    """What ``loop_state.json`` holds. Strict: a value of the wrong type is an error, not converted; floats
    are written shortest-round-trip (NaN and infinities by name), so a resumed run continues bit for bit."""

    model_config = pydantic.ConfigDict(strict=True, extra="forbid", ser_json_inf_nan="constants")

    format: Literal["attnrl-loop-state"]
    version: Literal[1]
    state: LoopState


def checkpoint_name(step: int) -> str:
    return f"step_{step:06d}"


def trainer_state(
    model: PreTrainedModel, weights: dict[str, torch.Tensor], tokenizer: PreTrainedTokenizerBase,
    backend: OptimizerBackend,
) -> StateWriter:
    """The ``StateWriter`` of a trainer in this process."""

    def write(directory: Path) -> None:
        # The model object gives config and names; ``weights`` the values (its own may be ZeRO-3 partitions).
        model.save_pretrained(directory / MODEL_DIR, state_dict=weights)
        tokenizer.save_pretrained(directory / MODEL_DIR)
        (directory / OPTIMIZER_DIR).mkdir(exist_ok=True)
        backend.save(directory / OPTIMIZER_DIR)

    return write


def save_checkpoint(
    directory: Path,
    *,
    step: int,
    state: StateWriter,
    loop_state: LoopState,
    keep: int,
    lineage: dict | None = None,
) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / checkpoint_name(step)

    def _validate(tmp: Path) -> None:
        for required in (f"{MODEL_DIR}/config.json", LOOP_STATE_FILE):
            if not (tmp / required).is_file():
                raise RuntimeError(f"checkpoint {target}: {required} was not written")
        if not (tmp / OPTIMIZER_DIR).is_dir() or not any((tmp / OPTIMIZER_DIR).iterdir()):
            raise RuntimeError(f"checkpoint {target}: the backend wrote nothing to {OPTIMIZER_DIR}/")

    with atomic_path(target, validate=_validate) as tmp:
        tmp.mkdir()
        state(tmp)
        write_loop_state(tmp / LOOP_STATE_FILE, loop_state)
        if lineage is not None:
            write_lineage(tmp, lineage)
    with atomic_path(directory / LATEST) as tmp:
        tmp.write_text(target.name)
    for old in sorted(p for p in directory.glob("step_*") if p.is_dir())[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return target


def latest_checkpoint(directory: Path) -> Path | None:
    pointer = directory / LATEST
    if not pointer.is_file():
        return None
    path = directory / pointer.read_text().strip()
    return path if path.is_dir() else None


def write_loop_state(path: Path, state: LoopState) -> None:
    record = _LoopStateFile(format=LOOP_STATE_FORMAT, version=LOOP_STATE_VERSION, state=state)
    path.write_text(record.model_dump_json(indent=1))


def load_loop_state(checkpoint: Path) -> LoopState:
    """The loop state ``save_checkpoint`` wrote; ``CheckpointError`` naming the file for anything else."""
    path = checkpoint / LOOP_STATE_FILE
    if not path.is_file():
        older = " (the loop_state.pt beside it is an older attnrl's pickle, which is not loaded: start a new run "\
            "from this checkpoint's model/)" if (checkpoint / "loop_state.pt").is_file() else ""
        raise CheckpointError(f"{path}: missing{older}")
    text = path.read_text()
    try:
        record = json.loads(text)
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{path}: not JSON ({error})") from error
    found = (record.get("format"), record.get("version")) if isinstance(record, dict) else (None, None)
    if found != (LOOP_STATE_FORMAT, LOOP_STATE_VERSION):
        raise CheckpointError(f"{path}: format {found[0]!r} version {found[1]!r}; this attnrl reads "
                              f"{LOOP_STATE_FORMAT!r} version {LOOP_STATE_VERSION}")
    try:
        return _LoopStateFile.model_validate_json(text).state
    except pydantic.ValidationError as error:
        raise CheckpointError(f"{path}: {error}") from error


def load_backend_state(checkpoint: Path, backend: OptimizerBackend) -> None:
    """Restore what ``save_checkpoint`` had the backend write (its module must hold the checkpoint's weights)."""
    backend.load(checkpoint / OPTIMIZER_DIR)
