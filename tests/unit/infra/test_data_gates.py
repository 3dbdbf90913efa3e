"""The data gates' registry of suites."""

from __future__ import annotations

import pytest

from attnrl.config import resolve_config
from attnrl.errors import DataError
from infra import data_gates


def test_an_unknown_suite_lists_the_known_ones():
    with pytest.raises(DataError, match="unknown data check suite 'no-such-suite'; known: .*prepared_problems"):
        data_gates.run_gate("no-such-suite", None, resolve_config(preset="tiny"), target="x", docs_dir=None)
