"""Where a run writes, and the lock that keeps two runs from writing there at once.

A run of the project's versioned configuration (a DVC project's own ``params.yaml``, no overrides,
no method preset) writes the versioned outputs (``data/``, ``models/``, ``runs/``, ``reports/``),
which ``dvc.lock`` describes. Any other run in a DVC project (``--set``, ``--method``, another config
file: an on-demand experiment) is isolated in its own root, ``<runs_dir>/overrides/<config sha256
prefix>/``, and never touches the versioned outputs. The versioned inputs it reads but does not
produce itself (prepared problems, the difficulty table, the initial policy) are linked into that root
when it has none of its own, so an on-demand train run starts from the versioned ones; the same
configuration again gets the same root, and resumes there.

In a DVC project every top-level run holds its root's workspace lock for its whole duration (the
project's own root, or its isolated root): a Prefect global concurrency limit of one slot named after
the root (created on first use). A second run on the same root waits for the slot
(``timeouts.workspace_wait_s``); runs on other roots go on side by side. The slot is leased for a
minute at a time: a run that dies stops renewing it, and the slot frees itself. Subflows (the stages
of a pipeline run) run under their parent's lock and in their parent's root. Outside a DVC project
(a scratch directory) there are no versioned outputs to guard, and runs take no lock.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from prefect import get_client, get_run_logger
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
from prefect.concurrency.sync import concurrency
from prefect.context import FlowRunContext
from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

from attnrl.config.identity import config_digest
from attnrl.config.schema import RunConfig
from attnrl.stages.layout import Layout
from infra import dvc_store
from tasks.versioning import reads_versioned_params

OVERRIDES_DIR = "overrides"
LOCK_PREFIX = "attnrl-workspace-"
LEASE_S = 60  # a run killed outright (SIGKILL, a lost node) frees its root within a minute; Prefect's shortest


def _inputs(layout: Layout) -> dict[str, Path]:
    """The versioned outputs a later stage reads, by the stage that produces each."""
    return {"prepare": layout.prepared_dir, "warmup": layout.init_model, "difficulty": layout.difficulty_dir}


def isolated_root(root: Path, config: RunConfig) -> Path:
    return Layout.of(config, root).runs_dir / OVERRIDES_DIR / config_digest(config)[:12]


def run_root(root: str | Path, config: RunConfig, config_path: str, overrides: list[str] | None,
             method: str | None, produces: set[str]) -> Path:
    """The root this run writes to: ``root`` itself, or its isolated root when ``root`` holds versioned
    outputs this run must not touch. ``produces``: the stages the run executes (their outputs are its own,
    never linked)."""
    root = Path(root)
    if not dvc_store.is_dvc_project(root) or reads_versioned_params(root, config_path, overrides, method):
        return root
    own = isolated_root(root, config)
    own.mkdir(parents=True, exist_ok=True)
    versioned, isolated = _inputs(Layout.of(config, root)), _inputs(Layout.of(config, own))
    for stage, source in versioned.items():
        target = isolated[stage]
        if stage in produces or target.exists() or target.is_symlink() or not source.exists():
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        target.symlink_to(source.resolve(), target_is_directory=source.is_dir())
    get_run_logger().info("this run does not use %s as it is (overrides %s, method %s, config %s): it writes to "
                          "its own root %s and leaves the versioned outputs alone", root / "params.yaml", overrides,
                          method, config_path, own)
    return own


@contextmanager
def run_workspace(root: str | Path, config: RunConfig, config_path: str, overrides: list[str] | None,
                  method: str | None, produces: set[str]) -> Iterator[Path]:
    """The run's root (:func:`run_root`), held under its workspace lock while the body runs. A subflow
    runs in the root its parent gave it, under its parent's lock."""
    if is_subflow():
        yield Path(root)
        return
    own = run_root(root, config, config_path, overrides, method, produces)
    if not dvc_store.is_dvc_project(root):  # no versioned outputs, nothing shared to guard
        yield own
        return
    with workspace_lock(own, config.timeouts.workspace_wait_s):
        yield own


def lock_name(root: Path) -> str:
    return LOCK_PREFIX + hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:16]


def _ensure_limit(name: str) -> None:
    with get_client(sync_client=True) as client:
        try:
            # Read first: the server logs a failed insert's whole traceback, on the console of a temporary API.
            client.read_global_concurrency_limit_by_name(name)
        except ObjectNotFound:
            try:
                client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=1))
            except ObjectAlreadyExists:  # another run created it in between
                pass


def is_subflow() -> bool:
    context = FlowRunContext.get()
    return context is not None and context.flow_run is not None and context.flow_run.parent_task_run_id is not None


@contextmanager
def workspace_lock(root: Path, wait_s: float | None) -> Iterator[None]:
    """Hold ``root``'s workspace slot while the body runs."""
    name = lock_name(root)
    logger = get_run_logger()
    _ensure_limit(name)
    asked = time.monotonic()
    # Renewal failures (a brief API outage) must not kill a days-long training run: the lease's own
    # expiry is what frees the slot of a run that died.
    with concurrency(name, occupy=1, timeout_seconds=wait_s, strict=True, lease_duration=LEASE_S,
                     raise_on_lease_renewal_failure=False):
        waited = time.monotonic() - asked
        logger.info("holding the workspace lock of %s (%s)%s", root, name,
                    f" after waiting {waited:.0f}s for another run" if waited >= 1 else "")
        yield
