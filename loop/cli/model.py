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

    from cloud_model.multitask import MultitaskCallback, MultitaskEval, MultitaskResult
    from cloud_model.pretrain import EvalMetrics, PretrainCallback, PretrainResult, StepProgress


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


def _rich_multitask_callback(progress: Progress) -> MultitaskCallback:
    """A :class:`~cloud_model.multitask.MultitaskCallback` that drives a rich progress bar."""
    from cloud_model.multitask import MultitaskCallback

    class RichCallback(MultitaskCallback):
        task: TaskID | None = None
        validation = ""

        def on_start(self, start_step: int, max_steps: int) -> None:
            self.task = progress.add_task(
                "pretrain (multi-task)", total=max_steps, completed=start_step, info=""
            )

        def on_step(self, step: StepProgress, task_loss: float, mlm_loss: float) -> None:
            if self.task is not None:
                info = (
                    f"loss {step.loss:.3f} (tasks {task_loss:.3f}, mlm {mlm_loss:.3f})  "
                    f"lr {step.lr:.1e}{self.validation}"
                )
                progress.update(self.task, completed=step.step, info=info)

        def on_eval(self, metrics: MultitaskEval) -> None:
            self.validation = f"  val MAE/MAD {metrics.score:.3f}"
            rows = "; ".join(
                f"{name} {m.mae:.4g} ({m.mae_over_mad:.3f})" for name, m in metrics.tasks.items()
            )
            mlm = "" if metrics.mlm_loss is None else f", MLM loss {metrics.mlm_loss:.4f}"
            best = " [best]" if metrics.best else ""
            progress.console.log(
                f"step {metrics.step}: mean validation MAE/MAD {metrics.score:.4f}{mlm}{best}; "
                f"MAE (MAE/MAD): {rows}"
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
    """Pretrain a CLOUD encoder (masked-LM, or multi-task with ``objective: multitask``); writes a
    checkpoint to --out."""
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
    if cfg.objective == "multitask":
        from cloud_model.multitask import pretrain_multitask

        with Progress(*columns) as progress:
            outcome = pretrain_multitask(
                cfg, out, resume=resume, callback=_rich_multitask_callback(progress),
                command=command,
            )  # fmt: skip
        _echo_multitask_result(outcome, out)
        return
    if cfg.train.num_workers > 1:  # data parallel under Ray Train: the workers log, no progress bar
        from adapters.ray_runtime import ensure_ray
        from cloud_model.ray_work import pretrain_with_ray

        ensure_ray()
        result = pretrain_with_ray(cfg, out, resume=resume, command=command)
        _echo_pretrain_result(result, out)
        return
    with Progress(*columns) as progress:
        callback = _rich_pretrain_callback(progress)
        result = pretrain(cfg, out, resume=resume, callback=callback, command=command)
    _echo_pretrain_result(result, out)


def _echo_pretrain_result(result: PretrainResult, out: Path) -> None:
    last = result.validation[-1] if result.validation else None
    typer.echo(
        f"checkpoint written to {out} ({result.n_parameters:,} parameters, {result.steps} steps in "
        f"{result.wall_s:.0f} s, {result.tokens_per_s:,.0f} tokens/s)"
    )
    if last is not None:
        typer.echo(
            f"validation MLM loss {last['loss']:.4f}, masked-token accuracy {last['accuracy']:.4f}"
        )


def _echo_multitask_result(result: MultitaskResult, out: Path) -> None:
    typer.echo(
        f"checkpoint written to {out} (best: {out / 'best'}, step {result.best_step}; "
        f"{result.n_parameters:,} parameters, {result.steps} steps in {result.wall_s:.0f} s, "
        f"{result.steps_per_s:.2f} steps/s)"
    )
    if result.validation:
        last = result.validation[-1]
        typer.echo(f"mean validation MAE/MAD {last['score']:.4f} at step {last['step']}")
        for name, m in last["tasks"].items():
            typer.echo(
                f"  {name}: MAE {m['mae']:.4g}, MAE/MAD {m['mae_over_mad']:.4f} ({m['n']} rows)"
            )


# ---------------------------------------------------------------- finetune / predict
_THREADS_HELP = (
    "CPU threads for torch (torch.set_num_threads); on a shared machine 1 is often fastest. "
    "Default: torch's own choice (or OMP_NUM_THREADS)."
)


def _set_threads(threads: int | None) -> None:
    if threads is not None:
        import torch

        torch.set_num_threads(threads)


def _members_train_on_ray(parallel: str, n_members: int) -> bool:
    """Whether an ensemble fit with this ``parallel`` setting wants Ray actors (see
    :mod:`cloud_model.ensemble_runtime`): always for ``"ray"``; for ``"auto"`` with CUDA
    and more than one member."""
    if parallel == "ray":
        return True
    if parallel != "auto" or n_members < 2:
        return False
    import torch

    return bool(torch.cuda.is_available())


def finetune_command(
    config: Path = typer.Argument(
        ...,
        exists=True,
        dir_okay=False,
        help="Fine-tuning YAML, e.g. configs/finetune_cloud_cv_debye.yaml.",
    ),
    out: Path = typer.Option(..., "--out", help="Directory for the trained model and report.json."),
    threads: int | None = typer.Option(None, "--threads", min=1, help=_THREADS_HELP),
) -> None:
    """Fine-tune a CLOUD model (or a K-member ensemble) on labelled data; scores the test split.

    On a terminal a progress bar shows the epochs; otherwise (a batch job, a redirected
    log) every epoch is a log line on stderr as it ends.
    """
    import logging

    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    from rich.table import Table

    from cloud_model.finetune_job import FinetuneJob, run_finetune_job
    from loop.cli.live import stderr_console

    job = FinetuneJob.from_yaml(config)
    _set_threads(threads)
    if _members_train_on_ray(job.model.parallel, job.n_members):
        from adapters.ray_runtime import ensure_ray

        ensure_ray()  # cloud_model never starts Ray itself
    total = job.n_members * job.model.epochs
    columns = (
        TextColumn("[bold]finetune"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        TextColumn("{task.fields[info]}"),
    )  # fmt: skip
    console = stderr_console()
    log = logging.getLogger("cloudlab.finetune")
    with Progress(*columns, console=console, disable=not console.is_terminal) as progress:
        task = progress.add_task("finetune", total=total, info="loading data")
        done = {"n": 0}

        def on_epoch(member: int, epoch: int, train_loss: float, val_loss: float | None) -> None:
            done["n"] += 1
            val = "" if val_loss is None else f"  val {val_loss:.4f}"
            info = f"member {member + 1}/{job.n_members} epoch {epoch}  train {train_loss:.4f}{val}"
            if console.is_terminal:
                progress.update(task, completed=done["n"], info=info)
            else:  # a log file gets a line per epoch, as it happens
                log.info("epoch %d/%d: %s", done["n"], total, info)

        _, report = run_finetune_job(job, out, on_epoch=on_epoch)
        progress.update(task, completed=total, info="done")
    if report.n_unlabelled:
        typer.echo(
            f"left out {report.n_unlabelled} rows without a numeric label "
            f"(first: {', '.join(report.unlabelled_examples)})"
        )
    typer.echo(f"test split: {report.test_split}")
    table = Table(
        title=f"test split ({report.n_test} rows; trained on {report.n_train}, val {report.n_val})"
    )
    for name in ("target", "MAE", "RMSE", "MAE/MAD", "R^2"):
        table.add_column(name)
    for name, m in report.test.items():
        table.add_row(name, f"{m.mae:.4g}", f"{m.rmse:.4g}", f"{m.mae_over_mad:.4f}", f"{m.r2:.4f}")
    Console().print(table)
    if report.test_calibration is None:
        typer.echo(f"uncertainty: {report.uncertainty}")
    else:
        c = report.test_calibration
        typer.echo(
            f"ensemble calibration: NLL {c.nll:.3f}, 90% coverage {c.coverage_90:.3f}, "
            f"miscalibration area {c.miscalibration_area:.3f}"
        )
    typer.echo(f"model written to {out} ({report.seconds:.0f} s)")


def predict_command(
    model: Path = typer.Option(
        ...,
        "--model",
        exists=True,
        file_okay=False,
        help="A directory written by `cloudlab finetune`.",
    ),
    input_: str = typer.Option(
        ...,
        "--input",
        help="A registry dataset name or a CSV file (SCOPE `cloud` or `cif` column).",
    ),
    out: Path = typer.Option(
        ..., "--out", help="CSV to write: id, split, scope, <target>_mean/_std."
    ),
    variant: str | None = typer.Option(
        None,
        "--variant",
        help="SCOPE variant for CIF inputs (default: the one the model was trained with).",
    ),
    symprec: float | None = typer.Option(
        None, "--symprec", help="spglib tolerance in Angstrom for CIF inputs."
    ),
    structure_column: str | None = typer.Option(
        None,
        "--structure-column",
        help="CSV column holding the structures (default: cloud/scope for SCOPE, cif for CIF).",
    ),
    threads: int | None = typer.Option(None, "--threads", min=1, help=_THREADS_HELP),
) -> None:
    """Predict with a fine-tuned model or ensemble: mean and ensemble std per target.

    A one-member model has no uncertainty: its CSV has no ``_std`` columns.
    """
    from cloud_model.ensemble import CloudEnsemble
    from cloud_model.errors import ConfigError
    from cloud_model.finetune_data import prediction_input
    from cloud_model.finetune_job import output_names, predict_rows, read_job, write_csv

    _set_threads(threads)
    ensemble = CloudEnsemble.load(model)
    job = read_job(model)
    chosen_variant = variant or (job.data.variant if job is not None else "cloud")
    if chosen_variant not in ("cloud", "native"):
        raise ConfigError(f"--variant must be 'cloud' or 'native', got {chosen_variant!r}")
    truth = job.data.targets if job is not None else output_names(ensemble)
    data = prediction_input(
        input_,
        truth=truth,
        variant="native" if chosen_variant == "native" else "cloud",
        symprec=symprec if symprec is not None else (job.data.symprec if job is not None else 0.1),
        structure_column=structure_column,
    )
    rows = predict_rows(ensemble, data)
    write_csv(out, rows)
    spread = (
        f"{ensemble.n_members} members, std = their spread"
        if ensemble.n_members > 1
        else "one member: no uncertainty, no _std columns"
    )
    typer.echo(f"{len(rows)} predictions ({spread}) written to {out}")


def register(app: typer.Typer) -> None:
    """Attach the model commands to the root app."""
    app.command("pretrain")(pretrain_command)
    app.command("finetune")(finetune_command)
    app.command("predict")(predict_command)
