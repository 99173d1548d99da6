"""The dashboard: a real uvicorn server on loopback, read with httpx and driven by headless Chromium."""

from __future__ import annotations

import os
import shutil
import stat
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import uvicorn

from cloud_model.errors import ConfigError
from loop.approval import list_proposals
from loop.dashboard.server import (
    OPERATOR_ENV,
    WATCHER_ENV,
    DashboardTokens,
    create_app,
    load_tokens,
)
from loop.store import PROPOSED, CampaignStore
from tests.loop.test_approval import _propose, pool  # noqa: F401 - the pool fixture
from tests.simulators.lab_server import free_port

TOKENS = DashboardTokens(watcher="w" * 20 + "-watch", operator="o" * 20 + "-operate")
ARTIFACTS = Path(__file__).resolve().parents[2] / "tests" / "artifacts"


class _Server:
    def __init__(self, directory: Path) -> None:
        self.port = free_port()
        config = uvicorn.Config(create_app(directory, TOKENS), host="127.0.0.1", port=self.port,
                                log_level="warning")  # fmt: skip
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> _Server:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if time.monotonic() > deadline:
                raise RuntimeError("dashboard server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


@pytest.fixture
def gated(pool: Path, tmp_path: Path) -> Path:  # noqa: F811
    """A campaign directory with four proposals waiting for approval."""
    return _propose(tmp_path, pool)


@pytest.fixture
def server(gated: Path) -> Iterator[_Server]:
    with _Server(gated) as s:
        yield s


def _statuses(directory: Path) -> dict[str, str]:
    with CampaignStore(directory, create=False) as store:
        return {p.candidate_id: p.status for p in list_proposals(store)}


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def test_watcher_reads_but_cannot_decide_operator_can(server: _Server, gated: Path) -> None:
    with httpx.Client(base_url=server.url, timeout=10) as client:
        page = client.get("/")
        assert page.status_code == 200 and "/static/dashboard.js" in page.text
        assert "http" not in client.get("/static/dashboard.js").text.split("fetch(")[0][-200:]
        assert client.get("/static/../server.py").status_code == 404
        assert client.get("/api/state").status_code == 401
        assert client.get("/api/state", headers=_bearer("wrong-token-123456")).status_code == 401
        state = client.get("/api/state", headers=_bearer(TOKENS.watcher)).json()
        assert state["role"] == "watcher" and state["name"] == "gate"
        assert state["counts"] == {"PROPOSED": 4}
        assert [p["candidate_id"] for p in state["proposals"]] == ["c00", "c01", "c02", "c03"]
        assert state["proposals"][0]["detail"]["formula"] == "BaTiF6"
        before = _statuses(gated)
        for headers in ({}, _bearer(TOKENS.watcher)):
            refused = client.post("/api/approve", json={"ids": ["c00"]}, headers=headers)
            assert refused.status_code == (403 if headers else 401), refused.text
        assert _statuses(gated) == before  # nothing changed
        ok = client.post("/api/approve", json={"ids": ["c00"], "note": "go", "by": "ann"},
                         headers=_bearer(TOKENS.operator))  # fmt: skip
        assert ok.status_code == 200 and ok.json() == {"decided": ["c00"]}
        no_note = client.post(
            "/api/reject", json={"ids": ["c01"]}, headers=_bearer(TOKENS.operator)
        )
        assert no_note.status_code == 400 and "--note" in no_note.json()["detail"]
        again = client.post("/api/reject", json={"ids": ["c00"], "note": "x"},
                            headers=_bearer(TOKENS.operator))  # fmt: skip
        assert again.status_code == 409
        bad = client.post("/api/approve", json={"idz": []}, headers=_bearer(TOKENS.operator))
        assert bad.status_code == 422
        state = client.get("/api/state", headers=_bearer(TOKENS.operator)).json()
    assert state["role"] == "operator" and state["counts"] == {"PROPOSED": 3, "CREATED": 1}
    with CampaignStore(gated, create=False) as store:
        audit = {p.candidate_id: (p.status, p.decided_by, p.note) for p in list_proposals(store)}
    assert audit["c00"] == ("APPROVED", "ann (dashboard)", "go")


def test_tokens_come_from_the_environment_or_a_private_file(
    gated: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(WATCHER_ENV, raising=False)
    monkeypatch.delenv(OPERATOR_ENV, raising=False)
    first = load_tokens(gated)
    path = gated / "dashboard_tokens.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and first.watcher != first.operator
    assert load_tokens(gated) == first  # the file is reused
    monkeypatch.setenv(WATCHER_ENV, "a" * 16)
    with pytest.raises(ConfigError, match="set both"):
        load_tokens(gated)
    monkeypatch.setenv(OPERATOR_ENV, "a" * 16)
    with pytest.raises(ConfigError, match="must differ"):
        load_tokens(gated)
    monkeypatch.setenv(OPERATOR_ENV, "short")
    with pytest.raises(ConfigError, match="16 characters"):
        load_tokens(gated)
    monkeypatch.setenv(OPERATOR_ENV, "b" * 16)
    assert load_tokens(gated) == DashboardTokens(watcher="a" * 16, operator="b" * 16)
    with pytest.raises(ConfigError, match="not a campaign directory"):
        create_app(gated / "nope", TOKENS)


_CHROMIUM, _DRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


@pytest.mark.skipif(
    not (os.path.exists(_CHROMIUM) and shutil.which(_DRIVER)), reason="needs system chromium"
)
def test_browser_sees_updates_and_approves_a_proposal(server: _Server, gated: Path) -> None:
    """Headless Chromium on the operator link of a running gated campaign: clicks approve."""
    from selenium import webdriver
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from loop.approval import decide
    from loop.campaign import Campaign
    from tests.loop.test_campaign_roles import FakeAgent, FakeExecutor

    executor = FakeExecutor()
    runner = threading.Thread(  # the campaign resumes and waits for approvals meanwhile
        target=lambda: Campaign.resume(gated).run(agent=FakeAgent(), executor=executor),
        daemon=True,
    )
    runner.start()
    options = webdriver.ChromeOptions()
    options.binary_location = _CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1400,1100"):  # fmt: skip
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(_DRIVER), options=options)
    try:
        # the page re-renders its tables on every poll: an element found may go stale
        wait = WebDriverWait(driver, 20, ignored_exceptions=[StaleElementReferenceException])
        driver.get(f"{server.url}/#token={TOKENS.operator}")
        wait.until(lambda d: d.find_element(By.ID, "role").text == "operator")
        assert "#token" not in driver.current_url  # the token left the address bar

        def rows() -> list[object]:
            return driver.find_elements(By.CSS_SELECTOR, "#pending tbody tr")

        def job_state(cid: str) -> str:
            return str(driver.execute_script(
                "const r = document.querySelector(`#jobs tr[data-id='${arguments[0]}']`);"
                "return r ? r.children[2].textContent : '';", cid))  # fmt: skip

        def click_approve(cid: str) -> bool:
            driver.find_element(By.CSS_SELECTOR, f'button.approve[data-id="{cid}"]').click()
            return True

        assert len(rows()) == 4 and executor.submitted == []
        with CampaignStore(gated, create=False) as store:  # someone else decides meanwhile
            decide(store, ["c03"], approve=False, actor="bob", note="toxic")
        wait.until(lambda d: len(rows()) == 3 and job_state("c03") == "REJECTED")
        driver.find_element(By.ID, "by").send_keys("ann")
        wait.until(lambda d: click_approve("c01"))
        # the campaign submits it, the lab measures it, the page shows it
        wait.until(lambda d: job_state("c01") == "SUCCEEDED")
        assert executor.submitted == ["gate/c01"]
        ARTIFACTS.mkdir(exist_ok=True)
        driver.save_screenshot(str(ARTIFACTS / "dashboard.png"))
    finally:
        driver.quit()
    statuses = _statuses(gated)
    assert statuses["c01"] == "APPROVED" and statuses["c03"] == "REJECTED"
    assert statuses["c00"] == statuses["c02"] == PROPOSED
    with CampaignStore(gated, create=False) as store:
        assert next(p for p in list_proposals(store) if p.candidate_id == "c01").decided_by == (
            "ann (dashboard)"
        )
        while runner.is_alive():  # let the campaign finish its budget
            if list_proposals(store, status=PROPOSED):
                decide(store, [], approve=True, actor="test", all_waiting=True)
            time.sleep(0.02)
    assert len(executor.submitted) == 6


def test_cloudlab_dashboard_serves_on_loopback_with_the_tokens_it_prints(gated: Path) -> None:
    import subprocess
    import sys

    port = free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop(WATCHER_ENV, None)
    env.pop(OPERATOR_ENV, None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "loop", "dashboard", str(gated), "--port", str(port)],
        cwd=Path(__file__).resolve().parents[2], env=env, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        links: dict[str, str] = {}
        while len(links) < 2:  # log lines (e.g. where new tokens were written) may come first
            line = proc.stdout.readline()
            if not line:
                break
            if ": http" in line:
                name, url = line.split(": ", 1)
                links[name] = url
        tokens = load_tokens(gated)  # the file the command created
        assert (
            links["watcher (read-only)"].strip()
            == f"http://127.0.0.1:{port}/#token={tokens.watcher}"
        )
        deadline = time.monotonic() + 30
        while True:
            try:
                answer = httpx.get(f"http://127.0.0.1:{port}/api/state",
                                   headers=_bearer(tokens.watcher), timeout=2)  # fmt: skip
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline and proc.poll() is None
                time.sleep(0.1)
        assert answer.status_code == 200 and answer.json()["counts"] == {"PROPOSED": 4}
    finally:
        proc.terminate()
        proc.wait(timeout=10)
