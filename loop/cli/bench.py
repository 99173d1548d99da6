"""``cloudlab bench``: run a benchmark config (strategies x seeds on simulated loops)."""

from __future__ import annotations

from pathlib import Path

import typer


def register(app: typer.Typer) -> None:
    app.command("bench")(bench)


def bench(
    config: Path = typer.Argument(..., help="Benchmark YAML (configs/bench_*.yaml)."),
    out: Path | None = typer.Option(
        None, "--out", "-o", help="Output dir (default benchmarks/results/<name>)."
    ),
    seeds: int | None = typer.Option(
        None, help="Override the number of seeds (e.g. 2 for a smoke run)."
    ),
) -> None:
    """Run every strategy x batch size x seed; write JSON, a Markdown table and plots."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from loop.bench import load_bench, run_bench

    spec, _ = load_bench(config)
    n_runs = len(spec.strategies) * len(spec.batch_sizes) * (seeds or spec.seeds)
    directory = out or Path("benchmarks/results") / spec.name
    console = Console(stderr=True)
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
    ) as bar:
        task = bar.add_task(f"bench {spec.name}", total=n_runs)
        summary = run_bench(config, directory, seeds=seeds, on_done=lambda name: bar.advance(task))
    console.print((directory / f"{spec.name}.md").read_text())
    console.print(f"results: {directory / (spec.name + '.json')} (wall {summary['wall_s']:.0f} s)")
