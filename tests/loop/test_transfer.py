"""Transfer features from a real formula label set (MP shear moduli), with the leakage guard."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch

from loop.config import parse_config
from loop.features import composition_from_scope
from loop.gp_blocks import TransferGPSurrogate
from loop.surrogate import build_surrogate
from loop.transfer import TransferReport, transfer_features
from tests.loop.cv_data import cv_scopes


def _scopes(data_dir: Path, n: int = 60) -> list[str]:
    return cv_scopes(data_dir, n)[0]


def test_transfer_drops_every_row_of_a_campaign_formula_and_caches(
    data_dir: Path, tmp_path: Path
) -> None:
    from pymatgen.core import Composition

    comps = [{"Si": 1.0, "O": 2.0}, {"Pb": 1.0, "Te": 1.0}, {"C": 1.0}, {"Na": 1.0, "Cl": 1.0}]
    source = list(csv.DictReader((data_dir / "crabnet" / "matbench" / "log10_gvrh.csv").open()))
    pool_formulas = {Composition(c).reduced_formula for c in comps}
    in_source = sum(Composition(r["formula"]).reduced_formula in pool_formulas for r in source)
    assert in_source > 0  # the guard has something to do here
    report = TransferReport()
    feats = transfer_features(comps, sets=["crabnet_log10_gvrh"], cache_dir=tmp_path, report=report)
    assert report.dropped == {"crabnet_log10_gvrh": in_source}
    assert report.trained["crabnet_log10_gvrh"] + in_source == len(source)
    assert feats.shape == (4, 1)
    # standardised over the rows; diamond is far stiffer than PbTe and NaCl
    assert abs(float(feats.mean())) < 1e-9
    c, pbte, nacl = float(feats[2, 0]), float(feats[1, 0]), float(feats[3, 0])
    assert c > pbte and c > nacl
    cached = list(tmp_path.glob("crabnet_log10_gvrh-*.safetensors"))
    assert len(cached) == 1
    again = transfer_features(comps, sets=["crabnet_log10_gvrh"], cache_dir=tmp_path)
    assert torch.equal(again, feats) and list(tmp_path.glob("*.safetensors")) == cached
    # another exclusion set is another model: never served from the guarded cache entry
    transfer_features(comps, sets=["crabnet_log10_gvrh"], cache_dir=tmp_path, exclude=set())
    assert len(list(tmp_path.glob("*.safetensors"))) == 2


def test_transfer_refuses_a_set_without_formula_labels(tmp_path: Path) -> None:
    from cloud_model.errors import DataError

    with pytest.raises(DataError, match="formula set"):
        transfer_features([{"C": 1.0}], sets=["perov_5"], cache_dir=tmp_path)


def test_gp_transfer_fits_both_blocks_and_round_trips(data_dir: Path, tmp_path: Path) -> None:
    scopes = _scopes(data_dir)
    config = parse_config(
        {
            "name": "t",
            "pool": {"file": "x.csv", "structure_format": "scope"},
            "objective": {"target": "g", "sense": "minimize"},
            "surrogate": {"kind": "gp_transfer", "transfer_sets": ["crabnet_log10_gvrh"]},
        }
    )
    gp = build_surrogate(config, scopes, len(scopes))
    assert isinstance(gp, TransferGPSurrogate) and gp.name == "gp_transfer"
    moved = gp.features[:, gp.blocks[1][0] :]
    assert moved.shape == (60, 1)
    # a property that follows the transferred one: the transfer block must carry it
    target = 2.0 * moved + 0.1 * torch.randn(60, 1, generator=torch.Generator().manual_seed(0))
    train = torch.arange(0, 60, 2)
    gp.fit(train, target[train].double())
    composition_w, transfer_w = gp.block_weights()
    assert transfer_w > composition_w
    mean, _ = gp.mean_std(torch.arange(1, 60, 2))
    test = target[1::2]
    assert float((mean - test).abs().mean()) < 0.5 * float((test - test.mean()).abs().mean())
    gp.save(tmp_path / "v1")
    restored = build_surrogate(config, scopes, len(scopes))
    restored.load(tmp_path / "v1")
    m2, _ = restored.mean_std(torch.arange(1, 60, 2))
    assert torch.allclose(mean, m2, atol=1e-9)
    assert composition_from_scope(scopes[0])  # the compositions the block was built from


def test_a_wrong_transfer_set_fails_before_anything_is_created(tmp_path: Path) -> None:
    import yaml

    from cloud_model.errors import CloudlabError
    from loop.campaign import Campaign

    repo = Path(__file__).resolve().parents[2]
    data = yaml.safe_load((repo / "configs" / "perovskite_water_splitting.yaml").read_text())
    for bad, message in (("crabnet_nope", "crabnet_nope"), ("perov_5", "is a cif dataset")):
        data["surrogate"]["transfer_sets"] = [bad]
        with pytest.raises(CloudlabError, match=message):
            Campaign(parse_config(data), tmp_path / "run").prepare()
        assert not (tmp_path / "run").exists()
