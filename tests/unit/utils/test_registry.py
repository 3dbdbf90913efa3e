import pytest

from attnrl.errors import ConfigError
from attnrl.utils.registry import lookup


def test_lookup_returns_the_entry_or_lists_the_known_names():
    registry = {"b": 2, "a": 1}
    assert lookup(registry, "a", "thing") == 1
    with pytest.raises(ValueError, match="unknown thing 'c'; known: a, b"):
        lookup(registry, "c", "thing")
    with pytest.raises(ConfigError, match="unknown rollout.engine 'x'"):
        lookup(registry, "x", "rollout.engine", ConfigError)


def test_load_object_imports_by_path_and_names_what_failed():
    from attnrl.utils.registry import load_object

    assert load_object("attnrl.utils.registry:lookup", "thing") is lookup
    for path, message in [("no_colon", "must look like"), ("attnrl.nowhere:x", "cannot import"),
                          ("attnrl.utils.registry:missing", "has no 'missing'")]:
        with pytest.raises(ConfigError, match=message):
            load_object(path, "train.backend")


def test_an_extension_comes_from_the_entry_points_or_provide_and_a_missing_one_is_named(monkeypatch):
    from attnrl.utils import registry

    # pyproject.toml's entry points, installed with attnrl: loaded on first use, by name only.
    assert registry.extension("distributed_preflight", "distributed.enabled").__module__ == "infra.distributed"
    with pytest.raises(ConfigError, match="train.backend 'x' needs the extension 'x_backend', and no installed"):
        registry.extension("x_backend", "train.backend 'x'")
    monkeypatch.setattr(registry, "_PROVIDED", {"x_backend": lookup})
    assert registry.extension("x_backend", "train.backend 'x'") is lookup
