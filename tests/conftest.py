"""Shared fixtures: the offline data mirror, one Ray runtime per session, markers."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("CLOUDLAB_DATA_DIR", str((REPO.parent / "shared" / "data").resolve()))
# warm CHGNet servers (adapters/warm_workers.py) started by tests exit 30 s after their last job,
# not 300 s, so a test session leaves no idle server behind for long
os.environ.setdefault("CLOUDLAB_WARM_IDLE_S", "30")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:
        has_cuda = False
    if not has_cuda:
        skip = pytest.mark.skip(reason="needs CUDA")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The offline dataset mirror (``$CLOUDLAB_DATA_DIR``, ../shared/data by default)."""
    path = Path(os.environ["CLOUDLAB_DATA_DIR"])
    if not path.is_dir():
        pytest.fail(f"dataset mirror {path} not found: set CLOUDLAB_DATA_DIR to ../shared/data")
    return path


@pytest.fixture(scope="session")
def ray_session() -> Iterator[None]:
    """A local Ray runtime shared by every test that needs one (starting Ray costs ~9 s)."""
    import ray

    started = False
    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
        started = True
    yield
    if started:
        ray.shutdown()
