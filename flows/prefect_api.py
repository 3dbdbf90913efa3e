"""Which Prefect API a command-line run reports to (docs/orchestration.md, "Prefect server and deployments").

Prefect's own settings first: ``PREFECT_API_URL`` from the environment or the active profile. Without
one, the server that ``make server`` started for this project, if it answers: it writes its URL to
``.prefect-server/api_url`` in the project directory, where ``dvc repro`` runs every stage, so all the
stages of a ``dvc repro`` report to that one server and show in its UI instead of each starting a
temporary API (and gone with its runs). Only without either does the command start a temporary API.

The temporary API is Prefect's server app (served by uvicorn, with the services a run needs:
``TEMPORARY_API_SETTINGS``) on a free 127.0.0.1 port, owned by the command: it runs in its own session, so the Ctrl-C a terminal sends to
the command's process group does not take it away while the run still reports its end; the kernel
sends it SIGTERM if the command dies, SIGKILL included (Linux's parent-death signal); and the command
stops it on its way out, however it ends. (Prefect's own temporary server shares the terminal's process
group and is stopped only by an ``atexit`` hook, which a default SIGTERM never runs.)
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from attnrl.errors import AttnRLError

SERVER_URL_FILE = Path(".prefect-server") / "api_url"  # written by scripts/prefect_server.sh start
HEALTH_TIMEOUT_S = 2.0
TEMPORARY_START_TIMEOUT_S = 120.0
TEMPORARY_STOP_GRACE_S = 10.0
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
# A temporary API runs the services a run needs: the task-run recorder and the event services (as Prefect's own
# temporary server does), and the repossessor with leases kept in files beside PREFECT_HOME's database, which
# all temporary APIs share: the workspace slot of a command killed outright (its API gone with it) is freed by
# the next command's API once the lease expires. None of the deployment services (scheduler, late runs,
# foreman, cancellation cleanup, pause expirations), no UI.
TEMPORARY_API_SETTINGS = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_UI_ENABLED": "false",
    **{f"PREFECT_SERVER_SERVICES_{name}_ENABLED": "false"
       for name in ("SCHEDULER", "LATE_RUNS", "FOREMAN", "CANCELLATION_CLEANUP", "PAUSE_EXPIRATIONS")},
    "PREFECT_SERVER_SERVICES_REPOSSESSOR_ENABLED": "true",
    "PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE": "prefect.server.concurrency.lease_storage.filesystem",
}


@dataclass(frozen=True)
class PrefectAPI:
    """The API a command reports to: ``note`` says which when it is not Prefect's own choice (None: one
    configured in Prefect's settings); ``temporary``: it ends with the command."""

    note: str | None
    temporary: bool = False


def answers(api_url: str) -> bool:
    """Whether a Prefect API answers its health check at ``api_url`` (…/api)."""
    try:
        with urllib.request.urlopen(f"{api_url.rstrip('/')}/health", timeout=HEALTH_TIMEOUT_S) as response:
            return response.status == 200
    except OSError:
        return False


@contextlib.contextmanager
def project_prefect_api(directory: Path, start_temporary: bool = True) -> Iterator[PrefectAPI]:
    """Inside: Prefect reports to the API chosen as above (with no API to report to and not
    ``start_temporary``, Prefect has none)."""
    from prefect.settings import PREFECT_API_URL, get_current_settings, temporary_settings

    if get_current_settings().api.url:
        yield PrefectAPI(None)
        return
    recorded = directory / SERVER_URL_FILE
    url = recorded.read_text().strip() if recorded.is_file() else None
    if url is not None and answers(url):
        with temporary_settings(updates={PREFECT_API_URL: url}):
            yield PrefectAPI(f"reporting to this project's Prefect server at {url} ({recorded})")
        return
    stale = f"no Prefect server answers at {url} ({recorded})" if url is not None else None
    if not start_temporary:
        yield PrefectAPI(stale)
        return
    with temporary_api() as temporary, temporary_settings(updates={PREFECT_API_URL: temporary}):
        started = (f"started a temporary Prefect API at {temporary} for this command (it ends with the command; "
                   "`make server` keeps runs)")
        yield PrefectAPI(f"{stale}: {started}" if stale else started, temporary=True)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _die_with_parent() -> Callable[[], None] | None:
    """What the server's process runs before it starts: SIGTERM when the command's process ends (Linux; None
    elsewhere). The C function is looked up here, in the command: the forked child only calls it."""
    if not sys.platform.startswith("linux"):
        return None
    return functools.partial(ctypes.CDLL(None, use_errno=True).prctl, PR_SET_PDEATHSIG, signal.SIGTERM)


@contextlib.contextmanager
def temporary_api() -> Iterator[str]:
    """A Prefect API for this command only; yields its URL (…/api) once it answers, stops it on exit."""
    port = _free_port()
    url = f"http://127.0.0.1:{port}/api"
    # Prefect's server app, served by uvicorn in one process (``prefect server start`` would run it in a child
    # of its own, which the parent-death signal does not reach), with the services a run needs and no UI.
    env = os.environ | TEMPORARY_API_SETTINGS
    env.pop("PREFECT_API_URL", None)
    command = [sys.executable, "-m", "uvicorn", "--factory", "prefect.server.api.server:create_app",
               "--host", "127.0.0.1", "--port", str(port), "--log-level", "error", "--lifespan", "on"]
    with contextlib.ExitStack() as stack:
        log = stack.enter_context(tempfile.TemporaryFile())
        server = subprocess.Popen(command, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log,
                                  start_new_session=True, preexec_fn=_die_with_parent())
        stack.callback(_stop, server)
        stack.callback(_drain_prefect_workers)  # first (a stack unwinds in reverse): the run's last logs and events
        deadline = time.monotonic() + TEMPORARY_START_TIMEOUT_S
        while not answers(url):
            if server.poll() is not None:
                log.seek(0)
                raise AttnRLError(f"the temporary Prefect API exited with status {server.returncode} before it "
                                  f"answered at {url}: {log.read().decode(errors='replace')[-2000:]}")
            if time.monotonic() > deadline:
                raise AttnRLError(f"the temporary Prefect API did not answer at {url} within "
                                  f"{TEMPORARY_START_TIMEOUT_S:.0f}s")
            time.sleep(0.2)
        yield url


def _drain_prefect_workers() -> None:
    """Send the logs and events Prefect's background workers still hold, while the API is there to take them
    (what Prefect's own test harness does before it stops its server); bounded, as a stopped run must end."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    for worker in (APILogWorker, EventsWorker):
        worker.drain_all(timeout=TEMPORARY_STOP_GRACE_S, at_exit=False)


def _stop(server: subprocess.Popen) -> None:
    """SIGTERM to the server's session, SIGKILL after the grace period; reaped either way."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(server.pid, signal.SIGTERM)
    try:
        server.wait(timeout=TEMPORARY_STOP_GRACE_S)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, signal.SIGKILL)
        server.wait()
