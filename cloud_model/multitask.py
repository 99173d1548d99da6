"""Supervised multi-task pretraining: per-task regression heads plus MLM as an auxiliary loss.

Each step draws ``train.batch_size`` labelled rows, the task of each row sampled with
``p_t ~ n_t^(1/T)`` (``n_t`` training rows of task ``t``, ``T = multitask.task_temperature``;
``T = 1`` is proportional to size, ``T = inf`` gives every task the same share) and the row
uniformly within its task, plus ``multitask.mlm_batch_size`` unlabelled strings that are
masked BERT-style. Both go through the encoder in one forward pass; the pooled state of a
labelled row feeds its task's :class:`~cloud_model.heads.RegressionHead`, which predicts the
target z-scored with the task's training mean and std. The loss is the mean L1 (or MSE) of
the z-scores plus ``mlm_weight`` x the MLM cross-entropy.

The optimiser, schedule, precision and RNG discipline are those of
:mod:`cloud_model.pretrain`: every random draw of step ``s`` is seeded by
``(seed, purpose, s)``, so a run resumed from its training state repeats the uninterrupted
run exactly (on the same device and thread count).

Outputs in the run directory:

* the **last** checkpoint (``model.safetensors``, ``model_card.json``, ``tokenizer.json``):
  the encoder with its MLM head, written by :func:`~cloud_model.checkpoint.save_checkpoint`,
  so :func:`~cloud_model.checkpoint.load_encoder` and fine-tuning read it like any
  pretrained checkpoint; ``best/`` holds the same for the evaluation with the lowest mean
  validation MAE/MAD over tasks;
* beside each, ``task_heads.safetensors`` + ``task_heads.json``: the per-task heads with their
  target statistics (:func:`load_multitask` restores encoder and heads; fine-tuning ignores
  them and starts a fresh head);
* ``training_state/`` (resumable) and ``multitask_result.json``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict
from torch import nn

from cloud_model.checkpoint import (
    DataSummary,
    ModelCard,
    load_checkpoint,
    load_module_weights,
    save_checkpoint,
    save_module_weights,
)
from cloud_model.errors import CheckpointError, ConfigError
from cloud_model.heads import IGNORE_INDEX, CloudForMaskedLM, RegressionHead
from cloud_model.mlm import batch_indices, derived_seed, evaluate_mlm, generator, mask_tokens, trim
from cloud_model.model import CloudEncoder
from cloud_model.multitask_data import MultiTaskCorpus, TaskData
from cloud_model.pretrain import (
    STATE_DIR,
    StepProgress,
    _autocast,
    _device_and_dtype,
    _Masking,
    _optimizer_and_schedule,
    new_encoder,
)
from cloud_model.pretrain_config import PretrainConfig
from cloud_model.training_state import (
    LATEST_FILE,
    has_training_state,
    load_training_state,
    save_training_state,
)

if TYPE_CHECKING:
    from cloud_model.tokenizer import ScopeTokenizer

logger = logging.getLogger(__name__)

RESULT_FILE = "multitask_result.json"
BEST_DIR = "best"
HEADS_WEIGHTS = "task_heads.safetensors"
HEADS_CARD = "task_heads.json"

__all__ = [
    "MultitaskCallback",
    "MultitaskEval",
    "MultitaskModel",
    "MultitaskResult",
    "TaskHeadInfo",
    "TaskMetrics",
    "load_multitask",
    "pretrain_multitask",
    "select_tasks",
    "task_probabilities",
    "train_multitask",
]


# ----------------------------------------------------------------- sampling


def task_probabilities(counts: list[int], temperature: float) -> list[float]:
    """``p_t = n_t^(1/T) / sum_s n_s^(1/T)``; ``T = inf`` gives ``1 / n_tasks`` each.

    Raises:
        ConfigError: no tasks, a task without rows, or ``temperature <= 0``.
    """
    if not counts or min(counts) <= 0:
        raise ConfigError(f"every task needs training rows; got counts {counts}")
    if not temperature > 0:
        raise ConfigError(f"multitask.task_temperature must be > 0, got {temperature}")
    weights = [1.0 if math.isinf(temperature) else n ** (1.0 / temperature) for n in counts]
    total = sum(weights)
    return [w / total for w in weights]


def sample_rows(
    step: int, probabilities: torch.Tensor, counts: torch.Tensor, *, batch_size: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The labelled rows of ``step``: a task per row from ``probabilities``, a row within it.

    Args:
        probabilities: ``(K,)`` task probabilities; counts: ``(K,)`` training rows per task.

    Returns:
        ``(task, row)``, both ``(batch_size,)`` long: task index and row index within the task.
    """
    rng = generator(seed, "tasks", step)
    task = torch.multinomial(probabilities, batch_size, replacement=True, generator=rng)  # (B,)
    u = torch.rand(batch_size, generator=rng, dtype=torch.float64)  # (B,)
    row = (u * counts[task].double()).long().clamp_max(counts[task] - 1)  # (B,)
    return task, row


def select_tasks(corpus: MultiTaskCorpus, names: list[str] | None) -> list[TaskData]:
    """The corpus's tasks, or only ``names`` (in the corpus's order).

    Raises:
        ConfigError: a name is not a task of the corpus (the message lists them).
    """
    if names is None:
        return list(corpus.tasks)
    known = {t.name for t in corpus.tasks}
    missing = [n for n in names if n not in known]
    if missing:
        raise ConfigError(f"multitask.tasks: {missing} not in the corpus; tasks: {sorted(known)}")
    return [t for t in corpus.tasks if t.name in set(names)]


# ----------------------------------------------------------------- the model


class TaskHeadInfo(BaseModel):
    """One task head: its task, unit and the training statistics of its z-scores."""

    model_config = ConfigDict(extra="forbid")
    name: str  # "<dataset>:<target>"
    unit: str
    mean: float  # of the training targets, in unit
    std: float
    n_train: int
    n_validation: int
    composition_only: bool = False


class MultitaskModel(nn.Module):
    """An encoder, its MLM head (``mlm``, a :class:`CloudForMaskedLM`) and one head per task."""

    def __init__(self, encoder: CloudEncoder, n_tasks: int, head_dropout: float = 0.1) -> None:
        super().__init__()
        self.mlm = CloudForMaskedLM(encoder)
        d_model = encoder.config.d_model
        self.heads = nn.ModuleList(RegressionHead(d_model, 1, head_dropout) for _ in range(n_tasks))

    def head(self, k: int) -> RegressionHead:
        """The head of task ``k``."""
        return cast(RegressionHead, self.heads[k])

    def task_stats(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Training mean and std of every task's target, ``(K,)`` each (in its unit)."""
        means = [self.head(k).target_mean[0] for k in range(len(self.heads))]
        stds = [self.head(k).target_std[0] for k in range(len(self.heads))]
        return torch.stack(means), torch.stack(stds)

    @property
    def encoder(self) -> CloudEncoder:
        """The shared trunk."""
        return self.mlm.encoder

    def set_task_stats(self, tasks: list[TaskData]) -> None:
        """Store each task's training mean and std in its head (the z-score of its targets)."""
        for k, task in enumerate(tasks):
            values = torch.tensor([v for _, v in task.train], dtype=torch.float64)  # (N,)
            if len(values) < 2:
                raise ConfigError(f"task {task.name!r}: need >= 2 training rows to z-score")
            self.head(k).set_target_stats(values.unsqueeze(1))

    def task_outputs(self, pooled: torch.Tensor, task: torch.Tensor) -> torch.Tensor:
        """Z-scored prediction of each row by its own task's head.

        Args:
            pooled: ``(B, C)``; task: ``(B,)`` long task indices.

        Returns:
            ``(B,)`` predictions in z units.
        """
        out = pooled.new_zeros(pooled.shape[0])  # (B,)
        for k in torch.unique(task).tolist():
            rows = (task == k).nonzero().squeeze(1)  # (B_k,)
            out = out.index_put((rows,), self.heads[k](pooled[rows]).squeeze(1).to(out.dtype))
        return out

    def forward(
        self, ids: torch.Tensor, mask: torch.Tensor, task: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One pass: the first ``len(task)`` rows are labelled, the rest are MLM rows.

        Args:
            ids, mask: ``(B, T)``; task: ``(B1,)`` task index of each labelled row, ``B1 <= B``.

        Returns:
            z-scored predictions ``(B1,)`` and MLM logits ``(B - B1, T, V)``.
        """
        hidden = self.encoder(ids, mask)  # (B, T, C)
        n = task.shape[0]
        pooled = self.encoder.pool(hidden[:n], mask[:n])  # (B1, C)
        return self.task_outputs(pooled, task), self.mlm.head(hidden[n:])  # (B1,), (B2, T, V)


# ----------------------------------------------------------------- progress and results


@dataclass(frozen=True)
class TaskMetrics:
    """Validation error of one task: MAE in its unit and MAE over the MAD of its values."""

    mae: float
    mae_over_mad: float
    n: int


@dataclass(frozen=True)
class MultitaskEval:
    """One validation pass: per-task metrics, their mean MAE/MAD (``score``) and the MLM loss."""

    step: int
    tasks: dict[str, TaskMetrics]
    score: float
    mlm_loss: float | None
    best: bool  # the best score so far (``best/`` was just written)


class MultitaskCallback:
    """Progress hooks (the CLI draws a progress bar with them)."""

    def on_start(self, start_step: int, max_steps: int) -> None:
        """Before the first step (``start_step`` > 0 when resuming)."""

    def on_step(self, progress: StepProgress, task_loss: float, mlm_loss: float) -> None:
        """After each optimizer step (``progress.loss`` is the total loss)."""

    def on_eval(self, metrics: MultitaskEval) -> None:
        """After each validation pass."""


class MultitaskResult(BaseModel):
    """What one multi-task run did and measured."""

    model_config = ConfigDict(extra="forbid")
    out_dir: str
    start_step: int  # > 0 when resumed
    steps: int  # optimizer steps run by this process
    losses: list[float]  # total loss of each of those steps
    task_losses: list[float]
    mlm_losses: list[float]
    validation: list[dict[str, Any]]  # {"step", "score", "mlm_loss", "tasks": {name: metrics}}
    best_step: int | None
    best_score: float | None
    n_parameters: int
    wall_s: float
    train_s: float
    steps_per_s: float


# ----------------------------------------------------------------- evaluation


def _validation_rows(task: TaskData, limit: int) -> list[tuple[str, float]]:
    """At most ``limit`` validation rows, a fixed subset (ordered by sha256 of the string)."""
    rows = sorted(task.validation, key=lambda r: hashlib.sha256(r[0].encode()).hexdigest())
    return rows[:limit]


@torch.no_grad()
def _evaluate_tasks(
    model: MultitaskModel,
    tasks: list[TaskData],
    tokenizer: ScopeTokenizer,
    config: PretrainConfig,
    device: torch.device,
    autocast_dtype: torch.dtype | None,
) -> dict[str, TaskMetrics]:
    was_training = model.training
    model.eval()
    metrics: dict[str, TaskMetrics] = {}
    size = config.train.eval_batch_size
    for k, task in enumerate(tasks):
        rows = _validation_rows(task, config.multitask.eval_max_rows)
        if not rows:
            continue
        head = model.head(k)
        preds = []
        for start in range(0, len(rows), size):
            chunk = rows[start : start + size]
            batch = tokenizer.batch_encode([s for s, _ in chunk], max_length=config.model.max_len)
            ids, mask = trim(batch.ids, batch.mask)  # (b, T)
            with _autocast(device, autocast_dtype):
                pooled = model.encoder.encode(ids.to(device), mask.to(device))  # (b, C)
                z = head(pooled).float()  # (b, 1)
            preds.append(head.destandardise(z).squeeze(1).double().cpu())
        pred = torch.cat(preds)  # (N,)
        truth = torch.tensor([v for _, v in rows], dtype=torch.float64)  # (N,)
        mae = float((pred - truth).abs().mean())
        mad = float((truth - truth.mean()).abs().mean())
        metrics[task.name] = TaskMetrics(mae, mae / mad if mad > 0 else math.inf, len(rows))
    model.train(was_training)
    return metrics


# ----------------------------------------------------------------- the loop


def train_multitask(
    config: PretrainConfig,
    out_dir: Path,
    corpus: MultiTaskCorpus,
    tokenizer: ScopeTokenizer,
    *,
    resume: bool = False,
    callback: MultitaskCallback | None = None,
    command: str = "",
    device: torch.device | None = None,
) -> MultitaskResult:
    """Run (or resume) multi-task pretraining in this process; write the checkpoints.

    Args:
        config: the run configuration (``objective: multitask``).
        out_dir: run directory (created by the caller).
        corpus: labelled tasks and MLM strings (e.g. from
            :func:`cloud_model.multitask_corpus.build_multitask_corpus`).
        tokenizer: its vocabulary sizes the embedding.
        resume: continue from ``out_dir/training_state`` (a fresh start if there is none).
        callback: progress hooks.
        command: recorded in the model card.
        device: overrides ``config.train.device``.

    Raises:
        ConfigError: ``objective`` is not ``multitask``, an unknown task is selected, or the
            MLM strings cannot fill one batch.
        CheckpointError: the training state cannot be resumed.
    """
    if config.objective != "multitask":
        raise ConfigError(f"objective: {config.objective!r}; train_multitask needs 'multitask'")
    t_start = time.perf_counter()
    train, options = config.train, config.multitask
    callback = callback or MultitaskCallback()
    device, autocast_dtype = _device_and_dtype(train, device)
    if train.num_threads is not None and device.type == "cpu":
        torch.set_num_threads(train.num_threads)
    tasks = select_tasks(corpus, options.tasks)
    counts = [len(t.train) for t in tasks]
    probabilities = torch.tensor(task_probabilities(counts, options.task_temperature))  # (K,)
    count_tensor = torch.tensor(counts)  # (K,)
    use_mlm = options.mlm_weight > 0 and len(corpus.mlm_train) >= options.mlm_batch_size
    if options.mlm_weight > 0 and not use_mlm:
        raise ConfigError(
            f"multitask.mlm_weight={options.mlm_weight} but the corpus has "
            f"{len(corpus.mlm_train)} MLM strings, fewer than mlm_batch_size="
            f"{options.mlm_batch_size}; set mlm_weight: 0 or add strings"
        )
    masking = _Masking.for_tokenizer(tokenizer, train.mask_prob)

    torch.manual_seed(derived_seed(train.seed, "init"))
    model = MultitaskModel(new_encoder(config, tokenizer), len(tasks), options.head_dropout)
    model.set_task_stats(tasks)
    model.to(device)
    optimizer, scheduler = _optimizer_and_schedule(model, train)
    state_dir, fingerprint = out_dir / STATE_DIR, config.fingerprint()
    start_step = 0
    history: dict[str, Any] = {"losses": [], "task_losses": [], "mlm_losses": [], "validation": []}
    best: dict[str, Any] = {"step": None, "score": None}
    if resume and has_training_state(state_dir):
        saved = _saved_corpus_summary(state_dir)
        if saved is not None and saved != _corpus_summary(tasks, corpus):
            raise CheckpointError(
                f"{state_dir}: saved by a run on a different corpus (tasks and row counts "
                f"{saved} vs now {_corpus_summary(tasks, corpus)}); start a new --out directory"
            )
        state = load_training_state(
            state_dir, model=model, optimizer=optimizer, scheduler=scheduler,
            config_fingerprint=fingerprint,
        )  # fmt: skip
        start_step = state.step
        history = {k: list(state.extra.get(k, [])) for k in history}
        best = dict(state.extra.get("best", best))
    model.train()
    infos = _head_infos(model, tasks)
    mean_t, std_t = model.task_stats()  # (K,) each: the z-score of every task

    losses: list[float] = []
    task_losses: list[float] = []
    mlm_losses: list[float] = []
    validation: list[dict[str, Any]] = []
    train_s = 0.0
    callback.on_start(start_step, train.max_steps)
    for step in range(start_step, train.max_steps):
        t0 = time.perf_counter()
        task, row = sample_rows(
            step, probabilities, count_tensor, batch_size=train.batch_size, seed=train.seed
        )  # (B1,), (B1,)
        pairs = [tasks[k].train[r] for k, r in zip(task.tolist(), row.tolist(), strict=True)]
        strings = [s for s, _ in pairs]
        target = torch.tensor([v for _, v in pairs], dtype=torch.float32)  # (B1,)
        if use_mlm:
            picked = batch_indices(
                step, n_rows=len(corpus.mlm_train), batch_size=options.mlm_batch_size,
                seed=train.seed,
            )  # fmt: skip
            strings += [corpus.mlm_train[i] for i in picked.tolist()]
        batch = tokenizer.batch_encode(strings, max_length=config.model.max_len)
        ids, mask = trim(batch.ids, batch.mask)  # (B, T)
        n = train.batch_size
        labels = torch.full_like(ids, IGNORE_INDEX)  # (B, T)
        if use_mlm:
            masked, mlm_labels = mask_tokens(
                ids[n:], mask[n:], rng=generator(train.seed, "mask", step), **masking.kwargs()
            )  # (B2, T), (B2, T)
            ids = torch.cat([ids[:n], masked])
            labels[n:] = mlm_labels
        torch.manual_seed(derived_seed(train.seed, "dropout", step))
        with _autocast(device, autocast_dtype):
            z, logits = model(ids.to(device), mask.to(device), task.to(device))
        z = z.float()
        task_dev = task.to(device)
        target_z = (target.to(device) - mean_t[task_dev]) / std_t[task_dev]  # (B1,)
        diff = z - target_z
        task_loss = diff.abs().mean() if options.loss == "l1" else (diff**2).mean()
        loss = task_loss
        mlm_loss = torch.zeros((), device=device)
        if use_mlm:
            mlm_loss = F.cross_entropy(
                logits.flatten(0, 1).float(), labels[n:].flatten().to(device),
                ignore_index=IGNORE_INDEX,
            )  # fmt: skip
            loss = task_loss + options.mlm_weight * mlm_loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), train.grad_clip)
        optimizer.step()
        scheduler.step()
        dt = time.perf_counter() - t0
        train_s += dt
        losses.append(float(loss.detach()))
        task_losses.append(float(task_loss.detach()))
        mlm_losses.append(float(mlm_loss.detach()))
        done, lr = step + 1, float(optimizer.param_groups[0]["lr"])

        if done % train.eval_every == 0 or done == train.max_steps:
            entry = _evaluate(model, tasks, corpus, tokenizer, config, device, autocast_dtype,
                              masking, use_mlm, done)  # fmt: skip
            improved = best["score"] is None or entry["score"] < best["score"]
            if improved:
                best = {"step": done, "score": entry["score"]}
                card = _model_card(config, corpus, tasks, infos, history, losses, task_losses,
                                   mlm_losses, [*history["validation"], *validation, entry],
                                   done, command, best)  # fmt: skip
                _save(out_dir / BEST_DIR, model, tokenizer, card, infos)
            validation.append(entry)
            logger.info("step %d: mean validation MAE/MAD %.4f", done, entry["score"])
            callback.on_eval(
                MultitaskEval(
                    done,
                    {k: TaskMetrics(**v) for k, v in entry["tasks"].items()},
                    entry["score"],
                    entry["mlm_loss"],
                    improved,
                )  # fmt: skip
            )
        if done % train.checkpoint_every == 0 or done == train.max_steps:
            extra = {
                "losses": history["losses"] + losses,
                "task_losses": history["task_losses"] + task_losses,
                "mlm_losses": history["mlm_losses"] + mlm_losses,
                "validation": history["validation"] + validation,
                "best": best,
                "corpus": _corpus_summary(tasks, corpus),
            }
            save_training_state(
                state_dir, model=model, optimizer=optimizer, scheduler=scheduler, step=done,
                config_fingerprint=fingerprint, extra=extra,
            )  # fmt: skip
        if done % train.log_every == 0:
            logger.info("step %d/%d loss %.4f lr %.2e", done, train.max_steps, losses[-1], lr)
        rate = 1.0 / max(dt, 1e-9)
        callback.on_step(
            StepProgress(done, train.max_steps, losses[-1], lr, rate), task_losses[-1],
            mlm_losses[-1],
        )  # fmt: skip

    n_steps = train.max_steps - start_step
    result = MultitaskResult(
        out_dir=str(out_dir), start_step=start_step, steps=n_steps, losses=losses,
        task_losses=task_losses, mlm_losses=mlm_losses, validation=validation,
        best_step=best["step"], best_score=best["score"],
        n_parameters=sum(p.numel() for p in model.parameters()),
        wall_s=time.perf_counter() - t_start, train_s=train_s,
        steps_per_s=n_steps / max(train_s, 1e-9),
    )  # fmt: skip
    if n_steps > 0:
        card = _model_card(config, corpus, tasks, infos, history, losses, task_losses, mlm_losses,
                           history["validation"] + validation, train.max_steps, command, best)  # fmt: skip
        _save(out_dir, model, tokenizer, card, infos)
    (out_dir / RESULT_FILE).write_text(result.model_dump_json(indent=1), encoding="utf-8")
    return result


def _evaluate(
    model: MultitaskModel,
    tasks: list[TaskData],
    corpus: MultiTaskCorpus,
    tokenizer: ScopeTokenizer,
    config: PretrainConfig,
    device: torch.device,
    autocast_dtype: torch.dtype | None,
    masking: _Masking,
    use_mlm: bool,
    step: int,
) -> dict[str, Any]:
    """Per-task validation metrics, their mean MAE/MAD and the validation MLM loss."""
    metrics = _evaluate_tasks(model, tasks, tokenizer, config, device, autocast_dtype)
    finite = [m.mae_over_mad for m in metrics.values() if math.isfinite(m.mae_over_mad)]
    score = sum(finite) / len(finite) if finite else math.inf
    mlm_loss = None
    if use_mlm and corpus.mlm_validation:
        strings = corpus.mlm_validation[: config.multitask.eval_max_rows]  # a fixed subset
        batch = tokenizer.batch_encode(strings, max_length=config.model.max_len)
        totals = evaluate_mlm(
            model.mlm, batch.ids, batch.mask, batch_size=config.train.eval_batch_size,
            seed=config.train.seed, device=device, autocast_dtype=autocast_dtype,
            **masking.kwargs(),
        )  # fmt: skip
        mlm_loss = totals.loss_sum / max(totals.count, 1.0)
    return {
        "step": step,
        "score": score,
        "mlm_loss": mlm_loss,
        "tasks": {name: m.__dict__ for name, m in metrics.items()},
    }


def _corpus_summary(tasks: list[TaskData], corpus: MultiTaskCorpus) -> dict[str, int]:
    """Rows per task and MLM strings: what a resumed run must find again."""
    return {t.name: len(t.train) for t in tasks} | {"mlm_train": len(corpus.mlm_train)}


def _saved_corpus_summary(state_dir: Path) -> dict[str, int] | None:
    """The corpus summary a training state recorded (None if unreadable: loading will say why)."""
    try:
        latest = json.loads((state_dir / LATEST_FILE).read_text(encoding="utf-8"))
        info = json.loads((state_dir / latest["path"] / "state.json").read_text(encoding="utf-8"))
        summary = info["extra"]["corpus"]
    except (OSError, KeyError, TypeError, ValueError):
        return None
    return summary if isinstance(summary, dict) else None


def _head_infos(model: MultitaskModel, tasks: list[TaskData]) -> list[TaskHeadInfo]:
    return [
        TaskHeadInfo(
            name=t.name,
            unit=t.unit,
            mean=float(model.head(k).target_mean[0]),
            std=float(model.head(k).target_std[0]),
            n_train=len(t.train),
            n_validation=len(t.validation),
            composition_only=t.composition_only,
        )  # fmt: skip
        for k, t in enumerate(tasks)
    ]


def _mean_tail(values: list[float], n: int = 50) -> float:
    tail = values[-n:]
    return sum(tail) / len(tail) if tail else math.nan


def _model_card(
    config: PretrainConfig,
    corpus: MultiTaskCorpus,
    tasks: list[TaskData],
    infos: list[TaskHeadInfo],
    history: dict[str, Any],
    losses: list[float],
    task_losses: list[float],
    mlm_losses: list[float],
    validation: list[dict[str, Any]],
    step: int,
    command: str,
    best: dict[str, Any],
) -> ModelCard:
    last = validation[-1] if validation else {"tasks": {}, "score": math.nan, "mlm_loss": None}
    metrics: dict[str, float] = {
        "steps": float(step),
        "train_loss_last50": _mean_tail(history["losses"] + losses),
        "train_task_loss_last50": _mean_tail(history["task_losses"] + task_losses),
        "train_mlm_loss_last50": _mean_tail(history["mlm_losses"] + mlm_losses),
        "validation_mean_mae_over_mad": float(last["score"]),
    }
    if last["mlm_loss"] is not None:
        metrics["validation_mlm_loss"] = float(last["mlm_loss"])
    for name, m in last["tasks"].items():
        metrics[f"validation_mae/{name}"] = float(m["mae"])
        metrics[f"validation_mae_over_mad/{name}"] = float(m["mae_over_mad"])
    guard = corpus.guard
    return ModelCard(
        name=f"cloud-{config.model.size}-multitask",
        size=config.model.size,
        data=DataSummary(
            datasets={t.name: len(t.train) + len(t.validation) for t in tasks}
            | {"mlm_strings": len(corpus.mlm_train) + len(corpus.mlm_validation)},
            n_train=sum(len(t.train) for t in tasks) + len(corpus.mlm_train),
            n_validation=sum(len(t.validation) for t in tasks) + len(corpus.mlm_validation),
            details={
                "objective": "multitask",
                "tasks": [i.model_dump() for i in infos],
                "mlm_train": len(corpus.mlm_train),
                "mlm_validation": len(corpus.mlm_validation),
                "leakage_guard": {
                    "excluded_pools": list(guard.pools),
                    "removed": guard.removed,
                    "kept": guard.kept,
                    "total_removed": guard.total_removed(),
                },
                "validation_metrics_step": last.get("step"),
                "best_step": best.get("step"),
                "task_heads": f"{HEADS_WEIGHTS} + {HEADS_CARD} beside this card",
            },
        ),
        hyperparameters=json.loads(config.model_dump_json()),
        metrics=metrics,
        command=command,
    )


def _save(
    directory: Path,
    model: MultitaskModel,
    tokenizer: ScopeTokenizer,
    card: ModelCard,
    infos: list[TaskHeadInfo],
) -> None:
    """The encoder + MLM head checkpoint, and the task heads beside it."""
    save_checkpoint(directory, model.mlm, tokenizer, card)
    save_module_weights(directory / HEADS_WEIGHTS, model.heads)
    text = json.dumps({"tasks": [i.model_dump() for i in infos],
                       "head_dropout": card.hyperparameters["multitask"]["head_dropout"]}, indent=1)  # fmt: skip
    (directory / HEADS_CARD).write_text(text + "\n", encoding="utf-8")


def load_multitask(
    directory: str | Path, *, device: str | torch.device = "cpu"
) -> tuple[MultitaskModel, ScopeTokenizer, ModelCard, list[TaskHeadInfo]]:
    """Encoder, MLM head and task heads of a multi-task checkpoint (in eval mode).

    Raises:
        CheckpointError: the checkpoint or its task heads are missing or do not fit.
    """
    directory = Path(directory)
    mlm_model, tokenizer, card = load_checkpoint(directory, device="cpu")
    path = directory / HEADS_CARD
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        infos = [TaskHeadInfo.model_validate(t) for t in raw["tasks"]]
    except (OSError, KeyError, ValueError) as exc:
        raise CheckpointError(f"{path}: missing or invalid task-head card ({exc})") from exc
    if not isinstance(mlm_model, CloudForMaskedLM):
        raise CheckpointError(
            f"{directory}: not a multi-task checkpoint (its head is not masked-LM)"
        )
    model = MultitaskModel(mlm_model.encoder, len(infos), float(raw.get("head_dropout", 0.1)))
    model.mlm = mlm_model  # the loaded MLM head, not a fresh one
    load_module_weights(directory / HEADS_WEIGHTS, model.heads)
    return model.to(device).eval(), tokenizer, card, infos


def pretrain_multitask(
    config: PretrainConfig,
    out_dir: str | Path,
    *,
    resume: bool = False,
    callback: MultitaskCallback | None = None,
    corpus: MultiTaskCorpus | None = None,
    tokenizer: ScopeTokenizer | None = None,
    command: str = "",
) -> MultitaskResult:
    """Multi-task pretraining in this process (``cloudlab pretrain`` with ``objective: multitask``).

    Args:
        config: the run configuration (see ``configs/pretrain_multitask.yaml``).
        out_dir: run directory: the last checkpoint, ``best/``, ``training_state/``.
        resume: continue from the last training state in ``out_dir``.
        callback: progress hooks.
        corpus: use this corpus instead of building it from ``config.multitask_data``.
        tokenizer: defaults to ``ScopeTokenizer.default()``.
        command: recorded in the model card.

    Raises:
        ConfigError: invalid options, ``train.num_workers > 1``, or ``out_dir`` holds a run
            and ``resume`` is False.
    """
    from cloud_model.tokenizer import ScopeTokenizer

    if config.train.num_workers > 1:
        raise ConfigError(
            f"train.num_workers={config.train.num_workers}: multi-task pretraining runs in one "
            "process (device: cuda for a GPU); Ray Train is for objective: mlm"
        )
    out = Path(out_dir)
    if not resume and has_training_state(out / STATE_DIR):
        raise ConfigError(
            f"{out} already holds a training run: resume it (--resume) or pick a new --out"
        )
    out.mkdir(parents=True, exist_ok=True)
    if corpus is None:
        corpus, corpus_tokenizer = _build_corpus(config.multitask_data)
        tokenizer = tokenizer or corpus_tokenizer
    return train_multitask(
        config, out, corpus, tokenizer or ScopeTokenizer.default(), resume=resume,
        callback=callback, command=command,
    )  # fmt: skip


def _build_corpus(options: dict[str, Any]) -> tuple[MultiTaskCorpus, ScopeTokenizer | None]:
    """The corpus of ``multitask_data`` via :mod:`cloud_model.multitask_corpus`, and the
    tokenizer its strings need (its ``corpus_tokenizer()``, when it has one)."""
    try:
        from cloud_model import multitask_corpus  # type: ignore[attr-defined]
    except ImportError as exc:
        raise ConfigError(
            "objective: multitask needs cloud_model.multitask_corpus (the corpus builder) to "
            f"build its corpus from multitask_data ({exc})"
        ) from exc
    from pydantic import ValidationError

    try:
        data_options = multitask_corpus.MultiTaskDataOptions.model_validate(options)
    except ValidationError as exc:
        problems = "; ".join(
            f"multitask_data.{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()
        )
        raise ConfigError(problems) from exc
    corpus: MultiTaskCorpus = multitask_corpus.build_multitask_corpus(data_options)
    make_tokenizer = getattr(multitask_corpus, "corpus_tokenizer", None)
    return corpus, (make_tokenizer() if make_tokenizer is not None else None)
