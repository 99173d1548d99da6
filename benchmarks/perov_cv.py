"""perov_5 heat of formation: k-fold cross-validated MAE for both SCOPE variants, +/- pretraining.

All 7,572 mirrored perov_5 rows (the CDVAE val + test files), SCOPE-encoded with
the ``cloud`` (published) and ``native`` (element-bound orbits) variants. For each
variant and each encoder (pretrained checkpoint, or a random one of the same
size) one ensemble is built whose frozen trunk features are cached once and
re-used by every fold; each fold re-initialises the trainable part
(``warm_start=False``), holds out 10 % of its training rows for early stopping
and scores the held-out fold. By default only the head is trained on the cached
pooled features (a cheap probe of what the encoder knows); pass
``--n-trainable-blocks 1`` (or more) to fine-tune the top of the encoder too.

    nice -n 10 python benchmarks/perov_cv.py
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

from cloud_model.checkpoint import resolve_checkpoint
from cloud_model.ensemble import CloudEnsemble, EnsembleConfig
from cloud_model.finetune_data import DataSource, load_labelled
from cloud_model.finetune_job import target_metrics

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", default="default")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--patience", type=int, default=10)
    parser.add_argument("--n-trainable-blocks", type=int, default=0)
    parser.add_argument("--variants", default="cloud,native")
    parser.add_argument("--pooling", default=None, choices=["cls", "mean"], help="default: the encoder's own (cls)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=RESULTS / "perov_cv.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    checkpoint = resolve_checkpoint(None if args.checkpoint == "none" else args.checkpoint)
    config = EnsembleConfig(
        n_trainable_blocks=args.n_trainable_blocks,
        pooling=args.pooling,
        epochs=args.epochs,
        patience=args.patience,
        batch_size=64,
        loss="l1",
        lr_head=1e-3,
        lr_encoder=3e-4,
        recalibrate=False,
        device="cpu",
        model_size="small",
        target_names=("heat_ref",),
    )
    report: dict[str, object] = {
        "benchmark": "perov_cv",
        "folds": args.folds,
        "threads": args.threads,
        "settings": json.loads(config.model_dump_json()),
        "rows": None,
        "results": {},
    }
    results: dict[str, dict[str, object]] = {}
    for variant in args.variants.split(","):
        data = load_labelled(
            DataSource(dataset="perov_5", targets=("heat_ref",), variant=variant)  # type: ignore[arg-type]
        )
        report["rows"] = len(data.scopes)
        order = torch.randperm(len(data.scopes), generator=torch.Generator().manual_seed(0))
        folds = order.chunk(args.folds)
        for label, ckpt in (("pretrained", checkpoint), ("from_scratch", None)):
            start = time.perf_counter()
            ens = CloudEnsemble.create(ckpt, 1, "regression", 1, config)
            maes, mads = [], []
            for k, test_idx in enumerate(folds):
                rest = torch.cat([f for j, f in enumerate(folds) if j != k])
                n_val = len(rest) // 10
                val_idx, train_idx = rest[:n_val], rest[n_val:]
                train, val, test = (data.subset(i) for i in (train_idx, val_idx, test_idx))
                ens.fit(
                    train.scopes, train.y, warm_start=False, validation=(val.scopes, val.y, None)
                )
                pred = ens.predict(test.scopes).mean(0)[:, 0]
                metrics = target_metrics(pred, test.y[:, 0])
                maes.append(metrics.mae)
                mads.append(metrics.mad)
                print(
                    f"{variant} {label} fold {k}: MAE {metrics.mae:.4f} eV (MAD {metrics.mad:.3f})"
                )
            key = f"{variant}/{label}"
            results[key] = {
                "variant": variant,
                "encoder": str(ckpt) if ckpt is not None else "random init (small)",
                "mae_eV_mean": statistics.mean(maes),
                "mae_eV_std": statistics.stdev(maes) if len(maes) > 1 else 0.0,
                "mae_per_fold": maes,
                "mad_eV": statistics.mean(mads),
                "seconds": time.perf_counter() - start,
                "trunk_strings_encoded": ens.cache.n_computed,
            }
            print(key, json.dumps(results[key]))
    report["results"] = results
    report["command"] = "nice -n 10 python " + shlex.join(sys.argv)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
