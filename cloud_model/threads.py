"""One thread budget for every process the project starts.

Oversubscribed threads, not the algorithms, dominated the cost of a decision on a
shared machine: with torch's default of one thread per core and one other busy
process, a q = 8 qLogEI decision over 1M cached candidates took 100 s, and 0.56 s
with one thread (issue 16, `benchmarks/decision_scale.py` measures it again).
So each process gets an explicit budget:

* the setting ``threads`` (campaign config, ``cloudlab ... --threads``) or the
  environment variable ``CLOUDLAB_THREADS``; ``auto`` (the default) is the cores
  this process may really use (:func:`usable_cores`: CPU affinity and a cgroup
  CPU quota) divided among the workers that run at once;
* :func:`apply_thread_budget` sets torch's intra-op threads and exports
  ``OMP_NUM_THREADS``/``MKL_NUM_THREADS``/``OPENBLAS_NUM_THREADS`` so that the
  processes started afterwards (Ray workers and actors, GPAW, fine-tuning jobs)
  inherit the same budget unless they set their own.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

import torch

from cloud_model.errors import ConfigError

logger = logging.getLogger(__name__)

ENV_VAR = "CLOUDLAB_THREADS"
_THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
MAX_THREADS = 256


def usable_cores() -> int:
    """Cores this process may run on: its CPU affinity, capped by a cgroup v2 quota."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    quota = _cgroup_quota()
    if quota is not None:
        cores = min(cores, max(1, math.floor(quota)))
    return max(1, cores)


def _cgroup_quota(path: Path = Path("/sys/fs/cgroup/cpu.max")) -> float | None:
    """CPUs allowed by the cgroup v2 ``cpu.max`` (``quota period``), None when unlimited."""
    try:
        quota, period = path.read_text(encoding="ascii").split()[:2]
    except (OSError, ValueError):
        return None
    if quota == "max":
        return None
    try:
        return float(quota) / float(period)
    except (ValueError, ZeroDivisionError):
        return None


def resolve_threads(setting: int | str | None = None, *, workers: int = 1) -> int:
    """The thread budget of one of ``workers`` processes running at once.

    Args:
        setting: a positive int, or ``"auto"``/None: ``$CLOUDLAB_THREADS`` when set, else
            the usable cores divided by ``workers``.
        workers: processes sharing the machine's cores (parallel benchmark runs).

    Raises:
        ConfigError: the setting or the environment variable is not a positive integer
            or ``auto``.
    """
    source = "threads"
    if (setting is None or setting == "auto") and os.environ.get(ENV_VAR):
        setting, source = os.environ[ENV_VAR], f"${ENV_VAR}"
    if setting is None:
        setting = "auto"
    if isinstance(setting, str):
        text = setting.strip().lower()
        if text == "auto":
            return max(1, usable_cores() // max(1, workers))
        try:
            setting = int(text)
        except ValueError:
            raise ConfigError(
                f"{source} = {setting!r}: expected a positive integer or 'auto'"
            ) from None
    if isinstance(setting, bool) or not 1 <= setting <= MAX_THREADS:
        raise ConfigError(
            f"{source} = {setting!r}: expected an integer in 1..{MAX_THREADS} or 'auto'"
        )
    return int(setting)


def apply_thread_budget(threads: int, *, export: bool = True) -> int:
    """Use ``threads`` intra-op threads here and (``export``) in processes started later.

    Returns:
        ``threads``.
    """
    torch.set_num_threads(threads)
    if export:
        for name in _THREAD_ENV:
            os.environ[name] = str(threads)
    logger.debug("thread budget %d (usable cores %d)", threads, usable_cores())
    return threads
