"""The pure parts of run integrity: output fingerprints (retries), run roots (isolation), alert triggers,
the metrics an experiment must carry."""

from __future__ import annotations

import os

from attnrl.config import resolve_config
from flows.alerts import FAILURE_EVENTS, deployment_names, failure_trigger
from flows.workspace import isolated_root, lock_name
from infra.dvc_store import uncached_metrics
from tasks.finished_stages import outputs_fingerprint
from tasks.versioning import reads_versioned_params
from tests.conftest import PROJECT_ROOT


def test_an_output_fingerprint_changes_with_any_rewrite_and_only_then(tmp_path):
    out = tmp_path / "out"
    (out / "sub").mkdir(parents=True)
    (out / "sub" / "a.bin").write_bytes(b"weights")
    first = outputs_fingerprint([out])
    assert outputs_fingerprint([out]) == first
    os.utime(out / "sub" / "a.bin", ns=(1, 1))  # rewritten in place: same size, another mtime
    touched = outputs_fingerprint([out])
    assert touched != first
    (out / "b.txt").write_text("new file")
    assert outputs_fingerprint([out]) != touched
    assert outputs_fingerprint([tmp_path / "absent"]) != outputs_fingerprint([out])


def test_only_the_project_params_file_as_it_is_is_the_versioned_configuration(tmp_path):
    params = str(tmp_path / "params.yaml")
    assert reads_versioned_params(tmp_path, params, None, None)
    assert reads_versioned_params(tmp_path, params, [], None)
    assert not reads_versioned_params(tmp_path, params, ["train.lr=0.1"], None)
    assert not reads_versioned_params(tmp_path, params, None, "grpo")
    assert not reads_versioned_params(tmp_path, str(tmp_path / "other.yaml"), None, None)


def test_each_configuration_gets_its_own_root_and_each_root_its_own_lock(tmp_path):
    tiny = resolve_config(preset="tiny")
    other = resolve_config(preset="tiny", overrides=["train.lr=0.1"])
    assert isolated_root(tmp_path, tiny) == isolated_root(tmp_path, resolve_config(preset="tiny"))
    assert isolated_root(tmp_path, tiny) != isolated_root(tmp_path, other)
    assert isolated_root(tmp_path, tiny).parent == tmp_path / "runs" / "overrides"
    assert lock_name(tmp_path / "a") != lock_name(tmp_path / "b")
    assert lock_name(tmp_path / "a") == lock_name(tmp_path / "x" / ".." / "a")


def test_the_failure_alert_watches_every_deployment_for_failed_and_crashed_runs():
    names = deployment_names(PROJECT_ROOT / "prefect.yaml")
    assert {"pipeline-nightly", "train-on-demand", "evaluate-latest"} <= set(names)
    trigger = failure_trigger(names)
    assert trigger.expect == FAILURE_EVENTS == {"prefect.flow-run.Failed", "prefect.flow-run.Crashed"}
    related = trigger.match_related  # Prefect normalises every value to a list
    assert related["prefect.resource.role"] in ("deployment", ["deployment"])
    assert related["prefect.resource.name"] == names


def test_an_experiment_carries_the_metrics_that_dvc_leaves_to_git():
    assert sorted(uncached_metrics(PROJECT_ROOT)) == ["runs/eval-init/dvclive/metrics.json",
                                                      "runs/eval/dvclive/metrics.json"]
