"""Calibration of CLOUD deep ensembles, K = 1 vs K = 5, on AFLOW Debye temperatures.

Registry split of ``aflow_debye_temperature``: members train on ``train`` with
early stopping on ``val``; calibration is scored on ``test``. For each ensemble
the test metrics are reported raw (the members' spread as it is) and after the
variance recalibration fitted on ``val`` (sigma -> c sigma). A single model has no
spread, so K = 1 is scored with a homoscedastic sigma equal to its validation RMSE.
Members share the frozen trunk of the pretrained encoder; ``--n-trainable-blocks``
sets how much of the top each member fine-tunes (0 = head only).

    nice -n 10 python benchmarks/ensemble_calibration.py
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import torch

from cloud_model.calibration import fit_variance_scale, gaussian_report
from cloud_model.checkpoint import resolve_checkpoint
from cloud_model.ensemble import CloudEnsemble, EnsembleConfig
from cloud_model.finetune_data import DataSource, load_labelled, split_rows

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", default="default")
    parser.add_argument("--members", default="1,5")
    parser.add_argument("--n-trainable-blocks", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--patience", type=int, default=10)
    parser.add_argument("--bootstrap", action="store_true", help="also run K=5 with bootstrap")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=RESULTS / "ensemble_calibration.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    checkpoint = resolve_checkpoint(None if args.checkpoint == "none" else args.checkpoint)
    data = load_labelled(
        DataSource(dataset="aflow_debye_temperature", targets=("debye_temperature",))
    )
    parts = split_rows(data)
    train, val, test = (data.subset(parts[k]) for k in ("train", "val", "test"))
    base = {
        "n_trainable_blocks": args.n_trainable_blocks,
        "epochs": args.epochs,
        "patience": args.patience,
        "loss": "mse",
        "debye_output": "theta",
        "recalibrate": False,  # done here, so that raw and recalibrated come from one fit
        "device": "cpu",
        "model_size": "small",
    }
    runs = [(int(k), False) for k in args.members.split(",")]
    if args.bootstrap:
        runs.append((5, True))
    results = []
    shared: CloudEnsemble | None = None
    for k, bootstrap in runs:
        start = time.perf_counter()
        config = EnsembleConfig.model_validate({**base, "bootstrap": bootstrap})
        ens = CloudEnsemble.create(checkpoint, k, "debye", 1, config)
        if shared is not None:  # same frozen trunk: re-use its cached features
            ens.cache = shared.cache
        shared = ens
        ens.fit(train.scopes, train.y, validation=(val.scopes, val.y, None))
        p_val, p_test = ens.predict(val.scopes), ens.predict(test.scopes)  # (K, n, 1)
        mean_val, std_val = p_val.double().mean(0), p_val.double().std(0, correction=0)
        mean_test, std_test = p_test.double().mean(0), p_test.double().std(0, correction=0)
        if k == 1:  # no spread: a constant sigma, the validation RMSE
            rmse = float(((mean_val - val.y) ** 2).nanmean().sqrt())
            raw = gaussian_report(mean_test, torch.full_like(mean_test, rmse), test.y)
            scale, recal = 1.0, raw
            note = f"homoscedastic sigma = validation RMSE ({rmse:.1f} K)"
        else:
            raw = gaussian_report(mean_test, std_test, test.y)
            scale = fit_variance_scale(mean_val, std_val, val.y)
            recal = gaussian_report(mean_test, std_test, test.y, variance_scale=scale)
            note = "ensemble spread"
        row = {
            "members": k,
            "bootstrap": bootstrap,
            "sigma": note,
            "variance_scale_from_val": scale,
            "test_raw": raw.model_dump(),
            "test_recalibrated": recal.model_dump(),
            "seconds": time.perf_counter() - start,
        }
        results.append(row)
        print(json.dumps(row))
    report = {
        "benchmark": "ensemble_calibration",
        "dataset": "aflow_debye_temperature (registry split; theta in K)",
        "n_train": len(train.scopes),
        "n_val": len(val.scopes),
        "n_test": len(test.scopes),
        "threads": args.threads,
        "settings": base,
        "results": results,
        "command": "nice -n 10 python " + shlex.join(sys.argv),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
