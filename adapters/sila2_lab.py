"""SiLA 2 adapter: experiments as observable commands of an ExperimentRunner server.

A lab device or orchestrator that serves cloudlab's ExperimentRunner feature
(``adapters/sila_feature/ExperimentRunner.sila.xml``; reference server:
:mod:`simulators.sila_server`) plugs in through :class:`Sila2Adapter`:

* **submit** calls the observable command ``RunExperiment(CandidateId, Structure,
  Targets, IdempotencyKey)``; the handle's job id is the command execution UUID.
  The server starts at most one experiment per idempotency key: a second call with
  the key (a retried submit, or a re-attach after a restart) follows the first one;
* **poll** reads the experiment's state with ``GetExperiment(IdempotencyKey)`` (the
  lab's own record: it survives a server restart, which a command execution UUID
  does not) and adds the progress and estimated remaining time of the command's
  execution info stream to the status message;
* **result** is the command response of ``RunExperiment`` when this adapter still
  follows the execution, else the values ``GetExperiment`` returns (after a restart);
* **cancel** is ``CancelExperiment(IdempotencyKey)``.

Security as SiLA 2 expects: TLS, trusting the server's certificate from ``ca_file``
(a self-signed one for a lab's own server); plain gRPC only with an explicit
``insecure: true``. Credentials: the SiLA core AuthenticationService ``Login`` with
``user`` and the password in the variable named by ``password_env``; the access token
goes with every call as the AuthorizationService ``AccessToken`` metadata, and is
renewed once when the server no longer knows it (a restarted server).

Errors: a server that does not answer is transient; a TLS mismatch, refused
credentials (:class:`AuthError`), an unknown experiment (LOST) and an invalid
experiment are permanent, each naming the setting to check.

The ``sila2`` package is imported only when an adapter is built
(``pip install 'cloudlab[orchestrators]'``).
"""

from __future__ import annotations

import logging
import os
import socket
import ssl
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, model_validator

from adapters.base import (
    AuthError,
    ExperimentRequest,
    JobHandle,
    JobNotFoundError,
    JobState,
    JobStatus,
    LabAdapter,
    MeasuredValue,
    Measurement,
    PermanentAdapterError,
    ResultNotReadyError,
    TransientAdapterError,
)

__all__ = ["FEATURE_XML", "SILA_USER_DEFAULT", "Sila2Adapter", "SilaConfig"]

logger = logging.getLogger(__name__)

FEATURE_XML = Path(__file__).with_name("sila_feature") / "ExperimentRunner.sila.xml"
FEATURE_ID = "org.cloudlab/experiments/ExperimentRunner/v1"
SILA_USER_DEFAULT = "cloudlab"
_T = TypeVar("_T")


class SilaConfig(BaseModel):
    """How to reach one SiLA 2 server that implements ExperimentRunner."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["sila"] = "sila"
    name: str = Field(default="sila", min_length=1, description="stored with each job")
    host: str = Field(default="127.0.0.1", min_length=1)
    port: int = Field(default=50052, ge=1, le=65535)
    ca_file: Path | None = Field(
        default=None, description="PEM certificate(s) to trust, e.g. the server's self-signed one"
    )
    insecure: bool = False  # plain gRPC, no TLS: only when asked for explicitly
    user: str = Field(default=SILA_USER_DEFAULT, min_length=1)
    password_env: str = Field(default="CLOUDLAB_SILA_PASSWORD", min_length=1)
    capacity: int = Field(default=1, ge=1, description="experiments the lab runs at once")
    cost_per_experiment: float = Field(default=1.0, ge=0)
    max_attempts: int = Field(default=3, ge=1, description="tries per call, the first included")
    backoff_initial_s: float = Field(default=0.5, ge=0)
    backoff_max_s: float = Field(default=10.0, ge=0)

    @model_validator(mode="after")
    def _tls_or_insecure(self) -> SilaConfig:
        if self.insecure and self.ca_file is not None:
            raise ValueError("set either ca_file (TLS) or insecure: true (plain gRPC), not both")
        return self


class Sila2Adapter(LabAdapter):
    """A :class:`LabAdapter` over a SiLA 2 ExperimentRunner server.

    Args:
        config: where the server is and how to authenticate.

    Raises:
        AuthError: the password variable is unset.
        PermanentAdapterError: ``sila2`` is not installed, or ``ca_file`` is unreadable.
    """

    def __init__(self, config: SilaConfig) -> None:
        self.config = config
        self.name = config.name
        self.capacity = config.capacity
        try:
            import sila2.client  # noqa: F401
        except ImportError as exc:
            raise PermanentAdapterError(
                "adapter kind sila needs the sila2 package: pip install 'cloudlab[orchestrators]'"
            ) from exc
        self._password = os.environ.get(config.password_env, "")
        if not self._password:
            raise AuthError(
                f"environment variable {config.password_env} (adapter.password_env) is not set: "
                f"export the password of SiLA user {config.user} for {self._where}"
            )
        self._root_certs: bytes | None = None
        if config.ca_file is not None:
            try:
                self._root_certs = config.ca_file.read_bytes()
            except OSError as exc:
                raise PermanentAdapterError(
                    f"cannot read adapter.ca_file {config.ca_file}: {exc}"
                ) from exc
        self._client: Any = None
        self._token: str | None = None
        self._instances: dict[str, Any] = {}  # key -> the RunExperiment execution we follow
        self._handles: dict[str, JobHandle] = {}
        self._requests: dict[str, ExperimentRequest] = {}
        self._connection = 0  # counts the clients built; an execution belongs to one of them
        self._instance_connection: dict[str, int] = {}

    @property
    def _where(self) -> str:
        return f"SiLA server {self.config.host}:{self.config.port}"

    # ------------------------------------------------------------------ contract
    def submit(self, request: ExperimentRequest, idempotency_key: str) -> JobHandle:
        known = self._handles.get(idempotency_key)
        if known is not None:
            return known

        def run() -> JobHandle:
            from sila2.framework.errors.defined_execution_error import DefinedExecutionError

            runner = self._connect().ExperimentRunner
            try:  # an unobservable call first: it checks the token before anything starts
                runner.GetExperiment(idempotency_key, metadata=self._metadata())
            except DefinedExecutionError as exc:
                if _identifier(exc) != "UnknownExperiment":
                    raise
            instance = self._start(runner, request, idempotency_key)
            return JobHandle(
                adapter=self.name,
                job_id=str(instance.execution_uuid),
                idempotency_key=idempotency_key,
                candidate_id=request.candidate_id,
            )

        handle = self._retrying(f"submit {idempotency_key}", run)
        self._handles[idempotency_key] = handle
        self._requests[idempotency_key] = request
        return handle

    def _start(self, runner: Any, request: ExperimentRequest, key: str) -> Any:
        """Call RunExperiment and follow the execution it returns."""
        instance = runner.RunExperiment(
            request.candidate_id,
            request.structure_cif or "",
            list(request.targets),
            key,
            metadata=self._metadata(),
        )
        self._instances[key] = instance
        self._instance_connection[key] = self._connection
        return instance

    def _restart_lost(self, key: str) -> bool:
        """Run a submitted experiment again that the server never recorded, if its execution
        was lost with a connection (a server that stopped between accepting RunExperiment and
        starting it). The server starts at most one experiment per key, so this is safe."""
        request = self._requests.get(key)
        if request is None or self._instance_connection.get(key) == self._connection:
            return False
        logger.info(
            "%s: experiment %s was never started there; submitting it again", self._where, key
        )
        self._retrying(
            f"resubmit {key}",
            lambda: self._start(self._connect().ExperimentRunner, request, key),
        )
        return True

    def poll(self, handle: JobHandle) -> JobStatus:
        try:
            state, message, _ = self._experiment(handle)
        except JobNotFoundError:
            # the server records an experiment only once RunExperiment starts executing; an
            # invalid one is never recorded and fails the command itself
            instance = self._instances.get(handle.idempotency_key)
            if instance is None:
                raise
            if self._restart_lost(handle.idempotency_key):
                return JobStatus(job_id=handle.job_id, state=JobState.QUEUED)
            if not instance.done:
                return JobStatus(job_id=handle.job_id, state=JobState.QUEUED)
            failure = _command_error(instance)
            if failure is None:
                raise
            return JobStatus(job_id=handle.job_id, state=JobState.FAILED, message=failure)
        if state is JobState.RUNNING:
            message = self._progress(handle.idempotency_key) or message
        return JobStatus(job_id=handle.job_id, state=state, message=message)

    def result(self, handle: JobHandle) -> Measurement:
        key = handle.idempotency_key
        state = self.poll(handle).state
        if state is not JobState.SUCCEEDED:
            raise ResultNotReadyError(f"experiment {key} is {state.value}, not SUCCEEDED")
        values: list[Any] | None = None
        instance = self._instances.get(key)
        if instance is not None and _finished_ok(instance):
            try:
                values = list(instance.get_responses().Values)  # the command response
            except Exception as exc:  # noqa: BLE001 - the execution may be gone (restart)
                logger.info("RunExperiment response of %s unavailable (%s)", key, exc)
        if values is None:
            _, _, values = self._experiment(handle)  # the lab's record (after a restart)
        measured = {
            v.Target: MeasuredValue(
                value=float(v.Value),
                unit=str(v.Unit),
                uncertainty=None if v.Uncertainty < 0 else float(v.Uncertainty),
            )
            for v in values
        }
        return Measurement(
            job_id=handle.job_id,
            candidate_id=handle.candidate_id,
            values=measured,
            cost=self.config.cost_per_experiment,
            finished_at=datetime.now(UTC),
            provenance={
                "orchestrator": "sila2",
                "server": f"{self.config.host}:{self.config.port}",
                "feature": FEATURE_ID,
                "command_execution_uuid": handle.job_id,
            },
        )

    def cancel(self, handle: JobHandle) -> JobStatus:
        key = handle.idempotency_key

        def run() -> str:
            runner = self._connect().ExperimentRunner
            return str(runner.CancelExperiment(key, metadata=self._metadata()).State)

        state = JobState(self._retrying(f"cancel {key}", run))
        return JobStatus(job_id=handle.job_id, state=state)

    def close(self) -> None:
        self._drop_client()

    def __enter__(self) -> Sila2Adapter:
        return self

    # -------------------------------------------------------------------- extras
    def probe(self) -> None:
        """Connect and log in once, so that a wrong address, TLS setting or password fails now."""
        self._retrying("probe", self._connect)

    # ------------------------------------------------------------------ internals
    def _experiment(self, handle: JobHandle) -> tuple[JobState, str | None, list[Any]]:
        key = handle.idempotency_key

        def run() -> tuple[JobState, str | None, list[Any]]:
            runner = self._connect().ExperimentRunner
            answer = runner.GetExperiment(key, metadata=self._metadata())
            return JobState(str(answer.State)), (str(answer.Message) or None), list(answer.Values)

        return self._retrying(f"poll {key}", run)

    def _progress(self, key: str) -> str | None:
        instance = self._instances.get(key)
        if instance is None or instance.progress is None:
            return None
        remaining = instance.estimated_remaining_time
        left = f", {remaining.total_seconds():.1f} s left" if remaining is not None else ""
        progress = float(instance.progress)
        return f"{100 * progress if progress <= 1 else progress:.0f} %{left}"

    def _connect(self) -> Any:
        """The connected, logged-in client (built on first use and after a lost connection)."""
        if self._client is not None:
            return self._client
        from sila2.client import SilaClient

        cfg = self.config
        try:
            if cfg.insecure:
                client = SilaClient(cfg.host, cfg.port, insecure=True)
            else:
                client = SilaClient(cfg.host, cfg.port, root_certs=self._root_certs)
        except Exception as exc:  # noqa: BLE001 - grpc, ssl and sila2 raise many kinds
            raise self._connection_error(exc) from exc
        if FEATURE_ID not in {str(f.fully_qualified_identifier) for f in client._features.values()}:
            client.close()
            raise PermanentAdapterError(
                f"{self._where} does not implement {FEATURE_ID}: check adapter.host and adapter.port"
            )
        self._client = client
        self._connection += 1
        try:
            self._login()
        except BaseException:
            self._drop_client()
            raise
        return client

    def _login(self) -> None:
        from sila2.framework.errors.defined_execution_error import DefinedExecutionError

        cfg = self.config
        try:
            answer = self._client.AuthenticationService.Login(
                cfg.user,
                self._password,
                str(self._client.SiLAService.ServerUUID.get()),
                [FEATURE_ID],
            )
        except DefinedExecutionError as exc:
            raise AuthError(
                f"{self._where} refused the login of user {cfg.user} ({exc.message}): check "
                f"adapter.user and the password in ${cfg.password_env} (adapter.password_env)"
            ) from exc
        self._token = str(answer.AccessToken)

    def _metadata(self) -> list[Any]:
        return [self._client.AuthorizationService.AccessToken(self._token)]

    def _drop_client(self) -> None:
        client, self._client, self._token = self._client, None, None
        if client is not None:
            try:
                client.close()
            except Exception as exc:  # noqa: BLE001 - closing a broken channel
                logger.debug("closing the SiLA client: %s", exc)

    def _connection_error(self, exc: BaseException) -> AdapterConnectionError | SilaTlsError:
        """What a failed connection means: gRPC says only UNAVAILABLE, so TLS is checked here."""
        cfg = self.config
        text = f"{type(exc).__name__}: {exc}"
        tls = self._tls_mismatch()
        if tls is not None:
            return SilaTlsError(f"{self._where}: {tls}")
        hint = (
            "; if the server uses TLS, set adapter.ca_file instead of adapter.insecure"
            if cfg.insecure
            else "; if the server is plain gRPC, set adapter.insecure: true"
        )
        return AdapterConnectionError(
            f"{self._where} unreachable ({text}): check adapter.host and adapter.port{hint}"
        )

    def _tls_mismatch(self) -> str | None:
        """One direct TLS handshake: why TLS does not fit this server, or None if it does
        (or if nothing listens at all)."""
        cfg = self.config
        try:
            sock = socket.create_connection((cfg.host, cfg.port), timeout=3.0)
        except OSError:
            return None  # nothing listens: unreachable, not a TLS problem
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.set_alpn_protocols(["h2"])
        if cfg.insecure:
            context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
        elif self._root_certs is not None:
            context.load_verify_locations(cadata=self._root_certs.decode("ascii", "replace"))
        else:
            context.load_default_certs()
        try:
            with context.wrap_socket(sock, server_hostname=cfg.host):
                pass
        except ssl.SSLCertVerificationError as exc:
            return (
                f"the server's TLS certificate is not trusted ({exc.verify_message}): set "
                f"adapter.ca_file (now {cfg.ca_file}) to the server's certificate"
            )
        except (ssl.SSLError, OSError) as exc:
            if cfg.insecure:
                return None
            return (
                f"no TLS handshake ({type(exc).__name__}: {exc}): the server may be plain gRPC; "
                "SiLA 2 expects TLS, so prefer enabling it there, or set adapter.insecure: true"
            )
        finally:
            sock.close()
        if cfg.insecure:
            return (
                "the server speaks TLS but adapter.insecure is true: set adapter.ca_file to "
                "the server's certificate instead of adapter.insecure"
            )
        return None

    def _retrying(self, what: str, call: Callable[[], _T]) -> _T:
        from sila2.framework.errors.defined_execution_error import DefinedExecutionError
        from sila2.framework.errors.sila_connection_error import SilaConnectionError

        cfg = self.config
        last = ""
        renewed = False
        n = 0
        while True:
            n += 1
            try:
                return call()
            except SilaTlsError:
                raise
            except AdapterConnectionError as exc:
                last = str(exc)
            except SilaConnectionError as exc:
                self._drop_client()  # reconnect (and log in again) on the next try
                last = f"{self._where}: {exc}"
            except DefinedExecutionError as exc:
                identifier = _identifier(exc)
                if identifier == "InvalidAccessToken" and not renewed:
                    renewed = True  # a restarted server forgot our token: log in once more
                    logger.info(
                        "%s: %s forgot the access token; logging in again", what, self._where
                    )
                    self._drop_client()
                    n -= 1
                    continue
                if identifier == "UnknownExperiment":
                    raise JobNotFoundError(f"{what}: {self._where}: {exc.message}") from exc
                if identifier in ("AuthorizationFailed", "InvalidAccessToken"):
                    raise AuthError(
                        f"{what}: {self._where} refused the access token of user "
                        f"{cfg.user}: {exc.message}"
                    ) from exc
                raise PermanentAdapterError(f"{what}: {identifier}: {exc.message}") from exc
            if n >= cfg.max_attempts:
                raise TransientAdapterError(f"{what}: {last} (after {n} attempts)")
            wait = min(cfg.backoff_max_s, cfg.backoff_initial_s * 2 ** (n - 1))
            logger.warning("%s: %s; retry in %.2f s", what, last, wait)
            time.sleep(wait)


class AdapterConnectionError(TransientAdapterError, ConnectionError):
    """The SiLA server did not answer (connection refused, unknown host)."""


class SilaTlsError(PermanentAdapterError, ConnectionError):
    """TLS between the adapter and the server failed: a setting to fix, not to retry."""


def _identifier(exc: Any) -> str:
    """The short identifier of a SiLA defined execution error (``UnknownExperiment``)."""
    return str(exc.fully_qualified_identifier).rsplit("/", 1)[-1]


def _command_error(instance: Any) -> str | None:
    """The error a finished RunExperiment execution ended with, if it ended with one."""
    from sila2.framework.errors.defined_execution_error import DefinedExecutionError

    try:
        instance.get_responses()
    except DefinedExecutionError as exc:
        return f"{_identifier(exc)}: {exc.message}"
    except Exception as exc:  # noqa: BLE001 - undefined or connection errors
        return f"{type(exc).__name__}: {exc}"
    return None


def _finished_ok(instance: Any) -> bool:
    from sila2.framework.command.execution_info import CommandExecutionStatus

    return bool(instance.status == CommandExecutionStatus.finishedSuccessfully)
