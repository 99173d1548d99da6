"""``cloudlab bench``: strategies x seeds on simulated loops, with the field's metrics.

A benchmark config names a base campaign and the strategies to compare; each
strategy is a set of overrides deep-merged into the base (``surrogate``,
``acquisition``...). Every (strategy, batch size, seed) run is an ordinary campaign
directory under ``<out>/runs/`` run with ``dispatch.mode: inline`` (the simulated
lab on a virtual clock: no waiting), so runs can be inspected with
``cloudlab status|report``. Runs execute in parallel as Ray tasks; a run whose
``result.json`` exists is not recomputed, so an interrupted benchmark resumes.
Metrics (see :mod:`loop.metrics`) are computed against the pool's hidden values.

Multi-fidelity benchmarks (a base campaign with ``fidelities``, :mod:`loop.fidelity`):
a candidate counts as found only once measured at the highest fidelity, so the
experiment-axis metrics read the highest-fidelity jobs only, and each strategy also
gets cost-axis metrics (:func:`cost_metrics`): the cost to reach 50 % (and 90 %) of
the top set and the share of the top set found within the cost budget, median and
5-95 % band over seeds. A single-fidelity baseline is the same campaign with only
the highest fidelity listed, so its jobs carry that fidelity's cost too.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from cloud_model.errors import ConfigError
from cloud_model.yaml_file import read_yaml
from loop import metrics as M
from loop.config import CampaignConfig, format_validation_error, load_config, parse_config

logger = logging.getLogger(__name__)


class BenchConfig(BaseModel):
    """A benchmark: a base campaign, strategies as overrides, seeds and batch sizes."""

    model_config = ConfigDict(extra="forbid")

    schema_version: int = 1
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    campaign: Path  # base campaign YAML, relative to this file
    overrides: dict[str, Any] = Field(default_factory=dict)  # applied to every run
    strategies: dict[str, dict[str, Any]] = Field(min_length=1)  # name -> overrides
    seeds: int = Field(default=20, ge=1)
    batch_sizes: list[int] = Field(default_factory=lambda: [8])
    top_fractions: list[float] = Field(default_factory=lambda: [0.01, 0.05])
    # fractions of the top set whose AF (experiments random needs / the strategy needs) is reported
    af_levels: list[float] = Field(default_factory=lambda: [0.5, 0.9], min_length=1)
    parallel: int = Field(default=2, ge=1)  # runs at once (Ray tasks)
    # a benchmark of extra strategies on another benchmark's pool and budget, on the first
    # ``seeds`` of its seeds: its rows compare with that benchmark's (which holds random)
    compare_with: str | None = None


class RunTimings(BaseModel):
    """Seconds one run spent per stage."""

    model_config = ConfigDict(extra="forbid")

    fit: float
    score: float
    acquisition: float
    dispatch: float


class RunRecord(BaseModel):
    """What one benchmark run chose and what it cost (``runs/<name>/result.json``)."""

    model_config = ConfigDict(extra="ignore")

    name: str
    measured_ids: list[str]
    submitted_ids: list[str]
    stop_reason: str
    wall_s: float
    cpu_s: float
    timings: RunTimings
    # the surrogate's predictions of its own picks, made before they were measured
    calibration: dict[str, Any] | None = None
    # multi-fidelity runs: every job in order as (candidate id, fidelity, cost); submitted_ids
    # then lists the highest-fidelity jobs only (what "found" means)
    jobs: list[tuple[str, str, float]] = Field(default_factory=list)


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in extra.items():
        out[k] = (
            _merge(out[k], v)
            if isinstance(v, dict) and isinstance(out.get(k), dict)
            else copy.deepcopy(v)
        )
    return out


def load_bench(path: str | Path) -> tuple[BenchConfig, dict[str, Any]]:
    """Read a benchmark YAML and its base campaign (as a dict, validated).

    Raises:
        ConfigError: naming the file and field.
    """
    path = Path(path)
    try:
        bench = BenchConfig.model_validate(read_yaml(path, what="benchmark config"))
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, str(path))) from None
    base_path = bench.campaign if bench.campaign.is_absolute() else path.parent / bench.campaign
    base = load_config(base_path).model_dump(mode="json")
    base = _merge(base, bench.overrides)
    for name, extra in bench.strategies.items():
        parse_config(_run_dict(base, name, extra, 8, 0), source=f"{path}: strategy {name}")
    return bench, base


def _run_dict(
    base: dict[str, Any], strategy: str, extra: dict[str, Any], q: int, seed: int
) -> dict[str, Any]:
    data = _merge(base, extra)
    data["name"] = f"{strategy}-q{q}-s{seed}"
    data["seed"] = seed
    data["acquisition"] = {**data.get("acquisition", {}), "batch_size": q}
    data["dispatch"] = {
        **data.get("dispatch", {}),
        "mode": "inline",
        "concurrency": q,
        "wait_for": "all",
    }
    data.setdefault("adapter", {})["seed"] = seed
    # a batch of q is decided on a model that has seen every earlier batch: with q = 1 the
    # surrogate is refitted after each experiment (fully sequential), not every 8
    finetune = data.get("finetune", {})
    data["finetune"] = {
        **finetune,
        "every_n_results": min(int(finetune.get("every_n_results", q)), q),
    }
    return data


def _pick_calibration(out: Path, config: CampaignConfig) -> dict[str, Any] | None:
    """The run's picks at its highest fidelity scored against that fidelity's values."""
    from loop.calibration import pick_calibration
    from loop.store import CampaignStore

    target, highest = config.targets[0], config.highest_fidelity
    with CampaignStore(out, create=False) as store:
        values = {
            m.candidate_id: m.values[target].value
            for m in store.measurements_at(highest)
            if target in m.values
        }
        calibration = pick_calibration(store.decisions(), values, fidelity=highest)
    return None if calibration is None else calibration.model_dump()


def _write_record(done: Path, record: RunRecord) -> None:
    tmp = done.with_suffix(".tmp")
    tmp.write_text(record.model_dump_json())
    tmp.replace(done)


def run_one(config_json: str, directory: str) -> dict[str, Any]:
    """Run (or resume) one campaign and return its measured ids and timings.

    A finished run is not rerun; its calibration is rescored from its store (cheap), so
    that a fix to the scoring reaches every finished run of a rerun ``cloudlab bench``.
    """
    import torch

    from loop.campaign import Campaign
    from loop.store import STORE_FILENAME, CampaignStore

    out = Path(directory)
    done = out / "result.json"
    config = CampaignConfig.model_validate_json(config_json)
    if done.exists():
        record = RunRecord.model_validate_json(done.read_text())
        if (out / STORE_FILENAME).exists():
            calibration = _pick_calibration(out, config)
            if calibration != record.calibration:
                record = record.model_copy(update={"calibration": calibration})
                _write_record(done, record)
        return record.model_dump()
    torch.set_num_threads(config.threads if isinstance(config.threads, int) else 1)
    t0, c0 = time.perf_counter(), time.process_time()
    result = Campaign(config, out).run()
    highest = config.highest_fidelity
    with CampaignStore(out, create=False) as store:
        job_rows = store.jobs()
        measured = [m.candidate_id for m in store.measurements_at(highest)]
        jobs = [j.candidate_id for j in job_rows if j.fidelity == highest]
        all_jobs = (
            [(j.candidate_id, j.fidelity, j.cost) for j in job_rows] if config.fidelities else []
        )
    record = RunRecord(
        name=config.name,
        measured_ids=measured,
        submitted_ids=jobs,
        stop_reason=result.stop_reason,
        wall_s=time.perf_counter() - t0,
        cpu_s=time.process_time() - c0,
        timings=RunTimings(**result.timings.model_dump(exclude={"extra"})),
        calibration=_pick_calibration(out, config),
        jobs=all_jobs,
    )
    _write_record(done, record)
    return record.model_dump()


def run_bench(
    path: str | Path,
    out: str | Path,
    *,
    seeds: int | None = None,
    on_done: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Run every (strategy, batch size, seed) and write results JSON, Markdown and plots.

    Args:
        path: benchmark YAML.
        out: output directory (runs under ``out/runs``; results ``out/<name>.json``).
        seeds: override the config's number of seeds (CI smoke runs use 2).
        on_done: called with each finished run's name (progress).
    """
    import ray

    from adapters.ray_runtime import ensure_ray
    from loop.objective import top_fraction_ids
    from loop.pool import load_pool

    bench, base = load_bench(path)
    n_seeds = seeds or bench.seeds
    out = Path(out)
    (out / "runs").mkdir(parents=True, exist_ok=True)
    base_config = parse_config(base)
    pool = load_pool(
        base_config.pool, base_config.targets, seed=base_config.seed
    )  # warms the cache
    ensure_ray()
    remote = ray.remote(num_cpus=1)(run_one)
    jobs: dict[Any, tuple[str, int, int]] = {}
    queue = [
        (name, q, seed)
        for q in bench.batch_sizes
        for seed in range(n_seeds)
        for name in bench.strategies
    ]
    records: dict[tuple[str, int], list[dict[str, Any]]] = {}
    # `parallel` runs share the cores: each gets its share as an explicit thread budget
    # (oversubscribed OpenMP threads cost up to 180x on a shared machine; cloud_model.threads)
    from cloud_model.threads import resolve_threads

    worker_threads = resolve_threads(base.get("threads"), workers=bench.parallel)
    t_start = time.perf_counter()
    while queue or jobs:
        while queue and len(jobs) < bench.parallel:
            name, q, seed = queue.pop(0)
            data = _run_dict(base, name, bench.strategies[name], q, seed)
            data["threads"] = worker_threads
            config = parse_config(data)
            ref = remote.remote(config.model_dump_json(), str(out / "runs" / config.name))
            jobs[ref] = (name, q, seed)
        ready, _ = ray.wait(list(jobs), num_returns=1)
        for ref in ready:
            name, q, seed = jobs.pop(ref)
            records.setdefault((name, q), []).append(ray.get(ref))
            if on_done is not None:
                on_done(f"{name}-q{q}-s{seed}")
    wall = time.perf_counter() - t_start

    truth = np.array(
        [[pool.truth.get(c, {}).get(t, math.nan) for t in base_config.targets] for c in pool.ids]
    )
    import torch

    spec = base_config.objective_spec()
    truth_t = torch.as_tensor(truth)
    tops = {f: top_fraction_ids(pool.ids, truth_t, spec, f) for f in bench.top_fractions}
    decile = top_fraction_ids(pool.ids, truth_t, spec, 0.10)
    budget = base_config.budget.experiments
    summary: dict[str, Any] = {
        "benchmark": bench.name,
        "pool": len(pool),
        "objective": spec.describe(),
        "budget": budget,
        "seeds": n_seeds,
        "wall_s": wall,  # this invocation; runs finished earlier are only read back
        # every run's own wall time summed, and what that is with `parallel` runs at once:
        # the cost of the whole benchmark from scratch, however often it was resumed
        "runs_wall_s": float(sum(r["wall_s"] for recs in records.values() for r in recs)),
        "parallel": bench.parallel,
        "top_sizes": {str(f): len(t) for f, t in tops.items()},
        "strategies": {},
    }
    for (name, q), recs in sorted(records.items()):
        entry: dict[str, Any] = {"batch_size": q, "runs": len(recs)}
        for frac, top in tops.items():
            curves = [M.found_curve(r["submitted_ids"], top) for r in recs]
            entry[f"top{frac:g}"] = M.band(curves, budget)
            ef = [M.enrichment_factor(c, len(pool)) for c in curves]
            entry[f"ef{frac:g}"] = M.band(ef, budget)
            for p in bench.af_levels:
                ns = [M.experiments_to_reach(c, p) for c in curves]
                reached = [n for n in ns if n is not None]
                entry[f"n_to_{p:g}_of_top{frac:g}"] = (
                    float(np.median(reached)) if len(reached) * 2 > len(ns) else None
                )
                entry[f"af_{p:g}_top{frac:g}"] = (
                    math.ceil(p * len(pool)) / entry[f"n_to_{p:g}_of_top{frac:g}"]
                    if entry[f"n_to_{p:g}_of_top{frac:g}"]
                    else None
                )
            anys = [M.any_found_at(r["submitted_ids"], top) for r in recs]
            entry[f"any_alm_top{frac:g}"] = float(np.median([a if a else budget + 1 for a in anys]))
            entry[f"any_alm_random_top{frac:g}"] = M.random_any_median(len(pool), len(top))
        de = [M.found_curve(r["submitted_ids"], decile) for r in recs]
        entry["de_alm"] = M.band(de, budget)
        entry["time_s"] = {
            k: float(np.mean([r["timings"][k] for r in recs]))
            for k in ("fit", "score", "acquisition", "dispatch")
        }
        cal = [r["calibration"] for r in recs if r.get("calibration")]
        if cal:
            entry["coverage90"] = float(np.median([c["coverage90"] for c in cal]))
            entry["nll"] = float(np.median([c["nll"] for c in cal]))
        if base_config.fidelities:
            entry["cost"] = cost_metrics(recs, tops[bench.top_fractions[0]], base_config)
        entry["wall_s_mean"] = float(np.mean([r["wall_s"] for r in recs]))
        entry["cpu_s_mean"] = float(np.mean([r["cpu_s"] for r in recs]))
        summary["strategies"][f"{name}-q{q}"] = entry
    # every run, compactly: what it chose in order, and where its time went
    summary["runs"] = {
        r["name"]: {
            k: r.get(k)
            for k in (
                "submitted_ids",
                "stop_reason",
                "wall_s",
                "cpu_s",
                "timings",
                "calibration",
                "jobs",
            )
        }
        for recs in records.values()
        for r in sorted(recs, key=lambda r: str(r["name"]))
    }
    (out / f"{bench.name}.json").write_text(json.dumps(summary, indent=1))
    (out / f"{bench.name}.md").write_text(markdown_table(summary, bench))
    plot_bench(summary, out / f"{bench.name}.png")
    return summary


def cost_metrics(
    records: list[dict[str, Any]], top: set[str], config: CampaignConfig
) -> dict[str, Any]:
    """Cost-axis metrics of multi-fidelity runs (median and 5-95 % band over seeds).

    A top candidate counts as found when a highest-fidelity job of it was submitted;
    the cost of a point is the summed cost of every job up to it (any fidelity).

    Returns:
        ``cost_to_50`` / ``cost_to_90``: cost when 50 % / 90 % of ``top`` was found
        (a run that never got there counts as the budget plus one unit; ``reached_*``
        is the share of runs that got there); ``top_at_budget``: share of ``top`` found
        within the cost budget; ``n_high`` / ``n_low``: jobs at the highest / other
        fidelities; ``curve``: share found at 50 evenly spaced costs up to the budget.
    """
    budget = float(config.budget.cost or 0.0)
    highest = config.highest_fidelity
    grid = np.linspace(budget / 50, budget, 50)
    out: dict[str, Any] = {"budget": budget, "top_size": len(top)}
    reach: dict[float, list[float | None]] = {0.5: [], 0.9: []}
    at_budget, curves, n_high, n_low = [], [], [], []
    for r in records:
        jobs = r.get("jobs") or []
        spent, found, points = 0.0, set(), []
        for cid, fidelity, cost in jobs:
            spent += float(cost)
            if fidelity == highest and cid in top:
                found.add(cid)
            points.append((spent, len(found) / max(len(top), 1)))
        costs = np.array([p[0] for p in points])
        shares = np.array([p[1] for p in points])
        for p in reach:
            hit = np.nonzero(shares >= p - 1e-12)[0]
            reach[p].append(float(costs[hit[0]]) if hit.size else None)
        at_budget.append(float(shares[costs <= budget + 1e-9][-1]) if points else 0.0)
        idx = np.searchsorted(costs, grid, side="right") - 1
        curves.append(np.where(idx >= 0, shares[np.maximum(idx, 0)], 0.0))
        n_high.append(sum(f == highest for _, f, _ in jobs))
        n_low.append(sum(f != highest for _, f, _ in jobs))

    def bands(values: list[float]) -> dict[str, float]:
        a = np.asarray(values, dtype=float)
        return {
            "median": float(np.median(a)),
            "p05": float(np.percentile(a, 5)),
            "p95": float(np.percentile(a, 95)),
        }

    for p, values in reach.items():
        filled = [v if v is not None else budget + 1 for v in values]
        out[f"cost_to_{p * 100:.0f}"] = bands(filled)
        out[f"reached_{p * 100:.0f}"] = float(np.mean([v is not None for v in values]))
    out["top_at_budget"] = bands(at_budget)
    out["n_high"] = bands(n_high)
    out["n_low"] = bands(n_low)
    stacked = np.stack(curves) if curves else np.zeros((0, len(grid)))
    out["curve"] = {
        "cost": grid.tolist(),
        "median": np.median(stacked, 0).tolist() if len(stacked) else [],
        "p05": np.percentile(stacked, 5, 0).tolist() if len(stacked) else [],
        "p95": np.percentile(stacked, 95, 0).tolist() if len(stacked) else [],
    }
    return out


def markdown_table(summary: dict[str, Any], bench: BenchConfig) -> str:
    frac = bench.top_fractions[0]
    lines = [
        f"### {summary['benchmark']}: {summary['objective']}",
        "",
        f"Pool {summary['pool']}, budget {summary['budget']}, {summary['seeds']} seeds, "
        f"top {frac:.0%} = {summary['top_sizes'][str(frac)]} candidates; wall {summary['wall_s']:.0f} s "
        f"this invocation; the runs took {summary['runs_wall_s']:.0f} s in all "
        f"(~{summary['runs_wall_s'] / summary['parallel'] / 60:.0f} min at {summary['parallel']} at once).",
        "",
        "| strategy | Top% at budget (median [5-95]) | EF at budget | "
        + "".join(f"n to {p:.0%} | AF({p:.0%}) | " for p in bench.af_levels)
        + "anyALM (random) | 90 % cover (picks) | s/run fit+score / acq |",
        "|---|---|---|" + "---|---|" * len(bench.af_levels) + "---|---|---|",
    ]
    for name, e in summary["strategies"].items():
        top = e[f"top{frac:g}"]
        ef = e[f"ef{frac:g}"]["median"][-1] if e[f"ef{frac:g}"]["median"] else float("nan")
        t = e["time_s"]
        levels = ""
        for p in bench.af_levels:
            n, af = e[f"n_to_{p:g}_of_top{frac:g}"], e[f"af_{p:g}_top{frac:g}"]
            levels += (
                f"{'-' if n is None else f'{n:.0f}'} | {'-' if af is None else f'{af:.1f}'} | "
            )
        cover = "-" if e.get("coverage90") is None else f"{e['coverage90']:.2f}"
        lines.append(
            f"| {name} | {top['median'][-1]:.2f} [{top['p05'][-1]:.2f}-{top['p95'][-1]:.2f}] | {ef:.1f} | "
            f"{levels}{e[f'any_alm_top{frac:g}']:.0f} "
            f"({e[f'any_alm_random_top{frac:g}']}) | "
            f"{cover} | "
            f"{t['fit'] + t['score']:.1f} / {t['acquisition']:.1f} |"
        )
    costed = {n: e["cost"] for n, e in summary["strategies"].items() if "cost" in e}
    if costed:
        lines += [
            "",
            "| strategy | cost to 50 % of top (median [5-95], reached) | top found at cost "
            "budget | jobs high / low (median) |",
            "|---|---|---|---|",
        ]
        for name, c in costed.items():
            c50, top = c["cost_to_50"], c["top_at_budget"]
            lines.append(
                f"| {name} | {c50['median']:.0f} [{c50['p05']:.0f}-{c50['p95']:.0f}], "
                f"{c['reached_50']:.0%} | {top['median']:.2f} [{top['p05']:.2f}-{top['p95']:.2f}] | "
                f"{c['n_high']['median']:.0f} / {c['n_low']['median']:.0f} |"
            )
    return "\n".join(lines) + "\n"


def plot_bench(summary: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fracs = [k[3:] for k in next(iter(summary["strategies"].values())) if k.startswith("top")]
    fig, axes = plt.subplots(1, len(fracs) + 1, figsize=(5 * (len(fracs) + 1), 4))
    for name, e in summary["strategies"].items():
        for ax, frac in zip(axes, fracs, strict=False):
            b = e[f"top{frac}"]
            xs = np.arange(1, len(b["median"]) + 1)
            (line,) = ax.plot(xs, b["median"], label=name)
            ax.fill_between(xs, b["p05"], b["p95"], alpha=0.15, color=line.get_color())
            ax.set_title(f"top {float(frac):.0%} found")
            ax.set_xlabel("experiments")
        ef = e[f"ef{fracs[0]}"]
        axes[-1].plot(np.arange(1, len(ef["median"]) + 1), ef["median"], label=name)
    xs = np.arange(1, summary["budget"] + 1)
    axes[0].plot(xs, np.minimum(xs / summary["pool"], 1), "k--", label="random (analytic)")
    axes[-1].axhline(1.0, color="k", ls="--")
    axes[-1].set_title(f"enrichment factor, top {float(fracs[0]):.0%}")
    axes[-1].set_xlabel("experiments")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
