"""The pretraining configuration (``configs/pretrain_*.yaml``), validated by pydantic.

``objective`` picks the loss: ``mlm`` (masked-language modelling on unlabelled SCOPE
strings, :mod:`cloud_model.pretrain`) or ``multitask`` (per-task regression heads on
labelled rows plus MLM as an auxiliary loss, :mod:`cloud_model.multitask`).
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from cloud_model.configs import ModelSize
from cloud_model.element_features import ElementFeatureKind
from cloud_model.errors import ConfigError
from cloud_model.yaml_file import InvalidYamlError, read_yaml


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelOptions(_Strict):
    """Which encoder to pretrain (a named size; vocabulary size comes from the tokenizer)."""

    size: ModelSize = "small"
    max_len: int = Field(default=64, gt=0)  # tokens per string, [CLS]/[SEP] included
    dropout: float = Field(default=0.1, ge=0.0, lt=1.0)
    pooling: Literal["cls", "mean"] = "cls"
    # element tokens also embed physical descriptors (cloud_model.element_features)
    element_features: ElementFeatureKind = "none"


class DataOptions(_Strict):
    """The corpus: SCOPE encodings of CIF datasets plus CLOUD-format string sets."""

    variant: Literal["cloud", "native"] = "cloud"  # SCOPE variant used for the CIF datasets
    symprec: float = Field(default=0.1, gt=0.0)  # spglib tolerance in Angstrom
    cif_datasets: list[str] | Literal["all"] = "all"  # "all" = every CIF set in the registry
    scope_datasets: list[str] = ["cloud_pretrain_10k", "cloud_cv"]  # already-encoded strings
    # pretraining is label-free, but keep benchmark test strings out by default
    exclude_splits: dict[str, list[str]] = {"cloud_cv": ["test"]}
    validation_fraction: float = Field(default=0.05, gt=0.0, lt=0.5)  # held out by string hash
    processes: int | None = Field(default=None, gt=0)  # SCOPE-encoding worker processes


class TrainOptions(_Strict):
    """Optimisation, schedule, cadence and hardware."""

    batch_size: int = Field(default=64, gt=0)  # strings per step per worker
    max_steps: int = Field(default=3000, gt=0)
    learning_rate: float = Field(default=5e-4, gt=0.0)  # peak, after warm-up
    warmup_steps: int = Field(default=150, ge=0)
    min_lr_ratio: float = Field(default=0.1, ge=0.0, le=1.0)  # cosine decays to this x peak
    weight_decay: float = Field(default=0.01, ge=0.0)  # on matrices only
    beta1: float = Field(default=0.9, ge=0.0, lt=1.0)
    beta2: float = Field(default=0.98, ge=0.0, lt=1.0)
    grad_clip: float = Field(default=1.0, gt=0.0)
    mask_prob: float = Field(default=0.15, gt=0.0, lt=1.0)
    seed: int = 0
    eval_every: int = Field(default=250, gt=0)
    eval_batch_size: int = Field(default=256, gt=0)
    checkpoint_every: int = Field(default=250, gt=0)
    log_every: int = Field(default=50, gt=0)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 autocast on CUDA, fp32 on CPU
    num_threads: int | None = Field(default=None, gt=0)  # torch CPU threads (None: torch default)
    num_workers: int = Field(default=1, gt=0)  # > 1: Ray Train DDP workers
    use_gpu: bool = False  # Ray Train: one GPU per worker

    @model_validator(mode="after")
    def _warmup_fits(self) -> TrainOptions:
        if self.warmup_steps >= self.max_steps:
            raise ValueError(
                f"warmup_steps ({self.warmup_steps}) must be < max_steps ({self.max_steps})"
            )
        return self


class MultitaskOptions(_Strict):
    """The multi-task objective (``objective: multitask``): what is sampled and weighted."""

    model_config = ConfigDict(extra="forbid", ser_json_inf_nan="strings")  # T = .inf in JSON

    # total loss = mean task loss (z-scored) + mlm_weight x MLM loss; 0 turns MLM off
    mlm_weight: float = Field(default=0.5, ge=0.0)
    # MLM strings per step, drawn from the corpus's unlabelled strings beside the labelled batch
    mlm_batch_size: int = Field(default=32, gt=0)
    # task sampling p_t ~ n_t^(1/T): T=1 proportional to rows, .inf = every task equally often
    task_temperature: float = Field(default=3.0, gt=0.0)
    # keep only these "<dataset>:<target>" tasks of the corpus (None: every task)
    tasks: list[str] | None = None
    # loss on z-scored targets: L1 is robust to the heavy tails of formation energies
    loss: Literal["l1", "mse"] = "l1"
    head_dropout: float = Field(default=0.1, ge=0.0, lt=1.0)
    # validation rows evaluated per task (and MLM validation strings) at each evaluation
    eval_max_rows: int = Field(default=2000, gt=0)

    @model_validator(mode="after")
    def _tasks_named(self) -> MultitaskOptions:
        if self.tasks is not None:
            if not self.tasks:
                raise ValueError("tasks: give at least one task name, or null for every task")
            bad = [
                t for t in self.tasks if t.count(":") != 1 or t.startswith(":") or t.endswith(":")
            ]
            if bad:
                raise ValueError(f"task names are '<dataset>:<target>'; got {bad}")
        return self

    def temperature_is_infinite(self) -> bool:
        """Whether every task is sampled equally often."""
        return math.isinf(self.task_temperature)


# cadence options that may change between an interrupted run and its resumption
_RESUMABLE_CHANGES = {
    "eval_every",
    "checkpoint_every",
    "log_every",
    "num_threads",
    "eval_batch_size",
}


class PretrainConfig(_Strict):
    """A whole pretraining run."""

    objective: Literal["mlm", "multitask"] = "mlm"
    model: ModelOptions = ModelOptions()
    data: DataOptions = DataOptions()  # the MLM corpus (objective: mlm)
    train: TrainOptions = TrainOptions()
    multitask: MultitaskOptions = MultitaskOptions()  # objective: multitask
    # options of cloud_model.multitask_corpus.build_multitask_corpus (MultiTaskDataOptions),
    # validated by that model when the corpus is built
    multitask_data: dict[str, Any] = {}

    @model_validator(mode="after")
    def _objective_options(self) -> PretrainConfig:
        if self.objective == "mlm" and self.multitask_data:
            raise ValueError(
                "multitask_data is only read with objective: multitask (the MLM corpus is `data`)"
            )
        return self

    @classmethod
    def from_yaml(cls, path: str | Path) -> PretrainConfig:
        """Load and validate a YAML file.

        Raises:
            ConfigError: missing file, invalid YAML, or invalid/unknown fields (listed).
        """
        path = Path(path)
        try:
            raw = read_yaml(path, what="pretraining config")
        except InvalidYamlError as exc:
            raise ConfigError(f"{path}: invalid YAML ({exc.detail})") from None
        try:
            return cls.model_validate(raw or {})
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(map(str, e['loc'])) or '<root>'}: {e['msg']}" for e in exc.errors()
            )
            raise ConfigError(f"{path}: {problems}") from exc

    def fingerprint(self) -> str:
        """sha256 of everything that determines the trained weights (not logging cadence)."""
        data = self.model_dump(mode="json")
        # options added after MLM runs existed: left out at their defaults, so that an
        # interrupted MLM run still resumes under the same fingerprint
        if data["objective"] == "mlm":
            for key in ("objective", "multitask", "multitask_data"):
                data.pop(key)
        if data["model"]["element_features"] == "none":
            data["model"].pop("element_features")
        data["train"] = {k: v for k, v in data["train"].items() if k not in _RESUMABLE_CHANGES}
        return hashlib.sha256(repr(sorted(_flatten(data))).encode()).hexdigest()


def _flatten(value: object, prefix: str = "") -> list[tuple[str, str]]:
    if isinstance(value, dict):
        return [item for k, v in value.items() for item in _flatten(v, f"{prefix}{k}.")]
    return [(prefix, repr(value))]
