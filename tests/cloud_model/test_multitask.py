"""Multi-task pretraining and element-aware embeddings, on real SCOPE strings and labels."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import pytest
import torch

from cloud_model.checkpoint import CARD_FILE, load_encoder, save_checkpoint
from cloud_model.datasets import load_dataset
from cloud_model.element_features import (
    DESCRIPTOR_DIMS,
    ElementAwareEmbedding,
    element_descriptors,
    element_table,
)
from cloud_model.errors import CheckpointError, ConfigError
from cloud_model.heads import CloudForMaskedLM
from cloud_model.labelled_data import DataSource, load_labelled
from cloud_model.model import CloudConfig, CloudEncoder
from cloud_model.multitask import (
    MultitaskCallback,
    load_multitask,
    pretrain_multitask,
    sample_rows,
    task_probabilities,
)
from cloud_model.multitask_data import GuardReport, MultiTaskCorpus, TaskData
from cloud_model.pretrain import StepProgress
from cloud_model.pretrain_config import PretrainConfig
from cloud_model.tokenizer import ScopeTokenizer

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tokenizer() -> ScopeTokenizer:
    return ScopeTokenizer.default()


def _split(
    rows: list[tuple[str, float]],
) -> tuple[list[tuple[str, float]], list[tuple[str, float]]]:
    """A fixed 80/20 split by sha256 of the string."""
    val = [r for r in rows if hashlib.sha256(r[0].encode()).digest()[0] < 52]
    return [r for r in rows if r not in val], val


@pytest.fixture(scope="module")
def corpus(data_dir: Path) -> MultiTaskCorpus:
    """Two real tasks: CLOUD Cv(300 K) of 300 crystals and AFLOW Debye temperatures of 120."""
    cv = load_labelled(DataSource(dataset="cloud_cv", splits=("train_and_val",), targets=("cv",)))
    ids = [r.id for r in load_dataset("aflow_debye_temperature", ["train"]).records[:120]]
    theta = load_labelled(
        DataSource(dataset="aflow_debye_temperature", splits=("train",),
                   targets=("debye_temperature",)),
        only_ids=ids,
    )  # fmt: skip
    tasks = []
    for name, data, n in (
        ("cloud_cv:cv", cv, 300),
        ("aflow_debye_temperature:debye_temperature", theta, 120),
    ):
        rows = [(s, float(y)) for s, y in zip(data.scopes[:n], data.y[:n, 0].tolist(), strict=True)]
        train, val = _split(rows)
        tasks.append(TaskData(name=name, unit=next(iter(data.units.values())), train=train,
                              validation=val))  # fmt: skip
    strings = sorted({s for t in tasks for s, _ in t.train + t.validation})
    mlm_val = [s for s in strings if hashlib.sha256(s.encode()).digest()[0] < 13]
    guard = GuardReport(pools=["cloud_cv:test"], removed={"cloud_cv": {"formula": 3}},
                        kept={"cloud_cv": 300})  # fmt: skip
    return MultiTaskCorpus(
        tasks=tasks, mlm_train=[s for s in strings if s not in mlm_val], mlm_validation=mlm_val,
        guard=guard,
    )  # fmt: skip


def _config(**train: object) -> PretrainConfig:
    options: dict[str, object] = {
        "batch_size": 16, "max_steps": 12, "warmup_steps": 2, "learning_rate": 3e-3,
        "eval_every": 6, "checkpoint_every": 4, "eval_batch_size": 64, "num_threads": 1,
        "device": "cpu",
    }  # fmt: skip
    options.update(train)
    return PretrainConfig.model_validate(
        {
            "objective": "multitask",
            "model": {"size": "tiny", "dropout": 0.0},
            "train": options,
            "multitask": {"mlm_batch_size": 8, "mlm_weight": 0.5, "task_temperature": 2.0},
        }
    )


# ----------------------------------------------------------------- sampling


def test_task_probabilities_follow_the_temperature() -> None:
    counts = [1000, 100, 10]
    assert task_probabilities(counts, 1.0) == pytest.approx([1000 / 1110, 100 / 1110, 10 / 1110])
    assert task_probabilities(counts, math.inf) == pytest.approx([1 / 3] * 3)
    p2 = task_probabilities(counts, 2.0)
    root = [math.sqrt(n) for n in counts]
    assert p2 == pytest.approx([r / sum(root) for r in root])
    with pytest.raises(ConfigError, match="training rows"):
        task_probabilities([5, 0], 1.0)


def test_sampled_task_frequencies_match_p() -> None:
    counts = [1000, 100, 10]
    p = torch.tensor(task_probabilities(counts, 2.0))
    tasks, rows = zip(
        *(sample_rows(s, p, torch.tensor(counts), batch_size=64, seed=3) for s in range(300)),
        strict=True,
    )
    task, row = torch.cat(tasks), torch.cat(rows)  # 19,200 draws
    n = len(task)
    freq = torch.bincount(task, minlength=3).double() / n
    sigma = (p.double() * (1 - p.double()) / n).sqrt()
    assert bool(((freq - p.double()).abs() < 4 * sigma).all()), (freq, p)
    for k, c in enumerate(counts):  # rows stay inside their task, and cover it
        assert int(row[task == k].max()) < c and int(row[task == k].min()) == 0
    again = sample_rows(7, p, torch.tensor(counts), batch_size=64, seed=3)
    assert torch.equal(again[0], tasks[7]) and torch.equal(again[1], rows[7])


# ----------------------------------------------------------------- training


def test_loss_decreases_and_checkpoint_loads(
    corpus: MultiTaskCorpus, tokenizer: ScopeTokenizer, tmp_path: Path
) -> None:
    config = _config(max_steps=120, eval_every=60, checkpoint_every=60, warmup_steps=5,
                     batch_size=32)  # fmt: skip
    result = pretrain_multitask(config, tmp_path, corpus=corpus, tokenizer=tokenizer,
                                command="test")  # fmt: skip
    first, last = result.task_losses[:20], result.task_losses[-20:]
    assert sum(last) < 0.85 * sum(first), (first, last)  # z-scored L1: ~0.84 -> ~0.60
    assert sum(result.mlm_losses[-20:]) < sum(result.mlm_losses[:20])
    assert [v["step"] for v in result.validation] == [60, 120]
    tasks = result.validation[-1]["tasks"]
    assert set(tasks) == {t.name for t in corpus.tasks}
    for name, m in tasks.items():  # better than predicting the mean of the validation rows
        assert 0 < m["mae_over_mad"] < 1.0, (name, m)
    early, late = result.validation[0]["score"], result.validation[-1]["score"]
    assert late < early, (early, late)  # mean validation MAE/MAD over the tasks went down
    # the trunk loads like any pretrained checkpoint; the card lists data, guard, metrics
    encoder, _, card = load_encoder(tmp_path)
    assert isinstance(encoder, CloudEncoder) and card.head is not None
    assert card.head.kind == "masked_lm"
    assert card.data.datasets["cloud_cv:cv"] == 300
    guard = card.data.details["leakage_guard"]
    assert guard["excluded_pools"] == ["cloud_cv:test"] and guard["total_removed"] == 3
    assert card.metrics["steps"] == 120.0
    assert card.metrics["validation_mae/cloud_cv:cv"] == pytest.approx(tasks["cloud_cv:cv"]["mae"])
    assert (tmp_path / "best" / "model.safetensors").is_file()
    assert json.loads((tmp_path / "multitask_result.json").read_text())["steps"] == 120


def test_z_scores_round_trip_through_the_checkpoint(
    corpus: MultiTaskCorpus, tokenizer: ScopeTokenizer, tmp_path: Path
) -> None:
    pretrain_multitask(_config(max_steps=6, eval_every=6), tmp_path, corpus=corpus,
                       tokenizer=tokenizer)  # fmt: skip
    model, _, _, infos = load_multitask(tmp_path)
    for k, (task, info) in enumerate(zip(corpus.tasks, infos, strict=True)):
        values = torch.tensor([v for _, v in task.train], dtype=torch.float64)
        assert info.name == task.name and info.n_train == len(task.train)
        assert info.mean == pytest.approx(float(values.mean()), rel=1e-6)
        assert info.std == pytest.approx(float(values.std()), rel=1e-5)
        head = model.head(k)
        y = values[:20].float().unsqueeze(1)
        z = head.standardise(y)
        assert float(z.abs().max()) < 10  # z-scores, not raw units
        torch.testing.assert_close(head.destandardise(z), y, rtol=1e-6, atol=1e-4)
    # the reloaded heads give the prediction the metrics were computed with
    strings = [s for s, _ in corpus.tasks[0].validation[:8]]
    batch = tokenizer.batch_encode(strings, max_length=64)
    z = model.task_outputs(model.encoder.encode(batch.ids, batch.mask), torch.zeros(8).long())
    again, _, _, _ = load_multitask(tmp_path)
    z2 = again.task_outputs(again.encoder.encode(batch.ids, batch.mask), torch.zeros(8).long())
    torch.testing.assert_close(z, z2, rtol=0, atol=0)


class _Stop(Exception):
    pass


class _StopAt(MultitaskCallback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_step(self, progress: StepProgress, task_loss: float, mlm_loss: float) -> None:
        if progress.step == self.step:
            raise _Stop


def test_resume_after_a_stop_repeats_the_uninterrupted_run(
    corpus: MultiTaskCorpus, tokenizer: ScopeTokenizer, tmp_path: Path
) -> None:
    """Decision: bit-identical (same device, one thread): every draw is seeded by the step."""
    config = _config()
    full = pretrain_multitask(config, tmp_path / "full", corpus=corpus, tokenizer=tokenizer)
    with pytest.raises(_Stop):  # killed after step 9; the last training state is step 8
        pretrain_multitask(config, tmp_path / "cut", corpus=corpus, tokenizer=tokenizer,
                           callback=_StopAt(9))  # fmt: skip
    with pytest.raises(ConfigError, match="--resume"):
        pretrain_multitask(config, tmp_path / "cut", corpus=corpus, tokenizer=tokenizer)
    resumed = pretrain_multitask(config, tmp_path / "cut", corpus=corpus, tokenizer=tokenizer,
                                 resume=True)  # fmt: skip
    assert resumed.start_step == 8 and resumed.steps == 4
    assert resumed.losses == full.losses[8:]
    assert resumed.validation[-1] == full.validation[-1]
    smaller = MultiTaskCorpus(
        tasks=corpus.tasks[:1], mlm_train=corpus.mlm_train, mlm_validation=[], guard=corpus.guard
    )
    with pytest.raises(CheckpointError, match="different corpus"):
        pretrain_multitask(config, tmp_path / "cut", corpus=smaller, tokenizer=tokenizer,
                           resume=True)  # fmt: skip
    a, _, _, _ = load_multitask(tmp_path / "full")
    b, _, _, _ = load_multitask(tmp_path / "cut")
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(x, y), name


# ----------------------------------------------------------------- element features


def test_element_table_is_standardised_and_flags_missing(tokenizer: ScopeTokenizer) -> None:
    table = element_table(tokenizer, "magpie")
    width = DESCRIPTOR_DIMS["magpie"]
    assert table.shape == (tokenizer.vocab_size, width + 1)
    raw = element_descriptors("magpie")
    covered = [
        i for i, k in enumerate(tokenizer.kinds) if k == "element" and tokenizer.tokens[i] in raw
    ]
    assert len(covered) >= 90
    torch.testing.assert_close(
        table[covered, :width].mean(0), torch.zeros(width), atol=1e-5, rtol=0
    )
    x = tokenizer.token_to_id("X")  # the placeholder element has no descriptor
    assert float(table[x, width]) == 1.0 and float(table[x, :width].abs().sum()) == 0.0
    na = tokenizer.token_to_id("Na")
    assert float(table[na, width]) == 0.0 and float(table[na, :width].abs().sum()) > 0
    assert float(table[tokenizer.token_to_id("4a")].abs().sum()) == 0.0  # not an element
    # electronegativity column: F above Cs after standardisation, as in the raw table
    column = 7  # magpie.csv: Number, MendeleevNumber, AtomicWeight, MeltingT, Column, Row, CovalentRadius, Electronegativity
    assert table[tokenizer.token_to_id("F"), column] > table[tokenizer.token_to_id("Cs"), column]


def test_element_embedding_depends_on_the_descriptor(tokenizer: ScopeTokenizer) -> None:
    config = CloudConfig.named("tiny", tokenizer.vocab_size, element_features="magpie")
    torch.manual_seed(0)
    encoder = CloudEncoder(config, element_table(tokenizer, "magpie"))
    assert isinstance(encoder.tok_emb, ElementAwareEmbedding)
    na, cl = tokenizer.token_to_id("Na"), tokenizer.token_to_id("Cl")
    ids = torch.tensor([[na, cl, tokenizer.token_to_id("4a")]])
    before = encoder.tok_emb(ids).detach().clone()
    with torch.no_grad():
        encoder.tok_emb.descriptors[na] = encoder.tok_emb.descriptors[tokenizer.token_to_id("K")]
    after = encoder.tok_emb(ids).detach()
    assert not torch.allclose(after[0, 0], before[0, 0])  # Na's vector moved with its descriptor
    torch.testing.assert_close(after[0, 1:], before[0, 1:], rtol=0, atol=0)
    # the learned part alone is what the MLM decoder is tied to
    model = CloudForMaskedLM(encoder)
    assert model.head.decoder.weight is encoder.tok_emb.weight


def test_element_aware_checkpoint_round_trips_and_old_checkpoint_loads(
    tokenizer: ScopeTokenizer, tmp_path: Path
) -> None:
    config = CloudConfig.named("tiny", tokenizer.vocab_size, element_features="oliynyk")
    encoder = CloudEncoder(config, element_table(tokenizer, "oliynyk"))
    save_checkpoint(tmp_path, CloudForMaskedLM(encoder), tokenizer, _card())
    loaded, _, card = load_encoder(tmp_path)
    assert card.config is not None and card.config.element_features == "oliynyk"
    batch = tokenizer.batch_encode(["1 3 a O D D b O O O c O O O 0 | 1a | Na 0.5 Cl 0.5"], 64)
    encoder.eval()
    torch.testing.assert_close(loaded.encode(batch.ids, batch.mask),
                               encoder.encode(batch.ids, batch.mask), rtol=0, atol=0)  # fmt: skip
    # a card written before the option existed (no element_features key) loads as "none"
    plain = CloudEncoder(CloudConfig.named("tiny", tokenizer.vocab_size))
    save_checkpoint(tmp_path / "old", CloudForMaskedLM(plain), tokenizer, _card())
    card_file = tmp_path / "old" / CARD_FILE
    written = json.loads(card_file.read_text())
    del written["config"]["element_features"]
    card_file.write_text(json.dumps(written))
    old, _, old_card = load_encoder(tmp_path / "old")
    assert old_card.config is not None and old_card.config.element_features == "none"
    assert type(old.tok_emb) is torch.nn.Embedding


def _card():  # type: ignore[no-untyped-def]
    from cloud_model.checkpoint import ModelCard

    return ModelCard(name="element-test", size="tiny")


def test_multitask_with_element_features_trains(
    corpus: MultiTaskCorpus, tokenizer: ScopeTokenizer, tmp_path: Path
) -> None:
    config = _config(max_steps=4, eval_every=4)
    config = config.model_copy(
        update={"model": config.model.model_copy(update={"element_features": "magpie"})}
    )
    pretrain_multitask(config, tmp_path, corpus=corpus, tokenizer=tokenizer)
    encoder, _, card = load_encoder(tmp_path)
    assert isinstance(encoder.tok_emb, ElementAwareEmbedding)
    torch.testing.assert_close(encoder.tok_emb.descriptors, element_table(tokenizer, "magpie"))


# ----------------------------------------------------------------- configuration


def test_shipped_multitask_config_loads() -> None:
    config = PretrainConfig.from_yaml(REPO / "configs" / "pretrain_multitask.yaml")
    assert config.objective == "multitask" and config.model.size == "small"
    assert config.multitask.mlm_weight > 0


def test_bad_multitask_config_names_the_field(tmp_path: Path) -> None:
    path = tmp_path / "m.yaml"
    cases = {
        "objective: multitask\nmultitask: {task_temperature: 0}\n": r"multitask\.task_temperature",
        "objective: multitask\nmultitask: {mlm_wieght: 1}\n": r"multitask\.mlm_wieght",
        "objective: multitask\nmultitask: {tasks: [cloud_cv]}\n": r"multitask: .*<dataset>:<target>",
        "model: {element_features: bogus}\n": r"model\.element_features",
        "objective: mlm\nmultitask_data: {datasets: [x]}\n": "multitask_data",
        "objective: supervised\n": "objective",
    }
    for text, pattern in cases.items():
        path.write_text(text)
        with pytest.raises(ConfigError, match=pattern):
            PretrainConfig.from_yaml(path)


def test_unknown_task_and_mlm_fingerprint_unchanged(
    corpus: MultiTaskCorpus, tokenizer: ScopeTokenizer, tmp_path: Path
) -> None:
    config = _config()
    config = config.model_copy(
        update={"multitask": config.multitask.model_copy(update={"tasks": ["nope:x"]})}
    )
    with pytest.raises(ConfigError, match=r"multitask\.tasks: \['nope:x'\] not in the corpus"):
        pretrain_multitask(config, tmp_path, corpus=corpus, tokenizer=tokenizer)
    # an MLM config's fingerprint does not see the options added for multi-task runs
    mlm = PretrainConfig.model_validate({"model": {"size": "tiny"}})
    data = mlm.model_dump(mode="json")
    assert "element_features" in data["model"] and "objective" in data
    other = mlm.model_copy(
        update={"multitask": mlm.multitask.model_copy(update={"mlm_weight": 2.0})}
    )
    assert other.fingerprint() == mlm.fingerprint()


def test_fresh_ids_member_of_an_element_aware_encoder_loads_its_weights() -> None:
    """A member rebuilt without an encoder (as on load) has the element-aware embedding."""
    from cloud_model.element_features import ElementAwareEmbedding
    from cloud_model.finetune import MemberNet
    from cloud_model.heads import regression_head_config
    from cloud_model.trunk import MemberSpec

    tok = ScopeTokenizer.default()
    cfg = CloudConfig.named("tiny", tok.vocab_size, element_features="magpie")
    encoder = CloudEncoder(cfg, element_table(tok, "magpie"))
    spec = MemberSpec(
        encoder=cfg, kind="ids", n_trainable_blocks=1, pooling="cls",
        head=regression_head_config(["y"]),
    )  # fmt: skip
    trained = MemberNet(spec, encoder)
    fresh = MemberNet(spec)
    assert fresh.embed is not None and isinstance(fresh.embed["tok"], ElementAwareEmbedding)
    fresh.load_state_dict(trained.state_dict())  # same tensor names: loads
    assert trained.embed is not None
    fresh_w, trained_w = fresh.embed["tok"].weight, trained.embed["tok"].weight
    assert isinstance(fresh_w, torch.Tensor) and isinstance(trained_w, torch.Tensor)
    assert torch.equal(fresh_w, trained_w)
