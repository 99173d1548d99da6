"""Schemathesis against the real lab server: generated requests, no 5xx, responses as documented.

The committed OpenAPI document (docs/openapi.json, kept equal to the generated one by
test_server.py) drives the generation: valid and invalid bodies, queries and path
parameters for every operation, sent with the bearer token to a server process on
loopback. Every response must not be a server error, must have a documented status
code and content type, and its body must match the schema of that status. Random ids
mostly meet 404 and 422, so half of the valid cases are pointed at the lab's real
candidates and at jobs submitted beforehand: the success paths are checked too.
"""

from __future__ import annotations

import zlib
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.core.result import Ok

from simulators.config import SimulatedLabConfig
from simulators.ground_truth import GroundTruth

from .lab_server import REPO, TOKEN, LabServer, start_server

SCHEMA = schemathesis.openapi.from_path(REPO / "docs" / "openapi.json")
CHECKS = [
    schemathesis.checks.not_a_server_error,
    schemathesis.checks.status_code_conformance,
    schemathesis.checks.content_type_conformance,
    schemathesis.checks.response_schema_conformance,
]
CANDIDATES = ("mp-0", "mp-1", "mp-2")
TARGETS = ("band_gap", "heat_ref")
AUTH = {"Authorization": f"Bearer {TOKEN}"}
STATUSES: Counter[tuple[str, int]] = Counter()  # (operation, status) of every request sent


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LabServer, list[str]]]:
    """A server on a three-candidate lab with instant jobs, and the ids of three jobs on it."""
    workdir: Path = tmp_path_factory.mktemp("schema-lab")
    truth = GroundTruth(
        units={"band_gap": "eV", "heat_ref": "eV"},
        values={c: {"band_gap": 0.5 * i, "heat_ref": -0.1 * i} for i, c in enumerate(CANDIDATES)},
    )
    server = start_server(workdir, truth, SimulatedLabConfig(capacity=2))
    job_ids = []
    for candidate in CANDIDATES:
        body = {"request": {"candidate_id": candidate, "targets": list(TARGETS)},
                "idempotency_key": f"seed-{candidate}"}  # fmt: skip
        answer = httpx.post(f"{server.url}/v1/jobs", json=body, headers=AUTH, timeout=10)
        assert answer.status_code == 201, answer.text
        job_ids.append(answer.json()["job_id"])
    yield server, job_ids
    server.stop()
    assert "Traceback" not in server.log.read_text(), server.log.read_text()[-2000:]


def _steer(case: schemathesis.Case, job_ids: list[str]) -> None:
    """Point half of the valid cases (chosen by a hash of the case) at real candidates and jobs."""
    meta = case.meta
    if meta is None or meta.generation.mode is not schemathesis.GenerationMode.POSITIVE:
        return
    pick = zlib.crc32(repr((case.path_parameters, case.query, case.body)).encode())
    if pick % 2 == 0:
        return
    if case.path_parameters and "job_id" in case.path_parameters:
        case.path_parameters["job_id"] = job_ids[pick % len(job_ids)]
    request = case.body.get("request") if isinstance(case.body, dict) else None
    if isinstance(request, dict):
        request["candidate_id"] = CANDIDATES[pick % len(CANDIDATES)]
        request["targets"] = list(TARGETS[: 1 + pick % len(TARGETS)])


@SCHEMA.parametrize()
@settings(
    max_examples=25,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
def test_every_operation_answers_as_documented(
    case: schemathesis.Case, lab: tuple[LabServer, list[str]]
) -> None:
    server, job_ids = lab
    _steer(case, job_ids)
    response = case.call_and_validate(base_url=server.url, headers=AUTH, checks=CHECKS, timeout=10)
    STATUSES[case.operation.label, response.status_code] += 1


def test_the_success_paths_were_reached() -> None:
    """The run above got 2xx answers from every operation, not only errors (runs after it)."""
    if not STATUSES:
        pytest.skip("run together with test_every_operation_answers_as_documented")
    print(f"{sum(STATUSES.values())} requests:", dict(sorted(STATUSES.items())))
    reached = {label for (label, status), n in STATUSES.items() if 200 <= status < 300}
    operations = {op.ok().label for op in SCHEMA.get_all_operations() if isinstance(op, Ok)}
    assert reached == operations and len(operations) == 6, STATUSES
