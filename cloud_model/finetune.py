"""Fine-tuning machinery: trainable members on a frozen shared trunk, and their training loop.

Where the encoder is cut and what the frozen part (the trunk) computes and caches
is :mod:`cloud_model.trunk`. A :class:`MemberNet` is everything above the cut:
copies of the top blocks (and, for the ``"ids"`` cut, of the embeddings), the
final LayerNorm, pooling and a head; it runs them with the encoder's own step
functions (:func:`cloud_model.model.embed_tokens`, :func:`~cloud_model.model.run_blocks`,
:func:`~cloud_model.model.pool_states`).

A member maps features to targets in physical units: a regression head
(standardised internally), a Debye head giving theta (``debye_output="theta"``)
or the Debye heat capacity at the label temperatures
(``debye_output="heat_capacity"``, :func:`cloud_model.debye.heat_capacity`), or a
Debye + Einstein head giving the heat capacity of Debye acoustic and Einstein
optical branches (:class:`~cloud_model.heads.DebyeEinsteinHead`; heat capacity only).
The loss is L1 or MSE on ``(prediction - y) / scale`` with ``scale`` the training
targets' standard deviation per column, over the finite targets only.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict
from torch import Tensor, nn

from cloud_model.configs import FinetuneConfig as FinetuneConfig
from cloud_model.debye import heat_capacity
from cloud_model.errors import ConfigError
from cloud_model.heads import DebyeEinsteinHead, DebyeHead, RegressionHead, RegressionHeadConfig
from cloud_model.model import (
    Block,
    CloudEncoder,
    embed_tokens,
    pool_states,
    run_blocks,
    token_embedding,
)
from cloud_model.trunk import MemberSpec

logger = logging.getLogger(__name__)
# phase records ("predicting done/total rows") for whoever shows progress (the CLI's live display)
_phase = logging.getLogger("cloudlab.progress")


def resolve_device(choice: Literal["auto", "cpu", "cuda"]) -> torch.device:
    """``auto`` -> CUDA when available, else CPU."""
    if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


class MemberNet(nn.Module):
    """The trainable top of a model: [embeddings] + top blocks + final norm + pooling + head."""

    target_scale: Tensor  # (m,) loss scale per target column (training std)
    temperatures: Tensor  # (m,) label temperatures in K (Debye heat capacity)

    def __init__(self, spec: MemberSpec, encoder: CloudEncoder | None = None) -> None:
        """Copy the top of ``encoder`` (fresh, to be loaded, when None) and add a new head."""
        super().__init__()
        self.spec = spec
        cfg = spec.encoder
        self.embed: nn.ModuleDict | None = None
        if spec.kind == "ids":
            tok = token_embedding(cfg) if encoder is None else encoder.tok_emb
            pos = nn.Embedding(cfg.max_len, cfg.d_model) if encoder is None else encoder.pos_emb
            self.embed = nn.ModuleDict({"tok": copy.deepcopy(tok), "pos": copy.deepcopy(pos)})
            self.drop = nn.Dropout(cfg.dropout)
        n_top = spec.n_trainable_blocks
        if encoder is None:
            top: list[nn.Module] = [Block(cfg) for _ in range(n_top)]
            ln_f: nn.Module = nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps)
        else:
            top, ln_f = list(encoder.blocks)[cfg.n_layer - n_top :], encoder.ln_f
        self.blocks = nn.ModuleList(copy.deepcopy(b) for b in top)
        self.ln_f = copy.deepcopy(ln_f) if spec.kind != "pooled" else None
        self.head: RegressionHead | DebyeHead | DebyeEinsteinHead
        if isinstance(spec.head, RegressionHeadConfig):
            self.head = RegressionHead(cfg.d_model, spec.head.n_targets, spec.head.dropout)
        elif spec.head.is_einstein:
            if spec.debye_output != "heat_capacity":
                raise ConfigError(
                    "the debye_einstein head predicts heat capacities: set "
                    "debye_output: heat_capacity (use the debye head for theta labels)"
                )
            self.head = DebyeEinsteinHead(cfg.d_model, spec.head)
        else:
            h = spec.head
            self.head = DebyeHead(cfg.d_model, h.theta_scale, h.theta_min, h.dropout)
        self.register_buffer("target_scale", torch.ones(spec.n_targets))
        temps = torch.tensor(spec.temperatures, dtype=torch.float32)
        self.register_buffer("temperatures", temps, persistent=False)
        self.requires_grad_(True)  # copies of a frozen shared encoder arrive frozen

    def forward(self, x: Tensor, mask: Tensor | None) -> Tensor:
        """Head output: standardised ``(B, m)`` (regression), theta ``(B,)`` in K (Debye) or
        packed parameters ``(B, 2K + 2)`` (Debye + Einstein, see
        :class:`~cloud_model.heads.DebyeEinsteinHead`).

        Args:
            x: features from :func:`cloud_model.trunk.trunk_features`: ``(B, T)`` ids,
                ``(B, T, C)`` states or ``(B, C)`` pooled vectors.
            mask: ``(B, T)`` bool, True on real tokens (None for pooled features).
        """
        return self.head(self.pooled(x, mask))  # (B, m) standardised, or theta (B,)

    def pooled(self, x: Tensor, mask: Tensor | None) -> Tensor:
        """The pooled state ``(B, C)`` the head sees (arguments as :meth:`forward`)."""
        if self.spec.kind == "pooled":
            return x  # (B, C)
        if mask is None:
            raise ConfigError("token features need their (B, T) mask")
        if self.embed is not None:
            x = embed_tokens(self.embed["tok"], self.embed["pos"], self.drop, x)  # (B, T, C)
        x = run_blocks(self.blocks, x, mask)  # (B, T, C)
        if self.ln_f is not None:  # always set for token features
            x = self.ln_f(x)  # (B, T, C)
        return pool_states(x, mask, self.spec.pooling)  # (B, C)

    def hidden(self, x: Tensor, mask: Tensor | None) -> Tensor:
        """What a regression head's last linear layer sees, ``(B, C)`` (eval-mode use).

        Raises:
            ConfigError: the head is a Debye head.
        """
        if not isinstance(self.head, RegressionHead):
            raise ConfigError("a Bayesian last layer needs a regression head, not a Debye head")
        return self.head.net[:-1](self.pooled(x, mask))  # (B, C)

    def to_targets(self, out: Tensor, n_atoms: Tensor | None) -> Tensor:
        """Head output -> predictions ``(B, m)`` in target units.

        Args:
            out: from :meth:`forward`.
            n_atoms: ``(B,)`` atoms per cell for Debye heat capacities (None = per atom).
        """
        if isinstance(self.head, RegressionHead):
            return self.head.destandardise(out.float())  # (B, m)
        if isinstance(self.head, DebyeEinsteinHead):
            return self.head.heat_capacity(out, self.temperatures, n_atoms)  # (B, m)
        theta = out.float()  # (B,)
        if self.spec.debye_output == "theta":
            return theta[:, None]  # (B, 1)
        n = torch.ones_like(theta) if n_atoms is None else n_atoms.to(theta)
        return heat_capacity(theta, self.temperatures.to(theta), n)  # (B, m)

    def set_target_stats(self, y: Tensor) -> None:
        """Loss scale (and regression standardisation) from training targets ``(n, m)``."""
        finite = torch.isfinite(y)
        counts = finite.sum(0).clamp_min(1)  # (m,)
        mean = torch.where(finite, y, 0.0).sum(0) / counts  # (m,)
        var = torch.where(finite, (y - mean) ** 2, 0.0).sum(0) / (counts - 1).clamp_min(1)
        scale = var.sqrt()
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        if isinstance(self.head, RegressionHead):
            self.head.set_target_stats(y)
            self.target_scale.copy_(self.head.target_std)
        elif self.spec.debye_output == "heat_capacity" and not self.spec.standardise_debye_loss:
            self.target_scale.fill_(1.0)
        else:
            self.target_scale.copy_(scale.to(self.target_scale))

    def refit_target_stats(self, y: Tensor) -> None:
        """New target statistics that leave the current predictions unchanged (warm starts).

        A regression head's last layer is rescaled so that ``destandardise`` of its
        output is the same function as before the statistics changed.
        """
        if not isinstance(self.head, RegressionHead):
            self.set_target_stats(y)
            return
        old_mean = self.head.target_mean.clone()
        old_std = self.head.target_std.clone()
        self.set_target_stats(y)
        new_mean, new_std = self.head.target_mean, self.head.target_std
        last = self.head.net[-1]
        if not isinstance(last, nn.Linear):
            raise ConfigError("regression head must end in a Linear layer")
        with torch.no_grad():
            ratio = old_std / new_std  # (m,)
            last.weight.mul_(ratio[:, None])
            last.bias.copy_(last.bias * ratio + (old_mean - new_mean) / new_std)


def masked_loss(pred: Tensor, y: Tensor, scale: Tensor, kind: Literal["l1", "mse"]) -> Tensor:
    """Mean L1/squared error of ``(pred - y) / scale`` over finite ``y`` (all ``(B, m)``)."""
    finite = torch.isfinite(y)
    diff = (pred - torch.where(finite, y, pred.detach())) / scale  # (B, m), 0 where missing
    per = diff.abs() if kind == "l1" else diff**2
    return (per * finite).sum() / finite.sum().clamp_min(1)


@dataclass
class FeatureSet:
    """Cached features of some rows with their labels.

    ``x``: ``(n, T)`` ids, ``(n, T, C)`` states or ``(n, C)`` pooled vectors;
    ``mask``: ``(n, T)`` bool or None; ``y``: ``(n, m)`` targets (NaN = missing);
    ``n_atoms``: ``(n,)`` or None.
    """

    x: Tensor
    mask: Tensor | None
    y: Tensor
    n_atoms: Tensor | None = None

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def batch(
        self, index: Tensor, device: torch.device
    ) -> tuple[Tensor, Tensor | None, Tensor, Tensor | None]:
        """Rows ``index`` on ``device``, token dimension trimmed to the longest row."""
        x = self.x[index]
        mask = None if self.mask is None else self.mask[index]
        if mask is not None:
            length = int(mask.sum(1).max())
            x, mask = x[:, :length], mask[:, :length].to(device)
        atoms = None if self.n_atoms is None else self.n_atoms[index].to(device)
        return x.to(device), mask, self.y[index].to(device), atoms


class MemberFitReport(BaseModel):
    """How one member's training went."""

    model_config = ConfigDict(extra="forbid")
    epochs_run: int
    best_epoch: int
    stopped_early: bool
    train_loss: float  # last epoch, on the loss scale
    val_loss: float | None  # best epoch
    history: list[tuple[float, float | None]]  # (train, val) per epoch


def _param_groups(member: MemberNet, config: FinetuneConfig) -> list[dict[str, object]]:
    """AdamW groups: head at lr_head; blocks decaying by layer_decay from the top down."""
    groups: list[dict[str, object]] = []

    def add(module: nn.Module | None, lr: float) -> None:
        if module is None:
            return
        decay = [p for p in module.parameters() if p.requires_grad and p.dim() >= 2]
        plain = [p for p in module.parameters() if p.requires_grad and p.dim() < 2]
        groups.append({"params": decay, "lr": lr, "weight_decay": config.weight_decay})
        groups.append({"params": plain, "lr": lr, "weight_decay": 0.0})

    add(member.head, config.lr_head)
    add(member.ln_f, config.lr_encoder)
    n = len(member.blocks)
    for i, block in enumerate(member.blocks):
        add(block, config.lr_encoder * config.layer_decay ** (n - 1 - i))
    add(member.embed, config.lr_encoder * config.layer_decay**n)
    return [g for g in groups if g["params"]]


def train_member(
    member: MemberNet,
    train: FeatureSet,
    val: FeatureSet | None,
    config: FinetuneConfig,
    *,
    epochs: int,
    seed: int,
    device: torch.device,
    on_epoch: Callable[[int, float, float | None], bool | None] | None = None,
) -> MemberFitReport:
    """Train a member in place with AdamW, warm-up + cosine, early stopping on ``val``.

    Args:
        member: the model top to train (moved to ``device``).
        train: training features and targets; val: validation rows (None = no early stopping).
        config: hyperparameters; epochs: passes to run at most; seed: shuffling/dropout seed.
        device: where to train (bf16 autocast on CUDA, fp32 on CPU).
        on_epoch: called with ``(epoch, train_loss, val_loss)`` after every epoch; when it
            returns True, training ends after that epoch (the best weights so far are kept).

    Returns:
        The report; the member holds the weights of the best validation epoch.
    """
    if len(train) == 0:
        raise ConfigError("no training rows")
    member.to(device)
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    optimizer = torch.optim.AdamW(_param_groups(member, config))
    steps_per_epoch = math.ceil(len(train) / config.batch_size)
    total = max(1, epochs * steps_per_epoch)
    warmup = int(config.warmup_fraction * total)

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.05 + 0.95 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    autocast = device.type == "cuda"
    best: tuple[float, int, dict[str, Tensor]] | None = None
    history: list[tuple[float, float | None]] = []
    stale = 0
    epoch = 0
    for epoch in range(1, epochs + 1):
        member.train()
        order = torch.randperm(len(train), generator=gen)
        total_loss = 0.0
        for start in range(0, len(train), config.batch_size):
            x, mask, y, atoms = train.batch(order[start : start + config.batch_size], device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                out = member(x, mask)
            pred = member.to_targets(out, atoms)
            loss = masked_loss(pred, y.to(pred), member.target_scale, config.loss)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(member.parameters(), config.grad_clip)
            optimizer.step()
            scheduler.step()
            total_loss += float(loss.detach()) * len(y)
        train_loss = total_loss / len(train)
        val_loss = (
            evaluate_loss(member, val, config, device) if val is not None and len(val) else None
        )
        history.append((train_loss, val_loss))
        # a callback that returns True ends training after this epoch (e.g. a time budget)
        stop = on_epoch is not None and on_epoch(epoch, train_loss, val_loss) is True
        if val_loss is not None:
            if best is None or val_loss < best[0]:
                state = {k: v.detach().clone() for k, v in member.state_dict().items()}
                best, stale = (val_loss, epoch, state), 0
            else:
                stale += 1
                if stale >= config.patience:
                    break
        if stop:
            logger.info("member training stopped by its callback after epoch %d", epoch)
            break
    if best is not None:
        member.load_state_dict(best[2])
    member.eval()
    return MemberFitReport(
        epochs_run=epoch,
        best_epoch=best[1] if best is not None else epoch,
        stopped_early=epoch < epochs,
        train_loss=history[-1][0],
        val_loss=best[0] if best is not None else None,
        history=history,
    )


@torch.no_grad()
def predict_member(
    member: MemberNet, data: FeatureSet, config: FinetuneConfig, device: torch.device
) -> tuple[Tensor, Tensor]:
    """Predictions ``(n, m)`` in target units and raw head outputs (theta ``(n,)`` for Debye,
    packed parameters ``(n, 2K + 2)`` for Debye + Einstein)."""
    member.eval().to(device)
    preds, raws = [], []
    for start in range(0, len(data), config.eval_batch_size):
        index = torch.arange(start, min(len(data), start + config.eval_batch_size))
        x, mask, _, atoms = data.batch(index, device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            out = member(x, mask)
        preds.append(member.to_targets(out, atoms).float().cpu())
        raws.append(out.float().cpu())
        if len(data) > config.eval_batch_size and _phase.isEnabledFor(logging.DEBUG):
            done = int(index[-1]) + 1
            _phase.debug(
                "predicting %d/%d rows",
                done,
                len(data),
                extra={"phase": "predicting", "done": done, "total": len(data), "sub": True},
            )
    return torch.cat(preds), torch.cat(raws)


@torch.no_grad()
def member_hidden(
    member: MemberNet, data: FeatureSet, config: FinetuneConfig, device: torch.device
) -> Tensor:
    """The features ``(n, C)`` below a regression member's last layer (float32, CPU)."""
    member.eval().to(device)
    parts = []
    for start in range(0, len(data), config.eval_batch_size):
        index = torch.arange(start, min(len(data), start + config.eval_batch_size))
        x, mask, _, _ = data.batch(index, device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            out = member.hidden(x, mask)
        parts.append(out.float().cpu())
    return torch.cat(parts)


def evaluate_loss(
    member: MemberNet, data: FeatureSet | None, config: FinetuneConfig, device: torch.device
) -> float | None:
    """The training loss on ``data`` (eval mode), or None when there is nothing to score."""
    if data is None or len(data) == 0 or not bool(torch.isfinite(data.y).any()):
        return None
    pred, _ = predict_member(member, data, config, device)
    return float(masked_loss(pred, data.y.to(pred), member.target_scale.cpu(), config.loss))
