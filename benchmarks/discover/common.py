"""What every stage of the discovery driver shares: the space, the registry, the stage runner."""

from __future__ import annotations

import json
import re
import sys
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pymatgen.core import Structure


REPO = Path(__file__).resolve().parents[2]  # benchmarks/discover/common.py -> the repository
SPACE = ("Al", "Li", "Mg", "O")
TARGET_SPECIES = ("Li+", "Mg2+", "Al3+")  # what the substitution generator puts on cation sites
HULL_DATASET = "mp_20_biternary"  # the substitution parents and Wyckoff statistics come from it
QUATERNARY_DATASET = "mp_20_pilot"  # 4-species Wyckoff sets and parents (biternary has none)
# every registry CIF set holding compounds of the space: novelty check and competing phases
REGISTRY_SETS = (
    HULL_DATASET, "mp_20_pilot", "mpts_52", "aflow_debye_temperature", "aflow_thermal_expansion",
    "perov_5",
)  # fmt: skip
_FORMULA_SUM = re.compile(r"^_chemical_formula_sum\s+(.+)$", re.MULTILINE)
MP_FORMULAS = "crabnet_mp_e_form"  # Materials Project formulas (no structures): an outside check
# cations the lambda table exchanges with Li+/Mg2+/Al3+ often enough to be worth a parent
PARENT_CATIONS = frozenset("Li Na K Be Mg Ca Sr Zn Cd Ni Co Fe Mn Cu Al Ga In Sc Cr Ti".split())


def log(message: str) -> None:
    """One progress line on stderr with the wall-clock time."""
    print(f"[{datetime.now(UTC):%H:%M:%S}] {message}", file=sys.stderr, flush=True)


def run_stage(out: Path, name: str, body: Callable[[Path], dict[str, Any]]) -> dict[str, Any]:
    """``body(stage_dir)`` once: its summary (with ``seconds``) is kept in ``stage.json``."""
    stage_dir = out / name
    done = stage_dir / "stage.json"
    if done.is_file():
        log(f"{name}: done before, skipped ({done})")
        return dict(json.loads(done.read_text()))
    stage_dir.mkdir(parents=True, exist_ok=True)
    log(f"{name}: started")
    t0 = time.perf_counter()
    summary = body(stage_dir)
    summary["seconds"] = round(time.perf_counter() - t0, 1)
    summary["finished_at"] = datetime.now(UTC).isoformat(timespec="seconds")
    done.write_text(json.dumps(summary, indent=1) + "\n")
    log(f"{name}: finished in {summary['seconds']} s")
    return summary


def registry_structures(elements: Sequence[str]) -> list[tuple[str, Structure]]:
    """(``dataset:id``, structure) of every registry compound whose elements lie in ``elements``.

    All of :data:`REGISTRY_SETS`: the novelty check and the hull's competing phases. Single
    elements are left out: the hull's elements are the adapter's own elemental references, the
    ones its formation energies are measured against.
    """
    from pymatgen.core import Composition, Structure

    from cloud_model.datasets import load_dataset

    wanted = set(elements)
    out = []
    for dataset in REGISTRY_SETS:
        for record in load_dataset(dataset).records:
            if record.cif is None:
                continue
            formula = record.extra.get("formula")
            if formula is None:
                match = _FORMULA_SUM.search(record.cif)
                if match is None:
                    continue
                formula = match.group(1).strip("'\" ")
            have = {el.symbol for el in Composition(str(formula)).elements}
            if len(have) >= 2 and have <= wanted:
                out.append((f"{dataset}:{record.id}", Structure.from_str(record.cif, fmt="cif")))
    return out
