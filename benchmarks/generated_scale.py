"""A generated pool of >= 100,000 candidates SCOPE-encoded and scored with bounded memory.

The candidates are data-mined substitutions (:func:`loop.generate.substitution.propose_substitutions`)
of the structures of ``mp_20_biternary``, *unrelaxed* (CHGNet relaxation of 100k structures
would take days on this machine; this measures the encoding and scoring path, not CHGNet).
Work is split into chunks of parents over a process pool: each worker proposes, SCOPE-encodes
(:func:`cloud_model.corpus.encode_structures`) and scores its chunk with the surrogate, and
sends back only 8-byte hashes of the SCOPE strings (for distinctness) and the predictions;
the main process keeps the running top-k, so memory stays bounded whatever the pool size.

The surrogate is an exact GP (BoTorch ``SingleTaskGP``, Matern-5/2) on the chunk-independent
part of :func:`loop.features.composition_features` (composition-weighted mean and spread of
elemental properties), fitted on the registry's formation energies of the parents.

Reported against the SCOPE floor of ``benchmarks/scope_throughput.py`` (CIF parse + one raw
spglib call) measured in the same run on a sample of the generated structures, plus peak
resident memory of the main process and of the largest worker. Results go to
``benchmarks/results/generated_scale.json``.

Usage::

    nice -n 10 python benchmarks/generated_scale.py --target 100000 --processes 2

Measured here (2 shared cores, 1,077 candidates at threshold 1e-4): proposing dominated
(785 ms per structure: the lambda table's combinatorics at a low threshold); encoding cost
20.5 ms per structure per process, the floor 7.2 ms; scoring 0.3 ms. At threshold 1e-3
proposing drops to ~10-15 ms per structure, so 100k candidates need ~30 min on 2 cores.
"""

from __future__ import annotations

import argparse
import hashlib
import heapq
import json
import multiprocessing as mp
import os
import resource
import sys
import time
import warnings
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from scope_throughput import floor_pass, machine_info  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "generated_scale.json"
N_STATS = 12  # property mean + spread columns at the end of composition_features
_STATE: dict[str, Any] = {}


def _stats_features(scopes: list[str]) -> np.ndarray:
    from loop.features import composition_features

    return composition_features(scopes)[:, -N_STATS:]  # (n, 12), chunk-independent


def _fit_gp(x: np.ndarray, y: np.ndarray) -> Any:
    import torch
    from botorch.fit import fit_gpytorch_mll
    from botorch.models import SingleTaskGP
    from botorch.models.transforms import Normalize, Standardize
    from gpytorch.mlls import ExactMarginalLogLikelihood

    tx = torch.as_tensor(x, dtype=torch.float64)
    ty = torch.as_tensor(y, dtype=torch.float64).unsqueeze(-1)
    gp = SingleTaskGP(tx, ty, input_transform=Normalize(tx.shape[-1]), outcome_transform=Standardize(1))
    fit_gpytorch_mll(ExactMarginalLogLikelihood(gp.likelihood, gp))
    gp.eval()
    return gp


def _init_worker(train_x: np.ndarray, train_y: np.ndarray, state: dict[str, Any]) -> None:
    import torch

    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    gp = _fit_gp_shell(train_x, train_y)
    gp.load_state_dict(state)
    gp.eval()
    _STATE["gp"] = gp


def _fit_gp_shell(x: np.ndarray, y: np.ndarray) -> Any:
    import torch
    from botorch.models import SingleTaskGP
    from botorch.models.transforms import Normalize, Standardize

    tx = torch.as_tensor(x, dtype=torch.float64)
    ty = torch.as_tensor(y, dtype=torch.float64).unsqueeze(-1)
    return SingleTaskGP(tx, ty, input_transform=Normalize(tx.shape[-1]), outcome_transform=Standardize(1))


def _chunk(task: tuple[list[tuple[str, str]], float]) -> dict[str, Any]:
    """Propose, encode and score one chunk; only hashes and predictions go back."""
    import torch
    from pymatgen.core import Structure

    from cloud_model.corpus import encode_structures
    from loop.generate.substitution import SubstitutionConfig, propose_substitutions

    parents, threshold = task
    t0 = time.perf_counter()
    structures = [(pid, Structure.from_str(cif, fmt="cif")) for pid, cif in parents]
    config = SubstitutionConfig(threshold=threshold, max_per_parent=60)
    proposals, _ = propose_substitutions(structures, config)
    t1 = time.perf_counter()
    cifs = [p.cif for p in proposals]
    encoded = encode_structures(cifs, variant="cloud", symprec=0.1, processes=1)
    t2 = time.perf_counter()
    scopes = [s for s in encoded.strings if s is not None]
    mean = std = np.zeros(0)
    if scopes:
        x = torch.as_tensor(_stats_features(scopes), dtype=torch.float64)
        with torch.no_grad():
            post = _STATE["gp"].posterior(x)
            mean = post.mean.squeeze(-1).numpy()
            std = post.variance.clamp_min(0).sqrt().squeeze(-1).numpy()
    t3 = time.perf_counter()
    return {
        "hashes": [hashlib.blake2b(s.encode(), digest_size=8).digest() for s in scopes],
        "mean": mean.tolist(),
        "std": std.tolist(),
        "scopes_top": sorted(zip(mean.tolist(), scopes, strict=True))[:5],
        "n_proposed": len(proposals),
        "n_failed": len(encoded.errors),
        "seconds": {"propose": t1 - t0, "encode": t2 - t1, "score": t3 - t2},
        "sample_cifs": cifs[:: max(1, len(cifs) // 20)][:20],
        "maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--target", type=int, default=100_000, help="distinct candidates to reach")
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--chunk", type=int, default=20, help="parents per chunk")
    parser.add_argument("--train", type=int, default=1500, help="parents' labels the GP is fitted on")
    parser.add_argument("--threshold", type=float, default=1e-3, help="substitution probability")
    parser.add_argument("--floor-sample", type=int, default=1000)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    import torch

    from cloud_model.corpus import encode_structures
    from cloud_model.datasets import load_dataset

    torch.set_num_threads(1)
    started = time.perf_counter()
    records = [r for r in load_dataset("mp_20_biternary").records if r.cif is not None]
    rng = np.random.default_rng(0)
    order = rng.permutation(len(records))
    records = [records[i] for i in order]
    labelled = [r for r in records if np.isfinite(r.targets.get("formation_energy_per_atom", np.nan))]
    train = labelled[: args.train]
    t0 = time.perf_counter()
    encoded = encode_structures([r.cif or "" for r in train], variant="cloud", processes=1)
    ok = [i for i, s in enumerate(encoded.strings) if s is not None]
    y = np.array([train[i].targets["formation_energy_per_atom"] for i in ok])
    x = _stats_features([encoded.strings[i] or "" for i in ok])
    gp = _fit_gp(x, y)
    fit_s = time.perf_counter() - t0
    state = {k: v.detach().clone() for k, v in gp.state_dict().items()}

    parents = [(r.id, r.cif or "") for r in records]
    chunks = [(parents[i : i + args.chunk], args.threshold) for i in range(0, len(parents), args.chunk)]
    seen: set[bytes] = set()
    top: list[tuple[float, str]] = []  # max-heap by -mean of the 20 lowest predictions
    totals = {"propose": 0.0, "encode": 0.0, "score": 0.0}
    n_proposed = n_failed = n_chunks = 0
    worker_rss = 0.0
    sample_cifs: list[str] = []
    t_gen = time.perf_counter()
    ctx = mp.get_context("spawn")
    with ctx.Pool(args.processes, initializer=_init_worker, initargs=(x, y, state), maxtasksperchild=50) as pool:
        for out in pool.imap_unordered(_chunk, chunks):
            n_chunks += 1
            n_proposed += out["n_proposed"]
            n_failed += out["n_failed"]
            seen.update(out["hashes"])
            for k in totals:
                totals[k] += out["seconds"][k]
            worker_rss = max(worker_rss, out["maxrss_mb"])
            if len(sample_cifs) < args.floor_sample:
                sample_cifs += out["sample_cifs"]
            for m, s in out["scopes_top"]:
                heapq.heappush(top, (-m, s))
                if len(top) > 20:
                    heapq.heappop(top)
            if n_chunks % 25 == 0:
                rate = len(seen) / (time.perf_counter() - t_gen)
                print(
                    f"{n_chunks}/{len(chunks)} chunks, {len(seen):,} distinct of {args.target:,} "
                    f"({rate:.1f}/s, ~{(args.target - len(seen)) / max(rate, 1e-9) / 60:.0f} min left)",
                    file=sys.stderr,
                    flush=True,
                )
            if len(seen) >= args.target:
                pool.terminate()
                break
    gen_wall = time.perf_counter() - t_gen
    # the SCOPE floor and the encoder on the same generated structures, now, in this process
    sample = sample_cifs[: args.floor_sample]
    floor_s = floor_pass(sample, 0.1)
    t_enc = time.perf_counter()
    encode_structures(sample, variant="cloud", symprec=0.1, processes=1)
    enc_s = time.perf_counter() - t_enc
    n_distinct = len(seen)
    result = {
        "benchmark": "generated_scale",
        "when": datetime.now(UTC).isoformat(),
        "command": " ".join(sys.argv),
        "machine": machine_info(),
        "generator": f"substitution of mp_20_biternary structures (lambda table, threshold "
        f"{args.threshold:g}, <= 60 per parent), unrelaxed",
        "processes": args.processes,
        "n_parents_used": n_chunks * args.chunk,
        "n_proposed": n_proposed,
        "n_encode_failed": n_failed,
        "n_distinct_scope": n_distinct,
        "surrogate": f"exact GP on 12 composition-property features, fit on {len(y)} labels in "
        f"{fit_s:.1f} s",
        "wall_s": round(gen_wall, 1),
        "throughput_per_s": round(n_proposed / gen_wall, 1),
        "worker_cpu_s": {k: round(v, 1) for k, v in totals.items()},
        "per_structure_ms_per_process": {k: round(1e3 * v / max(n_proposed, 1), 3) for k, v in totals.items()},
        "floor_per_s_1proc": round(len(sample) / floor_s, 1),
        "encoder_per_s_1proc_same_sample": round(len(sample) / enc_s, 1),
        "pipeline_per_s_per_process": round(n_proposed / sum(totals.values()), 1),
        "pipeline_over_floor_per_process": round((n_proposed / sum(totals.values())) / (len(sample) / floor_s), 3),
        "encoder_over_floor": round(floor_s / enc_s, 3),
        "peak_rss_mb_main": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "peak_rss_mb_worker": round(worker_rss, 1),
        "best_predicted": [{"predicted_formation_energy_per_atom": -m, "scope": s} for m, s in sorted(top, reverse=True)][:10],
        "total_s": round(time.perf_counter() - started, 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k not in ("best_predicted", "machine")}, indent=1))


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
