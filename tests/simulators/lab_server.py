"""Start the simulated lab server in a subprocess on a free loopback port (shared test helper)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from simulators.config import SimulatedLabConfig
from simulators.ground_truth import GroundTruth

TOKEN = "test-token-5b1f"
TOKEN_ENV = "CLOUDLAB_TEST_LAB_TOKEN"
REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class LabServer:
    """A running ``python -m simulators.server`` process."""

    process: subprocess.Popen[bytes]
    port: int
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self, *, crash: bool = False) -> None:
        """SIGKILL (a crash) or SIGTERM (a clean stop), then wait for the process."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL if crash else signal.SIGTERM)
            self.process.wait(timeout=30)


def start_server(
    workdir: Path,
    truth: GroundTruth,
    config: SimulatedLabConfig,
    *,
    state_dir: Path | None = None,
    faults: str = "",
    port: int | None = None,
    wait: bool = True,
) -> LabServer:
    """Write the truth and config to ``workdir`` and start a server on ``port`` (free if None)."""
    workdir.mkdir(parents=True, exist_ok=True)
    truth_file, config_file = workdir / "truth.json", workdir / "lab.json"
    truth.to_file(truth_file)
    config_file.write_text(config.model_dump_json())
    port = port or free_port()
    cmd = [sys.executable, "-m", "simulators.server", "--truth", str(truth_file), "--config", str(config_file),
           "--port", str(port), "--token-env", TOKEN_ENV, "--log-level", "warning"]  # fmt: skip
    if state_dir is not None:
        cmd += ["--state-dir", str(state_dir)]
    if faults:
        cmd += ["--faults", faults]
    return launch(cmd, port, workdir, wait=wait)


def launch(cmd: list[str], port: int, workdir: Path, *, wait: bool = True) -> LabServer:
    """Run ``cmd`` (a server listening on ``port``) with the test token in its environment."""
    log = workdir / f"server-{port}-{time.monotonic_ns()}.log"
    env = {**os.environ, TOKEN_ENV: TOKEN}
    with log.open("wb") as out:
        process = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
    server = LabServer(process=process, port=port, log=log)
    if wait:
        wait_healthy(server)
    return server


def wait_healthy(server: LabServer, timeout_s: float = 60.0) -> None:
    """Poll ``/v1/health`` until it answers 200; fail with the server's log if it dies or hangs."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            pytest.fail(
                f"lab server exited with {server.process.returncode}:\n{server.log.read_text()}"
            )
        try:
            if httpx.get(f"{server.url}/v1/health", timeout=1.0).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    server.stop(crash=True)
    pytest.fail(f"lab server not healthy after {timeout_s} s:\n{server.log.read_text()}")
