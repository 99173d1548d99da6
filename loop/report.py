"""Campaign reports: a status summary, PNG plots and a Markdown page.

Everything is read from the campaign store, so a report can be written while the
campaign runs or long after. For campaigns whose pool carries known values (the
simulated lab), the report also shows how many of the pool's top candidates
were found after n experiments.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from cloud_model.errors import CloudlabError, ConfigError
from loop.config import parse_config
from loop.fidelity import output_names
from loop.store import STORE_FILENAME, CampaignStore


@dataclass
class Summary:
    name: str
    objective: str
    counts: dict[str, int]
    n_measured: int
    budget: int
    best_value: float | None  # the objective target's own measured value (its sign, its unit)
    best_id: str | None
    model_versions: int
    stop_reason: str | None
    target: str = ""
    unit: str = ""
    fidelity: str = ""  # the fidelity whose results these are ("" in a single-fidelity campaign)
    # fidelity -> the name it reports the objective target under (e.g. "cv@cheap")
    reported: dict[str, str] = field(default_factory=dict)

    def rows(self) -> list[tuple[str, str]]:
        jobs = ", ".join(f"{k} {v}" for k, v in sorted(self.counts.items())) or "none"
        best = (
            "-"
            if self.best_value is None
            else f"{self.best_value:.4g} {self.unit} ({self.best_id})".replace("  ", " ")
        )
        return [
            ("objective", self.objective),
            ("jobs", jobs),
            ("measured / budget", f"{self.n_measured} / {self.budget}"),
            (f"best {self.target}".strip(), best),
            ("surrogate versions", str(self.model_versions)),
            ("state", self.stop_reason or "running or never run"),
        ] + ([("results at fidelity", self.fidelity)] if self.fidelity else [])


def _open(directory: Path) -> tuple[CampaignStore, object]:
    if not (directory / STORE_FILENAME).is_file():
        raise ConfigError(
            f"{directory} is not a campaign directory (no {STORE_FILENAME}); give the --out "
            "directory of a `cloudlab run`"
        )
    store = CampaignStore(directory, create=False)
    text = store.get_meta("config")
    if text is None:
        raise ConfigError(f"{directory} holds no campaign config")
    return store, parse_config(json.loads(text), source=str(directory))


def _trajectory(store: CampaignStore, config: object) -> tuple[list[str], torch.Tensor]:
    from loop.config import CampaignConfig

    assert isinstance(config, CampaignConfig)
    # a multi-fidelity campaign's results are its highest fidelity's: a cheap fidelity's
    # value (CHGNet's energy for a DFT target) is a different quantity
    ms = store.measurements_at(config.highest_fidelity)
    ids = [m.candidate_id for m in ms]
    y = torch.tensor(
        [[m.values[t].value if t in m.values else math.nan for t in config.targets] for m in ms],
        dtype=torch.float64,
    ).reshape(len(ms), len(config.targets))
    return ids, y


def summarise(directory: str | Path) -> Summary:
    from loop.config import CampaignConfig

    store, config = _open(Path(directory))
    assert isinstance(config, CampaignConfig)
    with store:
        spec = config.objective_spec()
        ids, y = _trajectory(store, config)
        best_value, best_id, unit = None, None, ""
        if ids:
            score = spec.score(y)
            i = int(torch.argmax(score))
            if torch.isfinite(score[i]):
                best_value, best_id = float(y[i, spec.primary]), ids[i]
                best = store.measurements_at(config.highest_fidelity)[i]  # _trajectory's order
                measured = best.values.get(config.objective.target)
                unit = measured.unit if measured is not None else ""
        latest = store.latest_model_version()
        return Summary(
            name=config.name,
            objective=spec.describe(),
            counts=store.job_counts(),
            n_measured=len(ids),
            budget=config.budget.experiments,
            best_value=best_value,
            best_id=best_id,
            model_versions=0 if latest is None else latest[0],
            stop_reason=store.get_meta("stop_reason"),
            target=config.objective.target,
            unit=unit,
            fidelity=config.highest_fidelity,
            reported={
                f.name: output_names(
                    f, (config.objective.target,), is_highest=f.name == config.highest_fidelity
                )[config.objective.target]
                for f in config.fidelities
            },
        )


def write_report(directory: str | Path) -> Path:
    """Write ``report/report.md`` and its PNG plots; returns the Markdown path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from loop.config import CampaignConfig

    directory = Path(directory)
    summary = summarise(directory)  # fails first if the directory holds no campaign
    out = directory / "report"
    out.mkdir(exist_ok=True)
    store, config = _open(directory)
    assert isinstance(config, CampaignConfig)
    spec = config.objective_spec()
    lines = [f"# Campaign `{summary.name}`", "", "| | |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in summary.rows()]
    lines.append("")
    with store:
        ids, y = _trajectory(store, config)
        decisions = store.decisions()
        approvals = _approval_section(store)
        units = _units(store)
        scopes = dict(store.candidates())
        fidelities = _fidelity_section(store, config) if config.fidelities else []
    target = config.objective.target
    unit = units.get(target, "")
    lines += fidelities
    if not ids:
        lines += ["## Results", "", "_missing: nothing has been measured yet._", ""]
    if ids:
        score = spec.score(y)
        safe = torch.where(torch.isfinite(score), score, torch.full_like(score, -1e300))
        best_at = _running_argmax(safe)  # index of the best feasible measurement so far
        fig, ax = plt.subplots(figsize=(6, 4))
        xs = list(range(1, len(ids) + 1))
        ok = [bool(safe[i] > -1e299) for i in best_at]
        values = [float(y[i, spec.primary]) for i in best_at]  # the target's own value and sign
        ax.step(
            [x for x, k in zip(xs, ok, strict=True) if k],
            [v for v, k in zip(values, ok, strict=True) if k],
            where="post",
        )
        ax.set_xlabel("experiments measured")
        ax.set_ylabel(f"best feasible {target}" + (f" ({unit})" if unit else ""))
        ax.set_title(spec.describe() + f" ({_sense_words(spec.sense)})", fontsize=9)
        fig.tight_layout()
        fig.savefig(out / "best_so_far.png", dpi=120)
        plt.close(fig)
        lines += ["## Best so far", "", "![best so far](best_so_far.png)", ""]
        lines += _best_table(config, spec, ids, y, units, scopes)
        found, why_not = _found_curve(config, ids)
        if found is None:
            lines += [
                "## Top candidates found",
                "",
                f"_missing: {why_not}_",
                "",
            ]
        else:
            fig, ax = plt.subplots(figsize=(6, 4))
            for label, curve in found.items():
                ax.plot(xs, curve, label=label)
            ax.set_xlabel("experiments measured")
            ax.set_ylabel("fraction of the pool's top candidates found")
            ax.legend()
            fig.tight_layout()
            fig.savefig(out / "top_found.png", dpi=120)
            plt.close(fig)
            lines += ["## Top candidates found", "", "![found](top_found.png)", ""]
            for label, curve in found.items():
                lines.append(f"- {label}: {curve[-1]:.0%} found after {len(ids)} measurements")
            lines.append("")
        parity = _parity(decisions, ids, y, config.highest_fidelity)
        if parity is None:
            lines += [
                "## Surrogate on the candidates it chose (predicted before measuring)",
                "",
                "_missing: fewer than 3 model-chosen candidates have been measured._",
                "",
            ]
        else:
            pred, sd, meas = parity
            fig, axes = plt.subplots(1, 2, figsize=(10, 4))
            axes[0].errorbar(meas, pred, yerr=sd, fmt="o", ms=3, alpha=0.6)
            lo, hi = min(meas + pred), max(meas + pred)
            axes[0].plot([lo, hi], [lo, hi], "k--", lw=1)
            first = config.targets[0]
            first_unit = f" ({units[first]})" if units.get(first) else ""
            axes[0].set_xlabel(f"measured {first}{first_unit}")
            axes[0].set_ylabel(f"predicted {first} at decision time{first_unit}")
            z = [(p - m) / s for p, m, s in zip(pred, meas, sd, strict=True) if s > 0]
            n_out = _z_histogram(axes[1], z)
            fig.tight_layout()
            fig.savefig(out / "parity_calibration.png", dpi=120)
            plt.close(fig)
            lines += [
                "## Surrogate on the candidates it chose (predicted before measuring)",
                "",
                "![parity](parity_calibration.png)",
                "",
                *(f"- {s}" for s in _surrogate_in_words(pred, sd, meas, z, units.get(first, ""))),
            ]
            if n_out:
                lines.append(
                    f"- {n_out} of {len(z)} z values lie beyond +-{_Z_CLIP:g} and are drawn "
                    "in the edge bins of the histogram"
                )
            lines.append("")
        lines += _calibration_section(decisions, ids, y, out, config.highest_fidelity)
        if spec.is_multi:
            lines += _pareto_section(spec, ids, y, out)
        if (
            config.surrogate.head == "debye"
            and config.surrogate.ensemble.debye_output == "theta"
            and ids
        ):
            lines += _debye_curves(config, ids, y, out)
    lines += approvals
    for stale in out.glob("*.png"):  # a figure this run did not draw is an old run's
        if f"]({stale.name})" not in "\n".join(lines):
            stale.unlink()
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path


def _approval_section(store: CampaignStore) -> list[str]:
    """The approval gate's audit trail: every proposal, what chose it, who decided, when, why."""
    from loop.approval import list_proposals

    proposals = list_proposals(store)
    if not proposals:
        return []
    by_status: dict[str, int] = {}
    for p in proposals:
        by_status[p.status] = by_status.get(p.status, 0) + 1

    def cell(text: str | None) -> str:
        return (text or "-").replace("|", "\\|").replace("\n", " ")

    lines = [
        "## Approvals (audit trail)",
        "",
        "- " + ", ".join(f"{k.lower()} {v}" for k, v in sorted(by_status.items())),
        "",
        "| candidate | formula | proposed at (UTC) | model | acquisition | predicted | decision "
        "| by | at (UTC) | note |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for p in proposals:
        d = p.detail
        acq = d.acquisition + ("" if d.acquisition_value is None else f" {d.acquisition_value:.4g}")
        pred = "-"
        if d.predicted_mean:
            sd = d.predicted_std or [0.0] * len(d.predicted_mean)
            pred = ", ".join(
                f"{m:.4g} ± {s:.2g}" for m, s in zip(d.predicted_mean, sd, strict=False)
            )
        model = "-" if d.model_version is None else f"v{d.model_version}"
        lines.append(
            f"| {p.candidate_id} | {cell(d.formula)} | {p.proposed_at[:19]} | {model} | {acq} | "
            f"{pred} | {'waiting' if p.waiting else p.status.lower()} | {cell(p.decided_by)} | "
            f"{(p.decided_at or '-')[:19]} | {cell(p.note)} |"
        )
    return [*lines, ""]


_Z_CLIP = 5.0


def _units(store: CampaignStore) -> dict[str, str]:
    """Target -> unit, as the measurements state them."""
    units: dict[str, str] = {}
    for m in store.measurements():
        for name, value in m.values.items():
            if value.unit and name not in units:
                units[name] = value.unit
    return units


def _running_argmax(score: torch.Tensor) -> list[int]:
    """For each n, the index of the largest of ``score[: n + 1]`` (the first on ties)."""
    best, out = 0, []
    for i in range(len(score)):
        if float(score[i]) > float(score[best]):
            best = i
        out.append(best)
    return out


def _sense_words(sense: str) -> str:
    return {"maximize": "higher is better", "minimize": "lower is better"}.get(
        sense, "inside the window is better"
    )


def _formula(scope: str | None) -> str:
    """The reduced formula of a SCOPE string's composition part, or "" if it has none."""
    if not scope:
        return ""
    from loop.features import composition_from_scope

    try:
        from pymatgen.core import Composition

        formula, _ = Composition(composition_from_scope(scope)).get_integer_formula_and_factor()
        return str(formula)
    except (ValueError, CloudlabError):
        return ""


def _best_table(
    config: object,
    spec: object,
    ids: list[str],
    y: torch.Tensor,
    units: dict[str, str],
    scopes: dict[str, str],
    k: int = 5,
) -> list[str]:
    """The best feasible measured candidates: id, formula, values with units, SCOPE string."""
    from loop.config import CampaignConfig
    from loop.objective import ObjectiveSpec

    assert isinstance(config, CampaignConfig) and isinstance(spec, ObjectiveSpec)
    score = spec.score(y)
    order = [int(i) for i in torch.argsort(score, descending=True) if torch.isfinite(score[i])]
    if not order:
        return ["## Best candidates", "", "_missing: no feasible candidate measured yet._", ""]
    names = list(config.targets)
    heads = [f"{t} ({units[t]})" if units.get(t) else t for t in names]
    lines = [
        f"## Best candidates ({min(k, len(order))} of {len(order)} feasible measured; "
        f"{spec.describe()}, {_sense_words(spec.sense)})",
        "",
        "| rank | candidate | formula | " + " | ".join(heads) + " | SCOPE |",
        "|---|---|---|" + "---|" * len(names) + "---|",
    ]
    for rank, i in enumerate(order[:k], 1):
        scope = scopes.get(ids[i], "")
        shown = scope if len(scope) <= 80 else scope[:77] + "..."
        values = " | ".join(f"{float(y[i, j]):.4g}" for j in range(len(names)))
        lines.append(
            f"| {rank} | {ids[i]} | {_formula(scope)} | {values} | `{shown.replace('|', '/')}` |"
        )
    return [*lines, ""]


def _z_histogram(ax: object, z: list[float]) -> int:
    """Histogram of z clipped to +-5 (edge bins hold the rest) under N(0, 1); returns #clipped."""
    if not z:
        return 0
    clipped = [max(-_Z_CLIP, min(_Z_CLIP, v)) for v in z]
    ax.hist(clipped, bins=25, range=(-_Z_CLIP, _Z_CLIP), density=True, alpha=0.7)  # type: ignore[attr-defined]
    grid = torch.linspace(-_Z_CLIP, _Z_CLIP, 200)
    ax.plot(grid, torch.exp(-0.5 * grid**2) / math.sqrt(2 * math.pi), "k--", label="N(0, 1)")  # type: ignore[attr-defined]
    ax.set_xlim(-_Z_CLIP, _Z_CLIP)  # type: ignore[attr-defined]
    ax.set_xlabel(f"z = (predicted - measured) / predicted std, clipped to +-{_Z_CLIP:g}")  # type: ignore[attr-defined]
    ax.legend(fontsize=8)  # type: ignore[attr-defined]
    return sum(abs(v) > _Z_CLIP for v in z)


def _surrogate_in_words(
    pred: list[float], sd: list[float], meas: list[float], z: list[float], unit: str
) -> list[str]:
    """How the surrogate did on its own picks, in sentences: error, coverage, NLL vs a baseline."""
    n = len(pred)
    u = f" {unit}" if unit else ""
    mae = sum(abs(p - m) for p, m in zip(pred, meas, strict=True)) / n
    centre = sum(meas) / n
    mad = sum(abs(m - centre) for m in meas) / n
    out = [
        f"MAE {mae:.4g}{u} on {n} model-chosen measurements; predicting their mean for every one "
        f"would give {mad:.4g}{u} (MAE/MAD {mae / mad:.2f})"
        if mad > 0
        else f"MAE {mae:.4g}{u} on {n} model-chosen measurements"
    ]
    if not z:
        out.append("the surrogate gave no uncertainty (std 0): coverage and NLL are undefined")
        return out
    cover = sum(abs(v) <= 1.645 for v in z) / len(z)
    verdict = (
        "about right"
        if 0.80 <= cover <= 0.95
        else "too narrow: the model is overconfident"
        if cover < 0.80
        else "wider than needed: the model is underconfident"
    )
    nll = sum(
        0.5 * math.log(2 * math.pi * s * s) + 0.5 * ((p - m) / s) ** 2
        for p, s, m in zip(pred, sd, meas, strict=True)
        if s > 0
    ) / len(z)
    spread = math.sqrt(sum((m - centre) ** 2 for m in meas) / n)
    out.append(
        f"its 90 % intervals held {cover:.0%} of the measured values ({verdict}; 80-95 % is "
        "well calibrated)"
    )
    if spread > 0:
        base = 0.5 * math.log(2 * math.pi * spread**2) + 0.5
        better = "better" if nll < base else "worse"
        out.append(
            f"mean Gaussian NLL {nll:.3g} against {base:.3g} for a constant N(mean, std) of the "
            f"measured values: {better} than that baseline"
        )
    return out


def _save(fig: object, path: Path) -> None:
    """Write a figure as a 120-dpi PNG and free it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()  # type: ignore[attr-defined]
    fig.savefig(path, dpi=120)  # type: ignore[attr-defined]
    plt.close(fig)  # type: ignore[arg-type]


def _pareto_section(spec: object, ids: list[str], y: torch.Tensor, out: Path) -> list[str]:
    """The measured Pareto front and the hypervolume after each experiment."""
    import matplotlib.pyplot as plt

    from loop.acquisition import hypervolume, pareto_front, reference_point
    from loop.objective import ObjectiveSpec

    assert isinstance(spec, ObjectiveSpec)
    ref = reference_point(spec, y)  # fixed for the whole curve: from every measurement
    curve = [hypervolume(spec, y[: n + 1], ref) for n in range(len(ids))]
    front = pareto_front(spec, y)
    goals = [(spec.primary, spec.sense, spec.window)] + [
        (g.target, g.sense, g.window) for g in spec.others
    ]
    names = [spec.targets[t] for t, _, _ in goals]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    axes[0].plot(range(1, len(ids) + 1), curve)
    axes[0].set_xlabel("experiments measured")
    axes[0].set_ylabel("hypervolume of the measured front")
    (i, _, _), (j, _, _) = goals[0], goals[1]
    feasible = spec.feasible(y)
    axes[1].scatter(y[feasible, i], y[feasible, j], s=8, alpha=0.4, label="measured")
    axes[1].scatter(y[front, i], y[front, j], s=24, color="tab:red", label="Pareto front")
    for _t, sense, window in goals[1:2]:
        if sense == "window" and window is not None:
            axes[1].axhspan(window[0], window[1], color="tab:green", alpha=0.15, label="window")
    axes[1].set_xlabel(f"{names[0]} ({goals[0][1]})")
    axes[1].set_ylabel(f"{names[1]} ({goals[1][1]})")
    axes[1].legend(fontsize=8)
    _save(fig, out / "pareto.png")
    lines = [
        "## Pareto front",
        "",
        "![pareto](pareto.png)",
        "",
        f"- hypervolume {curve[-1]:.4g} after {len(ids)} measurements (reference point "
        f"{', '.join(f'{v:.4g}' for v in ref.tolist())} in objective units, higher is better: "
        "the measured front's nadir less 10 % of its range)",
        "",
        "| candidate | " + " | ".join(names) + " |",
        "|---|" + "---|" * len(names),
    ]
    rows = front.nonzero().flatten().tolist()
    rows.sort(key=lambda r: float(y[r, goals[0][0]]))
    for r in rows:
        lines.append(
            f"| {ids[r]} | " + " | ".join(f"{float(y[r, t]):.4g}" for t, _, _ in goals) + " |"
        )
    return [*lines, ""]


def _fidelity_section(store: CampaignStore, config: object) -> list[str]:
    """Jobs, measurements and cost per fidelity; the results below are the highest's."""
    from loop.config import CampaignConfig

    assert isinstance(config, CampaignConfig)
    jobs = store.jobs()
    measured = store.fidelity_measurements()
    total = sum(c for _, _, c in measured)
    lines = [
        "## Fidelities",
        "",
        f"Results below are at `{config.highest_fidelity}`, the fidelity the campaign "
        "optimises; the others only inform the surrogate.",
        "",
        "| fidelity | cost per experiment | jobs | measured | cost spent | share of cost |",
        "|---|---|---|---|---|---|",
    ]
    for f in config.fidelities:
        spent = sum(c for _, name, c in measured if name == f.name)
        share = f"{spent / total:.0%}" if total > 0 else "-"
        lines.append(
            f"| {f.name} | {f.cost:g} | {sum(j.fidelity == f.name for j in jobs)} "
            f"| {sum(name == f.name for _, name, _ in measured)} | {spent:g} | {share} |"
        )
    budget = config.budget.cost
    lines += ["", f"Cost spent: {total:g}" + (f" of {budget:g}" if budget else "") + ".", ""]
    return lines


def _calibration_section(
    decisions: list[dict[str, object]], ids: list[str], y: torch.Tensor, out: Path, fidelity: str
) -> list[str]:
    """Per model version: how its own picks came out against what it predicted of them."""
    import matplotlib.pyplot as plt

    from loop.calibration import calibration_by_version

    measured = {cid: float(y[i, 0]) for i, cid in enumerate(ids)}
    rows = [
        c for c in calibration_by_version(decisions, measured, fidelity) if c.version is not None
    ]
    if not rows:
        return []
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.axhspan(0.80, 0.95, color="tab:green", alpha=0.15, label="0.80-0.95")
    ax.plot(
        [c.version or 0 for c in rows], [c.coverage90 for c in rows], "o-", label="90 % coverage"
    )
    ax.set_xlabel("model version (one refit)")
    ax.set_ylabel("coverage of its own picks")
    ax.set_ylim(-0.02, 1.02)
    ax.legend(fontsize=8)
    _save(fig, out / "calibration_by_version.png")
    lines = [
        "## Calibration per model version (each refit's picks, predicted before measuring)",
        "",
        "![calibration](calibration_by_version.png)",
        "",
        "| version | model | picks measured | NLL | 90 % coverage | MAE | mean predicted std |",
        "|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| v{c.version} | {c.surrogate or '-'} | {c.n} | {c.nll:.3g} | {c.coverage90:.0%} | "
        f"{c.mae:.4g} | {c.mean_std:.4g} |"
        for c in rows
    ]
    return [*lines, ""]


def _debye_curves(config: object, ids: list[str], y: torch.Tensor, out: Path) -> list[str]:
    """Cv(T) of the best measured candidates from their Debye temperatures (per mole of atoms)."""
    import matplotlib.pyplot as plt

    from cloud_model.debye import heat_capacity
    from loop.config import CampaignConfig

    assert isinstance(config, CampaignConfig)
    spec = config.objective_spec()
    score = spec.score(y)
    order = [
        int(i) for i in torch.argsort(score, descending=True)[:5] if torch.isfinite(score[int(i)])
    ]
    if not order:
        return []
    temps = torch.linspace(5.0, 1000.0, 200, dtype=torch.float64)
    theta = y[order, 0]  # K
    cv = heat_capacity(theta, temps, torch.ones_like(theta))  # (k, T) J/(mol-atom K)
    fig, ax = plt.subplots(figsize=(6, 4))
    rows = ["## Heat capacity of the best candidates (Debye model, per mole of atoms)", ""]
    rows += ["| candidate | theta_D (K) | Cv(300 K) J/(mol K) |", "|---|---|---|"]
    at300 = heat_capacity(
        theta, torch.tensor([300.0], dtype=torch.float64), torch.ones_like(theta)
    )[:, 0]
    for k, i in enumerate(order):
        ax.plot(temps, cv[k], label=f"{ids[i]} ({float(theta[k]):.0f} K)")
        rows.append(f"| {ids[i]} | {float(theta[k]):.0f} | {float(at300[k]):.2f} |")
    ax.axhline(3 * 8.314462618, color="k", ls="--", lw=1, label="3R (Dulong-Petit)")
    ax.set_xlabel("T (K)")
    ax.set_ylabel("Cv (J/(mol-atom K))")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "debye_cv.png", dpi=120)
    plt.close(fig)
    return [*rows, "", "![Cv(T)](debye_cv.png)", ""]


def _found_curve(config: object, ids: list[str]) -> tuple[dict[str, list[float]] | None, str]:
    """Top-1 % / top-5 % found vs experiments when the pool's values are known; else why not."""
    from loop.config import CampaignConfig
    from loop.objective import top_fraction_ids
    from loop.pool import load_pool

    assert isinstance(config, CampaignConfig)
    try:
        pool = load_pool(config.pool, config.targets, seed=config.seed)
    except Exception as exc:  # the report must not fail because the pool's source moved
        return None, f"the pool's source could not be loaded to look up its true values ({exc})"
    if len(pool.truth) < len(pool) * 0.9:
        return None, (
            f"the pool's true values are known for {len(pool.truth)} of {len(pool)} candidates "
            "(a lab's own pool): there is no known top set to compare with"
        )
    truth = torch.tensor(
        [[pool.truth.get(c, {}).get(t, math.nan) for t in config.targets] for c in pool.ids],
        dtype=torch.float64,
    )
    spec = config.objective_spec()
    n_feasible = int(torch.isfinite(spec.score(truth)).sum())
    out = {}
    for frac in (0.01, 0.05):
        top = top_fraction_ids(pool.ids, truth, spec, frac)
        if not top:
            continue
        hits, curve = 0, []
        for cid in ids:
            hits += cid in top
            curve.append(hits / len(top))
        wanted = max(1, round(frac * len(pool)))
        label = (
            f"top {frac:.0%} of the pool: {len(top)} candidates (of {len(pool)}"
            + (f", {n_feasible} feasible)" if n_feasible < len(pool) else ")")
            if len(top) == wanted
            else f"all {len(top)} feasible candidates (fewer than the pool's top {frac:.0%}, "
            f"{wanted} of {len(pool)})"
        )
        out[label] = curve
    if not out:
        return None, "no candidate of the pool is feasible by its true values"
    return out, ""


def _parity(
    decisions: list[dict[str, object]], ids: list[str], y: torch.Tensor, fidelity: str
) -> tuple[list[float], list[float], list[float]] | None:
    """Predicted (at decision time) vs measured for the picks made at ``fidelity``."""
    measured = {cid: float(y[i, 0]) for i, cid in enumerate(ids) if not math.isnan(float(y[i, 0]))}
    pred, sd, meas = [], [], []
    for d in decisions:
        for c in d["chosen"]:  # type: ignore[attr-defined]
            if c.predicted_mean is None or c.candidate_id not in measured:
                continue
            if c.fidelity != fidelity:
                continue
            pred.append(float(c.predicted_mean[0]))
            sd.append(float(c.predicted_std[0]) if c.predicted_std else 0.0)
            meas.append(measured[c.candidate_id])
    return (pred, sd, meas) if len(pred) >= 3 else None
