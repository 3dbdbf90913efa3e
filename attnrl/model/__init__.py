"""Policy models: the tiny default model and offline loading of any local HF causal LM."""

from attnrl.model.loading import PolicyBundle, load_policy, resolve_device, save_policy

__all__ = ["PolicyBundle", "load_policy", "resolve_device", "save_policy"]
