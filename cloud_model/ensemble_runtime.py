"""Where an ensemble's members train: one after the other in this process, or as Ray actors.

:func:`fit_members` trains the members either in this process (the CPU default)
or in parallel as Ray actors (:func:`cloud_model.ray_work.fit_members_with_ray`),
each pinned to a GPU or a fraction of one. Ray is never started here: ``"ray"``
needs a running Ray (started by the caller); ``"auto"`` uses it when it runs, CUDA
exists and there is more than one member, and trains in process otherwise.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Literal

import torch

from cloud_model.finetune import (
    FeatureSet,
    FinetuneConfig,
    MemberFitReport,
    MemberNet,
    train_member,
)

logger = logging.getLogger(__name__)

ParallelMode = Literal["in_process", "ray"]
# (member index, epoch, training loss, validation loss or None)
EpochCallback = Callable[[int, int, float, float | None], None]


def _choose_mode(n_members: int, parallel: str) -> ParallelMode:
    if parallel == "ray":
        return "ray"
    if parallel == "auto" and n_members > 1 and torch.cuda.is_available():
        from cloud_model.ray_work import ray_is_running

        if ray_is_running():
            return "ray"
        logger.info(
            "parallel='auto': CUDA is available but Ray is not running; training %d members "
            "in process (start Ray first to train them as parallel actors)",
            n_members,
        )
    return "in_process"


def fit_members(
    members: list[MemberNet],
    trains: list[FeatureSet],
    val: FeatureSet | None,
    config: FinetuneConfig,
    *,
    epochs: int,
    device: torch.device,
    parallel: Literal["auto", "ray", "in_process"] = "auto",
    gpus_per_member: float = 1.0,
    on_epoch: EpochCallback | None = None,
) -> tuple[ParallelMode, list[MemberFitReport]]:
    """Train member k on ``trains[k]`` (seed ``config.seed + k``), in place.

    Args:
        members: the K member modules; trains: their K training sets.
        val: shared validation rows for early stopping (None = none).
        config: training hyperparameters; epochs: at most this many passes.
        device: device for in-process training.
        parallel: ``"ray"`` (actors; Ray must be running), ``"in_process"``, or ``"auto"``
            (Ray when CUDA exists, there is more than one member and Ray is running).
        gpus_per_member: GPU share of each actor when CUDA exists.
        on_epoch: called as ``(member, epoch, train_loss, val_loss)`` after each epoch
            of in-process training (Ray actors report only when they finish).

    Returns:
        The mode used and one report per member.

    Raises:
        RayNotStartedError: ``parallel="ray"`` and this process is not connected to Ray.
    """
    mode = _choose_mode(len(members), parallel)
    if mode == "in_process":
        reports = []
        for k, (member, train) in enumerate(zip(members, trains, strict=True)):
            hook = None if on_epoch is None else functools.partial(on_epoch, k)
            reports.append(
                train_member(
                    member,
                    train,
                    val,
                    config,
                    epochs=epochs,
                    seed=config.seed + k,
                    device=device,
                    on_epoch=hook,
                )
            )
        return mode, reports
    from cloud_model.ray_work import fit_members_with_ray

    return mode, fit_members_with_ray(members, trains, val, config, epochs, gpus_per_member)
