from __future__ import annotations

import pytest
import torch

from attnrl.errors import ModelLoadError
from attnrl.model.loading import load_policy, save_policy


def test_save_and_load_like_a_hub_checkpoint(tmp_path, tiny_policy, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model, tokenizer = tiny_policy
    save_policy(model, tokenizer, tmp_path / "policy")
    bundle = load_policy(tmp_path / "policy", dtype="float32", device="cpu")
    ids = torch.tensor([tokenizer.encode("3+5\n\n8", add_special_tokens=False)])
    with torch.no_grad():
        assert torch.allclose(bundle.model(ids).logits, model(ids).logits, atol=1e-6)
    assert bundle.model.config.model_type == "qwen2"


def test_missing_path_is_a_clear_error(tmp_path):
    with pytest.raises(ModelLoadError, match="model path does not exist: .*nowhere"):
        load_policy(tmp_path / "nowhere")


def test_directory_without_a_config_is_rejected(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="not a model directory"):
        load_policy(tmp_path / "empty")


def test_unknown_dtype_is_rejected(tmp_path, tiny_policy):
    model, tokenizer = tiny_policy
    save_policy(model, tokenizer, tmp_path / "p")
    with pytest.raises(ModelLoadError, match="unknown dtype"):
        load_policy(tmp_path / "p", dtype="float8")


def test_resaving_replaces_the_directory_atomically(tmp_path, tiny_policy):
    model, tokenizer = tiny_policy
    target = tmp_path / "p"
    save_policy(model, tokenizer, target)
    (target / "stale.txt").write_text("from an older save")
    save_policy(model, tokenizer, target)
    assert not (target / "stale.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p"]
