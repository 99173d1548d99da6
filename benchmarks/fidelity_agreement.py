"""How well a CHGNet low-fidelity table agrees with the dataset's own (DFT) labels.

For each (dataset, CHGNet quantity, DFT target) it reports Pearson and Spearman
correlations over every row and how much of the DFT tail the cheap fidelity finds:
of DFT's best 1 % (lowest values), how many lie in CHGNet's best 10 % (and its best
``tail_k`` rows). The tables come from :func:`loop.multifidelity.chgnet_table` (built
on first use, read from the cache after).

    python benchmarks/fidelity_agreement.py [--out benchmarks/results/fidelity_agreement.json]
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
from scipy.stats import pearsonr, spearmanr

CASES = (  # dataset, CHGNet quantity, DFT target of the dataset
    ("carbon_24", "energy_per_atom", "energy_per_atom"),
    ("perov_5", "formation_energy_per_cell", "heat_ref"),
)


def agreement(dataset: str, quantity: str, target: str) -> dict[str, object]:
    """Correlations and tail overlap of one CHGNet table against one DFT target."""
    from cloud_model.datasets import load_dataset
    from loop.multifidelity import chgnet_table

    low = chgnet_table(dataset, quantity, splits=["val", "test"])  # type: ignore[arg-type]
    records = load_dataset(dataset, splits=["val", "test"]).records
    high = {str(r.id): float(r.targets[target]) for r in records}
    ids = [i for i in high if i in low and math.isfinite(low[i]) and math.isfinite(high[i])]
    cheap = np.array([low[i] for i in ids])
    dft = np.array([high[i] for i in ids])
    k = max(1, len(ids) // 100)  # DFT's best 1 %
    dft_top = set(np.argsort(dft)[:k].tolist())
    cheap_10pct = set(np.argsort(cheap)[: 10 * k].tolist())
    return {
        "dataset": dataset,
        "chgnet_quantity": quantity,
        "dft_target": target,
        "rows": len(ids),
        "pearson": float(pearsonr(cheap, dft)[0]),
        "spearman": float(spearmanr(cheap, dft)[0]),
        "dft_top1pct": k,
        "dft_top1pct_in_chgnet_best_10pct": len(dft_top & cheap_10pct),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--out", type=Path, default=Path("benchmarks/results/fidelity_agreement.json")
    )
    args = parser.parse_args()
    rows = [agreement(*case) for case in CASES]
    for row in rows:
        print(json.dumps(row))
    args.out.write_text(
        json.dumps({"benchmark": "fidelity_agreement", "rows": rows}, indent=2) + "\n"
    )


if __name__ == "__main__":
    main()
