"""The ``evaluate-latest`` flow: evaluate the newest trained policy into ``runs/eval-latest``.

The newest complete checkpoint (``runs/train/checkpoints/<latest>/model``, as named by the ``latest``
pointer that :func:`attnrl.training.checkpoint.save_checkpoint` writes last) wins; without one the final
policy (``runs/train/final``) is used. With neither, the flow fails at once with a ModelLoadError that
names both places. Run by the ``evaluate-latest`` deployment in ``prefect.yaml`` every 6 hours and
whenever a run of a train deployment completes (its trigger passes that run as ``train_flow_run``).
"""

from __future__ import annotations

import inspect
from pathlib import Path
from uuid import UUID

from prefect import flow, get_client, get_run_logger

from attnrl.errors import ModelLoadError
from attnrl.stages.layout import CHECKPOINTS_DIR, Layout
from attnrl.stages.results import EvaluationResult
from flows.stages import DEFAULT_CONFIG, evaluate_flow, load_flow_config, train_flow
from flows.stopping import signals_recorded
from flows.workspace import run_workspace

OUT_DIR_NAME = "eval-latest"
FLOW_RUN_RESOURCE = "prefect.flow-run."


def newest_model_dir(train_dir: Path) -> Path:
    """The model of the newest complete checkpoint under ``train_dir``, else ``train_dir/final``."""
    from attnrl.training.checkpoint import latest_checkpoint  # torch: not loaded with the flow (flows/stages.py)

    checkpoints = train_dir / CHECKPOINTS_DIR
    checkpoint = latest_checkpoint(checkpoints)
    if checkpoint is not None and (checkpoint / "model" / "config.json").is_file():
        return checkpoint / "model"
    final = train_dir / "final"
    if (final / "config.json").is_file():
        return final
    raise ModelLoadError(
        f"no trained policy to evaluate: no complete checkpoint in {checkpoints} "
        f"and no final model in {final}; run the train stage first"
    )


def train_run_parameters(flow_run: str) -> tuple[str, list[str] | None, str, str | None]:
    """``config_path, overrides, root, method`` of the train flow run ``flow_run`` (its id, or its event
    resource id ``prefect.flow-run.<id>``), with the train flow's defaults for those it was not given."""
    run_id = UUID(flow_run.removeprefix(FLOW_RUN_RESOURCE))
    with get_client(sync_client=True) as client:
        given = client.read_flow_run(run_id).parameters
    defaults = {name: p.default for name, p in inspect.signature(train_flow.fn).parameters.items()}
    args = {**defaults, **given}
    return args["config_path"], args["overrides"], args["root"], args["method"]


@flow(name="evaluate-latest", log_prints=True)
def evaluate_latest(config_path: str = DEFAULT_CONFIG, overrides: list[str] | None = None, root: str = ".",
                    method: str | None = None, train_flow_run: str | None = None) -> EvaluationResult:
    """Evaluate the newest checkpoint (or the final policy) into ``<runs_dir>/eval-latest``. With
    ``train_flow_run`` (what the deployment's trigger passes when a train run completed), the policy
    that run trained is evaluated, with that run's configuration, in that run's root."""
    if train_flow_run is not None:
        config_path, overrides, root, method = train_run_parameters(train_flow_run)
    config = load_flow_config(config_path, overrides, method)
    with signals_recorded(), run_workspace(root, config, config_path, overrides, method, set()) as own:
        layout = Layout.of(config, own)
        model_dir = newest_model_dir(layout.train_dir)
        get_run_logger().info("evaluating %s%s", model_dir,
                              f", trained by flow run {train_flow_run}" if train_flow_run else "")
        return evaluate_flow(config=config, root=str(own), model_dir=str(model_dir),
                             out_dir=str(layout.runs_dir / OUT_DIR_NAME))
