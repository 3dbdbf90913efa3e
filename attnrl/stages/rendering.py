"""The report's HTML from Jinja2 templates (``attnrl/stages/templates/``), every value escaped unless it is a
``markupsafe.Markup`` (a section rendered elsewhere).

Python computes what a page shows (numbers, geometry, which rows); the templates say how it is marked up.
"""

from __future__ import annotations

from functools import cache
from typing import Any

import jinja2


@cache
def _environment() -> jinja2.Environment:
    environment = jinja2.Environment(
        loader=jinja2.PackageLoader("attnrl.stages", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,  # a missing value is an error, not an empty cell
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )
    environment.filters["percent"] = lambda value: f"{100 * value:.1f}"
    return environment


def render(template: str, **context: Any) -> str:
    """``template`` (a file name under ``templates/``) rendered with ``context``."""
    return _environment().get_template(template).render(**context)

