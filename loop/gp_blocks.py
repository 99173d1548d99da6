"""A GP whose kernel is a sum of blocks: composition descriptors + CLOUD embeddings.

``surrogate.kind: gp_cloud`` is an exact BoTorch ``SingleTaskGP`` over two
feature blocks of every candidate:

* the composition descriptor of the GP baseline (:func:`loop.features.composition_features`);
* the pooled CLOUD embedding of its SCOPE string from the pretrained checkpoint,
  reduced without labels: a PCA fitted on the pool's embeddings, the first
  ``CLOUD_DIMS`` (16) components, each scaled to unit variance on the pool.

The kernel is ``s1 * k1(composition) + s2 * k2(CLOUD)``, each ``k`` an ARD kernel
with BoTorch's dimension-scaled lengthscale prior and its own outputscale, so the
marginal likelihood can switch off a block that does not explain the measured
values (composition is constant on a polymorph search; the CLOUD block may carry
nothing on a composition-driven one). Everything else (training-row cap, capped
hyperparameter fit, chunked posteriors, save/load) is the GP baseline's.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any

import torch
from botorch.models.model import Model
from torch import Tensor

from loop.surrogate import GPSurrogate

__all__ = ["CLOUD_DIMS", "BlockGPSurrogate", "TransferGPSurrogate", "cloud_block_features"]

logger = logging.getLogger(__name__)
CLOUD_DIMS = 16  # PCA components of the CLOUD block (the GP's ARD lengthscales stay few)
_CACHE: dict[str, Tensor] = {}  # runs in one process (benchmark workers) embed a pool once


def cloud_block_features(
    scopes: list[str], checkpoint: Path, *, n_fit: int, dims: int, max_length: int = 64
) -> Tensor:
    """``N x dims`` PCA scores of the pooled CLOUD embeddings of ``scopes``.

    Args:
        scopes: the pool's SCOPE strings, then those of any prior rows.
        checkpoint: the pretrained checkpoint directory.
        n_fit: the first ``n_fit`` rows (the pool) define the PCA and the scaling.
        dims: components kept (fewer if the embedding has fewer).
        max_length: tokens per string.
    """
    from cloud_model.checkpoint import load_encoder
    from cloud_model.embeddings import pooled_embeddings

    digest = hashlib.sha256()
    digest.update(f"{checkpoint.resolve()}\0{n_fit}\0{dims}\0{max_length}\0".encode())
    for s in scopes:
        digest.update(s.encode() + b"\0")
    key = digest.hexdigest()
    if key in _CACHE:
        return _CACHE[key]
    encoder, tokenizer, _ = load_encoder(checkpoint)
    emb = pooled_embeddings(encoder, tokenizer, scopes, max_length=max_length).double()  # N x C
    pool = emb[:n_fit]
    mean = pool.mean(0)
    _, _, v = torch.linalg.svd(pool - mean, full_matrices=False)  # v: C x C, rows = directions
    k = min(dims, v.shape[0])
    scores = (emb - mean) @ v[:k].T  # N x k
    scale = scores[:n_fit].std(0).clamp_min(1e-12)
    out = scores / scale
    _CACHE[key] = out
    logger.info("CLOUD block: %d strings -> %d PCA components of %d", len(scopes), k, emb.shape[1])
    return out


class BlockGPSurrogate(GPSurrogate):
    """Exact GP over concatenated feature blocks, with one scaled ARD kernel per block.

    Args:
        features: ``N x d`` features, the blocks side by side.
        blocks: ``(start, stop)`` column ranges of the blocks in ``features``.
        **kwargs: as :class:`~loop.surrogate.GPSurrogate`.
    """

    name = "gp_cloud"

    def __init__(self, features: Tensor, blocks: list[tuple[int, int]], **kwargs: object) -> None:
        super().__init__(features, **kwargs)  # type: ignore[arg-type]
        if not blocks or blocks[-1][1] != features.shape[-1]:
            raise ValueError(
                f"blocks {blocks} do not tile the {features.shape[-1]} feature columns"
            )
        self.blocks = blocks

    def design_features(self) -> Tensor | None:
        """The pool rows of every block, each block at unit total variance."""
        from loop.design import block_scaled

        pool = self.features[: self.n_pool]
        return block_scaled([pool[:, a:b] for a, b in self.blocks])

    def _gp(self, train_idx: Tensor, train_y: Tensor) -> Model:
        from botorch.models import SingleTaskGP
        from botorch.models.transforms import Normalize, Standardize
        from botorch.models.utils.gpytorch_modules import get_covar_module_with_dim_scaled_prior
        from gpytorch.kernels import AdditiveKernel, ScaleKernel

        from loop.surrogate import _bounds

        X = self.features[train_idx]  # n x d
        Y = train_y.to(torch.float64)  # n x m
        # one independent GP per target: SingleTaskGP batches its kernel over the m outputs
        batch = torch.Size([Y.shape[-1]]) if Y.shape[-1] > 1 else torch.Size([])
        kernels = [
            ScaleKernel(
                get_covar_module_with_dim_scaled_prior(
                    ard_num_dims=stop - start,
                    batch_shape=batch,
                    active_dims=list(range(start, stop)),
                ),
                batch_shape=batch,
            )
            for start, stop in self.blocks
        ]
        return SingleTaskGP(
            X,
            Y,
            covar_module=AdditiveKernel(*kernels),
            input_transform=Normalize(d=X.shape[-1], bounds=_bounds(self.features)),
            outcome_transform=Standardize(m=Y.shape[-1]),
        )

    def block_weights(self) -> list[float]:
        """Each block's outputscale after the last fit (how much of the signal it carries)."""
        if self._model is None:
            return []
        covar: Any = self._model.base.covar_module  # an AdditiveKernel of ScaleKernels
        return [float(k.outputscale.detach().reshape(-1).mean()) for k in covar.kernels]

    def fit(self, train_idx: Tensor, train_y: Tensor) -> dict[str, float]:
        metrics = super().fit(train_idx, train_y)
        for i, w in enumerate(self.block_weights()):
            metrics[f"block{i}_outputscale"] = w
        return metrics


class TransferGPSurrogate(BlockGPSurrogate):
    """The block GP over composition descriptors and transferred property predictions
    (:mod:`loop.transfer`): ``surrogate.kind: gp_transfer``."""

    name = "gp_transfer"
