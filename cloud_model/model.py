"""The CLOUD encoder: a BERT-style transformer over SCOPE token ids.

Reads top to bottom from the smallest piece to the largest, nanoGPT style:
config -> self-attention -> MLP -> block -> the encoder's steps -> encoder. Heads (masked LM,
regression, Debye) live in :mod:`cloud_model.heads`; the encoder only maps
token ids to hidden states and pools them.

Shape letters: B batch, T sequence length, C model width (``d_model``),
H attention heads, D = C / H head width, V vocabulary size.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from cloud_model.configs import ModelSize
from cloud_model.element_features import ElementAwareEmbedding, ElementFeatureKind, table_width
from cloud_model.errors import ConfigError

# layers, width, heads, feed-forward width of each named size
_SIZES: dict[str, tuple[int, int, int, int]] = {
    "tiny": (2, 64, 2, 256),  # seconds on CPU: for tests
    "small": (4, 256, 4, 1024),  # ~3.3 M parameters, ~13 MB fp32: pretrains in ~1 h on 2 CPU cores
    "base": (12, 768, 12, 3072),  # the published CLOUD (BERT-base) size: needs a GPU
}


class CloudConfig(BaseModel):
    """Architecture of a CLOUD encoder. Stored in every model card."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # from the tokenizer: every row of the embedding is a real token (no 30k unused BERT rows)
    vocab_size: int = Field(gt=0)
    # SCOPE strings of the datasets are 20-50 tokens; the published model also reads 64
    max_len: int = Field(default=64, gt=0)
    # depth: 4 is enough for a ~50k-string corpus on CPU, 12 as published for base
    n_layer: int = Field(default=4, gt=0)
    # heads must divide d_model; 64-wide heads as in BERT
    n_head: int = Field(default=4, gt=0)
    # residual stream width C
    d_model: int = Field(default=256, gt=0)
    # MLP hidden width, 4 x d_model as in BERT/GPT
    d_ff: int = Field(default=1024, gt=0)
    # dropout on attention probabilities and residual branches; 0.1 as in BERT
    dropout: float = Field(default=0.1, ge=0.0, lt=1.0)
    # LayerNorm epsilon; 1e-5 keeps fp32 and bf16 stable
    layer_norm_eps: float = Field(default=1e-5, gt=0.0)
    # what pool() returns: the [CLS] state (published CLOUD) or the mean over real tokens
    pooling: Literal["cls", "mean"] = "cls"
    # element tokens also embed a descriptor table (cloud_model.element_features); "none" =
    # a plain learned embedding, as every checkpoint made before the option existed
    element_features: ElementFeatureKind = "none"

    @model_validator(mode="after")
    def _heads_divide_width(self) -> CloudConfig:
        if self.d_model % self.n_head != 0:
            raise ValueError(f"d_model={self.d_model} is not divisible by n_head={self.n_head}")
        return self

    @classmethod
    def named(cls, size: ModelSize, vocab_size: int, **overrides: object) -> CloudConfig:
        """The configuration of a named size.

        Args:
            size: ``"tiny"`` (tests), ``"small"`` (CPU default) or ``"base"`` (published size).
            vocab_size: number of token ids, from the tokenizer.
            **overrides: any other field (``dropout``, ``max_len``, ...).

        Raises:
            ConfigError: unknown size or invalid override.
        """
        if size not in _SIZES:
            raise ConfigError(f"unknown model size {size!r}; choose one of {sorted(_SIZES)}")
        n_layer, d_model, n_head, d_ff = _SIZES[size]
        fields: dict[str, object] = {
            "vocab_size": vocab_size,
            "n_layer": n_layer,
            "d_model": d_model,
            "n_head": n_head,
            "d_ff": d_ff,
        }
        fields.update(overrides)
        try:
            return cls.model_validate(fields)
        except ValueError as exc:
            raise ConfigError(f"invalid {size} model config: {exc}") from exc


class SelfAttention(nn.Module):
    """Multi-head self-attention over real tokens only (padding keys are masked)."""

    def __init__(self, config: CloudConfig) -> None:
        super().__init__()
        self.n_head = config.n_head
        self.dropout = config.dropout
        self.qkv = nn.Linear(config.d_model, 3 * config.d_model)
        self.proj = nn.Linear(config.d_model, config.d_model)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        """Args: x ``(B, T, C)``; key_mask ``(B, 1, 1, T)`` bool, True on real tokens."""
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)  # 3 x (B, T, C)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, H, T, D)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, H, T, D)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, H, T, D)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=key_mask, dropout_p=self.dropout if self.training else 0.0
        )  # (B, H, T, D)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C)
        return self.resid_dropout(self.proj(y))  # (B, T, C)


class MLP(nn.Module):
    """Position-wise feed-forward network: C -> d_ff -> C with GELU."""

    def __init__(self, config: CloudConfig) -> None:
        super().__init__()
        self.fc = nn.Linear(config.d_model, config.d_ff)
        self.proj = nn.Linear(config.d_ff, config.d_model)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Args: x ``(B, T, C)``. Returns ``(B, T, C)``."""
        return self.dropout(self.proj(F.gelu(self.fc(x))))  # (B, T, C)


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, config: CloudConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps)
        self.attn = SelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        """Args: x ``(B, T, C)``; key_mask ``(B, 1, 1, T)``. Returns ``(B, T, C)``."""
        x = x + self.attn(self.ln_1(x), key_mask)  # (B, T, C)
        return x + self.mlp(self.ln_2(x))  # (B, T, C)


def embed_tokens(
    tok_emb: nn.Module, pos_emb: nn.Module, drop: nn.Module, ids: torch.Tensor
) -> torch.Tensor:
    """``drop(tok_emb(ids) + pos_emb(0..T-1))``: ``(B, T)`` ids -> ``(B, T, C)``.

    ``tok_emb`` and ``pos_emb`` are the ``(V, C)`` and ``(max_len, C)`` ``nn.Embedding`` s.

    The embedding step of :class:`CloudEncoder`, also run by a fine-tuned member that
    holds its own copy of the embeddings (:class:`cloud_model.trunk.MemberNet`).
    """
    pos = torch.arange(ids.shape[1], device=ids.device)  # (T,)
    return drop(tok_emb(ids) + pos_emb(pos))  # (B, T, C)


def run_blocks(blocks: Iterable[nn.Module], x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Apply ``blocks`` in order, padding keys masked out.

    Args:
        blocks: :class:`Block` modules (a slice of an encoder's, or a member's copies).
        x: ``(B, T, C)`` states; mask: ``(B, T)`` bool, True on real tokens.

    Returns:
        ``(B, T, C)``.

    Raises:
        ConfigError: ``mask`` is not ``(B, T)`` of ``x``.
    """
    if tuple(mask.shape) != tuple(x.shape[:2]):
        raise ConfigError(f"mask shape {tuple(mask.shape)} != states shape {tuple(x.shape[:2])}")
    key_mask = mask.bool()[:, None, None, :]  # (B, 1, 1, T)
    for block in blocks:
        x = block(x, key_mask)  # (B, T, C)
    return x


def pool_states(
    hidden: torch.Tensor, mask: torch.Tensor, pooling: Literal["cls", "mean"]
) -> torch.Tensor:
    """``(B, T, C)`` states -> ``(B, C)``: the first ([CLS]) state or the mean over real tokens."""
    if pooling == "cls":
        return hidden[:, 0]  # (B, C)
    weights = mask.to(hidden.dtype).unsqueeze(-1)  # (B, T, 1)
    return (hidden * weights).sum(1) / weights.sum(1).clamp_min(1.0)  # (B, C)


def token_embedding(config: CloudConfig, element_table: torch.Tensor | None = None) -> nn.Embedding:
    """The ``(V, C)`` token embedding of ``config``: plain, or element-aware with a descriptor table.

    ``element_table`` (``(V, F + 1)``) is only for ``element_features != "none"``; None there
    means zeros, to be filled by loading a checkpoint's weights.

    Raises:
        ConfigError: a table is given for ``element_features="none"``, or has the wrong shape.
    """
    if config.element_features == "none":
        if element_table is not None:
            raise ConfigError("an element descriptor table needs element_features != 'none'")
        return nn.Embedding(config.vocab_size, config.d_model)
    width = table_width(config.element_features)
    if element_table is not None and element_table.shape[-1] != width:
        raise ConfigError(
            f"element_features={config.element_features!r} needs a table of width "
            f"{width}, got {tuple(element_table.shape)}"
        )
    table = width if element_table is None else element_table
    return ElementAwareEmbedding(config.vocab_size, config.d_model, table)


class CloudEncoder(nn.Module):
    """Token + learned position embeddings, ``n_layer`` pre-norm blocks, final LayerNorm.

    Padding never influences real tokens: padded positions are masked out as
    attention keys, so appending pads leaves every real token's state unchanged.
    """

    def __init__(self, config: CloudConfig, element_table: torch.Tensor | None = None) -> None:
        """Args:
        config: the architecture.
        element_table: ``(V, F + 1)`` descriptors of the tokens
            (:func:`cloud_model.element_features.element_table`) when
            ``config.element_features`` is not ``"none"``; None = zeros, to be filled by
            loading a checkpoint's weights.

        Raises:
            ConfigError: a table is given for ``element_features="none"``, or has the wrong shape.
        """
        super().__init__()
        self.config = config
        self.tok_emb = token_embedding(config, element_table)
        self.pos_emb = nn.Embedding(config.max_len, config.d_model)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList([Block(config) for _ in range(config.n_layer)])
        self.ln_f = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps)
        self.apply(self._init_weights)
        # GPT-2: scale the residual projections so the stream's variance does not grow with depth
        for name, param in self.named_parameters():
            if name.endswith("proj.weight") and not name.startswith("tok_emb."):
                nn.init.normal_(param, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))
        if isinstance(self.tok_emb, ElementAwareEmbedding):
            self.tok_emb.init_projection()

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    # ----------------------------------------------------------------- the steps of forward
    # Every cut of the encoder (a frozen trunk below, trainable blocks above, see
    # cloud_model.trunk) is a composition of these steps, so there is one forward pass.

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """Token + position embeddings (with dropout in training mode).

        Args:
            ids: ``(B, T)`` long token ids, ``T <= max_len``.

        Returns:
            ``(B, T, C)`` input of the first block.

        Raises:
            ConfigError: the sequence is longer than ``max_len``.
        """
        T = ids.shape[1]
        if T > self.config.max_len:
            raise ConfigError(f"sequence length {T} exceeds max_len={self.config.max_len}")
        return embed_tokens(self.tok_emb, self.pos_emb, self.drop, ids)  # (B, T, C)

    def run_blocks(
        self, hidden: torch.Tensor, mask: torch.Tensor, start: int = 0, stop: int | None = None
    ) -> torch.Tensor:
        """Blocks ``start .. stop - 1`` (Python slice semantics; default: all of them).

        Args:
            hidden: ``(B, T, C)`` states entering block ``start``.
            mask: ``(B, T)`` bool, True on real tokens.
            start: index of the first block to run.
            stop: one past the last block to run; None = through the top block.

        Returns:
            ``(B, T, C)`` states leaving block ``stop - 1`` (``hidden`` itself if the range is empty).
        """
        return run_blocks(self.blocks[start:stop], hidden, mask)  # (B, T, C)

    def final_norm(self, hidden: torch.Tensor) -> torch.Tensor:
        """The final LayerNorm: ``(B, T, C)`` -> ``(B, T, C)``."""
        return self.ln_f(hidden)  # (B, T, C)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Hidden states of every token: ``final_norm(run_blocks(embed(ids), mask))``.

        Args:
            ids: ``(B, T)`` long token ids, ``T <= max_len``.
            mask: ``(B, T)`` bool, True on real tokens (each row needs at least one).

        Returns:
            ``(B, T, C)`` hidden states after the final LayerNorm.

        Raises:
            ConfigError: the sequence is longer than ``max_len`` or shapes disagree.
        """
        if mask.shape != ids.shape:
            raise ConfigError(f"mask shape {tuple(mask.shape)} != ids shape {tuple(ids.shape)}")
        x = self.embed(ids)  # (B, T, C)
        x = self.run_blocks(x, mask)  # (B, T, C)
        return self.final_norm(x)  # (B, T, C)

    def pool(
        self,
        hidden: torch.Tensor,
        mask: torch.Tensor,
        pooling: Literal["cls", "mean"] | None = None,
    ) -> torch.Tensor:
        """One vector per sequence: the first ([CLS]) state or the mean over real tokens.

        Args:
            hidden: ``(B, T, C)`` from :meth:`forward`.
            mask: ``(B, T)`` bool, True on real tokens.
            pooling: overrides ``config.pooling`` (a fine-tuned member may pool differently).

        Returns:
            ``(B, C)``.
        """
        return pool_states(hidden, mask, pooling or self.config.pooling)  # (B, C)

    def encode(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``pool(forward(ids, mask), mask)``: ``(B, T)`` ids -> ``(B, C)`` embeddings."""
        return self.pool(self.forward(ids, mask), mask)

    def num_parameters(self, *, include_embeddings: bool = True) -> int:
        """Number of parameters (optionally without token and position embeddings)."""
        n = sum(p.numel() for p in self.parameters())
        if not include_embeddings:
            n -= sum(p.numel() for p in self.tok_emb.parameters()) + self.pos_emb.weight.numel()
        return n

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Forward-pass FLOPs per token of the encoder (multiply-add = 2 FLOPs).

        Counts the matmuls (2 x non-embedding weights) plus attention scores and
        weighted sums (2 x 2 x n_layer x T x C); LayerNorm, GELU and softmax are
        ignored. Training costs about 3 x this.

        Args:
            seq_len: tokens per sequence ``T``; defaults to ``max_len``.
        """
        T = self.config.max_len if seq_len is None else seq_len
        matmul_weights = sum(
            p.numel()
            for name, p in self.blocks.named_parameters()
            if name.endswith("weight") and p.dim() == 2
        )
        return 2.0 * matmul_weights + 4.0 * self.config.n_layer * T * self.config.d_model
