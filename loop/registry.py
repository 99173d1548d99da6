"""Surrogate versions on disk: written atomically, hashed, recorded, restored on resume.

Every refit of a learning surrogate becomes a version ``models/v<N>/`` in the
campaign directory: the surrogate writes itself into ``v<N>.tmp`` (its own
``save``), the directory is renamed into place, its sha256 (over every file,
names included) is recorded in the store with the training size and fit
metrics, and the decisions made with it point at it. On resume the newest
version whose files are intact is loaded (its ``load``); a version whose files
are missing or do not match their hash is not used, and the agent refits.
The two newest versions are kept on disk.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from cloud_model.errors import CloudlabError
from loop.store import CampaignStore
from loop.surrogate import Surrogate

__all__ = ["ModelRegistry", "ModelVersion", "directory_sha256"]

logger = logging.getLogger(__name__)
_KEEP = 2


class ModelVersion(BaseModel):
    """One recorded surrogate version."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    version: int
    n_train: int  # campaign measurements it was fitted on (prior data not counted)
    path: str | None  # relative to the campaign directory
    sha256: str | None


def directory_sha256(directory: Path) -> str:
    """sha256 over the relative names and bytes of every file under ``directory``."""
    digest = hashlib.sha256()
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        digest.update(path.relative_to(directory).as_posix().encode() + b"\0")
        digest.update(path.read_bytes())
    return digest.hexdigest()


class ModelRegistry:
    """The surrogate versions of one campaign.

    Args:
        store: the campaign's store (the versions' records).
        directory: the campaign directory (``models/`` lives there).
    """

    def __init__(self, store: CampaignStore, directory: Path) -> None:
        self.store = store
        self.root = directory / "models"
        self.directory = directory

    def latest(self) -> ModelVersion | None:
        """The newest recorded version, or None."""
        row = self.store.latest_model_record()
        return None if row is None else ModelVersion.model_validate(row)

    def save(
        self, surrogate: Surrogate, *, n_train: int, metrics: dict[str, float]
    ) -> ModelVersion:
        """Write ``surrogate`` as the next version and record it."""
        latest = self.latest()
        number = (latest.version if latest else 0) + 1
        target = self.root / f"v{number}"
        tmp = target.with_name(target.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        surrogate.save(tmp)
        shutil.rmtree(target, ignore_errors=True)
        tmp.rename(target)
        digest = directory_sha256(target)
        relative = target.relative_to(self.directory).as_posix()
        version = self.store.record_model_version(
            path=relative,
            sha256=digest,
            n_train=n_train,
            metrics=metrics,
        )
        if version != number:
            raise CloudlabError(
                f"model registry out of step with the store: wrote v{number}, store recorded v{version}"
            )
        for old in self.root.glob("v*"):
            if old.is_dir() and old.name[1:].isdigit() and int(old.name[1:]) <= number - _KEEP:
                shutil.rmtree(old, ignore_errors=True)
        return ModelVersion(version=version, n_train=n_train, path=relative, sha256=digest)

    def restore(self, surrogate: Surrogate) -> ModelVersion | None:
        """Load the newest intact version into ``surrogate``; None if there is none to load."""
        latest = self.latest()
        if latest is None or latest.path is None:
            return None
        where = self.directory / latest.path
        if not where.is_dir():
            logger.warning("surrogate v%d: %s is missing; refitting", latest.version, where)
            return None
        if latest.sha256 is not None and directory_sha256(where) != latest.sha256:
            logger.warning(
                "surrogate v%d: %s does not match its hash; refitting", latest.version, where
            )
            return None
        try:
            surrogate.load(where)
        except (CloudlabError, OSError, ValueError, KeyError) as exc:
            logger.warning("surrogate v%d could not be loaded (%s); refitting", latest.version, exc)
            return None
        logger.info("restored surrogate v%d (%d measurements)", latest.version, latest.n_train)
        return latest
