"""Symmetry-first generation: observed (space group, Wyckoff set) templates decorated and built.

The statistics are counted from a registry CIF set (e.g. ``mp_20_biternary``): for every
structure spglib gives the space group and the Wyckoff letter of each orbit; grouping the
orbits by element gives a *template* -- the space group and, per species slot, the Wyckoff
positions it occupies (``225: [[4a], [4b]]`` for rock salt). Slots are ordered by the
electronegativity of the element that held them, so a template keeps its cation/anion roles.

:func:`propose_symmetric` samples templates in proportion to how often they were observed,
decorates the slots with elements of the requested chemical space (in the same
electronegativity order, keeping only charge-balanced compositions), and builds each with
pyxtal at random free coordinates and lattice (``pyxtal.from_random``). The products are
:class:`~loop.generate.substitution.Proposal` s (generator ``symmetry``) that the pipeline
relaxes, checks, deduplicates and encodes like substitutions. The statistics are cached as
JSON (a few minutes of spglib for 14k structures, once).
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import random
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from loop.generate.substitution import Proposal

if TYPE_CHECKING:
    from pymatgen.core import Structure

logger = logging.getLogger(__name__)

GENERATOR_NAME = "symmetry"


class SymmetryConfig(BaseModel):
    """Where the statistics come from and what chemical space to decorate them with."""

    model_config = ConfigDict(extra="forbid")

    elements: list[str] = Field(min_length=2, description="the chemical space decorated onto slots")
    require: list[str] = Field(
        default_factory=list, description="elements every product contains (e.g. [O] for oxides)"
    )
    n_proposals: int = Field(default=100, ge=1, description="structures built (before relaxation)")
    min_species: int = Field(default=2, ge=1)
    max_species: int = Field(default=3, ge=1)
    max_atoms: int = Field(default=20, ge=1, description="atoms in the conventional cell at most")
    statistics_dataset: str = Field(
        default="mp_20_biternary", description="registry CIF set whose Wyckoff sets are counted"
    )
    statistics_splits: list[str] | None = None
    statistics_max_structures: int | None = Field(
        default=None, ge=1, description="count only the first N structures (fast tests)"
    )
    min_template_count: int = Field(default=1, ge=1, description="rarer templates are left out")
    volume_factor: float = Field(default=1.1, gt=0, description="pyxtal's packing factor")
    seed: int = Field(default=0, ge=0)
    symprec: float = Field(default=0.1, gt=0, description="spglib tolerance counting templates, A")
    cache_dir: Path = Field(default=Path(".cloudlab/generate"), description="statistics cache")

    @model_validator(mode="after")
    def _consistent(self) -> SymmetryConfig:
        if self.min_species > self.max_species:
            raise ValueError(f"min_species {self.min_species} > max_species {self.max_species}")
        missing = sorted(set(self.require) - set(self.elements))
        if missing:
            raise ValueError(f"require {missing} not among elements {self.elements}")
        return self


class WyckoffTemplate(BaseModel):
    """One observed (space group, Wyckoff set): per slot, the Wyckoff positions it occupies."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    space_group: int
    slots: list[list[str]] = Field(description="per species slot (by electronegativity): ['4a']")
    count: int = Field(description="structures of the dataset with this template")
    example_id: str = Field(description="one of them")
    example_formula: str

    def atoms_per_slot(self) -> list[int]:
        """Atoms of each slot in the conventional cell (sum of Wyckoff multiplicities)."""
        return [
            sum(int("".join(ch for ch in w if ch.isdigit())) for w in slot) for slot in self.slots
        ]


@functools.cache
def _group(number: int) -> Any:
    """pyxtal's space group ``number`` (its Wyckoff tables; ~5 ms to build, so built once)."""
    from pyxtal.symmetry import Group

    return Group(number)


def _template_of(structure: Structure, symprec: float) -> tuple[int, list[list[str]]] | None:
    """The space group and slots of one structure, or None when spglib finds no symmetry."""
    import numpy as np
    import spglib

    cell = (
        np.asarray(structure.lattice.matrix),
        np.asarray(structure.frac_coords),
        [site.specie.Z for site in structure],
    )
    data = spglib.get_symmetry_dataset(cell, symprec=symprec)  # type: ignore[arg-type]
    if data is None:
        return None
    group = _group(int(data.number))
    by_element: dict[str, list[str]] = {}
    for i in sorted(set(int(k) for k in data.equivalent_atoms)):
        letter = str(data.wyckoffs[i])
        mult = group.get_wyckoff_position(letter).multiplicity
        by_element.setdefault(structure[i].specie.symbol, []).append(f"{mult}{letter}")
    from pymatgen.core import Element

    order = sorted(by_element, key=lambda el: (Element(el).X, el))
    return int(data.number), [sorted(by_element[el]) for el in order]


def wyckoff_templates(config: SymmetryConfig) -> list[WyckoffTemplate]:
    """Templates observed in ``config.statistics_dataset``, most frequent first (cached).

    Raises:
        DataError: the dataset is unknown or has no structures.
    """
    from pymatgen.core import Structure

    from cloud_model.datasets import get_spec, load_dataset

    key = json.dumps(
        [config.statistics_dataset, config.statistics_splits, config.symprec,
         config.statistics_max_structures], sort_keys=True,
    )  # fmt: skip
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    path = config.cache_dir / f"wyckoff_templates_{config.statistics_dataset}_{digest}.json"
    if path.is_file():
        return [WyckoffTemplate.model_validate(t) for t in json.loads(path.read_text())]
    get_spec(config.statistics_dataset).require_structures("Wyckoff statistics")
    records = load_dataset(config.statistics_dataset, config.statistics_splits).records
    if config.statistics_max_structures is not None:
        records = records[: config.statistics_max_structures]
    counts: Counter[str] = Counter()
    examples: dict[str, tuple[int, list[list[str]], str, str]] = {}
    for record in records:
        if record.cif is None:
            continue
        structure = Structure.from_str(record.cif, fmt="cif")
        found = _template_of(structure, config.symprec)
        if found is None:
            continue
        tkey = json.dumps(found)
        counts[tkey] += 1
        if tkey not in examples:
            examples[tkey] = (*found, record.id, structure.composition.reduced_formula)
    templates = [
        WyckoffTemplate(
            space_group=examples[k][0],
            slots=examples[k][1],
            count=n,
            example_id=examples[k][2],
            example_formula=examples[k][3],
        )
        for k, n in counts.most_common()
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps([t.model_dump(mode="json") for t in templates]))
    logger.info("%d Wyckoff templates from %d structures", len(templates), len(records))
    return templates


def _charge_balanced(composition: dict[str, int], cache: dict[str, bool]) -> bool:
    from pymatgen.core import Composition

    comp = Composition(composition)
    key = comp.reduced_formula
    if key not in cache:
        cache[key] = bool(comp.oxi_state_guesses(max_sites=-50))
    return cache[key]


def _decorations(
    template: WyckoffTemplate, config: SymmetryConfig, rng: random.Random
) -> list[str] | None:
    """Elements for the template's slots (electronegativity order kept), or None."""
    from pymatgen.core import Element

    n = len(template.slots)
    optional = [el for el in config.elements if el not in config.require]
    if n < len(config.require) or n - len(config.require) > len(optional):
        return None
    chosen = list(config.require) + rng.sample(optional, n - len(config.require))
    return sorted(chosen, key=lambda el: (Element(el).X, el))


def propose_symmetric(config: SymmetryConfig) -> tuple[list[Proposal], Counter[str]]:
    """Structures built from sampled templates decorated with ``config.elements``.

    Returns:
        Up to ``config.n_proposals`` proposals (each a distinct template + decoration, built
        by pyxtal at random free parameters) and the count of attempts left out by reason
        (``not_charge_balanced``, ``repeated_decoration``, ``pyxtal_failed``).
    """
    import numpy as np
    from pymatgen.io.cif import CifWriter
    from pyxtal import pyxtal

    templates = [
        t
        for t in wyckoff_templates(config)
        if config.min_species <= len(t.slots) <= config.max_species
        and sum(t.atoms_per_slot()) <= config.max_atoms
        and t.count >= config.min_template_count
    ]
    rejected: Counter[str] = Counter()
    if not templates:
        logger.warning("no Wyckoff template fits species %d-%d, <= %d atoms",
                       config.min_species, config.max_species, config.max_atoms)  # fmt: skip
        return [], rejected
    total = sum(t.count for t in templates)
    rng = random.Random(config.seed)
    seen: set[str] = set()
    balanced: dict[str, bool] = {}
    out: list[Proposal] = []
    attempts = 0
    while len(out) < config.n_proposals and attempts < 50 * config.n_proposals:
        attempts += 1
        template = rng.choices(templates, weights=[t.count for t in templates])[0]
        elements = _decorations(template, config, rng)
        if elements is None:
            rejected["too_few_elements"] += 1
            continue
        numbers = template.atoms_per_slot()
        key = json.dumps([template.space_group, template.slots, elements])
        if key in seen:
            rejected["repeated_decoration"] += 1
            continue
        seen.add(key)
        if not _charge_balanced(dict(zip(elements, numbers, strict=True)), balanced):
            rejected["not_charge_balanced"] += 1
            continue
        seed = rng.randrange(2**31)
        crystal = pyxtal()
        try:
            crystal.from_random(
                3, template.space_group, elements, numbers, factor=config.volume_factor,
                sites=template.slots, random_state=np.random.default_rng(seed),
            )  # fmt: skip
        except Exception as exc:  # noqa: BLE001 -- pyxtal raises bare RuntimeError/ValueError/its own
            logger.debug("pyxtal could not build %s: %s", key, exc)
            rejected["pyxtal_failed"] += 1
            continue
        if not crystal.valid:
            rejected["pyxtal_failed"] += 1
            continue
        structure = crystal.to_pymatgen()
        structure = structure.get_primitive_structure(tolerance=0.05)
        out.append(
            Proposal(
                parent_id=template.example_id,
                generator=GENERATOR_NAME,
                parameters={
                    "space_group": template.space_group,
                    "wyckoff": {
                        el: slot for el, slot in zip(elements, template.slots, strict=True)
                    },
                    "template_count": template.count,
                    "template_formula": template.example_formula,
                    "pyxtal_seed": seed,
                    "statistics_dataset": config.statistics_dataset,
                },
                probability=template.count / total,
                formula=structure.composition.reduced_formula,
                cif=str(CifWriter(structure)),
            )
        )
    return out, rejected


def chemical_space_elements(formulas: Sequence[str]) -> list[str]:
    """The sorted union of the elements of ``formulas`` (a convenience for configs)."""
    from pymatgen.core import Composition

    return sorted({el.symbol for f in formulas for el in Composition(f).elements})


def template_summary(templates: Sequence[WyckoffTemplate], top: int = 10) -> list[dict[str, Any]]:
    """The ``top`` most frequent templates as plain dicts (for reports)."""
    return [t.model_dump(mode="json") for t in list(templates)[:top]]
