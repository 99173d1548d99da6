"""Formation energies of small MP binaries: CHGNet and GPAW against the Materials Project.

Picks binaries from ``mp_20_biternary`` (through the dataset registry) with at most
4 atoms in the primitive cell, on the convex hull, whose elements all have a
built-in elemental reference (:mod:`adapters.elemental_references`) and that
Materials Project computes with plain GGA and **no** MP2020 correction: no
anion-corrected element (O, S, Se, Te, F, Cl, Br, I, N, H, Si, Sb as anions),
hence no GGA+U either (U applies only to transition-metal oxides/fluorides).
The comparison is then PBE against PBE: what remains are code (PAW datasets,
cutoff, k-points, smearing) and reference-state differences, plus CHGNet's
fitting error.

Each compound is computed at its MP geometry (no relaxation) through the real
adapters: CHGNet (in-process; elemental references relaxed with CHGNet) and GPAW
(supervised subprocess; PW ``--cutoff`` eV, ``--kpoint-density`` per A^-1,
Fermi-Dirac 0.05 eV, spin-polarised when a magnetic element is present,
elemental references at their E(V) minimum). Reported: each value, each error
against MP, the MAE of each method, and the wall and CPU time per calculation
(GPAW's references separately; CHGNet's model load is paid once, before the loop).

    nice -n 10 python benchmarks/formation_energy_check.py \\
        --out benchmarks/results/formation_energy_check.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from adapters.base import ExperimentRequest, JobHandle, JobState, LabAdapter
from adapters.dft import GpawAdapter, GpawSettings, gpaw_versions
from adapters.elemental_references import reference_structure
from adapters.mlip import ChgnetAdapter, ChgnetSettings
from cloud_model.datasets import CrystalRecord, load_dataset
from cloud_model.errors import CloudlabError

MIRROR = Path(__file__).resolve().parents[2] / "shared" / "data"  # the offline mirror, as in tests
# MP2020 anion corrections (pymatgen MP2020Compatibility.yaml) and U elements.
CORRECTED = {"O", "S", "Se", "Te", "F", "Cl", "Br", "I", "N", "H", "Si", "Sb"}
# B2 AlNi (magnetic Ni reference), B2 AlRh, B2 BePd (hcp Be), B2 CaPd, zincblende AlAs (A7 As).
DEFAULT_IDS = ("mp-1487", "mp-364", "mp-11274", "mp-213", "mp-2172")
TARGET = "formation_energy_per_atom"


def eligible(record: CrystalRecord) -> str | None:
    """Why ``record`` is unfit for a like-for-like PBE comparison (None if fit)."""
    elements = set(record.extra.get("elements") or ())
    if len(elements) != 2:
        return "not a binary"
    if elements & CORRECTED:
        return f"MP2020-corrected element {sorted(elements & CORRECTED)}"
    if record.targets.get("e_above_hull", 0.0) > 0.0:
        return "above the hull"
    for element in elements:
        try:
            reference_structure(element)
        except CloudlabError as exc:
            return str(exc)
    if len(record.structure().get_primitive_structure()) > 4:
        return "more than 4 atoms in the primitive cell"
    return None


def run(
    adapter: LabAdapter, records: list[CrystalRecord], timeout_s: float
) -> dict[str, dict[str, Any]]:
    """Submit every record, wait, and collect value, wall and CPU times per job."""
    handles: dict[str, JobHandle] = {}
    for r in records:
        request = ExperimentRequest(candidate_id=r.id, targets=(TARGET,), structure_cif=r.cif)
        handles[r.id] = adapter.submit(request, f"formation-check:{adapter.name}:{r.id}")
    out: dict[str, dict[str, Any]] = {}
    deadline = time.monotonic() + timeout_s
    for rid, handle in handles.items():
        while not (status := adapter.poll(handle)).state.is_terminal:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{adapter.name} job for {rid} still {status.state}")
            time.sleep(0.5)
        if status.state is not JobState.SUCCEEDED:
            out[rid] = {"state": status.state.value, "message": status.message}
            continue
        m = adapter.result(handle)
        p = m.provenance
        out[rid] = {
            "state": "SUCCEEDED",
            "value": m.values[TARGET].value,
            "job_wall_s": (m.finished_at - m.started_at).total_seconds() if m.started_at else None,
            "calculation_wall_s": p["calculation_wall_s"],
            "reference_wall_s": p["reference_wall_s"],
            "cpu_s": m.cost,
            "references_eV_per_atom": p["references"],
            **(
                {"kpoint_grid": p["kpoint_grid"], "spin_polarized": p["spin_polarized"]}
                if "kpoint_grid" in p
                else {}
            ),
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--ids", nargs="+", default=list(DEFAULT_IDS), help="MP ids in mp_20_biternary"
    )
    parser.add_argument("--cutoff", type=float, default=400.0, help="GPAW plane-wave cutoff (eV)")
    parser.add_argument("--kpoint-density", type=float, default=3.0, help="GPAW k-points per A^-1")
    parser.add_argument("--work-dir", type=Path, default=None, help="job dirs + reference caches")
    parser.add_argument("--skip-gpaw", action="store_true")
    parser.add_argument(
        "--out", type=Path, default=Path("benchmarks/results/formation_energy_check.json")
    )
    args = parser.parse_args()

    if MIRROR.is_dir():
        os.environ.setdefault("CLOUDLAB_DATA_DIR", str(MIRROR))
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="formation-check-"))
    loaded = load_dataset("mp_20_biternary")
    by_id = {r.id: r for r in loaded.records}
    records = [by_id[i] for i in args.ids]
    for r in records:
        problem = eligible(r)
        if problem is not None:
            raise SystemExit(f"{r.id} ({r.extra.get('formula')}) is unfit: {problem}")
    n_eligible = sum(1 for r in loaded.records if eligible(r) is None)

    t0 = time.perf_counter()
    chgnet = ChgnetAdapter(ChgnetSettings(work_dir=work / "chgnet"))
    chgnet.model()  # load once, outside the per-calculation timings
    chgnet_load_s = time.perf_counter() - t0
    results = {"chgnet": run(chgnet, records, timeout_s=3600)}
    chgnet.close()
    gpaw_settings = GpawSettings(
        work_dir=work / "gpaw",
        cutoff_ev=args.cutoff,
        kpoint_density=args.kpoint_density,
        timeout_s=7200,
    )
    if not args.skip_gpaw:
        results["gpaw"] = run(GpawAdapter(gpaw_settings), records, timeout_s=6 * 3600)

    rows: list[dict[str, Any]] = []
    errors: dict[str, list[float]] = {name: [] for name in results}
    for r in records:
        mp_value = r.targets[TARGET]
        row: dict[str, Any] = {
            "id": r.id,
            "formula": r.structure().composition.reduced_formula,
            "n_atoms_primitive": len(r.structure().get_primitive_structure()),
            "spacegroup": r.extra.get("spacegroup.number"),
            "mp_formation_energy_per_atom": mp_value,
        }
        for name, per_id in results.items():
            res = per_id[r.id]
            row[name] = res
            if res["state"] == "SUCCEEDED":
                res["error_vs_mp"] = res["value"] - mp_value
                errors[name].append(res["error_vs_mp"])
        if (
            "gpaw" in results
            and {"value"} <= row["chgnet"].keys()
            and {"value"} <= row["gpaw"].keys()
        ):
            row["chgnet_minus_gpaw"] = row["chgnet"]["value"] - row["gpaw"]["value"]
            row["gpaw_over_chgnet_calculation_time"] = (
                row["gpaw"]["calculation_wall_s"] / row["chgnet"]["calculation_wall_s"]
            )
        rows.append(row)

    summary = {
        name: {
            "n": len(errs),
            "mae_vs_mp": float(np.mean(np.abs(errs))) if errs else None,
            "max_abs_error_vs_mp": float(np.max(np.abs(errs))) if errs else None,
            "mean_signed_error_vs_mp": float(np.mean(errs)) if errs else None,
            "median_calculation_wall_s": float(
                np.median(
                    [
                        v["calculation_wall_s"]
                        for v in results[name].values()
                        if "calculation_wall_s" in v
                    ]
                )
            ),
        }
        for name, errs in errors.items()
    }
    gpaw_version, data_version = gpaw_versions()
    report = {
        "benchmark": "formation_energy_check",
        "dataset": "mp_20_biternary (val + test)",
        "n_eligible_binaries_in_dataset": n_eligible,
        "selection": "binaries, <= 4 atoms in the primitive cell, on the hull, no MP2020-corrected or "
        "U element, built-in elemental references",
        "note": "MP formation energies are GGA/GGA+U with MP2020 corrections; the chosen compounds receive "
        "none, so MP's values are plain PBE (VASP PAW) and differences reflect code, settings and references. "
        "All structures at their MP geometry (single points).",
        "chgnet": {
            "settings": ChgnetSettings(work_dir=work / "chgnet").model_dump(
                mode="json", exclude={"work_dir"}
            ),
            "model_load_s": chgnet_load_s,
        },  # fmt: skip
        "gpaw": {
            "settings": gpaw_settings.model_dump(mode="json", exclude={"work_dir"}),
            "gpaw_version": gpaw_version,
            "gpaw_data_version": data_version,
        },
        "summary": summary,
        "compounds": rows,
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "load_avg_1min": os.getloadavg()[0],
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    header = f"{'compound':10s} {'MP':>7s}" + "".join(
        f" {n:>8s} {'err':>6s} {'t/s':>6s}" for n in results
    )
    print(header)
    for row in rows:
        line = f"{row['formula']:10s} {row['mp_formation_energy_per_atom']:7.3f}"
        for name in results:
            res = row[name]
            if "value" in res:
                line += f" {res['value']:8.3f} {res['error_vs_mp']:+6.3f} {res['calculation_wall_s']:6.1f}"
            else:
                line += f" {res['state']:>22s}"
        print(line)
    for name, s in summary.items():
        print(f"{name}: MAE vs MP {s['mae_vs_mp']:.3f} eV/atom over {s['n']} compounds")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
