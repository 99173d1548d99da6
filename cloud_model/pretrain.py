"""Masked-language-model pretraining of the CLOUD encoder on SCOPE strings.

AdamW with linear warm-up and cosine decay, gradient clipping, bf16 autocast on
CUDA (fp32 on CPU), and RNGs derived from ``(seed, step, rank)``: the batch
order, the masks and the dropout of step ``s`` do not depend on what ran
before, so a run resumed from its last training state repeats the uninterrupted
run exactly. The same :func:`train_loop` runs in-process (:func:`pretrain`) or,
when ``train.num_workers > 1``, under Ray Train
(:func:`cloud_model.ray_work.pretrain_with_ray`, which imports this module; this
module never imports it).
The corpus comes from :mod:`cloud_model.pretrain_corpus`.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
from pydantic import BaseModel, ConfigDict

from cloud_model.checkpoint import DataSummary, ModelCard, save_checkpoint
from cloud_model.errors import ConfigError
from cloud_model.heads import CloudForMaskedLM
from cloud_model.mlm import (
    batch_indices,
    derived_seed,
    evaluate_mlm,
    generator,
    lr_factor,
    mask_tokens,
    trim,
)
from cloud_model.model import CloudConfig, CloudEncoder
from cloud_model.pretrain_config import PretrainConfig, TrainOptions
from cloud_model.pretrain_corpus import Corpus, build_corpus
from cloud_model.training_state import has_training_state, load_training_state, save_training_state

if TYPE_CHECKING:
    from cloud_model.tokenizer import ScopeTokenizer

logger = logging.getLogger(__name__)

STATE_DIR = "training_state"  # under the run directory
RESULT_FILE = "pretrain_result.json"  # rank 0's PretrainResult of the latest (partial) run

__all__ = [
    "Corpus",
    "EvalMetrics",
    "PretrainCallback",
    "PretrainConfig",
    "PretrainResult",
    "StepProgress",
    "build_corpus",
    "pretrain",
    "train_loop",
]


@dataclass(frozen=True)
class StepProgress:
    """Reported after each optimizer step (1-based ``step``)."""

    step: int
    max_steps: int
    loss: float
    lr: float
    tokens_per_s: float


@dataclass(frozen=True)
class EvalMetrics:
    """Validation MLM loss (nats per masked token) and masked-token accuracy."""

    step: int
    loss: float
    accuracy: float
    n_tokens: int


class PretrainCallback:
    """Progress hooks (the CLI draws a progress bar with them); called on rank 0 only."""

    def on_start(self, start_step: int, max_steps: int) -> None:
        """Before the first step (``start_step`` > 0 when resuming)."""

    def on_step(self, progress: StepProgress) -> None:
        """After each optimizer step and its evaluation/training-state save, if due."""

    def on_eval(self, metrics: EvalMetrics) -> None:
        """After each validation pass."""


class PretrainResult(BaseModel):
    """What one process of a pretraining run did and measured."""

    model_config = ConfigDict(extra="forbid")
    out_dir: str
    start_step: int  # > 0 when resumed
    steps: int  # optimizer steps run by this process
    losses: list[float]  # training loss of each of those steps
    validation: list[dict[str, float]]  # {"step", "loss", "accuracy"} per validation pass
    n_parameters: int
    wall_s: float
    train_s: float  # time inside training steps (no evaluation, no saving)
    tokens_per_s: float  # real (non-pad) tokens per second of train_s, all ranks together
    steps_per_s: float


@dataclass(frozen=True)
class _Masking:
    """Keyword arguments of :func:`~cloud_model.mlm.mask_tokens` for a tokenizer."""

    special_ids: torch.Tensor  # (S,)
    mask_id: int
    replacement_ids: torch.Tensor  # (R,)
    mask_prob: float

    @classmethod
    def for_tokenizer(cls, tokenizer: ScopeTokenizer, mask_prob: float) -> _Masking:
        special = {tokenizer.pad_id, tokenizer.unk_id, tokenizer.cls_id, tokenizer.sep_id}
        special.add(tokenizer.mask_id)
        others = [i for i in range(tokenizer.vocab_size) if i not in special]
        return cls(
            torch.tensor(sorted(special)), tokenizer.mask_id, torch.tensor(others), mask_prob
        )

    def kwargs(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _device_and_dtype(
    train: TrainOptions, device: torch.device | None
) -> tuple[torch.device, torch.dtype | None]:
    """The device, and the autocast dtype (None = plain fp32)."""
    if device is None:
        cuda = train.device == "cuda" or (train.device == "auto" and torch.cuda.is_available())
        device = torch.device("cuda" if cuda else "cpu")
    precision = train.precision
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    if precision == "bf16" and device.type != "cuda":
        raise ConfigError("train.precision: bf16 is for CUDA only (on CPU it is ~500x slower)")
    return device, (torch.bfloat16 if precision == "bf16" else None)


def new_encoder(config: PretrainConfig, tokenizer: ScopeTokenizer) -> CloudEncoder:
    """A freshly initialised encoder of ``config.model`` for ``tokenizer``'s vocabulary.

    With ``model.element_features`` set, its token embedding holds the tokenizer's element
    descriptor table (:func:`cloud_model.element_features.element_table`).
    """
    from cloud_model.element_features import element_table

    options = config.model
    model_config = CloudConfig.named(
        options.size,
        tokenizer.vocab_size,
        max_len=options.max_len,
        dropout=options.dropout,
        pooling=options.pooling,
        element_features=options.element_features,
    )
    table = None
    if options.element_features != "none":
        table = element_table(tokenizer, options.element_features)
    return CloudEncoder(model_config, table)


def _optimizer_and_schedule(
    model: torch.nn.Module, train: TrainOptions
) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW (weight decay on matrices only) and warm-up + cosine LambdaLR."""
    params = list(model.parameters())  # the tied embedding/decoder matrix appears once
    optimizer = torch.optim.AdamW(
        [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": train.weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ],
        lr=train.learning_rate,
        betas=(train.beta1, train.beta2),
    )

    def schedule(step: int) -> float:
        return lr_factor(
            step,
            warmup_steps=train.warmup_steps,
            max_steps=train.max_steps,
            min_ratio=train.min_lr_ratio,
        )

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)


def _autocast(device: torch.device, dtype: torch.dtype | None) -> torch.autocast:
    return torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)


def train_loop(
    config: PretrainConfig,
    out_dir: Path,
    corpus: Corpus,
    tokenizer: ScopeTokenizer,
    *,
    resume: bool = False,
    callback: PretrainCallback | None = None,
    command: str = "",
    rank: int = 0,
    world_size: int = 1,
    device: torch.device | None = None,
    wrap_model: Callable[[torch.nn.Module], torch.nn.Module] | None = None,
) -> PretrainResult:
    """Run (or resume) MLM pretraining; rank 0 writes training states and the final checkpoint.

    Args:
        config: the validated run configuration.
        out_dir: run directory: ``training_state/`` and the final checkpoint go here.
        corpus: training and validation strings.
        tokenizer: turns strings into ids; its special ids are never masked.
        resume: continue from ``out_dir/training_state`` (a fresh start if there is none).
        callback: progress hooks (rank 0 only).
        command: the command line recorded in the model card.
        rank, world_size: position in a data-parallel group (one process by default).
        device: overrides ``config.train.device`` (Ray Train passes the worker's device).
        wrap_model: e.g. ``ray.train.torch.prepare_model`` (DDP).

    Returns:
        Losses, validation metrics and throughput of this process.
    """
    t_start = time.perf_counter()
    train = config.train
    callback = callback or PretrainCallback()
    device, autocast_dtype = _device_and_dtype(train, device)
    if train.num_threads is not None and device.type == "cpu":
        torch.set_num_threads(train.num_threads)
    train_batch = tokenizer.batch_encode(corpus.train, max_length=config.model.max_len)
    val_batch = tokenizer.batch_encode(corpus.validation, max_length=config.model.max_len)
    masking = _Masking.for_tokenizer(tokenizer, train.mask_prob)

    torch.manual_seed(derived_seed(train.seed, "init"))  # same initial weights on every rank
    model = CloudForMaskedLM(new_encoder(config, tokenizer)).to(device)
    optimizer, scheduler = _optimizer_and_schedule(model, train)
    state_dir, fingerprint = out_dir / STATE_DIR, config.fingerprint()
    start_step, history = 0, []
    if resume and has_training_state(state_dir):
        state = load_training_state(
            state_dir, model=model, optimizer=optimizer, scheduler=scheduler,
            config_fingerprint=fingerprint,
        )  # fmt: skip
        start_step, history = state.step, list(state.extra.get("losses", []))
    trained = wrap_model(model) if wrap_model is not None else model
    trained.train()

    losses: list[float] = []
    validation: list[dict[str, float]] = []
    seen_rows: list[int] = []
    tokens, train_s = 0, 0.0
    if rank == 0:
        callback.on_start(start_step, train.max_steps)
    for step in range(start_step, train.max_steps):
        t0 = time.perf_counter()
        rows = batch_indices(
            step, n_rows=len(corpus.train), batch_size=train.batch_size, seed=train.seed,
            rank=rank, world_size=world_size,
        )  # fmt: skip
        ids, mask = trim(train_batch.ids[rows], train_batch.mask[rows])  # (B, T)
        inputs, labels = mask_tokens(
            ids, mask, rng=generator(train.seed, "mask", step, rank), **masking.kwargs()
        )  # (B, T), (B, T)
        torch.manual_seed(derived_seed(train.seed, "dropout", step, rank))
        with _autocast(device, autocast_dtype):
            _, maybe_loss = trained(inputs.to(device), mask.to(device), labels.to(device))
        loss = cast(torch.Tensor, maybe_loss)  # a tensor whenever labels are given
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), train.grad_clip)
        optimizer.step()
        scheduler.step()
        train_s += time.perf_counter() - t0
        tokens += int(mask.sum()) * world_size
        losses.append(float(loss.detach()))
        seen_rows += rows.tolist() if world_size > 1 else []
        done, lr = step + 1, float(optimizer.param_groups[0]["lr"])

        if done % train.eval_every == 0 or done == train.max_steps:
            totals = evaluate_mlm(  # unwrapped model: a DDP forward would be a collective
                model, val_batch.ids, val_batch.mask, batch_size=train.eval_batch_size,
                seed=train.seed, device=device, autocast_dtype=autocast_dtype, rank=rank,
                world_size=world_size, **masking.kwargs(),
            )  # fmt: skip
            summed = totals.as_tensor().to(device)  # (3,)
            if world_size > 1 and torch.distributed.is_initialized():
                torch.distributed.all_reduce(summed)
            loss_sum, correct, count = summed.tolist()
            metrics = EvalMetrics(
                done, loss_sum / max(count, 1), correct / max(count, 1), int(count)
            )
            validation.append({"step": done, "loss": metrics.loss, "accuracy": metrics.accuracy})
            logger.info(
                "step %d: validation MLM loss %.4f, masked-token accuracy %.4f",
                done, metrics.loss, metrics.accuracy,
            )  # fmt: skip
            if rank == 0:
                callback.on_eval(metrics)
        if rank == 0 and (done % train.checkpoint_every == 0 or done == train.max_steps):
            save_training_state(
                state_dir, model=model, optimizer=optimizer, scheduler=scheduler, step=done,
                config_fingerprint=fingerprint, extra={"losses": history + losses},
            )  # fmt: skip
        if done % train.log_every == 0:
            logger.info("step %d/%d loss %.4f lr %.2e", done, train.max_steps, losses[-1], lr)
        if rank == 0:
            rate = tokens / max(train_s, 1e-9)
            callback.on_step(StepProgress(done, train.max_steps, losses[-1], lr, rate))

    if world_size > 1:  # which rows each rank trained on, and its losses
        shard = out_dir / "shards" / f"rank_{rank}.json"
        shard.parent.mkdir(parents=True, exist_ok=True)
        shard.write_text(json.dumps({"rank": rank, "rows": seen_rows, "losses": losses}))
    n_steps = train.max_steps - start_step
    result = PretrainResult(
        out_dir=str(out_dir), start_step=start_step, steps=n_steps, losses=losses,
        validation=validation, n_parameters=sum(p.numel() for p in model.parameters()),
        wall_s=time.perf_counter() - t_start, train_s=train_s,
        tokens_per_s=tokens / max(train_s, 1e-9), steps_per_s=n_steps / max(train_s, 1e-9),
    )  # fmt: skip
    if rank == 0 and n_steps > 0:
        card = _model_card(config, corpus, result, history + losses, command)
        save_checkpoint(out_dir, model, tokenizer, card)
    if rank == 0:
        (out_dir / RESULT_FILE).write_text(result.model_dump_json(indent=1), encoding="utf-8")
    return result


def _model_card(
    config: PretrainConfig,
    corpus: Corpus,
    result: PretrainResult,
    all_losses: list[float],
    command: str,
) -> ModelCard:
    last = result.validation[-1] if result.validation else {}
    tail = all_losses[-50:]
    return ModelCard(
        name=f"cloud-{config.model.size}",
        size=config.model.size,
        data=DataSummary(
            datasets=corpus.sources,
            n_train=len(corpus.train),
            n_validation=len(corpus.validation),
            details={
                "scope_variant": config.data.variant,
                "symprec_angstrom": config.data.symprec,
                "exclude_splits": config.data.exclude_splits,
                "validation_split": "sha256(string) bucket < validation_fraction, after de-dup",
            },
        ),
        hyperparameters=config.model_dump(mode="json"),
        metrics={
            "validation_mlm_loss": last.get("loss", float("nan")),
            "validation_masked_accuracy": last.get("accuracy", float("nan")),
            "train_mlm_loss_last50": sum(tail) / max(len(tail), 1),
            "steps": float(config.train.max_steps),
            "tokens_per_s": result.tokens_per_s,
            "steps_per_s": result.steps_per_s,
        },
        command=command,
    )


def prepare_run(
    config: PretrainConfig,
    out_dir: str | Path,
    *,
    resume: bool = False,
    corpus: Corpus | None = None,
    tokenizer: ScopeTokenizer | None = None,
) -> tuple[Path, Corpus, ScopeTokenizer]:
    """Check and create the run directory; default the tokenizer and build the corpus.

    Shared by :func:`pretrain` (in process) and :func:`cloud_model.ray_work.pretrain_with_ray`.

    Returns:
        ``(out_dir, corpus, tokenizer)``.

    Raises:
        ConfigError: ``out_dir`` already holds a training run and ``resume`` is False.
    """
    from cloud_model.tokenizer import ScopeTokenizer

    out = Path(out_dir)
    if not resume and has_training_state(out / STATE_DIR):
        raise ConfigError(
            f"{out} already holds a training run: resume it (--resume) or pick a new --out"
        )
    out.mkdir(parents=True, exist_ok=True)
    return out, corpus or build_corpus(config.data), tokenizer or ScopeTokenizer.default()


def pretrain(
    config: PretrainConfig,
    out_dir: str | Path,
    *,
    resume: bool = False,
    callback: PretrainCallback | None = None,
    corpus: Corpus | None = None,
    tokenizer: ScopeTokenizer | None = None,
    command: str = "",
) -> PretrainResult:
    """Pretrain a CLOUD encoder with MLM in this process.

    Data-parallel runs (``train.num_workers > 1``) go through
    :func:`cloud_model.ray_work.pretrain_with_ray` instead, with Ray started by the
    caller (``cloudlab pretrain`` does both).

    Args:
        config: the run configuration (see ``configs/pretrain_small.yaml``).
        out_dir: run directory; receives the checkpoint (``model.safetensors``,
            ``model_card.json``, ``tokenizer.json``) and ``training_state/``.
        resume: continue from the last training state in ``out_dir``.
        callback: progress hooks.
        corpus: use these strings instead of :func:`build_corpus` (tests, custom corpora).
        tokenizer: defaults to ``ScopeTokenizer.default()``.
        command: recorded in the model card as the command that reproduces the run.

    Raises:
        ConfigError: invalid options, ``train.num_workers > 1``, or ``out_dir`` holds a
            run and ``resume`` is False.
        CheckpointError: the training state cannot be resumed.
    """
    if config.train.num_workers > 1:
        raise ConfigError(
            f"train.num_workers={config.train.num_workers}: data-parallel pretraining runs under "
            "Ray Train; start Ray and call cloud_model.ray_work.pretrain_with_ray "
            "(`cloudlab pretrain` does both)"
        )
    out, corpus, tokenizer = prepare_run(
        config, out_dir, resume=resume, corpus=corpus, tokenizer=tokenizer
    )
    return train_loop(
        config, out, corpus, tokenizer, resume=resume, callback=callback, command=command
    )
