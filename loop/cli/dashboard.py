"""``cloudlab dashboard``: the live campaign page in the browser (:mod:`loop.dashboard`)."""

from __future__ import annotations

from pathlib import Path

import typer


def register(app: typer.Typer) -> None:
    app.command("dashboard")(dashboard)


def dashboard(
    directory: Path = typer.Argument(..., help="Campaign directory (running or finished)."),
    port: int = typer.Option(8787, "--port", min=1, max=65535),
    host: str = typer.Option("127.0.0.1", "--host", help="Interface (loopback by default)."),
) -> None:
    """Serve the campaign's live dashboard; prints the watcher and operator links.

    Tokens: $CLOUDLAB_DASHBOARD_WATCHER_TOKEN and $CLOUDLAB_DASHBOARD_OPERATOR_TOKEN, or
    else DIRECTORY/dashboard_tokens.json (created with random tokens, mode 0600).
    """
    from loop.dashboard.server import create_app, load_tokens

    tokens = load_tokens(directory)
    app = create_app(directory, tokens)  # fails first if the directory holds no campaign
    base = f"http://{host}:{port}/"
    typer.echo(f"watcher (read-only): {base}#token={tokens.watcher}")
    typer.echo(f"operator (approve/reject): {base}#token={tokens.operator}")
    import uvicorn

    uvicorn.run(app, host=host, port=port, log_level="warning")
