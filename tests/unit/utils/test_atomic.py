from __future__ import annotations

import pytest

from attnrl.utils.atomic import atomic_path
from attnrl.utils.seeding import derive_seed


def test_success_replaces_the_file(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("old")
    with atomic_path(target) as tmp:
        tmp.write_text("new")
    assert target.read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]


def test_exception_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]


def test_failed_validation_leaves_the_old_directory(tmp_path):
    target = tmp_path / "model"
    target.mkdir()
    (target / "w").write_text("old")

    def reject(path):
        raise ValueError("bad output")

    with pytest.raises(ValueError, match="bad output"):
        with atomic_path(target, validate=reject) as tmp:
            tmp.mkdir()
            (tmp / "w").write_text("new")
    assert (target / "w").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


def test_writer_that_writes_nothing_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError):
        with atomic_path(tmp_path / "x"):
            pass
    assert not (tmp_path / "x").exists()


def test_derived_seeds_are_stable_and_distinct():
    assert derive_seed(1, "eval", "aime") == derive_seed(1, "eval", "aime")
    assert len({derive_seed(1, i) for i in range(100)}) == 100
    assert 0 <= derive_seed("x") < 2**63
