"""Checks a generated structure must pass, each failure named by a reason.

Reasons: ``too_close`` (two atoms nearer than ``min_distance_a``, periodic images
included), ``not_charge_balanced`` (pymatgen finds no oxidation-state assignment that
sums to zero), ``no_symmetry`` (spglib finds no space group at ``symprec``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

if TYPE_CHECKING:
    from pymatgen.core import Structure

CheckFailure = Literal["too_close", "not_charge_balanced", "no_symmetry"]


class CheckConfig(BaseModel):
    """Tolerances of :func:`check_structure`."""

    model_config = ConfigDict(extra="forbid")

    min_distance_a: float = Field(
        default=0.7, gt=0, description="Angstrom; closest allowed pair of atoms"
    )
    symprec: float = Field(default=0.1, gt=0, description="spglib distance tolerance, Angstrom")
    angle_tolerance: float = Field(default=5.0, gt=0, description="spglib angle tolerance, degrees")
    charge_balance: bool = True
    max_sites_for_charge_check: int = Field(default=40, ge=1)


def min_distance(structure: Structure) -> float:
    """The shortest interatomic distance in Angstrom, periodic images included."""
    if len(structure) == 1:
        return float(min(structure.lattice.abc))  # the atom and its nearest image
    dist = np.array(structure.distance_matrix, dtype=float)  # (n, n), minimum image
    np.fill_diagonal(dist, np.inf)
    return float(min(dist.min(), *structure.lattice.abc))


def is_charge_balanced(structure: Structure, max_sites: int = 40) -> bool:
    """True when pymatgen finds oxidation states summing to zero (``oxi_state_guesses``)."""
    if all(el.is_metal for el in structure.composition.elements):
        return True  # intermetallics carry no formal charges
    return bool(structure.composition.oxi_state_guesses(max_sites=-max_sites))


def space_group(structure: Structure, symprec: float, angle_tolerance: float) -> int | None:
    """The spglib space-group number at this tolerance, or None when spglib finds none."""
    import spglib

    cell = (
        np.asarray(structure.lattice.matrix),
        np.asarray(structure.frac_coords),
        [site.specie.Z for site in structure],
    )
    dataset = spglib.get_symmetry_dataset(cell, symprec=symprec, angle_tolerance=angle_tolerance)  # type: ignore[arg-type]
    return None if dataset is None else int(dataset.number)


def check_structure(structure: Structure, config: CheckConfig) -> CheckFailure | None:
    """The first failed check's reason, or None when the structure passes all of them."""
    if min_distance(structure) < config.min_distance_a:
        return "too_close"
    if config.charge_balance and not is_charge_balanced(
        structure, config.max_sites_for_charge_check
    ):
        return "not_charge_balanced"
    if space_group(structure, config.symprec, config.angle_tolerance) is None:
        return "no_symmetry"
    return None
