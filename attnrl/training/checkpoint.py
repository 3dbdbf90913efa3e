"""Training checkpoints: weights, optimizer, loop state; written atomically, newest found on resume.

Layout: ``<run>/checkpoints/step_000010/{model/, optimizer/, loop_state.pt, lineage.json}`` plus
``<run>/checkpoints/latest`` naming the newest complete one. ``model/`` is a ``save_pretrained``
directory of the exported (under ZeRO-3: gathered) weights, what the rollout engine and the
evaluate stage read; ``optimizer/`` is whatever the backend needs beyond it to continue exactly
(``OptimizerBackend.save``: optimizer state, and fp32 master weights when training in bf16). A
checkpoint directory appears only once complete (temporary path, then rename), so a killed save
never leaves a half one that a resume would pick up.

Who writes ``model/`` and ``optimizer/`` is a ``StateWriter``: ``trainer_state`` for a trainer in this
process; a ``TrainerGroup`` (``infra/trainer_group.py``) has rank 0 write the model and every rank
its DeepSpeed partition, into the same temporary directory (on several nodes it must be shared).
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from attnrl.lineage import write_lineage
from attnrl.training.backend import OptimizerBackend
from attnrl.training.loop import LoopState
from attnrl.utils.atomic import atomic_path

LATEST = "latest"
MODEL_DIR = "model"
OPTIMIZER_DIR = "optimizer"
StateWriter = Callable[[Path], None]  # writes model/ and optimizer/ into a checkpoint directory


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
        for required in (f"{MODEL_DIR}/config.json", "loop_state.pt"):
            if not (tmp / required).is_file():
                raise RuntimeError(f"checkpoint {target}: {required} was not written")
        if not (tmp / OPTIMIZER_DIR).is_dir() or not any((tmp / OPTIMIZER_DIR).iterdir()):
            raise RuntimeError(f"checkpoint {target}: the backend wrote nothing to {OPTIMIZER_DIR}/")

    with atomic_path(target, validate=_validate) as tmp:
        tmp.mkdir()
        state(tmp)
        torch.save(loop_state, tmp / "loop_state.pt")
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


def load_loop_state(checkpoint: Path) -> LoopState:
    # Our own file, written by save_checkpoint: it holds dataclasses, not only tensors.
    return torch.load(checkpoint / "loop_state.pt", weights_only=False)


def load_backend_state(checkpoint: Path, backend: OptimizerBackend) -> None:
    """Restore what ``save_checkpoint`` had the backend write (its module must hold the checkpoint's weights)."""
    backend.load(checkpoint / OPTIMIZER_DIR)
