"""Resumable training state: model, optimizer, scheduler, RNG and step, without pickle.

Tensors go to safetensors files; everything else (step, scheduler state,
optimizer hyperparameters, a fingerprint of the run's config) to JSON. Each
save writes a fresh ``step_XXXXXXXX/`` directory and only then points
``latest.json`` at it, so an interruption mid-save leaves the previous state
intact.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, ValidationError
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from cloud_model.checkpoint import file_sha256, load_module_weights, save_module_weights
from cloud_model.errors import CheckpointError

logger = logging.getLogger(__name__)

LATEST_FILE = "latest.json"


class TrainingStateInfo(BaseModel):
    """The JSON half of a training state."""

    model_config = ConfigDict(extra="forbid")
    step: int  # optimizer steps completed
    config_fingerprint: str  # sha256 of the run's config: resuming a different run is refused
    scheduler: dict[str, Any]
    optimizer_param_groups: list[dict[str, Any]]
    optimizer_scalars: dict[str, dict[str, Any]]  # param index -> non-tensor per-param state
    files_sha256: dict[str, str]
    extra: dict[str, Any] = {}


def _optimizer_tensors(
    optimizer: torch.optim.Optimizer,
) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, Any]], list[dict[str, Any]]]:
    state = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, per_param in state["state"].items():
        for key, value in per_param.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{index}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(index), {})[key] = value
    return tensors, scalars, state["param_groups"]


def save_training_state(
    directory: Path,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    step: int,
    config_fingerprint: str,
    extra: dict[str, Any] | None = None,
    keep: int = 1,
) -> Path:
    """Write the state after ``step`` optimizer steps under ``directory``; return its folder.

    Args:
        directory: the run's training-state folder (created if needed).
        model: the unwrapped model (not the DDP wrapper).
        optimizer, scheduler: their current state is saved.
        step: optimizer steps completed.
        config_fingerprint: identifies the run configuration.
        extra: JSON-serialisable values to keep (e.g. the loss history).
        keep: how many state folders to keep (older ones are deleted).
    """
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / f"step_{step:08d}"
    tmp = directory / f".tmp_step_{step:08d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_module_weights(tmp / "model.safetensors", model)
    tensors, scalars, groups = _optimizer_tensors(optimizer)
    save_file(tensors, str(tmp / "optimizer.safetensors"))
    rng = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng.update({f"torch_cuda_{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    save_file(rng, str(tmp / "rng.safetensors"))
    names = ("model.safetensors", "optimizer.safetensors", "rng.safetensors")
    info = TrainingStateInfo(
        step=step,
        config_fingerprint=config_fingerprint,
        scheduler=scheduler.state_dict(),
        optimizer_param_groups=groups,
        optimizer_scalars=scalars,
        files_sha256={name: file_sha256(tmp / name) for name in names},
        extra=extra or {},
    )
    (tmp / "state.json").write_text(info.model_dump_json(indent=1), encoding="utf-8")
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)
    latest_tmp = directory / (LATEST_FILE + ".tmp")
    latest_tmp.write_text(json.dumps({"path": target.name, "step": step}), encoding="utf-8")
    os.replace(latest_tmp, directory / LATEST_FILE)
    previous = sorted(p for p in directory.glob("step_*") if p.is_dir() and p != target)
    for old in previous[: max(0, len(previous) - (keep - 1))]:
        shutil.rmtree(old, ignore_errors=True)
    logger.debug("saved training state at step %d to %s", step, target)
    return target


def has_training_state(directory: Path) -> bool:
    """Whether ``directory`` holds a saved training state."""
    return (directory / LATEST_FILE).is_file()


def load_training_state(
    directory: Path,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    config_fingerprint: str,
) -> TrainingStateInfo:
    """Restore model, optimizer, scheduler and RNG states in place; return the JSON part.

    Raises:
        CheckpointError: no state, a file missing or altered, or a different run config.
    """
    latest = directory / LATEST_FILE
    if not latest.is_file():
        raise CheckpointError(f"{latest}: no training state to resume from")
    try:
        folder = directory / str(json.loads(latest.read_text(encoding="utf-8"))["path"])
        info = TrainingStateInfo.model_validate_json(
            (folder / "state.json").read_text(encoding="utf-8")
        )
    except (OSError, KeyError, json.JSONDecodeError, ValidationError) as exc:
        raise CheckpointError(f"{latest}: unreadable training state ({exc})") from exc
    if info.config_fingerprint != config_fingerprint:
        raise CheckpointError(
            f"{folder}: saved by a run with a different configuration; "
            "resume with the same config file or start a new --out directory"
        )
    for name, digest in info.files_sha256.items():
        path = folder / name
        if not path.is_file() or file_sha256(path) != digest:
            raise CheckpointError(f"{path}: missing or does not match its recorded sha256")
    load_module_weights(folder / "model.safetensors", model)
    try:
        tensors = load_file(str(folder / "optimizer.safetensors"))
        rng = load_file(str(folder / "rng.safetensors"))
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{folder}: unreadable optimizer/RNG state ({exc})") from exc
    per_param: dict[int, dict[str, Any]] = {}
    for key, tensor in tensors.items():
        index, name = key.split(".", 1)
        per_param.setdefault(int(index), {})[name] = tensor
    for index, values in info.optimizer_scalars.items():
        per_param.setdefault(int(index), {}).update(values)
    groups = [
        {k: tuple(v) if k == "betas" else v for k, v in group.items()}
        for group in info.optimizer_param_groups
    ]
    optimizer.load_state_dict({"state": per_param, "param_groups": groups})
    scheduler.load_state_dict(info.scheduler)
    torch.set_rng_state(rng["torch_cpu"])
    cuda_states = [rng[k] for k in sorted(rng) if k.startswith("torch_cuda_")]
    if cuda_states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda_states)
    logger.info("resumed training state from %s (step %d)", folder, info.step)
    return info
