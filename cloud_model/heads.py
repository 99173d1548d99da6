"""Heads on top of :class:`~cloud_model.model.CloudEncoder`, and encoder-plus-head models.

Heads are small modules: the masked-LM head (decoder tied to the token
embedding), a regression head that works in standardised units and keeps the
target mean/std as buffers, and the Debye head that outputs a positive Debye
temperature in kelvin (the Debye physics, Cv and U from theta, lives in
:mod:`cloud_model.debye`), and the Debye + Einstein head that outputs a Debye
temperature for the acoustic branches plus Einstein temperatures and weights for
the optical ones (physics in :mod:`cloud_model.einstein`).

Each ``CloudFor*`` wrapper owns an encoder and a head and has one
``forward(ids, mask, targets=None) -> (output, loss)`` for training and
inference alike. Their head is described by a pydantic ``*HeadConfig`` that is
stored in the model card, so :func:`build_model` can rebuild any of them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Annotated, Literal, NamedTuple

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from cloud_model.debye import GAS_CONSTANT
from cloud_model.einstein import acoustic_fraction, debye_einstein_heat_capacity
from cloud_model.errors import ConfigError
from cloud_model.model import CloudConfig, CloudEncoder

IGNORE_INDEX = -100  # label of positions the MLM loss skips (torch's cross_entropy default)


class MaskedLMHeadConfig(BaseModel):
    """The masked-LM head has no options: its decoder is the token embedding."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    kind: Literal["masked_lm"] = "masked_lm"


class RegressionHeadConfig(BaseModel):
    """A regression head on the pooled state: one or several targets."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    kind: Literal["regression"] = "regression"
    # names of the predicted columns, in output order (units in the model card's data)
    target_names: tuple[str, ...] = Field(min_length=1)
    # L1 is robust to the heavy tails of formation energies; MSE matches a Gaussian likelihood
    loss: Literal["l1", "mse"] = "l1"
    # dropout before the head's MLP
    dropout: float = Field(default=0.1, ge=0.0, lt=1.0)

    @property
    def n_targets(self) -> int:
        """Number of outputs ``m``."""
        return len(self.target_names)


class DebyeHeadConfig(BaseModel):
    """A Debye-family head: a positive Debye temperature per structure (``kind="debye"``), or
    Debye temperature + Einstein temperatures and weights (``kind="debye_einstein"``).

    Both kinds share this one config so that every place that holds a Debye head's
    config (the ensemble card's member spec included) holds either; the Einstein
    options are ignored by ``kind="debye"``.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)
    kind: Literal["debye", "debye_einstein"] = "debye"
    # typical Debye temperature (K): the untrained head outputs about theta_min + theta_scale
    theta_scale: float = Field(default=400.0, gt=0.0)
    # floor (K) that keeps T / theta finite in the Debye functions
    theta_min: float = Field(default=1.0, ge=0.0)
    # loss used when theta itself is the label (AFLOW); Cv labels go through cloud_model.debye
    loss: Literal["l1", "mse"] = "l1"
    dropout: float = Field(default=0.1, ge=0.0, lt=1.0)
    # debye_einstein: number K of Einstein temperatures describing the optical branches
    einstein_modes: int = Field(default=1, ge=1, le=8)
    # debye_einstein: acoustic share of the modes: 1/n from the atoms per primitive cell
    # (an exact mode count, needs n_atoms) or a learned fraction in (0, 1) per structure
    acoustic_fraction: Literal["per_atom", "learned"] = "per_atom"

    @property
    def is_einstein(self) -> bool:
        """True for the Debye + Einstein head."""
        return self.kind == "debye_einstein"


def debye_einstein_head_config(**options: object) -> DebyeHeadConfig:
    """Shorthand: ``DebyeHeadConfig(kind="debye_einstein", **options)``."""
    return DebyeHeadConfig.model_validate({**options, "kind": "debye_einstein"})


HeadConfig = Annotated[
    MaskedLMHeadConfig | RegressionHeadConfig | DebyeHeadConfig, Field(discriminator="kind")
]


class MaskedLMHead(nn.Module):
    """Dense + GELU + LayerNorm, then logits through the (tied) token embedding matrix."""

    def __init__(self, config: CloudConfig, token_embedding: nn.Embedding) -> None:
        super().__init__()
        self.dense = nn.Linear(config.d_model, config.d_model)
        self.norm = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps)
        self.decoder = nn.Linear(config.d_model, config.vocab_size)
        self.decoder.weight = token_embedding.weight  # tied: one (V, C) matrix
        nn.init.normal_(self.dense.weight, std=0.02)
        nn.init.zeros_(self.dense.bias)
        nn.init.zeros_(self.decoder.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """Args: hidden ``(..., C)``. Returns logits ``(..., V)``."""
        return self.decoder(self.norm(F.gelu(self.dense(hidden))))  # (..., V)


class RegressionHead(nn.Module):
    """Pooled state -> standardised targets; ``target_mean``/``target_std`` are buffers.

    The network predicts ``z = (y - mean) / std``; :meth:`destandardise` maps
    back to physical units. Set the statistics from the training targets with
    :meth:`set_target_stats` before training; they are saved with the weights.
    """

    target_mean: torch.Tensor  # (m,) buffer
    target_std: torch.Tensor  # (m,) buffer

    def __init__(self, d_model: int, n_targets: int, dropout: float = 0.1) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Dropout(dropout),
            nn.Linear(d_model, d_model),
            nn.GELU(),
            nn.Linear(d_model, n_targets),
        )
        self.register_buffer("target_mean", torch.zeros(n_targets))
        self.register_buffer("target_std", torch.ones(n_targets))
        for layer in self.net:
            if isinstance(layer, nn.Linear):
                nn.init.normal_(layer.weight, std=0.02)
                nn.init.zeros_(layer.bias)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        """Args: pooled ``(B, C)``. Returns standardised predictions ``(B, m)``."""
        return self.net(pooled)  # (B, m)

    def set_target_stats(self, targets: torch.Tensor) -> None:
        """Store mean and std of training targets ``(N, m)`` (NaN = missing, ignored).

        Raises:
            ConfigError: a column has fewer than two finite values.
        """
        targets = targets.reshape(targets.shape[0], -1).to(self.target_mean)  # (N, m)
        finite = torch.isfinite(targets)  # (N, m)
        counts = finite.sum(0)  # (m,)
        if bool((counts < 2).any()):
            raise ConfigError(
                f"need >= 2 finite values per target column, got counts {counts.tolist()}"
            )
        filled = torch.where(finite, targets, torch.zeros_like(targets))  # (N, m)
        mean = filled.sum(0) / counts  # (m,)
        var = (torch.where(finite, targets - mean, torch.zeros_like(targets)) ** 2).sum(0) / (
            counts - 1
        )
        self.target_mean.copy_(mean)
        self.target_std.copy_(var.sqrt().clamp_min(1e-12))

    def standardise(self, y: torch.Tensor) -> torch.Tensor:
        """Physical units ``(B, m)`` -> standardised ``(B, m)``."""
        return (y - self.target_mean) / self.target_std  # (B, m)

    def destandardise(self, z: torch.Tensor) -> torch.Tensor:
        """Standardised ``(..., m)`` -> physical units ``(..., m)``."""
        return z * self.target_std + self.target_mean  # (..., m)


class DebyeHead(nn.Module):
    """Pooled state -> Debye temperature ``theta = theta_min + theta_scale * softplus(s)`` in K.

    Positive by construction; the output bias starts at ``log(e - 1)`` so an
    untrained head predicts ``theta_min + theta_scale``.
    """

    def __init__(
        self, d_model: int, theta_scale: float = 400.0, theta_min: float = 1.0, dropout: float = 0.1
    ) -> None:
        super().__init__()
        self.theta_scale = theta_scale
        self.theta_min = theta_min
        out = nn.Linear(d_model, 1)
        self.net = nn.Sequential(nn.Dropout(dropout), nn.Linear(d_model, d_model), nn.GELU(), out)
        for layer in self.net:
            if isinstance(layer, nn.Linear):
                nn.init.normal_(layer.weight, std=0.02)
                nn.init.zeros_(layer.bias)
        nn.init.constant_(out.bias, math.log(math.e - 1.0))  # softplus(bias) = 1

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        """Args: pooled ``(B, C)``. Returns theta ``(B,)`` in kelvin."""
        s = self.net(pooled).squeeze(-1)  # (B,)
        return self.theta_min + self.theta_scale * F.softplus(s)  # (B,)


class DebyeEinsteinParameters(NamedTuple):
    """A Debye + Einstein head's output, unpacked (``B`` crystals, ``K`` Einstein modes)."""

    theta_debye: torch.Tensor  # (B,) K, acoustic branches
    theta_einstein: torch.Tensor  # (B, K) K, optical modes
    weights: torch.Tensor  # (B, K) shares of the optical modes, summing to 1
    learned_fraction: torch.Tensor  # (B,) acoustic share in (0, 1) (used when learned)


class DebyeEinsteinHead(nn.Module):
    """Pooled state -> Debye temperature, K Einstein temperatures and weights, packed ``(B, 2K + 2)``.

    Columns: ``theta_D``, ``theta_E,1..K``, ``w_1..K`` (a softmax), ``f`` (a sigmoid, the
    learned acoustic fraction; :meth:`fraction` uses ``1 / n_atoms`` instead unless the
    config asks for a learned one). Temperatures are ``theta_min + theta_scale * softplus(s)``;
    an untrained head starts at ``theta_D = theta_min + theta_scale`` with the Einstein modes
    spread over 0.75-1.5 ``theta_scale`` (optical modes lie above the acoustic ones), equal
    weights and ``f = 0.5``.
    """

    def __init__(self, d_model: int, config: DebyeHeadConfig) -> None:
        super().__init__()
        self.config = config
        k = config.einstein_modes
        out = nn.Linear(d_model, 2 * k + 2)
        self.net = nn.Sequential(
            nn.Dropout(config.dropout), nn.Linear(d_model, d_model), nn.GELU(), out
        )
        for layer in self.net:
            if isinstance(layer, nn.Linear):
                nn.init.normal_(layer.weight, std=0.02)
                nn.init.zeros_(layer.bias)
        start = torch.linspace(0.75, 1.5, k) if k > 1 else torch.ones(1)
        with torch.no_grad():
            out.bias[0] = math.log(math.e - 1.0)  # softplus = 1
            out.bias[1 : k + 1] = torch.log(torch.expm1(start))  # softplus = start

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        """Args: pooled ``(B, C)``. Returns the packed parameters ``(B, 2K + 2)``."""
        s = self.net(pooled).float()  # (B, 2K + 2), float32 even under autocast
        k = self.config.einstein_modes
        temps = self.config.theta_min + self.config.theta_scale * F.softplus(s[:, : k + 1])
        weights = torch.softmax(s[:, k + 1 : 2 * k + 1], dim=-1)
        fraction = torch.sigmoid(s[:, 2 * k + 1 :])
        return torch.cat([temps, weights, fraction], dim=-1)  # (B, 2K + 2)

    def unpack(self, out: torch.Tensor) -> DebyeEinsteinParameters:
        """Packed ``(B, 2K + 2)`` -> named parts."""
        k = self.config.einstein_modes
        return DebyeEinsteinParameters(
            theta_debye=out[:, 0],
            theta_einstein=out[:, 1 : k + 1],
            weights=out[:, k + 1 : 2 * k + 1],
            learned_fraction=out[:, 2 * k + 1],
        )

    def fraction(self, out: torch.Tensor, n_atoms: torch.Tensor | None) -> torch.Tensor:
        """Acoustic fraction ``(B,)``: ``1 / n_atoms`` (None = one atom: pure Debye), or learned."""
        params = self.unpack(out)
        if self.config.acoustic_fraction == "learned":
            return params.learned_fraction
        if n_atoms is None:
            return torch.ones_like(params.theta_debye)
        return acoustic_fraction(n_atoms.to(params.theta_debye))

    def heat_capacity(
        self, out: torch.Tensor, temperatures: torch.Tensor, n_atoms: torch.Tensor | None
    ) -> torch.Tensor:
        """Cv ``(B, m)`` in J/(mol K) per mole of cells at ``temperatures`` ``(m,)`` K.

        Args:
            out: packed parameters ``(B, 2K + 2)`` from :meth:`forward` (cast to float).
            temperatures: ``(m,)`` label temperatures in K.
            n_atoms: ``(B,)`` atoms per (primitive) cell; None = per mole of atoms.
        """
        out = out.float()
        params = self.unpack(out)
        n = torch.ones_like(params.theta_debye) if n_atoms is None else n_atoms.to(out)
        weights = params.weights / params.weights.sum(-1, keepdim=True)  # exact sum after casts
        return debye_einstein_heat_capacity(
            params.theta_debye,
            params.theta_einstein,
            temperatures.to(out),
            fraction=self.fraction(out, n_atoms),
            weights=weights,
            n_atoms=n,
        )  # (B, m)


def _masked_loss(
    pred: torch.Tensor, target: torch.Tensor, kind: Literal["l1", "mse"]
) -> torch.Tensor:
    """Mean L1 / squared error over the finite entries of ``target`` (same shape as ``pred``)."""
    finite = torch.isfinite(target)
    if not bool(finite.any()):
        raise ConfigError("every target in the batch is NaN; nothing to fit")
    diff = pred[finite] - target[finite]
    return diff.abs().mean() if kind == "l1" else (diff**2).mean()


class CloudForMaskedLM(nn.Module):
    """Encoder + masked-LM head: the pretraining model."""

    def __init__(self, encoder: CloudEncoder) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = MaskedLMHead(encoder.config, encoder.tok_emb)
        self.head_config = MaskedLMHeadConfig()

    def forward(
        self, ids: torch.Tensor, mask: torch.Tensor, targets: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Token logits, and the MLM loss when labels are given.

        Args:
            ids: ``(B, T)`` token ids (with [MASK] etc. already applied).
            mask: ``(B, T)`` bool, True on real tokens.
            targets: ``(B, T)`` original ids at predicted positions, ``IGNORE_INDEX`` elsewhere.

        Returns:
            logits ``(B, T, V)`` and the mean cross-entropy over predicted positions (or None).
        """
        logits = self.head(self.encoder(ids, mask))  # (B, T, V)
        if targets is None:
            return logits, None
        loss = F.cross_entropy(
            logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX
        )
        return logits, loss


class CloudForRegression(nn.Module):
    """Encoder + regression head; works in standardised units, reports physical ones."""

    def __init__(self, encoder: CloudEncoder, head_config: RegressionHeadConfig) -> None:
        super().__init__()
        self.encoder = encoder
        self.head_config = head_config
        self.head = RegressionHead(
            encoder.config.d_model, head_config.n_targets, head_config.dropout
        )

    def forward(
        self, ids: torch.Tensor, mask: torch.Tensor, targets: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Standardised predictions, and the loss against targets in physical units.

        Args:
            ids: ``(B, T)``; mask: ``(B, T)`` bool.
            targets: ``(B, m)`` (or ``(B,)`` when m = 1) in physical units; NaN = missing.

        Returns:
            standardised predictions ``(B, m)`` and the L1/MSE loss on standardised
            values over the finite targets (or None).
        """
        z = self.head(self.encoder.encode(ids, mask))  # (B, m)
        if targets is None:
            return z, None
        target_z = self.head.standardise(targets.reshape(z.shape).to(z.dtype))  # (B, m)
        return z, _masked_loss(z, target_z, self.head_config.loss)

    @torch.no_grad()
    def predict(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Predictions in physical units ``(B, m)`` (eval mode is the caller's business)."""
        z, _ = self.forward(ids, mask)
        return self.head.destandardise(z)  # (B, m)


class CloudForDebye(nn.Module):
    """Encoder + Debye head: ``theta (B,)`` in kelvin."""

    def __init__(self, encoder: CloudEncoder, head_config: DebyeHeadConfig) -> None:
        super().__init__()
        if head_config.is_einstein:
            raise ConfigError("a 'debye_einstein' head config builds CloudForDebyeEinstein")
        self.encoder = encoder
        self.head_config = head_config
        self.head = DebyeHead(
            encoder.config.d_model,
            head_config.theta_scale,
            head_config.theta_min,
            head_config.dropout,
        )

    def forward(
        self, ids: torch.Tensor, mask: torch.Tensor, targets: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Debye temperatures, and a loss when Debye-temperature labels are given.

        Args:
            ids: ``(B, T)``; mask: ``(B, T)`` bool.
            targets: ``(B,)`` Debye temperatures in K (NaN = missing). For heat-capacity
                labels, compute Cv from the returned theta with :mod:`cloud_model.debye`.

        Returns:
            theta ``(B,)`` in K and the L1/MSE loss on ``theta / theta_scale`` (or None).
        """
        theta = self.head(self.encoder.encode(ids, mask))  # (B,)
        if targets is None:
            return theta, None
        scale = self.head_config.theta_scale
        target = targets.reshape(theta.shape).to(theta.dtype)  # (B,)
        return theta, _masked_loss(theta / scale, target / scale, self.head_config.loss)


class CloudForDebyeEinstein(nn.Module):
    """Encoder + Debye + Einstein head: packed ``(B, 2K + 2)`` parameters
    (:class:`DebyeEinsteinHead`), trained on heat capacities."""

    def __init__(self, encoder: CloudEncoder, head_config: DebyeHeadConfig) -> None:
        super().__init__()
        if not head_config.is_einstein:
            raise ConfigError("CloudForDebyeEinstein needs a head config of kind 'debye_einstein'")
        self.encoder = encoder
        self.head_config = head_config
        self.head = DebyeEinsteinHead(encoder.config.d_model, head_config)

    def forward(
        self,
        ids: torch.Tensor,
        mask: torch.Tensor,
        targets: torch.Tensor | None = None,
        *,
        temperatures: Sequence[float] = (300.0,),
        n_atoms: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Packed parameters, and a loss when heat-capacity labels are given.

        Args:
            ids: ``(B, T)``; mask: ``(B, T)`` bool.
            targets: ``(B, m)`` (or ``(B,)``) Cv in J/(mol K) per mole of cells at
                ``temperatures`` (m values, K); NaN = missing.
            n_atoms: ``(B,)`` atoms per primitive cell (None = per mole of atoms).

        Returns:
            parameters ``(B, 2K + 2)`` and the L1/MSE loss on ``Cv / (3 R n)`` (the
            fraction of Dulong-Petit, so every crystal weighs the same), or None.
        """
        params = self.head(self.encoder.encode(ids, mask))  # (B, 2K + 2)
        if targets is None:
            return params, None
        temps = torch.tensor(tuple(temperatures), dtype=torch.float32, device=params.device)
        cv = self.head.heat_capacity(params, temps, n_atoms)  # (B, m)
        n = torch.ones(cv.shape[0], device=cv.device) if n_atoms is None else n_atoms.to(cv)
        scale = 3.0 * GAS_CONSTANT * n[:, None]  # (B, 1)
        target = targets.reshape(cv.shape).to(cv)
        return params, _masked_loss(cv / scale, target / scale, self.head_config.loss)

    @torch.no_grad()
    def predict_heat_capacity(
        self,
        ids: torch.Tensor,
        mask: torch.Tensor,
        temperatures: Sequence[float],
        n_atoms: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Cv ``(B, m)`` in J/(mol K) per mole of cells (eval mode is the caller's business)."""
        params, _ = self.forward(ids, mask)
        temps = torch.tensor(tuple(temperatures), dtype=torch.float32, device=params.device)
        return self.head.heat_capacity(params, temps, n_atoms)


CloudModel = CloudForMaskedLM | CloudForRegression | CloudForDebye | CloudForDebyeEinstein


def build_model(
    config: CloudConfig,
    head: MaskedLMHeadConfig | RegressionHeadConfig | DebyeHeadConfig,
    encoder: CloudEncoder | None = None,
) -> CloudModel:
    """An encoder-plus-head model for a head config (a fresh encoder unless one is given).

    Args:
        config: the encoder architecture.
        head: which head to attach.
        encoder: reuse these encoder weights (e.g. ``pretrained.encoder``); must match ``config``.

    Raises:
        ConfigError: ``encoder.config`` differs from ``config``.
    """
    if encoder is None:
        encoder = CloudEncoder(config)
    elif encoder.config != config:
        raise ConfigError(f"encoder config {encoder.config} differs from {config}")
    if isinstance(head, MaskedLMHeadConfig):
        return CloudForMaskedLM(encoder)
    if isinstance(head, RegressionHeadConfig):
        return CloudForRegression(encoder, head)
    if head.is_einstein:
        return CloudForDebyeEinstein(encoder, head)
    return CloudForDebye(encoder, head)


def regression_head_config(target_names: Sequence[str], **options: object) -> RegressionHeadConfig:
    """Shorthand: ``RegressionHeadConfig(target_names=tuple(target_names), **options)``."""
    return RegressionHeadConfig.model_validate({"target_names": tuple(target_names), **options})
