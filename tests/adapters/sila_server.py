"""Start cloudlab's reference SiLA 2 server in a subprocess on loopback (shared test helper)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from simulators.config import SimulatedLabConfig
from simulators.ground_truth import GroundTruth
from tests.simulators.lab_server import REPO, free_port

PASSWORD = "sila-test-pw-93c1"
PASSWORD_ENV = "CLOUDLAB_TEST_SILA_PASSWORD"


def require_sila() -> None:
    """Skip the calling module when the sila2 package is missing."""
    pytest.importorskip("sila2")


@dataclass
class SilaServerProcess:
    """``python -m simulators.sila_server`` with its state directory."""

    workdir: Path
    insecure: bool = False
    accept_delay_s: float = 0.0
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None
    starts: int = 0

    @property
    def state_dir(self) -> Path:
        return self.workdir / "state"

    @property
    def certificate(self) -> Path:
        return self.state_dir / "server.crt"

    def start(self) -> None:
        self.starts += 1
        command = [
            sys.executable,
            "-m",
            "simulators.sila_server",
            "--truth",
            str(self.workdir / "truth.json"),
            "--config",
            str(self.workdir / "lab.json"),
            "--state-dir",
            str(self.state_dir),
            "--port",
            str(self.port),
            "--password-env",
            PASSWORD_ENV,
        ] + (["--insecure"] if self.insecure else [])
        if self.accept_delay_s:
            command += ["--accept-delay-s", str(self.accept_delay_s)]
        env = {**os.environ, PASSWORD_ENV: PASSWORD, "PYTHONPATH": str(REPO)}
        log = self.workdir / f"sila_server.{self.starts}.log"
        self.process = subprocess.Popen(
            command,
            stdout=log.open("ab"),
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
            cwd=REPO,
        )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"SiLA server exited with {self.process.returncode}; see {log}")
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            time.sleep(0.05)
        raise RuntimeError(f"SiLA server does not listen on {self.port}; see {log}")

    def stop(self, *, crash: bool = False) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGKILL if crash else signal.SIGTERM)
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)


def start_sila_server(
    workdir: Path,
    truth: GroundTruth,
    config: SimulatedLabConfig,
    *,
    insecure: bool = False,
    accept_delay_s: float = 0.0,
) -> SilaServerProcess:
    """Write the truth and lab config to ``workdir`` and start a server on a free port."""
    workdir.mkdir(parents=True, exist_ok=True)
    truth.to_file(workdir / "truth.json")
    (workdir / "lab.json").write_text(config.model_dump_json())
    server = SilaServerProcess(workdir, insecure=insecure, accept_delay_s=accept_delay_s)
    server.start()
    return server
