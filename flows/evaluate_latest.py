"""The ``evaluate-latest`` flow: evaluate the newest trained policy into ``runs/eval-latest``.

The newest complete checkpoint (``runs/train/checkpoints/<latest>/model``, as named by the ``latest``
pointer that :func:`attnrl.training.checkpoint.save_checkpoint` writes last) wins; without one the final
policy (``runs/train/final``) is used. With neither, the flow fails at once with a ModelLoadError that
names both places. Scheduled by the ``evaluate-latest`` deployment in ``prefect.yaml``.
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow, get_run_logger

from attnrl.errors import ModelLoadError
from attnrl.stages.evaluate import EvaluationResult
from attnrl.stages.layout import Layout
from attnrl.training.checkpoint import latest_checkpoint
from flows.stages import DEFAULT_CONFIG, evaluate_flow, load_flow_config

OUT_DIR_NAME = "eval-latest"


def newest_model_dir(train_dir: Path) -> Path:
    """The model of the newest complete checkpoint under ``train_dir``, else ``train_dir/final``."""
    checkpoint = latest_checkpoint(train_dir / "checkpoints")
    if checkpoint is not None and (checkpoint / "model" / "config.json").is_file():
        return checkpoint / "model"
    final = train_dir / "final"
    if (final / "config.json").is_file():
        return final
    raise ModelLoadError(
        f"no trained policy to evaluate: no complete checkpoint in {train_dir / 'checkpoints'} "
        f"and no final model in {final}; run the train stage first"
    )


@flow(name="evaluate-latest", log_prints=True)
def evaluate_latest(config_path: str = DEFAULT_CONFIG, overrides: list[str] | None = None, root: str = ".",
                    method: str | None = None) -> EvaluationResult:
    """Evaluate the newest checkpoint (or the final policy) into ``<runs_dir>/eval-latest``."""
    layout = Layout.of(load_flow_config(config_path, overrides, method), root)
    model_dir = newest_model_dir(layout.train_dir)
    get_run_logger().info("evaluating %s", model_dir)
    return evaluate_flow(config_path=config_path, overrides=overrides, root=root, method=method,
                         model_dir=str(model_dir), out_dir=str(layout.runs_dir / OUT_DIR_NAME))
