"""The console of a running campaign: one live progress display, log lines above it.

Library code never prints (STYLE.md, 6). It logs, and it reports what it is busy
with on one logger, :data:`PROGRESS_LOGGER`, at DEBUG level with the phase in the
record's extras::

    logging.getLogger("cloudlab.progress").debug(
        "encoding SCOPE %d/%d", done, total,
        extra={"phase": "encoding SCOPE", "done": done, "total": total},
    )

Nothing is shown for those records unless a display listens (the logger is quiet
by default). The CLI's display (:class:`CampaignDisplay`) turns them into the
phase shown in the bar ("encoding SCOPE 1234/7572", "fitting model v1",
"choosing 8 experiment(s)", "waiting on 8 in flight"; a record with ``sub=True``
in its extras is a step of the current phase: "fitting model v2 on 40 measurements:
predicting 2048/7572"), and every other log record
goes through rich's :class:`~rich.logging.RichHandler` on the same console, so a
log line appears above the live display instead of inside it.

The layout survives 80 columns: the first line holds the phase (cut with an
ellipsis when long), a short bar, the ``N/budget`` count and the elapsed time;
the counts, the best value and the latest warning go on lines below it, which
wrap instead of squeezing the bar.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

from rich.console import Console, RenderableType
from rich.logging import RichHandler
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Column
from rich.text import Text

__all__ = [
    "PROGRESS_LOGGER",
    "CampaignDisplay",
    "PhaseHandler",
    "configure_logging",
    "phases_shown_in",
    "stderr_console",
]

PROGRESS_LOGGER = "cloudlab.progress"
"""The logger on which library code reports its phase (see the module docstring)."""

_CONSOLE: Console | None = None


def stderr_console() -> Console:
    """The one console the CLI writes its progress and log lines to (stderr)."""
    global _CONSOLE  # one console per process: rich needs to own the terminal it draws on
    if _CONSOLE is None:
        _CONSOLE = Console(stderr=True)
    return _CONSOLE


def configure_logging(verbose: bool, console: Console | None = None) -> None:
    """Log through rich on ``console``: INFO and above, DEBUG with ``verbose``.

    Quiet by default: the libraries' chatter (httpx per request, Ray's token-auth
    notice, spglib's C warnings) is kept for ``-v``.
    """
    handler = RichHandler(
        console=console or stderr_console(),
        show_path=verbose,
        show_time=verbose,
        rich_tracebacks=False,
        markup=False,
        log_time_format="%H:%M:%S",
    )
    handler.setFormatter(logging.Formatter("%(name)s: %(message)s" if verbose else "%(message)s"))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    progress = logging.getLogger(PROGRESS_LOGGER)
    progress.propagate = False  # phases go to a display, never into the log
    progress.setLevel(logging.DEBUG)
    quiet = {  # one INFO line per HTTP request; Ray's notices
        "httpx": logging.WARNING,
        "httpcore": logging.WARNING,
        "ray": logging.WARNING,
        # Ray >= 2.60 announces, at WARNING, that it turned token auth on for a local cluster
        "ray._private.authentication": logging.ERROR,
        # a line per refit (the bar shows the phase; -v shows them)
        "cloud_model.ensemble": logging.WARNING,
        "loop.auto_surrogate": logging.WARNING,
    }
    for name, level in quiet.items():
        logging.getLogger(name).setLevel(logging.NOTSET if verbose else level)
    logging.captureWarnings(True)  # Python warnings go through the handler, above the display
    if not verbose:
        os.environ.setdefault("SPGLIB_WARNING", "OFF")  # spglib's C messages to stderr
        # GPyTorch's note that a jitter made a kernel matrix positive definite, once per fit
        warnings.filterwarnings("ignore", message=r"A not p\.d\., added jitter")


class CampaignDisplay(Progress):
    """A rich progress display: phase, bar, ``N/budget``, elapsed; then status lines.

    Args:
        console: where to draw (the CLI's stderr console).
        total: the experiment budget.
    """

    def __init__(self, console: Console, total: int) -> None:
        self.lines: list[Text] = []
        super().__init__(
            TextColumn(
                "{task.fields[phase]}",
                table_column=Column(no_wrap=True, overflow="ellipsis", min_width=12, ratio=1),
            ),
            BarColumn(bar_width=16),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=console,
            expand=True,
        )
        self.task = self.add_task("experiments", total=total, phase="starting")

    def set_phase(self, phase: str) -> None:
        """Show ``phase`` at the start of the bar."""
        self.update(self.task, phase=phase)

    def set_status(self, n_submitted: int, lines: Iterable[Text]) -> None:
        """Move the bar to ``n_submitted`` and show ``lines`` below it."""
        self.lines = list(lines)
        self.update(self.task, completed=n_submitted)

    def get_renderables(self) -> Iterable[RenderableType]:
        yield self.make_tasks_table(self.tasks)
        yield from self.lines


class PhaseHandler(logging.Handler):
    """Shows the phase records of :data:`PROGRESS_LOGGER` in a :class:`CampaignDisplay`."""

    def __init__(self, display: CampaignDisplay) -> None:
        super().__init__(logging.DEBUG)
        self.display = display
        self.main = ""

    def emit(self, record: logging.LogRecord) -> None:
        """Show the record's phase; a step (``sub``) is shown after the current phase."""
        phase = str(getattr(record, "phase", None) or record.getMessage())
        done, total = getattr(record, "done", None), getattr(record, "total", None)
        if done is not None and total:
            phase = f"{phase} {done}/{total}"
        if getattr(record, "sub", False):
            self.display.set_phase(f"{self.main}: {phase}" if self.main else phase)
        else:
            self.main = phase
            self.display.set_phase(phase)


@contextmanager
def phases_shown_in(display: CampaignDisplay) -> Iterator[None]:
    """While the block runs, phase records go to ``display``."""
    logger = logging.getLogger(PROGRESS_LOGGER)
    handler = PhaseHandler(display)
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)
