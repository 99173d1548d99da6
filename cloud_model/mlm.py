"""Masked-language-model building blocks: masking, learning-rate schedule, batch order, evaluation.

Pure functions of their arguments (RNGs are passed in or derived from
``(seed, purpose, step, rank)``), so that training is reproducible and a
resumed run sees exactly the batches and masks the uninterrupted run would.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from cloud_model.heads import IGNORE_INDEX


def derived_seed(seed: int, purpose: str, *indices: int) -> int:
    """A 63-bit seed for ``purpose`` at ``indices`` (step, rank, epoch...), stable across runs."""
    text = ":".join([str(seed), purpose, *map(str, indices)])
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") & (2**63 - 1)


def generator(seed: int, purpose: str, *indices: int) -> torch.Generator:
    """A CPU ``torch.Generator`` seeded with :func:`derived_seed`."""
    return torch.Generator().manual_seed(derived_seed(seed, purpose, *indices))


def mask_tokens(
    ids: torch.Tensor,
    mask: torch.Tensor,
    *,
    special_ids: torch.Tensor,
    mask_id: int,
    replacement_ids: torch.Tensor,
    mask_prob: float = 0.15,
    rng: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT masking: pick ``mask_prob`` of the real, non-special tokens; of those 80 % become
    [MASK], 10 % a random token, 10 % stay; the loss is on all picked tokens.

    At least one token per batch is picked (if any is eligible), so the loss is defined.

    Args:
        ids: ``(B, T)`` token ids.
        mask: ``(B, T)`` bool, True on real tokens.
        special_ids: ``(S,)`` ids never picked ([CLS], [SEP], [PAD], [MASK], [UNK]).
        mask_id: the [MASK] id.
        replacement_ids: ``(R,)`` ids random replacements are drawn from.
        mask_prob: fraction of eligible tokens to predict.
        rng: CPU generator (for reproducibility).

    Returns:
        ``(inputs, labels)``, both ``(B, T)``: ``labels`` holds the original id at picked
        positions and ``IGNORE_INDEX`` elsewhere.
    """
    eligible = mask.bool() & ~torch.isin(ids, special_ids.to(ids.device))  # (B, T)
    u = torch.rand(ids.shape, generator=rng).to(ids.device)  # (B, T)
    picked = eligible & (u < mask_prob)  # (B, T)
    if not bool(picked.any()) and bool(eligible.any()):
        flat = eligible.flatten().nonzero().squeeze(1)  # (E,)
        choice = torch.randint(len(flat), (1,), generator=rng).to(ids.device)
        picked = picked.flatten().index_fill(0, flat[choice], True).view_as(picked)
    labels = torch.where(picked, ids, torch.full_like(ids, IGNORE_INDEX))  # (B, T)
    action = torch.rand(ids.shape, generator=rng).to(ids.device)  # (B, T)
    random_pick = torch.randint(len(replacement_ids), ids.shape, generator=rng).to(ids.device)
    inputs = ids.clone()
    inputs[picked & (action < 0.8)] = mask_id
    to_random = picked & (action >= 0.8) & (action < 0.9)  # (B, T)
    inputs[to_random] = replacement_ids.to(ids.device)[random_pick[to_random]]
    return inputs, labels


def lr_factor(step: int, *, warmup_steps: int, max_steps: int, min_ratio: float) -> float:
    """Multiplier of the peak learning rate: linear warm-up then cosine decay to ``min_ratio``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def batch_indices(
    step: int, *, n_rows: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1
) -> torch.Tensor:
    """Row indices of this rank's batch at ``step``.

    Each epoch is a fresh permutation (seeded by epoch); a global step takes
    ``world_size`` consecutive batches of it and rank ``r`` the ``r``-th, so ranks
    see disjoint rows. The last incomplete global batch of an epoch is dropped.

    Raises:
        ValueError: fewer rows than one global batch.
    """
    global_batch = batch_size * world_size
    per_epoch = n_rows // global_batch
    if per_epoch == 0:
        raise ValueError(f"{n_rows} rows cannot fill one global batch of {global_batch}")
    epoch, offset = divmod(step, per_epoch)
    order = torch.randperm(n_rows, generator=generator(seed, "epoch", epoch))  # (N,)
    start = offset * global_batch + rank * batch_size
    return order[start : start + batch_size]  # (batch_size,)


def trim(ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop trailing columns that are padding in every row: ``(B, T) -> (B, T')``."""
    length = int(mask.sum(1).max()) if mask.numel() else 0
    return ids[:, : max(1, length)], mask[:, : max(1, length)]


@dataclass
class MLMTotals:
    """Sums over predicted tokens, to be reduced across ranks before dividing."""

    loss_sum: float = 0.0
    correct: float = 0.0
    count: float = 0.0

    def as_tensor(self) -> torch.Tensor:
        """``(3,)`` float64 tensor ``[loss_sum, correct, count]``."""
        return torch.tensor([self.loss_sum, self.correct, self.count], dtype=torch.float64)


@torch.no_grad()
def evaluate_mlm(
    model: nn.Module,
    ids: torch.Tensor,
    mask: torch.Tensor,
    *,
    special_ids: torch.Tensor,
    mask_id: int,
    replacement_ids: torch.Tensor,
    mask_prob: float,
    batch_size: int,
    seed: int,
    device: torch.device,
    autocast_dtype: torch.dtype | None = None,
    rank: int = 0,
    world_size: int = 1,
) -> MLMTotals:
    """MLM loss and accuracy sums on fixed masks (the same positions at every evaluation).

    Args:
        model: returns ``(logits (B, T, V), loss)`` from ``(ids, mask, labels)``.
        ids, mask: ``(N, T)`` validation rows.
        rank, world_size: this rank evaluates batches ``rank, rank + world_size, ...``.
    """
    was_training = model.training
    model.eval()
    totals = MLMTotals()
    n_batches = math.ceil(len(ids) / batch_size)
    for b in range(rank, n_batches, world_size):
        rows = slice(b * batch_size, (b + 1) * batch_size)
        batch_ids, batch_mask = trim(ids[rows], mask[rows])
        inputs, labels = mask_tokens(
            batch_ids,
            batch_mask,
            special_ids=special_ids,
            mask_id=mask_id,
            replacement_ids=replacement_ids,
            mask_prob=mask_prob,
            rng=generator(seed, "validation", b),
        )
        with torch.autocast(
            device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None
        ):
            logits, _ = model(inputs.to(device), batch_mask.to(device))  # (B, T, V)
        labels = labels.to(device)
        picked = labels != IGNORE_INDEX  # (B, T)
        chosen = logits[picked].float()  # (P, V)
        totals.loss_sum += float(F.cross_entropy(chosen, labels[picked], reduction="sum"))
        totals.correct += float((chosen.argmax(-1) == labels[picked]).sum())
        totals.count += float(picked.sum())
    model.train(was_training)
    return totals
