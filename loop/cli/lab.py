"""``cloudlab lab``: serve the simulated lab over HTTP, write the protocol's OpenAPI document,
write a ground-truth table for the orchestrator reference servers.

Thin wrappers over :func:`simulators.server.serve` and
:func:`simulators.server.openapi_document`. ``serve`` builds the lab's hidden
ground truth from a registry dataset (the simulators never import the registry).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from adapters.protocol import DEFAULT_TOKEN_ENV
from cloud_model.errors import ConfigError

if TYPE_CHECKING:
    from simulators.config import SimulatedLabConfig
    from simulators.ground_truth import GroundTruth

lab_app = typer.Typer(
    help="The simulated lab: serve it over the lab HTTP protocol; write the OpenAPI document.",
    no_args_is_help=True,
)


def build_truth(dataset: str, targets: list[str], splits: list[str] | None = None) -> GroundTruth:
    """The ground truth of ``targets`` over the records of a registry dataset.

    Raises:
        ConfigError: a target is not one of the dataset's.
    """
    from cloud_model.datasets import get_spec, load_dataset
    from simulators.ground_truth import GroundTruth

    spec = get_spec(dataset)
    unknown = [t for t in targets if t not in spec.targets]
    if unknown:
        raise ConfigError(
            f"dataset {dataset!r} has no target {unknown}; its targets: {sorted(spec.targets)}"
        )
    records = load_dataset(dataset, splits or None).records
    units = {t: spec.targets[t].unit for t in targets}
    return GroundTruth.from_rows(
        ((r.id, r.targets) for r in records), units, source=f"{dataset}/{','.join(targets)}"
    )


def build_config(path: Path | None, overrides: dict[str, Any]) -> SimulatedLabConfig:
    """A :class:`SimulatedLabConfig` from a YAML/JSON file (or defaults) plus command-line overrides.

    ``overrides`` maps dotted field names (``"latency.mean_s"``) to values; None values are skipped.

    Raises:
        ConfigError: the file is unreadable or the result is invalid.
    """
    from pydantic import ValidationError

    from cloud_model.yaml_file import read_yaml
    from simulators.config import SimulatedLabConfig

    data: dict[str, Any] = {}
    if path is not None:
        data = read_yaml(path, what="lab config") or {}
        if not isinstance(data, dict):
            raise ConfigError(f"lab config {path} must be a mapping of SimulatedLabConfig fields")
    for dotted, value in overrides.items():
        if value is None:
            continue
        node = data
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    try:
        return SimulatedLabConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"invalid simulated-lab config: {exc}") from exc


@lab_app.command("serve")
def serve_command(
    dataset: str = typer.Option(..., "--dataset", help="registry dataset holding the ground truth"),
    target: list[str] = typer.Option(..., "--target", help="target column to measure (repeatable)"),
    split: list[str] = typer.Option([], "--split", help="splits to include (default: all)"),
    host: str = typer.Option("127.0.0.1", "--host"),
    port: int = typer.Option(8765, "--port"),
    state_dir: Path | None = typer.Option(
        None, "--state-dir", help="persist jobs here (survives restarts)"
    ),
    config: Path | None = typer.Option(
        None, "--config", help="SimulatedLabConfig YAML; flags override it"
    ),
    noise: float | None = typer.Option(None, "--noise", help="noise sd (or floor), target units"),
    noise_relative: float | None = typer.Option(
        None, "--noise-relative", help="heteroscedastic noise: sd += this * |value|"
    ),
    failure_prob: float | None = typer.Option(
        None, "--failure-prob", help="probability an experiment fails"
    ),
    latency: float | None = typer.Option(
        None, "--latency", help="mean experiment duration, simulated s"
    ),
    latency_distribution: str | None = typer.Option(
        None, "--latency-distribution", help="fixed | exponential | lognormal"
    ),
    time_acceleration: float | None = typer.Option(
        None, "--time-acceleration", help="simulated seconds per wall-clock second"
    ),
    capacity: int | None = typer.Option(
        None, "--capacity", help="experiments run at once (robots)"
    ),
    cost: float | None = typer.Option(None, "--cost", help="cost per experiment"),
    seed: int | None = typer.Option(None, "--seed"),
    token_env: str = typer.Option(
        DEFAULT_TOKEN_ENV, "--token-env", help="env var holding the bearer token"
    ),
    faults: str = typer.Option("", "--faults", envvar="CLOUDLAB_LAB_FAULTS", hidden=True),
    log_level: str = typer.Option("info", "--log-level", help="uvicorn log level"),
) -> None:
    """Serve a simulated lab over the lab HTTP protocol (token from $CLOUDLAB_LAB_TOKEN)."""
    from simulators.faults import parse_faults
    from simulators.server import serve

    lab_config = build_config(
        config,
        {
            "noise.sigma": noise,
            "noise.kind": "heteroscedastic" if noise_relative else None,
            "noise.relative": noise_relative,
            "failure.probability": failure_prob,
            "latency.mean_s": latency,
            "latency.distribution": latency_distribution,
            "time_acceleration": time_acceleration,
            "capacity": capacity,
            "cost_per_experiment": cost,
            "seed": seed,
        },
    )
    truth = build_truth(dataset, target, split)
    typer.echo(
        f"simulated lab: {len(truth.values)} candidates of {dataset}, targets {', '.join(target)}; "
        f"http://{host}:{port}/v1 (token from ${token_env})"
    )
    serve(
        truth,
        lab_config,
        host=host,
        port=port,
        state_dir=state_dir,
        token_env=token_env,
        faults=parse_faults(faults),
        log_level=log_level,
    )


@lab_app.command("openapi")
def openapi_command(
    out: Path = typer.Option(
        Path("docs/openapi.json"), "--out", help="where to write the document"
    ),
) -> None:
    """Write the lab protocol's OpenAPI document generated from the server app."""
    from simulators.server import openapi_document

    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(openapi_document(), indent=2) + "\n")
    typer.echo(f"wrote {out}")


@lab_app.command("truth")
def truth_command(
    dataset: str = typer.Option(..., "--dataset", help="registry dataset holding the ground truth"),
    target: list[str] = typer.Option(..., "--target", help="target column to measure (repeatable)"),
    split: list[str] = typer.Option([], "--split", help="splits to include (default: all)"),
    out: Path = typer.Option(..., "--out", help="the GroundTruth JSON file to write"),
) -> None:
    """Write a simulated lab's hidden table, for the reference Bluesky profile or SiLA 2 server."""
    truth = build_truth(dataset, target, split)
    out.parent.mkdir(parents=True, exist_ok=True)
    truth.to_file(out)
    typer.echo(f"wrote {out}: {len(truth.values)} candidates of {dataset}, {', '.join(target)}")


def register(app: typer.Typer) -> None:
    """Attach the ``lab`` command group to the root app."""
    app.add_typer(lab_app, name="lab")
