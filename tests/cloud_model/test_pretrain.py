"""MLM pretraining: masking statistics, schedule, batch order, real short runs, resume, configs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from cloud_model.checkpoint import load_checkpoint
from cloud_model.datasets import load_dataset
from cloud_model.errors import CheckpointError, ConfigError
from cloud_model.heads import IGNORE_INDEX
from cloud_model.mlm import batch_indices, generator, lr_factor, mask_tokens
from cloud_model.pretrain import (
    Corpus,
    PretrainCallback,
    PretrainConfig,
    StepProgress,
    pretrain,
)
from cloud_model.pretrain_corpus import build_corpus, in_validation, split_strings
from cloud_model.ray_work import pretrain_with_ray
from cloud_model.tokenizer import ScopeTokenizer

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tokenizer() -> ScopeTokenizer:
    return ScopeTokenizer.default()


@pytest.fixture(scope="module")
def scope_strings(data_dir: Path) -> list[str]:
    """Real CLOUD-format SCOPE strings (10,000 OPTIMADE crystals)."""
    return [r.scope for r in load_dataset("cloud_pretrain_10k").records if r.scope]


def _tiny_config(**train: object) -> PretrainConfig:
    options: dict[str, object] = {
        "batch_size": 16, "max_steps": 8, "warmup_steps": 2, "learning_rate": 3e-3,
        "eval_every": 4, "checkpoint_every": 4, "eval_batch_size": 64, "num_threads": 1,
    }  # fmt: skip
    options.update(train)
    return PretrainConfig.model_validate({"model": {"size": "tiny"}, "train": options})


def test_masking_statistics_on_real_strings(
    tokenizer: ScopeTokenizer, scope_strings: list[str]
) -> None:
    batch = tokenizer.batch_encode(scope_strings[:2000], max_length=64)
    special = torch.tensor(
        [tokenizer.pad_id, tokenizer.unk_id, tokenizer.cls_id, tokenizer.sep_id, tokenizer.mask_id]
    )
    replacement = torch.arange(len(special), tokenizer.vocab_size)
    inputs, labels = mask_tokens(
        batch.ids, batch.mask, special_ids=special, mask_id=tokenizer.mask_id,
        replacement_ids=replacement, mask_prob=0.15, rng=generator(0, "test"),
    )  # fmt: skip
    eligible = batch.mask & ~torch.isin(batch.ids, special)
    picked = labels != IGNORE_INDEX
    assert int(eligible.sum()) > 50_000
    assert not bool((picked & ~eligible).any())  # never [CLS]/[SEP]/[PAD]
    assert bool((inputs[~picked] == batch.ids[~picked]).all())  # unpicked tokens untouched
    assert bool((labels[picked] == batch.ids[picked]).all())
    assert float(picked.sum() / eligible.sum()) == pytest.approx(0.15, abs=0.01)
    n = float(picked.sum())
    to_mask = float((inputs[picked] == tokenizer.mask_id).sum()) / n
    kept = float((inputs[picked] == batch.ids[picked]).sum()) / n
    random = 1.0 - to_mask - kept
    assert to_mask == pytest.approx(0.8, abs=0.02)
    assert random == pytest.approx(0.1, abs=0.02)
    assert kept == pytest.approx(0.1, abs=0.02)
    swapped = picked & (inputs != tokenizer.mask_id) & (inputs != batch.ids)
    assert bool(torch.isin(inputs[swapped], replacement).all())


def test_masking_picks_at_least_one_token() -> None:
    ids = torch.tensor([[2, 10, 11, 3, 0]])
    mask = ids != 0
    _, labels = mask_tokens(
        ids, mask, special_ids=torch.tensor([0, 1, 2, 3, 4]), mask_id=4,
        replacement_ids=torch.arange(5, 20), mask_prob=1e-9, rng=generator(0, "x"),
    )  # fmt: skip
    assert int((labels != IGNORE_INDEX).sum()) == 1


def test_learning_rate_schedule() -> None:
    kw = {"warmup_steps": 10, "max_steps": 110, "min_ratio": 0.1}
    assert lr_factor(0, **kw) == pytest.approx(0.1)
    assert lr_factor(9, **kw) == pytest.approx(1.0)
    assert lr_factor(60, **kw) == pytest.approx(0.55)  # half-way down the cosine
    assert lr_factor(110, **kw) == pytest.approx(0.1)
    assert all(lr_factor(s, **kw) >= lr_factor(s + 1, **kw) for s in range(10, 120))


def test_batch_order_is_deterministic_and_ranks_are_disjoint() -> None:
    kw = {"n_rows": 100, "batch_size": 10, "seed": 3, "world_size": 2}
    epoch = [batch_indices(s, rank=r, **kw) for s in range(5) for r in range(2)]
    rows = torch.cat(epoch)
    assert sorted(rows.tolist()) == list(range(100))  # one epoch = every row once
    assert torch.equal(batch_indices(7, rank=1, **kw), batch_indices(7, rank=1, **kw))
    assert not torch.equal(batch_indices(5, rank=0, **kw), epoch[0])  # next epoch reshuffles
    with pytest.raises(ValueError, match="cannot fill"):
        batch_indices(0, n_rows=5, batch_size=4, seed=0, world_size=2)


def test_corpus_split_is_deduplicated_and_hash_based() -> None:
    strings = [f"s{i}" for i in range(2000)] * 2
    corpus = split_strings(strings, 0.1, {"x": 4000})
    assert len(corpus.train) + len(corpus.validation) == 2000
    assert not set(corpus.train) & set(corpus.validation)
    assert len(corpus.validation) / 2000 == pytest.approx(0.1, abs=0.02)
    # membership depends on the string only, not on the rest of the corpus
    assert split_strings(strings[:500], 0.1).validation == [
        s for s in corpus.validation if s in set(strings[:500])
    ]
    assert all(in_validation(s, 0.1) for s in corpus.validation)


def test_corpus_excludes_benchmark_test_strings(data_dir: Path) -> None:
    config = PretrainConfig.model_validate(
        {"data": {"cif_datasets": [], "scope_datasets": ["cloud_cv"]}}
    )
    corpus = build_corpus(config.data)
    train_val = {r.scope for r in load_dataset("cloud_cv", ["train_and_val"]).records}
    test_only = {r.scope for r in load_dataset("cloud_cv", ["test"]).records} - train_val
    everything = set(corpus.train) | set(corpus.validation)
    assert everything == train_val and not everything & test_only
    assert corpus.sources == {"cloud_cv": 1213}
    with pytest.raises(ConfigError, match="not a registered scope dataset"):
        build_corpus(config.data.model_copy(update={"scope_datasets": ["perov_5"]}))


def test_few_steps_on_real_strings_lower_the_mlm_loss(
    tmp_path: Path, tokenizer: ScopeTokenizer, scope_strings: list[str]
) -> None:
    corpus = split_strings(scope_strings[:3000], 0.1)
    config = _tiny_config(max_steps=25, eval_every=25, batch_size=32)
    result = pretrain(config, tmp_path, corpus=corpus, tokenizer=tokenizer)
    first, last = sum(result.losses[:5]) / 5, sum(result.losses[-5:]) / 5
    assert first > math.log(tokenizer.vocab_size) - 0.5  # starts near uniform (6.1 nats)
    assert last < first - 1.0
    val = result.validation[-1]
    assert val["loss"] < first - 1.0 and val["accuracy"] > 0.2
    model, _, card = load_checkpoint(tmp_path)
    assert card.metrics["validation_mlm_loss"] == pytest.approx(val["loss"])
    assert card.data.n_train == len(corpus.train) and card.size == "tiny"


class _Interrupt(Exception):
    pass


class _StopAt(PretrainCallback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_step(self, progress: StepProgress) -> None:
        if progress.step == self.step:
            raise _Interrupt


def test_resume_after_interruption_repeats_the_straight_run(
    tmp_path: Path, tokenizer: ScopeTokenizer, scope_strings: list[str]
) -> None:
    corpus = split_strings(scope_strings[:600], 0.1)
    config = _tiny_config()
    straight = pretrain(config, tmp_path / "straight", corpus=corpus, tokenizer=tokenizer)
    with pytest.raises(_Interrupt):  # killed right after the step-4 training state
        pretrain(config, tmp_path / "cut", corpus=corpus, tokenizer=tokenizer, callback=_StopAt(4))
    with pytest.raises(ConfigError, match="already holds a training run"):
        pretrain(config, tmp_path / "cut", corpus=corpus, tokenizer=tokenizer)
    resumed = pretrain(config, tmp_path / "cut", corpus=corpus, tokenizer=tokenizer, resume=True)
    assert resumed.start_step == 4 and len(resumed.losses) == 4
    assert resumed.losses == pytest.approx(straight.losses[4:], abs=1e-6)
    assert resumed.validation[-1]["loss"] == pytest.approx(
        straight.validation[-1]["loss"], abs=1e-6
    )
    a, _, _ = load_checkpoint(tmp_path / "straight")
    b, _, _ = load_checkpoint(tmp_path / "cut")
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        torch.testing.assert_close(y, x, atol=1e-6, rtol=0, msg=name)
    changed = _tiny_config(learning_rate=1e-3)  # a different run must not be resumed
    with pytest.raises(CheckpointError, match="different configuration"):
        pretrain(changed, tmp_path / "cut", corpus=corpus, tokenizer=tokenizer, resume=True)


@pytest.mark.parametrize("name", ["pretrain_small.yaml", "pretrain_base.yaml"])
def test_shipped_configs_load(name: str) -> None:
    config = PretrainConfig.from_yaml(REPO / "configs" / name)
    assert config.model.size == name.removeprefix("pretrain_").removesuffix(".yaml")
    assert config.data.exclude_splits == {"cloud_cv": ["test"]}


def test_config_errors_name_the_problem(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("model: {size: small}\ntrain: {batch_sise: 8}\n")
    with pytest.raises(ConfigError, match=r"c\.yaml: train\.batch_sise: Extra inputs"):
        PretrainConfig.from_yaml(path)
    path.write_text("train: {max_steps: 10, warmup_steps: 10}\n")
    with pytest.raises(ConfigError, match="warmup_steps"):
        PretrainConfig.from_yaml(path)
    path.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        PretrainConfig.from_yaml(path)
    with pytest.raises(ConfigError, match="cannot read"):
        PretrainConfig.from_yaml(tmp_path / "missing.yaml")
    cpu_bf16 = _tiny_config(device="cpu", precision="bf16")
    with pytest.raises(ConfigError, match="bf16"):
        pretrain(cpu_bf16, tmp_path / "run", corpus=Corpus(["a"] * 20, ["b"]))


def test_cli_pretrain_writes_a_loadable_checkpoint(tmp_path: Path, data_dir: Path) -> None:
    from loop.cli import app

    config = tmp_path / "tiny.yaml"
    config.write_text(
        "model: {size: tiny}\n"
        "data: {cif_datasets: [], scope_datasets: [cloud_cv]}\n"
        "train: {batch_size: 16, max_steps: 6, warmup_steps: 1, eval_every: 3, checkpoint_every: 3}\n"
    )
    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["pretrain", str(config), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "validation MLM loss" in result.output
    _, _, card = load_checkpoint(out)
    assert card.command == f"cloudlab pretrain {config} --out {out}"
    assert card.data.datasets == {"cloud_cv": 1213}
    assert json.loads((out / "training_state" / "latest.json").read_text())["step"] == 6


@pytest.mark.slow
def test_ray_train_two_cpu_workers(
    tmp_path: Path, tokenizer: ScopeTokenizer, scope_strings: list[str], ray_session: None
) -> None:
    corpus = split_strings(scope_strings[:2000], 0.05)
    config = _tiny_config(
        num_workers=2, max_steps=30, batch_size=16, eval_every=30, checkpoint_every=30
    )
    with pytest.raises(ConfigError, match="pretrain_with_ray"):
        pretrain(config, tmp_path, corpus=corpus, tokenizer=tokenizer)  # in-process entry point
    result = pretrain_with_ray(config, tmp_path, corpus=corpus, tokenizer=tokenizer)
    shards = [json.loads((tmp_path / "shards" / f"rank_{r}.json").read_text()) for r in range(2)]
    rows = [set(s["rows"]) for s in shards]
    assert len(rows[0]) > 400 and len(rows[1]) > 400 and not rows[0] & rows[1]
    for shard in shards:
        assert sum(shard["losses"][-5:]) / 5 < sum(shard["losses"][:5]) / 5 - 0.5
    assert result.validation[-1]["loss"] < math.log(tokenizer.vocab_size) - 0.5
    _, _, card = load_checkpoint(tmp_path)
    assert card.hyperparameters["train"]["num_workers"] == 2


@pytest.mark.slow
def test_corpus_encodes_cif_datasets_and_drops_excluded_splits(
    tmp_path: Path, data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from cloud_model.corpus import encode_dataset

    monkeypatch.setenv("CLOUDLAB_CACHE_DIR", str(tmp_path))  # encode for real, not from a cache
    options = {
        "cif_datasets": ["mp_20_pilot"],
        "scope_datasets": [],
        "exclude_splits": {"mp_20_pilot": ["test"]},
    }
    corpus = build_corpus(PretrainConfig.model_validate({"data": options}).data)
    encoded = encode_dataset("mp_20_pilot")  # now read from the cache just written
    test_ids = {r.id for r in load_dataset("mp_20_pilot", ["test"]).records}
    kept = {s for rid, s in encoded.items() if rid not in test_ids}
    assert corpus.sources == {"mp_20_pilot": sum(rid not in test_ids for rid in encoded)}
    assert 1900 <= corpus.sources["mp_20_pilot"] <= 2000  # train + val rows, a few may fail
    assert set(corpus.train) | set(corpus.validation) == kept
    assert all(s.count(" | ") == 2 for s in corpus.train)


def test_ray_work_needs_a_running_ray(tmp_path: Path, tokenizer: ScopeTokenizer) -> None:
    import ray

    from cloud_model.errors import RayNotStartedError

    if ray.is_initialized():
        pytest.skip("a Ray runtime is already running in this test process")
    config = _tiny_config(num_workers=2)
    with pytest.raises(RayNotStartedError, match="ensure_ray"):
        pretrain_with_ray(config, tmp_path, corpus=split_strings(["a | b | c"], 0.0))
    assert not (tmp_path / "training_state").exists()  # nothing was started or written
