from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

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


def test_a_tokenizer_without_a_chat_template_is_refused_naming_the_directory(tmp_path, tiny_policy):
    model, tokenizer = tiny_policy
    target = save_policy(model, tokenizer, tmp_path / "p")
    for name in ("tokenizer_config.json", "chat_template.jinja"):
        path = target / name
        if name.endswith(".json"):
            config = json.loads(path.read_text())
            config.pop("chat_template", None)
            path.write_text(json.dumps(config))
        else:
            path.unlink(missing_ok=True)
    with pytest.raises(ModelLoadError, match=r"/p: the tokenizer has no chat template"):
        load_policy(target)


def test_a_tokenizer_larger_than_the_embedding_is_refused(tmp_path, tiny_policy):
    model, tokenizer = tiny_policy
    target = save_policy(model, tokenizer, tmp_path / "p")
    config = json.loads((target / "config.json").read_text())
    rows = len(tokenizer) - 1
    config["vocab_size"] = rows
    (target / "config.json").write_text(json.dumps(config))
    state = {k: (v[:rows] if v.shape[:1] == (len(tokenizer),) else v).clone() for k, v in model.state_dict().items()
             if not (k == "lm_head.weight" and config.get("tie_word_embeddings"))}
    save_file(state, str(target / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ModelLoadError, match=rf"the tokenizer has {len(tokenizer)} tokens but the model's embedding "
                                             rf"only {rows} rows"):
        load_policy(target)
