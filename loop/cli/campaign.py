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
    from loop.config import load_config

    cfg = load_config(config)  # fails before anything starts (and before torch is imported)
    from loop.campaign import Campaign

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
    from loop.store import STORE_FILENAME

    if not (directory / STORE_FILENAME).is_file():  # before torch is imported
        from cloud_model.errors import ConfigError

        raise ConfigError(
            f"{directory} is not a campaign directory (no {STORE_FILENAME}); give the --out "
            "directory of a `cloudlab run`"
        )
    from loop.campaign import Campaign

    _drive(Campaign.resume(directory), directory, report_after)


def _drive(campaign: object, directory: Path, report_after: bool) -> None:
    from rich.markup import escape
    from rich.text import Text

    from loop.campaign import Campaign
    from loop.campaign import Progress as LoopProgress
    from loop.cli.live import CampaignDisplay, phases_shown_in, stderr_console

    assert isinstance(campaign, Campaign)
    console = stderr_console()
    console.print(f"[bold]{campaign.config.name}[/]: {campaign.spec.describe()} -> {directory}")
    target = campaign.config.objective.target
    display = CampaignDisplay(console, campaign.config.budget.experiments)
    with display, phases_shown_in(display):
        display.set_phase("preparing pool")
        done = campaign.finished()  # loads (and encodes) the pool
        unit = campaign.unit()

        def show(p: LoopProgress) -> None:
            best = (
                "-"
                if p.best_value is None
                else f"{p.best_value:.4g} {unit}".strip() + f" ({p.best_id})"
            )
            lines = [
                Text(
                    f"measured {p.n_measured}, failed {p.n_failed}, in flight {p.n_in_flight}, "
                    f"model v{p.model_version or 0}, best {target} {best}"
                )
            ]
            if p.n_awaiting_approval:  # the approval gate: `cloudlab approve DIR ...`
                lines.append(Text(f"awaiting approval {p.n_awaiting_approval}"))
            if p.last_warning:  # the tail holds the cause and "retry i/n in s"
                tail = (
                    p.last_warning if len(p.last_warning) <= 120 else "..." + p.last_warning[-117:]
                )
                lines.append(Text.from_markup(f"[yellow]warning: {escape(tail)}[/]"))
            display.set_status(p.n_submitted, lines)

        try:
            result = campaign.run(on_progress=show)  # a finished campaign starts nothing
        except KeyboardInterrupt:
            display.stop()
            console.print(f"[yellow]interrupted[/]: `cloudlab resume {directory}` continues")
            raise typer.Exit(130) from None
        if done is not None:
            display.set_phase("already complete")
            display.set_status(result.n_submitted, [])
    if done is not None:
        value, cid = result.best_value, result.best_id
        best = "-" if value is None else f"{value:.4g} {unit}".strip() + f" ({cid})"
        console.print(
            f"already complete ({done}); best {target} {best}; nothing to do", highlight=False
        )
        if report_after:
            from loop.report import write_report

            console.print(f"report: {write_report(directory)}")
        return
    console.print(
        f"stopped: {result.stop_reason}; {result.n_measured} measured, {result.n_failed} failed; "
        f"best {target} "
        + ("-" if result.best_value is None else f"{result.best_value:.4g} {unit}".strip())
        + f" ({result.best_id})",
        highlight=False,
    )
    t = result.timings
    console.print(
        f"time: fit {t.fit:.1f} s, scoring {t.score:.1f} s, acquisition {t.acquisition:.1f} s, "
        f"waiting on jobs {t.dispatch:.1f} s",
        highlight=False,
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
