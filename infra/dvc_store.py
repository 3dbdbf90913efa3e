"""DVC from the pipeline: record a stage's outputs after it ran, push them, save a run as an experiment.

``record_stage`` is ``dvc commit <stage> --force`` (run in the project directory): it hashes the
stage's deps, params and outs as they are now, copies the outs into the cache and writes
``dvc.lock``, so after a pipeline run ``dvc status`` is clean and ``dvc repro`` has nothing to do.
When the project has a default remote, the stage's outputs are pushed to it. Errors name the stage
and the remote, and the local cache is never touched by a failed push.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

from attnrl.errors import AttnRLError

os.environ.setdefault("DVC_NO_ANALYTICS", "1")  # no network

logger = logging.getLogger(__name__)


class VersioningError(AttnRLError):
    """DVC could not record, push or save a stage or an experiment."""


def is_dvc_project(root: str | Path) -> bool:
    root = Path(root)
    return (root / ".dvc").is_dir() and (root / "dvc.yaml").is_file()


def _dvc(root: str | Path, *args: str) -> subprocess.CompletedProcess:
    # A subprocess in the project directory: DVC resolves stage paths against the working directory,
    # which in a flow run is not necessarily the project.
    return subprocess.run([sys.executable, "-m", "dvc", *args], cwd=root, capture_output=True, text=True)


def _failure(done: subprocess.CompletedProcess) -> str:
    lines = [line for line in (done.stderr + done.stdout).splitlines() if line.strip()]
    return "\n".join(lines[-8:]) or f"exit status {done.returncode}"


def default_remote(root: str | Path) -> str | None:
    done = _dvc(root, "remote", "default")  # exits non-zero when no default remote is set
    return (done.stdout.strip() or None) if done.returncode == 0 else None


def record_stage(root: str | Path, stage: str) -> None:
    """``dvc commit <stage> --force``: outs into the cache, hashes into ``dvc.lock``."""
    done = _dvc(root, "commit", stage, "--force")
    if done.returncode != 0:
        raise VersioningError(f"dvc commit {stage} in {root} failed: {_failure(done)}")
    logger.info("dvc: recorded stage %s", stage)


def push_stage(root: str | Path, stage: str, remote: str | None = None) -> None:
    """``dvc push <stage>`` to ``remote`` (default: the project's default remote)."""
    done = _dvc(root, "push", stage, *(["--remote", remote] if remote else []))
    if done.returncode != 0:
        raise VersioningError(f"dvc push {stage} to remote {remote or 'default'!r} failed: {_failure(done)}")
    summary = done.stdout.strip().splitlines()
    logger.info("dvc: pushed stage %s (%s)", stage, summary[-1] if summary else "nothing to push")


# A remote from the environment (docs/orchestration.md, "Versioned stages"): the store's URL and, for an S3-compatible
# store, its endpoint; credentials come from the usual AWS_* variables. Written to .dvc/config.local,
# which git ignores, so a deployment's worker and a laptop can point one project at different stores.
REMOTE_URL_ENV = "ATTNRL_DVC_REMOTE"
REMOTE_ENDPOINT_ENV = "ATTNRL_DVC_REMOTE_ENDPOINT"
ENV_REMOTE = "env"


def remote_from_env(root: str | Path) -> str | None:
    """Make ``$ATTNRL_DVC_REMOTE`` (with ``$ATTNRL_DVC_REMOTE_ENDPOINT``) the project's default remote,
    named ``env``; returns its name, or None when the variable is not set."""
    url = os.environ.get(REMOTE_URL_ENV)  # the environment, not the run config: which store is per machine
    if not url:
        return None
    steps = [("remote", "add", "--local", "--force", "--default", ENV_REMOTE, url)]
    endpoint = os.environ.get(REMOTE_ENDPOINT_ENV)
    if endpoint:
        steps.append(("remote", "modify", "--local", ENV_REMOTE, "endpointurl", endpoint))
    for step in steps:
        done = _dvc(root, *step)
        if done.returncode != 0:
            raise VersioningError(f"dvc {' '.join(step[:2])} for ${REMOTE_URL_ENV}={url} failed: {_failure(done)}")
    logger.info("dvc: default remote %s = %s%s (from the environment)", ENV_REMOTE, url,
                f" at {endpoint}" if endpoint else "")
    return ENV_REMOTE


def uncached_metrics(root: str | Path) -> list[str]:
    """The metrics files ``dvc.yaml`` leaves to git (``cache: false``): an experiment must include them."""
    import yaml

    paths = []
    for stage in yaml.safe_load((Path(root) / "dvc.yaml").read_text())["stages"].values():
        for entry in stage.get("metrics", []):  # dvc.yaml's own schema: metrics are optional per stage
            if isinstance(entry, dict):  # a bare path is cached by DVC
                paths += [name for name, options in entry.items() if options.get("cache") is False]
    return paths


def untracked_ignore_files(root: str | Path) -> list[str]:
    """The ``.gitignore`` files git does not track yet: DVC writes one beside the outputs of each stage it
    records, and ``dvc exp save`` leaves untracked files out (with a warning), so without them a clone that
    applies the experiment would see every output as a file git should track."""
    done = subprocess.run(["git", "ls-files", "--others", "--exclude-standard", "-z"], cwd=root, capture_output=True,
                          text=True)
    if done.returncode != 0:
        raise VersioningError(f"git ls-files in {root} failed: {_failure(done)}")
    return [path for path in done.stdout.split("\0") if Path(path).name == ".gitignore"]


def save_experiment(root: str | Path, name: str) -> None:
    """``dvc exp save``: the workspace as it is (dvc.lock, params, metrics and the ``.gitignore`` files of the
    outputs) as experiment ``name``."""
    include = [arg for path in [*uncached_metrics(root), *untracked_ignore_files(root)]
               for arg in ("--include-untracked", path)]
    done = _dvc(root, "exp", "save", "--force", "--name", name, *include)
    if done.returncode != 0:
        raise VersioningError(f"dvc exp save --name {name} in {root} failed: {_failure(done)}")
    logger.info("dvc: saved experiment %s", name)


def git_remote(root: str | Path, name: str) -> bool:
    done = subprocess.run(["git", "remote", "get-url", name], cwd=root, capture_output=True, text=True)
    return done.returncode == 0


def push_experiment(root: str | Path, name: str, git_remote_name: str) -> None:
    """``dvc exp push``: the experiment's git ref to ``git_remote_name``, its outputs to the default remote."""
    done = _dvc(root, "exp", "push", "--force", git_remote_name, name)
    if done.returncode != 0:
        raise VersioningError(f"dvc exp push {git_remote_name} {name} failed: {_failure(done)}")
    logger.info("dvc: pushed experiment %s to %s", name, git_remote_name)
