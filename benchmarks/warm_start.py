"""What a CHGNet job costs end to end, started cold or forked from a warm server.

Each job is the static energy of bulk Si (8 atoms), submitted one at a time through
:class:`adapters.mlip.ChgnetAdapter`; end to end is submit -> SUCCEEDED as the caller
sees it (supervisor start, worker start, imports, model load, the calculation, the
result file). Cold: ``warm_start: false`` (``python -m adapters.mlip`` per job). Warm:
the worker forks from a server that imported torch and CHGNet once
(:mod:`adapters.warm_workers`); the server is started, and waited for, before the
timed jobs.

    python benchmarks/warm_start.py --jobs 8 --out benchmarks/results/warm_start.json
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import tempfile
import time
from pathlib import Path

from adapters.base import ExperimentRequest, JobState
from adapters.mlip import ChgnetAdapter


def si_cif() -> str:
    from ase.build import bulk
    from pymatgen.io.ase import AseAtomsAdaptor
    from pymatgen.io.cif import CifWriter

    return str(CifWriter(AseAtomsAdaptor.get_structure(bulk("Si", "diamond", a=5.43, cubic=True))))


def run_job(adapter: ChgnetAdapter, cid: str, cif: str) -> tuple[float, float, bool]:
    """One job: (end-to-end s, calculation s, whether it was warm-started)."""
    request = ExperimentRequest(candidate_id=cid, structure_cif=cif, targets=["energy_per_atom"])
    t0 = time.perf_counter()
    handle = adapter.submit(request, f"{cid}-{time.time_ns()}")
    while not (status := adapter.poll(handle)).state.is_terminal:
        time.sleep(0.01)
    wall = time.perf_counter() - t0
    if status.state is not JobState.SUCCEEDED:
        raise RuntimeError(f"job {cid} ended {status.state}: {status.message}")
    record = adapter.store.record(handle.job_id)
    calc = float(adapter.result(handle).provenance["calculation_wall_s"])
    return wall, calc, record.warm_started


def wait_for_server(adapter: ChgnetAdapter, cif: str) -> float:
    """Start the warm server (a first job finds none) and wait until it listens; seconds."""
    t0 = time.perf_counter()
    request = ExperimentRequest(
        candidate_id="prime", structure_cif=cif, targets=["energy_per_atom"]
    )
    handle = adapter.submit(request, f"prime-{time.time_ns()}")
    while not adapter.poll(handle).state.is_terminal:
        time.sleep(0.05)
    log = (adapter.store.path(handle.job_id) / "supervisor.log").read_text()
    found = re.search(r"no warm adapters\.mlip server at (\S+) ", log)
    if found:
        path = Path(found.group(1))
        while not path.exists():
            time.sleep(0.05)
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--jobs", type=int, default=8)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/warm_start.json"))
    args = parser.parse_args()
    cif = si_cif()
    rows: dict[str, dict[str, object]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for mode in ("cold", "warm"):
            adapter = ChgnetAdapter(
                {"work_dir": f"{tmp}/{mode}", "threads": 1, "warm_start": mode == "warm"}
            )
            run_job(adapter, "references", cif)  # the elemental reference cache, outside the clock
            server_s = wait_for_server(adapter, cif) if mode == "warm" else None
            jobs = [run_job(adapter, f"si-{i}", cif) for i in range(args.jobs)]
            adapter.close()
            warm_started = sum(warm for _, _, warm in jobs)
            if mode == "warm" and warm_started != len(jobs):
                raise RuntimeError(f"only {warm_started} of {len(jobs)} jobs were warm-started")
            rows[mode] = {
                "end_to_end_s_median": round(statistics.median(w for w, _, _ in jobs), 3),
                "calculation_s_median": round(statistics.median(c for _, c, _ in jobs), 3),
                "end_to_end_s": [round(w, 3) for w, _, _ in jobs],
                "warm_started": warm_started,
                "priming_job_s": None
                if server_s is None
                else round(server_s, 2),  # + server start, if none ran
            }
            print(mode, json.dumps({k: v for k, v in rows[mode].items() if k != "end_to_end_s"}))
    cold, warm = rows["cold"], rows["warm"]
    report = {
        "command": f"python benchmarks/warm_start.py --jobs {args.jobs} --out {args.out}",
        "job": "CHGNet 0.3.0 static energy of bulk Si (8 atoms), threads 1, one job at a time",
        "cpus": os.cpu_count(),
        "load_avg_1min_at_end": round(os.getloadavg()[0], 2),
        "modes": rows,
        "cold_over_warm_end_to_end": round(
            float(cold["end_to_end_s_median"]) / float(warm["end_to_end_s_median"]),
            2,  # type: ignore[arg-type]
        ),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"cold / warm end to end: {report['cold_over_warm_end_to_end']}x -> {args.out}")


if __name__ == "__main__":
    main()
