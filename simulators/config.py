"""Configuration of the simulated lab: noise, failures, latency, capacity, cost, drift.

All models are frozen pydantic models with ``extra="forbid"``; they load from
YAML/JSON and are stored with a server's state so that a restarted server can
refuse a configuration that would replay its jobs differently.
"""

from __future__ import annotations

import math
import random
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["FailureConfig", "LatencyConfig", "NoiseConfig", "SimulatedLabConfig"]


class _Config(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class NoiseConfig(_Config):
    """Gaussian measurement noise of one target, in the target's unit.

    ``homoscedastic``: sd = ``sigma``. ``heteroscedastic``: sd = ``relative`` *
    |value| + ``sigma`` (``sigma`` is then the floor). The reported uncertainty
    uses the *measured* value, so it does not leak the true one.
    """

    kind: Literal["homoscedastic", "heteroscedastic"] = "homoscedastic"
    sigma: float = Field(default=0.0, ge=0.0, description="absolute sd (or floor), target units")
    relative: float = Field(
        default=0.0, ge=0.0, description="heteroscedastic: sd per unit of |value|"
    )

    def sd(self, value: float) -> float:
        """The noise sd for a measurement of ``value``."""
        if self.kind == "heteroscedastic":
            return self.relative * abs(value) + self.sigma
        return self.sigma


class FailureConfig(_Config):
    """Experiments fail with ``probability``; the reason is drawn uniformly from ``reasons``."""

    probability: float = Field(default=0.0, ge=0.0, le=1.0)
    reasons: tuple[str, ...] = Field(default=("failed synthesis", "instrument fault"), min_length=1)


class LatencyConfig(_Config):
    """Duration of one experiment, in simulated seconds.

    ``fixed``: always ``mean_s``; ``exponential``: mean ``mean_s``; ``lognormal``:
    mean ``mean_s`` with log-space sd ``log_sigma`` (a heavy right tail, like
    real syntheses).
    """

    distribution: Literal["fixed", "exponential", "lognormal"] = "fixed"
    mean_s: float = Field(default=0.0, ge=0.0, description="mean simulated seconds per experiment")
    log_sigma: float = Field(
        default=0.5, gt=0.0, description="lognormal shape (sd of log duration)"
    )

    def draw(self, rng: random.Random) -> float:
        """One duration in simulated seconds."""
        if self.mean_s == 0.0 or self.distribution == "fixed":
            return self.mean_s
        if self.distribution == "exponential":
            return rng.expovariate(1.0 / self.mean_s)
        mu = math.log(self.mean_s) - 0.5 * self.log_sigma**2  # so that E[duration] = mean_s
        return rng.lognormvariate(mu, self.log_sigma)


class SimulatedLabConfig(_Config):
    """Everything that makes one simulated lab behave the way it does. Seeded."""

    kind: Literal["simulated"] = "simulated"
    name: str = Field(
        default="simulated", min_length=1, description="adapter name stored with each job"
    )
    seed: int = 0  # with the idempotency key, determines every draw of a job
    capacity: int = Field(
        default=1, ge=1, description="parallel robots; jobs beyond it stay QUEUED"
    )
    noise: NoiseConfig = NoiseConfig()  # default for every target
    target_noise: dict[str, NoiseConfig] = Field(default_factory=dict)  # per-target overrides
    failure: FailureConfig = FailureConfig()
    latency: LatencyConfig = LatencyConfig()
    # simulated seconds per wall second when the lab follows the wall clock (HTTP server)
    time_acceleration: float = Field(default=1.0, gt=0.0)
    cost_per_experiment: float = Field(
        default=1.0, ge=0.0, description="charged for every finished run"
    )
    cost_unit: str = "experiment"
    # additive instrument drift, target units per simulated hour (value += rate * t / 3600)
    drift_per_hour: dict[str, float] = Field(default_factory=dict)

    def noise_for(self, target: str) -> NoiseConfig:
        return self.target_noise.get(target, self.noise)
