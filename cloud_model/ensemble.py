"""Deep ensembles of CLOUD models that share one frozen trunk and a feature cache.

``K`` members start from one (pretrained) encoder with different seeds (and,
optionally, bootstrap resamples of the training rows). The bottom
``n_layer - n_trainable_blocks`` blocks are frozen and shared: their output for a
SCOPE string is computed once and cached in memory, keyed by the string, so
scoring a pool again (after every fine-tune of a campaign) only re-runs each
member's top blocks and head; with ``n_trainable_blocks = 0`` a member is a head
on cached pooled vectors. See :mod:`cloud_model.trunk` for the cut and the cache,
:mod:`cloud_model.finetune` for the members and their training loop.

Members train in parallel as Ray actors, each pinned to a GPU or a fraction of
one, when CUDA is available and the caller has started Ray; in-process otherwise
(see :mod:`cloud_model.ensemble_runtime`). ``predict`` returns
``(members x candidates x targets)`` in target units, the input of the BoTorch
``EnsembleModel`` in :mod:`loop`.

Files written by :meth:`CloudEnsemble.save` (nothing pickled)::

    ensemble.json            EnsembleCard: configs, member spec, variance scale, hashes
    trunk.safetensors        the shared encoder
    member_XX.safetensors    one per member
    tokenizer.json
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from torch import Tensor

from cloud_model.bayes_head import BayesianLastLayer
from cloud_model.calibration import CalibrationReport, calibration_report, fit_variance_scale
from cloud_model.checkpoint import (
    file_sha256,
    load_module_weights,
    resolve_checkpoint,
    save_module_weights,
)
from cloud_model.configs import EnsembleConfig as EnsembleConfig
from cloud_model.ensemble_runtime import EpochCallback, fit_members
from cloud_model.errors import CheckpointError, ConfigError
from cloud_model.finetune import (
    FeatureSet,
    MemberFitReport,
    MemberNet,
    member_hidden,
    predict_member,
    resolve_device,
)
from cloud_model.heads import DebyeHeadConfig, RegressionHead, RegressionHeadConfig
from cloud_model.model import CloudConfig, CloudEncoder
from cloud_model.trunk import (
    FeatureCache,
    MemberSpec,
    member_spec,
    shared_feature_cache,
    trunk_features,
    trunk_fingerprint,
)

if TYPE_CHECKING:
    from cloud_model.tokenizer import ScopeTokenizer

logger = logging.getLogger(__name__)

CARD_FILE = "ensemble.json"
TRUNK_FILE = "trunk.safetensors"
TOKENIZER_FILE = "tokenizer.json"
ENSEMBLE_FORMAT_VERSION = 1


class FitReport(BaseModel):
    """What one :meth:`CloudEnsemble.fit` did."""

    model_config = ConfigDict(extra="forbid")
    n_train: int
    n_val: int
    warm_start: bool
    epochs: int
    mode: Literal["in_process", "ray"]
    seconds: float
    trunk_strings_encoded: int  # strings that went through the frozen trunk in this fit
    members: list[MemberFitReport]
    variance_scale: float
    validation: CalibrationReport | None = None


class EnsembleCard(BaseModel):
    """The JSON description of a saved ensemble."""

    model_config = ConfigDict(extra="forbid")
    format_version: int = ENSEMBLE_FORMAT_VERSION
    config: EnsembleConfig
    spec: MemberSpec
    n_members: int
    variance_scale: float = 1.0
    fitted: bool = False
    tokenizer_sha256: str
    trunk_sha256: str
    member_sha256: list[str]
    # one per member when config.bayesian_head (head_XX.safetensors)
    head_sha256: list[str] = Field(default_factory=list)
    source_checkpoint: str | None = None
    fits: list[FitReport] = Field(default_factory=list)


def _split_validation(n: int, fraction: float, seed: int) -> tuple[Tensor, Tensor]:
    """Disjoint (train, val) row indices; val is a seeded random ``fraction`` of ``n``."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_val = int(round(fraction * n)) if n >= 10 else 0
    return order[n_val:].sort().values, order[:n_val].sort().values


class CloudEnsemble:
    """K fine-tuned CLOUD members over one frozen, cached trunk."""

    def __init__(
        self,
        encoder: CloudEncoder,
        tokenizer: ScopeTokenizer,
        spec: MemberSpec,
        members: list[MemberNet],
        config: EnsembleConfig,
        *,
        source_checkpoint: str | None = None,
    ) -> None:
        """Assemble an ensemble; most callers want :meth:`create` or :meth:`load`."""
        self.device = resolve_device(config.device)
        self.encoder = encoder.to(self.device).eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.spec = spec
        self.members = members
        self.config = config
        self.source_checkpoint = source_checkpoint
        self.cache = FeatureCache(config.max_cache_entries)
        self.variance_scale = 1.0
        self.fitted = False
        self.fits: list[FitReport] = []
        self.bayes_heads: list[BayesianLastLayer] = []

    # ----------------------------------------------------------------- construction
    @classmethod
    def create(
        cls,
        checkpoint_dir: str | Path | None,
        n_members: int,
        head: Literal["regression", "debye"],
        n_targets: int,
        config: EnsembleConfig | None = None,
    ) -> CloudEnsemble:
        """A new, untrained ensemble.

        Args:
            checkpoint_dir: a pretrained checkpoint directory (any head; its encoder is
                used), ``"default"`` for the shipped one, or None for a randomly
                initialised ``config.model_size`` encoder
                (:func:`cloud_model.checkpoint.resolve_checkpoint`).
            n_members: K >= 1.
            head: ``"regression"`` (m targets) or ``"debye"`` (theta, or Cv at
                ``config.temperatures``, per ``config.debye_output``).
            n_targets: m, the columns of ``y`` in :meth:`fit`.
            config: hyperparameters (defaults if None).

        Raises:
            ConfigError: inconsistent sizes; CheckpointError: unreadable checkpoint.
        """
        config = config or EnsembleConfig()
        if n_members < 1:
            raise ConfigError(f"n_members must be >= 1, got {n_members}")
        if config.bayesian_head and head != "regression":
            raise ConfigError(f"bayesian_head needs a regression head, not {head!r}")
        checkpoint_dir = resolve_checkpoint(checkpoint_dir)
        if checkpoint_dir is not None:
            from cloud_model.checkpoint import load_checkpoint

            model, tokenizer, _ = load_checkpoint(checkpoint_dir)
            encoder = model.encoder
        else:
            from cloud_model.tokenizer import ScopeTokenizer

            tokenizer = ScopeTokenizer.default()
            torch.manual_seed(config.seed)
            encoder = CloudEncoder(CloudConfig.named(config.model_size, tokenizer.vocab_size))
        head_config = _head_config(head, n_targets, config)
        spec = member_spec(encoder.config, config, head_config)
        if spec.n_targets != n_targets:
            raise ConfigError(
                f"a {head} head with debye_output={config.debye_output!r} and "
                f"temperatures={config.temperatures} predicts {spec.n_targets} targets, "
                f"not n_targets={n_targets}"
            )
        members = _fresh_members(spec, encoder, n_members, config.seed)
        source = None if checkpoint_dir is None else str(checkpoint_dir)
        return cls(encoder, tokenizer, spec, members, config, source_checkpoint=source)

    @property
    def n_members(self) -> int:
        """K."""
        return len(self.members)

    # ----------------------------------------------------------------- features
    def trunk_fingerprint(self) -> str:
        """Hash of everything the cached features depend on: trunk weights, cut, pooling,
        token limit and device type (:func:`cloud_model.trunk.trunk_fingerprint`)."""
        return trunk_fingerprint(
            self.encoder, self.spec, max_length=self.config.max_length, device=self.device
        )

    def share_cache(self) -> None:
        """Use the process-wide feature cache of this exact trunk and cut (see
        :func:`cloud_model.trunk.shared_feature_cache`); rows already in this
        ensemble's own cache are kept."""
        shared = shared_feature_cache(self.trunk_fingerprint(), self.config.max_cache_entries)
        if shared is not self.cache:
            shared.adopt(self.cache)
            self.cache = shared

    def features(self, scopes: Sequence[str]) -> tuple[Tensor, Tensor | None]:
        """Frozen-trunk features of ``scopes`` (cached by string).

        Returns:
            ``x`` (``(n, C)``, ``(n, T, C)`` or ``(n, T)``) and ``mask`` ``(n, T)`` or None.
        """
        return self.cache.gather(scopes, self._encode, self.spec.kind)

    def _encode(self, scopes: list[str]) -> list[Tensor]:
        """Run the trunk on strings (length-sorted batches); one trimmed row per string."""
        batch = self.tokenizer.batch_encode(scopes, max_length=self.config.max_length)
        lengths = batch.mask.sum(1)  # (n,)
        order = torch.argsort(lengths, descending=True)
        rows: list[Tensor] = [torch.empty(0)] * len(scopes)
        step = self.config.eval_batch_size
        for start in range(0, len(scopes), step):
            index = order[start : start + step]
            length = int(lengths[index].max())
            ids = batch.ids[index, :length].to(self.device)
            mask = batch.mask[index, :length].to(self.device)
            with torch.autocast(self.device.type, torch.bfloat16, self.device.type == "cuda"):
                out = trunk_features(self.encoder, self.spec, ids, mask)
            out = out.cpu() if out.dtype == torch.long else out.float().cpu()
            for j, i in enumerate(index.tolist()):
                rows[i] = out[j] if self.spec.kind == "pooled" else out[j, : int(lengths[i])]
        return rows

    def _feature_set(
        self, scopes: Sequence[str], y: Tensor | None, n_atoms: Tensor | None
    ) -> FeatureSet:
        x, mask = self.features(scopes)
        if y is None:
            y = torch.full((len(scopes), self.spec.n_targets), float("nan"))
        return FeatureSet(x=x, mask=mask, y=y, n_atoms=n_atoms)

    # ----------------------------------------------------------------- training
    def fit(
        self,
        scopes: Sequence[str],
        y: Tensor,
        *,
        warm_start: bool = True,
        epochs: int | None = None,
        n_atoms: Tensor | None = None,
        validation: tuple[Sequence[str], Tensor, Tensor | None] | None = None,
        on_epoch: EpochCallback | None = None,
    ) -> FitReport:
        """Fine-tune every member on labelled strings.

        Args:
            scopes: n SCOPE strings; y: ``(n, m)`` (or ``(n,)``) targets, NaN = missing.
            warm_start: continue from the current weights when already fitted
                (target statistics are refitted without changing predictions);
                False re-initialises the members first.
            epochs: passes; default ``config.epochs`` (cold) or ``config.warm_start_epochs``.
            n_atoms: ``(n,)`` atoms per cell (Debye heat capacity per mole of cells).
            validation: ``(scopes, y, n_atoms)`` held-out rows; when None and
                ``config.val_fraction > 0``, that fraction of the rows is held out.
            on_epoch: progress callback ``(member, epoch, train_loss, val_loss)``.

        Returns:
            A :class:`FitReport`; with a validation split it includes its calibration.
        """
        start_time = time.perf_counter()
        y = _as_2d(y, len(scopes), self.spec.n_targets)
        encoded_before = self.cache.n_computed
        data = self._feature_set(scopes, y, n_atoms)
        if validation is None and self.config.val_fraction > 0:
            train_idx, val_idx = _split_validation(
                len(scopes), self.config.val_fraction, self.config.seed
            )
            val = _subset(data, val_idx)
            data = _subset(data, train_idx)
        elif validation is not None:
            v_scopes, v_y, v_atoms = validation
            val = self._feature_set(
                v_scopes, _as_2d(v_y, len(v_scopes), self.spec.n_targets), v_atoms
            )
        else:
            val = None
        warm = warm_start and self.fitted
        if not warm:
            self.members = _fresh_members(self.spec, self.encoder, self.n_members, self.config.seed)
        n_epochs = epochs or (self.config.warm_start_epochs if warm else self.config.epochs)
        trains = [self._member_rows(data, k) for k in range(self.n_members)]
        for member, rows in zip(self.members, trains, strict=True):
            if warm:
                member.refit_target_stats(rows.y)
            else:
                member.set_target_stats(rows.y)
        mode, reports = fit_members(
            self.members,
            trains,
            val,
            self.config,
            epochs=n_epochs,
            device=self.device,
            parallel=self.config.parallel,
            gpus_per_member=self.config.gpus_per_member,
            on_epoch=on_epoch,
        )
        self.fitted = True
        self.variance_scale = 1.0
        if self.config.bayesian_head:
            self.bayes_heads = [
                self._fit_bayes_head(member, rows)
                for member, rows in zip(self.members, trains, strict=True)
            ]
        calib = None
        # one member has no spread: no calibration to report (its NLL would be meaningless)
        if (
            val is not None
            and len(val)
            and bool(torch.isfinite(val.y).any())
            and self.n_members > 1
        ):
            preds = self._predict_features(val)  # (K, n_val, m)
            if self.config.recalibrate and self.n_members > 1:
                mean, std = preds.double().mean(0), preds.double().std(0, correction=0)
                self.variance_scale = fit_variance_scale(mean, std, val.y)
            calib = calibration_report(preds, val.y, variance_scale=self.variance_scale)
        report = FitReport(
            n_train=len(data),
            n_val=0 if val is None else len(val),
            warm_start=warm,
            epochs=n_epochs,
            mode=mode,
            seconds=time.perf_counter() - start_time,
            trunk_strings_encoded=self.cache.n_computed - encoded_before,
            members=reports,
            variance_scale=self.variance_scale,
            validation=calib,
        )
        self.fits.append(report)
        logger.info(
            "fitted %d members on %d rows (%s, %.1f s)",
            self.n_members,
            len(data),
            mode,
            report.seconds,
        )
        return report

    def _fit_bayes_head(self, member: MemberNet, rows: FeatureSet) -> BayesianLastLayer:
        """The member's Bayesian last layer on its own training rows (standardised units)."""
        hidden = member_hidden(member, rows, self.config, self.device)  # (n, C)
        head = BayesianLastLayer(hidden.shape[1], self.spec.n_targets)
        reg = _regression_head(member)
        head.fit(hidden, reg.standardise(rows.y.to(reg.target_mean)))
        return head

    def _member_rows(self, data: FeatureSet, k: int) -> FeatureSet:
        """Member k's training rows: all of them, or a seeded bootstrap resample."""
        if not self.config.bootstrap:
            return data
        gen = torch.Generator().manual_seed(self.config.seed + 1000 + k)
        return _subset(data, torch.randint(len(data), (len(data),), generator=gen))

    # ----------------------------------------------------------------- inference
    def _predict_features(self, data: FeatureSet, *, raw: bool = False) -> Tensor:
        order = None
        if data.mask is not None and len(data) > self.config.eval_batch_size:
            # score in order of length so that batches carry little padding, then unsort
            order = torch.argsort(data.mask.sum(1), stable=True)
            data = _subset(data, order)
        if self.bayes_heads and not raw:
            outs = [
                self._bayes_mean(m, h, data)
                for m, h in zip(self.members, self.bayes_heads, strict=True)
            ]
        else:
            outs = [
                predict_member(m, data, self.config, self.device)[int(raw)] for m in self.members
            ]
        out = torch.stack(outs)  # (K, n, m) or (K, n)
        return out if order is None else out[:, torch.argsort(order)]

    def _bayes_mean(self, member: MemberNet, head: BayesianLastLayer, data: FeatureSet) -> Tensor:
        """A member's Bayesian-head mean ``(n, m)`` in target units (float32)."""
        mean, _ = head.moments(member_hidden(member, data, self.config, self.device))
        return _regression_head(member).destandardise(mean.float())

    def predict(self, scopes: Sequence[str], *, n_atoms: Tensor | None = None) -> Tensor:
        """Per-member predictions in target units.

        Args:
            scopes: n SCOPE strings (features of strings seen before are reused).
            n_atoms: ``(n,)`` atoms per cell, for Debye heat capacities (None = per atom).

        Returns:
            ``(K, n, m)`` float32; the members' spread is widened by the fitted
            variance scale about their mean (the mean is unchanged).
        """
        parts = []
        for start in range(0, len(scopes), self.config.predict_chunk):
            chunk = list(scopes[start : start + self.config.predict_chunk])
            atoms = None if n_atoms is None else n_atoms[start : start + len(chunk)]
            parts.append(self._predict_features(self._feature_set(chunk, None, atoms)))
        if not parts:
            return torch.empty(self.n_members, 0, self.spec.n_targets)
        preds = torch.cat(parts, dim=1)  # (K, n, m)
        if self.variance_scale != 1.0:
            mean = preds.mean(0, keepdim=True)
            preds = mean + self.variance_scale * (preds - mean)
        return preds

    def predict_posterior(self, scopes: Sequence[str]) -> EnsemblePosterior:
        """The mixture posterior of an ensemble with Bayesian heads, in target units.

        Each member contributes its Bayesian head's Gaussian; the posterior is their
        equal-weight mixture. ``draws`` are joint over all of ``scopes``
        (``config.head_draws`` per member, the same standard-normal draws for every
        chunk); without Bayesian heads the members' predictions are the draws and
        the variance is their spread.

        Returns:
            mean and variance ``(n, m)`` of the targets (observation noise included)
            and draws ``(S, n, m)`` of the noise-free functions.
        """
        if not self.bayes_heads:
            preds = self.predict(scopes).double()  # (K, n, m)
            return EnsemblePosterior(
                mean=preds.mean(0), variance=preds.var(0, correction=0), draws=preds
            )
        gen = torch.Generator().manual_seed(self.config.seed + 7919 * len(self.fits))
        p = self.bayes_heads[0].w_mean.shape[1]
        eps = [
            torch.randn(self.config.head_draws, self.spec.n_targets, p, generator=gen)
            for _ in self.bayes_heads
        ]  # K x (D, m, p)
        means, variances, draws = [], [], []
        for start in range(0, len(scopes), self.config.predict_chunk):
            data = self._feature_set(
                list(scopes[start : start + self.config.predict_chunk]), None, None
            )
            m_chunk, v_chunk, d_chunk = [], [], []
            for member, head, e in zip(self.members, self.bayes_heads, eps, strict=True):
                hidden = member_hidden(member, data, self.config, self.device)  # (n, C)
                mean, var = head.moments(hidden)  # (n, m) standardised
                reg = _regression_head(member)
                std, loc = reg.target_std.double(), reg.target_mean.double()  # (m,)
                m_chunk.append(mean * std + loc)
                v_chunk.append((var + head.noise_var) * std**2)
                d_chunk.append(head.draws(hidden, e) * std + loc)  # (D, n, m)
            means.append(torch.stack(m_chunk))  # (K, n, m)
            variances.append(torch.stack(v_chunk))
            draws.append(torch.cat(d_chunk))  # (K * D, n, m)
        if not means:
            empty = torch.empty(0, self.spec.n_targets, dtype=torch.float64)
            return EnsemblePosterior(mean=empty, variance=empty, draws=empty[None])
        mean_k, var_k = torch.cat(means, dim=1), torch.cat(variances, dim=1)  # (K, n, m)
        mean = mean_k.mean(0)  # (n, m)
        variance = (var_k + mean_k**2).mean(0) - mean**2  # mixture variance
        return EnsemblePosterior(
            mean=mean, variance=variance.clamp_min(0.0), draws=torch.cat(draws, dim=1)
        )

    def predict_theta(self, scopes: Sequence[str]) -> Tensor:
        """Debye temperatures ``(K, n)`` in K (Debye heads only), spread scaled like :meth:`predict`."""
        if isinstance(self.spec.head, RegressionHeadConfig):
            raise ConfigError("predict_theta needs a Debye head; this ensemble regresses")
        theta = self._predict_features(self._feature_set(list(scopes), None, None), raw=True)
        if self.variance_scale != 1.0:  # the same widening as predict() applies to Cv
            mean = theta.mean(0, keepdim=True)
            theta = mean + self.variance_scale * (theta - mean)
        return theta

    # ----------------------------------------------------------------- persistence
    def save(self, directory: str | Path) -> EnsembleCard:
        """Write trunk, members, tokenizer and card (safetensors + JSON)."""
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        save_module_weights(out / TRUNK_FILE, self.encoder)
        hashes = []
        for k, member in enumerate(self.members):
            path = out / f"member_{k:02d}.safetensors"
            save_module_weights(path, member)
            hashes.append(file_sha256(path))
        head_hashes = []
        for k, head in enumerate(self.bayes_heads):
            path = out / f"head_{k:02d}.safetensors"
            save_module_weights(path, head)
            head_hashes.append(file_sha256(path))
        self.tokenizer.save(out / TOKENIZER_FILE)
        card = EnsembleCard(
            config=self.config,
            spec=self.spec,
            n_members=self.n_members,
            variance_scale=self.variance_scale,
            fitted=self.fitted,
            tokenizer_sha256=file_sha256(out / TOKENIZER_FILE),
            trunk_sha256=file_sha256(out / TRUNK_FILE),
            member_sha256=hashes,
            head_sha256=head_hashes,
            source_checkpoint=self.source_checkpoint,
            fits=self.fits,
        )
        (out / CARD_FILE).write_text(card.model_dump_json(indent=2) + "\n", encoding="utf-8")
        return card

    @classmethod
    def load(cls, directory: str | Path, *, device: str | None = None) -> CloudEnsemble:
        """Rebuild an ensemble saved by :meth:`save` (hashes verified, nothing unpickled).

        Raises:
            CheckpointError: missing or corrupt files, or hashes that do not match.
        """
        from cloud_model.tokenizer import ScopeTokenizer

        root = Path(directory)
        card = _read_card(root / CARD_FILE)
        config = card.config
        if device is not None:
            config = config.model_copy(update={"device": device})
        _check_hash(root / TRUNK_FILE, card.trunk_sha256)
        encoder = CloudEncoder(card.spec.encoder)
        load_module_weights(root / TRUNK_FILE, encoder)
        members = []
        for k, digest in enumerate(card.member_sha256):
            path = root / f"member_{k:02d}.safetensors"
            _check_hash(path, digest)
            member = MemberNet(card.spec)
            load_module_weights(path, member)
            members.append(member.eval())
        _check_hash(root / TOKENIZER_FILE, card.tokenizer_sha256)
        tokenizer = ScopeTokenizer.load(root / TOKENIZER_FILE)
        ensemble = cls(
            encoder, tokenizer, card.spec, members, config, source_checkpoint=card.source_checkpoint
        )
        for k, digest in enumerate(card.head_sha256):
            path = root / f"head_{k:02d}.safetensors"
            _check_hash(path, digest)
            head = BayesianLastLayer(card.spec.encoder.d_model, card.spec.n_targets)
            load_module_weights(path, head)
            ensemble.bayes_heads.append(head)
        ensemble.variance_scale = card.variance_scale
        ensemble.fitted = card.fitted
        ensemble.fits = list(card.fits)
        return ensemble


@dataclass(frozen=True)
class EnsemblePosterior:
    """What :meth:`CloudEnsemble.predict_posterior` returns (float64, target units)."""

    mean: Tensor  # (n, m)
    variance: Tensor  # (n, m), observation noise included
    draws: Tensor  # (S, n, m) joint function draws


def _regression_head(member: MemberNet) -> RegressionHead:
    if not isinstance(member.head, RegressionHead):
        raise ConfigError("a Bayesian last layer needs a regression head, not a Debye head")
    return member.head


def _head_config(
    head: str, n_targets: int, config: EnsembleConfig
) -> RegressionHeadConfig | DebyeHeadConfig:
    if head == "regression":
        names = config.target_names or tuple(f"y{i}" for i in range(n_targets))
        if len(names) != n_targets:
            raise ConfigError(f"{len(names)} target_names for n_targets={n_targets}")
        return RegressionHeadConfig(
            target_names=names, loss=config.loss, dropout=config.head_dropout
        )
    if head == "debye":
        return DebyeHeadConfig(
            theta_scale=config.theta_scale, loss=config.loss, dropout=config.head_dropout
        )
    raise ConfigError(f"unknown head {head!r}; choose 'regression' or 'debye'")


def _fresh_members(
    spec: MemberSpec, encoder: CloudEncoder, n_members: int, seed: int
) -> list[MemberNet]:
    members = []
    for k in range(n_members):
        torch.manual_seed(seed + k)  # each member's head starts from its own draw
        members.append(MemberNet(spec, encoder).cpu())
    return members


def _as_2d(y: Tensor, n: int, m: int) -> Tensor:
    y = torch.as_tensor(y, dtype=torch.float32)
    y = y.reshape(n, -1) if y.dim() == 1 else y
    if tuple(y.shape) != (n, m):
        raise ConfigError(f"targets have shape {tuple(y.shape)}, expected ({n}, {m})")
    return y


def _subset(data: FeatureSet, index: Tensor) -> FeatureSet:
    return FeatureSet(
        x=data.x[index],
        mask=None if data.mask is None else data.mask[index],
        y=data.y[index],
        n_atoms=None if data.n_atoms is None else data.n_atoms[index],
    )


def _check_hash(path: Path, expected: str) -> None:
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found")
    if file_sha256(path) != expected:
        raise CheckpointError(f"{path}: sha256 does not match {CARD_FILE} (corrupt or replaced)")


def _read_card(path: Path) -> EnsembleCard:
    if not path.is_file():
        raise CheckpointError(f"{path}: not found (is {path.parent} an ensemble directory?)")
    try:
        data: Any = json.loads(path.read_text(encoding="utf-8"))
        card = EnsembleCard.model_validate(data)
    except (json.JSONDecodeError, ValidationError) as exc:
        raise CheckpointError(f"{path}: invalid ensemble card ({exc})") from exc
    if card.format_version != ENSEMBLE_FORMAT_VERSION:
        raise CheckpointError(f"{path}: unsupported format {card.format_version}")
    return card
