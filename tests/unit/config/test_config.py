from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel

from attnrl.config import PRESETS, dump_config, load_config, resolve_config
from attnrl.config.schema import AlgorithmConfig, RunConfig
from attnrl.errors import ConfigError

ROOT = Path(__file__).resolve().parents[3]


def test_params_yaml_is_the_tiny_preset_serialised():
    # params.yaml is what DVC and the CLI read; it must not drift from the preset it documents.
    assert (ROOT / "params.yaml").read_text() == dump_config(resolve_config(preset="tiny"))


def test_dump_then_load_round_trips(tmp_path):
    config = resolve_config(preset="r1-distill-1.5b")
    path = tmp_path / "params.yaml"
    path.write_text(dump_config(config))
    assert load_config(path) == config


def test_unknown_key_in_file_names_the_key_and_file(tmp_path):
    path = tmp_path / "params.yaml"
    tree = yaml.safe_load(dump_config(resolve_config(preset="tiny")))
    tree["warmup"]["stepz"] = 3
    path.write_text(yaml.safe_dump(tree))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert "warmup.stepz: unknown key" in str(info.value)
    assert str(path) in str(info.value)


def test_unknown_top_level_section_is_an_error():
    with pytest.raises(ConfigError, match="trainer: unknown key"):
        resolve_config(preset="tiny", overrides=["trainer.steps=3"])


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("rollout.sampling.temperature=0", "rollout.sampling.temperature"),
        ("rollout.sampling.top_p=1.5", "rollout.sampling.top_p"),
        ("algorithm.fci_quantile=1.0", "algorithm.fci_quantile"),
        ("train.lr=-1", "train.lr"),
        ("data.eval.0.k=0", "data.eval.0.k"),
        ("algorithm.branching=attention", "algorithm.branching"),
    ],
)
def test_out_of_range_values_name_the_key(override, key):
    with pytest.raises(ConfigError) as info:
        resolve_config(preset="tiny", overrides=[override])
    assert key in str(info.value)


def test_every_error_is_reported_at_once():
    with pytest.raises(ConfigError) as info:
        resolve_config(preset="tiny", overrides=["train.lr=0", "warmup.steps=0"])
    assert "train.lr" in str(info.value) and "warmup.steps" in str(info.value)


def test_unknown_preset_lists_the_known_ones():
    with pytest.raises(ConfigError) as info:
        resolve_config(preset="huge")
    for name in PRESETS:
        assert name in str(info.value)


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "absent.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("seed: [1,\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    listed = tmp_path / "list.yaml"
    listed.write_text("- 1\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(listed)


def test_file_may_be_a_delta_over_a_named_preset(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("preset: r1-distill-1.5b\nmodel:\n  path: /models/r1\ntrain:\n  steps: 7\n")
    config = load_config(path, overrides=["seed=5"])
    assert (config.model.path, config.train.steps, config.seed) == ("/models/r1", 7, 5)
    # Untouched keys keep the preset's values, which keep the paper's (spec §12).
    assert config.train.lr == 1e-6 and config.rollout.sampling.n == 6


def test_override_syntax_errors():
    with pytest.raises(ConfigError, match="key.path=value"):
        resolve_config(preset="tiny", overrides=["train.steps"])
    with pytest.raises(ConfigError, match="not a section"):
        resolve_config(preset="tiny", overrides=["train.steps.x=1"])


def test_an_override_addresses_a_list_entry_by_its_index(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("preset: tiny\ndata:\n  eval:\n    - {kind: synthetic, name: a, k: 4}\n"
                    "    - {kind: synthetic, name: b, k: 4}\n")
    config = load_config(path, overrides=["data.eval.1.k=8"])
    assert [spec.k for spec in config.data.eval] == [4, 8]
    with pytest.raises(ConfigError, match=r"data.eval is a list of 2; '2' is not an index of it \(0 to 1\)"):
        load_config(path, overrides=["data.eval.2.k=8"])
    with pytest.raises(ConfigError, match="'k' is not an index"):
        load_config(path, overrides=["data.eval.k=8"])


def test_paper_preset_matches_spec_section_12():
    config = resolve_config(preset="r1-distill-1.5b")
    a = config.algorithm
    assert (a.num_branch_points, a.continuations_per_branch, a.fci_delta, a.fci_quantile) == (2, 2, 4, 0.8)
    assert (a.min_branch_position, a.min_branch_spacing, a.batch_ema_lambda) == (512, 512, 0.9)
    assert (a.clip_low, a.clip_high, a.dual_clip, a.kl_coef) == (0.2, 0.28, 3.0, 0.001)
    assert config.rollout.sampling.max_new_tokens == 8192 and config.eval.temperature == 0.6
    assert {s.name: s.k for s in config.data.eval} == {
        "aime24": 32, "aime25": 32, "amc23": 32, "math500": 4, "minerva": 4, "olympiad": 4,
    }


def _fields(model: type[BaseModel], prefix: str = ""):
    for name, field in model.model_fields.items():
        yield prefix + name, field
        for arg in getattr(field.annotation, "__args__", (field.annotation,)):
            if isinstance(arg, type) and issubclass(arg, BaseModel):
                yield from _fields(arg, f"{prefix}{name}.")


def test_every_field_is_documented():
    undocumented = [name for name, field in _fields(RunConfig) if not field.description]
    assert undocumented == []


@pytest.mark.parametrize(
    ("field", "ambig"),
    [
        ("tree_count_rounding", "AMBIG-1"),
        ("batch_size_rounding", "AMBIG-1"),
        ("easy_filter", "AMBIG-2"),
        ("fci_quantile", "AMBIG-3"),
        ("fci_mask_first_step", "AMBIG-4"),
        ("fci_mask_after_think", "AMBIG-4"),
        ("step_attention", "AMBIG-5"),
        ("loss_aggregation", "AMBIG-11"),
    ],
)
def test_paper_code_disagreements_are_documented_fields(field, ambig):
    assert ambig in AlgorithmConfig.model_fields[field].description


def test_method_presets_set_the_algorithm_and_nothing_else():
    base = resolve_config(preset="tiny")
    for name, expected in [("attnrl", ("fci", True, "tree")), ("treerl", ("entropy", False, "tree")), ("grpo", ("none", False, "grpo"))]:
        config = resolve_config(preset="tiny", method=name)
        assert (config.algorithm.branching, config.algorithm.off_policy, config.algorithm.advantage) == expected
        assert config.algorithm.method == name
        assert config.model_dump(exclude={"algorithm"}) == base.model_dump(exclude={"algorithm"})
    with pytest.raises(ConfigError, match="known methods: attnrl, grpo, treerl"):
        resolve_config(preset="tiny", method="ppo")


def test_yaml_1_1_words_stay_strings_in_overrides_and_files(tmp_path):
    # PyYAML's YAML 1.1 reads off/no/on/yes as booleans: algorithm.easy_filter=off would be False.
    config = resolve_config(preset="tiny", method="attnrl", overrides=["algorithm.easy_filter=off", "checks.enabled=false"])
    assert config.algorithm.easy_filter == "off" and config.checks.enabled is False
    path = tmp_path / "run.yaml"
    path.write_text("preset: tiny\nalgorithm:\n  easy_filter: off\n  off_policy: false\n")
    config = resolve_config(path=path)
    assert config.algorithm.easy_filter == "off" and config.algorithm.off_policy is False
