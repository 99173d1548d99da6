"""The Li-Mg-Al-O discovery campaign of issue 13, as one resumable command.

Stages (each writes ``<out>/<stage>/stage.json`` when finished; a rerun skips finished stages
and the campaigns inside resume from their stores):

1. ``generate`` -- candidates that exist in no dataset, *unrelaxed*:
   symmetry-first structures (:func:`loop.generate.symmetry.propose_symmetric`: Wyckoff
   templates counted from ``mp_20_biternary``, plus the 4-species ones of ``mp_20_pilot``,
   decorated with Li/Mg/Al/O, built by pyxtal; run once per seed, so each template is built
   at several random free parameters), and
   substitutions into the space: the registry's oxides whose cations the lambda table
   (Hautier et al. 2011, the table :mod:`loop.generate.substitution` uses) lets Li+/Mg2+/Al3+
   replace, charge-balanced products only. Every product is checked
   (:func:`loop.generate.checks.check_structure`), deduplicated against the registry's structures
   of the space and against each other (pymatgen ``StructureMatcher``, within groups of equal
   formula, space group and cell size) and SCOPE-encoded into ``generate/pool.csv``;
2. ``campaign`` -- ``configs/discover_li_mg_al_o.yaml`` on that pool: a GP surrogate chooses,
   the CHGNet adapter relaxes and measures the formation energy, and the pool grows from the
   best hits (``pool.generators.grow``);
3. ``hull`` -- the energy above the hull of every measured candidate of the space against the
   registry's competing phases, all evaluated with the same CHGNet relaxation
   (:func:`loop.generate.hull.hull_stability`), and whether a registry structure matches it;
   measured candidates that relaxed into the same structure are merged;
4. ``confirm`` -- GPAW (``configs/discover_gpaw_confirm.yaml``: the settings of
   ``configs/gpaw_small.yaml``) computes the formation energy of the new candidates lowest on
   the CHGNet hull (one per formula, small cells), against GPAW elemental references;
5. ``report`` -- ``report.json``, ``report.md`` and one CIF per new candidate under ``--results``.

Usage::

    export CLOUDLAB_DATA_DIR=/work/shared/data OMP_NUM_THREADS=1
    python benchmarks/discovery.py --out runs/discover_li_mg_al_o \\
        --results benchmarks/results/discovery_li_mg_al_o
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path
from typing import Any

# run as a script only benchmarks/ is on the path: the stages import as benchmarks.discover.*
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.discover.campaign import campaign_stage  # noqa: E402
from benchmarks.discover.common import REPO, log, run_stage  # noqa: E402
from benchmarks.discover.confirm import confirm_stage  # noqa: E402
from benchmarks.discover.generate import generate_stage  # noqa: E402
from benchmarks.discover.hull import hull_stage  # noqa: E402
from benchmarks.discover.report import report_stage  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/discover_li_mg_al_o"))
    parser.add_argument(
        "--results", type=Path, default=REPO / "benchmarks" / "results" / "discovery_li_mg_al_o"
    )
    parser.add_argument("--symmetry-seeds", type=int, default=5,
                        help="runs of the symmetry generator, each at its own random free parameters")  # fmt: skip
    parser.add_argument("--symmetry-per-seed", type=int, default=1000,
                        help="structures each run builds at most (distinct template + decoration)")  # fmt: skip
    parser.add_argument("--quaternary-per-seed", type=int, default=200,
                        help="4-species structures each run builds at most, from the Wyckoff sets "
                        "of mp_20_pilot (0: none)")  # fmt: skip
    parser.add_argument("--substitution-threshold", type=float, default=1e-4)
    parser.add_argument("--substitution-per-parent", type=int, default=5)
    parser.add_argument("--budget", type=int, default=None,
                        help="override the campaign's budget.experiments (CHGNet measurements)")  # fmt: skip
    parser.add_argument("--confirm", type=int, default=4, help="candidates confirmed with GPAW")
    parser.add_argument("--confirm-known", type=int, default=3,
                        help="known phases (what the confirmed decompose into) also run with GPAW")  # fmt: skip
    parser.add_argument("--confirm-max-atoms", type=int, default=12,
                        help="largest primitive cell given to GPAW")  # fmt: skip
    args = parser.parse_args()
    warnings.filterwarnings("ignore")  # pymatgen's CIF rounding notes, spglib deprecations
    out = args.out.resolve()
    stages: dict[str, dict[str, Any]] = {}
    stages["generate"] = run_stage(out, "generate", lambda d: generate_stage(d, args))
    pool_csv = Path(stages["generate"]["pool"])
    stages["campaign"] = run_stage(out, "campaign", lambda d: campaign_stage(d, args, pool_csv))
    campaign_dir = Path(stages["campaign"]["directory"])
    stages["hull"] = run_stage(out, "hull", lambda d: hull_stage(d, campaign_dir, pool_csv))
    candidates = Path(stages["hull"]["candidates"])
    known = Path(stages["hull"]["known_phases"])
    stages["confirm"] = run_stage(
        out, "confirm", lambda d: confirm_stage(d, args, candidates, known)
    )
    args.results.mkdir(parents=True, exist_ok=True)
    report = report_stage(out, args.results, stages)
    log(f"report: {args.results / 'report.md'} ({len(report['candidates'])} new candidates, "
        f"{report['counts']['gpaw_computed']} computed with GPAW)")  # fmt: skip


if __name__ == "__main__":
    main()
