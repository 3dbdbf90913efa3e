"""DeepSpeed as the trainer's optimisation backend (spec §11; architecture.md: infra adapters).

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
from typing import Any

import torch

from attnrl.config.schema import TrainConfig
from attnrl.errors import ConfigError


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# Names the MASTER_PORT that _single_process_env chose, so a child process that inherits the variables
# (a flow run started from a process that trained) does not take them for a real launcher's.
_OWN_PORT = "ATTNRL_SINGLE_PROCESS_MASTER_PORT"


def _single_process_env() -> None:
    """A world of one for DeepSpeed when no launcher (deepspeed, torchrun) set one up."""
    ours = "MASTER_PORT" in os.environ and os.environ.get(_OWN_PORT) == os.environ["MASTER_PORT"]
    if "RANK" in os.environ and not ours:
        return  # a real launcher's world
    if ours and torch.distributed.is_available() and torch.distributed.is_initialized():
        return  # this process already set it up
    port = str(_free_port())  # an inherited port is still held by the parent's store
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=port,
                      **{_OWN_PORT: port})


def deepspeed_config(config: TrainConfig) -> dict[str, Any]:
    """The engine config: ZeRO stage and clipping. Accumulation is driven per step by the trainer
    (mini-batches vary in size), so DeepSpeed sees one micro-batch per step. Precision stays fp32
    here: the trainer runs its forwards under bf16 autocast where the device allows, so master
    weights and accumulated gradients are fp32 (DeepSpeed's own bf16 mode at ZeRO-0 would
    accumulate gradients in bf16)."""
    return {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": config.grad_clip,
        "zero_optimization": {"stage": config.zero_stage},
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


def _grad_norm(module: torch.nn.Module) -> float:
    grads = [p.grad.detach().float().norm() for p in module.parameters() if p.grad is not None]
    return float(torch.stack(grads).norm()) if grads else 0.0


class DeepSpeedBackend:
    """``OptimizerBackend`` over a DeepSpeed engine."""

    def __init__(self, model: torch.nn.Module, config: TrainConfig) -> None:
        if config.zero_stage == 3:
            # Stage 3 partitions the parameters themselves: save_pretrained, the scoring forward
            # and the weight push to the rollout engine would all need gathering first.
            raise ConfigError("train.zero_stage: 3 is not supported yet (parameters would need gathering); use 0-2")
        _single_process_env()
        if not torch.cuda.is_available():
            # Name the accelerator: otherwise DeepSpeed probes and prints a warning on stdout.
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        import deepspeed
        from deepspeed.accelerator import get_accelerator

        shm = get_accelerator().create_op_builder("ShareMemCommBuilder")
        if shm is not None:
            deepspeed.ops.__compatible_ops__[shm.NAME] = False
        optimizer = torch.optim.AdamW(
            model.parameters(), lr=config.lr, betas=(0.9, 0.999), weight_decay=config.weight_decay
        )
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, config=deepspeed_config(config)
        )
        self.module = self.engine
        self.zero_stage = config.zero_stage

    def backward(self, loss: torch.Tensor, *, boundary: bool) -> None:
        self.engine.set_gradient_accumulation_boundary(boundary)
        self.engine.backward(loss)

    def step(self) -> float:
        self.engine.set_gradient_accumulation_boundary(True)
        # ZeRO-0 keeps whole gradients on the parameters but does not report their norm.
        norm = _grad_norm(self.engine.module) if self.zero_stage == 0 else None
        if norm is not None and not math.isfinite(norm):
            # Spec §11: a non-finite gradient norm skips the step (fp32 DeepSpeed does not check).
            self.engine.optimizer.zero_grad(set_to_none=True)
            return norm
        self.engine.step()
        reported = self.engine.get_global_grad_norm()
        if reported is not None:
            norm = float(reported)
        return float("nan") if norm is None else norm

    def state_dict(self) -> dict[str, Any]:
        return self.optimizer.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.zero_stage == 0:
            self.optimizer.load_state_dict(state)
        else:
            # ZeRO optimizers take one state per data-parallel rank; their fp32 partitions are
            # rebuilt from the module, which was loaded from the same checkpoint.
            self.optimizer.load_state_dict([state], load_optimizer_states=True, load_from_fp32_weights=False)
