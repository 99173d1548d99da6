"""Durable jobs on this machine: one directory per idempotency key, one state file per job.

Both local adapters (GPAW in :mod:`adapters.dft`, CHGNet in :mod:`adapters.mlip`)
keep their jobs here, so that a restarted caller finds every job again and a
second submit of the same key never starts a second calculation. A job directory
``<root>/jobs/<job_id>/`` (``job_id`` = first 32 hex digits of sha256(key)) holds

* ``spec.json``   :class:`JobSpec`, written once; the directory appears atomically
  (a temporary directory renamed into place), so two submitters cannot both win;
* ``state.json``  :class:`JobRecord`, rewritten atomically (tmp + ``os.replace``)
  under an ``flock`` so that only non-terminal states are ever overwritten;
* ``result.json`` / ``error.json``  what the worker produced;
* ``worker.log``  the worker's stdout and stderr.

:class:`SubprocessJobRunner` runs each job out of process: a small supervisor
(``python -m adapters.local_jobs <job_dir>``, in its own session so it outlives
the caller) waits for a free slot (``flock`` on ``<root>/slots/slot-<i>.lock``),
starts the worker (``python -m <worker_module> <job_dir>``, its own process
group and working directory), kills it on timeout or cancel, and records the
final state with the worker's CPU time. With ``warm_start`` the worker is
forked by a server that imported the worker module once
(:mod:`adapters.warm_workers`) and watched by pid; without a server it starts
cold. A job whose owner process vanished without a final state is reported LOST.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from adapters.base import (
    ExperimentRequest,
    JobNotFoundError,
    JobState,
    JobStatus,
    PermanentAdapterError,
    utcnow,
)

__all__ = [
    "JobDirectory",
    "JobRecord",
    "JobSpec",
    "SubprocessJobRunner",
    "WorkerError",
    "job_id_for_key",
    "run_worker",
    "worker_main",
]

logger = logging.getLogger(__name__)
_M = TypeVar("_M", bound=BaseModel)
_UNOWNED_GRACE_S = 60.0  # a job nobody adopted within this long after submit is LOST
_KILL_GRACE_S = 5.0  # SIGTERM -> SIGKILL delay for a worker that ignores SIGTERM
# Put this checkout first on the workers' path, so `python -m adapters.*` runs this code.
_PACKAGE_ROOT = Path(__file__).resolve().parents[1]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class JobSpec(_Strict):
    """Everything a worker needs, fixed at submit time."""

    job_id: str
    idempotency_key: str
    request: ExperimentRequest
    settings: dict[str, Any] = Field(description="the adapter's settings, validated by the worker")
    worker_module: str = Field(description="run as `python -m <worker_module> <job_dir>`")
    timeout_s: float = Field(gt=0)
    env: dict[str, str] = Field(default_factory=dict, description="extra environment of the worker")
    warm_start: bool = Field(
        default=False,
        description="fork the worker from a pre-imported server (adapters.warm_workers)",
    )
    submitted_at: datetime = Field(default_factory=utcnow)


class JobRecord(_Strict):
    """The durable state of one job (``state.json``)."""

    state: JobState
    message: str | None = None
    owner_pid: int | None = Field(default=None, description="supervisor, or the adapter process")
    owner_start: int | None = Field(default=None, description="owner's start time (clock ticks)")
    worker_pid: int | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    updated_at: datetime = Field(default_factory=utcnow)
    cpu_s: float | None = Field(default=None, description="CPU seconds used by the worker")
    warm_started: bool = Field(default=False, description="forked by a warm server")


class WorkerError(_Strict):
    """A handled failure reported by a worker (``error.json``)."""

    message: str
    error_type: str


def start_python(
    module_args: list[str], *, cwd: Path, env: dict[str, str], log: Path
) -> subprocess.Popen[bytes]:
    """``python -m <module_args>`` detached: its own session, stdin closed, output to ``log``.

    This checkout goes first on its ``PYTHONPATH``, so ``-m adapters.*`` runs this code.
    """
    paths = (str(_PACKAGE_ROOT), env.get("PYTHONPATH", ""))
    env = {**env, "PYTHONPATH": os.pathsep.join(p for p in paths if p)}
    with open(log, "ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", *module_args],
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def job_id_for_key(idempotency_key: str) -> str:
    """The directory name of a key's job: 32 hex digits of its sha256."""
    return hashlib.sha256(idempotency_key.encode()).hexdigest()[:32]


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def process_start_time(pid: int) -> int | None:
    """The start time of ``pid`` in clock ticks since boot (``/proc/<pid>/stat`` field 22).

    None when the process does not exist, is a zombie, or ``/proc`` is unavailable.
    """
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()
    except OSError:
        return None
    if fields[0] == "Z":
        return None
    return int(fields[19])


def process_alive(pid: int, start_time: int | None) -> bool:
    """Whether process ``pid`` still runs and is the one that started at ``start_time``.

    The start time guards against pid reuse; zombies count as dead. Without ``/proc``
    (not Linux) this falls back to ``kill(pid, 0)``.
    """
    if not Path("/proc/self").exists():
        try:
            os.kill(pid, 0)
        except OSError:
            return False
        return True
    now = process_start_time(pid)
    return now is not None and (start_time is None or now == start_time)


class JobDirectory:
    """The file store of jobs under ``root`` (see the module docstring for the layout)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.jobs = self.root / "jobs"
        self.jobs.mkdir(parents=True, exist_ok=True)

    def path(self, job_id: str) -> Path:
        return self.jobs / job_id

    def create(self, spec: JobSpec) -> tuple[JobSpec, bool]:
        """Create the job directory unless the key already has one.

        Returns:
            The stored spec (the existing one if the key was known) and whether it is new.

        Raises:
            PermanentAdapterError: the key is known with a different request.
        """
        target = self.path(spec.job_id)
        if not target.exists():
            tmp = Path(tempfile.mkdtemp(prefix=f".{spec.job_id}.", dir=self.jobs))
            (tmp / "spec.json").write_text(spec.model_dump_json(indent=1))
            record = JobRecord(state=JobState.QUEUED, message="submitted")
            (tmp / "state.json").write_text(record.model_dump_json(indent=1))
            try:
                os.rename(tmp, target)
                return spec, True
            except OSError:  # another submitter won the race: ours is discarded
                shutil.rmtree(tmp, ignore_errors=True)
        existing = self.spec(spec.job_id)
        if existing.idempotency_key != spec.idempotency_key:
            raise PermanentAdapterError(
                f"job id collision: {spec.job_id} belongs to key {existing.idempotency_key!r}"
            )
        if existing.request != spec.request:
            raise PermanentAdapterError(
                f"idempotency key {spec.idempotency_key!r} was already used for a different "
                f"request (candidate {existing.request.candidate_id!r}); use a new key"
            )
        return existing, False

    def spec(self, job_id: str) -> JobSpec:
        path = self.path(job_id) / "spec.json"
        try:
            return JobSpec.model_validate_json(path.read_text())
        except FileNotFoundError as exc:
            raise JobNotFoundError(f"no job {job_id} under {self.jobs}") from exc

    def record(self, job_id: str) -> JobRecord:
        path = self.path(job_id) / "state.json"
        try:
            return JobRecord.model_validate_json(path.read_text())
        except FileNotFoundError as exc:
            raise JobNotFoundError(f"no job {job_id} under {self.jobs}") from exc

    @contextlib.contextmanager
    def _locked(self, job_id: str) -> Iterator[None]:
        with open(self.path(job_id) / "state.lock", "a") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            yield

    def update(self, job_id: str, state: JobState, message: str | None, **fields: Any) -> JobRecord:
        """Move a job to ``state`` unless it is already terminal; returns the record now stored."""
        with self._locked(job_id):
            current = self.record(job_id)
            if current.state.is_terminal:
                return current
            now = utcnow()
            extra: dict[str, Any] = {"updated_at": now}
            if state.is_terminal:
                extra["finished_at"] = now
            new = current.model_copy(update={"state": state, "message": message, **fields, **extra})
            _write_atomic(self.path(job_id) / "state.json", new.model_dump_json(indent=1))
            return new

    def adopt(self, job_id: str, pid: int) -> None:
        """Record ``pid`` as the job's owner unless an owner is already recorded."""
        with self._locked(job_id):
            current = self.record(job_id)
            if current.owner_pid is None and not current.state.is_terminal:
                new = current.model_copy(
                    update={
                        "owner_pid": pid,
                        "owner_start": process_start_time(pid),
                        "updated_at": utcnow(),
                    }
                )
                _write_atomic(self.path(job_id) / "state.json", new.model_dump_json(indent=1))

    def status(self, job_id: str) -> JobStatus:
        """The job's status; a non-terminal job whose owner process is gone becomes LOST."""
        record = self.record(job_id)
        if not record.state.is_terminal:
            reason = None
            owner = record.owner_pid
            if owner is None:
                age = (utcnow() - record.updated_at).total_seconds()
                if age > _UNOWNED_GRACE_S:
                    reason = f"no process took the job within {age:.0f} s of its submission"
            elif not process_alive(owner, record.owner_start):
                reason = f"owner process {owner} ended without recording a final state (killed, or the machine restarted)"
            if reason is not None:
                record = self.update(job_id, JobState.LOST, f"{reason}; resubmit under a new key")
        return JobStatus(
            job_id=job_id, state=record.state, message=record.message, updated_at=record.updated_at
        )

    def write_result(self, job_id: str, result: BaseModel) -> None:
        _write_atomic(self.path(job_id) / "result.json", result.model_dump_json(indent=1))

    def read_result(self, job_id: str, model: type[_M]) -> _M:
        return model.model_validate_json((self.path(job_id) / "result.json").read_text())


def worker_main(
    module: str, compute: Callable[[JobSpec, Path], BaseModel], argv: list[str] | None = None
) -> int:
    """The ``main`` of a worker module: ``python -m <module> <job_dir>`` runs :func:`run_worker`."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        raise SystemExit(f"usage: python -m {module} <job_dir>")
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    return run_worker(Path(args[0]).resolve(), compute)


def run_worker(job_dir: Path, compute: Callable[[JobSpec, Path], BaseModel]) -> int:
    """Body of a worker's ``main``: run ``compute`` and record its result or its error.

    Returns the exit status (0 on success). The traceback goes to the worker log.
    """
    store = JobDirectory(job_dir.parent.parent)
    job_id = job_dir.name
    spec = store.spec(job_id)
    try:
        result = compute(spec, job_dir)
    except Exception as exc:  # process boundary: every failure must reach error.json
        traceback.print_exc()
        error = WorkerError(message=str(exc) or type(exc).__name__, error_type=type(exc).__name__)
        _write_atomic(job_dir / "error.json", error.model_dump_json(indent=1))
        return 1
    store.write_result(job_id, result)
    return 0


class SubprocessJobRunner:
    """Starts, watches and cancels supervised worker processes for a :class:`JobDirectory`.

    Args:
        root: directory holding ``jobs/`` and ``slots/``.
        max_parallel: how many workers may run at once on this machine (others wait QUEUED).
    """

    def __init__(self, root: Path, *, max_parallel: int = 1) -> None:
        if max_parallel < 1:
            raise PermanentAdapterError(f"max_parallel must be >= 1, got {max_parallel}")
        self.store = JobDirectory(root)
        self.max_parallel = max_parallel
        self._children: dict[str, subprocess.Popen[bytes]] = {}

    def submit(self, spec: JobSpec) -> tuple[JobSpec, bool]:
        """Create the job and start its supervisor, unless the key already has a job."""
        stored, created = self.store.create(spec)
        if created:
            job_dir = self.store.path(spec.job_id)
            env = {**os.environ, "CLOUDLAB_JOB_SLOTS": str(self.max_parallel)}
            proc = start_python(["adapters.local_jobs", str(job_dir)], cwd=job_dir, env=env,
                                log=job_dir / "supervisor.log")  # fmt: skip
            self._children[spec.job_id] = proc
            self.store.adopt(spec.job_id, proc.pid)
            logger.info(
                "started job %s (key %r), supervisor pid %d",
                spec.job_id,
                spec.idempotency_key,
                proc.pid,
            )
        return stored, created

    def status(self, job_id: str) -> JobStatus:
        self._reap()
        return self.store.status(job_id)

    def cancel(self, job_id: str, *, wait_s: float = 10.0) -> JobStatus:
        """Ask the supervisor to stop the job; waits up to ``wait_s`` for the final state."""
        status = self.status(job_id)
        if status.state.is_terminal:
            return status
        job_dir = self.store.path(job_id)
        (job_dir / "cancel_requested").touch()
        record = self.store.record(job_id)
        owner, owner_start = record.owner_pid, record.owner_start
        if owner is not None and process_alive(owner, owner_start):
            with contextlib.suppress(ProcessLookupError):
                os.kill(owner, signal.SIGTERM)
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            self._reap()
            record = self.store.record(job_id)
            if record.state.is_terminal:
                break
            if owner is None or not process_alive(owner, owner_start):
                self.store.update(job_id, JobState.CANCELLED, "cancelled before the worker started")
                break
            time.sleep(0.05)
        return self.store.status(job_id)

    def _reap(self) -> None:
        for job_id, proc in list(self._children.items()):
            if proc.poll() is not None:
                del self._children[job_id]


# --------------------------------------------------------------------------- supervisor


def _acquire_slot(root: Path, n_slots: int, cancelled: Callable[[], bool]) -> int | None:
    """Hold one of ``n_slots`` machine-wide slots (the fd stays open until exit); None if cancelled."""
    slots = root / "slots"
    slots.mkdir(exist_ok=True)
    while not cancelled():
        for i in range(n_slots):
            fd = os.open(slots / f"slot-{i}.lock", os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            return fd
        time.sleep(0.2)
    return None


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    for sig, wait in ((signal.SIGTERM, _KILL_GRACE_S), (signal.SIGKILL, 30.0)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


class _ColdWorker:
    """A worker started as ``python -m <worker_module> <job_dir>``, a child of the supervisor."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        self.proc, self.pid = proc, proc.pid

    def describe(self) -> str:
        return f"worker pid {self.pid}"

    def running(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        _kill_group(self.proc)

    def ended(self) -> tuple[int, float | None]:
        """The exit status and the CPU seconds of the worker."""
        returncode = self.proc.wait()
        usage = resource.getrusage(resource.RUSAGE_CHILDREN)
        return returncode, usage.ru_utime + usage.ru_stime


class _WarmWorker:
    """A worker forked by a warm server (:mod:`adapters.warm_workers`), watched by pid."""

    def __init__(self, pid: int, start_time: int | None, job_dir: Path) -> None:
        self.pid, self.start_time, self.job_dir = pid, start_time, job_dir

    def describe(self) -> str:
        return f"worker pid {self.pid} (warm start)"

    def running(self) -> bool:
        return process_alive(self.pid, self.start_time)

    def kill(self) -> None:
        for sig, wait in ((signal.SIGTERM, _KILL_GRACE_S), (signal.SIGKILL, 30.0)):
            try:
                os.killpg(self.pid, sig)  # the worker and whatever it started
            except ProcessLookupError:  # no group (yet): the worker itself
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.pid, sig)
            except PermissionError:
                pass
            deadline = time.monotonic() + wait
            while self.running() and time.monotonic() < deadline:
                time.sleep(0.05)
            if not self.running():
                return

    def ended(self) -> tuple[int, float | None]:
        """The exit status and CPU seconds its server recorded (``exit.json``).

        A server that died before reaping the worker leaves none: then the status is read
        from what the worker wrote (0 with a result, 1 without) and the CPU time is unknown.
        """
        from adapters.warm_workers import WorkerExit

        path, deadline = self.job_dir / "exit.json", time.monotonic() + 2.0
        while not path.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        try:
            ended = WorkerExit.model_validate_json(path.read_text())
            return ended.returncode, ended.cpu_s
        except (OSError, ValidationError):
            return (0 if (self.job_dir / "result.json").exists() else 1), None


def _warm_worker(job_dir: Path, spec: JobSpec, env: dict[str, str]) -> _WarmWorker | None:
    """The job's worker forked by a warm server, or None (then start it cold)."""
    from adapters.warm_workers import request_worker

    try:
        reply = request_worker(job_dir, spec.worker_module, env)
    except Exception as exc:  # whatever goes wrong on the warm path, the job starts cold
        logger.warning("warm start of job %s failed (%s); starting it cold", job_dir.name, exc)
        return None
    if reply is None:
        return None
    if reply.pid is None:
        logger.warning(
            "warm server refused job %s (%s); starting it cold", job_dir.name, reply.error
        )
        return None
    return _WarmWorker(reply.pid, reply.start_time, job_dir)


def supervise(job_dir: Path) -> int:
    """Run one job's worker with its timeout; record the final state. Returns 0."""
    store = JobDirectory(job_dir.parent.parent)
    job_id = job_dir.name
    spec = store.spec(job_id)
    flag = {"cancel": False}

    def on_term(signum: int, frame: object) -> None:
        flag["cancel"] = True

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)

    def cancelled() -> bool:
        return flag["cancel"] or (job_dir / "cancel_requested").exists()

    if store.record(job_id).state.is_terminal:  # cancelled or marked LOST before we started
        return 0
    me = os.getpid()
    store.update(
        job_id,
        JobState.QUEUED,
        "waiting for a free slot",
        owner_pid=me,
        owner_start=process_start_time(me),
    )
    slot = _acquire_slot(store.root, int(os.environ.get("CLOUDLAB_JOB_SLOTS", "1")), cancelled)
    if slot is None:
        store.update(job_id, JobState.CANCELLED, "cancelled while queued")
        return 0
    env = {**os.environ, **spec.env}
    worker: _ColdWorker | _WarmWorker | None = (
        _warm_worker(job_dir, spec, env) if spec.warm_start else None
    )
    if worker is None:
        worker = _ColdWorker(start_python([spec.worker_module, str(job_dir)], cwd=job_dir, env=env,
                                          log=job_dir / "worker.log"))  # fmt: skip
    started = time.monotonic()
    store.update(
        job_id,
        JobState.RUNNING,
        worker.describe(),
        worker_pid=worker.pid,
        started_at=utcnow(),
        warm_started=isinstance(worker, _WarmWorker),
    )
    state, message = JobState.RUNNING, ""
    while worker.running():
        elapsed = time.monotonic() - started
        if cancelled():
            worker.kill()
            state, message = JobState.CANCELLED, f"cancelled after {elapsed:.1f} s; worker killed"
            break
        if elapsed > spec.timeout_s:
            worker.kill()
            state = JobState.FAILED
            message = f"timed out after {elapsed:.1f} s (limit {spec.timeout_s:g} s); worker pid {worker.pid} killed"
            break
        time.sleep(0.1)
    returncode, cpu_s = worker.ended()
    if state is JobState.RUNNING:
        state, message = _final_state(job_dir, returncode)
    store.update(job_id, state, message, cpu_s=cpu_s)
    logger.info("job %s ended %s: %s", job_id, state, message)
    return 0


def _final_state(job_dir: Path, returncode: int) -> tuple[JobState, str]:
    if returncode == 0 and (job_dir / "result.json").exists():
        return JobState.SUCCEEDED, "done"
    error_file = job_dir / "error.json"
    if error_file.exists():
        try:
            error = WorkerError.model_validate_json(error_file.read_text())
            return JobState.FAILED, f"{error.error_type}: {error.message}"
        except ValidationError:
            pass
    if returncode < 0:
        return (
            JobState.FAILED,
            f"worker killed by signal {signal.Signals(-returncode).name}; see worker.log",
        )
    tail = (job_dir / "worker.log").read_text(errors="replace").strip().splitlines()[-3:]
    return JobState.FAILED, f"worker exited with status {returncode}: {' | '.join(tail)}"


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        raise SystemExit("usage: python -m adapters.local_jobs <job_dir>")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    return supervise(Path(args[0]).resolve())


if __name__ == "__main__":
    raise SystemExit(main())
