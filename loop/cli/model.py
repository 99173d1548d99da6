"""Model commands: ``cloudlab pretrain`` (and, beside it, fine-tuning and prediction).

Thin wrappers over :mod:`cloud_model`; the rich progress bar lives here, the
library only logs.
"""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import TYPE_CHECKING

import typer

if TYPE_CHECKING:
    from rich.progress import Progress, TaskID

    from cloud_model.pretrain import EvalMetrics, PretrainCallback, StepProgress


def _rich_pretrain_callback(progress: Progress) -> PretrainCallback:
    """A :class:`~cloud_model.pretrain.PretrainCallback` that drives a rich progress bar."""
    from cloud_model.pretrain import PretrainCallback

    class RichCallback(PretrainCallback):
        task: TaskID | None = None
        validation = ""

        def on_start(self, start_step: int, max_steps: int) -> None:
            self.task = progress.add_task(
                "pretrain", total=max_steps, completed=start_step, info=""
            )

        def on_step(self, step: StepProgress) -> None:
            if self.task is not None:
                info = f"loss {step.loss:.3f}  lr {step.lr:.1e}  {step.tokens_per_s:,.0f} tok/s{self.validation}"
                progress.update(self.task, completed=step.step, info=info)

        def on_eval(self, metrics: EvalMetrics) -> None:
            self.validation = f"  val {metrics.loss:.3f} / acc {metrics.accuracy:.3f}"
            progress.console.log(
                f"step {metrics.step}: validation MLM loss {metrics.loss:.4f}, "
                f"masked-token accuracy {metrics.accuracy:.4f} ({metrics.n_tokens} tokens)"
            )

    return RichCallback()


def pretrain_command(
    config: Path = typer.Argument(
        ..., exists=True, dir_okay=False, help="Pretraining YAML, e.g. configs/pretrain_small.yaml."
    ),
    out: Path = typer.Option(
        ..., "--out", help="Run directory: checkpoint files and training_state/."
    ),
    resume: bool = typer.Option(
        False, "--resume", help="Continue from the last training state in --out."
    ),
) -> None:
    """Masked-LM pretraining of a CLOUD encoder on the SCOPE corpus; writes a checkpoint to --out."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    from cloud_model.pretrain import PretrainConfig, pretrain

    cfg = PretrainConfig.from_yaml(config)
    command = shlex.join(["cloudlab", "pretrain", str(config), "--out", str(out)])
    columns = (
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[info]}"),
    )  # fmt: skip
    with Progress(*columns) as progress:
        callback = _rich_pretrain_callback(progress)
        result = pretrain(cfg, out, resume=resume, callback=callback, command=command)
    last = result.validation[-1] if result.validation else None
    typer.echo(
        f"checkpoint written to {out} ({result.n_parameters:,} parameters, {result.steps} steps in "
        f"{result.wall_s:.0f} s, {result.tokens_per_s:,.0f} tokens/s)"
    )
    if last is not None:
        typer.echo(
            f"validation MLM loss {last['loss']:.4f}, masked-token accuracy {last['accuracy']:.4f}"
        )


def register(app: typer.Typer) -> None:
    """Attach the model commands to the root app."""
    app.command("pretrain")(pretrain_command)
