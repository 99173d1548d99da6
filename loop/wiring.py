"""From a campaign config to the executor the loop drives.

One typed factory, :func:`build_adapter`, turns the config's ``adapter`` section
(a discriminated union on ``kind``) into an adapter. It is used by both dispatch
modes: inline, it builds the adapter in this process; with Ray, a picklable
partial of it is what every actor calls to build its own. The simulated lab is
always built by :func:`simulators.journal.open_lab` and journalled in the
campaign directory (``lab/``), so an interrupted campaign finds every job the
lab had, in either mode.

:func:`build_executor` wraps the adapter in the one job engine
(:class:`adapters.engine.JobEngine`):

* ``mode: ray`` -- adapters in Ray actors, the engine on a background thread;
* ``mode: inline`` -- the adapter in this process, the engine driven by the
  loop; a simulated lab then runs on a virtual clock that jumps to the next
  completion instead of waiting (benchmarks take no wall time beyond compute).

When fidelities have adapters of their own (``CampaignConfig.routes_fidelities``),
the adapter the engine drives is a :class:`adapters.routing.FidelityRouter` over
one adapter per fidelity (built by :func:`build_lab`, in this process or inside
each Ray actor from a picklable partial). A fidelity's own adapter keeps its
state under ``<campaign dir>/fidelities/<name>/`` (e.g. its GPAW job
directories); the campaign's adapter keeps its usual place. A simulated lab
beside a real adapter runs on the wall clock (at its ``time_acceleration``):
real jobs take real time, so a virtual clock cannot jump over them.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from pathlib import Path

from adapters.base import Executor, LabAdapter
from adapters.engine import DispatchConfig, JobEngine
from adapters.http_lab import HttpLabAdapter, HttpLabConfig
from adapters.queueserver import QueueServerAdapter, QueueServerConfig
from adapters.sila2_lab import Sila2Adapter, SilaConfig
from adapters.transport import InProcessTransport
from loop.config import AdapterConfig, CampaignConfig, ChgnetAdapterConfig, GpawAdapterConfig
from loop.pool import Pool
from simulators.config import SimulatedLabConfig
from simulators.ground_truth import GroundTruth

__all__ = ["build_adapter", "build_executor", "build_lab", "ground_truth"]

logger = logging.getLogger(__name__)


def ground_truth(config: CampaignConfig, pool: Pool) -> GroundTruth:
    """The hidden table a simulated lab measures: the pool's labels (and every fidelity's)."""
    truth = GroundTruth(
        units=dict(pool.units),
        values={cid: dict(v) for cid, v in pool.truth.items()},
        source=str(config.pool.dataset or config.pool.file),
    )
    if config.fidelities:  # each fidelity's values under the names it reports them
        from loop.multifidelity import fidelity_columns
        from simulators.multifidelity import with_fidelity_columns

        # only the fidelities the simulated lab measures (not those with adapters of their own)
        columns, units = fidelity_columns(config.campaign_adapter_fidelities(), pool)
        truth = with_fidelity_columns(truth, columns, units)
    return truth


def build_adapter(
    config: AdapterConfig,
    *,
    directory: Path,
    truth: GroundTruth | None = None,
    virtual_time: bool = False,
) -> LabAdapter:
    """Build the adapter described by ``config``.

    Args:
        config: the campaign's ``adapter`` section.
        directory: the campaign directory (lab state and job directories live there).
        truth: what a simulated lab measures (required for ``kind: simulated``).
        virtual_time: run a simulated lab on a virtual clock (inline mode).

    Raises:
        ConfigError: the adapter cannot be built from this config.
    """
    if isinstance(config, SimulatedLabConfig):
        from simulators.journal import open_lab

        if truth is None:
            raise ValueError("a simulated lab needs its ground truth")
        return open_lab(truth, config, directory / "lab", virtual_time=virtual_time)
    if isinstance(config, GpawAdapterConfig):
        from adapters.dft import GpawAdapter

        work_dir = str(
            Path(config.work_dir or directory / "gpaw").resolve()
        )  # workers run elsewhere
        return GpawAdapter(settings={"work_dir": work_dir, **config.settings})
    if isinstance(config, ChgnetAdapterConfig):
        from adapters.mlip import ChgnetAdapter

        work_dir = str(Path(config.work_dir or directory / "chgnet").resolve())
        return ChgnetAdapter(settings={"work_dir": work_dir, **config.settings})
    if isinstance(config, HttpLabConfig):
        return HttpLabAdapter(config)
    if isinstance(config, QueueServerConfig):
        return QueueServerAdapter(config)
    if isinstance(config, SilaConfig):
        return Sila2Adapter(config)
    raise TypeError(f"no adapter for config {type(config).__name__}")


# a fidelity's own adapter: (fidelity name, its config, or None for the campaign's adapter)
Route = tuple[str, AdapterConfig | None]


def fidelity_routes(config: CampaignConfig) -> tuple[Route, ...]:
    """Each fidelity with its own adapter config (None: measured by the campaign's)."""
    return tuple((f.name, f.adapter) for f in config.fidelities)


def build_lab(
    config: AdapterConfig,
    routes: tuple[Route, ...],
    *,
    directory: Path,
    truth: GroundTruth | None = None,
    virtual_time: bool = False,
) -> LabAdapter:
    """The campaign's adapter, or a fidelity router when ``routes`` give fidelities their own.

    Args:
        config: the campaign's ``adapter`` section.
        routes: :func:`fidelity_routes` of the campaign; ``()`` for a campaign without
            routing (then this is :func:`build_adapter`).
        directory: the campaign directory; a fidelity's own adapter lives under
            ``directory/fidelities/<name>``.
        truth: what a simulated campaign adapter measures.
        virtual_time: run a simulated campaign adapter on a virtual clock (only
            without routing: see the module docstring).

    Raises:
        ConfigError: an adapter cannot be built from its config.
    """
    if not routes:
        return build_adapter(config, directory=directory, truth=truth, virtual_time=virtual_time)
    from adapters.routing import FidelityRouter

    built: list[LabAdapter] = []
    try:
        shared: LabAdapter | None = None
        adapters: dict[str, LabAdapter] = {}
        for name, own in routes:
            if own is None:
                if shared is None:
                    shared = build_adapter(config, directory=directory, truth=truth)
                    built.append(shared)
                adapters[name] = shared
            else:
                adapters[name] = build_adapter(own, directory=directory / "fidelities" / name)
                built.append(adapters[name])
        # the routing key goes to a shared adapter that can route by it; GPAW and CHGNet settings
        # refuse unknown parameters (they tell fidelities apart by each one's `parameters`)
        send = [
            name
            for name, own in routes
            if own is None
            and sum(o is None for _, o in routes) > 1
            and not isinstance(config, GpawAdapterConfig | ChgnetAdapterConfig)
        ]
        return FidelityRouter(adapters, send_fidelity=send)
    except BaseException:
        for adapter in built:
            adapter.close()
        raise


# adapters of a lab outside this process: probed once before the campaign starts
_REMOTE = (HttpLabConfig, QueueServerConfig, SilaConfig)
_PROBED = (HttpLabAdapter, QueueServerAdapter, Sila2Adapter)
_Probed = HttpLabAdapter | QueueServerAdapter | Sila2Adapter


def _write_truth(truth: GroundTruth, directory: Path) -> Path:
    """Save the simulated lab's truth for its Ray actor (atomically; same path every run).

    A large constructor argument lands in Ray's object store, and Ray then logs an
    error that a restarted actor may not find it; a path is small, and a restarted
    actor reads the file again.
    """
    path = directory / "lab" / "truth.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(truth.model_dump_json())
    tmp.replace(path)
    return path


def _simulated_lab_from_file(
    config: AdapterConfig, directory: Path, truth_file: Path, routes: tuple[Route, ...] = ()
) -> LabAdapter:
    """Build a simulated lab whose truth is the JSON file ``truth_file`` (in its actor),
    behind a fidelity router when ``routes`` give fidelities adapters of their own."""
    truth = GroundTruth.model_validate_json(truth_file.read_text())
    return build_lab(config, routes, directory=directory, truth=truth)


def adapter_factory(
    config: CampaignConfig, directory: Path, truth: GroundTruth | None
) -> Callable[[], LabAdapter]:
    """What each Ray actor calls to build its adapter (or fidelity router): a picklable partial.

    Args:
        config: the campaign config.
        directory: the campaign directory.
        truth: what a simulated campaign adapter measures (written to
            ``directory/lab/truth.json``, which the actor reads), or None.
    """
    routes = fidelity_routes(config) if config.routes_fidelities else ()
    if truth is not None:  # the actor reads the truth from disk: a small constructor arg
        return functools.partial(
            _simulated_lab_from_file,
            config.adapter,
            directory,
            _write_truth(truth, directory),
            routes,
        )
    return functools.partial(build_lab, config.adapter, routes, directory=directory)


def engine_config(config: CampaignConfig) -> DispatchConfig:
    """The engine's settings: the ``dispatch`` section without the loop's own fields, and
    each fidelity's in-flight limit (:func:`fidelity_limits`)."""
    loop_only = {"mode", "wait_for", "lab_deadline_s"}
    settings = config.dispatch.model_dump(exclude=loop_only)
    settings["group_concurrency"] = {**fidelity_limits(config), **settings["group_concurrency"]}
    return DispatchConfig(**settings)


def fidelity_limits(config: CampaignConfig) -> dict[str, int]:
    """Fidelity name -> the most of its jobs at its adapter at once.

    A fidelity's ``max_in_flight``, else the capacity of its own adapter
    (``max_parallel`` of GPAW and CHGNet, ``capacity`` of a lab; every fidelity with
    an adapter config gets an instance of its own, :func:`build_lab`). Fidelities
    measured by the campaign's adapter are limited by ``dispatch.concurrency`` only,
    unless they set ``max_in_flight``.
    """
    limits: dict[str, int] = {}
    for f in config.fidelities:
        if f.max_in_flight is not None:
            limits[f.name] = f.max_in_flight
        elif f.adapter is not None:
            limits[f.name] = _adapter_capacity(f.adapter)
    return limits


def _adapter_capacity(config: AdapterConfig) -> int:
    """Jobs the adapter built from ``config`` runs at once."""
    if isinstance(config, GpawAdapterConfig | ChgnetAdapterConfig):
        from adapters.local_adapter import LocalJobSettings

        default = LocalJobSettings.model_fields["max_parallel"].default
        return int(config.settings.get("max_parallel", default))
    return int(getattr(config, "capacity", 1))


def build_executor(config: CampaignConfig, pool: Pool, directory: Path) -> Executor:
    """The job engine over the campaign's adapter, inline or over Ray.

    A lab outside this process (HTTP, Bluesky queueserver, SiLA 2) is probed first
    (its adapter's ``probe``, from this process), so that an unreachable lab or
    refused credentials stop the campaign within seconds, before any job exists
    and before Ray starts.

    Raises:
        LabUnreachableError: the HTTP lab did not answer the probe.
        LabRefusedError: the HTTP lab refused the token.
    """
    from adapters.base import AuthError
    from loop.campaign import LabRefusedError

    def probed(adapter: _Probed, owner: LabAdapter | None = None) -> _Probed:
        """``adapter`` once it answered its probe; else ``owner`` (default: it) is closed."""
        try:
            adapter.probe()
        except AuthError as exc:
            (owner or adapter).close()
            raise LabRefusedError(
                f"{exc}. Nothing was submitted; fix the credentials and run "
                f"`cloudlab resume {directory}`"
            ) from exc
        except BaseException:
            (owner or adapter).close()
            raise
        return adapter

    routes = fidelity_routes(config) if config.routes_fidelities else ()
    uses_campaign_adapter = not routes or any(own is None for _, own in routes)
    served = [config.adapter] if uses_campaign_adapter else []  # every adapter config in use
    served += [own for _, own in routes if own is not None]
    simulated = isinstance(config.adapter, SimulatedLabConfig) and uses_campaign_adapter
    truth = ground_truth(config, pool) if simulated else None
    settings = engine_config(config)
    if config.dispatch.mode == "ray":
        from adapters.dispatch import Dispatcher

        for remote_config in served:  # the actors build their own adapters
            if isinstance(remote_config, _REMOTE):
                remote = build_adapter(remote_config, directory=directory)
                if not isinstance(remote, _PROBED):
                    raise TypeError(f"{type(remote).__name__} has no probe")
                probed(remote).close()
        return Dispatcher(adapter_factory(config, directory, truth), settings)
    # a virtual clock only when the simulated lab is all there is (real jobs take real time)
    virtual = simulated and not routes
    adapter = build_lab(
        config.adapter, routes, directory=directory, truth=truth, virtual_time=virtual
    )
    if not virtual:
        from adapters.routing import FidelityRouter

        parts = adapter.distinct if isinstance(adapter, FidelityRouter) else [adapter]
        for part in parts:  # a router is closed whole when one of its labs does not answer
            if isinstance(part, _PROBED):
                probed(part, owner=adapter)
        return JobEngine(InProcessTransport(adapter), settings)
    from simulators.clock import EngineTime, VirtualClock
    from simulators.lab import SimulatedLab

    if not (isinstance(adapter, SimulatedLab) and isinstance(adapter.clock, VirtualClock)):
        raise TypeError("an inline simulated lab must run on a virtual clock")
    lab, lab_clock = adapter, adapter.clock
    clock = EngineTime(lab_clock, scale=lab.config.time_acceleration)

    def next_completion() -> float | None:
        at = lab.next_completion_time()
        return None if at is None else clock.from_sim(at)

    return JobEngine(InProcessTransport(lab, wake_hint=next_completion), settings, clock=clock)
