"""The project's error hierarchy.

Every error cloudlab raises on purpose derives from :class:`CloudlabError` and
from the built-in it behaves like, so callers may catch either. This module is a
leaf (it imports nothing of ours) so that every package may use it without
breaking the one-way dependency rule.
"""

from __future__ import annotations


class CloudlabError(Exception):
    """Root of every error raised deliberately by cloudlab."""


class ConfigError(CloudlabError, ValueError):
    """A configuration file or object is invalid."""


class DataError(CloudlabError, ValueError):
    """A dataset, file or record is missing, corrupt or malformed."""


class DatasetNotFoundError(DataError, KeyError):
    """A dataset name is not in the registry."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0]) if self.args else ""


class SymmetryError(CloudlabError, ValueError):
    """A structure cannot be symmetrised or encoded (bad input or spglib failure)."""


class TokenizerError(CloudlabError, ValueError):
    """A string cannot be tokenized or a vocabulary file is invalid."""


class CheckpointError(CloudlabError, ValueError):
    """A model checkpoint is missing, corrupt or incompatible."""


class RayNotStartedError(CloudlabError, RuntimeError):
    """Ray work was asked for but this process is not connected to Ray (the caller starts it)."""
