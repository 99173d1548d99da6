"""The Debye + Einstein model against direct numerics, its limits and derivatives, and its head."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.integrate import quad

from cloud_model.debye import GAS_CONSTANT, DebyeInputError, heat_capacity
from cloud_model.einstein import (
    DebyeEinsteinInputError,
    acoustic_fraction,
    debye_einstein_heat_capacity,
    debye_einstein_internal_energy,
    einstein_heat_capacity,
    einstein_internal_energy,
)
from cloud_model.ensemble import CloudEnsemble, EnsembleConfig
from cloud_model.errors import ConfigError
from cloud_model.finetune_data import DataSource, load_labelled
from cloud_model.finetune_job import EinsteinOptions, FinetuneJob, create_ensemble, predict_rows
from cloud_model.heads import (
    CloudForDebye,
    CloudForDebyeEinstein,
    DebyeHeadConfig,
    build_model,
    debye_einstein_head_config,
)
from cloud_model.model import CloudConfig, CloudEncoder

R = GAS_CONSTANT
F64 = torch.float64
REPO = Path(__file__).resolve().parents[2]


def _oscillator_moments(x: float) -> tuple[float, float]:
    """Mean and variance of the quantum number of one oscillator at ``x = theta / T``, summed
    directly over its Boltzmann-weighted levels (no closed form involved)."""
    n_max = int(60.0 / x) + 60  # levels beyond e^{-60} relative weight are dropped
    levels = np.arange(n_max, dtype=np.float64)
    p = np.exp(-x * levels)
    p /= p.sum()
    mean = float((p * levels).sum())
    return mean, float((p * (levels - mean) ** 2).sum())


def _einstein_cv_ref(theta: float, temp: float) -> float:
    x = theta / temp
    return 3.0 * R * x * x * _oscillator_moments(x)[1]  # Cv = k x^2 Var(n) per mode


def _einstein_u_ref(theta: float, temp: float) -> float:
    return 3.0 * R * theta * (_oscillator_moments(theta / temp)[0] + 0.5)


def _debye_cv_ref(theta: float, temp: float) -> float:
    x_d = theta / temp
    integral = quad(
        lambda x: x**4 * math.exp(-x) / (-math.expm1(-x)) ** 2, 0.0, x_d, epsabs=0.0, epsrel=1e-13
    )[0]
    return 9.0 * R * integral / x_d**3


def _debye_u_ref(theta: float, temp: float) -> float:
    x_d = theta / temp
    integral = quad(
        lambda x: x**3 * math.exp(-x) / (-math.expm1(-x)), 0.0, x_d, epsabs=0.0, epsrel=1e-13
    )[0]
    return 9.0 * R * temp * integral / x_d**3 + 9.0 / 8.0 * R * theta


def test_einstein_functions_match_a_direct_sum_over_levels() -> None:
    theta = 450.0
    temps = np.logspace(-1.5, 3, 40) * theta  # x from 1e-3 to ~32
    cv = einstein_heat_capacity(torch.tensor(theta, dtype=F64), torch.tensor(temps, dtype=F64))
    u = einstein_internal_energy(torch.tensor(theta, dtype=F64), torch.tensor(temps, dtype=F64))
    cv_ref = np.array([_einstein_cv_ref(theta, t) for t in temps])
    u_ref = np.array([_einstein_u_ref(theta, t) for t in temps])
    assert np.abs(cv.numpy() / cv_ref - 1).max() < 1e-9
    assert np.abs(u.numpy() / u_ref - 1).max() < 1e-9


def test_debye_einstein_matches_quadrature_plus_level_sums() -> None:
    theta_d = torch.tensor([180.0, 420.0], dtype=F64)
    theta_e = torch.tensor([[300.0, 650.0], [500.0, 900.0]], dtype=F64)
    weights = torch.tensor([[0.3, 0.7], [0.55, 0.45]], dtype=F64)
    frac = torch.tensor([1.0 / 3.0, 0.1], dtype=F64)
    n = torch.tensor([3.0, 10.0], dtype=F64)
    temps = torch.tensor(np.logspace(0.5, 3.5, 25), dtype=F64)  # 3 K .. 3200 K
    cv = debye_einstein_heat_capacity(
        theta_d, theta_e, temps, fraction=frac, weights=weights, n_atoms=n
    )  # (2, 25)
    u = debye_einstein_internal_energy(
        theta_d, theta_e, temps, fraction=frac, weights=weights, n_atoms=n
    )
    assert cv.shape == u.shape == (2, 25)
    for b in range(2):
        for j, t in enumerate(temps.tolist()):
            f = float(frac[b])
            einstein = [_einstein_cv_ref(float(te), t) for te in theta_e[b]]
            ref = f * _debye_cv_ref(float(theta_d[b]), t) + (1 - f) * float(
                np.dot(weights[b].numpy(), einstein)
            )
            assert float(cv[b, j]) == pytest.approx(float(n[b]) * ref, rel=1e-8)
            e_u = [_einstein_u_ref(float(te), t) for te in theta_e[b]]
            ref_u = f * _debye_u_ref(float(theta_d[b]), t) + (1 - f) * float(
                np.dot(weights[b].numpy(), e_u)
            )
            assert float(u[b, j]) == pytest.approx(float(n[b]) * ref_u, rel=1e-8)


def test_one_atom_per_cell_is_pure_debye_and_one_mode_weights_default() -> None:
    temps = torch.tensor([5.0, 77.0, 300.0, 2000.0], dtype=F64)
    theta = torch.tensor([343.0], dtype=F64)
    cv = debye_einstein_heat_capacity(
        theta, torch.tensor([[700.0]], dtype=F64), temps, fraction=acoustic_fraction(1.0)
    )
    assert torch.equal(cv, heat_capacity(theta, temps))
    two = debye_einstein_heat_capacity(
        theta, torch.tensor([[500.0, 700.0]], dtype=F64), temps, fraction=0.25
    )
    halves = debye_einstein_heat_capacity(
        theta,
        torch.tensor([[500.0, 700.0]], dtype=F64),
        temps,
        fraction=0.25,
        weights=torch.tensor([[0.5, 0.5]], dtype=F64),
    )
    assert torch.allclose(two, halves, rtol=1e-14)
    assert acoustic_fraction(torch.tensor([1.0, 2.0, 10.0])).tolist() == pytest.approx(
        [1.0, 0.5, 0.1]
    )


def test_limits_dulong_petit_t_cubed_and_exponential_einstein() -> None:
    theta_d, theta_e = torch.tensor(300.0, dtype=F64), torch.tensor([600.0], dtype=F64)
    hot = debye_einstein_heat_capacity(theta_d, theta_e, 3e5, fraction=0.2, n_atoms=5.0)
    assert float(hot) == pytest.approx(3 * R * 5.0, rel=1e-6)  # 3R per atom
    for ratio in (1e-2, 3e-3):  # Debye part: 12 pi^4 / 5 R f (T / theta_D)^3
        cold = debye_einstein_heat_capacity(theta_d, theta_e, ratio * 300.0, fraction=0.2)
        law = 0.2 * 12 * math.pi**4 / 5 * R * ratio**3
        assert float(cold) == pytest.approx(law, rel=1e-9)
    for x in (30.0, 100.0, 400.0):  # Einstein alone: 3R x^2 e^{-x}
        cv = einstein_heat_capacity(torch.tensor(600.0, dtype=F64), 600.0 / x)
        assert float(cv) == pytest.approx(3 * R * x * x * math.exp(-x), rel=1e-12)
    assert float(einstein_heat_capacity(torch.tensor(600.0, dtype=F64), 0.5)) == 0.0  # underflow


def test_internal_energy_derivative_is_heat_capacity() -> None:
    temps = torch.tensor(np.logspace(0, 3.3, 30), dtype=F64, requires_grad=True)
    theta_d = torch.tensor([250.0, 600.0], dtype=F64)
    theta_e = torch.tensor([[400.0, 900.0], [700.0, 1100.0]], dtype=F64)
    w = torch.tensor([[0.6, 0.4], [0.2, 0.8]], dtype=F64)
    frac = torch.tensor([0.5, 0.125], dtype=F64)
    u = debye_einstein_internal_energy(theta_d, theta_e, temps, fraction=frac, weights=w)
    (du_dt,) = torch.autograd.grad(u.sum(), temps)  # each T only enters its own column
    cv = debye_einstein_heat_capacity(
        theta_d, theta_e, temps.detach(), fraction=frac, weights=w
    ).sum(0)
    assert torch.allclose(du_dt, cv, rtol=1e-9, atol=1e-12)


def test_gradients_are_finite_across_twelve_decades() -> None:
    temps = torch.tensor([0.3, 1.0, 30.0, 300.0, 3e4, 3e5], dtype=F64)
    theta_d = torch.tensor([300.0, 5.0], dtype=F64, requires_grad=True)
    theta_e = torch.tensor([[310.0, 300.0], [7.0, 320.0]], dtype=F64, requires_grad=True)
    logits = torch.zeros(2, 2, dtype=F64, requires_grad=True)
    frac = torch.tensor([0.3, 0.9], dtype=F64, requires_grad=True)
    cv = debye_einstein_heat_capacity(
        theta_d, theta_e, temps, fraction=frac, weights=torch.softmax(logits, -1)
    )
    grads = torch.autograd.grad(cv.sum(), (theta_d, theta_e, logits, frac))
    assert all(bool(torch.isfinite(g).all()) for g in grads)
    assert float(grads[0][0]) < 0 and float(grads[1][0, 0]) < 0  # hotter mode -> less Cv
    # float32 forward and backward stay finite too
    t32 = theta_e.detach().float().requires_grad_(True)
    cv32 = debye_einstein_heat_capacity(theta_d.detach().float(), t32, temps.float(), fraction=0.5)
    (g32,) = torch.autograd.grad(cv32.sum(), t32)
    assert bool(torch.isfinite(cv32).all() and torch.isfinite(g32).all())


def test_elementwise_matches_the_grid_diagonal() -> None:
    theta_d = torch.tensor([200.0, 300.0, 400.0], dtype=F64)
    theta_e = torch.tensor([[500.0], [650.0], [800.0]], dtype=F64)
    temps = torch.tensor([100.0, 250.0, 900.0], dtype=F64)
    n = torch.tensor([2.0, 4.0, 6.0], dtype=F64)
    full = debye_einstein_heat_capacity(theta_d, theta_e, temps, fraction=1 / n, n_atoms=n)
    point = debye_einstein_heat_capacity(
        theta_d, theta_e, temps, fraction=1 / n, n_atoms=n, elementwise=True
    )
    assert point.shape == (3,)
    assert torch.allclose(point, torch.diagonal(full), rtol=1e-14)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"theta_debye": torch.tensor([-5.0])}, "theta_debye"),
        ({"theta_einstein": torch.tensor([[0.0]])}, "theta_einstein"),
        ({"temperature": torch.tensor([300.0, float("nan")])}, "temperature"),
        ({"fraction": 1.5}, "fraction"),
        ({"weights": torch.tensor([[0.6, 0.6]])}, "sum to 1"),
        ({"weights": torch.tensor([[1.0]])}, "weights have shape"),
        (
            {"theta_debye": torch.full((3,), 300.0), "theta_einstein": torch.ones(2, 1) * 500},
            "broadcast",
        ),
        ({"theta_einstein": torch.tensor(500.0), "theta_debye": torch.ones(3)}, "needs shape"),
    ],
)
def test_bad_inputs_raise_a_named_error(kwargs: dict[str, object], message: str) -> None:
    args: dict[str, object] = {
        "theta_debye": torch.tensor([300.0]),
        "theta_einstein": torch.tensor([[500.0, 700.0]]),
        "temperature": torch.tensor([300.0]),
        "fraction": 0.5,
        "weights": None,
    }
    args.update(kwargs)
    with pytest.raises(DebyeEinsteinInputError, match=message) as info:
        debye_einstein_heat_capacity(
            args["theta_debye"],  # type: ignore[arg-type]
            args["theta_einstein"],  # type: ignore[arg-type]
            args["temperature"],  # type: ignore[arg-type]
            fraction=args["fraction"],  # type: ignore[arg-type]
            weights=args["weights"],  # type: ignore[arg-type]
        )
    assert isinstance(info.value, DebyeInputError) and isinstance(info.value, ValueError)
    with pytest.raises(DebyeEinsteinInputError, match="n_atoms"):
        acoustic_fraction(torch.tensor([2.0, 0.5]))
    with pytest.raises(DebyeEinsteinInputError, match="temperature"):
        einstein_heat_capacity(300.0, -1.0)


# ----------------------------------------------------------------- the head


def _cloud_cv_rows(n: int) -> tuple[list[str], torch.Tensor, torch.Tensor]:
    data = load_labelled(DataSource(dataset="cloud_cv", targets=("cv",), limit=n))
    assert data.n_atoms is not None
    return data.scopes, data.y, data.n_atoms


def test_debye_einstein_head_fits_cloud_cv_rows_and_round_trips(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    scopes, y, n_atoms = _cloud_cv_rows(32)
    config = EnsembleConfig(
        model_size="tiny",
        n_trainable_blocks="all",
        epochs=30,
        batch_size=8,
        loss="l1",
        lr_head=2e-3,
        lr_encoder=2e-3,
        head_dropout=0.0,
        device="cpu",
        parallel="in_process",
        recalibrate=False,
    )
    ensemble = create_ensemble(
        None, 1, "debye_einstein", 1, config, einstein=EinsteinOptions(modes=2)
    )
    assert ensemble.spec.head.kind == "debye_einstein"
    report = ensemble.fit(scopes, y, n_atoms=n_atoms)
    history = [h[0] for h in report.members[0].history]
    assert history[-1] < 0.7 * history[0]  # it learns
    cv = ensemble.predict(scopes, n_atoms=n_atoms)  # (1, 32, 1)
    mad = (y - y.mean()).abs().mean()
    assert float((cv[0] - y).abs().mean() / mad) < 0.25  # the rows are fitted
    assert bool((cv > 0).all() and (cv <= 3 * R * n_atoms[None, :, None] + 1e-3).all())
    params = ensemble.predict_theta(scopes[:4])  # (1, 4, 2K + 2)
    assert params.shape == (1, 4, 6)
    assert torch.allclose(params[0, :, 3:5].sum(-1), torch.ones(4), atol=1e-5)
    data = load_labelled(DataSource(dataset="cloud_cv", targets=("cv",), limit=4))
    rows = predict_rows(ensemble, data)  # the CLI's prediction rows
    assert rows[0]["cv_300K_mean"] == pytest.approx(float(cv[0, 0, 0]), rel=1e-5)
    assert rows[0]["theta_mean"] == pytest.approx(float(params[0, 0, 0]), rel=1e-5)
    ensemble.save(tmp_path / "de")
    loaded = CloudEnsemble.load(tmp_path / "de")
    assert loaded.spec.head == ensemble.spec.head
    assert torch.allclose(loaded.predict(scopes, n_atoms=n_atoms), cv, rtol=1e-6, atol=1e-6)


def test_cloud_for_debye_einstein_checkpoint_round_trip(tmp_path: Path) -> None:
    from cloud_model.checkpoint import ModelCard, load_checkpoint, save_checkpoint
    from cloud_model.tokenizer import ScopeTokenizer

    tokenizer = ScopeTokenizer.default()
    scopes, y, n_atoms = _cloud_cv_rows(16)
    config = CloudConfig.named("tiny", tokenizer.vocab_size)
    torch.manual_seed(0)
    head = debye_einstein_head_config(acoustic_fraction="learned", theta_scale=350.0)
    model = build_model(config, head)
    assert isinstance(model, CloudForDebyeEinstein)
    batch = tokenizer.batch_encode(scopes, max_length=64)
    model.eval()
    params, loss = model(batch.ids, batch.mask, y, n_atoms=n_atoms)
    assert loss is not None and params.shape == (16, 4)
    loss.backward()  # the Cv loss reaches the encoder
    assert model.encoder.tok_emb.weight.grad is not None
    save_checkpoint(tmp_path / "ck", model, tokenizer, ModelCard(name="de-test"))
    loaded, _, card = load_checkpoint(tmp_path / "ck")
    assert isinstance(loaded, CloudForDebyeEinstein) and card.head == head
    cv = model.predict_heat_capacity(batch.ids, batch.mask, (300.0,), n_atoms)
    assert torch.allclose(
        loaded.predict_heat_capacity(batch.ids, batch.mask, (300.0,), n_atoms), cv
    )
    with pytest.raises(ConfigError, match="debye_einstein"):
        CloudForDebye(CloudEncoder(config), head)
    with pytest.raises(ConfigError, match="debye_einstein"):
        CloudForDebyeEinstein(CloudEncoder(config), DebyeHeadConfig())


def test_debye_einstein_job_config_and_theta_output_refused() -> None:
    job = FinetuneJob.from_yaml(REPO / "configs" / "finetune_cloud_cv_debye_einstein.yaml")
    assert job.head == "debye_einstein" and job.einstein.acoustic_fraction == "per_atom"
    theta_config = EnsembleConfig(model_size="tiny", debye_output="theta", device="cpu")
    with pytest.raises(ConfigError, match="heat_capacity"):
        create_ensemble(None, 1, "debye_einstein", 1, theta_config)
