"""Pooled CLOUD embeddings of SCOPE strings: one vector per crystal from a frozen encoder.

What a GP or any other model on top of the pretrained representation reads. The
encoder runs in eval mode without gradients, in batches; identical strings (common
in pools: polymorphs that share a string) are encoded once.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch

from cloud_model.model import CloudEncoder
from cloud_model.tokenizer import ScopeTokenizer

__all__ = ["pooled_embeddings"]

logger = logging.getLogger(__name__)


def pooled_embeddings(
    encoder: CloudEncoder,
    tokenizer: ScopeTokenizer,
    scopes: Sequence[str],
    *,
    max_length: int = 64,
    batch_size: int = 256,
) -> torch.Tensor:
    """Pooled final hidden states of ``scopes``.

    Args:
        encoder: a (pretrained) CLOUD encoder; its own pooling (cls or mean) is used.
        tokenizer: the encoder's tokenizer.
        scopes: N SCOPE strings.
        max_length: tokens kept per string, [CLS] and [SEP] included.
        batch_size: strings per forward pass.

    Returns:
        ``(N, C)`` float32 embeddings on the CPU.
    """
    unique = list(dict.fromkeys(scopes))
    device = next(encoder.parameters()).device
    was_training = encoder.training
    encoder.eval()
    out: list[torch.Tensor] = []
    with torch.no_grad():
        for start in range(0, len(unique), batch_size):
            batch = tokenizer.batch_encode(
                unique[start : start + batch_size], max_length=max_length
            )
            ids, mask = batch.ids.to(device), batch.mask.to(device)  # (B, T)
            hidden = encoder(ids, mask)  # (B, T, C)
            out.append(encoder.pool(hidden, mask).float().cpu())  # (B, C)
    encoder.train(was_training)
    table = torch.cat(out) if out else torch.zeros(0, encoder.config.d_model)
    row = {s: i for i, s in enumerate(unique)}
    logger.debug("embedded %d strings (%d distinct)", len(scopes), len(unique))
    return table[[row[s] for s in scopes]]  # (N, C)
