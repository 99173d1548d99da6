"""``cloudlab run | resume | status | report``: thin wrappers over :mod:`loop.campaign`."""

from __future__ import annotations

from pathlib import Path

import typer


def register(app: typer.Typer) -> None:
    app.command("run")(run)
    app.command("resume")(resume)
    app.command("status")(status)
    app.command("report")(report)


def _default_out(name: str) -> Path:
    return Path("runs") / name


def run(
    config: Path = typer.Argument(..., help="Campaign YAML (see configs/)."),
    out: Path | None = typer.Option(
        None, "--out", "-o", help="Campaign directory (default runs/<the config's name:>)."
    ),
    budget: int | None = typer.Option(
        None, "--budget", min=1, help="Override budget.experiments (a new config: use a new --out)."
    ),
    report_after: bool = typer.Option(
        True, "--report/--no-report", help="Write the report when done."
    ),
) -> None:
    """Run a campaign (or continue the one already in --out with the same config)."""
    from loop.campaign import Campaign
    from loop.config import load_config

    cfg = load_config(config)  # fails before anything starts
    if budget is not None:
        from loop.config import parse_config

        data = cfg.model_dump(mode="json")
        data["budget"]["experiments"] = budget
        cfg = parse_config(data, source=f"{config} with --budget {budget}")
    directory = out or _default_out(cfg.name)
    _drive(Campaign(cfg, directory), directory, report_after)


def resume(
    directory: Path = typer.Argument(..., help="Campaign directory holding campaign.sqlite."),
    report_after: bool = typer.Option(True, "--report/--no-report"),
) -> None:
    """Resume an interrupted campaign: reconcile in-flight jobs, then continue."""
    from loop.campaign import Campaign

    _drive(Campaign.resume(directory), directory, report_after)


def _drive(campaign: object, directory: Path, report_after: bool) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from loop.campaign import Campaign
    from loop.campaign import Progress as LoopProgress

    assert isinstance(campaign, Campaign)
    console = Console(stderr=True)
    console.print(f"[bold]{campaign.config.name}[/]: {campaign.spec.describe()} -> {directory}")
    target = campaign.config.objective.target
    if (done := campaign.finished()) is not None:
        value, cid = campaign.best()
        best = "-" if value is None else f"{value:.4g} {campaign.unit()}".strip() + f" ({cid})"
        console.print(f"already complete ({done}); best {target} {best}; nothing to do")
        if report_after:
            from loop.report import write_report

            console.print(f"report: {write_report(directory)}")
        return
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[info]}"),
        console=console,
    ) as bar:
        task = bar.add_task(
            "experiments", total=campaign.config.budget.experiments, info="preparing pool"
        )

        unit = campaign.unit()

        def show(p: LoopProgress) -> None:
            best = (
                "-"
                if p.best_value is None
                else f"{p.best_value:.4g} {unit}".strip() + f" ({p.best_id})"
            )
            info = (
                f"measured {p.n_measured}, failed {p.n_failed}, in flight {p.n_in_flight}, "
                f"model v{p.model_version or 0}, best {best}"
            )
            if p.n_awaiting_approval:  # the approval gate: `cloudlab approve DIR ...`
                info += f", awaiting approval {p.n_awaiting_approval}"
            if p.last_warning:  # the tail holds the cause and "retry i/n in s"
                tail = (
                    p.last_warning if len(p.last_warning) <= 120 else "..." + p.last_warning[-117:]
                )
                info = escape(info) + f"\n[yellow]warning: {escape(tail)}[/]"
            else:
                info = escape(info)
            bar.update(task, completed=p.n_submitted, info=info)

        try:
            result = campaign.run(on_progress=show)
        except KeyboardInterrupt:
            console.print(f"[yellow]interrupted[/]: `cloudlab resume {directory}` continues")
            raise typer.Exit(130) from None
    console.print(
        f"stopped: {result.stop_reason}; {result.n_measured} measured, {result.n_failed} failed; "
        f"best {target} "
        + (
            "-"
            if result.best_value is None
            else f"{result.best_value:.4g} {campaign.unit()}".strip()
        )
        + f" ({result.best_id})"
    )
    t = result.timings
    console.print(
        f"time: fit {t.fit:.1f} s, scoring {t.score:.1f} s, acquisition {t.acquisition:.1f} s, "
        f"waiting on jobs {t.dispatch:.1f} s"
    )
    if report_after:
        from loop.report import write_report

        path = write_report(directory)
        console.print(f"report: {path}")


def status(directory: Path = typer.Argument(..., help="Campaign directory.")) -> None:
    """Summarise a campaign directory (safe while the campaign runs)."""
    from rich.console import Console
    from rich.table import Table

    from loop.report import summarise

    s = summarise(directory)
    console = Console()
    table = Table(title=f"campaign {s.name}", show_header=False)
    for k, v in s.rows():
        table.add_row(k, v)
    console.print(table)


def report(
    directory: Path = typer.Argument(..., help="Campaign directory."),
) -> None:
    """Write PNG plots and a Markdown summary into DIRECTORY/report/."""
    from loop.report import write_report

    typer.echo(write_report(directory))
