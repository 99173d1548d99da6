"""The HTTP orchestrator client against the real simulated-lab server on loopback.

Servers run in subprocesses (``python -m simulators.server`` and ``cloudlab lab
serve``); faults are injected by the server's test-only fault schedule over a
real socket; ``httpx.MockTransport`` covers exact answers a healthy server never gives.
"""

from __future__ import annotations

import json
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from pydantic import ValidationError

from adapters.base import (
    AuthError,
    ExperimentRequest,
    JobHandle,
    JobNotFoundError,
    JobState,
    PermanentAdapterError,
    ResultNotReadyError,
    TransientAdapterError,
)
from adapters.http_lab import HttpLabAdapter, HttpLabConfig, LabUnreachableError
from cloud_model.datasets import load_dataset
from simulators.clock import VirtualClock
from simulators.config import SimulatedLabConfig
from simulators.ground_truth import GroundTruth
from simulators.lab import SimulatedLab
from tests.simulators.lab_server import TOKEN, TOKEN_ENV, LabServer, free_port, launch, start_server

UNITS = {"heat_ref": "eV", "dir_gap": "eV"}


@pytest.fixture(scope="module")
def truth(data_dir: Path) -> GroundTruth:
    records = load_dataset("perov_5", ["val"]).records[:300]
    return GroundTruth.from_rows(((r.id, r.targets) for r in records), UNITS, source="perov_5/val")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, truth: GroundTruth) -> Iterator[LabServer]:
    config = SimulatedLabConfig(
        seed=3,
        capacity=4,
        noise={"sigma": 0.05},  # type: ignore[arg-type]
        latency={"distribution": "lognormal", "mean_s": 300.0},  # type: ignore[arg-type]
        time_acceleration=3000.0,  # 0.1 s of wall time per experiment on average
    )
    running = start_server(tmp_path_factory.mktemp("lab"), truth, config)
    yield running
    running.stop()


def _client(
    url: str, monkeypatch: pytest.MonkeyPatch, token: str = TOKEN, **overrides: object
) -> HttpLabAdapter:
    monkeypatch.setenv(TOKEN_ENV, token)
    settings = {
        "base_url": url,
        "token_env": TOKEN_ENV,
        "backoff_initial_s": 0.05,
        "max_attempts": 3,
    }
    return HttpLabAdapter(HttpLabConfig.model_validate({**settings, **overrides}))


def _request(candidate: str, *targets: str) -> ExperimentRequest:
    return ExperimentRequest(candidate_id=candidate, targets=targets or ("heat_ref",))


def _wait_terminal(
    client: HttpLabAdapter, handles: list[JobHandle], timeout_s: float = 30.0
) -> list[JobState]:
    deadline = time.monotonic() + timeout_s
    while True:
        states = [client.poll(h).state for h in handles]
        if all(s.is_terminal for s in states) or time.monotonic() > deadline:
            return states
        time.sleep(0.05)


def test_happy_path_submit_poll_result(
    server: LabServer, truth: GroundTruth, monkeypatch: pytest.MonkeyPatch
) -> None:
    with _client(server.url, monkeypatch) as client:
        assert client.health().capacity == 4
        cids = sorted(truth.values)[:8]
        handles = [client.submit(_request(c, "heat_ref", "dir_gap"), f"happy-{c}") for c in cids]
        assert [h.candidate_id for h in handles] == cids and all(
            h.adapter == "http-lab" for h in handles
        )
        assert _wait_terminal(client, handles) == [JobState.SUCCEEDED] * 8
        for cid, handle in zip(cids, handles, strict=True):
            measurement = client.result(handle)
            assert measurement.job_id == handle.job_id and measurement.cost == 1.0
            for target in ("heat_ref", "dir_gap"):
                value = measurement.values[target]
                assert value.unit == "eV" and value.uncertainty == pytest.approx(0.05)
                assert abs(value.value - truth.values[cid][target]) < 5 * 0.05
        assert {j.job_id for j in client.list_jobs(JobState.SUCCEEDED)} >= {
            h.job_id for h in handles
        }


def test_duplicate_submit_returns_the_same_job(
    server: LabServer, truth: GroundTruth, monkeypatch: pytest.MonkeyPatch
) -> None:
    cid, other = sorted(truth.values)[20:22]
    with _client(server.url, monkeypatch) as client:
        first = client.submit(_request(cid), "dup-key")
        assert client.submit(_request(cid), "dup-key").job_id == first.job_id
        assert client.find("dup-key") == first and client.find("never-used") is None
        with pytest.raises(PermanentAdapterError, match="different request"):
            client.submit(_request(other), "dup-key")
    body = {"request": _request(cid).model_dump(mode="json"), "idempotency_key": "dup-key"}
    headers = {"Authorization": f"Bearer {TOKEN}"}
    again = httpx.post(f"{server.url}/v1/jobs", json=body, headers=headers)
    assert again.status_code == 200 and again.json()["job_id"] == first.job_id
    fresh = httpx.post(
        f"{server.url}/v1/jobs", json={**body, "idempotency_key": "dup-key-2"}, headers=headers
    )
    assert fresh.status_code == 201 and fresh.json()["job_id"] != first.job_id
    page = httpx.get(
        f"{server.url}/v1/jobs", params={"idempotency_key": "dup-key"}, headers=headers
    ).json()
    assert page["total"] == 1


def test_auth_errors_are_clear(
    server: LabServer, truth: GroundTruth, monkeypatch: pytest.MonkeyPatch
) -> None:
    with _client(server.url, monkeypatch, token="wrong-token") as client:
        assert client.health().status == "ok"  # health needs no token
        with pytest.raises(AuthError, match=f"HTTP 401.*wrong bearer token.*{TOKEN_ENV}"):
            client.submit(_request(next(iter(truth.values))), "auth-key")
    missing = httpx.get(f"{server.url}/v1/jobs")
    assert missing.status_code == 401 and missing.headers["www-authenticate"] == "Bearer"
    assert (
        missing.json()["code"] == "unauthorized"
        and "missing bearer token" in missing.json()["message"]
    )
    monkeypatch.delenv(TOKEN_ENV)
    with pytest.raises(AuthError, match=f"environment variable {TOKEN_ENV} is not set"):
        HttpLabAdapter(HttpLabConfig(base_url=server.url, token_env=TOKEN_ENV))


def test_refusals_are_permanent(
    server: LabServer, truth: GroundTruth, monkeypatch: pytest.MonkeyPatch
) -> None:
    with _client(server.url, monkeypatch) as client:
        started = time.monotonic()
        with pytest.raises(
            PermanentAdapterError, match="HTTP 422.*unknown candidate 'no-such-crystal'"
        ):
            client.submit(_request("no-such-crystal"), "bad-candidate")
        with pytest.raises(PermanentAdapterError, match="unknown target 'band_gap'"):
            client.submit(_request(next(iter(truth.values)), "band_gap"), "bad-target")
        ghost = JobHandle(
            adapter="http-lab", job_id="sim-ghost", idempotency_key="g", candidate_id="x"
        )
        with pytest.raises(JobNotFoundError, match="sim-ghost"):
            client.poll(ghost)
        assert time.monotonic() - started < 2.0  # refusals are not retried
    bad = httpx.post(
        f"{server.url}/v1/jobs",
        json={"idempotency_key": ""},
        headers={"Authorization": f"Bearer {TOKEN}"},
    )
    assert bad.status_code == 422 and bad.json()["code"] == "invalid_request"
    assert "body.request: Field required" in bad.json()["message"]


def test_server_restart_mid_campaign(
    tmp_path: Path,
    truth: GroundTruth,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    config = SimulatedLabConfig(
        seed=11,
        capacity=2,
        noise={"sigma": 0.05},  # type: ignore[arg-type]
        failure={"probability": 0.25},  # type: ignore[arg-type]
        latency={"mean_s": 1800.0},  # type: ignore[arg-type]
        time_acceleration=3600.0,  # 0.5 s of wall time per experiment
    )
    state, port = tmp_path / "state", free_port()
    first = start_server(tmp_path, truth, config, state_dir=state, port=port)
    cids = sorted(truth.values)[40:46]
    client = _client(first.url, monkeypatch, max_attempts=14, backoff_initial_s=0.2, backoff_multiplier=1.5,
                     backoff_max_s=5.0)  # fmt: skip
    handles = [client.submit(_request(c), f"restart-{c}") for c in cids]
    assert client.cancel(handles[-1]).state is JobState.CANCELLED  # still queued behind 4 others
    first.stop(crash=True)

    restarted: list[LabServer] = []

    def restart() -> None:
        time.sleep(0.5)
        restarted.append(
            start_server(tmp_path, truth, config, state_dir=state, port=port, wait=False)
        )

    thread = threading.Thread(target=restart)
    thread.start()
    try:
        client.poll(handles[0])  # retried through the outage until the restarted server answers
        thread.join()
        assert "connection failed (ConnectError" in caplog.text
        # the restarted server knows every job: resubmitting reconciles, never duplicates
        assert [client.submit(_request(c), f"restart-{c}") for c in cids] == handles
        assert len(list(client.list_jobs())) == 6
        states = _wait_terminal(client, handles)
        outcomes = [(client.poll(h).message, client.result(h).values if s is JobState.SUCCEEDED else None)
                    for h, s in zip(handles, states, strict=True)]  # fmt: skip
    finally:
        thread.join()
        client.close()
        for running in restarted:
            running.stop()
    # every outcome equals an in-process replica's: draws depend on (seed, key) only
    replica_clock = VirtualClock()
    replica = SimulatedLab(truth.values, truth.units, config, clock=replica_clock)
    replica_handles = [replica.submit(_request(c), f"restart-{c}") for c in cids]
    replica.cancel(replica_handles[-1])
    replica_clock.advance(1e5)
    assert states[-1] is JobState.CANCELLED and JobState.SUCCEEDED in states
    for handle, expected, final, (message, values) in zip(
        handles, replica_handles, states, outcomes, strict=True
    ):
        assert handle.job_id == expected.job_id
        assert final is replica.poll(expected).state and message == replica.poll(expected).message
        if final is JobState.SUCCEEDED:
            assert values == replica.result(expected).values


FAULTS = ",".join(
    [
        "503,502,ok",  # 1 submit: two 5xx, then served
        "drop,ok",  # 2 submit: job created, answer lost mid-body; the retry finds it
        "delay:1.5,ok",  # 3 submit: client times out (1 s); the retry creates, the late one finds it
        "malformed,ok",  # 4 poll: truncated JSON
        "invalid,ok",  # 5 result: JSON of the wrong schema
        "503*4",  # 6 poll: 5xx burst longer than the retries
        "malformed*4",  # 7 poll
        "drop*4",  # 8 poll
        "delay:1.5*4",  # 9 poll: timeouts
    ]
)


def test_faults_are_retried_then_reported(
    tmp_path: Path, truth: GroundTruth, monkeypatch: pytest.MonkeyPatch
) -> None:
    running = start_server(tmp_path, truth, SimulatedLabConfig(seed=5), faults=FAULTS)
    cids = sorted(truth.values)[60:63]
    try:
        with _client(
            running.url, monkeypatch, max_attempts=4, backoff_initial_s=0.02, backoff_multiplier=1.0,
            backoff_jitter=0.0, read_timeout_s=1.0,
        ) as client:  # fmt: skip
            h1, h2, h3 = (client.submit(_request(c), f"fault-{c}") for c in cids)
            assert client.poll(h1).state is JobState.SUCCEEDED
            assert client.result(h1).values["heat_ref"].value == truth.values[cids[0]]["heat_ref"]
            expected: list[tuple[Callable[[], object], str]] = [
                (
                    lambda: client.poll(h2),
                    r"after 4 attempts; last: HTTP 503: unavailable: injected fault",
                ),
                (
                    lambda: client.poll(h2),
                    r"after 4 attempts; last: HTTP 200 with an invalid JobResource body",
                ),
                (
                    lambda: client.poll(h2),
                    r"after 4 attempts; last: connection failed \(RemoteProtocolError",
                ),
                (
                    lambda: client.poll(h3),
                    r"after 4 attempts; last: timed out \(ReadTimeout; read timeout 1.0 s\)",
                ),
            ]
            for call, message in expected:
                with pytest.raises(TransientAdapterError, match=message):
                    call()
            time.sleep(0.6)  # let the last delayed request finish
            jobs = list(client.list_jobs())  # the schedule is used up: served normally
            assert sorted(j.idempotency_key for j in jobs) == sorted(f"fault-{c}" for c in cids)
            assert all(j.state is JobState.SUCCEEDED for j in jobs)
    finally:
        running.stop()
    log = running.log.read_text()
    assert log.count("injecting fault") == 2 + 1 + 1 + 1 + 1 + 4 + 4 + 4 + 4


def test_cli_serves_a_registry_dataset(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    record = load_dataset("perov_5", ["test"]).records[7]
    port = free_port()
    cmd = [sys.executable, "-m", "loop", "lab", "serve", "--dataset", "perov_5", "--target", "ind_gap",
           "--split", "test", "--port", str(port), "--token-env", TOKEN_ENV, "--capacity", "3",
           "--seed", "4", "--log-level", "warning"]  # fmt: skip
    running = launch(cmd, port, tmp_path)
    try:
        with _client(running.url, monkeypatch) as client:
            assert client.health().capacity == 3
            handle = client.submit(_request(record.id, "ind_gap"), "cli-key")
            assert _wait_terminal(client, [handle]) == [JobState.SUCCEEDED]
            value = client.result(handle).values["ind_gap"]
            assert (
                value.value == record.targets["ind_gap"] and value.uncertainty is None
            )  # no noise set
            with pytest.raises(PermanentAdapterError, match="unknown target 'heat_ref'"):
                client.submit(_request(record.id, "heat_ref"), "cli-key-2")
    finally:
        running.stop()


# ---------------------------------------------------------------- the probe before a campaign
def test_probe_passes_a_lab_and_refuses_a_wrong_token_or_url(
    server: LabServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    with _client(server.url, monkeypatch) as client:
        client.probe()  # answers, accepts the token: no error
    with _client(server.url, monkeypatch, token="wrong-token") as client:
        with pytest.raises(AuthError, match=f"jobs\\?limit=1.*HTTP 401.*\\${TOKEN_ENV}"):
            client.probe()
    with _client(server.url + "/v1", monkeypatch) as client:  # the /v1 belongs to the protocol
        with pytest.raises(PermanentAdapterError, match="HTTP 404.*no /v1") as refused:
            client.probe()
        assert not isinstance(refused.value, JobNotFoundError)


def test_probe_names_an_unreachable_lab_within_a_second(monkeypatch: pytest.MonkeyPatch) -> None:
    closed = f"http://127.0.0.1:{free_port()}"
    for url, cause in ((closed, "ConnectError"), ("http://lab.invalid:8080", "ConnectError")):
        with _client(url, monkeypatch, max_attempts=5, backoff_initial_s=1.0) as client:
            started = time.monotonic()
            with pytest.raises(LabUnreachableError) as unreachable:
                client.probe()
            assert time.monotonic() - started < 1.0  # one try, none of the 5 retries
        message = str(unreachable.value)
        assert message.startswith(f"lab at {url} is unreachable: GET {url}/v1/jobs?limit=1")
        assert cause in message and "check that the lab is running" in message
        assert isinstance(unreachable.value, TransientAdapterError | ConnectionError)


def test_probe_gives_up_on_a_silent_lab(monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as silent:  # accepts connections (the kernel does), never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(4)
        url = f"http://127.0.0.1:{silent.getsockname()[1]}"
        with _client(url, monkeypatch, read_timeout_s=0.5) as client:
            started = time.monotonic()
            with pytest.raises(LabUnreachableError, match=r"within 3 s to connect and 0.5 s"):
                client.probe()
            assert 0.5 <= time.monotonic() - started < 2.0


def test_probe_sorts_a_sick_lab_from_a_wrong_one(
    tmp_path: Path, truth: GroundTruth, monkeypatch: pytest.MonkeyPatch
) -> None:
    running = start_server(tmp_path, truth, SimulatedLabConfig(seed=5), faults="503,invalid,drop")
    try:
        with _client(running.url, monkeypatch) as client:
            with pytest.raises(LabUnreachableError, match="up but not serving.*HTTP 503"):
                client.probe()
            with pytest.raises(PermanentAdapterError, match="not a job page") as wrong:
                client.probe()
            assert not isinstance(wrong.value, TransientAdapterError)
            with pytest.raises(LabUnreachableError, match="RemoteProtocolError"):
                client.probe()
            client.probe()  # the schedule is used up
    finally:
        running.stop()


# ---------------------------------------------------------------- exact answers (MockTransport)
def _mock(
    handler: Callable[[httpx.Request], httpx.Response], monkeypatch: pytest.MonkeyPatch
) -> HttpLabAdapter:
    monkeypatch.setenv(TOKEN_ENV, TOKEN)
    config = HttpLabConfig(base_url="https://lab.example.org", token_env=TOKEN_ENV, max_attempts=3,
                           backoff_initial_s=0.0, backoff_jitter=0.0)  # fmt: skip
    return HttpLabAdapter(config, transport=httpx.MockTransport(handler))


_HANDLE = JobHandle(adapter="http-lab", job_id="j-1", idempotency_key="k", candidate_id="c")
_JOB = {"job_id": "j-1", "idempotency_key": "k", "candidate_id": "c", "state": "RUNNING",
        "submitted_at": "2025-01-01T00:00:00Z", "updated_at": "2025-01-01T00:00:01Z"}  # fmt: skip


def test_malformed_bodies_are_retried_then_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[httpx.Request] = []

    def html(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        return httpx.Response(
            200, text="<html>proxy login</html>", headers={"content-type": "text/html"}
        )

    with pytest.raises(
        TransientAdapterError, match="after 3 attempts.*invalid JobResource body.*Invalid JSON"
    ):
        _mock(html, monkeypatch).poll(_HANDLE)
    assert len(calls) == 3
    assert calls[0].headers["authorization"] == f"Bearer {TOKEN}"
    assert str(calls[0].url) == "https://lab.example.org/v1/jobs/j-1"


def test_status_codes_map_to_adapter_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    answers = iter([
        httpx.Response(429, json={"code": "unavailable", "message": "slow down"}, headers={"Retry-After": "0"}),
        httpx.Response(200, json=_JOB),
        httpx.Response(403, text="forbidden by proxy"),
        httpx.Response(409, json={"code": "result_not_ready", "message": "job j-1 is RUNNING"}),
        httpx.Response(400, json={"code": "invalid_request", "message": "nope"}),
        httpx.Response(200, json={**_JOB, "job_id": "j-2"}),
    ])  # fmt: skip
    client = _mock(lambda request: next(answers), monkeypatch)
    assert client.poll(_HANDLE).state is JobState.RUNNING  # 429 retried
    with pytest.raises(AuthError, match=f"HTTP 403: forbidden by proxy.*\\${TOKEN_ENV}"):
        client.poll(_HANDLE)
    with pytest.raises(ResultNotReadyError, match="RUNNING"):
        client.result(_HANDLE)
    with pytest.raises(PermanentAdapterError, match="HTTP 400: invalid_request: nope"):
        client.cancel(_HANDLE)
    with pytest.raises(PermanentAdapterError, match="about job 'j-2' when asked about 'j-1'"):
        client.poll(_HANDLE)


def test_config_is_validated() -> None:
    with pytest.raises(ValidationError, match="http"):
        HttpLabConfig(base_url="ftp://lab.example.org")
    with pytest.raises(ValidationError, match="extra"):
        HttpLabConfig.model_validate(
            {"base_url": "https://lab", "token": "inline-secrets-are-refused"}
        )
    config = HttpLabConfig(base_url="https://lab.example.org/")
    assert config.base_url == "https://lab.example.org" and config.verify_tls
    assert json.loads(config.model_dump_json())["token_env"] == "CLOUDLAB_LAB_TOKEN"
