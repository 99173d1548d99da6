"""Warm-started CHGNet workers: forked from a server that imported torch and CHGNet once.

Each test gets its own server: the server's identity includes the environment, so a
unique ``CLOUDLAB_WARM_TEST`` value keeps other tests' servers out.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("chgnet")

from adapters.base import ExperimentRequest, JobHandle, JobState  # noqa: E402
from adapters.local_jobs import JobRecord, process_alive  # noqa: E402
from adapters.mlip import ChgnetAdapter  # noqa: E402
from adapters.warm_workers import (  # noqa: E402
    WarmStart,
    WorkerExit,
    request_worker,
    server_key,
    socket_path,
)
from tests.adapters.test_mlip import wait  # noqa: E402

pytestmark = pytest.mark.dft


def si_cif(n: int = 1, shift: float = 0.0) -> str:
    from ase.build import bulk
    from pymatgen.io.ase import AseAtomsAdaptor
    from pymatgen.io.cif import CifWriter

    atoms = bulk("Si", "diamond", a=5.43, cubic=n > 1).repeat(n if n > 1 else 1)
    atoms.positions[1, 0] += shift
    return str(CifWriter(AseAtomsAdaptor.get_structure(atoms)))


def request(cid: str, cif: str) -> ExperimentRequest:
    return ExperimentRequest(candidate_id=cid, structure_cif=cif, targets=["energy_per_atom"])


def record(adapter: ChgnetAdapter, handle: JobHandle) -> JobRecord:
    return adapter.store.record(handle.job_id)


def server_socket(adapter: ChgnetAdapter, first: JobHandle) -> Path:
    """The socket the first job's supervisor found empty and started a server for; waits for it."""
    log = (adapter.store.path(first.job_id) / "supervisor.log").read_text()
    found = re.search(r"no warm adapters\.mlip server at (\S+) ", log)
    assert found, log
    path = Path(found.group(1))
    deadline = time.monotonic() + 120
    while not path.exists():
        assert time.monotonic() < deadline, f"no server at {path}"
        time.sleep(0.1)
    return path


def server_pid(path: Path) -> int:
    """The pid of the process holding the server's lock (``/proc/locks``: pid, dev:inode)."""
    inode = os.stat(f"{path}.lock").st_ino
    for line in Path("/proc/locks").read_text().splitlines():
        fields = line.split()
        if len(fields) > 5 and fields[5].endswith(f":{inode}"):
            return int(fields[4])
    raise AssertionError(f"nobody holds {path}.lock")


def running_warm(adapter: ChgnetAdapter, handle: JobHandle) -> int:
    """Wait until the job's warm-started worker runs; its pid."""
    deadline = time.monotonic() + 60
    while True:
        rec = record(adapter, handle)
        if rec.state is JobState.RUNNING and rec.worker_pid is not None:
            assert "warm start" in (rec.message or ""), rec.message
            return rec.worker_pid
        assert time.monotonic() < deadline and not rec.state.is_terminal, rec
        time.sleep(0.05)


def slow_parameters(timeout_s: float = 600.0) -> dict[str, object]:
    """A relaxation that cannot converge (fmax 1e-6 eV/A) and takes minutes of steps."""
    return {"relax": True, "fmax_ev_per_a": 1e-6, "max_relax_steps": 100000, "timeout_s": timeout_s}


@pytest.fixture()
def adapter(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[ChgnetAdapter]:
    monkeypatch.setenv("CLOUDLAB_WARM_TEST", uuid.uuid4().hex)
    monkeypatch.setenv("CLOUDLAB_WARM_IDLE_S", "3")
    a = ChgnetAdapter({"work_dir": str(tmp_path / "chgnet"), "threads": 1, "max_parallel": 2})
    yield a
    a.close()


def test_warm_workers_give_the_cold_result_and_record_their_cpu(adapter: ChgnetAdapter) -> None:
    cold = adapter.submit(request("si-cold", si_cif()), "cold")
    assert wait(adapter, cold).state is JobState.SUCCEEDED
    assert not record(adapter, cold).warm_started  # no server yet: a cold start
    path = server_socket(adapter, cold)
    warm = adapter.submit(request("si-warm", si_cif()), "warm")
    assert wait(adapter, warm).state is JobState.SUCCEEDED
    rec = record(adapter, warm)
    assert rec.warm_started
    assert "warm-started worker" in (adapter.store.path(warm.job_id) / "worker.log").read_text()
    ended = WorkerExit.model_validate_json(
        (adapter.store.path(warm.job_id) / "exit.json").read_text()
    )
    assert ended.returncode == 0 and ended.cpu_s > 0 and rec.cpu_s == ended.cpu_s
    a, b = adapter.result(cold), adapter.result(warm)
    assert a.values["energy_per_atom"].value == pytest.approx(-5.3122, abs=2e-3)
    assert b.values["energy_per_atom"].value == pytest.approx(
        a.values["energy_per_atom"].value, abs=1e-6
    )
    # idle: the server exits and removes its socket (CLOUDLAB_WARM_IDLE_S = 3)
    deadline = time.monotonic() + 60
    while path.exists():
        assert time.monotonic() < deadline, "the idle server did not exit"
        time.sleep(0.2)


def test_timeout_and_cancel_kill_the_warm_worker(adapter: ChgnetAdapter) -> None:
    first = adapter.submit(request("si", si_cif()), "first")
    wait(adapter, first)
    server_socket(adapter, first)
    slow = request("si-rattled", si_cif(2, shift=0.1))
    timed = adapter.submit(slow.model_copy(update={"parameters": slow_parameters(4.0)}), "timed")
    cancelled = adapter.submit(slow.model_copy(update={"parameters": slow_parameters()}), "cancel")
    pids = [running_warm(adapter, timed), running_warm(adapter, cancelled)]
    status = adapter.cancel(cancelled)
    assert status.state is JobState.CANCELLED and "worker killed" in (status.message or "")
    status = wait(adapter, timed, 120)
    assert status.state is JobState.FAILED and "timed out" in (status.message or "")
    for pid in pids:
        assert not process_alive(pid, None)
    for handle in (timed, cancelled):
        assert not (adapter.store.path(handle.job_id) / "result.json").exists()


def test_a_dead_server_costs_time_not_jobs(adapter: ChgnetAdapter) -> None:
    first = adapter.submit(request("si", si_cif()), "first")
    wait(adapter, first)
    path = server_socket(adapter, first)
    job = request("si-rattled", si_cif(2, shift=0.1))
    steps = {"relax": True, "fmax_ev_per_a": 1e-6, "max_relax_steps": 60}
    orphan = adapter.submit(job.model_copy(update={"parameters": steps}), "orphan")
    running_warm(adapter, orphan)
    assert record(adapter, orphan).warm_started
    dead = server_pid(path)
    os.kill(dead, signal.SIGKILL)  # the worker is orphaned mid-relaxation
    assert wait(adapter, orphan).state is JobState.SUCCEEDED
    assert not (adapter.store.path(orphan.job_id) / "exit.json").exists()  # nobody reaped it
    assert adapter.result(orphan).values["energy_per_atom"].value < -5.0
    after = adapter.submit(request("si-after", si_cif(shift=0.05)), "after")
    assert wait(adapter, after).state is JobState.SUCCEEDED
    assert not record(adapter, after).warm_started  # cold, and a new server starts
    deadline = time.monotonic() + 120
    while True:  # the old socket file is still there: wait for a new server on the lock
        with contextlib.suppress(AssertionError, FileNotFoundError):
            if server_pid(path) != dead and _answers(path):
                break
        assert time.monotonic() < deadline, "no new server after the old one died"
        time.sleep(0.2)
    again = adapter.submit(request("si-again", si_cif(shift=0.02)), "again")
    assert wait(adapter, again).state is JobState.SUCCEEDED and record(adapter, again).warm_started


def _answers(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        try:
            conn.connect(str(path))
        except OSError:
            return False
    return True


def test_an_unconfirmed_start_never_runs_the_job(adapter: ChgnetAdapter, tmp_path: Path) -> None:
    """The server forks, replies, and the client goes away without confirming (its supervisor
    died, or gave up and started the job cold): the forked worker must exit untouched."""
    first = adapter.submit(request("si", si_cif()), "first")
    wait(adapter, first)
    path = server_socket(adapter, first)
    job_dir = tmp_path / "jobs" / "unconfirmed"
    job_dir.mkdir(parents=True)
    shutil.copy(adapter.store.path(first.job_id) / "spec.json", job_dir / "spec.json")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.settimeout(30)
        conn.connect(str(path))
        conn.sendall(
            json.dumps({"job_dir": str(job_dir), "env": dict(os.environ)}).encode() + b"\n"
        )
        reply = WarmStart.model_validate_json(conn.makefile("rb").readline())
    assert reply.pid is not None  # forked, then left waiting for the confirmation
    deadline = time.monotonic() + 30
    while process_alive(reply.pid, reply.start_time):
        assert time.monotonic() < deadline, "the unconfirmed worker did not exit"
        time.sleep(0.1)
    assert not (job_dir / "result.json").exists() and not (job_dir / "worker.log").exists()
    assert not (job_dir / "exit.json").exists()
    assert _answers(path)  # the server carries on
    second = adapter.submit(request("si-2", si_cif(shift=0.03)), "second")
    assert (
        wait(adapter, second).state is JobState.SUCCEEDED and record(adapter, second).warm_started
    )


def test_edited_code_gets_a_new_server() -> None:
    env = {"CLOUDLAB_WARM_TEST": "key"}
    before = server_key("adapters.mlip", env)
    base = Path(__file__).resolve().parents[2] / "adapters" / "base.py"
    stamp = base.stat()
    try:
        os.utime(base, ns=(stamp.st_atime_ns, stamp.st_mtime_ns + 1_000_000))
        assert server_key("adapters.mlip", env) != before  # a module the worker imports changed
    finally:
        os.utime(base, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))
    assert server_key("adapters.mlip", env) == before
    assert server_key("adapters.mlip", {**env, "OMP_NUM_THREADS": "2"}) != before


def test_the_server_refuses_what_is_not_a_job(adapter: ChgnetAdapter, tmp_path: Path) -> None:
    first = adapter.submit(request("si", si_cif()), "first")
    wait(adapter, first)
    path = server_socket(adapter, first)
    replies = []
    for line in (json.dumps({"job_dir": str(tmp_path), "env": {}}), "not json"):
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
            conn.settimeout(30)
            conn.connect(str(path))
            conn.sendall(line.encode() + b"\n")
            replies.append(WarmStart.model_validate_json(conn.makefile("rb").readline()))
    assert replies[0].pid is None and "not a job directory" in (replies[0].error or "")
    assert replies[1].pid is None and "bad request" in (replies[1].error or "")


def test_a_server_that_cannot_start_is_not_restarted_by_every_job(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CLOUDLAB_WARM_TEST", uuid.uuid4().hex)
    env = dict(os.environ)
    job_dir = tmp_path / "job"
    job_dir.mkdir()
    assert request_worker(job_dir, "adapters.no_such_worker", env) is None  # starts a server
    path = socket_path(server_key("adapters.no_such_worker", env))
    assert path is not None and path.parent.stat().st_mode & 0o077 == 0  # private to this user
    failed = path.with_suffix(".failed")
    deadline = time.monotonic() + 60
    while not failed.exists():
        assert time.monotonic() < deadline, "the failing server left no traceback"
        time.sleep(0.1)
    assert "No module named 'adapters.no_such_worker'" in failed.read_text()
    for _ in range(3):  # within the minute: cold starts, no new server
        assert request_worker(job_dir, "adapters.no_such_worker", env) is None
    time.sleep(2.0)
    assert path.with_suffix(".log").read_text().count("Traceback") == 1
