"""Configuration models of the model package that need no torch.

A campaign config embeds the ensemble's fine-tuning settings; validating it must
not import torch (or Ray, or BoTorch), so the pydantic models live here and the
modules that train (:mod:`cloud_model.finetune`, :mod:`cloud_model.ensemble`)
import them.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["EnsembleConfig", "FeatureKind", "FinetuneConfig", "ModelSize"]

ModelSize = Literal["tiny", "small", "base"]

FeatureKind = Literal["ids", "hidden", "pooled"]


class FinetuneConfig(BaseModel):
    """Hyperparameters of fine-tuning one model (or each member of an ensemble)."""

    model_config = ConfigDict(extra="forbid")

    # top transformer blocks trained; 0 = head only on cached pooled features; "all" = every block
    n_trainable_blocks: int | Literal["all"] = Field(default="all")
    # with every block trainable, also train the token/position embeddings (nothing is cached)
    train_embeddings: bool = True
    # pooled vector fed to the head; None keeps the encoder's own setting
    pooling: Literal["cls", "mean"] | None = None
    # L1 is robust to heavy-tailed targets; MSE matches the Gaussian view of an ensemble
    loss: Literal["l1", "mse"] = "l1"
    # passes over the training rows (early stopping may end sooner)
    epochs: int = Field(default=60, ge=1)
    batch_size: int = Field(default=32, ge=1)
    # AdamW peak learning rates: the freshly initialised head learns faster than the encoder
    lr_head: float = Field(default=1e-3, gt=0)
    lr_encoder: float = Field(default=2e-4, gt=0)
    # layer-wise decay: block d levels below the top gets lr_encoder * layer_decay**d (1 = off)
    layer_decay: float = Field(default=1.0, gt=0, le=1)
    weight_decay: float = Field(default=0.01, ge=0)
    # linear warm-up over this fraction of steps, then cosine decay to 5 % of the peak
    warmup_fraction: float = Field(default=0.05, ge=0, lt=1)
    grad_clip: float = Field(default=1.0, gt=0)
    # stop when validation loss has not improved for this many epochs (needs a validation split)
    patience: int = Field(default=10, ge=1)
    head_dropout: float = Field(default=0.1, ge=0, lt=1)
    seed: int = 0
    # "auto" = CUDA when available (bf16 autocast there), else CPU fp32
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # token sequences are cut to this length (the tokenizer reports truncations)
    max_length: int = Field(default=64, ge=2)
    eval_batch_size: int = Field(default=256, ge=1)
    # Debye head: predict theta itself (AFLOW labels) or Cv at `temperatures` (CLOUD cv labels)
    debye_output: Literal["theta", "heat_capacity"] = "heat_capacity"
    # label temperatures in K, one per target column for debye_output="heat_capacity"
    temperatures: tuple[float, ...] = (300.0,)
    # loss on Cv divided by the training std of Cv (True) or in J/(mol K) (False)
    standardise_debye_loss: bool = True
    # typical Debye temperature (K); an untrained Debye head starts near it
    theta_scale: float = Field(default=400.0, gt=0)



class EnsembleConfig(FinetuneConfig):
    """Fine-tuning hyperparameters plus what is specific to an ensemble."""

    # default cut for ensembles: the top block + head per member over a shared cached trunk
    n_trainable_blocks: int | Literal["all"] = Field(default=1)
    loss: Literal["l1", "mse"] = "mse"
    epochs: int = Field(default=40, ge=1)
    # passes when fit() continues from the previous weights (warm start)
    warm_start_epochs: int = Field(default=10, ge=1)
    # train each member on a bootstrap resample of the training rows
    bootstrap: bool = False
    # fraction of fit() rows held out (never trained on) for early stopping and recalibration
    val_fraction: float = Field(default=0.0, ge=0.0, lt=0.9)
    # fit the sigma multiplier on the validation rows (needs a validation split)
    recalibrate: bool = True
    # "auto": Ray actors when CUDA is available, else in-process
    parallel: Literal["auto", "ray", "in_process"] = "auto"
    # GPU share of each member's actor (0.5 = two members per GPU)
    gpus_per_member: float = Field(default=1.0, ge=0.0)
    # strings whose frozen features stay in memory (first in, first out beyond it)
    max_cache_entries: int = Field(default=200_000, ge=0)
    # candidates scored per chunk by predict()
    predict_chunk: int = Field(default=8192, ge=1)
    # encoder size when no checkpoint is given (a randomly initialised trunk)
    model_size: ModelSize = "small"
    # names of the target columns (regression), stored in the card
    target_names: tuple[str, ...] | None = None
    # replace each member's last linear layer, for prediction, by evidence-maximised Bayesian
    # linear regression on its own hidden features (cloud_model.bayes_head; regression only)
    bayesian_head: bool = False
    # joint function draws per member from its Bayesian head (draws x members = the samples)
    head_draws: int = Field(default=8, ge=1, le=256)
