"""CloudEnsemble on real CLOUD-format strings with a tiny encoder: shapes, cache, persistence."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from cloud_model.datasets import load_dataset
from cloud_model.debye import GAS_CONSTANT, heat_capacity
from cloud_model.ensemble import CloudEnsemble, EnsembleConfig
from cloud_model.errors import CheckpointError, ConfigError


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """Small matmuls on a shared 2-core machine are far faster single-threaded."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def cv_rows() -> tuple[list[str], torch.Tensor, torch.Tensor]:
    """240 CLOUD-DEBYE training rows: SCOPE strings, Cv (J/(mol K)), atoms per cell."""
    records = load_dataset("cloud_cv", ["train_and_val"]).records[:240]
    scopes = [r.scope or "" for r in records]
    cv = torch.tensor([r.targets["cv"] for r in records])
    n_atoms = torch.tensor([float(r.extra["n_atoms"]) for r in records])
    return scopes, cv, n_atoms


def _config(**overrides: object) -> EnsembleConfig:
    base: dict[str, object] = {
        "model_size": "tiny",
        "epochs": 4,
        "warm_start_epochs": 2,
        "batch_size": 32,
        "device": "cpu",
        "parallel": "in_process",
        "n_trainable_blocks": 1,
    }
    base.update(overrides)
    return EnsembleConfig.model_validate(base)


def _two_targets(cv: torch.Tensor, n_atoms: torch.Tensor) -> torch.Tensor:
    return torch.stack([cv, cv / n_atoms], dim=1)  # (n, 2): per cell and per atom


def test_predict_shape_members_differ_and_cache_skips_the_trunk(cv_rows) -> None:
    scopes, cv, n_atoms = cv_rows
    ens = CloudEnsemble.create(None, 3, "regression", 2, _config())
    report = ens.fit(scopes[:160], _two_targets(cv, n_atoms)[:160])
    assert report.n_train == 160 and len(report.members) == 3 and report.mode == "in_process"
    assert report.trunk_strings_encoded == len(set(scopes[:160]))

    calls = {"n": 0}
    hook = ens.encoder.tok_emb.register_forward_hook(
        lambda *_: calls.__setitem__("n", calls["n"] + 1)
    )
    pool = scopes[100:240]
    first = ens.predict(pool)
    calls_first, encoded_first = calls["n"], ens.cache.n_computed
    second = ens.predict(pool)
    hook.remove()
    assert first.shape == (3, len(pool), 2)
    assert torch.equal(first, second)
    assert calls_first > 0  # the 80 strings not seen in fit went through the trunk once
    assert calls["n"] == calls_first  # ... and never again
    assert ens.cache.n_computed == encoded_first
    # different seeds -> different members, with a spread that is not degenerate
    spread = first.std(0).mean(0)  # (2,)
    assert bool((spread > 2e-4 * first.abs().mean((0, 1))).all())
    # predictions are in target units: the mean Cv is of the order of the data's
    assert abs(float(first[..., 0].mean()) - float(cv.mean())) < 2 * float(cv.std())


def test_head_only_members_reuse_cached_pooled_vectors(cv_rows) -> None:
    scopes, cv, n_atoms = cv_rows
    ens = CloudEnsemble.create(None, 2, "regression", 2, _config(n_trainable_blocks=0))
    assert ens.spec.kind == "pooled"
    calls = {"n": 0}
    ens.encoder.blocks[0].register_forward_hook(lambda *_: calls.__setitem__("n", calls["n"] + 1))
    ens.fit(scopes[:120], _two_targets(cv, n_atoms)[:120])
    after_fit = calls["n"]
    ens.fit(scopes[:120], _two_targets(cv, n_atoms)[:120], warm_start=True)
    ens.predict(scopes[:120])
    assert calls["n"] == after_fit  # refitting and scoring the same strings: no encoder work
    x, mask = ens.features(scopes[:5])
    assert x.shape == (5, ens.encoder.config.d_model) and mask is None


def test_save_load_gives_identical_predictions(cv_rows, tmp_path: Path) -> None:
    scopes, cv, n_atoms = cv_rows
    ens = CloudEnsemble.create(None, 2, "regression", 2, _config(val_fraction=0.2))
    report = ens.fit(scopes[:150], _two_targets(cv, n_atoms)[:150])
    assert report.n_val == 30 and report.validation is not None
    assert report.variance_scale == ens.variance_scale != 1.0
    before = ens.predict(scopes[150:200])
    ens.save(tmp_path / "ens")
    loaded = CloudEnsemble.load(tmp_path / "ens")
    assert loaded.n_members == 2 and loaded.fitted and loaded.variance_scale == ens.variance_scale
    assert torch.equal(loaded.predict(scopes[150:200]), before)
    # a corrupted member file is refused, never half-loaded
    member = tmp_path / "ens" / "member_01.safetensors"
    member.write_bytes(member.read_bytes()[:-8] + b"\x00" * 8)
    with pytest.raises(CheckpointError, match="sha256"):
        CloudEnsemble.load(tmp_path / "ens")


def test_warm_start_continues_from_previous_weights(cv_rows) -> None:
    scopes, cv, n_atoms = cv_rows
    y = _two_targets(cv, n_atoms)
    ens = CloudEnsemble.create(None, 2, "regression", 2, _config())
    ens.fit(scopes[:100], y[:100])
    before = ens.predict(scopes[100:140])
    # new data shifts the target statistics; a (nearly) frozen warm start keeps the function
    ens.config = ens.config.model_copy(update={"lr_head": 1e-9, "lr_encoder": 1e-9})
    warm = ens.fit(scopes[:200], y[:200] * 1.5, warm_start=True)
    assert warm.warm_start and warm.epochs == 2
    after_warm = ens.predict(scopes[100:140])
    assert torch.allclose(after_warm, before, rtol=1e-3, atol=1e-3 * float(y.abs().mean()))
    cold = ens.fit(scopes[:200], y[:200] * 1.5, warm_start=False)
    assert not cold.warm_start
    after_cold = ens.predict(scopes[100:140])
    assert (after_cold - before).abs().mean() > 0.05 * before.abs().mean()


def test_debye_ensemble_predicts_heat_capacity_from_theta(cv_rows) -> None:
    scopes, cv, n_atoms = cv_rows
    config = _config(debye_output="heat_capacity", temperatures=(300.0,), n_trainable_blocks=0)
    ens = CloudEnsemble.create(None, 2, "debye", 1, config)
    report = ens.fit(scopes[:160], cv[:160], n_atoms=n_atoms[:160], epochs=6)
    first, last = report.members[0].history[0][0], report.members[0].history[-1][0]
    assert last < first  # the Cv loss goes down through the Debye function
    theta = ens.predict_theta(scopes[160:200])  # (K, n)
    cv_pred = ens.predict(scopes[160:200], n_atoms=n_atoms[160:200])  # (K, n, 1)
    assert theta.shape == (2, 40) and bool((theta > 0).all())
    expected = heat_capacity(theta.reshape(-1), torch.tensor([300.0]), n_atoms[160:200].repeat(2))
    assert torch.allclose(cv_pred.reshape(-1), expected.reshape(-1), rtol=1e-5)
    assert bool((cv_pred[..., 0] <= 3 * GAS_CONSTANT * n_atoms[160:200] + 1e-3).all())


def test_inconsistent_requests_raise(cv_rows) -> None:
    scopes, cv, _ = cv_rows
    with pytest.raises(ConfigError, match="n_members"):
        CloudEnsemble.create(None, 0, "regression", 1, _config())
    with pytest.raises(ConfigError, match="targets"):
        CloudEnsemble.create(None, 2, "debye", 3, _config(debye_output="theta"))
    ens = CloudEnsemble.create(None, 2, "regression", 1, _config())
    with pytest.raises(ConfigError, match="shape"):
        ens.fit(scopes[:10], torch.zeros(10, 2))
    with pytest.raises(ConfigError, match="Debye"):
        ens.predict_theta(scopes[:2])


def test_ray_members_need_ray_started_by_the_caller(cv_rows) -> None:
    import ray

    from cloud_model.errors import RayNotStartedError

    if ray.is_initialized():
        pytest.skip("a Ray runtime is already running in this test process")
    scopes, cv, n_atoms = cv_rows
    ens = CloudEnsemble.create(None, 2, "regression", 2, _config(parallel="ray"))
    with pytest.raises(RayNotStartedError, match="not connected to Ray"):
        ens.fit(scopes[:20], _two_targets(cv, n_atoms)[:20])
    assert not ray.is_initialized()  # nothing started Ray behind the caller's back


@pytest.mark.slow
def test_members_train_as_ray_actors_on_cpu(cv_rows, ray_session) -> None:
    scopes, cv, n_atoms = cv_rows
    ens = CloudEnsemble.create(None, 2, "regression", 2, _config(parallel="ray"))
    report = ens.fit(scopes[:80], _two_targets(cv, n_atoms)[:80])
    assert report.mode == "ray" and all(m.epochs_run == 4 for m in report.members)
    local = CloudEnsemble.create(None, 2, "regression", 2, _config(parallel="in_process"))
    local.fit(scopes[:80], _two_targets(cv, n_atoms)[:80])
    # same seeds, same data, same code: actor-trained members match in-process ones
    assert torch.allclose(
        ens.predict(scopes[:20]), local.predict(scopes[:20]), atol=1e-4, rtol=1e-4
    )


@pytest.mark.gpu
def test_members_train_on_gpu_actors(cv_rows, ray_session) -> None:
    scopes, cv, n_atoms = cv_rows
    config = _config(device="cuda", parallel="auto", gpus_per_member=0.5)
    ens = CloudEnsemble.create(None, 2, "regression", 2, config)
    report = ens.fit(scopes[:80], _two_targets(cv, n_atoms)[:80])
    assert report.mode == "ray"
    assert ens.predict(scopes[:20]).shape == (2, 20, 2)


def test_length_sorted_scoring_returns_rows_in_input_order(cv_rows) -> None:
    scopes, cv, n_atoms = cv_rows
    ens = CloudEnsemble.create(None, 2, "regression", 2, _config(eval_batch_size=8))
    ens.fit(scopes[:40], _two_targets(cv, n_atoms)[:40], epochs=1)
    pool = scopes[40:100]
    together = ens.predict(pool)  # 60 rows > eval_batch_size: scored in length order
    one_by_one = torch.cat([ens.predict([s]) for s in pool], dim=1)
    assert torch.allclose(together, one_by_one, rtol=1e-4, atol=1e-4)


def test_feature_cache_is_bounded_first_in_first_out() -> None:
    from cloud_model.trunk import FeatureCache

    cache = FeatureCache(max_entries=3)
    seen: list[str] = []

    def encode(strings: list[str]) -> list[torch.Tensor]:
        seen.extend(strings)
        return [torch.full((len(s), 2), float(len(s))) for s in strings]

    x, mask = cache.gather(["a", "bb", "a", "ccc"], encode, "hidden")
    assert seen == ["a", "bb", "ccc"]  # duplicates encoded once
    assert x.shape == (4, 3, 2) and mask is not None and mask.sum(1).tolist() == [1, 2, 1, 3]
    assert torch.equal(x[0], x[2])
    cache.gather(["dddd"], encode, "hidden")  # evicts "a", the oldest
    assert len(cache) == 3 and "a" not in cache and "bb" in cache
    cache.gather(["bb", "a"], encode, "hidden")
    assert seen[-1] == "a" and cache.n_computed == 5


def test_ensembles_on_one_trunk_share_features_in_a_process(cv_rows) -> None:
    scopes = cv_rows[0][:60]
    config = _config(n_trainable_blocks=0, seed=11)
    first = CloudEnsemble.create(None, 2, "regression", 1, config)
    x_first, _ = first.features(scopes)  # encoded into its own cache ...
    first.share_cache()  # ... which the shared cache adopts
    # same trunk weights and cut (the seed fixes the random trunk): nothing is encoded again
    second = CloudEnsemble.create(None, 2, "regression", 1, config)
    assert second.trunk_fingerprint() == first.trunk_fingerprint()
    second.share_cache()
    before = second.cache.n_computed
    x_second, _ = second.features(scopes)
    assert second.cache.n_computed == before and torch.equal(x_first, x_second)
    # another trunk (seed) or another cut gets its own features
    other = CloudEnsemble.create(None, 2, "regression", 1, _config(n_trainable_blocks=0, seed=12))
    cut = CloudEnsemble.create(None, 2, "regression", 1, _config(n_trainable_blocks=1, seed=11))
    assert len({first.trunk_fingerprint(), other.trunk_fingerprint(), cut.trunk_fingerprint()}) == 3
    other.share_cache()
    assert other.cache is not first.cache
    x_other, _ = other.features(scopes)
    assert not torch.equal(x_other, x_first)
