"""CHGNet crystal features of a pool's structures: the third block of the block GP.

``surrogate.kind: gp_chgnet`` (and the ``auto`` candidate of that name) is the block
GP of :mod:`loop.gp_blocks` over the composition descriptor and this block: the
64-dimensional crystal feature vector CHGNet computes for a structure before its
energy readout (``predict_structure(..., return_crystal_feas=True)``), for each
candidate's structure as given (no relaxation), each column standardised on the
pool. A pretrained potential's representation separates what composition cannot
(polymorphs) and carries the chemistry of its training energies: on ``carbon_24`` a GP
on it, fitted on 120 random rows, ranks 23-35 (median 32) of the 41 lowest energies into
its 96 lowest means over 5 seeds, where the composition GP ranks none
(``python benchmarks/chgnet_block_probe.py``).

Contamination: CHGNet is trained on MPtrj (Materials Project relaxations). A pool
whose labels are Materials Project energies (``mpts_52``) is contaminated for this
block; ``configs/mpts52_time_split.yaml`` leaves it out of ``auto``'s candidates.

Only the pool has structures (prior data are SCOPE strings), so the member fits on
the campaign's own measurements. Features are cached on disk per structure (the
sha256 of its CIF) and CHGNet version, appended batch by batch, so a pool is
featurised once and an interrupted build continues::

    OMP_NUM_THREADS=2 python -m loop.chgnet_block carbon_24 --splits val test
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import Tensor

from loop.gp_blocks import BlockGPSurrogate

__all__ = ["CHGNET_DIMS", "ChgnetGPSurrogate", "chgnet_block_features", "chgnet_features"]

logger = logging.getLogger(__name__)
_phase = logging.getLogger("cloudlab.progress")  # what a live display shows (loop/cli/live.py)
CHGNET_DIMS = 64  # CHGNet 0.3.0's crystal feature width
_MODEL_VERSION = "0.3.0"
_MEMO: dict[str, Tensor] = {}  # runs in one process (benchmark workers) read a pool once


def _cache_path(cache_dir: Path | None) -> Path:
    from adapters.mlip import _chgnet_version
    from cloud_model.datasets import cache_dir as data_cache_dir

    root = cache_dir if cache_dir is not None else data_cache_dir()
    return root / "chgnet_features" / f"chgnet-{_chgnet_version()}-{_MODEL_VERSION}.jsonl"


def _read(path: Path) -> dict[str, list[float]]:
    rows: dict[str, list[float]] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:  # a line cut by a kill: computed again
                continue
            if isinstance(row, dict) and len(row.get("fea", ())) == CHGNET_DIMS:
                rows[str(row["sha256"])] = [float(v) for v in row["fea"]]
    return rows


def chgnet_features(
    cifs: Sequence[str],
    *,
    cache_dir: Path | None = None,
    batch_size: int = 32,
    threads: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> Tensor:
    """``N x 64`` CHGNet crystal features of the structures in ``cifs`` (cached on disk).

    Raises:
        DataError: a CIF that pymatgen cannot read (naming its position).
    """
    from cloud_model.errors import DataError

    keys = [hashlib.sha256(c.encode()).hexdigest() for c in cifs]
    path = _cache_path(cache_dir)
    rows = _read(path)
    todo = sorted({k: i for i, k in enumerate(keys) if k not in rows}.items(), key=lambda t: t[1])
    if todo:
        from pymatgen.core import Structure

        from adapters.mlip import ChgnetCalculator

        path.parent.mkdir(parents=True, exist_ok=True)
        model = ChgnetCalculator(_MODEL_VERSION, threads=threads).model()
        logger.info(
            "CHGNet crystal features of %d structures (%d cached)", len(todo), len(cifs) - len(todo)
        )
        t0 = time.perf_counter()
        for start in range(0, len(todo), batch_size):
            chunk = todo[start : start + batch_size]
            structures = []
            for key, i in chunk:
                try:
                    with warnings.catch_warnings():  # pymatgen's "coordinates rounded" note
                        warnings.filterwarnings("ignore", "Issues encountered while parsing CIF")
                        structures.append(Structure.from_str(cifs[i], fmt="cif"))
                except Exception as exc:  # noqa: BLE001 - pymatgen raises many kinds
                    raise DataError(
                        f"structure {i} (CIF sha256 {key[:12]}): unreadable: {exc}"
                    ) from exc
            out = model.predict_structure(
                structures, task="e", return_crystal_feas=True, batch_size=batch_size
            )
            outs = out if isinstance(out, list) else [out]
            lines = []
            for (key, _), pred in zip(chunk, outs, strict=True):
                fea = [float(v) for v in pred["crystal_fea"]]
                rows[key] = fea
                lines.append(json.dumps({"sha256": key, "fea": fea}))
            with path.open("a+b") as fh:  # one write per batch: a kill loses at most this batch
                cut = fh.tell() > 0 and (fh.seek(-1, 2), fh.read(1))[1] != b"\n"
                fh.write((("\n" if cut else "") + "\n".join(lines) + "\n").encode())
            if progress is not None:
                progress(min(start + batch_size, len(todo)), len(todo))
        logger.info("CHGNet features: %d structures in %.0f s", len(todo), time.perf_counter() - t0)
    return torch.tensor([rows[k] for k in keys], dtype=torch.float64).reshape(
        len(keys), CHGNET_DIMS
    )


def chgnet_block_features(
    cifs: Sequence[str], n_rows: int, *, cache_dir: Path | None = None
) -> Tensor:
    """``n_rows x 64`` block: the pool's CHGNet features standardised on the pool, then
    zero rows for the ``n_rows - len(cifs)`` prior rows (which the member never fits on)."""
    digest = hashlib.sha256(f"{n_rows}\0".encode())
    for c in cifs:
        digest.update(hashlib.sha256(c.encode()).digest())
    memo = digest.hexdigest()
    if memo not in _MEMO:

        def shown(done: int, total: int) -> None:
            label = "CHGNet crystal features"
            _phase.debug(label, extra={"phase": label, "done": done, "total": total})

        fea = chgnet_features(cifs, cache_dir=cache_dir, progress=shown)
        scaled = (fea - fea.mean(0)) / fea.std(0).clamp_min(1e-9) if len(cifs) > 1 else fea
        block = torch.zeros(n_rows, CHGNET_DIMS, dtype=torch.float64)
        block[: len(cifs)] = scaled
        _MEMO[memo] = block
    return _MEMO[memo]


class ChgnetGPSurrogate(BlockGPSurrogate):
    """The block GP over composition descriptors and CHGNet crystal features
    (``surrogate.kind: gp_chgnet``); fits on pool rows only (prior rows have no structure)."""

    name = "gp_chgnet"

    def fit(self, train_idx: Tensor, train_y: Tensor) -> dict[str, float]:
        own = train_idx < self.n_pool
        return super().fit(train_idx[own], train_y[own])


class TransferChgnetGPSurrogate(ChgnetGPSurrogate):
    """Composition, transferred property predictions (:mod:`loop.transfer`) and CHGNet crystal
    features, one scaled ARD kernel each, added (``surrogate.kind: gp_transfer_chgnet``): the
    fit's outputscales decide which block carries the signal."""

    name = "gp_transfer_chgnet"


def main(argv: list[str] | None = None) -> int:
    """Featurise a registry dataset's structures from the command line (progress on stderr)."""
    import argparse
    import sys

    from cloud_model.datasets import load_dataset

    parser = argparse.ArgumentParser(prog="python -m loop.chgnet_block")
    parser.add_argument("dataset")
    parser.add_argument("--splits", nargs="*", default=None)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    records = load_dataset(args.dataset, args.splits).records
    cifs = [r.cif for r in records if r.cif]
    t0 = time.perf_counter()

    def show(done: int, total: int) -> None:
        sys.stderr.write(f"\r{done}/{total} ({time.perf_counter() - t0:.0f} s)")

    fea = chgnet_features(cifs, batch_size=args.batch_size, progress=show)
    sys.stderr.write(f"\n{fea.shape[0]} structures in {time.perf_counter() - t0:.0f} s\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
