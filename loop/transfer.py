"""Transfer features: what composition models trained on other labelled sets predict for the pool.

``surrogate.kind: gp_transfer`` adds a block to the composition GP: for each
formula dataset named in ``surrogate.transfer_sets`` (the ``crabnet_*`` label sets of
the registry: Materials Project shear and bulk moduli, formation energies, band
gaps, energies above the hull...), a gradient-boosted tree model is trained on that
set's formulas and labels and predicts every candidate of the pool. The
predictions, scaled to unit variance on the pool, are the block's features. A
Debye temperature follows the shear modulus and the density, a heat of
formation follows formation energies of related compounds: the campaign's GP
learns how much each transferred property explains, and its ARD lengthscales
switch off the ones that do not.

Leakage guard: every row of a source set whose reduced formula is the reduced
formula of a candidate of the pool, or of a prior row, is dropped before training
(so no label of any polymorph of a pool composition reaches the models; the sets
have no ids or structures to check beyond that). The numbers dropped are logged
and returned.

Predictions are cached on disk (``<cache>/transfer/``, safetensors) keyed by the
source file's sha256, the formulas queried and the formulas excluded, so a pool is
transferred once per machine.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from functools import cache
from pathlib import Path

import numpy as np
import torch
from numpy.typing import NDArray
from torch import Tensor

from loop.config import DEFAULT_TRANSFER_SETS

__all__ = ["DEFAULT_TRANSFER_SETS", "TransferReport", "transfer_features"]

logger = logging.getLogger(__name__)
_phase = logging.getLogger("cloudlab.progress")  # what a live display shows (loop/cli/live.py)
_VERSION = "1"  # bump when the featurisation or the model changes
_MAX_Z = 103


class TransferReport:
    """Per source set: rows trained on and rows dropped by the leakage guard."""

    def __init__(self) -> None:
        self.trained: dict[str, int] = {}
        self.dropped: dict[str, int] = {}


@cache
def _element_table() -> tuple[tuple[str, ...], NDArray[np.float64]]:
    import warnings

    from pymatgen.core import Element

    from loop.features import _element_properties

    symbols = tuple(Element.from_Z(z).symbol for z in range(1, _MAX_Z + 1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pymatgen warns about noble-gas electronegativities
        props = np.array([_element_properties(s) for s in symbols], dtype=float)
    return symbols, props


def _featurise(comps: Sequence[dict[str, float]]) -> NDArray[np.float64]:
    """Fixed-vocabulary composition features: fractions of Z = 1..103, property mean/std, arity."""
    symbols, props = _element_table()
    col = {s: i for i, s in enumerate(symbols)}
    out = np.zeros((len(comps), len(symbols) + 2 * props.shape[1] + 1))
    for i, comp in enumerate(comps):
        total = sum(comp.values()) or 1.0
        idx = [col[e] for e in comp if e in col]
        w = np.array([comp[e] / total for e in comp if e in col])
        out[i, idx] = w
        if idx:
            p = props[idx]
            with np.errstate(invalid="ignore"):
                mean = np.nansum(p * w[:, None], axis=0)
                std = np.sqrt(np.nansum(w[:, None] * (p - mean) ** 2, axis=0))
            out[i, len(symbols) : len(symbols) + props.shape[1]] = mean
            out[i, len(symbols) + props.shape[1] : -1] = std
        out[i, -1] = len(comp)
    return np.nan_to_num(out)


def _reduced(comp: dict[str, float]) -> str:
    from pymatgen.core import Composition

    return str(Composition(comp).reduced_formula)


def _source(name: str) -> tuple[list[dict[str, float]], list[str], NDArray[np.float64], str]:
    """Compositions, reduced formulas and labels of a formula set, and its files' signature."""
    from pymatgen.core import Composition

    from cloud_model.datasets import get_spec, load_dataset, resolve
    from cloud_model.errors import DataError

    spec = get_spec(name)
    if spec.kind != "formula":
        raise DataError(f"transfer set {name!r} is a {spec.kind} dataset; give a formula set")
    target = next(iter(spec.targets))
    digest = hashlib.sha256()
    for split, path in sorted(resolve(name).items()):
        digest.update(f"{split}\0{path.stat().st_size}\0{path.stat().st_mtime_ns}".encode())
    comps, formulas, labels = [], [], []
    for rec in load_dataset(name).records:
        value = rec.targets.get(target, float("nan"))
        if rec.formula is None or not np.isfinite(value):
            continue
        try:
            c = Composition(rec.formula)
        except Exception:  # a formula pymatgen cannot read is skipped, like an empty label
            continue
        amounts = {str(e): float(a) for e, a in c.get_el_amt_dict().items()}
        comps.append(amounts)
        formulas.append(str(c.reduced_formula))
        labels.append(value)
    return comps, formulas, np.array(labels), digest.hexdigest()


def transfer_features(
    compositions: Sequence[dict[str, float]],
    *,
    sets: Sequence[str] = DEFAULT_TRANSFER_SETS,
    exclude: set[str] | None = None,
    cache_dir: Path | None = None,
    report: TransferReport | None = None,
) -> Tensor:
    """``N x len(sets)`` predictions of models trained on ``sets`` for ``compositions``.

    Args:
        compositions: element -> amount of every candidate (pool, then prior rows).
        sets: registered formula datasets to transfer from.
        exclude: reduced formulas whose rows are dropped from every source set (default:
            the formulas of ``compositions``: the leakage guard).
        cache_dir: where predictions are cached (default ``<cloudlab cache>/transfer``).
        report: filled with rows trained on / dropped per set.

    Returns:
        Predictions, each column scaled to zero mean and unit variance over the rows.
    """
    from safetensors.torch import load_file, save_file

    from cloud_model.datasets import cache_dir as data_cache

    queried = [_reduced(c) for c in compositions]
    exclude = set(queried) if exclude is None else exclude
    root = cache_dir or data_cache().parent / "transfer"
    root.mkdir(parents=True, exist_ok=True)
    x_query: NDArray[np.float64] | None = None
    columns = []
    for name in sets:
        comps, formulas, labels, files_sig = _source(name)
        key = hashlib.sha256(
            "\0".join([_VERSION, name, files_sig, *queried, "|", *sorted(exclude)]).encode()
        ).hexdigest()[:32]
        path = root / f"{name}-{key}.safetensors"
        keep = np.array([f not in exclude for f in formulas], dtype=bool)
        if report is not None:
            report.trained[name] = int(keep.sum())
            report.dropped[name] = int((~keep).sum())
        if path.is_file():
            columns.append(load_file(str(path))["prediction"])
            continue
        label = f"training transfer model {name} ({len(columns) + 1}/{len(sets)})"
        _phase.debug(label, extra={"phase": label})
        from sklearn.ensemble import HistGradientBoostingRegressor

        if x_query is None:
            x_query = _featurise(compositions)
        x_train = _featurise([c for c, k in zip(comps, keep, strict=True) if k])
        model = HistGradientBoostingRegressor(max_iter=300, random_state=0)
        model.fit(x_train, labels[keep])
        pred = torch.as_tensor(model.predict(x_query), dtype=torch.float64)
        tmp = path.with_suffix(".tmp")
        save_file({"prediction": pred.contiguous()}, str(tmp))
        tmp.replace(path)
        logger.debug(
            "transfer %s: trained on %d rows (%d dropped: formulas of the campaign), "
            "predicted %d candidates",
            name,
            int(keep.sum()),
            int((~keep).sum()),
            len(compositions),
        )
        columns.append(pred)
    out = torch.stack(columns, dim=-1)
    return (out - out.mean(0)) / out.std(0).clamp_min(1e-12)
