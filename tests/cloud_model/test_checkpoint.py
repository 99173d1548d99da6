"""Checkpoint I/O: safetensors weights, tied tensors, name/shape checks."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cloud_model.checkpoint import canonical_state, load_module_weights, save_module_weights
from cloud_model.errors import CheckpointError
from cloud_model.heads import CloudForMaskedLM, CloudForRegression, RegressionHeadConfig
from cloud_model.model import CloudConfig, CloudEncoder

VOCAB = 61


def _mlm(seed: int, vocab: int = VOCAB) -> CloudForMaskedLM:
    torch.manual_seed(seed)
    return CloudForMaskedLM(CloudEncoder(CloudConfig.named("tiny", vocab))).eval()


def test_tied_weights_are_stored_once_and_restored_tied(tmp_path: Path) -> None:
    model = _mlm(0)
    tensors, aliases = canonical_state(model)
    assert aliases == {"head.decoder.weight": "encoder.tok_emb.weight"}
    path = tmp_path / "w.safetensors"
    save_module_weights(path, model)
    other = _mlm(1)
    load_module_weights(path, other)
    assert other.head.decoder.weight is other.encoder.tok_emb.weight
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(other.state_dict()[name], tensor, rtol=0, atol=0)
    assert len(tensors) == len(model.state_dict()) - 1


def test_weight_file_problems_name_the_file(tmp_path: Path) -> None:
    path = tmp_path / "w.safetensors"
    with pytest.raises(CheckpointError, match="not found"):
        load_module_weights(path, _mlm(0))
    save_module_weights(path, _mlm(0))
    with pytest.raises(CheckpointError, match=r"w\.safetensors.*shapes"):
        load_module_weights(path, _mlm(0, vocab=VOCAB + 1))
    head = RegressionHeadConfig(target_names=("y",))
    with pytest.raises(CheckpointError, match=r"w\.safetensors.*names.*missing"):
        load_module_weights(path, CloudForRegression(_mlm(0).encoder, head))
    path.write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="not a readable safetensors"):
        load_module_weights(path, _mlm(0))
