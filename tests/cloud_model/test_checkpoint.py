"""Checkpoint I/O: safetensors weights, tied tensors, name/shape checks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from cloud_model.checkpoint import (
    CARD_FILE,
    SHIPPED_CHECKPOINT,
    TOKENIZER_FILE,
    WEIGHTS_FILE,
    DataSummary,
    ModelCard,
    canonical_state,
    default_checkpoint,
    file_sha256,
    load_checkpoint,
    load_encoder,
    load_module_weights,
    resolve_checkpoint,
    save_checkpoint,
    save_module_weights,
)
from cloud_model.errors import CheckpointError
from cloud_model.heads import (
    CloudForMaskedLM,
    CloudForRegression,
    DebyeHeadConfig,
    MaskedLMHeadConfig,
    RegressionHeadConfig,
    build_model,
)
from cloud_model.model import CloudConfig, CloudEncoder
from cloud_model.tokenizer import ScopeTokenizer

VOCAB = 61
# the shipped checkpoint on 15 % masked tokens of 128 cloud_cv test strings (measured: see the test)
MLM_LOSS_BOUND = 2.0
MLM_ACCURACY_BOUND = 0.5


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


# ---------------------------------------------------------------- whole checkpoints


@pytest.fixture(scope="module")
def tokenizer() -> ScopeTokenizer:
    return ScopeTokenizer.default()


def _real_batch(tokenizer: ScopeTokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    strings = [
        "1 6 a O D D a D O D b O O O c O O O d O O O e O O O 0 | 4a 4b | Na 0.5 Cl 0.5",
        "1 2 a D D O c O O O 0 | 4i 2a | Ho 0.33 Ga 0.44 Pt 0.22",
    ]
    batch = tokenizer.batch_encode(strings, max_length=64)
    return batch.ids, batch.mask


def _card() -> ModelCard:
    return ModelCard(
        size="tiny",
        data=DataSummary(datasets={"cloud_cv": 1213}, n_train=1150, n_validation=63),
        hyperparameters={"lr": 1e-3},
        metrics={"validation_mlm_loss": 2.5},
        command="cloudlab pretrain x.yaml --out y",
    )


@pytest.mark.parametrize(
    "head",
    [
        MaskedLMHeadConfig(),
        RegressionHeadConfig(target_names=("cv", "u")),
        DebyeHeadConfig(theta_scale=250.0),
    ],
    ids=["mlm", "regression", "debye"],
)
def test_round_trip_gives_identical_outputs(
    tmp_path: Path,
    tokenizer: ScopeTokenizer,
    head: MaskedLMHeadConfig | RegressionHeadConfig | DebyeHeadConfig,
) -> None:
    torch.manual_seed(0)
    model = build_model(CloudConfig.named("tiny", tokenizer.vocab_size), head).eval()
    if isinstance(model, CloudForRegression):
        model.head.set_target_stats(torch.tensor([[10.0, -1.0], [30.0, 2.0], [50.0, 5.0]]))
    written = save_checkpoint(tmp_path, model, tokenizer, _card())
    loaded, loaded_tokenizer, card = load_checkpoint(tmp_path)
    assert type(loaded) is type(model) and not loaded.training
    assert loaded_tokenizer.tokens == tokenizer.tokens
    assert card == written and card.head == head
    assert card.weights_sha256 == file_sha256(tmp_path / WEIGHTS_FILE)
    assert card.tokenizer is not None and card.tokenizer.vocab_size == tokenizer.vocab_size == 445
    assert card.n_parameters == sum(p.numel() for p in model.parameters())
    assert card.data.datasets == {"cloud_cv": 1213} and card.command.startswith("cloudlab pretrain")
    ids, mask = _real_batch(tokenizer)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids, mask)[0], model(ids, mask)[0], rtol=0, atol=0)
    if isinstance(loaded, CloudForRegression):
        torch.testing.assert_close(loaded.head.target_mean, torch.tensor([30.0, 2.0]))
    encoder, _, _ = load_encoder(tmp_path)
    assert encoder.config == model.encoder.config
    # the card is plain JSON that round-trips
    assert ModelCard.model_validate_json((tmp_path / CARD_FILE).read_text()) == card


def test_corrupt_or_mismatched_checkpoints_raise_checkpoint_error(
    tmp_path: Path, tokenizer: ScopeTokenizer
) -> None:
    torch.manual_seed(0)
    model = build_model(CloudConfig.named("tiny", tokenizer.vocab_size), MaskedLMHeadConfig())
    save_checkpoint(tmp_path, model, tokenizer, _card())
    weights, card_path, vocab = (
        tmp_path / WEIGHTS_FILE,
        tmp_path / CARD_FILE,
        tmp_path / TOKENIZER_FILE,
    )
    good_weights, good_card, good_vocab = (
        weights.read_bytes(),
        card_path.read_text(),
        vocab.read_text(),
    )

    blob = bytearray(good_weights)
    blob[-3] ^= 0xFF  # flip bits inside a tensor
    weights.write_bytes(bytes(blob))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: sha256 .* does not match"):
        load_checkpoint(tmp_path)
    weights.write_bytes(good_weights)

    tokens = json.loads(good_vocab)
    tokens["tokens"][10], tokens["tokens"][11] = tokens["tokens"][11], tokens["tokens"][10]
    vocab.write_text(json.dumps(tokens))
    with pytest.raises(CheckpointError, match=r"tokenizer\.json"):
        load_checkpoint(tmp_path)
    vocab.write_text(good_vocab)

    card = json.loads(good_card)
    card["tokenizer"]["vocab_sha256"] = "0" * 64
    card_path.write_text(json.dumps(card))
    with pytest.raises(
        CheckpointError, match=r"tokenizer\.json: vocabulary .* does not match the card"
    ):
        load_checkpoint(tmp_path)

    card = json.loads(good_card)
    card["config"]["d_model"] = 128  # weights of another architecture
    card["config"]["d_ff"] = 512
    card_path.write_text(json.dumps(card))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: tensor shapes"):
        load_checkpoint(tmp_path)

    card = json.loads(good_card)
    card["surprise"] = 1
    card_path.write_text(json.dumps(card))
    with pytest.raises(CheckpointError, match=r"model_card\.json: invalid model card"):
        load_checkpoint(tmp_path)
    card_path.write_text(good_card)

    for name in (WEIGHTS_FILE, TOKENIZER_FILE, CARD_FILE):
        (tmp_path / name).rename(tmp_path / "aside")
        with pytest.raises(CheckpointError, match=f"{name}.*not found"):
            load_checkpoint(tmp_path)
        (tmp_path / "aside").rename(tmp_path / name)
    load_checkpoint(tmp_path)  # intact again

    with pytest.raises(CheckpointError, match="445 tokens but the model embeds 446"):
        save_checkpoint(tmp_path / "bad", _mlm(0, vocab=446), tokenizer, _card())


def test_shipped_checkpoint_is_the_multitask_one_and_reads_both_kinds_of_string(
    tokenizer: ScopeTokenizer, data_dir: Path
) -> None:
    from cloud_model.composition import composition_scope
    from cloud_model.datasets import load_dataset
    from cloud_model.heads import IGNORE_INDEX
    from cloud_model.mlm import generator, mask_tokens

    path = default_checkpoint()
    assert path.name == SHIPPED_CHECKPOINT and not (path.parent / "cloud-small").exists()
    assert (path / WEIGHTS_FILE).stat().st_size <= 50_000_000
    assert (
        file_sha256(path / WEIGHTS_FILE)
        == json.loads((path / CARD_FILE).read_text())["weights_sha256"]
    )
    model, loaded_tokenizer, card = load_checkpoint(path)
    assert isinstance(model, CloudForMaskedLM) and card.size == "small"
    assert loaded_tokenizer.tokens == tokenizer.tokens  # the default vocabulary is the shipped one
    assert card.command.startswith("cloudlab pretrain configs/pretrain_multitask.yaml")
    assert card.config is not None and card.config.element_features == "magpie"
    assert card.data.n_train is not None and card.data.n_train > 800_000
    guard = card.data.details["leakage_guard"]
    assert {"perov_5:test", "carbon_24:val", "mpts_52:test", "cloud_cv:test"} <= set(
        guard["excluded_pools"]
    )
    assert guard["total_removed"] > 0
    downstream = card.evaluation["downstream"]
    assert set(downstream["tasks"]) >= {"aflow_debye", "cloud_cv", "mpts_52"}  # the suite's cells
    # the benchmark's test strings were kept out of pretraining; fill 15 % of their tokens
    strings = [r.scope for r in load_dataset("cloud_cv", ["test"]).records if r.scope][:128]
    batch = loaded_tokenizer.batch_encode(strings + [composition_scope("LiFePO4")])
    assert loaded_tokenizer.count_unknown(composition_scope("LiFePO4")) == 0
    special = torch.arange(5)  # [PAD] [UNK] [CLS] [SEP] [MASK]
    inputs, labels = mask_tokens(
        batch.ids, batch.mask, special_ids=special, mask_id=loaded_tokenizer.mask_id,
        replacement_ids=torch.arange(5, loaded_tokenizer.vocab_size), rng=generator(0, "shipped"),
    )  # fmt: skip
    with torch.no_grad():
        logits, loss = model(inputs, batch.mask, labels)
    picked = labels != IGNORE_INDEX
    accuracy = float((logits.argmax(-1)[picked] == labels[picked]).float().mean())
    assert loss is not None and float(loss) < MLM_LOSS_BOUND  # untrained: ln(445) = 6.1 nats
    assert accuracy > MLM_ACCURACY_BOUND


def test_checkpoint_settings_resolve_to_a_directory_or_none(tmp_path: Path) -> None:
    assert resolve_checkpoint(None) is None  # no pretraining
    assert resolve_checkpoint("default") == default_checkpoint()  # the shipped checkpoint
    assert resolve_checkpoint(str(tmp_path)) == tmp_path
    assert resolve_checkpoint(tmp_path) == tmp_path
    missing = tmp_path / "no-such-run"
    with pytest.raises(CheckpointError, match="'.*no-such-run'.* does not exist.*'default'"):
        resolve_checkpoint(str(missing))
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(CheckpointError, match="is not a directory"):
        resolve_checkpoint(tmp_path / "file.txt")
