"""The optimisation backend the trainer drives: forward module, backward, optimizer step, export, save.

Two implementations: ``torch`` (AdamW, here) and ``deepspeed``, the extension ``deepspeed_backend``
that infra provides (``attnrl.utils.registry.extension``), so the pure core never imports DeepSpeed.
An unknown name lists the known ones. ``build_backend`` prepares the model the same way for both: gradient
checkpointing as configured, and a ``ResponseScorer`` around it, which is what the backend
optimises (its forward returns per-token log-probs, never full logits; spec §11).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import torch
from transformers import PreTrainedModel

from attnrl.errors import ConfigError
from attnrl.training.chunked_head import ResponseScorer
from attnrl.training.weights import WeightStream
from attnrl.utils.registry import extension, lookup
from attnrl.utils.tensor_files import load_tensor_file

if TYPE_CHECKING:  # read by attribute only: the trainer runs without pydantic (benchmarks/gpu_scale_check.py)
    from attnrl.config.schema import TrainConfig

OPTIMIZER_FILE = "optimizer.pt"


@runtime_checkable
class OptimizerBackend(Protocol):
    module: torch.nn.Module  # call it for forward passes that need gradients (the scorer, maybe wrapped)
    scorer: ResponseScorer  # the unwrapped module: its ``lm`` is the policy model

    def backward(self, loss: torch.Tensor, *, boundary: bool) -> None:
        """Accumulate gradients; ``boundary`` marks the last micro-batch of an optimizer step."""

    def step(self) -> float:
        """Clip, step and zero the gradients; return the pre-clip gradient norm (non-finite: step skipped)."""

    def export_weights(self) -> dict[str, torch.Tensor]:
        """The policy's full state dict in its Hugging Face names (gathered where parameters are partitioned)."""

    def weight_stream(self, dtype: torch.dtype) -> WeightStream:
        """The policy's parameters for the engines' weight transfer: full shapes, ``dtype``, module by module."""

    def prepare_reference(self, model: torch.nn.Module) -> torch.nn.Module:
        """The frozen reference model, placed the way this backend runs inference (spec §11)."""

    def save(self, directory: Path) -> None:
        """Write what a resume needs beyond the exported weights (optimizer state, master weights) into ``directory``."""

    def load(self, directory: Path) -> None:
        """Restore what ``save`` wrote; the module must already hold the checkpoint's exported weights."""


class TorchBackend:
    """Plain torch AdamW with gradient clipping (spec §11: a non-finite norm skips the step).

    The model's parameters are the fp32 master weights; bf16 happens only inside autocast.
    """

    def __init__(self, scorer: ResponseScorer, config: TrainConfig) -> None:
        require_scorer(scorer, type(self).__name__)
        self.module = self.scorer = scorer
        self.grad_clip = config.grad_clip
        self.optimizer = torch.optim.AdamW(
            scorer.parameters(), lr=config.lr, betas=(0.9, 0.999), weight_decay=config.weight_decay
        )

    def backward(self, loss: torch.Tensor, *, boundary: bool) -> None:
        loss.backward()

    def step(self) -> float:
        norm = float(torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.grad_clip))
        if torch.isfinite(torch.tensor(norm)):
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    def export_weights(self) -> dict[str, torch.Tensor]:
        return {k: v.detach() for k, v in self.scorer.lm.state_dict().items()}

    def weight_stream(self, dtype: torch.dtype) -> WeightStream:
        return WeightStream(self.scorer.lm, dtype)

    def prepare_reference(self, model: torch.nn.Module) -> torch.nn.Module:
        return model

    def save(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        torch.save(self.optimizer.state_dict(), directory / OPTIMIZER_FILE)

    def load(self, directory: Path) -> None:
        self.optimizer.load_state_dict(load_tensor_file(directory / OPTIMIZER_FILE))


def require_scorer(module: torch.nn.Module, backend: str) -> None:
    """Backends optimise a ``ResponseScorer`` (what ``build_backend`` makes); a bare LM has another forward."""
    if not isinstance(module, ResponseScorer):
        raise TypeError(f"{backend} optimises a ResponseScorer, got {type(module).__name__}: "
                        "use build_backend(name, model, config)")


def autocast_dtype(config: TrainConfig, device: torch.device) -> torch.dtype | None:
    """bf16 compute under fp32 master weights and gradients (verl's FSDP mixed precision, spec §11):
    'bf16', or 'auto' where the device supports it (CUDA with bf16); None = plain fp32."""
    if config.precision == "bf16":
        return torch.bfloat16
    if config.precision == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return None


BACKENDS: dict[str, Callable[[], type]] = {
    "torch": lambda: TorchBackend,
    "deepspeed": lambda: extension("deepspeed_backend", "train.backend 'deepspeed'"),
}


def build_backend(name: str, model: PreTrainedModel, config: TrainConfig) -> OptimizerBackend:
    """The ``name`` backend over ``model``: gradient checkpointing as configured, wrapped in a ``ResponseScorer``."""
    backend_class = lookup(BACKENDS, name, "train.backend", ConfigError)()
    if config.gradient_checkpointing:
        enable_activation_checkpointing(model)
    return backend_class(ResponseScorer(model, config.logits_chunk_tokens), config)


def enable_activation_checkpointing(model: PreTrainedModel) -> None:
    """Recompute every decoder layer in the backward (``train.gradient_checkpointing``), non-reentrant:
    it works with inputs that need no gradient and with ZeRO-3's parameter hooks, and gives the same
    gradients as keeping the activations."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # the name since transformers 5.2x
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
