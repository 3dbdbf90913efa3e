"""Every deployment's entrypoint loads without the stages' heavy libraries. Prefect loads a deployment's flow
in a fresh process only to read it (its cancellation hooks, before a cancelled run is marked Cancelled), so
what that module imports is time a cancelled run waits for (flows/stages.py)."""

from __future__ import annotations

import json
import subprocess
import sys

import yaml

from tests.conftest import PROJECT_ROOT

HEAVY = ("torch", "transformers", "great_expectations", "pandas", "ray", "deepspeed", "vllm", "scipy")


def _entrypoints() -> list[str]:
    deployments = yaml.safe_load((PROJECT_ROOT / "prefect.yaml").read_text())["deployments"]
    return sorted({d["entrypoint"] for d in deployments})


def test_every_deployment_entrypoint_loads_its_flow_without_the_heavy_libraries():
    entrypoints = _entrypoints()
    assert len(entrypoints) >= 3, entrypoints
    script = (
        "import json, sys\n"
        "from prefect.flows import load_flow_from_entrypoint\n"
        f"for entrypoint in {entrypoints!r}:\n"
        "    load_flow_from_entrypoint(entrypoint)\n"
        f"print(json.dumps(sorted(m for m in {HEAVY!r} if m in sys.modules)))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], cwd=PROJECT_ROOT, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1]) == [], done.stdout
