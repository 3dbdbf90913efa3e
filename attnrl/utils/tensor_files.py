"""Loading ``torch.save`` files without running code: ``torch.load(weights_only=True)``.

A checkpoint may come from a shared DVC remote. ``weights_only=True`` lets the unpickler build tensors,
primitive types and containers only, plus the classes a caller names in ``allowed``; any other global in
the file (``os.system``, a class of ours that a rename would break) refuses the whole file.
"""

from __future__ import annotations

import pickle
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from attnrl.errors import CheckpointError


def load_tensor_file(path: Path | str, *, allowed: Iterable[Any] = (), map_location: Any = None) -> Any:
    """The object ``torch.save`` wrote to ``path``, unpickled with ``weights_only=True``.

    ``allowed``: classes or functions the file may name besides torch's own safe set. Raises
    ``CheckpointError`` naming the file when it is missing or names any other global."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file missing")
    try:
        with torch.serialization.safe_globals(list(allowed)):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        # torch's message suggests loading the file unsafely; the line worth showing is the one naming the global.
        found = next((line.strip() for line in str(error).splitlines() if "GLOBAL" in line), "")
        raise CheckpointError(f"{path}: refused, it holds objects other than tensors and plain values, whose "
                              f"loading could run code ({found or 'not a weights-only file'})") from error
