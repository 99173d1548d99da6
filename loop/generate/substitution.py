"""Substitution of measured hits with data-mined ion-substitution probabilities.

pymatgen's :class:`SubstitutionPredictor` holds the lambda table of Hautier et al.
(Inorg. Chem. 2011), mined from the ICSD: the probability that species ``a`` replaces
species ``b`` in a known structure. For each parent (a hit of a campaign) we guess
oxidation states, list every species map whose joint probability exceeds the
threshold, apply it site by site and keep only products whose assigned oxidation
states sum to zero. Parents and products left out are counted by reason.
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field

if TYPE_CHECKING:
    from pymatgen.core import Structure

logger = logging.getLogger(__name__)

GENERATOR_NAME = "substitution"


class SubstitutionConfig(BaseModel):
    """How many substitutions to propose per parent."""

    model_config = ConfigDict(extra="forbid")

    threshold: float = Field(
        default=1e-3, gt=0, lt=1, description="minimum joint substitution probability"
    )
    max_per_parent: int = Field(default=50, ge=1, description="most probable maps kept per parent")
    max_parent_sites: int = Field(
        default=40, ge=1, description="parents with more sites are left out (oxidation guesses)"
    )


class Proposal(BaseModel):
    """One generated structure before relaxation; ``cif`` is the unrelaxed P1 cell."""

    model_config = ConfigDict(extra="forbid")

    parent_id: str = Field(
        description="the hit substituted into, or the observed structure seeding it"
    )
    generator: str = GENERATOR_NAME
    substitutions: dict[str, str] = Field(
        default_factory=dict, description="parent species -> new species, e.g. Na+ -> K+"
    )
    parameters: dict[str, Any] = Field(
        default_factory=dict,
        description="the generator's own choices (space group, Wyckoff set...)",
    )
    probability: float = Field(
        description="substitution: joint probability (lambda table); symmetry: template frequency"
    )
    formula: str
    cif: str


def _oxidation_states(structure: Structure, max_sites: int) -> dict[str, int] | None:
    """Element -> integer oxidation state of the most likely charge-balanced guess, or None."""
    if len(structure) > max_sites:
        return None
    guesses = structure.composition.oxi_state_guesses(max_sites=-max_sites)
    for guess in guesses:
        if all(float(v).is_integer() for v in guess.values()):
            return {el: int(v) for el, v in guess.items()}
    return None


def propose_substitutions(
    parents: list[tuple[str, Structure]], config: SubstitutionConfig
) -> tuple[list[Proposal], Counter[str]]:
    """Substituted, charge-balanced structures of each parent.

    Args:
        parents: (id, structure) of the hits to substitute into (ordered, any cell).
        config: probability threshold and limits.

    Returns:
        The proposals (most probable first within a parent) and the count of everything
        left out by reason (``parent_no_oxidation_states``, ``parent_species_not_in_table``,
        ``not_charge_balanced``).
    """
    from pymatgen.core import Species
    from pymatgen.core.structure_prediction.substitution_probability import (
        SubstitutionPredictor,
    )
    from pymatgen.io.cif import CifWriter

    predictor = SubstitutionPredictor(threshold=config.threshold)
    table_species = set(predictor.p.species)
    rejected: Counter[str] = Counter()
    out: list[Proposal] = []
    for parent_id, structure in parents:
        oxidation = _oxidation_states(structure, config.max_parent_sites)
        if oxidation is None:
            rejected["parent_no_oxidation_states"] += 1
            logger.info("%s: no charge-balanced oxidation states; not substituted", parent_id)
            continue
        species = [Species(el, ox) for el, ox in sorted(oxidation.items())]
        if any(sp not in table_species for sp in species):
            rejected["parent_species_not_in_table"] += 1
            continue
        predictions: list[dict[str, Any]] = predictor.list_prediction(
            species, to_this_composition=False
        )
        predictions.sort(key=lambda p: -float(p["probability"]))
        kept = 0
        for prediction in predictions:
            mapping: dict[Any, Any] = prediction["substitutions"]  # parent species -> new species
            if all(old == new for old, new in mapping.items()):
                continue  # the parent itself
            amounts = structure.composition.get_el_amt_dict()
            charge = sum(new.oxi_state * amounts[old.symbol] for old, new in mapping.items())
            if abs(charge) > 1e-6:
                rejected["not_charge_balanced"] += 1
                continue
            product = structure.copy()
            product.replace_species({old.symbol: new.symbol for old, new in mapping.items()})
            out.append(
                Proposal(
                    parent_id=parent_id,
                    substitutions={
                        str(old): str(new) for old, new in mapping.items() if old != new
                    },
                    probability=float(prediction["probability"]),
                    formula=product.composition.reduced_formula,
                    cif=str(CifWriter(product)),
                )
            )
            kept += 1
            if kept >= config.max_per_parent:
                break
    return out, rejected
