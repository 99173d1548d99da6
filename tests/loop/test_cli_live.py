"""The campaign console: the live display at 80 columns, log lines above it, phases in the bar."""

from __future__ import annotations

import io
import logging
import re
from collections.abc import Iterator

import pytest
from rich.console import Console
from rich.text import Text

from loop.cli.live import PROGRESS_LOGGER, CampaignDisplay, configure_logging, phases_shown_in


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root, progress = logging.getLogger(), logging.getLogger(PROGRESS_LOGGER)
    saved = (list(root.handlers), root.level, progress.propagate, progress.level)
    yield
    root.handlers[:] = saved[0]
    root.setLevel(saved[1])
    progress.propagate, progress.level = saved[2], saved[3]


def _console(width: int = 80) -> Console:
    return Console(width=width, record=True, file=io.StringIO(), force_terminal=True)


def _status(display: CampaignDisplay, n: int) -> None:
    long = (
        "measured 23, failed 1, in flight 8, model v3, "
        "best heat_ref 0.5956 eV/atom (mp-1234567_perovskite_with_a_long_id)"
    )
    display.set_status(n, [Text(long), Text("warning: lab at http://127.0.0.1:8765 " * 4)])


@pytest.mark.parametrize("width", [60, 80, 200])
def test_count_and_elapsed_survive_narrow_consoles(width: int) -> None:
    console = _console(width)
    display = CampaignDisplay(console, total=160)
    display.set_phase("fitting model v2 on 40 measurements: predicting 2048/7572 " + "x" * 80)
    _status(display, 24)
    console.print(display.get_renderable())
    text = console.export_text()
    first = text.splitlines()[0]
    assert len(first) <= width
    assert "24/160" in first  # the count ...
    assert re.search(r"\d:\d\d:\d\d", first)  # ... and the elapsed time stay on the bar's line
    assert first.startswith("fitting model v2")  # the phase leads, cut with an ellipsis
    assert "…" in first or width > 160
    assert "mp-1234567_perovskite_with_a_long_id" in text.replace("\n", "")  # status wraps below


def test_phase_records_reach_the_bar(restore_logging: None) -> None:
    console = _console()
    configure_logging(False, console)
    display = CampaignDisplay(console, total=160)
    phase = logging.getLogger(PROGRESS_LOGGER)
    with phases_shown_in(display):
        phase.debug("x", extra={"phase": "encoding SCOPE", "done": 1234, "total": 7572})
        assert display.tasks[0].fields["phase"] == "encoding SCOPE 1234/7572"
        phase.debug("x", extra={"phase": "fitting model v1 on 24 measurements"})
        phase.debug("x", extra={"phase": "predicting", "done": 256, "total": 7572, "sub": True})
        assert display.tasks[0].fields["phase"] == (
            "fitting model v1 on 24 measurements: predicting 256/7572"
        )
    phase.debug("x", extra={"phase": "after"})  # no display listens: nothing shown, nothing logged
    assert display.tasks[0].fields["phase"].endswith("predicting 256/7572")
    assert "after" not in console.export_text()


def test_a_log_line_goes_above_the_live_display(restore_logging: None) -> None:
    # not a terminal: the display draws its last frame when it stops, log lines as they come
    console = Console(width=80, record=True, file=io.StringIO(), force_terminal=False)
    configure_logging(False, console)
    display = CampaignDisplay(console, total=10)
    with display:
        display.set_phase("waiting on 4 in flight")
        _status(display, 4)
        logging.getLogger("loop.campaign").info("reconciling 4 unfinished job(s) from the store")
    lines = console.export_text().splitlines()
    assert lines[0].split() == [
        "INFO",
        "reconciling",
        "4",
        "unfinished",
        "job(s)",
        "from",
        "the",
        "store",
    ]  # a line of its own, through rich's handler
    assert lines[1].startswith("waiting on 4 in flight") and "4/10" in lines[1]  # then the bar
    assert sum("reconciling" in ln for ln in lines) == 1


def test_quiet_by_default_verbose_shows_more(restore_logging: None) -> None:
    ray_auth = logging.getLogger("ray._private.authentication.authentication_token_setup")
    console = _console()
    configure_logging(False, console)
    assert not ray_auth.isEnabledFor(logging.WARNING)  # Ray's token-auth notice
    logging.getLogger("httpx").info("HTTP Request: GET /v1/jobs")
    logging.getLogger("cloud_model.ensemble").info("fitted 3 members on 7 rows")
    logging.getLogger("loop.agent").debug("surrogate v1 fitted")
    assert console.export_text() == ""
    configure_logging(True, console)
    assert ray_auth.isEnabledFor(logging.WARNING)  # Ray's own handler prints it with -v
    logging.getLogger("cloud_model.ensemble").info("fitted 3 members on 7 rows")
    logging.getLogger("loop.agent").debug("surrogate v1 fitted")
    out = console.export_text()
    assert "fitted 3 members" in out and "surrogate v1 fitted" in out
