"""Typed records the campaign hands out: progress while it runs, timings, its result."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["CampaignResult", "Progress", "Timings"]


class Progress(BaseModel):
    """What the CLI shows while a campaign runs."""

    model_config = ConfigDict(extra="forbid")

    n_submitted: int
    n_measured: int
    n_failed: int
    n_in_flight: int
    budget: int
    best_value: float | None
    best_id: str | None
    model_version: int | None
    stage: str = "running"
    last_warning: str | None = None  # the latest retry message (e.g. the lab is unreachable)
    n_awaiting_approval: int = 0  # proposals waiting at the approval gate (loop.approval)


class Timings(BaseModel):
    """Seconds spent per stage (the benchmark harness reads these)."""

    model_config = ConfigDict(extra="forbid")

    fit: float = 0.0
    score: float = 0.0
    acquisition: float = 0.0
    dispatch: float = 0.0
    extra: dict[str, float] = Field(default_factory=dict)


class CampaignResult(BaseModel):
    """How a run of the loop ended."""

    model_config = ConfigDict(extra="forbid")

    n_submitted: int
    n_measured: int
    n_failed: int
    best_value: float | None
    best_id: str | None
    stop_reason: str
    timings: Timings
