"""Generated candidates end to end: propose, relax, check, deduplicate, encode, hull.

:func:`generate_candidates` turns parent structures (hits) into a list of
:class:`GeneratedCandidate` and a :class:`GenerationSummary` (counts per stage,
rejections per reason, seconds per stage); :func:`write_pool_csv` writes them as a
CSV pool (``material_id``, ``cif``, ``scope``, provenance JSON...) that a campaign
reads with ``pool: {file: <csv>, structure_format: cif}``.
"""

from __future__ import annotations

import csv
import json
import logging
import re
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from loop.generate.checks import CheckConfig, check_structure, min_distance, space_group
from loop.generate.energies import ChgnetEnergies, EnergyConfig, structure_hash
from loop.generate.growth import GrowConfig
from loop.generate.substitution import Proposal, SubstitutionConfig, propose_substitutions
from loop.generate.symmetry import SymmetryConfig, propose_symmetric

if TYPE_CHECKING:
    from pymatgen.core import Structure

logger = logging.getLogger(__name__)

POOL_COLUMNS = (
    "material_id",
    "cif",
    "scope",
    "formula",
    "energy_per_atom",
    "e_above_hull",
    "new",
    "hull_phases",
    "parent_id",
    "provenance",
)


class GenerateConfig(BaseModel):
    """Every setting of :func:`generate_candidates`; a campaign's ``pool.generators`` section.

    ``substitution`` and ``symmetry`` select the generators (None: not used); ``grow``
    adds candidates while a campaign runs (:mod:`loop.generate.growth`).
    """

    model_config = ConfigDict(extra="forbid")

    substitution: SubstitutionConfig | None = SubstitutionConfig()
    symmetry: SymmetryConfig | None = None
    checks: CheckConfig = CheckConfig()
    energies: EnergyConfig = EnergyConfig()
    variant: Literal["cloud", "native"] = "cloud"  # SCOPE variant written to the pool
    hull_dataset: str | None = Field(
        default=None, description="registry CIF set of competing phases (e.g. mp_20_biternary)"
    )
    hull_max_atoms: int = Field(default=20, ge=1, description="larger competing cells left out")
    max_candidates: int | None = Field(
        default=None, ge=1, description="most probable substitutions kept"
    )
    elements: list[str] | None = Field(
        default=None,
        min_length=1,
        description="the chemical space: proposals with any other element are left out",
    )
    grow: GrowConfig | None = None

    @field_validator("elements")
    @classmethod
    def _known_elements(cls, value: list[str] | None) -> list[str] | None:
        from pymatgen.core import Element

        if value is None:
            return None
        unknown = [e for e in value if not Element.is_valid_symbol(e)]
        if unknown:
            raise ValueError(f"not element symbols: {', '.join(unknown)}")
        return sorted(set(value))


class GeneratedCandidate(BaseModel):
    """One surviving candidate: relaxed structure, SCOPE string, provenance and energies."""

    model_config = ConfigDict(extra="forbid")

    id: str
    formula: str
    scope: str
    cif: str = Field(description="relaxed structure")
    space_group: int
    energy_per_atom: float = Field(description="eV/atom, CHGNet")
    relax_steps: int
    provenance: dict[str, Any] = Field(
        description="generator, parent_id, substitutions, probability"
    )
    e_above_hull: float | None = Field(
        default=None, description="eV/atom; negative: below the hull of the known phases"
    )
    hull_phases: int | None = Field(
        default=None, description="phases on its hull, elements included (= n elements: none known)"
    )
    new: bool | None = None
    matched_id: str | None = None


class GenerationSummary(BaseModel):
    """What happened at each stage."""

    model_config = ConfigDict(extra="forbid")

    counts: dict[str, int] = Field(description="stage -> structures that reached it")
    rejected: dict[str, int] = Field(description="reason -> structures left out")
    timings_s: dict[str, float]
    chgnet_computed: int
    chgnet_cached: int


class GenerationResult(BaseModel):
    model_config = ConfigDict(extra="forbid")

    candidates: list[GeneratedCandidate]
    summary: GenerationSummary


class KnownStructures:
    """Structures to deduplicate against, looked up by reduced formula.

    Built from (id, structure) pairs, or from CIF texts (``from_cifs``), which are indexed
    by their ``_chemical_formula_sum`` line and parsed only when a product of that formula
    turns up (a pool of thousands costs nothing until then).
    """

    def __init__(self, structures: Sequence[tuple[str, Structure]] = ()) -> None:
        self._parsed: dict[str, list[Structure]] = {}
        self._cifs: dict[str, list[str]] = {}
        for _, s in structures:
            self._parsed.setdefault(s.composition.reduced_formula, []).append(s)

    @classmethod
    def from_cifs(cls, cifs: Mapping[str, str]) -> KnownStructures:
        """Index CIF texts by formula without parsing them."""
        from pymatgen.core import Composition

        known = cls()
        for text in cifs.values():
            match = _FORMULA_SUM.search(text)
            if match is None:
                continue
            formula = Composition(match.group(1).strip("'\" ")).reduced_formula
            known._cifs.setdefault(formula, []).append(text)
        return known

    def add(self, structure: Structure) -> None:
        """Count one more structure as known."""
        self._parsed.setdefault(structure.composition.reduced_formula, []).append(structure)

    def of_formula(self, formula: str) -> list[Structure]:
        """Every known structure of this reduced formula."""
        from pymatgen.core import Structure

        for text in self._cifs.pop(formula, []):
            self._parsed.setdefault(formula, []).append(Structure.from_str(text, fmt="cif"))
        return self._parsed.get(formula, [])


_FORMULA_SUM = re.compile(r"^_chemical_formula_sum\s+(.+)$", re.MULTILINE)


def unique_structures(
    items: Sequence[tuple[str, Structure]], known: KnownStructures
) -> tuple[list[int], Counter[str]]:
    """Indices of ``items`` (formula, structure) that match neither a ``known`` structure nor an
    earlier item (pymatgen ``StructureMatcher`` within each reduced formula), and the counts
    of the others by reason (``duplicate_of_pool``, ``duplicate_of_generated``)."""
    from pymatgen.analysis.structure_matcher import StructureMatcher

    matcher = StructureMatcher()
    kept_by_formula: dict[str, list[Structure]] = {}
    keep: list[int] = []
    rejected: Counter[str] = Counter()
    for i, (_, s) in enumerate(items):
        formula = s.composition.reduced_formula
        if any(matcher.fit(s, k) for k in known.of_formula(formula)):
            rejected["duplicate_of_pool"] += 1
            continue
        if any(matcher.fit(s, k) for k in kept_by_formula.get(formula, [])):
            rejected["duplicate_of_generated"] += 1
            continue
        kept_by_formula.setdefault(formula, []).append(s)
        keep.append(i)
    return keep, rejected


def _inside(proposals: list[Proposal], elements: Sequence[str]) -> tuple[list[Proposal], int]:
    """The proposals whose every element is in ``elements``, and how many were not."""
    from pymatgen.core import Composition

    space = set(elements)
    inside = [p for p in proposals if {e.symbol for e in Composition(p.formula)} <= space]
    return inside, len(proposals) - len(inside)


def generate_candidates(
    parents: Sequence[tuple[str, Structure]],
    config: GenerateConfig,
    *,
    pool: Sequence[tuple[str, Structure]] | KnownStructures = (),
    energies: ChgnetEnergies | None = None,
) -> GenerationResult:
    """Propose (substitution, symmetry), relax, check, deduplicate, SCOPE-encode, hull.

    Args:
        parents: (id, structure) of the hits substituted into (unused without substitution).
        config: generator, checks, CHGNet and hull settings.
        pool: structures already in the campaign's pool (pairs, or
            :meth:`KnownStructures.from_cifs` for a large pool); the parents count as pool too.
        energies: a CHGNet evaluator to share (built from ``config.energies`` when None).

    Returns:
        The survivors and a summary; every structure left out is counted by reason.
    """
    from pymatgen.core import Structure

    from cloud_model.errors import SymmetryError
    from cloud_model.scope import encode_scope

    timings: dict[str, float] = {}
    counts: dict[str, int] = {"parents": len(parents)}
    t0 = time.perf_counter()
    proposals: list[Proposal] = []
    rejected: Counter[str] = Counter()
    if config.substitution is not None and parents:
        proposals, rejected = propose_substitutions(list(parents), config.substitution)
        proposals.sort(key=lambda p: -p.probability)
        if config.elements is not None:
            proposals, outside = _inside(proposals, config.elements)
            rejected["outside_space"] += outside
        if config.max_candidates is not None:
            proposals = proposals[: config.max_candidates]
    if config.symmetry is not None:
        built, why = propose_symmetric(config.symmetry)
        if config.elements is not None:
            built, outside = _inside(built, config.elements)
            why["outside_space"] = why.get("outside_space", 0) + outside
        proposals += built
        rejected.update({f"symmetry_{k}": v for k, v in why.items()})
    counts["proposed"] = len(proposals)
    timings["propose"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    evaluator = energies or ChgnetEnergies(config.energies)
    relaxed: list[tuple[Proposal, Structure, Any]] = []  # (proposal, structure, energy record)
    for proposal in proposals:
        structure = Structure.from_str(proposal.cif, fmt="cif")
        if min_distance(structure) < config.checks.min_distance_a:
            rejected["too_close_before_relax"] += 1
            continue
        try:
            record = evaluator.evaluate(structure)
        except (RuntimeError, ValueError) as exc:  # CHGNet graph or optimizer failure
            logger.warning("%s: CHGNet relaxation failed: %s", proposal.formula, exc)
            rejected["relax_failed"] += 1
            continue
        relaxed.append((proposal, Structure.from_str(record.final_cif, fmt="cif"), record))
    counts["relaxed"] = len(relaxed)
    timings["relax"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    checked = []
    for item in relaxed:
        reason = check_structure(item[1], config.checks)
        if reason is None:
            checked.append(item)
        else:
            rejected[reason] += 1
    counts["passed_checks"] = len(checked)
    known = pool if isinstance(pool, KnownStructures) else KnownStructures(pool)
    for _, parent in parents:
        known.add(parent)
    keep, dup = unique_structures([(p.formula, s) for p, s, _ in checked], known)
    rejected.update(dup)
    unique = [checked[i] for i in keep]
    counts["unique"] = len(unique)
    timings["check_dedup"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    candidates: list[GeneratedCandidate] = []
    for proposal, structure, record in unique:
        try:
            scope = encode_scope(structure, symprec=config.checks.symprec, variant=config.variant)
        except SymmetryError as exc:
            logger.info("%s: not SCOPE-encoded: %s", proposal.formula, exc)
            rejected["scope_failed"] += 1
            continue
        candidates.append(
            GeneratedCandidate(
                id=f"gen-{structure_hash(structure)[:12]}",
                formula=structure.composition.reduced_formula,
                scope=scope,
                cif=record.final_cif,
                space_group=space_group(
                    structure, config.checks.symprec, config.checks.angle_tolerance
                )
                or 0,
                energy_per_atom=record.energy_per_atom,
                relax_steps=record.relax_steps,
                provenance={
                    **proposal.model_dump(mode="json", exclude={"cif", "formula"}),
                    "relaxation": {
                        "method": f"chgnet {config.energies.model_version}",
                        "relax": config.energies.relax,
                        "steps": record.relax_steps,
                        "fmax_ev_per_a": config.energies.fmax_ev_per_a,
                    },
                },
            )
        )
    counts["encoded"] = len(candidates)
    timings["encode"] = time.perf_counter() - t0

    if config.hull_dataset is not None and candidates:
        t0 = time.perf_counter()
        _add_hull(candidates, config, evaluator)
        counts["hull_evaluated"] = len(candidates)
        counts["new"] = sum(1 for c in candidates if c.new)
        timings["hull"] = time.perf_counter() - t0
    summary = GenerationSummary(
        counts=counts,
        rejected=dict(sorted(rejected.items())),
        timings_s={k: round(v, 3) for k, v in timings.items()},
        chgnet_computed=evaluator.computed,
        chgnet_cached=evaluator.hits,
    )
    return GenerationResult(candidates=candidates, summary=summary)


def _add_hull(
    candidates: list[GeneratedCandidate], config: GenerateConfig, energies: ChgnetEnergies
) -> None:
    """Fill ``e_above_hull``, ``new`` and ``matched_id`` in place, one registry load."""
    from pymatgen.core import Structure

    from loop.generate.hull import competing_phases, hull_stability

    elements = sorted({el for c in candidates for el in Structure.from_str(c.cif, fmt="cif")
                       .composition.get_el_amt_dict()})  # fmt: skip
    competing = competing_phases(
        config.hull_dataset or "", elements, max_atoms=config.hull_max_atoms
    )
    results = hull_stability(
        [(c.id, Structure.from_str(c.cif, fmt="cif")) for c in candidates], competing, energies
    )
    for candidate, result in zip(candidates, results, strict=True):
        candidate.e_above_hull = result.e_above_hull
        candidate.hull_phases = result.n_competing
        candidate.new = result.new
        candidate.matched_id = result.matched_id


def write_pool_csv(path: Path, candidates: Sequence[GeneratedCandidate]) -> None:
    """Write the candidates as a campaign pool CSV (columns :data:`POOL_COLUMNS`)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=POOL_COLUMNS)
        writer.writeheader()
        for c in candidates:
            writer.writerow(
                {
                    "material_id": c.id,
                    "cif": c.cif,
                    "scope": c.scope,
                    "formula": c.formula,
                    "energy_per_atom": f"{c.energy_per_atom:.6f}",
                    "e_above_hull": "" if c.e_above_hull is None else f"{c.e_above_hull:.6f}",
                    "new": "" if c.new is None else str(c.new).lower(),
                    "hull_phases": "" if c.hull_phases is None else str(c.hull_phases),
                    "parent_id": c.provenance.get("parent_id", ""),
                    "provenance": json.dumps(c.provenance, sort_keys=True),
                }
            )
