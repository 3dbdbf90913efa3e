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
minute at a time by a thread of its own, which takes, renews and gives it back: a stop signal can end a
run's wait for the slot but never cut one of those requests half-way, and a run that dies stops renewing
it, so the slot frees itself. A run that has to wait says so within seconds and then every minute, on the
console and in its run's logs: the root, the flow run that holds it (the holder tags its flow run with
the lock's name) and how long it has waited. Subflows (the stages of a pipeline run) run under their
parent's lock and in their parent's root. Outside a DVC project (a scratch directory) there are no
versioned outputs to guard, and runs take no lock.
"""

from __future__ import annotations

import contextvars
import hashlib
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from uuid import UUID

import httpx
from prefect import get_client, get_run_logger
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterState, FlowRunFilterStateType, FlowRunFilterTags
from prefect.client.schemas.objects import ConcurrencyLeaseHolder, StateType
from prefect.client.schemas.sorting import FlowRunSort
from prefect.context import FlowRunContext
from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

from attnrl.config.identity import config_digest
from attnrl.config.schema import RunConfig
from attnrl.stages.layout import Layout
from attnrl.utils.progress import duration
from infra import dvc_store
from tasks.versioning import reads_versioned_params

OVERRIDES_DIR = "overrides"
LOCK_PREFIX = "attnrl-workspace-"
LEASE_S = 60  # a run killed outright (SIGKILL, a lost node) frees its root within a minute; Prefect's shortest
FIRST_LINE_S = 2.0  # a run that finds its root held says so after this long
WAIT_LINE_EVERY_S = 60.0  # and again this often while it waits
RELEASE_WITHIN_S = 10.0  # how long a run that ends waits for its slot to be given back


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


def _mark_holder(name: str) -> None:
    """Tag this flow run with the lock's name, so a run that waits for the lock can say who holds it."""
    context = FlowRunContext.get()
    if context is None or context.flow_run is None:
        return
    run = context.flow_run
    with get_client(sync_client=True) as client:
        client.update_flow_run(run.id, tags=sorted({*run.tags, name}))


def holder(name: str) -> str:
    """Which flow run holds lock ``name``: the newest running run tagged with it, this run excluded."""
    context = FlowRunContext.get()
    own = context.flow_run.id if context is not None and context.flow_run is not None else None
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(tags=FlowRunFilterTags(all_=[name]),
                                          state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.RUNNING]))),
            sort=FlowRunSort.START_TIME_DESC, limit=2)
    run = next((run for run in runs if run.id != own), None)
    if run is None:
        return "a run this Prefect API does not show as running (if it was killed, its lease frees the lock within a minute)"
    started = f", started {run.start_time:%Y-%m-%d %H:%M:%S} UTC" if run.start_time is not None else ""
    return f"flow run {run.name} ({run.id}{started})"


class _Lease(threading.Thread):
    """The workspace slot, taken, renewed and given back by a thread of its own. A stop signal raises only in the
    main thread: it can end the run's wait for the slot, but never cut one of these requests half-way, so a run
    that stops never leaves its slot taken (until its lease expires)."""

    def __init__(self, name: str, root: Path, wait_s: float | None, logger: Any) -> None:
        super().__init__(name="attnrl-workspace-lease", daemon=True)
        self.limit, self.root, self.wait_s, self.logger = name, root, wait_s, logger
        self.decided = threading.Event()  # the slot is taken, or taking it failed (``error``)
        self.done = threading.Event()  # the run is over, or it stopped waiting
        self.error: BaseException | None = None
        self.waited_s = 0.0
        context = FlowRunContext.get()
        run = context.flow_run if context is not None else None
        self.holder = ConcurrencyLeaseHolder(type="flow_run", id=run.id) if run is not None else None
        self.settings = contextvars.copy_context()  # the run's Prefect settings: its API (a new thread has none)

    def run(self) -> None:
        self.settings.run(self._hold)

    def _hold(self) -> None:
        try:
            with get_client(sync_client=True) as client:
                lease = self._take(client)
                if lease is None:
                    return
                self.decided.set()
                try:
                    while not self.done.wait(LEASE_S / 3):
                        try:
                            client.renew_concurrency_lease(lease, LEASE_S)
                        except Exception as exc:  # noqa: BLE001 - an API outage must not end a days-long run
                            self.logger.warning("could not renew the workspace lease of %s: %s", self.root, exc)
                finally:
                    client.release_concurrency_slots_with_lease(lease)
        except BaseException as exc:  # noqa: BLE001 - handed to the run's thread, which raises it
            self.error = exc
            self.decided.set()

    def _take(self, client: Any) -> UUID | None:
        asked = time.monotonic()
        next_line = asked + FIRST_LINE_S
        while not self.done.is_set():
            try:
                response = client.increment_concurrency_slots_with_lease([self.limit], 1, "concurrency", LEASE_S,
                                                                         holder=self.holder)
                self.waited_s = time.monotonic() - asked
                return UUID(response.json()["lease_id"])
            except httpx.HTTPStatusError as exc:
                if exc.response.status_code != 423:  # 423 Locked: another run holds it
                    raise
                retry_s = float(exc.response.headers.get("Retry-After", 1))
            waited = time.monotonic() - asked
            if self.wait_s is not None and waited >= self.wait_s:
                raise TimeoutError(f"waited {duration(waited)} (timeouts.workspace_wait_s) for the workspace lock of "
                                   f"{self.root}, held by {holder(self.limit)}")
            if time.monotonic() >= next_line:
                self.logger.info("waiting for the workspace lock of %s (%s): %s holds it; waited %s so far", self.root,
                                 self.limit, holder(self.limit), duration(waited))
                next_line += WAIT_LINE_EVERY_S
            self.done.wait(min(max(retry_s, 0.2), 1.0))
        return None


@contextmanager
def workspace_lock(root: Path, wait_s: float | None) -> Iterator[None]:
    """Hold ``root``'s workspace slot while the body runs. A run that has to wait says so at once (after
    ``FIRST_LINE_S``) and then every ``WAIT_LINE_EVERY_S``: the root, the run that holds it, the wait so far."""
    name = lock_name(root)
    logger = get_run_logger()
    _ensure_limit(name)
    lease = _Lease(name, root, wait_s, logger)
    lease.start()
    try:
        lease.decided.wait()  # a stop signal ends this wait; the lease thread then gives up or gives the slot back
        if lease.error is not None:
            raise lease.error
        _mark_holder(name)
        logger.info("holding the workspace lock of %s (%s)%s", root, name,
                    f" after waiting {duration(lease.waited_s)} for another run" if lease.waited_s >= 1 else "")
        yield
    finally:
        lease.done.set()
        _join(lease, RELEASE_WITHIN_S)


def _join(thread: threading.Thread, timeout_s: float) -> None:
    """Wait for ``thread`` (at most ``timeout_s``) even when a stop signal interrupts the wait; then raise it."""
    deadline = time.monotonic() + timeout_s
    stopped: BaseException | None = None
    while thread.is_alive() and time.monotonic() < deadline:
        try:
            thread.join(timeout=max(deadline - time.monotonic(), 0.0))
        except BaseException as exc:  # noqa: BLE001 - a stop signal: the slot is given back first
            stopped = stopped or exc
    if stopped is not None:
        raise stopped
