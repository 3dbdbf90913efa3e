"""Which Prefect API a command-line run reports to (README, "Prefect server and deployments").

Prefect's own settings first: ``PREFECT_API_URL`` from the environment or the active profile. Without
one, the server that ``make server`` started for this project, if it answers: it writes its URL to
``.prefect-server/api_url`` in the project directory, where ``dvc repro`` runs every stage, so all the
stages of a ``dvc repro`` report to that one server and show in its UI instead of each starting a
temporary API (about 15 s each, and gone with its runs). Only without either does Prefect start one.
"""

from __future__ import annotations

import contextlib
import urllib.request
from collections.abc import Iterator
from pathlib import Path

SERVER_URL_FILE = Path(".prefect-server") / "api_url"  # written by scripts/prefect_server.sh start
HEALTH_TIMEOUT_S = 2.0


def answers(api_url: str) -> bool:
    """Whether a Prefect API answers its health check at ``api_url`` (…/api)."""
    try:
        with urllib.request.urlopen(f"{api_url.rstrip('/')}/health", timeout=HEALTH_TIMEOUT_S) as response:
            return response.status == 200
    except OSError:
        return False


@contextlib.contextmanager
def project_prefect_api(directory: Path) -> Iterator[str | None]:
    """Inside: Prefect reports to the API chosen as above. Yields a line saying which when it is not
    Prefect's own choice (None: a configured API, or a temporary one and nothing to say)."""
    from prefect.settings import PREFECT_API_URL, get_current_settings, temporary_settings

    recorded = directory / SERVER_URL_FILE
    if get_current_settings().api.url or not recorded.is_file():
        yield None
        return
    url = recorded.read_text().strip()
    if not answers(url):
        yield f"no Prefect server answers at {url} ({recorded}): Prefect starts a temporary API for this run"
        return
    with temporary_settings(updates={PREFECT_API_URL: url}):
        yield f"reporting to this project's Prefect server at {url} ({recorded})"
