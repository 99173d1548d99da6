"""Checkpoints: safetensors weights + a JSON model card + the tokenizer, nothing pickled.

A checkpoint directory holds three files::

    model.safetensors   the weights of a CloudFor* model (tied tensors stored once)
    model_card.json     ModelCard: architecture, head, tokenizer fingerprint, data,
                        hyperparameters, metrics, reproduce command, sha256 of the weights
    tokenizer.json      the tokenizer (ScopeTokenizer.save)

:func:`load_checkpoint` rebuilds the model from the card, verifies the weights'
sha256 and the tokenizer's vocabulary fingerprint, and checks every tensor name
and shape; any problem raises :class:`~cloud_model.errors.CheckpointError`
naming the file.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from cloud_model.errors import CheckpointError, TokenizerError
from cloud_model.heads import CloudModel, HeadConfig, build_model
from cloud_model.model import CloudConfig, CloudEncoder

if TYPE_CHECKING:
    from cloud_model.tokenizer import ScopeTokenizer

logger = logging.getLogger(__name__)

WEIGHTS_FILE = "model.safetensors"
CARD_FILE = "model_card.json"
TOKENIZER_FILE = "tokenizer.json"
CARD_FORMAT_VERSION = 1


class TokenizerInfo(BaseModel):
    """Which vocabulary the weights were trained with."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    version: str
    vocab_size: int
    vocab_sha256: str


class DataSummary(BaseModel):
    """What the model was trained on."""

    model_config = ConfigDict(extra="forbid")
    # dataset name -> number of rows (or strings) used
    datasets: dict[str, int] = Field(default_factory=dict)
    n_train: int | None = None
    n_validation: int | None = None
    # anything else worth recording: SCOPE variant, symprec, excluded splits, target units...
    details: dict[str, Any] = Field(default_factory=dict)


class ModelCard(BaseModel):
    """Everything needed to rebuild, trust and reproduce a checkpoint.

    ``config``, ``head``, ``tokenizer``, ``n_parameters`` and ``weights_sha256``
    are filled in by :func:`save_checkpoint` from the model and tokenizer it is given.
    """

    model_config = ConfigDict(extra="forbid")
    format_version: int = CARD_FORMAT_VERSION
    name: str = "cloud"
    size: str = "custom"  # tiny / small / base / custom
    config: CloudConfig | None = None
    head: HeadConfig | None = None
    tokenizer: TokenizerInfo | None = None
    data: DataSummary = Field(default_factory=DataSummary)
    hyperparameters: dict[str, Any] = Field(default_factory=dict)
    metrics: dict[str, float] = Field(default_factory=dict)
    # held-out evaluations made after training (e.g. the downstream suite's summary, with the
    # command and the results file that reproduce it); not read by any loader
    evaluation: dict[str, Any] = Field(default_factory=dict)
    command: str = ""  # the shell command that reproduces this checkpoint
    created_at: datetime = Field(default_factory=lambda: datetime.now(UTC))
    n_parameters: int | None = None
    weights_sha256: str = ""


SHIPPED_CHECKPOINT = "cloud-small-multitask"  # cloud_model/checkpoints/<this>


def default_checkpoint() -> Path:
    """Directory of the shipped pretrained checkpoint (``cloud_model/checkpoints/cloud-small-multitask``).

    A ``small`` encoder (4 x 256) with magpie element descriptors, pretrained on every
    label outside the benchmark pools (multi-task + MLM, ``configs/pretrain_multitask.yaml``);
    its model card lists the data, the exclusions, the losses and the downstream numbers.

    Raises:
        CheckpointError: the package was installed without its checkpoint files.
    """
    path = Path(__file__).resolve().parent / "checkpoints" / SHIPPED_CHECKPOINT
    if not (path / WEIGHTS_FILE).is_file():
        raise CheckpointError(f"the shipped checkpoint is missing: {path / WEIGHTS_FILE} not found")
    return path


DEFAULT_CHECKPOINT = "default"  # the setting that names the shipped checkpoint


def resolve_checkpoint(value: str | Path | None) -> Path | None:
    """The directory a checkpoint setting (config field or command-line option) names.

    Args:
        value: ``"default"`` for the shipped checkpoint
            (:func:`default_checkpoint`), None for no pretraining (a randomly
            initialised encoder), or the path of a checkpoint directory.

    Returns:
        The checkpoint directory, or None.

    Raises:
        CheckpointError: the path does not exist or is not a directory, or the shipped
            checkpoint is missing; the message names ``value``.
    """
    if value is None:
        return None
    if isinstance(value, str) and value == DEFAULT_CHECKPOINT:
        return default_checkpoint()
    path = Path(value)
    if not path.is_dir():
        what = "is not a directory" if path.exists() else "does not exist"
        raise CheckpointError(
            f"checkpoint {str(value)!r}: {path} {what}; give a checkpoint directory, "
            f"{DEFAULT_CHECKPOINT!r} for the shipped {SHIPPED_CHECKPOINT}, or null/none for no pretraining"
        )
    return path


def vocab_sha256(tokenizer: ScopeTokenizer) -> str:
    """sha256 of the tokenizer's tokens in id order (one per line)."""
    return hashlib.sha256("\n".join(tokenizer.tokens).encode("utf-8")).hexdigest()


def tokenizer_info(tokenizer: ScopeTokenizer) -> TokenizerInfo:
    """Version, size and sha256 fingerprint of a tokenizer's vocabulary."""
    return TokenizerInfo(
        version=str(tokenizer.version),
        vocab_size=int(tokenizer.vocab_size),
        vocab_sha256=vocab_sha256(tokenizer),
    )


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _storage_key(tensor: torch.Tensor) -> tuple[int, int, tuple[int, ...], tuple[int, ...]]:
    return (
        tensor.untyped_storage().data_ptr(),
        int(tensor.storage_offset()),
        tuple(tensor.shape),
        tuple(tensor.stride()),
    )


def canonical_state(module: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The module's state with tied tensors kept once.

    Returns:
        ``(tensors, aliases)``: name -> tensor for the first name of each storage,
        and alias name -> canonical name for the others (e.g. the MLM decoder weight
        -> the token embedding).
    """
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple[int, int, tuple[int, ...], tuple[int, ...]], str] = {}
    for name, tensor in module.state_dict().items():
        key = _storage_key(tensor)
        if key in seen:
            aliases[name] = seen[key]
        else:
            seen[key] = name
            tensors[name] = tensor
    return tensors, aliases


def save_module_weights(path: Path, module: nn.Module) -> None:
    """Write a module's state (tied tensors once) to a safetensors file, atomically."""
    tensors, _ = canonical_state(module)
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp))
    os.replace(tmp, path)


def load_module_weights(path: Path, module: nn.Module) -> None:
    """Load a safetensors file written by :func:`save_module_weights` into ``module``.

    Raises:
        CheckpointError: the file is missing or unreadable, or its tensor names or
            shapes differ from the module's.
    """
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found")
    try:
        loaded = load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from exc
    expected, aliases = canonical_state(module)
    missing = sorted(set(expected) - set(loaded))
    unexpected = sorted(set(loaded) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{path}: tensor names do not match the model "
            f"(missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''})"
        )
    wrong = [
        f"{name}: file {tuple(loaded[name].shape)} vs model {tuple(t.shape)}"
        for name, t in expected.items()
        if loaded[name].shape != t.shape
    ]
    if wrong:
        raise CheckpointError(
            f"{path}: tensor shapes do not match the model ({'; '.join(wrong[:5])})"
        )
    state = dict(loaded)
    state.update({alias: loaded[canonical] for alias, canonical in aliases.items()})
    module.load_state_dict(state, strict=True)


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def save_checkpoint(
    directory: str | Path, model: CloudModel, tokenizer: ScopeTokenizer, card: ModelCard
) -> ModelCard:
    """Write weights, tokenizer and model card to ``directory`` (created if needed).

    Args:
        directory: target directory; existing checkpoint files in it are replaced.
        model: a ``CloudFor*`` model (see :func:`cloud_model.heads.build_model`).
        tokenizer: the tokenizer its ids come from.
        card: the descriptive part (data, hyperparameters, metrics, command, size).

    Returns:
        The card as written, with config, head, tokenizer info, parameter count and
        weights sha256 filled in.

    Raises:
        CheckpointError: the tokenizer's vocabulary size differs from the model's.
    """
    directory = Path(directory)
    config = model.encoder.config
    info = tokenizer_info(tokenizer)
    if info.vocab_size != config.vocab_size:
        raise CheckpointError(
            f"tokenizer has {info.vocab_size} tokens but the model embeds {config.vocab_size}"
        )
    directory.mkdir(parents=True, exist_ok=True)
    weights = directory / WEIGHTS_FILE
    save_module_weights(weights, model)
    tmp_tokenizer = directory / (TOKENIZER_FILE + ".tmp")
    tokenizer.save(tmp_tokenizer)
    os.replace(tmp_tokenizer, directory / TOKENIZER_FILE)
    full = card.model_copy(
        update={
            "config": config,
            "head": model.head_config,
            "tokenizer": info,
            "n_parameters": sum(p.numel() for p in model.parameters()),
            "weights_sha256": file_sha256(weights),
        }
    )
    _write_text_atomic(directory / CARD_FILE, full.model_dump_json(indent=2) + "\n")
    logger.info("saved checkpoint %s (%d parameters)", directory, full.n_parameters)
    return full


def read_model_card(directory: str | Path) -> ModelCard:
    """Parse and validate ``directory/model_card.json``.

    Raises:
        CheckpointError: missing file, invalid JSON or an incomplete card.
    """
    path = Path(directory) / CARD_FILE
    if not path.is_file():
        raise CheckpointError(
            f"{path}: model card not found (is {directory} a checkpoint directory?)"
        )
    try:
        card = ModelCard.model_validate(json.loads(path.read_text(encoding="utf-8")))
    except (json.JSONDecodeError, ValidationError) as exc:
        raise CheckpointError(f"{path}: invalid model card ({exc})") from exc
    if card.format_version != CARD_FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: card format {card.format_version} is not the supported {CARD_FORMAT_VERSION}"
        )
    if (
        card.config is None
        or card.head is None
        or card.tokenizer is None
        or not card.weights_sha256
    ):
        raise CheckpointError(f"{path}: card lacks config, head, tokenizer or weights_sha256")
    return card


def _card_parts(card: ModelCard, path: Path) -> tuple[CloudConfig, HeadConfig, TokenizerInfo]:
    if card.config is None or card.head is None or card.tokenizer is None:
        raise CheckpointError(f"{path}: card lacks config, head or tokenizer")
    return card.config, card.head, card.tokenizer


def load_checkpoint(
    directory: str | Path, *, device: str | torch.device = "cpu"
) -> tuple[CloudModel, ScopeTokenizer, ModelCard]:
    """Rebuild a model, its tokenizer and card from a checkpoint directory (no pickle).

    Args:
        directory: written by :func:`save_checkpoint`.
        device: where to put the model.

    Returns:
        ``(model, tokenizer, card)``; the model is in eval mode.

    Raises:
        CheckpointError: a file is missing, the weights' sha256 or the tokenizer's
            vocabulary differs from the card, or tensor names/shapes do not fit.
    """
    from cloud_model.tokenizer import ScopeTokenizer

    directory = Path(directory)
    card = read_model_card(directory)
    config, head, card_tokenizer = _card_parts(card, directory / CARD_FILE)
    weights = directory / WEIGHTS_FILE
    if not weights.is_file():
        raise CheckpointError(f"{weights}: weights file not found")
    digest = file_sha256(weights)
    if digest != card.weights_sha256:
        raise CheckpointError(
            f"{weights}: sha256 {digest[:12]}... does not match the card's "
            f"{card.weights_sha256[:12]}... (corrupt or replaced weights)"
        )
    tokenizer_path = directory / TOKENIZER_FILE
    if not tokenizer_path.is_file():
        raise CheckpointError(f"{tokenizer_path}: tokenizer file not found")
    try:
        tokenizer = ScopeTokenizer.load(tokenizer_path)
    except TokenizerError as exc:
        raise CheckpointError(f"{tokenizer_path}: {exc}") from exc
    info = tokenizer_info(tokenizer)
    if (
        info.vocab_sha256 != card_tokenizer.vocab_sha256
        or info.vocab_size != card_tokenizer.vocab_size
    ):
        raise CheckpointError(
            f"{tokenizer_path}: vocabulary ({info.vocab_size} tokens, {info.vocab_sha256[:12]}...) "
            f"does not match the card ({card_tokenizer.vocab_size} tokens, "
            f"{card_tokenizer.vocab_sha256[:12]}...)"
        )
    model = build_model(config, head)
    load_module_weights(weights, model)
    model.to(device).eval()
    return model, tokenizer, card


def load_encoder(
    directory: str | Path, *, device: str | torch.device = "cpu"
) -> tuple[CloudEncoder, ScopeTokenizer, ModelCard]:
    """The encoder of a checkpoint (any head), e.g. to start fine-tuning from it."""
    model, tokenizer, card = load_checkpoint(directory, device=device)
    return model.encoder, tokenizer, card
