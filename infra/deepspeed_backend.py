"""DeepSpeed as the trainer's optimisation backend (spec §11; architecture.md: infra adapters).

ZeRO stages 0–3. In bf16 (``train.precision``, where the device has it) DeepSpeed keeps bf16
weights for the forwards and fp32 master weights, optimizer state and gradient accumulation
(stage 0: see ``deepspeed_config``); on CPU the tests run fp32. Under ZeRO-3 parameters are
partitioned: the weight export for the rollout engines and the checkpoints gathers them one
parameter at a time. Checkpoints use DeepSpeed's own ``save_checkpoint``/``load_checkpoint``
(per-rank optimizer and master-weight partitions), so a resume continues exactly whatever the stage
and precision; DeepSpeed's files are read with ``weights_only=True`` (``WeightsOnlyLoads``), never
unpickled freely. The frozen reference model runs as a ZeRO-3 inference engine, its parameters
optionally offloaded to CPU (``train.reference_offload``; spec §11: the official reference model is
offloaded).

A single process initialises ``torch.distributed`` itself (gloo on CPU, nccl on GPU); a
launcher (``deepspeed``/``torchrun``) that already set ``RANK`` etc. is respected. Two CPU
pitfalls are avoided (stack-notes.md): the optimizer is a torch AdamW passed in (a DeepSpeed
``optimizer`` section would JIT-compile FusedAdam), and the shared-memory comm op is disabled
before initialisation (it would JIT-compile too).
"""

from __future__ import annotations

import math
import os
import socket
from pathlib import Path
from typing import Any

import torch

from attnrl.config.schema import TrainConfig
from attnrl.errors import ConfigError
from attnrl.training.backend import autocast_dtype, require_scorer
from attnrl.training.chunked_head import ResponseScorer
from attnrl.training.weights import WeightStream
from attnrl.utils.tensor_files import load_tensor_file

CHECKPOINT_TAG = "engine"  # one DeepSpeed checkpoint per attnrl checkpoint directory


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# Names the MASTER_PORT that _single_process_env chose, so a child process that inherits the variables
# (a flow run started from a process that trained) does not take them for a real launcher's.
_OWN_PORT = "ATTNRL_SINGLE_PROCESS_MASTER_PORT"


def local_rank_of(device: torch.device) -> int:
    """The ``LOCAL_RANK`` that keeps DeepSpeed's engine on ``device``.

    The engine reads ``LOCAL_RANK``, makes that accelerator index the current device and moves the
    model there (``DeepSpeedEngine._set_distributed_vars`` and ``_configure_distributed_model`` in
    DeepSpeed 0.19); ZeRO allocates its buffers on the current device. So it must be the index of
    the trainer's own device among those this process sees, not 0.
    """
    if device.type == "cpu":
        return 0
    if device.index is None:
        raise ValueError(f"{device}: name the device index (a model's parameters always have one)")
    return device.index


def visible_index(assigned: list[str], visible: str | None) -> int:
    """The index, among this process's visible CUDA devices, of the one GPU Ray ``assigned`` it.

    Ray sets ``CUDA_VISIBLE_DEVICES`` to an actor's GPUs, so that GPU is usually device 0; with
    ``RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES`` the actor sees every GPU and must pick its own.
    """
    if len(assigned) != 1:
        raise ValueError(f"a trainer rank needs exactly one GPU, Ray assigned {assigned or 'none'}")
    ids = [d.strip() for d in visible.split(",")] if visible else None
    if ids is None:  # every device is visible: Ray's id is the index
        return int(assigned[0])
    if assigned[0] not in ids:
        raise ValueError(f"Ray assigned GPU {assigned[0]} but CUDA_VISIBLE_DEVICES is {visible!r}")
    return ids.index(assigned[0])


def _single_process_env(device: torch.device) -> None:
    """A world of one for DeepSpeed on ``device`` when no launcher (deepspeed, torchrun) set one up."""
    ours = "MASTER_PORT" in os.environ and os.environ.get(_OWN_PORT) == os.environ["MASTER_PORT"]
    local_rank = str(local_rank_of(device))
    if "RANK" in os.environ and not ours:
        # A real launcher's world (or a TrainerRank's): its LOCAL_RANK must name the trainer's device.
        if os.environ.get("LOCAL_RANK") != local_rank:
            raise ConfigError(
                f"the trainer's device is {device} but LOCAL_RANK is {os.environ.get('LOCAL_RANK')!r}: DeepSpeed would "
                f"move the model to device {os.environ.get('LOCAL_RANK')}; set model.device to match the launcher"
            )
        return
    os.environ["LOCAL_RANK"] = local_rank  # the device of this backend, also when the world already exists
    if ours and torch.distributed.is_available() and torch.distributed.is_initialized():
        return  # this process already set it up
    port = str(_free_port())  # an inherited port is still held by the parent's store
    os.environ.update(RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=port, **{_OWN_PORT: port})


def _import_deepspeed(device: torch.device):
    """DeepSpeed, imported for this process's world on ``device`` without JIT-compiling ops on CPU."""
    _single_process_env(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)  # what DeepSpeed will do too; ZeRO's buffers go to the current device
    if not torch.cuda.is_available():
        # Name the accelerator: otherwise DeepSpeed probes and prints a warning on stdout.
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    shm = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if shm is not None:
        deepspeed.ops.__compatible_ops__[shm.NAME] = False
    return deepspeed


def _precision_section(bf16: bool) -> dict[str, Any]:
    if not bf16:
        return {}
    # Gradients accumulate over micro-batches in fp32 (BF16_Optimizer / ZeRO's fp32 accumulation), and
    # a non-finite gradient skips the step (spec §11).
    return {"bf16": {"enabled": True, "check_grad_overflow": True}, "data_types": {"grad_accum_dtype": "fp32"}}


def deepspeed_config(config: TrainConfig, device: torch.device) -> dict[str, Any]:
    """The training engine's config. Accumulation is driven per step by the trainer (mini-batches vary
    in size), so DeepSpeed sees one micro-batch per step; the trainer's loss is already the exact
    mini-batch share (``loss.Normaliser``).

    bf16 is DeepSpeed's own at ZeRO 1–3. At stage 0 DeepSpeed 0.19 cannot accumulate bf16
    gradients in fp32 (NotImplementedError: "unsupported mix of model_dtype=torch.bfloat16 and
    grad_accum_dtype=torch.float32") and would accumulate them in bf16, so there the engine stays
    fp32 and the trainer's bf16 autocast does the compute: fp32 weights and gradients all the same.
    """
    bf16 = autocast_dtype(config, device) is torch.bfloat16 and config.zero_stage > 0
    return {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": config.grad_clip,
        "zero_optimization": {"stage": config.zero_stage},
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
        **_precision_section(bf16),
    }


def reference_config(offload: bool, bf16: bool) -> dict[str, Any]:
    """A ZeRO-3 inference-only engine: parameters partitioned over ranks, optionally offloaded to CPU."""
    zero: dict[str, Any] = {"stage": 3}
    if offload:
        zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    return {"train_micro_batch_size_per_gpu": 1, "zero_optimization": zero, "steps_per_print": 2**31 - 1,
            **({"bf16": {"enabled": True}} if bf16 else {})}


def _grad_norm(module: torch.nn.Module) -> float:
    grads = [p.grad.detach().float().norm() for p in module.parameters() if p.grad is not None]
    return float(torch.stack(grads).norm()) if grads else 0.0


def deepspeed_checkpoint_globals() -> list[Any]:
    """The classes DeepSpeed 0.19 pickles into its ZeRO optimizer files beyond tensors and plain values
    (found with ``torch.serialization.get_unsafe_globals_in_checkpoint`` at stages 0–3, fp32 and bf16)."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, ZeroStageEnum, fragment_address]


class WeightsOnlyLoads:
    """DeepSpeed's checkpoint engine, reading files with ``weights_only=True`` and ``deepspeed_checkpoint_globals``
    (its ``TorchCheckpointEngine.load`` unpickles anything). Everything else is the wrapped engine's."""

    def __init__(self, engine: Any) -> None:
        self._engine = engine

    def load(self, path: str, map_location: Any = None) -> Any:
        return load_tensor_file(path, allowed=deepspeed_checkpoint_globals(), map_location=map_location)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)


class DeepSpeedBackend:
    """``OptimizerBackend`` over a DeepSpeed engine that wraps the trainer's ``ResponseScorer``."""

    def __init__(self, scorer: ResponseScorer, config: TrainConfig) -> None:
        require_scorer(scorer, type(self).__name__)
        device = next(scorer.parameters()).device
        self._deepspeed = deepspeed = _import_deepspeed(device)
        optimizer = torch.optim.AdamW(
            scorer.parameters(), lr=config.lr, betas=(0.9, 0.999), weight_decay=config.weight_decay
        )
        self.engine, _, _, _ = deepspeed.initialize(
            model=scorer, optimizer=optimizer, config=deepspeed_config(config, device)
        )
        self.engine.checkpoint_engine = WeightsOnlyLoads(self.engine.checkpoint_engine)
        self.module = self.engine
        self.scorer = scorer
        self.zero_stage = config.zero_stage
        self.reference_offload = config.reference_offload
        self._reference_engines: list[Any] = []  # kept alive with the trainer

    def backward(self, loss: torch.Tensor, *, boundary: bool) -> None:
        self.engine.set_gradient_accumulation_boundary(boundary)
        self.engine.backward(loss)

    def step(self) -> float:
        self.engine.set_gradient_accumulation_boundary(True)
        if self.zero_stage == 0 and not self.engine.bfloat16_enabled():
            # Plain fp32 ZeRO-0 neither checks nor reports the norm: do both here (spec §11: a
            # non-finite gradient norm skips the step). ZeRO 1–3 and bf16 skip such a step themselves.
            norm = _grad_norm(self.engine.module)
            if not math.isfinite(norm):
                self.engine.optimizer.zero_grad(set_to_none=True)
                return norm
            self.engine.step()
            return norm
        self.engine.step()
        if not self.engine.was_step_applied():
            return float("inf")
        reported = self.engine.get_global_grad_norm()
        return float("nan") if reported is None else float(reported)

    def export_weights(self) -> dict[str, torch.Tensor]:
        """The full state dict in Hugging Face names, gathered one parameter at a time under ZeRO-3
        (a partitioned model never has to exist whole twice). Tied names share one tensor, as in
        ``state_dict()``."""
        lm = self.scorer.lm
        if self.zero_stage < 3:
            return {k: v.detach() for k, v in lm.state_dict().items()}
        gathered: dict[int, torch.Tensor] = {}
        out = {}
        for name, tensor in lm.state_dict(keep_vars=True).items():
            if id(tensor) not in gathered:
                if hasattr(tensor, "ds_id"):
                    with self._deepspeed.zero.GatheredParameters([tensor], modifier_rank=None):
                        gathered[id(tensor)] = tensor.detach().clone()
                else:  # a buffer, never partitioned
                    gathered[id(tensor)] = tensor.detach()
            out[name] = gathered[id(tensor)]
        return out

    def weight_stream(self, dtype: torch.dtype) -> WeightStream:
        """Under ZeRO-3 each module's parameters are gathered in one collective (``GatheredParameters`` over the
        module's list: a coalesced all-gather) and copied out at their full ``ds_shape``; every rank must iterate."""
        if self.zero_stage < 3:
            return WeightStream(self.scorer.lm, dtype)
        gathered = self._deepspeed.zero.GatheredParameters
        return WeightStream(self.scorer.lm, dtype, gather=lambda params: gathered(params, modifier_rank=None),
                            full_shape=lambda p: tuple(p.ds_shape))

    def prepare_reference(self, model: torch.nn.Module) -> torch.nn.Module:
        bf16 = next(model.parameters()).dtype is torch.bfloat16
        engine, _, _, _ = self._deepspeed.initialize(model=model, config=reference_config(self.reference_offload, bf16))
        engine.eval()
        self._reference_engines.append(engine)
        # The model itself: its modules now carry the engine's hooks that fetch each layer's parameters.
        return engine.module

    def save(self, directory: Path) -> None:
        self.engine.save_checkpoint(str(directory), tag=CHECKPOINT_TAG, save_latest=False)

    def load(self, directory: Path) -> None:
        path, _ = self.engine.load_checkpoint(
            str(directory), tag=CHECKPOINT_TAG, load_optimizer_states=True, load_lr_scheduler_states=False
        )
        if path is None:
            raise FileNotFoundError(f"{directory}: no DeepSpeed checkpoint '{CHECKPOINT_TAG}' to resume from")
