"""Offline loading and atomic saving of a policy (model + tokenizer) from a local directory.

The same code loads the tiny default model and a real checkpoint such as
DeepSeek-R1-Distill-Qwen-1.5B: both are ``save_pretrained`` directories. Nothing is ever
downloaded (``local_files_only``), so it works with ``HF_HUB_OFFLINE=1``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase
from transformers import PreTrainedTokenizerFast

from attnrl.errors import ModelLoadError
from attnrl.utils.atomic import atomic_path

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# A tokenizer saved from a bare ``tokenizers`` object (our tiny one) records one of these
# classes. AutoTokenizer would map it through the qwen2 model type to Qwen2Tokenizer, which
# mangles a character vocabulary (stack-notes.md), so such tokenizers load as they were saved.
_GENERIC_TOKENIZER_CLASSES = {"TokenizersBackend", "PreTrainedTokenizerFast"}


@dataclass
class PolicyBundle:
    """A loaded policy: the model, its tokenizer and where it came from."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    path: Path


def resolve_device(device: str) -> torch.device:
    """'auto' picks CUDA when available, else CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def attention_implementation(configured: str, device: torch.device) -> str:
    """``model.attn_implementation`` for a model on ``device``: 'auto' is FlexAttention on CUDA, SDPA elsewhere."""
    if configured == "auto":
        return "flex_attention" if device.type == "cuda" else "sdpa"
    return configured


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    """Load a tokenizer from a local directory, left-padded, with a pad token."""
    path = _existing_model_dir(path)
    config_file = path / "tokenizer_config.json"
    tokenizer_class = json.loads(config_file.read_text()).get("tokenizer_class") if config_file.is_file() else None
    try:
        if tokenizer_class in _GENERIC_TOKENIZER_CLASSES:
            tokenizer = PreTrainedTokenizerFast.from_pretrained(str(path), local_files_only=True)
        else:
            tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{path}: cannot load the tokenizer: {exc}") from exc
    if not tokenizer.chat_template:
        raise ModelLoadError(
            f"{path}: the tokenizer has no chat template, and every prompt is built from chat messages (spec §2.4); "
            "add one ('chat_template' in tokenizer_config.json, or chat_template.jinja), as instruct and R1 "
            "checkpoints ship it"
        )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"  # generation appends on the right
    return tokenizer


def load_policy(
    path: str | Path,
    *,
    dtype: str = "float32",
    device: str = "cpu",
    attn_implementation: str = "sdpa",
) -> PolicyBundle:
    """Load a causal LM and its tokenizer from a local ``save_pretrained`` directory; ``attn_implementation``
    'auto' is resolved for ``device`` (``attention_implementation``)."""
    path = _existing_model_dir(path)
    if dtype not in _DTYPES:
        raise ModelLoadError(f"unknown dtype {dtype!r}; known: {', '.join(_DTYPES)}")
    tokenizer = load_tokenizer(path)
    target = resolve_device(device)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(path), dtype=_DTYPES[dtype], local_files_only=True,
            attn_implementation=attention_implementation(attn_implementation, target),
        )
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{path}: cannot load the model: {exc}") from exc
    rows = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > rows:
        raise ModelLoadError(
            f"{path}: the tokenizer has {len(tokenizer)} tokens but the model's embedding only {rows} rows: ids from "
            f"{rows} on would index past it (a tokenizer from another model?)"
        )
    model.to(target)
    model.eval()
    return PolicyBundle(model=model, tokenizer=tokenizer, path=path)


def save_policy(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    path: str | Path,
    extra_files: dict[str, str] | None = None,
    state_dict: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write model, tokenizer and ``extra_files`` (name → text) atomically: a killed save leaves
    the previous directory intact. ``state_dict`` replaces the model's own weights (a trainer's
    export, gathered where the model holds only ZeRO-3 partitions)."""

    def _validate(tmp: Path) -> None:
        for required in ("config.json", "tokenizer.json"):
            if not (tmp / required).is_file():
                raise ModelLoadError(f"saving {path}: {required} was not written")
        if not any(tmp.glob("*.safetensors")):
            raise ModelLoadError(f"saving {path}: no weights were written")

    with atomic_path(path, validate=_validate) as tmp:
        model.save_pretrained(tmp, state_dict=state_dict)
        tokenizer.save_pretrained(tmp)
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
    return Path(path)


def _existing_model_dir(path: str | Path) -> Path:
    path = Path(path).expanduser()
    if not path.exists():
        raise ModelLoadError(
            f"model path does not exist: {path} (attnrl loads models from local directories only; "
            "download the checkpoint first, e.g. `huggingface-cli download <repo> --local-dir <dir>`)"
        )
    if not path.is_dir() or not (path / "config.json").is_file():
        raise ModelLoadError(f"{path}: not a model directory (no config.json)")
    return path
