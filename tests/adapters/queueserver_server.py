"""Start a real Redis and a real Bluesky RE Manager on loopback (shared test helper).

The RE Manager runs cloudlab's reference profile collection
(``adapters/queueserver_profile``) against a ground-truth table written by the test.
Both processes run in their own session so that a stop kills the RE Manager's
watchdog and worker processes too.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from simulators.ground_truth import GroundTruth
from tests.simulators.lab_server import free_port

REPO = Path(__file__).resolve().parents[2]
PROFILE = REPO / "adapters" / "queueserver_profile"
BIN = Path(sys.executable).parent


def require_queueserver() -> None:
    """Skip the calling module when Redis or the queueserver packages are missing."""
    pytest.importorskip("bluesky_queueserver_api")
    pytest.importorskip("ophyd")
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed (apt-get install redis-server)")
    if not (BIN / "start-re-manager").exists():
        pytest.skip("start-re-manager is not installed (pip install 'cloudlab[orchestrators]')")


def _stop(process: subprocess.Popen[bytes] | None, *, crash: bool) -> None:
    if process is None or process.poll() is not None:
        return
    try:
        os.killpg(process.pid, signal.SIGKILL if crash else signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)


@dataclass
class QueueServer:
    """A Redis server and an RE Manager sharing one temp directory."""

    workdir: Path
    redis_port: int = field(default_factory=free_port)
    control_port: int = field(default_factory=free_port)
    info_port: int = field(default_factory=free_port)
    redis: subprocess.Popen[bytes] | None = None
    manager: subprocess.Popen[bytes] | None = None
    starts: int = 0
    private_key: str | None = None  # CurveZMQ secret key: the RE Manager then encrypts

    @property
    def control_address(self) -> str:
        return f"tcp://127.0.0.1:{self.control_port}"

    @property
    def results_dir(self) -> Path:
        return self.workdir / "results"

    def configure(
        self,
        truth: GroundTruth,
        *,
        latency_s: float = 0.05,
        noise_sigma: float = 0.0,
        fail: tuple[str, ...] = (),
        slow: dict[str, float] | None = None,
    ) -> None:
        """Write the simulated lab's settings (read by the worker when its environment opens)."""
        truth.to_file(self.workdir / "truth.json")
        settings = {
            "truth": str(self.workdir / "truth.json"),
            "results_dir": str(self.results_dir),
            "latency_s": latency_s,
            "noise_sigma": noise_sigma,
            "fail": list(fail),
            "latency_s_by_candidate": dict(slow or {}),
        }
        (self.workdir / "lab.json").write_text(json.dumps(settings))

    def start_redis(self) -> None:
        self.redis = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(self.redis_port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.workdir),
            ],
            stdout=(self.workdir / "redis.log").open("ab"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        _wait_port(self.redis_port, self.redis, self.workdir / "redis.log")

    def start_manager(self) -> None:
        """Start the RE Manager (the queue and history come back from Redis)."""
        self.starts += 1
        env = {**os.environ, "CLOUDLAB_QS_LAB": str(self.workdir / "lab.json")}
        if self.private_key is not None:
            env["QSERVER_ZMQ_PRIVATE_KEY_FOR_SERVER"] = self.private_key
        self.manager = subprocess.Popen(
            [
                str(BIN / "start-re-manager"),
                "--startup-dir",
                str(PROFILE),
                "--existing-plans-devices",
                str(self.workdir / "existing_plans_and_devices.yaml"),
                "--user-group-permissions",
                str(PROFILE / "user_group_permissions.yaml"),
                "--redis-addr",
                f"127.0.0.1:{self.redis_port}",
                "--zmq-control-addr",
                self.control_address,
                "--zmq-info-addr",
                f"tcp://127.0.0.1:{self.info_port}",
                "--zmq-publish-console",
                "OFF",
                "--console-output",
                "OFF",
            ],
            stdout=(self.workdir / f"re_manager.{self.starts}.log").open("ab"),
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
        _wait_port(self.control_port, self.manager, self.workdir / f"re_manager.{self.starts}.log")

    def kill_manager(self) -> None:
        """SIGKILL the RE Manager and its worker (a crash); Redis keeps the queue."""
        _stop(self.manager, crash=True)

    def stop(self) -> None:
        _stop(self.manager, crash=False)
        _stop(self.redis, crash=False)


def _wait_port(
    port: int, process: subprocess.Popen[bytes], log: Path, timeout_s: float = 30.0
) -> None:
    import socket

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"process exited with {process.returncode}; see {log}")
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on port {port} after {timeout_s} s; see {log}")


def start_queueserver(
    workdir: Path, truth: GroundTruth, *, keys: tuple[str, str] | None = None, **lab: object
) -> QueueServer:
    """Redis + RE Manager with the reference profile, its environment open.

    ``keys`` = (public, secret) CurveZMQ keys: the RE Manager then encrypts its channel.
    """
    from bluesky_queueserver_api.zmq import REManagerAPI

    workdir.mkdir(parents=True, exist_ok=True)
    server = QueueServer(workdir, private_key=None if keys is None else keys[1])
    server.configure(truth, **lab)  # type: ignore[arg-type]
    server.start_redis()
    try:
        server.start_manager()
        api = REManagerAPI(
            zmq_control_addr=server.control_address,
            zmq_public_key=None if keys is None else keys[0],
            timeout_recv=5,
        )
        try:
            api.environment_open()
            api.wait_for_idle(timeout=60)
        finally:
            api.close()
    except BaseException:
        server.stop()
        raise
    return server
