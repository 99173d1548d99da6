"""Server-side pieces: the committed OpenAPI document, persistence, fault schedules, CLI helpers."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from adapters.base import ExperimentRequest, JobState
from cloud_model.errors import ConfigError
from loop.cli import app
from loop.cli.lab import build_config, build_truth
from simulators.config import SimulatedLabConfig
from simulators.faults import Fault, parse_faults
from simulators.ground_truth import GroundTruth
from simulators.journal import open_lab
from simulators.server import openapi_document

from .conftest import UNITS

REPO = Path(__file__).resolve().parents[2]


def test_committed_openapi_document_is_the_generated_one(tmp_path: Path) -> None:
    generated = openapi_document()
    assert json.loads((REPO / "docs" / "openapi.json").read_text()) == generated, (
        "docs/openapi.json is stale: run `cloudlab lab openapi --out docs/openapi.json`"
    )
    paths = generated["paths"]
    assert set(paths) == {"/v1/health", "/v1/jobs", "/v1/jobs/{job_id}", "/v1/jobs/{job_id}/result",
                          "/v1/jobs/{job_id}/cancel"}  # fmt: skip
    assert set(paths["/v1/jobs"]["post"]["responses"]) >= {"200", "201", "401", "422"}
    assert "security" not in paths["/v1/health"]["get"] and paths["/v1/jobs"]["get"]["security"]
    out = tmp_path / "openapi.json"
    result = CliRunner().invoke(app, ["lab", "openapi", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert json.loads(out.read_text()) == generated


def test_state_dir_replays_jobs_and_refuses_another_lab(
    tmp_path: Path, perov_truth: dict[str, dict[str, float]]
) -> None:
    truth = GroundTruth(units=UNITS, values=perov_truth)
    config = SimulatedLabConfig(capacity=2, noise={"sigma": 0.1}, latency={"mean_s": 1e9})  # type: ignore[arg-type]
    cids = sorted(perov_truth)[:5]
    with open_lab(truth, config, tmp_path) as lab:
        handles = [
            lab.submit(ExperimentRequest(candidate_id=c, targets=("heat_ref",)), f"k-{c}")
            for c in cids
        ]
        lab.cancel(handles[2])
        before = [lab.poll(h).state for h in handles]
    assert before == [JobState.RUNNING] * 2 + [JobState.CANCELLED] + [JobState.QUEUED] * 2
    time.sleep(0.01)
    with open_lab(truth, config, tmp_path) as reopened:
        assert [reopened.find(f"k-{c}") for c in cids] == handles
        assert [reopened.poll(h).state for h in handles] == before
        again = reopened.submit(
            ExperimentRequest(candidate_id=cids[0], targets=("heat_ref",)), f"k-{cids[0]}"
        )
        assert again == handles[0] and sum(reopened.counts().values()) == 5
    with pytest.raises(ConfigError, match="another configuration"):
        open_lab(truth, config.model_copy(update={"seed": 1}), tmp_path)
    other = GroundTruth(units=UNITS, values={c: perov_truth[c] for c in cids})
    with pytest.raises(ConfigError, match="another ground truth"):
        open_lab(other, config, tmp_path)


def test_fault_schedules_parse() -> None:
    assert parse_faults(" 503*2, ok,delay:0.5,drop ,malformed,invalid") == [
        Fault("status", status=503), Fault("status", status=503), Fault("ok"),
        Fault("delay", delay_s=0.5), Fault("drop"), Fault("malformed"), Fault("invalid"),
    ]  # fmt: skip
    assert parse_faults("") == []
    for bad in ("teapot", "200", "delay:x", "503*two"):
        with pytest.raises(ConfigError, match="not understood"):
            parse_faults(bad)


def test_cli_builds_config_and_truth(tmp_path: Path, data_dir: Path) -> None:
    path = tmp_path / "lab.yaml"
    path.write_text(
        "capacity: 3\nlatency: {distribution: lognormal, mean_s: 600}\nnoise: {sigma: 0.2}\n"
    )
    config = build_config(path, {"latency.mean_s": 60.0, "noise.relative": 0.1, "noise.kind": "heteroscedastic",
                                 "seed": None})  # fmt: skip
    assert (
        config.capacity == 3
        and config.latency.distribution == "lognormal"
        and config.latency.mean_s == 60.0
    )
    assert config.noise.kind == "heteroscedastic" and config.noise.sigma == 0.2 and config.seed == 0
    with pytest.raises(ConfigError, match="invalid simulated-lab config"):
        build_config(None, {"failure.probability": 1.5})
    truth = build_truth("perov_5", ["dir_gap"], ["val"])
    assert truth.units == {"dir_gap": "eV"} and len(truth.values) == 3787
    with pytest.raises(ConfigError, match="no target \\['band_gap'\\]"):
        build_truth("perov_5", ["band_gap"])
