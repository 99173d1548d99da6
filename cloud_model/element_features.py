"""Element-aware token embeddings: learned vectors plus a learned map of physical descriptors.

An element token's input vector is ``learned(token) + W @ descriptor(element)``: the
learned row is the usual ``nn.Embedding`` row, ``descriptor`` is a fixed vector of
physical element properties, and ``W`` is learned. Elements with similar properties
start close together, so chemistry seen for Na carries over to K before either has many
labelled rows; the learned row can still move each element away from its descriptor.

Descriptor tables come from the ``elementembeddings`` package (Onwuli et al., Digital
Discovery 2023), which ships them as data files in its wheel (read here directly; no
network, and without importing the package's plotting stack):

* ``magpie``: 22 tabulated properties (Ward et al. 2016), 97 elements;
* ``oliynyk``: 44 tabulated properties (Oliynyk et al. 2016), 85 elements, some gaps;
* ``mat2vec``: 200-d word embeddings learned from abstracts (Tshitoyan et al. 2019).

(The package also ships embeddings distilled from interatomic potentials trained on
Materials Project structures, e.g. CHGNet's; they are not offered here because they
would leak that data into the ``mpts_52`` time split.)

The table used by a model is ``(V, F + 1)``: row ``i`` holds the standardised descriptor
of token ``i`` if it is an element (each column: zero mean, unit variance over the
vocabulary's elements that have it; a missing value is 0, the mean), zeros for every
other token, and a last column that is 1 for an element token the table does not
cover (its descriptor is all zeros; the flag lets ``W`` give it its own offset). The
table is a buffer of the embedding, saved with the weights, so loading a checkpoint
needs neither the package nor the tokenizer.
"""

from __future__ import annotations

import csv
import math
from functools import cache
from importlib import resources
from typing import TYPE_CHECKING, Literal

import torch
from torch import nn

from cloud_model.errors import ConfigError

if TYPE_CHECKING:
    from cloud_model.tokenizer import ScopeTokenizer

ElementFeatureKind = Literal["none", "magpie", "oliynyk", "mat2vec"]

# descriptor width F of each table (the model's table has F + 1 columns: the missing flag)
DESCRIPTOR_DIMS: dict[str, int] = {"magpie": 22, "oliynyk": 44, "mat2vec": 200}
_FILES = {"magpie": "magpie.csv", "oliynyk": "oliynyk.csv", "mat2vec": "mat2vec.csv"}
_PACKAGE = "elementembeddings"
_DATA_DIR = ("data", "element_representations")

__all__ = [
    "DESCRIPTOR_DIMS",
    "ElementAwareEmbedding",
    "ElementFeatureKind",
    "element_descriptors",
    "element_table",
    "table_width",
]


def table_width(kind: ElementFeatureKind) -> int:
    """Columns of the model's table for ``kind``: ``F + 1`` (0 for ``"none"``).

    Raises:
        ConfigError: unknown kind.
    """
    if kind == "none":
        return 0
    if kind not in DESCRIPTOR_DIMS:
        raise ConfigError(
            f"element_features: unknown descriptor set {kind!r}; "
            f"choose none or one of {sorted(DESCRIPTOR_DIMS)}"
        )
    return DESCRIPTOR_DIMS[kind] + 1


@cache
def element_descriptors(kind: str) -> dict[str, tuple[float, ...]]:
    """The raw descriptor of every element the table covers (NaN where the table has a gap).

    Args:
        kind: ``"magpie"``, ``"oliynyk"`` or ``"mat2vec"``.

    Returns:
        element symbol -> ``F`` floats, in the file's column order.

    Raises:
        ConfigError: unknown kind, or the ``elementembeddings`` package (or its data file)
            is not installed.
    """
    table_width(kind)  # type: ignore[arg-type]  # validates the name
    if kind == "none":
        raise ConfigError("element_features 'none' has no descriptors")
    try:
        root = resources.files(_PACKAGE).joinpath(*_DATA_DIR, _FILES[kind])
        text = root.read_text(encoding="utf-8")
    except (ModuleNotFoundError, FileNotFoundError, OSError) as exc:
        raise ConfigError(
            f"element_features={kind!r} needs the elementembeddings package "
            f"(pip install elementembeddings): {exc}"
        ) from exc
    rows = list(csv.reader(text.splitlines()))
    width = DESCRIPTOR_DIMS[kind]
    table: dict[str, tuple[float, ...]] = {}
    for row in rows[1:]:
        if not row:
            continue
        values = tuple(_number(cell) for cell in row[1:])
        if len(values) != width:
            raise ConfigError(
                f"{_FILES[kind]} of elementembeddings: element {row[0]!r} has {len(values)} "
                f"values, expected {width} (an incompatible package version?)"
            )
        table[row[0].strip()] = values
    return table


def _number(cell: str) -> float:
    try:
        value = float(cell)
    except ValueError:
        return math.nan
    return value if math.isfinite(value) else math.nan


def element_table(tokenizer: ScopeTokenizer, kind: ElementFeatureKind) -> torch.Tensor:
    """The ``(V, F + 1)`` descriptor table of a tokenizer's vocabulary (rules in the module doc).

    Args:
        tokenizer: its ``kinds`` say which tokens are elements.
        kind: which descriptor set.

    Returns:
        float32 ``(V, F + 1)``; rows of non-element tokens are all zeros.

    Raises:
        ConfigError: ``kind`` is ``"none"`` or unknown, or the package is missing.
    """
    raw = element_descriptors(kind)
    width = DESCRIPTOR_DIMS[kind]
    table = torch.zeros(tokenizer.vocab_size, width + 1)  # (V, F + 1)
    element_ids = [i for i, k in enumerate(tokenizer.kinds) if k == "element"]
    covered = [i for i in element_ids if tokenizer.tokens[i] in raw]
    values = torch.tensor([raw[tokenizer.tokens[i]] for i in covered], dtype=torch.float64)
    if len(covered) >= 2:
        finite = torch.isfinite(values)  # (E, F)
        counts = finite.sum(0).clamp_min(1)  # (F,)
        filled = torch.where(finite, values, torch.zeros_like(values))
        mean = filled.sum(0) / counts  # (F,)
        centred = torch.where(finite, values - mean, torch.zeros_like(values))  # (E, F)
        std = ((centred**2).sum(0) / (counts - 1).clamp_min(1)).sqrt()  # (F,)
        std = torch.where(std > 1e-12, std, torch.ones_like(std))  # a constant column stays 0
        table[covered, :width] = (centred / std).float()  # missing values -> 0 (the mean)
    missing = [i for i in element_ids if tokenizer.tokens[i] not in raw]
    table[missing, width] = 1.0
    return table


class ElementAwareEmbedding(nn.Embedding):
    """``weight[ids] + proj(descriptors[ids])``: an embedding whose rows know their element.

    ``weight`` is the learned ``(V, C)`` matrix (tied to the MLM decoder like a plain
    embedding's), ``descriptors`` the fixed ``(V, F + 1)`` buffer of :func:`element_table`
    and ``proj`` the learned ``(F + 1) -> C`` map (no bias: non-element tokens get nothing).
    """

    descriptors: torch.Tensor  # (V, F + 1) buffer

    def __init__(self, num_embeddings: int, embedding_dim: int, table: torch.Tensor | int) -> None:
        """Args:
        num_embeddings: ``V``; embedding_dim: ``C``.
        table: the ``(V, F + 1)`` descriptor table, or its width ``F + 1`` for a zero table
            that a checkpoint's weights will fill.

        Raises:
            ConfigError: the table has the wrong number of rows.
        """
        super().__init__(num_embeddings, embedding_dim)
        if isinstance(table, int):
            table = torch.zeros(num_embeddings, table)
        if table.dim() != 2 or table.shape[0] != num_embeddings:
            raise ConfigError(
                f"element descriptor table has shape {tuple(table.shape)}; "
                f"expected ({num_embeddings}, F + 1) for a vocabulary of {num_embeddings}"
            )
        self.register_buffer("descriptors", table.float().clone())
        self.proj = nn.Linear(table.shape[1], embedding_dim, bias=False)
        self.init_projection()

    def init_projection(self) -> None:
        """Draw ``proj`` so the descriptor term is about as large as a learned row (std 0.02)."""
        nn.init.normal_(self.proj.weight, std=0.02 / math.sqrt(self.proj.in_features))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """Args: ids ``(B, T)``. Returns ``(B, T, C)``."""
        learned = super().forward(ids)  # (B, T, C)
        features = nn.functional.embedding(ids, self.descriptors)  # (B, T, F + 1)
        return learned + self.proj(features.to(learned.dtype))  # (B, T, C)
