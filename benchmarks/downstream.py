"""Downstream suite: does a checkpoint help on seven held-out property tasks?

For every task, on a FIXED held-out split, four kinds of cell:

* ``probe``: ridge regression (alpha chosen by leave-one-out CV, standardised
  features) on the frozen pooled features of the given checkpoint;
* ``finetune``: the given checkpoint, every block and the embeddings trained
  (L1 loss, AdamW, layer decay 0.9, early stopping on the validation rows);
* ``scratch``: the same architecture, randomly initialised, the same budget;
* ``composition``: a random forest on the project's composition features
  (:func:`loop.features.composition_features`), the same rows.

Tasks and splits (MAE in the target's unit; MAD = mean absolute deviation of the
test truth, so MAE/MAD = 1 is the mean predictor):

=============  ===========================================  ==========================
task           data, target                                  split
=============  ===========================================  ==========================
aflow_debye    aflow_debye_temperature, theta_D (K)          registry train/val -> test
aflow_bulk     aflow_bulk_modulus, B_VRH (GPa)               registry train/val -> test
aflow_shear    aflow_shear_modulus, G_VRH (GPa)              registry train/val -> test
cloud_cv       cloud_cv, Cv(300 K) (J/(mol K) per cell)      train_and_val (10 % val) -> test
perov_5        perov_5 val+test, heat_ref (eV)               5-fold CV (seed 0)
carbon_24      carbon_24 val+test, energy/atom (eV)          5-fold CV (seed 0)
mpts_52        mpts_52, formation energy (eV/atom)           val (older years) -> test (newer)
=============  ===========================================  ==========================

``cloud_cv`` is fine-tuned through the Debye head and the Debye + Einstein head
(``finetune_debye``, ``finetune_debye_einstein``, ``scratch_...``); its probe and
composition cells regress Cv per atom and multiply by the atoms per cell. AFLOW
Debye temperatures are fine-tuned through the Debye head (theta output).

Budget: each task has a time budget (``--task-minutes``, 2.5 times that for the
5-fold tasks) shared equally by its fine-tuning runs (cells x folds); a run stops
at its epoch cap, by early stopping or when its share is spent (checked after
every epoch), keeping its best validation epoch. The defaults (10 min) make the
full suite ~2 h on 2 CPU cores; on a GPU the epoch cap binds first. Pretrained and
scratch runs get identical caps. ``--quick`` subsamples every task to a few
hundred fixed rows, uses 2 of the 5 folds and a few epochs (~10 min on 2 cores);
its numbers are a smoke signal, not the targets' numbers.

Results are appended to ``--out`` cell by cell as they finish; a rerun with the
same settings skips finished cells (``--fresh`` starts over).
``benchmarks/downstream_table.py`` prints the README table.

    nice -n 10 python benchmarks/downstream.py --checkpoint default --quick
    nice -n 10 python benchmarks/downstream.py --checkpoint cloud_model/checkpoints/NEW
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from cloud_model.checkpoint import resolve_checkpoint
from cloud_model.ensemble import CloudEnsemble, EnsembleConfig
from cloud_model.finetune import MemberNet
from cloud_model.finetune_data import DataSource, LabelledSet, load_labelled, split_rows
from cloud_model.finetune_job import HeadKind, create_ensemble, target_metrics
from cloud_model.model import CloudEncoder

RESULTS = Path(__file__).resolve().parent / "results"
FORMAT = "cloudlab-downstream-1"
logger = logging.getLogger("benchmarks.downstream")

Protocol = Literal["split", "cv5", "val_to_test"]
FitKind = Literal["regression", "debye_theta", "heat_capacity"]


@dataclass(frozen=True)
class TaskSpec:
    """One downstream task: where its rows come from, how they are split and fitted."""

    name: str
    dataset: str
    target: str
    unit: str
    protocol: Protocol
    fit: FitKind
    description: str
    # share of --task-minutes: 5-fold tasks run 5x the fine-tuning runs, so they get more
    budget_weight: float = 1.0


TASKS: dict[str, TaskSpec] = {
    t.name: t
    for t in (
        TaskSpec(
            "aflow_debye",
            "aflow_debye_temperature",
            "debye_temperature",
            "K",
            "split",
            "debye_theta",
            "AFLOW AEL-AGL Debye temperature",
        ),
        TaskSpec(
            "aflow_bulk",
            "aflow_bulk_modulus",
            "bulk_modulus",
            "GPa",
            "split",
            "regression",
            "AFLOW bulk modulus (VRH)",
        ),
        TaskSpec(
            "aflow_shear",
            "aflow_shear_modulus",
            "shear_modulus",
            "GPa",
            "split",
            "regression",
            "AFLOW shear modulus (VRH)",
        ),
        TaskSpec(
            "cloud_cv",
            "cloud_cv",
            "cv",
            "J/(mol K)",
            "split",
            "heat_capacity",
            "cloud_cv heat capacity Cv(300 K) per mole of cells",
        ),
        TaskSpec(
            "perov_5",
            "perov_5",
            "heat_ref",
            "eV",
            "cv5",
            "regression",
            "perov_5 heat of formation (5-fold CV)",
            2.5,
        ),
        TaskSpec(
            "carbon_24",
            "carbon_24",
            "energy_per_atom",
            "eV",
            "cv5",
            "regression",
            "carbon_24 energy per atom (5-fold CV)",
            2.5,
        ),
        TaskSpec(
            "mpts_52",
            "mpts_52",
            "formation_energy_per_atom",
            "eV/atom",
            "val_to_test",
            "regression",
            "mpts_52 formation energy, val years -> test years",
        ),
    )
}


@dataclass
class SuiteOptions:
    """Everything that decides the numbers (stored in the JSON; a rerun must match)."""

    checkpoint: str = "default"
    tasks: list[str] = field(default_factory=lambda: list(TASKS))
    quick: bool = False
    epochs: int = 30  # epoch cap of every fine-tuning run
    patience: int = 6
    # wall-time budget of a task's fine-tuning runs together (x 2.5 for the 5-fold tasks)
    task_minutes: float = 10.0
    max_train: int | None = None  # cap on training(+val) rows per fold (None = all)
    max_test: int | None = None  # cap on test rows per fold
    folds_used: int = 5  # of the 5 CV folds (quick: 2)
    batch_size: int = 32
    lr_encoder: float = 3e-4
    lr_head: float = 1e-3
    forest_trees: int = 300
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"

    @classmethod
    def quick_defaults(cls, **overrides: Any) -> SuiteOptions:
        """The ``--quick`` settings: ~10 min on 2 CPU cores for all seven tasks."""
        base: dict[str, Any] = {
            "quick": True,
            "epochs": 4,
            "patience": 2,
            "task_minutes": 1.0,
            "max_train": 300,
            "max_test": 200,
            "folds_used": 2,
            "forest_trees": 100,
        }
        base.update(overrides)
        return cls(**base)


@dataclass
class Fold:
    """Row indices into a task's data: training, validation (early stopping), test."""

    train: Tensor
    val: Tensor
    test: Tensor


# ----------------------------------------------------------------- data and splits


def _capped(index: Tensor, cap: int | None, seed: int) -> Tensor:
    """A fixed seeded subset of ``index`` of at most ``cap`` rows (sorted)."""
    if cap is None or len(index) <= cap:
        return index
    gen = torch.Generator().manual_seed(seed)
    return index[torch.randperm(len(index), generator=gen)[:cap]].sort().values


def load_task(spec: TaskSpec, options: SuiteOptions) -> tuple[LabelledSet, list[Fold]]:
    """The task's labelled rows (SCOPE strings from the on-disk encoding cache) and folds."""
    data = load_labelled(DataSource(dataset=spec.dataset, targets=(spec.target,)))
    keep = torch.isfinite(data.y[:, 0]).nonzero().flatten()
    data = data.subset(keep)
    seed = options.seed
    val_cap = None if options.max_train is None else max(10, options.max_train // 5)
    if spec.protocol == "split":
        parts = split_rows(data, val_fraction=0.1, seed=seed)
        folds = [
            Fold(
                _capped(parts["train"], options.max_train, seed),
                _capped(parts["val"], val_cap, seed + 1),
                _capped(parts["test"], options.max_test, seed + 2),
            )
        ]
    elif spec.protocol == "val_to_test":
        index = torch.arange(len(data))
        is_val = torch.tensor([s == "val" for s in data.splits])
        pool, test = index[is_val], index[~is_val]
        pool = pool[torch.randperm(len(pool), generator=torch.Generator().manual_seed(seed))]
        n_val = len(pool) // 10
        folds = [
            Fold(
                _capped(pool[n_val:].sort().values, options.max_train, seed),
                _capped(pool[:n_val].sort().values, val_cap, seed + 1),
                _capped(test, options.max_test, seed + 2),
            )
        ]
    else:
        rows = torch.arange(len(data))
        if options.max_train is not None:
            total = options.max_train + (options.max_test or options.max_train // 4)
            rows = _capped(rows, total, seed)
        order = rows[torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed))]
        chunks = order.chunk(5)
        folds = []
        for k in range(min(options.folds_used, 5)):
            rest = torch.cat([c for j, c in enumerate(chunks) if j != k])
            n_val = len(rest) // 10
            folds.append(Fold(rest[n_val:].sort().values, rest[:n_val].sort().values, chunks[k]))
    return _restrict(data, folds)


def _restrict(data: LabelledSet, folds: list[Fold]) -> tuple[LabelledSet, list[Fold]]:
    """Keep only the rows some fold uses (quick runs encode and featurise no more)."""
    used = torch.cat([torch.cat([f.train, f.val, f.test]) for f in folds]).unique()  # sorted
    position = torch.full((len(data),), -1, dtype=torch.long)
    position[used] = torch.arange(len(used))
    remapped = [Fold(position[f.train], position[f.val], position[f.test]) for f in folds]
    return data.subset(used), remapped


def _per_atom(spec: TaskSpec, data: LabelledSet) -> Tensor:
    """Divisor turning the task's target into what probes and forests regress (``(n,)``)."""
    if spec.fit == "heat_capacity" and data.n_atoms is not None:
        return data.n_atoms.double()
    return torch.ones(len(data), dtype=torch.float64)


# ----------------------------------------------------------------- cells


def _score(preds: list[Tensor], truths: list[Tensor]) -> dict[str, Any]:
    """MAE averaged over folds, MAD likewise, and per-fold numbers."""
    folds = [target_metrics(p, t).model_dump() for p, t in zip(preds, truths, strict=True)]
    mae = statistics.mean(f["mae"] for f in folds)
    mad = statistics.mean(f["mad"] for f in folds)
    return {
        "mae": mae,
        "mad": mad,
        "mae_over_mad": mae / mad if mad > 0 else math.inf,
        "n_test": sum(f["n"] for f in folds),
        "folds": folds,
    }


def _fit_numpy(
    make: Callable[[], Any],
    x: np.ndarray,
    spec: TaskSpec,
    data: LabelledSet,
    folds: list[Fold],
) -> dict[str, Any]:
    """Fit a scikit-learn regressor per fold on train+val rows; score the test rows."""
    scale = _per_atom(spec, data)  # (n,)
    y = data.y[:, 0].double() / scale
    preds, truths = [], []
    for fold in folds:
        fit_rows = torch.cat([fold.train, fold.val]).numpy()
        model = make()
        model.fit(x[fit_rows], y[fit_rows].numpy())
        pred = torch.as_tensor(model.predict(x[fold.test.numpy()]), dtype=torch.float64)
        preds.append(pred * scale[fold.test])
        truths.append(data.y[fold.test, 0].double())
    return _score(preds, truths)


def probe_cell(
    features: np.ndarray, spec: TaskSpec, data: LabelledSet, folds: list[Fold]
) -> dict[str, Any]:
    """Ridge on frozen pooled features, alpha by leave-one-out CV on the fitting rows."""
    from sklearn.linear_model import RidgeCV
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    def make() -> Any:
        return make_pipeline(StandardScaler(), RidgeCV(alphas=np.logspace(-3, 4, 15)))

    result = _fit_numpy(make, features, spec, data, folds)
    result["model"] = "StandardScaler + RidgeCV(alphas 1e-3..1e4, leave-one-out)"
    return result


def composition_cell(
    spec: TaskSpec, data: LabelledSet, folds: list[Fold], options: SuiteOptions, threads: int
) -> dict[str, Any]:
    """Random forest on composition features (fractions + weighted element properties)."""
    from sklearn.ensemble import RandomForestRegressor

    from loop.features import composition_features

    x = composition_features(data.scopes)  # (n, d), columns from every row's elements

    def make() -> Any:
        return RandomForestRegressor(
            n_estimators=options.forest_trees, random_state=options.seed, n_jobs=threads
        )

    result = _fit_numpy(make, x, spec, data, folds)
    result["model"] = f"RandomForestRegressor({options.forest_trees} trees) on loop.features"
    return result


def _finetune_config(spec: TaskSpec, options: SuiteOptions) -> EnsembleConfig:
    extra: dict[str, Any] = {}
    if spec.fit == "debye_theta":
        extra = {"debye_output": "theta", "theta_scale": 400.0}
    elif spec.fit == "heat_capacity":
        extra = {"debye_output": "heat_capacity", "temperatures": (300.0,)}
    else:
        extra = {"target_names": (spec.target,)}
    return EnsembleConfig.model_validate(
        {
            "n_trainable_blocks": "all",
            "epochs": options.epochs,
            "patience": options.patience,
            "batch_size": options.batch_size,
            "lr_encoder": options.lr_encoder,
            "lr_head": options.lr_head,
            "layer_decay": 0.9,
            "loss": "l1",
            "recalibrate": False,
            "parallel": "in_process",
            "device": options.device,
            "seed": options.seed,
            **extra,
        }
    )


def build_ensemble(
    checkpoint: Path, head: HeadKind, config: EnsembleConfig, *, scratch: bool
) -> CloudEnsemble:
    """One member on the checkpoint's encoder, or on a random encoder of its architecture."""
    ensemble = create_ensemble(checkpoint, 1, head, 1, config)
    if not scratch:
        return ensemble
    torch.manual_seed(config.seed)
    encoder = CloudEncoder(ensemble.encoder.config)  # same architecture, random weights
    torch.manual_seed(config.seed)
    member = MemberNet(ensemble.spec, encoder).cpu()
    return CloudEnsemble(encoder, ensemble.tokenizer, ensemble.spec, [member], config)


class TimeBudget:
    """An epoch callback that asks training to stop once ``seconds`` have passed."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.start = time.perf_counter()
        self.spent = False

    def __call__(self, member: int, epoch: int, train_loss: float, val_loss: float | None) -> bool:
        self.spent = time.perf_counter() - self.start > self.seconds
        return self.spent


def finetune_cell(
    checkpoint: Path,
    head: HeadKind,
    spec: TaskSpec,
    data: LabelledSet,
    folds: list[Fold],
    options: SuiteOptions,
    *,
    scratch: bool,
    seconds_per_run: float,
) -> dict[str, Any]:
    """Full fine-tuning per fold (fresh weights each fold), scored on the fold's test rows."""
    config = _finetune_config(spec, options)
    atoms = data.n_atoms if spec.fit == "heat_capacity" else None
    preds, truths, epochs, budget_stops = [], [], [], 0
    for fold in folds:
        ensemble = build_ensemble(checkpoint, head, config, scratch=scratch)
        budget = TimeBudget(seconds_per_run)
        train, val, test = (data.subset(i) for i in (fold.train, fold.val, fold.test))
        report = ensemble.fit(
            train.scopes,
            train.y,
            n_atoms=None if atoms is None else atoms[fold.train],
            validation=(val.scopes, val.y, None if atoms is None else atoms[fold.val]),
            on_epoch=budget,  # type: ignore[arg-type]  # True stops (finetune.train_member)
        )
        test_atoms = None if atoms is None else atoms[fold.test]
        preds.append(ensemble.predict(test.scopes, n_atoms=test_atoms)[0, :, 0].double())
        truths.append(test.y[:, 0].double())
        epochs.append(report.members[0].epochs_run)
        budget_stops += int(budget.spent)
    result = _score(preds, truths)
    result.update(
        {
            "head": head,
            "encoder": "random init" if scratch else str(checkpoint),
            "epochs_run": epochs,
            "stopped_by_budget": budget_stops,
            "seconds_per_run_budget": seconds_per_run,
        }
    )
    return result


# ----------------------------------------------------------------- the suite


def _cells(spec: TaskSpec) -> list[tuple[str, HeadKind | None, bool]]:
    """(cell name, fine-tuning head or None, scratch) in run order."""
    if spec.fit == "heat_capacity":
        heads: list[HeadKind] = ["debye", "debye_einstein"]
        ft = [(f"finetune_{h}", h, False) for h in heads]
        sc = [(f"scratch_{h}", h, True) for h in heads]
        cells: list[tuple[str, HeadKind | None, bool]] = [("probe", None, False)]
        return cells + ft + sc + [("composition", None, False)]
    head: HeadKind = "debye" if spec.fit == "debye_theta" else "regression"
    return [
        ("probe", None, False),
        ("finetune", head, False),
        ("scratch", head, True),
        ("composition", None, False),
    ]


def _checkpoint_identity(checkpoint: Path) -> dict[str, str]:
    card = json.loads((checkpoint / "model_card.json").read_text(encoding="utf-8"))
    return {
        "path": str(checkpoint),
        "name": str(card.get("name", "")),
        "weights_sha256": str(card.get("weights_sha256", "")),
    }


def _write(path: Path, report: dict[str, Any]) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _settings(options: SuiteOptions, identity: dict[str, str]) -> dict[str, Any]:
    settings = asdict(options)
    settings.pop("tasks")
    settings["checkpoint"] = identity
    return settings


def run_suite(
    options: SuiteOptions,
    out: Path,
    *,
    fresh: bool = False,
    threads: int = 1,
    echo: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run (or resume) the suite; the JSON at ``out`` is rewritten after every cell.

    Raises:
        SystemExit: ``out`` holds results of other settings (use ``fresh`` or another path).
    """
    checkpoint = resolve_checkpoint(options.checkpoint)
    if checkpoint is None:
        raise SystemExit("--checkpoint must name a checkpoint (a directory or 'default')")
    identity = _checkpoint_identity(checkpoint)
    settings = _settings(options, identity)
    report: dict[str, Any] = {"format": FORMAT, "settings": settings, "tasks": {}}
    if out.is_file() and not fresh:
        previous = json.loads(out.read_text(encoding="utf-8"))
        if previous.get("settings") != settings:
            raise SystemExit(
                f"{out} holds results of other settings; pass --fresh to replace it or --out "
                "to write elsewhere"
            )
        report = previous
    report["command"] = "nice -n 10 python " + shlex.join(sys.argv)
    out.parent.mkdir(parents=True, exist_ok=True)
    specs = [TASKS[name] for name in options.tasks]
    total = sum(len(_cells(s)) for s in specs)
    done = 0
    for spec in specs:
        task = report["tasks"].setdefault(spec.name, {"cells": {}})
        cells = _cells(spec)
        todo = [c for c in cells if c[0] not in task["cells"]]
        if not todo:
            done += len(cells)
            continue
        start = time.perf_counter()
        data, folds = load_task(spec, options)
        task.update(
            {
                "description": spec.description,
                "dataset": spec.dataset,
                "target": spec.target,
                "unit": spec.unit,
                "protocol": spec.protocol,
                "n_folds": len(folds),
                "n_train": [len(f.train) for f in folds],
                "n_val": [len(f.val) for f in folds],
                "n_test": [len(f.test) for f in folds],
                "load_seconds": time.perf_counter() - start,
            }
        )
        n_runs = sum(1 for c in cells if c[1] is not None) * len(folds)
        task["budget_minutes"] = options.task_minutes * spec.budget_weight
        per_run = task["budget_minutes"] * 60.0 / max(1, n_runs)
        for name, head, scratch in cells:
            done += 1
            if name in task["cells"]:
                continue
            start = time.perf_counter()
            if name == "probe":
                probe = build_ensemble(
                    checkpoint, "regression", _probe_config(options), scratch=False
                )
                features = probe.features(data.scopes)[0].double().numpy()  # (n, C), cached
                result = probe_cell(features, spec, data, folds)
            elif name == "composition":
                result = composition_cell(spec, data, folds, options, threads)
            else:
                assert head is not None
                result = finetune_cell(
                    checkpoint,
                    head,
                    spec,
                    data,
                    folds,
                    options,
                    scratch=scratch,
                    seconds_per_run=per_run,
                )
            result["seconds"] = time.perf_counter() - start
            task["cells"][name] = result
            report["summary"] = summarise(report)
            _write(out, report)
            echo(
                f"[{done}/{total}] {spec.name}/{name}: MAE {result['mae']:.4g} {spec.unit} "
                f"(MAE/MAD {result['mae_over_mad']:.3f}, {len(folds)} fold(s), "
                f"{result['seconds']:.0f} s)"
            )
    report["summary"] = summarise(report)
    _write(out, report)
    return report


def _probe_config(options: SuiteOptions) -> EnsembleConfig:
    return EnsembleConfig(
        n_trainable_blocks=0, device=options.device, target_names=("y",), parallel="in_process"
    )


# ----------------------------------------------------------------- summary


def best_cell(task: dict[str, Any], prefix: str) -> tuple[str, dict[str, Any]] | None:
    """The cell named ``prefix`` or ``prefix_<head>`` with the lowest MAE."""
    found = [
        (name, cell)
        for name, cell in task.get("cells", {}).items()
        if name == prefix or name.startswith(prefix + "_")
    ]
    return min(found, key=lambda item: item[1]["mae"]) if found else None


def summarise(report: dict[str, Any]) -> dict[str, Any]:
    """Per task: pretrained-vs-scratch improvement, probe-vs-composition; and the targets."""
    rows: dict[str, Any] = {}
    beats_scratch = probe_wins = compared_ft = compared_probe = 0
    for name, task in report.get("tasks", {}).items():
        ft, sc = best_cell(task, "finetune"), best_cell(task, "scratch")
        probe, comp = task["cells"].get("probe"), task["cells"].get("composition")
        row: dict[str, Any] = {}
        if ft and sc:
            gain = 100.0 * (sc[1]["mae"] - ft[1]["mae"]) / sc[1]["mae"]
            row["pretrained_vs_scratch_pct"] = gain
            compared_ft += 1
            beats_scratch += int(gain >= 15.0)
        if probe and comp:
            row["probe_beats_composition"] = probe["mae"] < comp["mae"]
            compared_probe += 1
            probe_wins += int(probe["mae"] < comp["mae"])
        rows[name] = row
    tasks = report.get("tasks", {})
    aflow = tasks.get("aflow_debye", {}).get("cells", {}).get("finetune")
    cv = best_cell(tasks.get("cloud_cv", {}), "finetune")
    targets = {
        "pretrained_beats_scratch_15pct": f"{beats_scratch} of {compared_ft} (target >= 5 of 7)",
        "probe_beats_composition": f"{probe_wins} of {compared_probe} (target >= 4)",
        "aflow_debye_mae_K": None if aflow is None else aflow["mae"],
        "cloud_cv_mae_over_mad": None if cv is None else cv[1]["mae_over_mad"],
    }
    met = {
        "pretrained_beats_scratch": beats_scratch >= 5,
        "probe_beats_composition": probe_wins >= 4,
        "aflow_debye_below_33K": aflow is not None and aflow["mae"] < 33.0,
        "cloud_cv_below_0.057": cv is not None and cv[1]["mae_over_mad"] < 0.057,
    }
    line = (
        f"pretrained >= 15 % better than scratch on {beats_scratch}/{compared_ft} tasks "
        f"(target 5 of 7): {'met' if met['pretrained_beats_scratch'] else 'not met'}; "
        f"probe beats composition on {probe_wins}/{compared_probe} (target 4): "
        f"{'met' if met['probe_beats_composition'] else 'not met'}; AFLOW Debye MAE "
        + ("n/a" if aflow is None else f"{aflow['mae']:.1f} K")
        + f" (target < 33 K): {'met' if met['aflow_debye_below_33K'] else 'not met'}; "
        + "cloud_cv Cv MAE/MAD "
        + ("n/a" if cv is None else f"{cv[1]['mae_over_mad']:.3f}")
        + f" (target < 0.057): {'met' if met['cloud_cv_below_0.057'] else 'not met'}"
    )
    quick = bool(report.get("settings", {}).get("quick"))
    if quick:
        line = "QUICK (subsampled, few epochs; not the targets' numbers): " + line
    return {"per_task": rows, "targets": targets, "met": met, "line": line}


def _fingerprint(report: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(report["settings"], sort_keys=True).encode()).hexdigest()[:12]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", default="default", help="checkpoint dir or 'default'")
    parser.add_argument("--tasks", default=",".join(TASKS), help="comma list of " + ",".join(TASKS))
    parser.add_argument("--quick", action="store_true", help="subsampled ~10 min smoke run")
    parser.add_argument("--epochs", type=int, default=None, help="epoch cap per fine-tune run")
    parser.add_argument("--task-minutes", type=float, default=None, help="per-task budget")
    parser.add_argument("--max-train", type=int, default=None)
    parser.add_argument("--max-test", type=int, default=None)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=int(os.environ.get("CLOUDLAB_THREADS", 1)))
    parser.add_argument("--fresh", action="store_true", help="discard results in --out")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    tasks = [t for t in args.tasks.split(",") if t]
    unknown = sorted(set(tasks) - set(TASKS))
    if unknown:
        parser.error(f"unknown tasks {unknown}; choose from {','.join(TASKS)}")
    overrides: dict[str, Any] = {
        "checkpoint": args.checkpoint,
        "tasks": tasks,
        "device": args.device,
    }
    for key in ("epochs", "task_minutes", "max_train", "max_test"):
        value = getattr(args, key)
        if value is not None:
            overrides[key] = value
    options = SuiteOptions.quick_defaults(**overrides) if args.quick else SuiteOptions(**overrides)
    if args.out is None:
        resolved = resolve_checkpoint(args.checkpoint)
        name = resolved.name if resolved is not None else "none"
        args.out = RESULTS / f"downstream_{name}{'_quick' if args.quick else ''}.json"
    report = run_suite(options, args.out, fresh=args.fresh, threads=args.threads)
    print(report["summary"]["line"])
    print(f"wrote {args.out} (settings {_fingerprint(report)})")


if __name__ == "__main__":
    main()
