"""The Bluesky queueserver adapter against a real Redis and a real RE Manager on loopback.

The RE Manager runs the reference profile collection (``adapters/queueserver_profile``):
ophyd simulated devices that read each candidate's values from a ground-truth table
written here, with per-candidate latency and failures.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydantic import ValidationError

from adapters.base import (
    AuthError,
    ExperimentRequest,
    JobHandle,
    JobState,
    PermanentAdapterError,
    ResultNotReadyError,
    TransientAdapterError,
)
from simulators.ground_truth import GroundTruth
from tests.adapters.queueserver_server import QueueServer, require_queueserver, start_queueserver

require_queueserver()

from adapters.queueserver import KEY_FIELD, QueueServerAdapter, QueueServerConfig  # noqa: E402

UNITS = {"gap": "eV", "heat": "eV/atom"}
FAILING = "cand-fail"
SLOW = ("cand-slow-1", "cand-slow-2", "cand-slow-3")
TRUTH = GroundTruth(
    units=UNITS,
    values={
        **{f"cand-{n}": {"gap": 0.25 * n, "heat": -0.1 * n} for n in range(12)},
        FAILING: {"gap": 1.0, "heat": 0.0},
        **{cid: {"gap": 2.0, "heat": -1.0} for cid in SLOW},
    },
    source="test",
)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[QueueServer]:
    running = start_queueserver(
        tmp_path_factory.mktemp("qs"),
        TRUTH,
        latency_s=0.02,
        fail=(FAILING,),
        slow={cid: 4.0 for cid in SLOW},
    )
    yield running
    running.stop()


def _adapter(address: str, **overrides: object) -> QueueServerAdapter:
    settings = {"control_address": address, "request_timeout_s": 2.0, "backoff_initial_s": 0.1}
    return QueueServerAdapter(QueueServerConfig.model_validate({**settings, **overrides}))


def _request(cid: str, *targets: str) -> ExperimentRequest:
    return ExperimentRequest(candidate_id=cid, targets=targets or ("gap",))


def _wait(
    adapter: QueueServerAdapter, handles: list[JobHandle], timeout_s: float = 30.0
) -> list[JobState]:
    deadline = time.monotonic() + timeout_s
    while True:
        states = [adapter.poll(h).state for h in handles]
        if all(s.is_terminal for s in states) or time.monotonic() > deadline:
            return states
        time.sleep(0.1)


def test_submit_poll_result_measures_the_truth(server: QueueServer) -> None:
    with _adapter(server.control_address) as adapter:
        cids = ["cand-0", "cand-1", "cand-2"]
        handles = [adapter.submit(_request(c, "gap", "heat"), f"happy-{c}") for c in cids]
        assert [h.candidate_id for h in handles] == cids
        assert _wait(adapter, handles) == [JobState.SUCCEEDED] * 3
        for cid, handle in zip(cids, handles, strict=True):
            measurement = adapter.result(handle)
            assert measurement.job_id == handle.job_id and measurement.candidate_id == cid
            assert measurement.values["gap"].value == pytest.approx(TRUTH.values[cid]["gap"])
            assert measurement.values["heat"].value == pytest.approx(TRUTH.values[cid]["heat"])
            assert measurement.values["heat"].unit == "eV/atom"
            assert measurement.values["gap"].uncertainty == 0.0
            assert measurement.provenance["item_uids"] == [handle.job_id]
            assert measurement.provenance["run_uid"]
            assert measurement.started_at is not None
            assert measurement.started_at <= measurement.finished_at


def test_a_retried_submit_finds_the_existing_item(server: QueueServer) -> None:
    with _adapter(server.control_address) as adapter:
        first = adapter.submit(_request("cand-3"), "dup-3")
        again = adapter.submit(_request("cand-3"), "dup-3")  # queued or running
        assert again.job_id == first.job_id
        assert _wait(adapter, [first]) == [JobState.SUCCEEDED]
        with _adapter(server.control_address) as other:  # a fresh process after a crash
            late = other.submit(_request("cand-3"), "dup-3")  # now in the history
            assert late.job_id == first.job_id
            assert other.result(late).values["gap"].value == pytest.approx(0.75)
        assert len(adapter.items_for("dup-3")) == 1


def test_a_failed_plan_fails_the_job_once_and_the_queue_goes_on(server: QueueServer) -> None:
    with _adapter(server.control_address) as adapter:
        bad = adapter.submit(_request(FAILING), "fail-1")
        good = adapter.submit(_request("cand-4"), "after-fail")
        assert _wait(adapter, [bad, good]) == [JobState.FAILED, JobState.SUCCEEDED]
        status = adapter.poll(bad)
        assert status.message and "Plan failed" in status.message
        # the RE Manager put the failed item back at the front of the queue: removed, never rerun
        items = adapter.items_for("fail-1")
        assert len(items) == 1 and items[0]["result"]["exit_status"] == "failed"
        with pytest.raises(ResultNotReadyError, match="FAILED"):
            adapter.result(bad)


def test_cancel_a_queued_and_a_running_item(server: QueueServer) -> None:
    with _adapter(server.control_address) as adapter:
        running = adapter.submit(_request(SLOW[0]), "cancel-running")
        queued = adapter.submit(_request("cand-5"), "cancel-queued")
        deadline = time.monotonic() + 20
        while adapter.poll(running).state is not JobState.RUNNING:
            assert time.monotonic() < deadline, "the slow item never started"
            time.sleep(0.05)
        assert adapter.poll(queued).state is JobState.QUEUED
        assert adapter.cancel(queued).state is JobState.CANCELLED
        assert adapter.items_for("cancel-queued") == []  # removed from the queue
        assert adapter.cancel(running).state is JobState.CANCELLED
        items = adapter.items_for("cancel-running")
        assert [i["result"]["exit_status"] for i in items] == ["aborted"]  # no copy left queued
        after = adapter.submit(_request("cand-6"), "after-cancel")  # the queue runs again
        assert _wait(adapter, [after]) == [JobState.SUCCEEDED]
        assert adapter.poll(queued).state is JobState.CANCELLED
    with _adapter(server.control_address) as fresh:  # the queueserver keeps no removed items
        assert fresh.poll(queued).state is JobState.LOST


def test_an_item_cleared_from_the_history_is_lost(server: QueueServer) -> None:
    from bluesky_queueserver_api.zmq import REManagerAPI

    with _adapter(server.control_address) as adapter:
        handle = adapter.submit(_request("cand-7"), "to-clear")
        assert _wait(adapter, [handle]) == [JobState.SUCCEEDED]
        api = REManagerAPI(zmq_control_addr=server.control_address, timeout_recv=2)
        try:
            api.history_clear(item_uid=handle.job_id)
        finally:
            api.close()
        status = adapter.poll(handle)
        assert status.state is JobState.LOST and "to-clear" in (status.message or "")


def test_queue_control_start_and_none(server: QueueServer) -> None:
    from bluesky_queueserver_api.zmq import REManagerAPI

    api = REManagerAPI(zmq_control_addr=server.control_address, timeout_recv=2)
    try:
        api.queue_autostart(False)
        with _adapter(server.control_address, queue_control="none") as manual:
            handle = manual.submit(_request("cand-8"), "manual-8")
            time.sleep(1.0)
            assert manual.poll(handle).state is JobState.QUEUED  # nobody started the queue
        with _adapter(server.control_address, queue_control="start") as starter:
            assert _wait(starter, [handle]) == [JobState.SUCCEEDED]  # polling started it
            other = starter.submit(_request("cand-9"), "start-9")
            assert _wait(starter, [other]) == [JobState.SUCCEEDED]
        assert not api.status(reload=True)["queue_autostart_enabled"]
    finally:
        api.close()


def test_a_refused_plan_is_permanent_and_names_the_setting(server: QueueServer) -> None:
    with _adapter(server.control_address, plan="no_such_plan") as adapter:
        with pytest.raises(PermanentAdapterError, match=r"adapter\.plan \(no_such_plan\)"):
            adapter.submit(_request("cand-10"), "refused")


def test_no_re_manager_is_transient_and_names_the_address() -> None:
    from tests.simulators.lab_server import free_port

    address = f"tcp://127.0.0.1:{free_port()}"
    with _adapter(address, request_timeout_s=0.3, max_attempts=2, backoff_initial_s=0.0) as adapter:
        started = time.monotonic()
        with pytest.raises(TransientAdapterError, match=r"control_address"):
            adapter.probe()
        with pytest.raises(TransientAdapterError, match=address):
            adapter.submit(_request("cand-0"), "nobody")
        assert time.monotonic() - started < 5


def test_unset_public_key_variable_is_an_auth_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CLOUDLAB_TEST_QS_KEY", raising=False)
    with pytest.raises(AuthError, match="CLOUDLAB_TEST_QS_KEY"):
        _adapter("tcp://127.0.0.1:1", public_key_env="CLOUDLAB_TEST_QS_KEY")


def test_an_encrypted_re_manager_needs_its_public_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import zmq

    public, secret = (k.decode() for k in zmq.curve_keypair())
    server = start_queueserver(tmp_path, TRUTH, keys=(public, secret))
    try:
        monkeypatch.setenv("CLOUDLAB_TEST_QS_KEY", public)
        with _adapter(server.control_address, public_key_env="CLOUDLAB_TEST_QS_KEY") as adapter:
            handle = adapter.submit(_request("cand-2"), "encrypted-2")
            assert _wait(adapter, [handle]) == [JobState.SUCCEEDED]
            assert adapter.result(handle).values["gap"].value == pytest.approx(0.5)
        quick = {"request_timeout_s": 0.5, "max_attempts": 1}
        with _adapter(server.control_address, **quick) as plain:  # no key: no answer at all
            with pytest.raises(TransientAdapterError, match="needs adapter.public_key_env"):
                plain.probe()
        other = zmq.curve_keypair()[0].decode()
        monkeypatch.setenv("CLOUDLAB_TEST_QS_KEY", other)
        with _adapter(
            server.control_address, public_key_env="CLOUDLAB_TEST_QS_KEY", **quick
        ) as wrong:
            with pytest.raises(TransientAdapterError, match=r"\$CLOUDLAB_TEST_QS_KEY"):
                wrong.probe()
    finally:
        server.stop()


def test_config_rejects_a_bad_address() -> None:
    with pytest.raises(ValidationError, match="control_address must look like tcp://host:60615"):
        QueueServerConfig(control_address="localhost:60615")


def test_re_manager_restart_keeps_the_queue_and_starts_nothing_twice(tmp_path: Path) -> None:
    server = start_queueserver(tmp_path, TRUTH, latency_s=0.05, slow={SLOW[1]: 3.0})
    try:
        with _adapter(server.control_address, request_timeout_s=1.0, max_attempts=1) as adapter:
            cids = [SLOW[1], "cand-10", "cand-11"]
            handles = [adapter.submit(_request(c), f"restart-{c}") for c in cids]
            deadline = time.monotonic() + 20
            while adapter.poll(handles[0]).state is not JobState.RUNNING:
                assert time.monotonic() < deadline
                time.sleep(0.05)
            server.kill_manager()  # mid-plan: the worker dies with it
            with pytest.raises(TransientAdapterError, match="no answer"):
                adapter.poll(handles[1])
            server.start_manager()  # queue and history come back from Redis
            again = adapter.submit(_request("cand-10"), "restart-cand-10")
            assert again.job_id == handles[1].job_id
            states = _wait(adapter, handles, timeout_s=60)
            # the plan killed mid-measurement has exit status "unknown" and no record: LOST
            assert states == [JobState.LOST, JobState.SUCCEEDED, JobState.SUCCEEDED]
            for cid, handle in zip(cids[1:], handles[1:], strict=True):
                value = adapter.result(handle).values["gap"].value
                assert value == pytest.approx(TRUTH.values[cid]["gap"])
            keys = [f"restart-{c}" for c in cids]
            assert [len(adapter.items_for(k)) for k in keys] == [1, 1, 1]  # no duplicates
            assert all(KEY_FIELD in i["meta"] for k in keys for i in adapter.items_for(k))
    finally:
        server.stop()
