"""The optimisation backend the trainer drives: forward module, backward, optimizer step.

Implementations are registered by import path so the pure core never imports DeepSpeed:
``torch`` (AdamW, here) and ``deepspeed`` (``infra/deepspeed_backend.py``). An unknown name
lists the known ones.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch

from attnrl.config.schema import TrainConfig
from attnrl.errors import ConfigError
from attnrl.utils.registry import load_object, lookup


@runtime_checkable
class OptimizerBackend(Protocol):
    module: torch.nn.Module  # call it for forward passes that need gradients

    def backward(self, loss: torch.Tensor, *, boundary: bool) -> None:
        """Accumulate gradients; ``boundary`` marks the last micro-batch of an optimizer step."""

    def step(self) -> float:
        """Clip, step and zero the gradients; return the pre-clip gradient norm."""

    def state_dict(self) -> dict[str, Any]:
        """Optimizer (and scheduler) state for checkpoints."""

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class TorchBackend:
    """Plain torch AdamW with gradient clipping (spec §11: a non-finite norm skips the step).

    The model's parameters are the fp32 master weights; bf16 happens only inside autocast.
    """

    def __init__(self, model: torch.nn.Module, config: TrainConfig) -> None:
        self.module = model
        self.grad_clip = config.grad_clip
        self.optimizer = torch.optim.AdamW(
            model.parameters(), lr=config.lr, betas=(0.9, 0.999), weight_decay=config.weight_decay
        )

    def backward(self, loss: torch.Tensor, *, boundary: bool) -> None:
        loss.backward()

    def step(self) -> float:
        norm = float(torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.grad_clip))
        if torch.isfinite(torch.tensor(norm)):
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    def state_dict(self) -> dict[str, Any]:
        return self.optimizer.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state)


def autocast_dtype(config: TrainConfig, device: torch.device) -> torch.dtype | None:
    """bf16 compute under fp32 master weights and gradients (verl's FSDP mixed precision, spec §11):
    'bf16', or 'auto' where the device supports it (CUDA with bf16); None = plain fp32."""
    if config.precision == "bf16":
        return torch.bfloat16
    if config.precision == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return None


BACKENDS = {"torch": "attnrl.training.backend:TorchBackend", "deepspeed": "infra.deepspeed_backend:DeepSpeedBackend"}


def build_backend(name: str, model: torch.nn.Module, config: TrainConfig) -> OptimizerBackend:
    return load_object(lookup(BACKENDS, name, "train.backend", ConfigError), "train.backend")(model, config)
