"""Ray plumbing for the dispatcher: starting or joining Ray, and the actor that hosts an adapter.

The Ray transport (:mod:`adapters.dispatch`) never calls an adapter in the driver
process. It builds the adapter inside a Ray actor (:class:`AdapterHost`) from an
*adapter factory* and sends it batches of operations (submit / poll / cancel),
so that one Ray round trip carries many adapter calls. Batches cross the process
boundary as JSON produced and validated by pydantic
(:class:`~adapters.transport.AdapterOp`, :class:`~adapters.transport.OpOutcome`),
like every other record of the adapter contract, and the actor runs them with
the same :func:`~adapters.transport.run_op` as the in-process transport.

Starting Ray (:func:`ensure_ray`): a local Ray is started on demand, sized to the
machine (``num_cpus=os.cpu_count()``), dashboard off. Ray >= 2.60 turns token
authentication on for new local clusters: on first start it writes a random
token to ``~/.ray/auth_token`` and every process of this session uses it, so no
user action is needed. To join an existing cluster (``address="ray://..."`` or
``"host:6379"``) that runs with token auth, provide the cluster's token through
``RAY_AUTH_TOKEN``, ``RAY_AUTH_TOKEN_PATH`` or ``~/.ray/auth_token``; set
``RAY_AUTH_MODE=disabled`` to opt out on a machine whose home is read-only.
"""

from __future__ import annotations

import importlib
import logging
import os
import typing
from collections.abc import Callable
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from adapters.base import LabAdapter
from adapters.transport import decode_ops, encode_outcomes, run_op
from cloud_model.errors import CloudlabError, ConfigError

__all__ = [
    "AdapterFactory",
    "AdapterHost",
    "AdapterSpec",
    "RayRuntimeError",
    "build_adapter",
    "ensure_ray",
]

logger = logging.getLogger(__name__)


class RayRuntimeError(CloudlabError, RuntimeError):
    """Ray could not be started or joined."""


def ensure_ray(address: str | None = None, *, num_cpus: int | None = None) -> bool:
    """Make sure this process is connected to Ray; start a local Ray if needed.

    Args:
        address: a Ray cluster address to join; ``None`` starts (or reuses) a
            local Ray sized to the machine that listens on 127.0.0.1 only
            (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=1`` keeps Ray's default of
            listening on all interfaces).
        num_cpus: CPUs of a new local Ray (default: ``os.cpu_count()``).

    Returns:
        True when this call started or joined Ray, False when it was already up
        (the caller then does not own it and must not shut it down).

    Raises:
        RayRuntimeError: Ray failed to start or to connect (the message says why).
    """
    import ray

    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    try:
        if address is not None:
            ray.init(address=address, configure_logging=False, log_to_driver=False)
        else:
            # Loopback only. Every Ray server (GCS, raylet and its object manager, workers,
            # dashboard and runtime-env agents) binds 127.0.0.1 when the node IP is 127.0.0.1,
            # and Ray takes that IP only in its local-only mode (the default on macOS/Windows),
            # switched by RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0; ``_node_ip_address="127.0.0.1"``
            # is rewritten to the machine's IP otherwise. The processes Ray starts read the
            # variable; this process read it into a constant when ray was imported (perhaps
            # before this call), so both are set for the duration of ray.init. A user's own
            # value of the variable (``1``: all interfaces) is kept.
            from ray._private import ray_constants

            switch = getattr(
                ray_constants, "ENABLE_RAY_CLUSTERS_ENV_VAR", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
            )
            user_value = os.environ.get(switch)
            imported_value = getattr(ray_constants, "ENABLE_RAY_CLUSTER", None)
            if imported_value is None:  # another Ray release: only the variable is set
                logger.warning("this Ray has no local-only switch we know; it may listen widely")
            os.environ[switch] = user_value if user_value is not None else "0"
            if imported_value is not None:
                ray_constants.ENABLE_RAY_CLUSTER = os.environ[switch].lower() in ("1", "true")
            try:
                ray.init(
                    num_cpus=num_cpus or os.cpu_count() or 1,
                    include_dashboard=False,
                    configure_logging=False,
                    log_to_driver=False,  # actor logs: /tmp/ray/session_latest/logs
                )
            finally:
                if imported_value is not None:
                    ray_constants.ENABLE_RAY_CLUSTER = imported_value
                if user_value is None:
                    del os.environ[switch]
    except (ConnectionError, RuntimeError, ValueError, OSError) as exc:
        where = f"the Ray cluster at {address!r}" if address else "a local Ray"
        raise RayRuntimeError(
            f"could not start or join {where}: {exc}. If the cluster uses token auth, set "
            "RAY_AUTH_TOKEN (or RAY_AUTH_TOKEN_PATH) to its token; RAY_AUTH_MODE=disabled opts out."
        ) from exc
    logger.debug(
        "Ray %s: %s",
        "joined" if address else "started locally",
        ray.get_runtime_context().gcs_address,
    )
    return True


class AdapterSpec(BaseModel):
    """A JSON-friendly adapter factory: ``factory(**kwargs)`` is called inside the actor.

    Each keyword argument is validated against the factory's type hints first,
    so nested configs may be given as plain JSON: ``AdapterSpec(factory=
    "simulators.lab:SimulatedLab", kwargs={"truth": {...}, "units": {...},
    "config": {"capacity": 8}})`` builds a ``SimulatedLabConfig`` for ``config``.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    factory: str = Field(
        pattern=r"^[\w.]+:[\w.]+$", description="'package.module:attribute[.attr]'"
    )
    kwargs: dict[str, Any] = Field(default_factory=dict)

    def build(self) -> LabAdapter:
        """Import the factory, validate ``kwargs`` against its signature, and call it.

        Raises:
            ConfigError: the factory cannot be imported, a keyword argument is
                invalid, or the result is not a :class:`LabAdapter`.
        """
        module_name, _, attr_path = self.factory.partition(":")
        try:
            target: Any = importlib.import_module(module_name)
            for attr in attr_path.split("."):
                target = getattr(target, attr)
        except (ImportError, AttributeError) as exc:
            raise ConfigError(
                f"adapter factory {self.factory!r} cannot be imported: {exc}"
            ) from exc
        try:
            signed = typing.cast(Any, target).__init__ if isinstance(target, type) else target
            hints = typing.get_type_hints(signed)
        except (NameError, TypeError):  # unresolvable annotations: pass kwargs as they are
            hints = {}
        kwargs = dict(self.kwargs)
        for name, value in kwargs.items():
            if name in hints:
                try:
                    kwargs[name] = TypeAdapter(hints[name]).validate_python(value)
                except ValidationError as exc:
                    raise ConfigError(
                        f"adapter factory {self.factory!r}, argument {name!r}: {exc}"
                    ) from exc
        return _checked(target(**kwargs), self.factory)


AdapterFactory = Callable[[], LabAdapter] | AdapterSpec
"""A picklable zero-argument callable returning an adapter, or an :class:`AdapterSpec`."""


def build_adapter(factory: AdapterFactory) -> LabAdapter:
    """Build the adapter described by ``factory`` (called inside the actor process)."""
    if isinstance(factory, AdapterSpec):
        return factory.build()
    return _checked(factory(), repr(factory))


def _checked(adapter: object, origin: str) -> LabAdapter:
    if not isinstance(adapter, LabAdapter):
        raise ConfigError(
            f"adapter factory {origin} returned {type(adapter).__name__}, not a LabAdapter"
        )
    return adapter


class AdapterHost:
    """Holds one adapter inside a Ray actor and runs batches of calls on it.

    Used as ``ray.remote(AdapterHost)``; Ray runs one batch at a time per actor,
    which honours the contract's "one thread at a time".

    Args:
        factory: builds the adapter in this (the actor's) process.
    """

    def __init__(self, factory: AdapterFactory) -> None:
        self._adapter = build_adapter(factory)

    def describe(self) -> dict[str, Any]:
        """The adapter's name and capacity, and this process's pid (for memory sampling)."""
        return {"name": self._adapter.name, "capacity": self._adapter.capacity, "pid": os.getpid()}

    def run(self, payload: bytes) -> bytes:
        """Run a JSON batch of :class:`AdapterOp` in order; return the JSON outcomes."""
        return encode_outcomes([run_op(self._adapter, op) for op in decode_ops(payload)])

    def close(self) -> None:
        self._adapter.close()
