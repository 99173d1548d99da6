"""The lab server's limits over a real socket: body size (413), field sizes and keys (422), 405."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from adapters.protocol import MAX_BODY_BYTES, MAX_FIELD_CHARS, MAX_PARAMETERS_BYTES
from simulators.config import SimulatedLabConfig
from simulators.ground_truth import GroundTruth

from .conftest import UNITS
from .lab_server import TOKEN, TOKEN_ENV, free_port, launch, start_server

HEADERS = {"Authorization": f"Bearer {TOKEN}"}


def _body(candidate: str, key: str, **request: object) -> dict[str, object]:
    return {
        "request": {"candidate_id": candidate, "targets": ["heat_ref"], **request},
        "idempotency_key": key,
    }


def _jobs(url: str) -> int:
    page = httpx.get(f"{url}/v1/jobs", headers=HEADERS, timeout=10)
    assert page.status_code == 200, page.text
    return int(page.json()["total"])


def _state_bytes(state: Path) -> int:
    return sum(p.stat().st_size for p in state.rglob("*") if p.is_file())


def _chunks(total: int, size: int = 64 * 1024) -> Iterator[bytes]:
    yield b'{"request": {"candidate_id": "x", "targets": ["heat_ref"], "formula": "'
    for _ in range(total // size):
        yield b"A" * size
    yield b'"}, "idempotency_key": "chunked"}'


def test_oversized_bodies_and_fields_are_refused_and_never_stored(
    tmp_path: Path, perov_truth: dict[str, dict[str, float]]
) -> None:
    truth = GroundTruth(units=UNITS, values=perov_truth)
    config = SimulatedLabConfig(latency={"mean_s": 1e9})  # type: ignore[arg-type]
    state = tmp_path / "state"
    server = start_server(tmp_path, truth, config, state_dir=state)
    cid = sorted(perov_truth)[0]
    url = f"{server.url}/v1/jobs"
    try:
        empty_state = _state_bytes(state)
        # a 50 MB body: refused from its Content-Length, without reading it
        huge = httpx.post(url, json=_body(cid, "huge", structure_cif="A" * 50_000_000),
                          headers=HEADERS, timeout=60)  # fmt: skip
        assert huge.status_code == 413, huge.text
        assert huge.json()["code"] == "body_too_large"
        assert f"limit of {MAX_BODY_BYTES:,} bytes" in huge.json()["message"]
        # a chunked body (no Content-Length) is cut off once it passes the limit
        chunked = httpx.post(url, content=_chunks(2 * MAX_BODY_BYTES), timeout=60,
                             headers={**HEADERS, "content-type": "application/json"})  # fmt: skip
        assert chunked.status_code == 413 and chunked.json()["code"] == "body_too_large"
        # fields over their limits, inside a body under the body limit: 422 naming the limit
        cif_limit = MAX_FIELD_CHARS["structure_cif"]
        too_long = {
            "structure_cif": (
                "A" * (cif_limit + 1),
                f"structure_cif has {cif_limit + 1} characters, more than the limit of {cif_limit}",
            ),  # fmt: skip
            "scope": (
                "S" * 70_000,
                f"scope has 70000 characters, more than the limit of {MAX_FIELD_CHARS['scope']}",
            ),  # fmt: skip
            "parameters": (
                {"x": "p" * MAX_PARAMETERS_BYTES},
                f"more than the limit of {MAX_PARAMETERS_BYTES}",
            ),  # fmt: skip
        }
        for field, (value, message) in too_long.items():
            answer = httpx.post(
                url, json=_body(cid, f"long-{field}", **{field: value}), headers=HEADERS
            )
            assert answer.status_code == 422, (field, answer.text)
            assert (
                answer.json()["code"] == "invalid_request" and message in answer.json()["message"]
            )
        long_key = httpx.post(url, json=_body(cid, "k" * 257), headers=HEADERS)
        assert (
            long_key.status_code == 422 and "at most 256 characters" in long_key.json()["message"]
        )
        # keys that are blank or hold control characters
        for key, message in [("   ", "only whitespace"), ("\t\n", "only whitespace"),
                             ("a\x00b", "control character U+0000 at position 1"),
                             ("key\n", "control character U+000A at position 3"),
                             ("k\x1b[31m", "control character U+001B")]:  # fmt: skip
            answer = httpx.post(url, json=_body(cid, key), headers=HEADERS)
            assert answer.status_code == 422, (key, answer.text)
            assert message in answer.json()["message"]
        # unparseable bodies get 422, as documented (not FastAPI's 400)
        for raw in (b"{not json", b"\xff\xfe\x00", b"[" * 100_000):
            answer = httpx.post(
                url, content=raw, headers={**HEADERS, "content-type": "application/json"}
            )
            assert answer.status_code == 422, (raw[:10], answer.text)
            assert answer.json()["code"] == "invalid_request"
        assert (
            "not valid JSON at character 1"
            in httpx.post(
                url, content=b"{not json", headers={**HEADERS, "content-type": "application/json"}
            ).json()["message"]
        )
        # 405 names every method the path serves
        for method, path, allow in [("DELETE", "/v1/jobs", "GET, POST"), ("PUT", "/v1/jobs/x", "GET"),
                                    ("GET", "/v1/jobs/x/cancel", "POST"), ("POST", "/v1/health", "GET")]:  # fmt: skip
            answer = httpx.request(method, f"{server.url}{path}", headers=HEADERS)
            assert answer.status_code == 405 and answer.headers["allow"] == allow, (method, path)
            assert answer.json()["code"] == "method_not_allowed"
        # nothing was stored; a normal request still works
        assert _jobs(server.url) == 0
        assert _state_bytes(state) - empty_state < 64 * 1024
        ok = httpx.post(url, json=_body(cid, "fine", structure_cif="A" * 100_000), headers=HEADERS)
        assert ok.status_code == 201, ok.text
    finally:
        server.stop()
    # the limit is configurable, and a restart replays only the accepted job
    port = free_port()
    cmd = [sys.executable, "-m", "simulators.server", "--truth", str(tmp_path / "truth.json"),
           "--config", str(tmp_path / "lab.json"), "--port", str(port), "--token-env", TOKEN_ENV,
           "--log-level", "warning", "--state-dir", str(state), "--max-body-bytes", "4096"]  # fmt: skip
    small = launch(cmd, port, tmp_path)
    try:
        assert _jobs(small.url) == 1
        refused = httpx.post(f"{small.url}/v1/jobs", json=_body(cid, "mid", formula="F" * 900 * 5),
                             headers=HEADERS)  # fmt: skip
        assert refused.status_code == 413 and "limit of 4,096 bytes" in refused.json()["message"]
        fits = httpx.post(f"{small.url}/v1/jobs", json=_body(cid, "small"), headers=HEADERS)
        assert fits.status_code == 201 and _jobs(small.url) == 2
    finally:
        small.stop()


@pytest.mark.parametrize("limit", [0, -5])
def test_a_non_positive_body_limit_is_a_config_error(limit: int) -> None:
    from cloud_model.errors import ConfigError
    from simulators.lab import SimulatedLab
    from simulators.server import create_app

    lab = SimulatedLab({"a": {"y": 0.0}}, {"y": "eV"}, SimulatedLabConfig())
    with pytest.raises(ConfigError, match="max_body_bytes must be positive"):
        create_app(lab, token="t", max_body_bytes=limit)
