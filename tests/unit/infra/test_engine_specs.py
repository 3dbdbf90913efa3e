"""What each rollout actor is asked to build from the configuration (``infra.engine_specs``)."""

from __future__ import annotations

from pathlib import Path

from attnrl.config import resolve_config
from infra.engine_specs import hf_spec


def test_hf_actors_generate_on_the_gpu_ray_gives_them_when_asked():
    on_cpu = hf_spec(resolve_config(preset="tiny"), model_dir=Path("m"))
    on_gpu = hf_spec(resolve_config(preset="tiny", overrides=["rollout.ray.num_gpus_per_actor=1"]), model_dir=Path("m"))
    assert on_cpu.options["device"] == "cpu" and on_gpu.options["device"] == "cuda"
