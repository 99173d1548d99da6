"""Candidates that are in no dataset: generators, checks, CHGNet relaxation and hull stability.

* :mod:`loop.generate.substitution` proposes charge-balanced substitutions of given hits
  from pymatgen's data-mined substitution probabilities (the lambda table);
* :mod:`loop.generate.checks` rejects bad structures by a named reason (too-close atoms,
  charge imbalance, no space group at ``symprec``);
* :mod:`loop.generate.energies` relaxes and evaluates structures with CHGNet through the
  adapter's calculator (:class:`adapters.mlip.ChgnetCalculator`), cached on disk by structure hash;
* :mod:`loop.generate.hull` computes the energy above the convex hull against the competing
  phases of a registry dataset, all with the same CHGNet settings, and whether a candidate is new;
* :mod:`loop.generate.pipeline` chains them into a CSV pool that a campaign loads with
  ``pool: {file: ..., structure_format: cif}``.
"""

from __future__ import annotations

from loop.generate.checks import CheckConfig, check_structure
from loop.generate.energies import ChgnetEnergies, EnergyConfig
from loop.generate.hull import HullResult, competing_phases, hull_stability
from loop.generate.pipeline import (
    GenerateConfig,
    GeneratedCandidate,
    GenerationResult,
    GenerationSummary,
    generate_candidates,
    write_pool_csv,
)
from loop.generate.substitution import Proposal, SubstitutionConfig, propose_substitutions

__all__ = [
    "CheckConfig",
    "ChgnetEnergies",
    "EnergyConfig",
    "GenerateConfig",
    "GeneratedCandidate",
    "GenerationResult",
    "GenerationSummary",
    "HullResult",
    "Proposal",
    "SubstitutionConfig",
    "check_structure",
    "competing_phases",
    "generate_candidates",
    "hull_stability",
    "propose_substitutions",
    "write_pool_csv",
]
