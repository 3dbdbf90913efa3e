"""Lineage records and the resume rule built on them (a changed config, code or input starts a new run)."""

from __future__ import annotations

import hashlib
import json
import subprocess

from attnrl.config import resolve_config
from attnrl.lineage import LINEAGE_FILE, code_md5, file_md5, input_hashes, lineage, write_lineage
from attnrl.stages.train import resume_changes


def test_input_hashes_are_md5_of_every_file_relative_to_the_root(tmp_path):
    (tmp_path / "d" / "sub").mkdir(parents=True)
    (tmp_path / "d" / "a.bin").write_bytes(b"alpha")
    (tmp_path / "d" / "sub" / "b.bin").write_bytes(b"beta")
    (tmp_path / "c.txt").write_text("gamma")
    hashes = input_hashes([tmp_path / "d", tmp_path / "c.txt"], tmp_path)
    assert hashes == {"d/a.bin": hashlib.md5(b"alpha").hexdigest(), "d/sub/b.bin": hashlib.md5(b"beta").hexdigest(),
                      "c.txt": hashlib.md5(b"gamma").hexdigest()}
    assert file_md5(tmp_path / "c.txt") == hashes["c.txt"]


def test_lineage_names_the_commit_and_a_dirty_tree(tmp_path):
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "init", "-q"], cwd=tmp_path, check=True)
    (tmp_path / "params.yaml").write_text("a: 1\n")
    subprocess.run([*git, "add", "-A"], cwd=tmp_path, check=True)
    subprocess.run([*git, "commit", "-qm", "x"], cwd=tmp_path, check=True)
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=tmp_path, capture_output=True, text=True).stdout.strip()
    config = resolve_config(preset="tiny")
    record = lineage(config, [tmp_path / "params.yaml"], tmp_path)
    assert record["git"]["project"] == {"commit": head, "dirty": False}
    assert record["config"]["train"]["steps"] == config.train.steps and "params.yaml" in record["inputs_md5"]
    (tmp_path / "params.yaml").write_text("a: 2\n")
    assert lineage(config, [], tmp_path)["git"]["project"]["dirty"] is True
    assert lineage(config, [], tmp_path / "nowhere")["git"]["project"] == {"commit": None, "dirty": None}


def test_a_checkpoint_resumes_only_under_the_same_config_code_and_inputs(tmp_path):
    (tmp_path / "problems.parquet").write_bytes(b"problems")
    config = resolve_config(preset="tiny")
    record = lineage(config, [tmp_path / "problems.parquet"], tmp_path)
    write_lineage(tmp_path, record)
    longer = resolve_config(preset="tiny", overrides=["train.steps=99", "train.save_every=3", "eval.temperature=0.6"])
    assert resume_changes(tmp_path, longer, lineage(longer, [tmp_path / "problems.parquet"], tmp_path)) == []
    other = resolve_config(preset="tiny", overrides=["train.lr=0.5", "algorithm.clip_high=0.3"])
    assert resume_changes(tmp_path, other, record) == ["algorithm.clip_high", "train.lr"]
    assert resume_changes(tmp_path, config, record | {"code_md5": "0" * 32}) == ["code (code_md5)"]
    (tmp_path / "problems.parquet").write_bytes(b"other problems")
    assert resume_changes(tmp_path, config, lineage(config, [tmp_path / "problems.parquet"], tmp_path)) == [
        "input problems.parquet"]
    assert resume_changes(tmp_path, config, record | {"inputs_md5": {}}) == ["input problems.parquet"]
    write_lineage(tmp_path, {k: v for k, v in record.items() if k != "code_md5"})
    assert resume_changes(tmp_path, config, record) == ["code (code_md5)"]  # code not recorded: not the same
    (tmp_path / LINEAGE_FILE).unlink()
    assert resume_changes(tmp_path, other, record) == []  # checkpoints from before lineage existed still resume
    assert json.loads(json.dumps(lineage(config, [], tmp_path)))  # JSON all the way down


def test_the_code_digest_covers_every_python_file_of_the_package_and_its_pipeline_packages(tmp_path):
    package = tmp_path / "attnrl"
    (package / "sub").mkdir(parents=True)
    (tmp_path / "tasks").mkdir()
    (package / "loss.py").write_text("x = 1\n")
    (package / "sub" / "a.py").write_text("y = 2\n")
    (tmp_path / "tasks" / "t.py").write_text("z = 3\n")
    first = code_md5(package)
    (package / "sub" / "a.pyc").write_bytes(b"compiled")  # not code we read
    (tmp_path / "unrelated.py").write_text("w = 4\n")     # beside the packages, not in them
    assert code_md5(package) == first
    for edited in (package / "loss.py", tmp_path / "tasks" / "t.py"):
        original = edited.read_text()
        edited.write_text(original.replace("= ", "= -"))  # a one-line change
        assert code_md5(package) != first, edited
        edited.write_text(original)
        assert code_md5(package) == first
