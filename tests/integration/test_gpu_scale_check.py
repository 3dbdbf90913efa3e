"""benchmarks/gpu_scale_check.py: its settings are the paper preset's, and on CPU (--small) every section runs and
prints the JSON a GPU run prints (the same keys; memory figures null on CPU)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

from attnrl.config import resolve_config
from tests.conftest import PROJECT_ROOT

SCRIPT = PROJECT_ROOT / "benchmarks" / "gpu_scale_check.py"
MEASURE = {"seconds", "repeats", "tokens_per_s", "peak_gib", "peak_over_resident_gib"}  # every timed figure


def _script():
    spec = importlib.util.spec_from_file_location("gpu_scale_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_settings_are_the_paper_presets():
    script = _script()
    config = resolve_config(preset="r1-distill-1.5b")
    assert {key: getattr(config.train, key) for key in script.TRAIN} == script.TRAIN
    assert {key: getattr(config.algorithm, key) for key in script.ALGORITHM} == script.ALGORITHM
    assert script.TEMPERATURE == config.rollout.sampling.temperature


def test_small_run_prints_every_section_of_the_gpu_report():
    done = subprocess.run([sys.executable, str(SCRIPT), "--small"], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, cwd=PROJECT_ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout)  # stdout is the JSON alone
    sections = report["sections"]
    assert list(sections) == list(_script().SECTIONS)
    assert all(section["ok"] for section in sections.values()), {k: v.get("error") for k, v in sections.items()}
    assert set(sections["plain_forward"]) - {"ok", "seconds"} == {"64", "128", "256"}
    assert all(set(entry) == MEASURE for key, entry in sections["plain_forward"].items() if key not in {"ok", "seconds"})
    kernel = sections["fci_kernel"]["runs"]
    assert {name.split("_rows")[0] for name in kernel} == {"fp32", "fp32_tf32", "input"}
    assert all(set(run) == MEASURE | {"over_sdpa", "all_layers_seconds"} for run in kernel.values())
    accuracy = sections["fci_accuracy"]
    for name in ("fp32_float32", "fp32_float32_tf32", "input_bfloat16"):  # the CUDA path too, fp32 scores
        assert accuracy[name]["fci_max_abs_error"] <= 1e-5 * max(1.0, accuracy[name]["fci_max_abs"]), name
    passes = sections["passes"]
    assert passes["backend"] == "deepspeed" and passes["zero_stage"] == 3 and passes["micro_batches"] == 2
    assert all(set(passes[p]) == MEASURE for p in ("score", "reference", "update"))
    assert passes["update_stats"]["optimizer_steps"] == 1.0 and passes["all_scores_finite"]
    assert sections["weights"]["fingerprints_agree"]
    trees = sections["trees"]  # on CPU the SDPA segment kernel against per path: the same values, fewer tokens
    assert trees["tree_sdpa"]["reference_max_abs_diff"] <= 1e-5 and trees["tree_sdpa"]["loss_diff"] <= 1e-6
    assert trees["per_path"]["update_stats"]["optimizer_steps"] == trees["tree_sdpa"]["update_stats"]["optimizer_steps"]
    assert all(set(sections["weights"][k]) == MEASURE | {"gib"} for k in ("export_and_fingerprint",
                                                                         "stream_and_fingerprint"))
