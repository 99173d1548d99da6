"""Origin-independent Wyckoff letters (first version: spglib's letters as given)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def canonical_letters(dataset: Any, sites: Sequence[int], ranks: Sequence[tuple[float, int]]) -> list[str]:
    """Wyckoff letters of ``sites`` (one per orbit) in the canonical setting."""
    return [str(dataset.wyckoffs[i]) for i in sites]
