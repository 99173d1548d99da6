"""Pilot: does element-aware embedding help multi-task pretraining? Same corpus, same steps.

Builds a small real multi-task corpus without the full corpus builder: CLOUD Cv(300 K)
(``cloud_cv`` train_and_val; the test split is never read), AFLOW Debye temperatures
(``aflow_debye_temperature`` train split) and Materials Project formation energies of
``mpts_52`` val (the pre-split years). Each task's validation rows are a fixed 10 % by
sha256 of the string; MLM uses the tasks' training strings. It then runs the same
multi-task pretraining (``cloud_model.multitask``) once per ``--element-features`` choice
with identical seeds and steps, and reports each task's validation MAE (in its unit) and
MAE/MAD, plus the relative change against the first choice, measured in the same run.

    CLOUDLAB_THREADS=1 python benchmarks/multitask_pilot.py --steps 1200 \\
        --out benchmarks/results/multitask_element_features.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import shlex
import sys
import tempfile
import time
from pathlib import Path

import torch

from cloud_model.labelled_data import DataSource, load_labelled
from cloud_model.multitask import pretrain_multitask
from cloud_model.multitask_data import GuardReport, MultiTaskCorpus, TaskData
from cloud_model.pretrain_config import PretrainConfig
from cloud_model.tokenizer import ScopeTokenizer

SOURCES = (  # (dataset, splits, target)
    ("cloud_cv", ("train_and_val",), "cv"),
    ("aflow_debye_temperature", ("train",), "debye_temperature"),
    ("mpts_52", ("val",), "formation_energy_per_atom"),
)
VALIDATION_BUCKETS = 26  # sha256 first byte < 26 of 256: ~10 % of the rows


def _is_validation(text: str) -> bool:
    return hashlib.sha256(text.encode()).digest()[0] < VALIDATION_BUCKETS


def pilot_corpus() -> MultiTaskCorpus:
    """The three real tasks (see the module docstring), string-hash validation splits."""
    tasks = []
    for dataset, splits, target in SOURCES:
        data = load_labelled(DataSource(dataset=dataset, splits=splits, targets=(target,)))
        rows = [
            (s, float(y))
            for s, y in zip(data.scopes, data.y[:, 0].tolist(), strict=True)
            if y == y  # finite labels only
        ]
        tasks.append(
            TaskData(
                name=f"{dataset}:{target}",
                unit=data.units.get(target, ""),
                train=[r for r in rows if not _is_validation(r[0])],
                validation=[r for r in rows if _is_validation(r[0])],
            )
        )
    strings = sorted({s for t in tasks for s, _ in t.train})
    guard = GuardReport(
        pools=["cloud_cv:test", "aflow_debye_temperature:val+test", "mpts_52:test"],
        kept={t.name: len(t.train) + len(t.validation) for t in tasks},
    )
    return MultiTaskCorpus(tasks=tasks, mlm_train=strings, mlm_validation=[], guard=guard)


def _config(args: argparse.Namespace, element_features: str, seed: int) -> PretrainConfig:
    return PretrainConfig.model_validate(
        {
            "objective": "multitask",
            "model": {"size": args.size, "element_features": element_features},
            "train": {
                "batch_size": args.batch_size,
                "max_steps": args.steps,
                "warmup_steps": max(1, args.steps // 20),
                "learning_rate": args.lr,
                "eval_every": args.steps,
                "checkpoint_every": args.steps,
                "num_threads": 1,
                "device": "cpu",
                "seed": seed,
                "log_every": 100,
            },  # fmt: skip
            "multitask": {
                "mlm_weight": args.mlm_weight,
                "mlm_batch_size": 32,
                "task_temperature": 3.0,
                "eval_max_rows": 5000,
            },  # fmt: skip
        }
    )


def main(argv: list[str] | None = None) -> dict[str, object]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=1200)
    parser.add_argument("--size", default="small")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--mlm-weight", type=float, default=0.5)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--element-features", nargs="+", default=["none", "magpie"])
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)
    corpus = pilot_corpus()
    tokenizer = ScopeTokenizer.default()
    runs: dict[str, dict[str, object]] = {}
    for choice in args.element_features:
        per_seed = []
        for seed in args.seeds:
            with tempfile.TemporaryDirectory() as tmp:
                t0 = time.perf_counter()
                result = pretrain_multitask(_config(args, choice, seed), tmp, corpus=corpus,
                                            tokenizer=tokenizer)  # fmt: skip
            last = result.validation[-1]
            per_seed.append(
                {
                    "seed": seed,
                    "tasks": last["tasks"],
                    "mean_mae_over_mad": last["score"],
                    "train_task_loss_last50": sum(result.task_losses[-50:]) / 50,
                    "steps_per_s": result.steps_per_s,
                    "wall_s": time.perf_counter() - t0,
                    "n_parameters": result.n_parameters,
                }
            )
            print(f"{choice} seed {seed}: mean MAE/MAD {last['score']:.4f}, "
                  f"{result.steps_per_s:.2f} steps/s")  # fmt: skip
            for name, m in last["tasks"].items():
                print(f"  {name}: MAE {m['mae']:.4g} MAE/MAD {m['mae_over_mad']:.4f} (n={m['n']})")
        names = list(per_seed[0]["tasks"])  # type: ignore[arg-type]
        runs[choice] = {
            "mean_over_seeds": {
                name: {
                    key: sum(r["tasks"][name][key] for r in per_seed) / len(per_seed)  # type: ignore[index]
                    for key in ("mae", "mae_over_mad")
                }
                for name in names
            },
            "seeds": per_seed,
        }
    reference = args.element_features[0]

    def mean_mae(choice: str, name: str) -> float:
        return runs[choice]["mean_over_seeds"][name]["mae"]  # type: ignore[index,no-any-return]

    relative = {
        choice: {
            name: mean_mae(choice, name) / mean_mae(reference, name) - 1.0
            for name in runs[reference]["mean_over_seeds"]  # type: ignore[attr-defined]
        }
        for choice in runs
        if choice != reference
    }
    report: dict[str, object] = {
        "command": shlex.join(["python", "benchmarks/multitask_pilot.py", *sys.argv[1:]])
        if argv is None
        else shlex.join(["python", "benchmarks/multitask_pilot.py", *argv]),
        "what": "validation MAE per task after the same multi-task pretraining, with and "
        "without element descriptors in the token embedding (same data, seed, steps)",
        "corpus": {
            t.name: {"unit": t.unit, "train": len(t.train), "validation": len(t.validation)}
            for t in corpus.tasks
        }
        | {"mlm_strings": len(corpus.mlm_train)},
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "runs": runs,
        "relative_mae_change_vs_" + reference: relative,
        "threads": torch.get_num_threads(),
    }
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
        print(f"wrote {args.out}")
    return report


if __name__ == "__main__":
    main()
