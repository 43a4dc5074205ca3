"""The base of every typed config in rlq: unknown keys are errors and assignments are validated.

It sits at the bottom of the import graph (no torch, no role) so each role's config module (learner/config.py,
workers/generate/config.py, workers/judge/config.py) and the run config (rlq/config.py) share one definition.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class StrictModel(BaseModel):
    """A config section: a typo in a key fails when the file loads, and so does a bad value set later."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)
