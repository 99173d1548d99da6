"""The hidden table a simulated lab measures: candidate id -> {target: value}, with units.

Built by whoever starts the lab (the CLI from a registry dataset, a benchmark,
a test) and handed to it; the lab never returns it. It is a pydantic model so
the CLI can hand it to a server process as a JSON file.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Mapping
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, model_validator

from cloud_model.errors import ConfigError

__all__ = ["GroundTruth"]


class GroundTruth(BaseModel):
    """True values of every candidate the lab can measure.

    Attributes:
        units: target -> unit (e.g. ``{"heat_ref": "eV"}``).
        values: candidate id -> {target: finite value}; a missing target means the
            candidate cannot be measured for it.
        source: where the values come from, for logs (e.g. ``"perov_5/heat_ref"``).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    units: dict[str, str] = Field(min_length=1)
    values: dict[str, dict[str, float]]
    source: str = ""

    @model_validator(mode="after")
    def _check(self) -> GroundTruth:
        for cid, row in self.values.items():
            for target, value in row.items():
                if target not in self.units:
                    raise ValueError(f"candidate {cid!r}: target {target!r} has no unit")
                if not math.isfinite(value):
                    raise ValueError(f"candidate {cid!r}: {target} = {value} is not finite")
        return self

    @classmethod
    def from_rows(
        cls,
        rows: Iterable[tuple[str, Mapping[str, float]]],
        units: Mapping[str, str],
        source: str = "",
    ) -> GroundTruth:
        """Build from ``(candidate id, {target: value})`` pairs, dropping NaN values.

        Raises:
            ConfigError: a candidate id appears twice.
        """
        values: dict[str, dict[str, float]] = {}
        for cid, row in rows:
            if cid in values:
                raise ConfigError(
                    f"candidate id {cid!r} appears twice in {source or 'the truth table'}"
                )
            values[cid] = {t: float(v) for t, v in row.items() if t in units and math.isfinite(v)}
        return cls(units=dict(units), values=values, source=source)

    @classmethod
    def from_file(cls, path: Path) -> GroundTruth:
        """Load a table written by :meth:`to_file`."""
        try:
            return cls.model_validate_json(path.read_bytes())
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot read the ground-truth table {path}: {exc}") from exc

    def to_file(self, path: Path) -> None:
        """Write the table as JSON (readable by the owner only: it holds the hidden labels)."""
        path.write_text(self.model_dump_json())
        path.chmod(0o600)

    def fingerprint(self) -> str:
        """sha256 of the table's content; a restarted server checks it is unchanged."""
        return hashlib.sha256(self.model_dump_json(exclude={"source"}).encode()).hexdigest()
