"""The dashboard's HTTP server: the page, a JSON snapshot, and the operator's decisions.

Routes (FastAPI, served by uvicorn on 127.0.0.1 by default):

* ``GET /`` and ``GET /static/...``: the page and its plain JavaScript and CSS, shipped
  in ``loop/dashboard/static`` (nothing is fetched from the internet);
* ``GET /api/state``: the campaign snapshot (:func:`loop.dashboard.state.snapshot`),
  for the watcher or the operator token;
* ``POST /api/approve`` and ``POST /api/reject``: decide waiting proposals
  (:func:`loop.approval.decide`), for the operator token only.

Every ``/api`` route needs ``Authorization: Bearer <token>``: none or an unknown one
is 401, the watcher token on a decision is 403. Tokens come from the environment
(``CLOUDLAB_DASHBOARD_WATCHER_TOKEN``, ``CLOUDLAB_DASHBOARD_OPERATOR_TOKEN``) or else
from ``DIR/dashboard_tokens.json``, which :func:`load_tokens` creates (mode 0600,
random tokens) the first time.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
from pathlib import Path
from typing import Annotated, Literal

from fastapi import Depends, FastAPI, Header, HTTPException
from fastapi.responses import FileResponse, JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from cloud_model.errors import CloudlabError, ConfigError
from loop.store import STORE_FILENAME, CampaignStore

__all__ = ["DashboardTokens", "create_app", "load_tokens", "serve"]

logger = logging.getLogger(__name__)

STATIC = Path(__file__).parent / "static"
TOKENS_FILE = "dashboard_tokens.json"
WATCHER_ENV = "CLOUDLAB_DASHBOARD_WATCHER_TOKEN"
OPERATOR_ENV = "CLOUDLAB_DASHBOARD_OPERATOR_TOKEN"
Role = Literal["watcher", "operator"]


class DashboardTokens(BaseModel):
    """The two bearer tokens: the watcher reads, the operator also approves and rejects."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    watcher: str = Field(min_length=16)
    operator: str = Field(min_length=16)

    def role_of(self, token: str) -> Role | None:
        """The role a token grants (compared in constant time), or None."""
        if secrets.compare_digest(token.encode(), self.operator.encode()):
            return "operator"
        if secrets.compare_digest(token.encode(), self.watcher.encode()):
            return "watcher"
        return None


def load_tokens(directory: Path) -> DashboardTokens:
    """Tokens from the environment, else ``DIR/dashboard_tokens.json`` (created if missing).

    Raises:
        ConfigError: only one of the two variables is set, a token is shorter than 16
            characters, both are equal, or the tokens file is not valid.
    """
    watcher, operator = os.environ.get(WATCHER_ENV), os.environ.get(OPERATOR_ENV)
    source = f"${WATCHER_ENV} / ${OPERATOR_ENV}"
    if (watcher is None) != (operator is None):
        raise ConfigError(f"set both {WATCHER_ENV} and {OPERATOR_ENV}, or neither")
    if watcher is None:
        path = directory / TOKENS_FILE
        source = str(path)
        if not path.is_file():
            data = {"watcher": secrets.token_urlsafe(24), "operator": secrets.token_urlsafe(24)}
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as fh:
                json.dump(data, fh, indent=1)
            logger.info("dashboard tokens written to %s (mode 0600)", path)
        try:
            raw = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise ConfigError(f"{path}: not a JSON file of dashboard tokens: {exc}") from exc
    else:
        raw = {"watcher": watcher, "operator": operator}
    try:
        tokens = DashboardTokens.model_validate(raw)
    except ValueError as exc:
        raise ConfigError(f"{source}: dashboard tokens need 'watcher' and 'operator', each "
                          f"16 characters or more ({exc.__class__.__name__})") from None  # fmt: skip
    if tokens.watcher == tokens.operator:
        raise ConfigError(f"{source}: the watcher and operator tokens must differ")
    return tokens


class DecisionBody(BaseModel):
    """An operator's approve or reject request."""

    model_config = ConfigDict(extra="forbid")

    ids: list[str] = Field(default_factory=list, max_length=10_000)
    all_waiting: bool = False
    note: str | None = Field(default=None, max_length=2000)
    by: str | None = Field(default=None, max_length=200)  # a name for the audit trail


def create_app(directory: Path, tokens: DashboardTokens) -> FastAPI:
    """The dashboard app for the campaign in ``directory``.

    Raises:
        ConfigError: ``directory`` holds no campaign store.
    """
    directory = Path(directory)
    if not (directory / STORE_FILENAME).is_file():
        raise ConfigError(
            f"{directory} is not a campaign directory (no {STORE_FILENAME}); give the --out "
            "directory of a `cloudlab run`"
        )
    app = FastAPI(title="cloudlab dashboard", docs_url=None, redoc_url=None, openapi_url=None)

    def role(authorization: Annotated[str | None, Header()] = None) -> Role:
        scheme, _, token = (authorization or "").partition(" ")
        found = tokens.role_of(token.strip()) if scheme.lower() == "bearer" else None
        if found is None:
            raise HTTPException(401, "missing or unknown token: send 'Authorization: Bearer "
                                     "<watcher or operator token>'")  # fmt: skip
        return found

    # dependencies are given as defaults: annotations naming these local functions would not
    # resolve (they are strings under `from __future__ import annotations`)
    def operator(who: Role = Depends(role)) -> Role:
        if who != "operator":
            raise HTTPException(403, "the watcher token is read-only: approving and rejecting "
                                     "need the operator token")  # fmt: skip
        return who

    @app.get("/", include_in_schema=False)
    def index() -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type="text/html")

    @app.get("/static/{name}", include_in_schema=False)
    def static(name: str) -> FileResponse:
        path = STATIC / name
        if "/" in name or name.startswith(".") or not path.is_file():
            raise HTTPException(404, f"no static file {name!r}")
        return FileResponse(path)

    @app.get("/api/state")
    def state(who: Role = Depends(role)) -> JSONResponse:
        from loop.dashboard.state import snapshot

        return JSONResponse({"role": who, **snapshot(directory)})

    def _decide(body: DecisionBody, approve: bool) -> JSONResponse:
        from loop.approval import decide

        actor = f"{(body.by or '').strip() or 'operator'} (dashboard)"
        try:
            with CampaignStore(directory, create=False) as store:
                done = decide(store, body.ids, approve=approve, actor=actor, note=body.note,
                              all_waiting=body.all_waiting)  # fmt: skip
        except CloudlabError as exc:
            raise HTTPException(409 if "already" in str(exc) else 400, str(exc)) from None
        return JSONResponse({"decided": [p.candidate_id for p in done]})

    @app.post("/api/approve")
    def approve(body: DecisionBody, _: Role = Depends(operator)) -> JSONResponse:
        return _decide(body, approve=True)

    @app.post("/api/reject")
    def reject(body: DecisionBody, _: Role = Depends(operator)) -> JSONResponse:
        return _decide(body, approve=False)

    return app


def serve(directory: Path, *, host: str = "127.0.0.1", port: int = 8787) -> None:
    """Serve the dashboard with uvicorn until interrupted."""
    import uvicorn

    app = create_app(directory, load_tokens(directory))
    uvicorn.run(app, host=host, port=port, log_level="warning")
