"""The simulated lab as a SiLA 2 server: cloudlab's reference ExperimentRunner implementation.

The feature (``adapters/sila_feature/ExperimentRunner.sila.xml``) has one observable
command, ``RunExperiment(CandidateId, Structure, Targets, IdempotencyKey) -> Values``,
whose execution info carries the experiment's progress and estimated remaining time,
and two unobservable commands, ``GetExperiment(IdempotencyKey)`` and
``CancelExperiment(IdempotencyKey)``. Behind them is a
:class:`~simulators.lab.SimulatedLab` journalled in a state directory, so a
restarted server knows every experiment it had and running a key again follows the
existing experiment instead of starting a second one.

Security as SiLA 2 expects: TLS with a self-signed certificate generated once and
kept in the state directory (``server.crt``, the file clients trust; the server
UUID is in it), and the SiLA core AuthenticationService/AuthorizationService
features: a client logs in with a user name and the password held in the variable
named by ``--password-env`` and sends the access token as metadata with every
ExperimentRunner call. ``--insecure`` serves plain gRPC (tests of the refusal only).

Labs copy this file and replace the simulated lab with their instrument control::

    CLOUDLAB_SILA_PASSWORD=secret python -m simulators.sila_server \\
        --truth truth.json --config lab.json --state-dir state --port 50052
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import threading
import time
import uuid
from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any, NamedTuple

from sila2.framework import Command, Feature, FullyQualifiedIdentifier, Property
from sila2.framework.errors.defined_execution_error import DefinedExecutionError
from sila2.server import FeatureImplementationBase, MetadataDict, SilaServer
from sila2.server.encryption import generate_self_signed_certificate

from adapters.base import ExperimentRequest, JobState, PermanentAdapterError
from adapters.sila2_lab import FEATURE_XML, SILA_USER_DEFAULT
from simulators.config import SimulatedLabConfig
from simulators.ground_truth import GroundTruth
from simulators.journal import open_lab
from simulators.lab import SimulatedLab

__all__ = ["ExperimentRunner", "build_server", "main"]

logger = logging.getLogger(__name__)

FEATURE = Feature(FEATURE_XML.read_text())
_WAIT_S = 0.05  # between two looks at a running experiment (wall seconds)


class _Values(NamedTuple):
    Values: list[tuple[str, float, str, float]]


class _Experiment(NamedTuple):
    State: str
    Message: str
    Values: list[tuple[str, float, str, float]]


class _State(NamedTuple):
    State: str


def _error(identifier: str, message: str) -> DefinedExecutionError:
    return DefinedExecutionError(FEATURE.defined_execution_errors[identifier], message)


class ExperimentRunner(FeatureImplementationBase):
    """The ExperimentRunner feature over a :class:`SimulatedLab`."""

    def __init__(
        self, parent_server: SilaServer, lab: SimulatedLab, *, accept_delay_s: float = 0.0
    ) -> None:
        super().__init__(parent_server=parent_server)
        self.lab = lab
        self.accept_delay_s = accept_delay_s

    def RunExperiment(  # noqa: N802 - SiLA identifiers are PascalCase
        self,
        CandidateId: str,  # noqa: N803
        Structure: str,  # noqa: N803
        Targets: list[str],  # noqa: N803
        IdempotencyKey: str,  # noqa: N803
        *,
        metadata: MetadataDict,
        instance: Any,
    ) -> _Values:
        instance.begin_execution()
        if self.accept_delay_s > 0:  # a device that takes a while to begin: nothing recorded yet
            time.sleep(self.accept_delay_s)
        try:
            request = ExperimentRequest(
                candidate_id=CandidateId, targets=tuple(Targets), structure_cif=Structure or None
            )
            handle = self.lab.submit(request, IdempotencyKey)
        except (ValueError, PermanentAdapterError) as exc:
            raise _error("InvalidExperiment", str(exc)) from None
        scale = self.lab.config.time_acceleration
        while True:
            status = self.lab.status(handle.job_id)
            if status.state.is_terminal:
                break
            progress, remaining = self.lab.schedule(handle.job_id)
            if progress is not None and remaining is not None:
                instance.progress = progress
                instance.estimated_remaining_time = timedelta(seconds=remaining / scale)
            time.sleep(_WAIT_S)
        if status.state is JobState.SUCCEEDED:
            return _Values(self._values(handle.job_id))
        if status.state is JobState.CANCELLED:
            raise _error("ExperimentCancelled", status.message or "cancelled")
        raise _error("ExperimentFailed", status.message or status.state.value)

    def GetExperiment(  # noqa: N802
        self,
        IdempotencyKey: str,  # noqa: N803
        *,
        metadata: MetadataDict,
    ) -> _Experiment:
        handle = self.lab.find(IdempotencyKey)
        if handle is None:
            raise _error("UnknownExperiment", f"no experiment has key {IdempotencyKey!r}")
        status = self.lab.status(handle.job_id)
        values = self._values(handle.job_id) if status.state is JobState.SUCCEEDED else []
        return _Experiment(status.state.value, status.message or "", values)

    def CancelExperiment(  # noqa: N802
        self,
        IdempotencyKey: str,  # noqa: N803
        *,
        metadata: MetadataDict,
    ) -> _State:
        handle = self.lab.find(IdempotencyKey)
        if handle is None:
            raise _error("UnknownExperiment", f"no experiment has key {IdempotencyKey!r}")
        return _State(self.lab.cancel_job(handle.job_id).state.value)

    def _values(self, job_id: str) -> list[tuple[str, float, str, float]]:
        measurement = self.lab.measurement(job_id)
        return [
            (target, v.value, v.unit, -1.0 if v.uncertainty is None else v.uncertainty)
            for target, v in measurement.values.items()
        ]


def _authenticated(server: SilaServer, user: str, password: str) -> None:
    """Serve the SiLA core authentication features, accepting one user/password pair."""
    from sila2.features.authenticationservice import (
        AuthenticationFailed,
        AuthenticationServiceFeature,
        Login_Responses,
    )
    from sila2.features.authorizationservice import AuthorizationServiceFeature
    from sila2.server.default_feature_implementations.authenticationservice_impl import (
        AuthenticationServiceImpl,
    )
    from sila2.server.default_feature_implementations.authorizationservice_impl import (
        AuthorizationServiceImpl,
    )

    class PasswordAuthentication(AuthenticationServiceImpl):
        def Login(  # noqa: N802
            self,
            UserIdentification: str,  # noqa: N803
            Password: str,  # noqa: N803
            RequestedServer: str,  # noqa: N803
            RequestedFeatures: list[str],  # noqa: N803
            *,
            metadata: MetadataDict,
        ) -> Login_Responses:
            if (UserIdentification, Password) != (user, password):
                raise AuthenticationFailed("unknown user or wrong password")
            return super().Login(
                "admin", "admin", RequestedServer, RequestedFeatures, metadata=metadata
            )

    class ExperimentsNeedToken(AuthorizationServiceImpl):
        def get_calls_affected_by_AccessToken(  # noqa: N802
            self,
        ) -> list[Feature | Command | Property | FullyQualifiedIdentifier]:
            return [FEATURE]

    server.set_feature_implementation(AuthenticationServiceFeature, PasswordAuthentication(server))
    server.set_feature_implementation(AuthorizationServiceFeature, ExperimentsNeedToken(server))


def _server_identity(state_dir: Path, host: str) -> tuple[uuid.UUID, bytes, bytes]:
    """The server UUID and its TLS key and certificate, created once per state directory."""
    id_file, key_file, cert_file = (
        state_dir / n for n in ("server.uuid", "server.key", "server.crt")
    )
    if not id_file.exists():
        server_uuid = uuid.uuid4()
        key, cert = generate_self_signed_certificate(server_uuid, host)
        key_file.write_bytes(key)
        key_file.chmod(0o600)
        cert_file.write_bytes(cert)
        id_file.write_text(str(server_uuid))
    return uuid.UUID(id_file.read_text().strip()), key_file.read_bytes(), cert_file.read_bytes()


def build_server(
    truth: GroundTruth,
    config: SimulatedLabConfig,
    state_dir: Path,
    *,
    user: str,
    password: str,
    host: str = "127.0.0.1",
    accept_delay_s: float = 0.0,
) -> tuple[SilaServer, SimulatedLab, bytes, bytes]:
    """The SiLA 2 server over a journalled simulated lab (not started).

    ``accept_delay_s`` wall seconds pass between accepting a RunExperiment call and
    recording the experiment, as on a device that takes time to begin; a server that
    stops in between never records it (clients must submit it again).

    Returns:
        (server, lab, TLS private key, TLS certificate).
    """
    state_dir.mkdir(parents=True, exist_ok=True)
    server_uuid, key, cert = _server_identity(state_dir, host)
    lab = open_lab(truth, config, state_dir / "lab")
    server = SilaServer(
        server_name="cloudlab simulated lab",
        server_type="CloudlabSimulatedLab",
        server_description="cloudlab's reference ExperimentRunner over a simulated lab",
        server_version="0.1",
        server_vendor_url="https://github.com/cloudlab",
        server_uuid=server_uuid,
    )
    _authenticated(server, user, password)
    server.set_feature_implementation(
        FEATURE, ExperimentRunner(server, lab, accept_delay_s=accept_delay_s)
    )
    return server, lab, key, cert


def main(argv: Sequence[str] | None = None) -> None:
    """Command line: serve a simulated lab over SiLA 2 until SIGTERM or SIGINT."""
    parser = argparse.ArgumentParser(description="cloudlab's simulated lab as a SiLA 2 server")
    parser.add_argument("--truth", type=Path, required=True, help="GroundTruth JSON file")
    parser.add_argument("--config", type=Path, help="SimulatedLabConfig JSON file")
    parser.add_argument("--state-dir", type=Path, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=50052)
    parser.add_argument("--user", default=SILA_USER_DEFAULT)
    parser.add_argument("--password-env", default="CLOUDLAB_SILA_PASSWORD")
    parser.add_argument("--insecure", action="store_true", help="plain gRPC, no TLS")
    parser.add_argument(
        "--accept-delay-s",
        type=float,
        default=0.0,
        help="wall seconds between accepting RunExperiment and recording the experiment",
    )
    args = parser.parse_args(argv)
    if args.accept_delay_s < 0:
        parser.error(f"--accept-delay-s must be >= 0, got {args.accept_delay_s}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    password = os.environ.get(args.password_env, "")
    if not password:
        parser.error(f"environment variable {args.password_env} (--password-env) is not set")
    truth = GroundTruth.from_file(args.truth)
    config = (
        SimulatedLabConfig.model_validate_json(args.config.read_text())
        if args.config
        else SimulatedLabConfig()
    )
    server, lab, key, cert = build_server(
        truth,
        config,
        args.state_dir,
        user=args.user,
        password=password,
        host=args.host,
        accept_delay_s=args.accept_delay_s,
    )
    if args.insecure:
        server.start_insecure(args.host, args.port, enable_discovery=False)
    else:
        server.start(args.host, args.port, private_key=key, cert_chain=cert, enable_discovery=False)
    logger.info("SiLA 2 server %s listening on %s:%d", server.server_uuid, args.host, args.port)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    server.stop()
    lab.close()


if __name__ == "__main__":
    main()
