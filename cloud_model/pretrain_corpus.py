"""The pretraining corpus: SCOPE strings from the dataset registry, de-duplicated and split.

Every CIF dataset named in the config is encoded with SCOPE (cached on disk by
:func:`cloud_model.corpus.encode_dataset`); the CLOUD-format string sets are
read as they are. Splits listed in ``exclude_splits`` are left out. The
validation split is a fixed function of each string (a sha256 bucket), so it
does not depend on order, machine or which other datasets are included.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field

from cloud_model.errors import ConfigError, DataError
from cloud_model.pretrain_config import DataOptions

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Corpus:
    """De-duplicated SCOPE strings split into training and validation by string hash."""

    train: list[str]
    validation: list[str]
    sources: dict[str, int] = field(default_factory=dict)  # dataset -> strings contributed


def in_validation(text: str, fraction: float) -> bool:
    """Whether ``text`` belongs to the validation split (a fixed function of the string)."""
    bucket = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") / 2**64
    return bucket < fraction


def split_strings(
    strings: list[str], fraction: float, sources: dict[str, int] | None = None
) -> Corpus:
    """De-duplicate ``strings`` and split them by hash; both parts sorted."""
    unique = sorted(set(strings))
    validation = [s for s in unique if in_validation(s, fraction)]
    held = set(validation)
    return Corpus([s for s in unique if s not in held], validation, dict(sources or {}))


def build_corpus(data: DataOptions) -> Corpus:
    """Collect the pretraining strings named by ``data`` (SCOPE encodings cached on disk).

    Raises:
        ConfigError: a dataset is unknown or of the wrong kind.
        DataError: the corpus is empty.
    """
    from cloud_model.datasets import REGISTRY
    from cloud_model.labelled_data import DataSource, load_labelled

    cif_names = (
        [n for n, spec in REGISTRY.items() if spec.kind == "cif"]
        if data.cif_datasets == "all"
        else list(data.cif_datasets)
    )
    strings: list[str] = []
    sources: dict[str, int] = {}
    for name, kind in [(n, "cif") for n in cif_names] + [(n, "scope") for n in data.scope_datasets]:
        spec = REGISTRY.get(name)
        if spec is None or spec.kind != kind:
            raise ConfigError(f"data: {name!r} is not a registered {kind} dataset")
        excluded = [s for s in data.exclude_splits.get(name, []) if s in spec.splits]
        kept = tuple(s for s in spec.splits if s not in excluded)
        source = DataSource(
            dataset=name,
            splits=kept,
            variant=data.variant if kind == "cif" else "cloud",
            symprec=data.symprec,
            processes=data.processes,
        )
        # SCOPE-encoded once per dataset (cached); rows of the excluded splits left out
        part = load_labelled(source, allow_empty=True).scopes
        sources[name] = len(part)
        strings += part
        logger.info(
            "corpus: %s (%s) -> %d strings (excluded splits %s)", name, kind, len(part), excluded
        )
    if not strings:
        raise DataError("the pretraining corpus is empty: name at least one dataset in the config")
    corpus = split_strings(strings, data.validation_fraction, sources)
    logger.info(
        "corpus: %d strings, %d distinct: %d train / %d validation",
        len(strings), len(corpus.train) + len(corpus.validation), len(corpus.train), len(corpus.validation),
    )  # fmt: skip
    return corpus
