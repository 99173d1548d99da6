"""``cloudlab data``: list, inspect and fetch the registered datasets.

Thin wrappers over :mod:`cloud_model.datasets`; the rich tables and the download
progress bar live here, the library only logs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import typer
from rich.console import Console
from rich.table import Table

from cloud_model import datasets
from cloud_model.errors import DataError

if TYPE_CHECKING:
    from cloud_model.datasets import DatasetFile, DatasetSpec

data_app = typer.Typer(
    help="Registered datasets: list them, show one, fetch and verify files.", no_args_is_help=True
)


def _console() -> Console:
    console = Console()
    # piped or captured output: do not squeeze tables into 80 columns
    return console if console.is_terminal else Console(width=200)


def _where(spec: DatasetSpec) -> str:
    sources = [loc.source for loc in datasets.locate(spec.name)]
    kinds = sorted(set(sources), key=["mirror", "cache", "missing"].index)
    return " + ".join(
        f"{k} {sources.count(k)}/{len(sources)}" if len(kinds) > 1 else k for k in kinds
    )


def _rows(spec: DatasetSpec) -> str:
    """Row count per split if every file is local and verified; why not otherwise."""
    if spec.kind == "resource":
        return "-"
    if any(loc.source == "missing" for loc in datasets.locate(spec.name)):
        return "not fetched"
    try:
        result = datasets.load_dataset(spec.name)
    except DataError as exc:  # hash mismatch or unreadable file: show it, keep listing the rest
        return f"[red]error[/red]: {str(exc)[:60]}..."
    per_split = [sum(r.split == s for r in result.records) for s in spec.splits]
    bad = f" ({len(result.invalid)} invalid)" if result.invalid else ""
    return " + ".join(str(n) for n in per_split) + bad


@data_app.command("list")
def list_datasets() -> None:
    """Table of every registered dataset: kind, rows per split, targets, where it resolves from.

    The kind says what a row holds: ``cif`` or ``scope`` (a structure), ``formula`` (a
    chemical formula only), ``resource`` (a single file, no rows).
    """
    table = Table(title=f"{len(datasets.REGISTRY)} registered datasets")
    table.add_column("name", no_wrap=True)
    for column in ("kind", "splits", "rows", "targets (unit)", "resolves from"):
        table.add_column(column)
    for spec in datasets.REGISTRY.values():
        targets = ", ".join(f"{n} ({t.unit})" for n, t in spec.targets.items()) or "-"
        table.add_row(
            spec.name, spec.kind, ",".join(spec.splits), _rows(spec), targets, _where(spec)
        )
    console = _console()
    console.print(table)
    mirror = datasets.mirror_dir()
    console.print(
        f"mirror: {mirror if mirror is not None else f'({datasets.DATA_DIR_ENV} unset)'}; "
        f"cache: {datasets.cache_dir()}"
    )


@data_app.command("info")
def info(name: str = typer.Argument(..., help="Registered dataset name.")) -> None:
    """Files, URLs, hashes, local paths, targets, licence and citation of one dataset."""
    spec = datasets.get_spec(name)
    console = _console()
    console.print(f"[bold]{spec.name}[/bold] ({spec.kind}): {spec.description}")
    id_how = (
        f"column {spec.id_column!r}" + (f" prefixed {spec.id_prefix!r}" if spec.id_prefix else "")
        if spec.id_column is not None
        else f"'{spec.name}:<split>:<row>'"
    )
    holds = (
        f"formula column: {spec.formula_column} (formulas only, no structures)"
        if spec.formula_column is not None
        else f"structure column: {spec.structure_column}"
    )
    console.print(f"ids: {id_how}; {holds}; extra columns: {', '.join(spec.extra_columns) or '-'}")
    if spec.targets:
        targets = Table(title="targets")
        for column in ("name", "column", "unit", "description"):
            targets.add_column(column)
        for tname, t in spec.targets.items():
            targets.add_row(tname, t.column, t.unit, t.description)
        console.print(targets)
    console.print("files:")
    for loc in datasets.locate(spec.name):
        where = (
            f"{loc.source} {loc.path}"
            if loc.path is not None
            else f"missing (run `cloudlab data fetch {spec.name}`)"
        )
        console.print(
            f"  {loc.file.split}: {loc.file.relpath}\n    url: {datasets.file_url(loc.file)}\n"
            f"    sha256: {loc.file.sha256}\n    resolves to: {where}",
            highlight=False,
        )
    console.print(f"licence: {spec.licence}")
    console.print(f"citation: {spec.citation}")


@data_app.command("fetch")
def fetch(
    names: list[str] = typer.Argument(None, help="Dataset names (default: none; see --all)."),
    all_: bool = typer.Option(False, "--all", help="Fetch every registered dataset."),
) -> None:
    """Resolve (download into the cache if needed) and sha256-verify the files of datasets."""
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TaskID,
        TextColumn,
        TransferSpeedColumn,
    )

    chosen = list(datasets.REGISTRY) if all_ else list(names or [])
    if not chosen:
        raise typer.BadParameter("name at least one dataset, or pass --all")
    specs = [datasets.get_spec(n) for n in chosen]  # unknown names fail before any download
    console = _console()
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        console=console,
        transient=True,
    ) as bar:
        tasks: dict[str, TaskID] = {}

        def on_progress(f: DatasetFile, done: int, total: int | None) -> None:
            task = tasks.get(f.relpath)
            if task is None:
                task = tasks[f.relpath] = bar.add_task(f.relpath, total=total)
            bar.update(task, completed=done)

        resolved = {spec.name: datasets.resolve(spec.name, progress=on_progress) for spec in specs}
    for name, paths in resolved.items():
        for split, path in paths.items():
            console.print(f"{name} {split}: {path} (sha256 ok)")


def register(app: typer.Typer) -> None:
    """Attach the ``data`` command group to the root app."""
    app.add_typer(data_app, name="data")
