"""The frozen trunk of a fine-tuned encoder: where it is cut, its features and their cache.

An encoder is cut at ``n_layer - n_trainable_blocks``. Everything below the cut
(the *trunk*: embeddings and the bottom blocks) is frozen and shared by every
member of an ensemble; its output for a string never changes, so it is computed
once and cached by string (:class:`FeatureCache`). Everything above the cut (the
top blocks, the final LayerNorm, pooling and a head: a
:class:`~cloud_model.finetune.MemberNet`) is trained. Three cuts
(:data:`~cloud_model.configs.FeatureKind`):

* ``"pooled"`` (``n_trainable_blocks = 0``): the trunk is the whole encoder and
  the cache holds one pooled vector per string; a member is a head only.
* ``"hidden"``: the cache holds the per-token states ``(L, C)`` after the frozen
  blocks; a member re-runs the top blocks.
* ``"ids"`` (all blocks and the embeddings trainable): nothing is frozen; the
  cache holds token ids.

The trunk is run with the encoder's own steps (:meth:`CloudEncoder.embed`,
:meth:`CloudEncoder.run_blocks`, :meth:`CloudEncoder.pool`), so a cut never
re-implements the forward pass. :func:`trunk_fingerprint` hashes everything the
cached features depend on; ensembles on the same trunk in one process share one
cache through :func:`shared_feature_cache`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from cloud_model.configs import FeatureKind as FeatureKind
from cloud_model.configs import FinetuneConfig
from cloud_model.errors import ConfigError
from cloud_model.heads import DebyeHeadConfig, RegressionHeadConfig
from cloud_model.model import CloudConfig, CloudEncoder

# ----------------------------------------------------------------- the cut


class MemberSpec(BaseModel):
    """Where the encoder is cut and what sits on top: everything needed to rebuild a
    member's modules (its weights live in safetensors)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    encoder: CloudConfig
    kind: FeatureKind
    n_trainable_blocks: int = Field(ge=0)
    pooling: Literal["cls", "mean"]
    head: RegressionHeadConfig | DebyeHeadConfig
    debye_output: Literal["theta", "heat_capacity"] = "heat_capacity"
    temperatures: tuple[float, ...] = (300.0,)
    standardise_debye_loss: bool = True

    @property
    def n_targets(self) -> int:
        """Output columns ``m``."""
        if isinstance(self.head, RegressionHeadConfig):
            return self.head.n_targets
        return 1 if self.debye_output == "theta" else len(self.temperatures)

    @property
    def n_frozen_blocks(self) -> int:
        """Blocks below the cut (run once per string by the trunk)."""
        return self.encoder.n_layer - self.n_trainable_blocks


def member_spec(
    encoder: CloudConfig,
    config: FinetuneConfig,
    head: RegressionHeadConfig | DebyeHeadConfig,
) -> MemberSpec:
    """The cut and head that ``config`` asks for on an encoder of architecture ``encoder``.

    Raises:
        ConfigError: more trainable blocks than the encoder has.
    """
    n_layer = encoder.n_layer
    n_top = n_layer if config.n_trainable_blocks == "all" else config.n_trainable_blocks
    if n_top > n_layer:
        raise ConfigError(f"n_trainable_blocks={n_top} exceeds the encoder's {n_layer} blocks")
    if n_top == 0:
        kind: FeatureKind = "pooled"
    elif n_top == n_layer and config.train_embeddings:
        kind = "ids"
    else:
        kind = "hidden"
    return MemberSpec(
        encoder=encoder,
        kind=kind,
        n_trainable_blocks=n_top,
        pooling=config.pooling or encoder.pooling,
        head=head,
        debye_output=config.debye_output,
        temperatures=config.temperatures,
        standardise_debye_loss=config.standardise_debye_loss,
    )


@torch.no_grad()
def trunk_features(encoder: CloudEncoder, spec: MemberSpec, ids: Tensor, mask: Tensor) -> Tensor:
    """The frozen part of the encoder applied to a batch (no gradients; pass an encoder in
    eval mode, as :class:`~cloud_model.ensemble.CloudEnsemble` does).

    Args:
        encoder: the shared encoder.
        spec: where it is cut.
        ids: ``(B, T)`` token ids; mask: ``(B, T)`` bool, True on real tokens.

    Returns:
        ``(B, T)`` ids for ``"ids"``, ``(B, T, C)`` states for ``"hidden"``, ``(B, C)``
        pooled vectors for ``"pooled"``.
    """
    if spec.kind == "ids":
        return ids  # (B, T)
    if spec.kind == "pooled":
        return encoder.pool(encoder(ids, mask), mask, spec.pooling)  # (B, C)
    x = encoder.embed(ids)  # (B, T, C)
    return encoder.run_blocks(x, mask, stop=spec.n_frozen_blocks)  # (B, T, C)


def trunk_fingerprint(
    encoder: CloudEncoder, spec: MemberSpec, *, max_length: int, device: torch.device
) -> str:
    """Hash of everything cached trunk features depend on.

    Args:
        encoder: the trunk's weights (every tensor of its state, by name).
        spec: the cut (feature kind, trainable blocks) and pooling.
        max_length: the token limit strings are truncated to.
        device: its type (CPU or CUDA kernels may differ in the last bits).

    Returns:
        A hex sha256.
    """
    digest = hashlib.sha256()
    digest.update(
        f"{spec.kind}|{spec.n_trainable_blocks}|{spec.pooling}|{max_length}|{device.type}".encode()
    )
    for name, tensor in sorted(encoder.state_dict().items()):
        digest.update(name.encode())
        flat = tensor.detach().cpu().reshape(-1).contiguous()  # 0-d buffers need the reshape
        digest.update(flat.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


# ----------------------------------------------------------------- the cache


class FeatureCache:
    """Frozen-trunk features per string, first in first out beyond ``max_entries``.

    Rows are stored trimmed to the string's real tokens on the CPU: ``(C,)`` pooled
    vectors, ``(L, C)`` token states or ``(L,)`` token ids. ``n_computed`` counts
    strings that had to go through the trunk (a cache miss).
    """

    def __init__(self, max_entries: int) -> None:
        self.max_entries = max_entries
        self.n_computed = 0
        self._rows: dict[str, Tensor] = {}

    def __len__(self) -> int:
        return len(self._rows)

    def __contains__(self, scope: object) -> bool:
        return scope in self._rows

    def clear(self) -> None:
        """Forget every cached row."""
        self._rows.clear()

    def adopt(self, other: FeatureCache) -> None:
        """Add the rows of ``other`` that this cache lacks (within ``max_entries``)."""
        for scope, row in other._rows.items():
            if len(self._rows) >= self.max_entries:
                break
            self._rows.setdefault(scope, row)

    def gather(
        self,
        scopes: Sequence[str],
        encode: Callable[[list[str]], list[Tensor]],
        kind: FeatureKind,
    ) -> tuple[Tensor, Tensor | None]:
        """Features of ``scopes``, encoding (once each) the strings not cached yet.

        Args:
            scopes: n strings, duplicates allowed.
            encode: maps new strings to their trimmed feature rows.
            kind: which features the rows are (see the module docstring).

        Returns:
            ``(n, C)`` and None for pooled features, else rows padded to the longest
            (``(n, T, C)`` or ``(n, T)``) and the ``(n, T)`` bool mask of real tokens.
        """
        unique = list(dict.fromkeys(scopes))
        found = {s: self._rows[s] for s in unique if s in self._rows}  # before any eviction
        missing = [s for s in unique if s not in found]
        fresh: dict[str, Tensor] = {}
        if missing:
            fresh = dict(zip(missing, encode(missing), strict=True))
            self.n_computed += len(missing)
            for scope, row in fresh.items():
                if self.max_entries <= 0:
                    break
                if len(self._rows) >= self.max_entries:
                    del self._rows[next(iter(self._rows))]
                self._rows[scope] = row
        rows = [fresh[s] if s in fresh else found[s] for s in scopes]
        if kind == "pooled":
            if not rows:
                return torch.empty(0, 0), None
            return torch.stack(rows), None  # (n, C)
        n = len(rows)
        length = max((int(r.shape[0]) for r in rows), default=1)
        if kind == "ids":
            x = torch.zeros(n, length, dtype=torch.long)  # (n, T)
        else:
            width = int(rows[0].shape[1]) if rows else 0
            x = torch.zeros(n, length, width)  # (n, T, C)
        mask = torch.zeros(n, length, dtype=torch.bool)  # (n, T)
        for i, row in enumerate(rows):
            x[i, : row.shape[0]] = row
            mask[i, : row.shape[0]] = True
        return x, mask  # (n, T[, C]), (n, T)


# process-wide caches of identical frozen trunks (see shared_feature_cache), most recent last
_SHARED_CACHES: dict[str, FeatureCache] = {}
_MAX_SHARED_CACHES = 4


def shared_feature_cache(fingerprint: str, max_entries: int) -> FeatureCache:
    """The process-wide cache of the frozen trunk identified by ``fingerprint``.

    Ensembles built on the same trunk weights and cut in one process (the runs of a
    benchmark on a Ray worker, a campaign restarted in place) then encode each string
    once between them. The ``_MAX_SHARED_CACHES`` most recently used trunks are kept.

    Args:
        fingerprint: from :func:`trunk_fingerprint`.
        max_entries: size limit of a cache created by this call.
    """
    cache = _SHARED_CACHES.pop(fingerprint, None)
    if cache is None:
        cache = FeatureCache(max_entries)
    _SHARED_CACHES[fingerprint] = cache
    while len(_SHARED_CACHES) > _MAX_SHARED_CACHES:
        del _SHARED_CACHES[next(iter(_SHARED_CACHES))]
    return cache
