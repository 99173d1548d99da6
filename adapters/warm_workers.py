"""Pre-imported job workers: one fork server per worker module and environment.

A CHGNet job spends ~4 s starting Python and importing torch, pymatgen and
CHGNet before 1-10 s of work; over a discovery campaign's few hundred jobs that
is a third of the wall time. A *warm server* pays the imports once: it imports
the worker module (and calls its ``preload()``, if it has one), listens on a
Unix socket, and forks one child per job. The child becomes that job's worker
exactly as ``python -m <worker_module> <job_dir>`` would: its own session and
process group, the job directory as working directory, stdout and stderr to
``worker.log``, the job's environment, then :func:`adapters.local_jobs.run_worker`.

The supervisor (:func:`adapters.local_jobs.supervise`) still owns the job: it
watches the child's pid (with its start time, against pid reuse), kills its
process group on timeout or cancel and records the final state. The server
only reaps its children and writes each one's exit status and CPU time to
``<job_dir>/exit.json`` (:class:`WorkerExit`).

* **Fork safety.** The server never runs a torch kernel, so no OpenMP or
  intra-op thread pool exists when it forks (a pool inherited by a fork can
  deadlock; the idle BLAS threads numpy and scipy start at import re-create
  themselves after a fork), and it refuses to fork while a second Python
  thread runs. Thread settings read at import (``OMP_NUM_THREADS`` ...)
  are fixed by the server's environment, which is why the environment is part
  of the server's identity (:func:`server_key`).
* **Lifetime.** The first supervisor that finds no server starts one (detached,
  in its own session) and runs its own job the cold way. One server per
  socket: it holds an ``flock`` on ``<socket>.lock`` for life. It exits after
  ``idle_s`` without a request and without live children (``$CLOUDLAB_WARM_IDLE_S``,
  default 300 s).
* **Failure.** A missing, starting or dead server costs time, never a job: the
  supervisor falls back to a cold worker. A server that fails to start leaves its
  traceback in ``<key>.failed``, and for a minute no job starts another.
* **Where.** Sockets, locks and logs live in a directory only this user can
  enter (:func:`runtime_dir`); without one, every worker starts cold. A child orphaned by a dead server is
  still watched and killed by its supervisor; without ``exit.json`` its state
  is read from ``result.json`` / ``error.json``.
* **Code changes.** The key includes the worker module's and this package's
  file modification times, so edited code gets a new server; the old one exits
  when idle.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib
import importlib.metadata
import json
import logging
import os
import select
import signal
import socket
import stat
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Mapping
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from adapters.local_jobs import JobSpec, process_start_time, run_worker, start_python

Compute = Callable[[JobSpec, Path], BaseModel]

__all__ = ["WarmStart", "WorkerExit", "request_worker", "serve", "server_key", "socket_path"]

logger = logging.getLogger(__name__)

_PACKAGE_ROOT = Path(__file__).resolve().parents[1]
_CONNECT_TIMEOUT_S = 10.0  # the server replies after one fork (~10 ms); a busy machine is slower
_DEFAULT_IDLE_S = 300.0
_RETRY_AFTER_S = 60.0  # after a server failed to start, jobs start cold this long
_ACK_TIMEOUT_S = 5.0  # the supervisor confirms the reply; without it the forked worker exits
_CODE_PACKAGES = ("adapters", "cloud_model")
_DISTRIBUTIONS = ("chgnet", "torch", "pymatgen", "numpy", "pydantic", "ase", "gpaw")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class WorkerExit(_Strict):
    """How a warm-started worker ended (``<job_dir>/exit.json``, written by its server)."""

    returncode: int = Field(description="exit status; minus the signal number if killed")
    cpu_s: float = Field(ge=0, description="user + system CPU seconds of the worker")


class WarmStart(_Strict):
    """The server's reply to a job request: the forked worker, or why there is none."""

    pid: int | None = None
    start_time: int | None = Field(default=None, description="clock ticks since boot")
    error: str | None = None


def server_key(worker_module: str, env: Mapping[str, str]) -> str:
    """The identity of a server: interpreter, code, package versions, worker module, environment.

    Two supervisors share a server only if a cold worker of either would have run the
    same code in the same environment: the key holds the modification times of every
    module of this checkout's ``adapters`` and ``cloud_model`` packages and the versions
    of the installed packages a worker imports, so edited code or an upgrade gets a new
    server (the old one exits when idle).
    """
    stamps = [
        f"{p.relative_to(_PACKAGE_ROOT)}@{p.stat().st_mtime_ns}"
        for package in _CODE_PACKAGES
        for p in sorted((_PACKAGE_ROOT / package).glob("*.py"))
    ]
    versions = []
    for dist in _DISTRIBUTIONS:
        try:
            versions.append(f"{dist}=={importlib.metadata.version(dist)}")
        except importlib.metadata.PackageNotFoundError:
            versions.append(f"{dist}==none")
    parts = [sys.executable, str(_PACKAGE_ROOT), worker_module, *stamps, *versions]
    parts += [f"{k}={v}" for k, v in sorted(env.items())]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:20]


def runtime_dir() -> Path | None:
    """The directory of this user's sockets, locks and logs (mode 0700), or None if unsafe.

    ``$XDG_RUNTIME_DIR`` when set, else the temporary directory (socket paths must stay
    under ~100 characters). A directory another user owns or can enter is never used: a
    socket there could hand a job to someone else's process.
    """
    base = os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir()
    path = Path(base) / f"cloudlab-warm-{os.getuid()}"
    try:
        path.mkdir(mode=0o700, exist_ok=True)
        info = path.lstat()  # a symlink planted by someone else is not followed
    except OSError as exc:
        logger.warning("no warm workers: cannot create %s (%s)", path, exc)
        return None
    if not stat.S_ISDIR(info.st_mode):
        logger.warning("no warm workers: %s is not a directory (a symlink?)", path)
        return None
    if info.st_uid != os.getuid() or info.st_mode & 0o077:
        logger.warning("no warm workers: %s is not private to this user (mode %o, uid %d)",
                       path, info.st_mode & 0o777, info.st_uid)  # fmt: skip
        return None
    return path


def socket_path(key: str) -> Path | None:
    """Where the server of ``key`` listens; None without a private :func:`runtime_dir`."""
    directory = runtime_dir()
    return None if directory is None else directory / f"{key}.sock"


# --------------------------------------------------------------------------- client (supervisor)


def request_worker(job_dir: Path, worker_module: str, env: Mapping[str, str]) -> WarmStart | None:
    """Ask the warm server of (``worker_module``, ``env``) to fork the worker of ``job_dir``.

    Returns the forked worker, or None when no server answers; then a server is started
    for the next job (this one should start cold), unless one is starting already or the
    last one failed less than a minute ago (``<key>.failed`` holds its traceback). A server
    that answers with an error is returned as such (``pid`` None).
    """
    path = socket_path(server_key(worker_module, env))
    if path is None:
        return None
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
            conn.settimeout(_CONNECT_TIMEOUT_S)
            conn.connect(str(path))
            conn.sendall(json.dumps({"job_dir": str(job_dir), "env": dict(env)}).encode() + b"\n")
            reply = WarmStart.model_validate_json(conn.makefile("rb").readline())
            if reply.pid is not None:
                conn.sendall(b"go\n")  # without it the forked worker exits before starting
        return reply
    except (OSError, ValueError) as exc:
        failed = path.with_suffix(".failed")
        if _locked(Path(f"{path}.lock")):
            logger.info("no warm %s server at %s yet: one is starting", worker_module, path)
        elif _recent(failed):
            logger.info("no warm %s server at %s: the last one failed (%s)", worker_module, path,
                        failed)  # fmt: skip
        else:
            logger.info("no warm %s server at %s (%s); starting one", worker_module, path, exc)
            start_server(worker_module, env, path)
        return None


def _recent(marker: Path) -> bool:
    """Whether ``marker`` was written less than :data:`_RETRY_AFTER_S` ago."""
    try:
        return time.time() - marker.stat().st_mtime < _RETRY_AFTER_S
    except OSError:  # absent, or removed by a server that just started
        return False


def _locked(lock: Path) -> bool:
    """Whether a process holds ``lock`` (a server that is importing or serving)."""
    try:
        fd = os.open(lock, os.O_RDWR)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def start_server(worker_module: str, env: Mapping[str, str], path: Path) -> None:
    """Start a detached server (it exits at once if another one holds ``path``'s lock)."""
    start_python(["adapters.warm_workers", worker_module, str(path)], cwd=path.parent,
                 env=dict(env), log=path.with_suffix(".log"))  # fmt: skip


# --------------------------------------------------------------------------- server


def _run_child(job_dir: Path, env: Mapping[str, str], compute: Compute) -> int:
    """In the forked child: become the job's worker (see the module docstring)."""
    for sig in (signal.SIGCHLD, signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.SIG_DFL)
    log_fd = os.open(job_dir / "worker.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    null_fd = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null_fd, 0)
    os.dup2(log_fd, 1)
    os.dup2(log_fd, 2)
    os.close(log_fd)
    os.close(null_fd)
    os.chdir(job_dir)
    os.environ.clear()
    os.environ.update(env)
    sys.argv = [f"warm:{job_dir}", str(job_dir)]
    logging.getLogger().handlers.clear()
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True
    )
    logging.getLogger(__name__).info("warm-started worker pid %d", os.getpid())
    return run_worker(job_dir, compute)


def serve(worker_module: str, path: Path, *, idle_s: float = _DEFAULT_IDLE_S) -> int:
    """Run a warm server for ``worker_module`` on ``path`` until idle; returns the exit status."""
    lock_fd = os.open(f"{path}.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        logger.info("another server holds %s; exiting", path)
        return 0
    failed = path.with_suffix(".failed")  # stays if this process dies while importing (OOM)
    failed.write_text(f"server pid {os.getpid()} began importing {worker_module}; never listened\n")
    t0 = time.perf_counter()
    module = importlib.import_module(worker_module)
    compute: Compute = module.compute
    preload = getattr(module, "preload", None)
    if callable(preload):
        preload()
    logger.info("imported %s in %.1f s", worker_module, time.perf_counter() - t0)
    with contextlib.suppress(FileNotFoundError):
        path.unlink()  # a dead server's socket: we hold the lock, so nobody else listens
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(16)
    failed.unlink(missing_ok=True)
    children: dict[int, Path | None] = {}  # pid -> job directory (None: aborted start)
    last_used = time.monotonic()
    try:
        while children or time.monotonic() - last_used < idle_s:
            ready, _, _ = select.select([listener], [], [], 0.2)
            _reap(children)
            if not ready:
                continue
            conn, _ = listener.accept()
            last_used = time.monotonic()
            with conn:
                conn.settimeout(5.0)
                _serve_one(conn, compute, (listener.fileno(), lock_fd), children)
    finally:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        listener.close()
    logger.info("idle for %.0f s; exiting", idle_s)
    return 0


def _serve_one(
    conn: socket.socket,
    compute: Compute,
    inherited: tuple[int, ...],
    children: dict[int, Path | None],
) -> None:
    """Answer one request: fork the worker, reply, and let it start once the client confirms.

    The child waits on a pipe before doing anything: if the reply cannot be delivered or
    the client does not confirm within :data:`_ACK_TIMEOUT_S` (its supervisor died, or gave
    up and started the job cold), the child exits untouched, so no job ever has two
    workers or an unsupervised one. ``inherited`` are the server's descriptors (listening
    socket, lock) the child closes: a child holding the lock would keep a dead server's
    successor from starting.
    """
    try:
        request = json.loads(conn.makefile("rb").readline())
        job_dir = Path(request["job_dir"])
        env = {str(k): str(v) for k, v in request["env"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        _reply(conn, WarmStart(error=f"bad request: {exc}"))
        return
    if not (job_dir / "spec.json").exists():
        _reply(conn, WarmStart(error=f"{job_dir} is not a job directory (no spec.json)"))
        return
    if threading.active_count() != 1:
        n = threading.active_count()
        _reply(conn, WarmStart(error=f"server runs {n} Python threads; not forking"))
        return
    go_read, go_write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child never returns into the server loop
        code = 1
        try:
            os.setsid()  # its own session and group at once: the supervisor kills the group
            os.close(go_write)
            conn.close()
            for fd in inherited:
                os.close(fd)
            started = os.read(go_read, 1) == b"1"
            os.close(go_read)
            if started:
                code = _run_child(job_dir, env, compute)
        except BaseException:
            traceback.print_exc()  # into worker.log once _run_child has redirected stderr
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    os.close(go_read)
    children[pid] = None  # not the job's worker until the client confirms
    confirmed = False
    try:
        _send(conn, WarmStart(pid=pid, start_time=process_start_time(pid)))
        conn.settimeout(_ACK_TIMEOUT_S)
        confirmed = conn.makefile("rb").readline().strip() == b"go"
    except OSError as exc:
        logger.warning("reply for %s not confirmed (%s)", job_dir, exc)
    if confirmed:
        children[pid] = job_dir
        os.write(go_write, b"1")
    else:
        logger.warning("worker %d for %s not started: the client did not confirm", pid, job_dir)
    os.close(go_write)


def _send(conn: socket.socket, reply: WarmStart) -> None:
    conn.sendall(reply.model_dump_json().encode() + b"\n")


def _reply(conn: socket.socket, reply: WarmStart) -> None:
    with contextlib.suppress(OSError):  # a client that left does not stop the server
        _send(conn, reply)


def _reap(children: dict[int, Path | None]) -> None:
    """Collect ended children; write each one's :class:`WorkerExit` into its job directory."""
    while children:
        try:
            pid, status, usage = os.wait4(-1, os.WNOHANG)
        except ChildProcessError:
            children.clear()
            return
        if pid == 0:
            return
        job_dir = children.pop(pid, None)
        if job_dir is None:  # an aborted start, or not ours
            continue
        ended = WorkerExit(
            returncode=os.waitstatus_to_exitcode(status), cpu_s=usage.ru_utime + usage.ru_stime
        )
        tmp = job_dir / f".exit.json.{os.getpid()}.tmp"
        with contextlib.suppress(OSError):  # a job directory removed under us
            tmp.write_text(ended.model_dump_json())
            os.replace(tmp, job_dir / "exit.json")


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        raise SystemExit("usage: python -m adapters.warm_workers <worker_module> <socket_path>")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    idle_s = float(os.environ.get("CLOUDLAB_WARM_IDLE_S", _DEFAULT_IDLE_S))
    path = Path(args[1])
    try:
        return serve(args[0], path, idle_s=idle_s)
    except Exception:  # the server's own process: the traceback is what its clients will read
        path.with_suffix(".failed").write_text(traceback.format_exc())
        raise


if __name__ == "__main__":
    raise SystemExit(main())
