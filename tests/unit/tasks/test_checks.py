"""The plain checks between stages: a stage's outputs are read back before the next stage starts."""

from __future__ import annotations

import pytest

from attnrl.errors import DataError
from tasks import checks


def test_between_stage_checks_reject_bad_outputs(tmp_path):
    bad_jsonl = tmp_path / "metrics.jsonl"
    bad_jsonl.write_text('{"step": 1}\nnot json\n')
    with pytest.raises(DataError, match="line 2"):
        checks.check_train_metrics(bad_jsonl)
    with pytest.raises(DataError, match="report.html is missing"):
        checks.check_report(tmp_path / "report.html")
    with pytest.raises(DataError, match="config.json"):
        checks.check_model_dir(tmp_path)
