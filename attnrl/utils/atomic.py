"""Atomic file and directory writes: write to a temporary sibling, validate, rename.

A failed or killed writer leaves the previous output intact and no half-written file behind
(architecture.md, "Stages write atomically").
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike, validate: Callable[[Path], None] | None = None) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; on success validate it and rename it over ``target``.

    Works for files and directories. The temporary lives in the same directory so the final
    ``os.replace`` is atomic on one filesystem. On any exception the temporary is removed and
    ``target`` is untouched.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    tmp = tmp_dir / target.name
    try:
        yield tmp
        if not tmp.exists():
            raise FileNotFoundError(f"writer produced nothing at {tmp} for {target}")
        if validate is not None:
            validate(tmp)
        if target.is_dir() and not target.is_symlink():
            # A directory cannot be replaced atomically when it is not empty: move the old one
            # aside first, so a crash between the two renames still leaves a complete copy.
            old = tmp_dir / (target.name + ".old")
            os.replace(target, old)
            os.replace(tmp, target)
        else:
            os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
