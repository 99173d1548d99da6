"""The lab's API description is public; everything that touches jobs needs the token.

Decision (docs/lab_protocol.md, "Authentication"): ``GET /v1/openapi.json`` and
``GET /v1/docs`` answer without a token, like ``/v1/health``. The document is the
protocol itself, the same one committed as ``docs/openapi.json``: it holds no job,
result, truth value or lab setting, and tools (a client generator, schemathesis, a
browser on the docs page) need it before they hold a token.
"""

from __future__ import annotations

from pathlib import Path

import httpx

from simulators.config import SimulatedLabConfig
from simulators.ground_truth import GroundTruth
from simulators.server import openapi_document
from tests.simulators.lab_server import TOKEN, start_server

from .conftest import UNITS


def test_docs_and_openapi_are_public_jobs_are_not(
    tmp_path: Path, perov_truth: dict[str, dict[str, float]]
) -> None:
    truth = GroundTruth(units=UNITS, values=perov_truth, source="perov_5 val")
    server = start_server(tmp_path, truth, SimulatedLabConfig(capacity=2))
    try:
        with httpx.Client(base_url=server.url, timeout=10.0) as client:
            document = client.get("/v1/openapi.json")
            assert document.status_code == 200
            assert document.json() == openapi_document()  # the protocol, nothing of this lab
            assert "perov" not in document.text and next(iter(perov_truth)) not in document.text
            page = client.get("/v1/docs")
            assert page.status_code == 200 and "text/html" in page.headers["content-type"]
            assert "/v1/openapi.json" in page.text
            assert client.get("/v1/health").status_code == 200
            for method, path in [("GET", "/v1/jobs"), ("GET", "/v1/jobs/x"),
                                 ("GET", "/v1/jobs/x/result"), ("POST", "/v1/jobs/x/cancel")]:  # fmt: skip
                refused = client.request(method, path)
                assert refused.status_code == 401, (method, path)
                assert refused.headers["www-authenticate"] == "Bearer"
            wrong = client.get("/v1/jobs", headers={"Authorization": "Bearer nope"})
            assert wrong.status_code == 401
            ok = client.get("/v1/jobs", headers={"Authorization": f"Bearer {TOKEN}"})
            assert ok.status_code == 200 and ok.json()["total"] == 0
    finally:
        server.stop()
