"""The base of every configuration section (``attnrl.config.schema``)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Section(BaseModel):
    # Unknown keys are errors (a typo must never silently fall back to a default).
    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)
