"""SCOPE encoding throughput against the floor measured in the same run.

For each dataset a fixed random subsample of CIF rows is timed three ways,
interleaved (floor, encoder, floor, encoder...) so that machine load affects both
alike:

* floor: ``Structure.from_str(cif, "cif")`` + one raw ``spglib.get_symmetry_dataset``;
* encoder, 1 process: :func:`cloud_model.corpus.encode_structures` from the CIF
  text (parse, validation, spglib, canonical letters, string);
* encoder, k processes: the same over a process pool (pool start-up included).

Reported: structures per second, the ratio encoder/floor (target >= 0.75) and the
speed-up per process count. Results go to ``benchmarks/results/scope_throughput.json``.

Usage::

    nice -n 10 python benchmarks/scope_throughput.py --n 2000 --repeats 3 --processes 2
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import statistics
import time
import warnings
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import spglib
from pydantic import BaseModel, ConfigDict

from cloud_model.corpus import encode_structures
from cloud_model.datasets import load_dataset
from cloud_model.scope import ENCODER_VERSION, scope_tables
from cloud_model.wyckoff import letter_group

spglib.error.OLD_ERROR_HANDLING = False
RESULTS = Path(__file__).resolve().parent / "results" / "scope_throughput.json"


class DatasetThroughput(BaseModel):
    """Timings of one dataset (seconds are medians over the repeats)."""

    model_config = ConfigDict(extra="forbid")

    dataset: str
    n_structures: int
    floor_s: float
    floor_per_s: float
    encoder_s: float
    encoder_per_s: float
    ratio_encoder_over_floor: float
    encoder_cpu_s: float
    parallel_s: dict[str, float]
    parallel_per_s: dict[str, float]
    speedup: dict[str, float]
    parallel_cpu_s: dict[str, float]
    parallel_cpu_over_serial_cpu: dict[str, float]
    parallel_cpu_share: dict[str, float]
    failures: int
    all_floor_s: list[float]
    all_encoder_s: list[float]


class ThroughputReport(BaseModel):
    """The whole benchmark run."""

    model_config = ConfigDict(extra="forbid")

    benchmark: str = "scope_throughput"
    created: str
    command: str
    variant: str
    symprec: float
    encoder_version: str
    target_ratio: float = 0.75
    machine: dict[str, str | int | float]
    datasets: list[DatasetThroughput]


def floor_pass(cifs: list[str], symprec: float) -> float:
    """Seconds to parse every CIF and run spglib once on it."""
    from pymatgen.core import Structure

    start = time.perf_counter()
    for cif in cifs:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            s = Structure.from_str(cif, fmt="cif")
        cell = (s.lattice.matrix, s.frac_coords, [sp.Z for sp in s.species])
        spglib.get_symmetry_dataset(cell, symprec=symprec, angle_tolerance=5.0)  # type: ignore[arg-type]
    return time.perf_counter() - start


def _cpu_seconds() -> float:
    """CPU time of this process and of its reaped children (pool workers)."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def encoder_pass(cifs: list[str], variant: str, symprec: float, processes: int) -> tuple[float, int, float]:
    """Wall seconds to encode every CIF, the number of failures, and the CPU seconds spent."""
    cpu, start = _cpu_seconds(), time.perf_counter()
    result = encode_structures(cifs, variant=variant, symprec=symprec, processes=processes)  # type: ignore[arg-type]
    return time.perf_counter() - start, len(result.errors), _cpu_seconds() - cpu


def machine_info() -> dict[str, str | int | float]:
    """CPU model, usable cores, load, library versions."""
    import pymatgen.core

    cpu = platform.processor()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {
        "cpu": cpu,
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1,
        "load_average_1min_at_start": os.getloadavg()[0],
        "python": platform.python_version(),
        "spglib": spglib.__version__,
        "pymatgen": getattr(pymatgen.core, "__version__", "unknown"),
        "numpy": np.__version__,
        "nice": os.nice(0),
    }


def run_dataset(name: str, n: int, repeats: int, processes: list[int], variant: str,
                symprec: float) -> DatasetThroughput:
    """Time floor, single-process and multi-process encoding on ``n`` rows of ``name``."""
    records = [r for r in load_dataset(name).records if r.cif is not None]
    rng = np.random.default_rng(0)
    cifs = [records[i].cif for i in rng.choice(len(records), min(n, len(records)), replace=False)]
    cifs_ok = [c for c in cifs if c is not None]
    floor_pass(cifs_ok[:20], symprec)  # warm imports and caches
    encoder_pass(cifs_ok[:20], variant, symprec, 1)
    floors, encoders, cpus, failures = [], [], [], 0
    for _ in range(repeats):
        floors.append(floor_pass(cifs_ok, symprec))
        seconds, failures, cpu = encoder_pass(cifs_ok, variant, symprec, 1)
        encoders.append(seconds)
        cpus.append(cpu)
    floor_s, enc_s, enc_cpu = statistics.median(floors), statistics.median(encoders), statistics.median(cpus)
    parallel: dict[str, float] = {}
    parallel_cpu: dict[str, float] = {}
    for k in processes:
        runs = [encoder_pass(cifs_ok, variant, symprec, k) for _ in range(repeats)]
        parallel[str(k)] = statistics.median(r[0] for r in runs)
        parallel_cpu[str(k)] = statistics.median(r[2] for r in runs)
    count = len(cifs_ok)
    return DatasetThroughput(
        dataset=name, n_structures=count, floor_s=floor_s, floor_per_s=count / floor_s, encoder_s=enc_s,
        encoder_per_s=count / enc_s, ratio_encoder_over_floor=floor_s / enc_s, parallel_s=parallel,
        parallel_per_s={k: count / v for k, v in parallel.items()},
        speedup={k: enc_s / v for k, v in parallel.items()}, failures=failures, encoder_cpu_s=enc_cpu,
        parallel_cpu_s=parallel_cpu,
        parallel_cpu_over_serial_cpu={k: v / enc_cpu for k, v in parallel_cpu.items()},
        # CPU seconds received per wall second, per process: 1.0 = the workers never waited for a core
        parallel_cpu_share={k: parallel_cpu[k] / parallel[k] / int(k) for k in parallel},
        all_floor_s=floors, all_encoder_s=encoders,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", default=["perov_5", "mp_20_biternary"])
    parser.add_argument("--n", type=int, default=2000, help="structures per dataset")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--processes", type=int, nargs="+", default=[2])
    parser.add_argument("--variant", default="cloud", choices=["cloud", "native"])
    parser.add_argument("--symprec", type=float, default=0.1)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    scope_tables(), letter_group(1)  # tables loaded once, before any timing
    machine = machine_info()
    results = []
    for name in args.datasets:
        r = run_dataset(name, args.n, args.repeats, args.processes, args.variant, args.symprec)
        results.append(r)
        speedups = ", ".join(f"{k} proc: {v:.2f}x ({r.parallel_per_s[k]:.0f}/s, CPU x{r.parallel_cpu_over_serial_cpu[k]:.2f}, "
                             f"core share {r.parallel_cpu_share[k]:.2f})" for k, v in r.speedup.items())
        print(f"{name}: n={r.n_structures} floor {r.floor_per_s:.0f}/s, encoder {r.encoder_per_s:.0f}/s, "
              f"ratio {r.ratio_encoder_over_floor:.3f} (target >= 0.75); speed-up {speedups}; "
              f"failures {r.failures}")
    machine["load_average_1min_at_end"] = os.getloadavg()[0]
    command = ("nice -n 10 python benchmarks/scope_throughput.py --n {} --repeats {} --processes {}"
               .format(args.n, args.repeats, " ".join(map(str, args.processes))))
    report = ThroughputReport(created=datetime.now(UTC).isoformat(timespec="seconds"), command=command,
                              variant=args.variant, symprec=args.symprec, encoder_version=ENCODER_VERSION,
                              machine=machine, datasets=results)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(report.model_dump_json(indent=2) + "\n", encoding="utf-8")
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
