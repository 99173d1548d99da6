"""``cloudlab proposals | approve | reject``: the approval gate from the shell (:mod:`loop.approval`).

Safe while the campaign runs in another process: each command is one short SQLite
transaction on the campaign's store.
"""

from __future__ import annotations

from pathlib import Path

import typer


def register(app: typer.Typer) -> None:
    app.command("proposals")(proposals)
    app.command("approve")(approve)
    app.command("reject")(reject)


_BY = typer.Option(None, "--by", help="Who decides, for the audit trail (default: user@host).")


def _open(directory: Path) -> object:
    from cloud_model.errors import ConfigError
    from loop.store import STORE_FILENAME, CampaignStore

    if not (directory / STORE_FILENAME).is_file():
        raise ConfigError(
            f"{directory} is not a campaign directory (no {STORE_FILENAME}); give the --out "
            "directory of a `cloudlab run`"
        )
    return CampaignStore(directory, create=False)


def _fmt(values: list[float] | None) -> str:
    return "-" if not values else ", ".join(f"{v:.4g}" for v in values)


def proposals(
    directory: Path = typer.Argument(..., help="Campaign directory."),
    every: bool = typer.Option(False, "--all", help="Also list decided proposals (the audit)."),
) -> None:
    """List the proposals waiting for approval (with --all: every proposal and its decision)."""
    from rich.console import Console
    from rich.table import Table

    from loop.approval import list_proposals
    from loop.store import PROPOSED, CampaignStore

    store = _open(directory)
    assert isinstance(store, CampaignStore)
    with store:
        rows = list_proposals(store, status=None if every else PROPOSED)
    table = Table(title=f"{'proposals' if every else 'waiting for approval'}: {len(rows)}")
    for name in ("candidate", "formula", "model", "acquisition", "mean", "std", "proposed at"):
        table.add_column(name)
    if every:
        for name in ("status", "by", "at", "note"):
            table.add_column(name)
    for p in rows:
        d = p.detail
        acq = d.acquisition + ("" if d.acquisition_value is None else f" {d.acquisition_value:.4g}")
        cells = [p.candidate_id, d.formula or "-", f"v{d.model_version or 0}", acq,
                 _fmt(d.predicted_mean), _fmt(d.predicted_std), p.proposed_at[:19]]  # fmt: skip
        if every:
            cells += [p.status, p.decided_by or "-", (p.decided_at or "-")[:19], p.note or ""]
        table.add_row(*cells)
    console = Console()
    (console if console.is_terminal else Console(width=240)).print(table)


def approve(
    directory: Path = typer.Argument(..., help="Campaign directory."),
    ids: list[str] = typer.Argument(None, help="Candidate ids of waiting proposals."),
    every: bool = typer.Option(False, "--all", help="Approve every waiting proposal."),
    note: str | None = typer.Option(None, "--note", help="Why (kept in the audit trail)."),
    by: str | None = _BY,
) -> None:
    """Approve proposals: the running campaign (or the next resume) submits them."""
    _decide(directory, ids or [], approve=True, every=every, note=note, by=by)


def reject(
    directory: Path = typer.Argument(..., help="Campaign directory."),
    ids: list[str] = typer.Argument(..., help="Candidate ids of waiting proposals."),
    note: str = typer.Option(..., "--note", help="Why (required; kept in the audit trail)."),
    by: str | None = _BY,
) -> None:
    """Reject proposals: they are never run nor proposed again in this campaign."""
    _decide(directory, ids, approve=False, every=False, note=note, by=by)


def _decide(
    directory: Path, ids: list[str], *, approve: bool, every: bool, note: str | None, by: str | None
) -> None:
    from loop.approval import decide, default_actor
    from loop.store import CampaignStore

    store = _open(directory)
    assert isinstance(store, CampaignStore)
    with store:
        done = decide(
            store, ids, approve=approve, actor=by or default_actor(), note=note, all_waiting=every
        )
    verb = "approved" if approve else "rejected"
    typer.echo(f"{verb} {len(done)}: {', '.join(p.candidate_id for p in done) or '-'}")
