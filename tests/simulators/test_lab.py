"""The in-process simulated lab: noise, failures, capacity, latency, cost, drift, idempotency."""

from __future__ import annotations

import statistics
import threading

import pytest

from adapters.base import (
    ExperimentRequest,
    JobNotFoundError,
    JobState,
    PermanentAdapterError,
    ResultNotReadyError,
)
from simulators.clock import VirtualClock
from simulators.lab import (
    CancelEvent,
    FailureConfig,
    LatencyConfig,
    NoiseConfig,
    SimulatedLab,
    SimulatedLabConfig,
    SubmitEvent,
)

from .conftest import UNITS


def _lab(truth: dict[str, dict[str, float]], **config: object) -> tuple[SimulatedLab, VirtualClock]:
    clock = VirtualClock()
    return SimulatedLab(truth, UNITS, SimulatedLabConfig.model_validate(config), clock=clock), clock


def _request(candidate: str, *targets: str) -> ExperimentRequest:
    return ExperimentRequest(candidate_id=candidate, targets=targets or ("heat_ref",))


def test_homoscedastic_noise_statistics(perov_truth: dict[str, dict[str, float]]) -> None:
    lab, _ = _lab(perov_truth, capacity=10_000, noise={"sigma": 0.1})
    residuals = []
    for i, (cid, row) in enumerate(sorted(perov_truth.items()) * 5):  # 2000 measurements
        handle = lab.submit(_request(cid), f"k{i}")
        value = lab.result(handle).values["heat_ref"]
        assert value.unit == "eV" and value.uncertainty == pytest.approx(0.1)
        residuals.append(value.value - row["heat_ref"])
    assert abs(statistics.fmean(residuals)) < 4 * 0.1 / len(residuals) ** 0.5
    assert statistics.stdev(residuals) == pytest.approx(0.1, rel=0.08)


def test_heteroscedastic_noise_scales_with_value(perov_truth: dict[str, dict[str, float]]) -> None:
    noise = {"kind": "heteroscedastic", "relative": 0.05, "sigma": 0.01}
    lab, _ = _lab(perov_truth, capacity=10_000, target_noise={"dir_gap": noise})
    z, reported, expected = [], [], []
    for i, (cid, row) in enumerate(sorted(perov_truth.items()) * 4):
        measured = lab.result(lab.submit(_request(cid, "dir_gap", "heat_ref"), f"k{i}")).values
        sd = 0.05 * abs(row["dir_gap"]) + 0.01
        z.append((measured["dir_gap"].value - row["dir_gap"]) / sd)
        reported.append(measured["dir_gap"].uncertainty or 0.0)
        expected.append(sd)
        assert measured["heat_ref"].value == row["heat_ref"]  # default noise: none
        assert measured["heat_ref"].uncertainty is None
    assert statistics.stdev(z) == pytest.approx(1.0, rel=0.08)
    # the reported uncertainty follows the measured value, close to the true sd
    assert statistics.fmean(abs(r - e) for r, e in zip(reported, expected, strict=True)) < 0.01


def test_failure_rate_and_reasons(perov_truth: dict[str, dict[str, float]]) -> None:
    lab, _ = _lab(perov_truth, capacity=10_000, failure={"probability": 0.3})
    cid = next(iter(perov_truth))
    statuses = [lab.poll(lab.submit(_request(cid), f"k{i}")) for i in range(2000)]
    failed = [s for s in statuses if s.state is JobState.FAILED]
    assert len(failed) / 2000 == pytest.approx(0.3, abs=3 * (0.3 * 0.7 / 2000) ** 0.5)
    assert {s.message for s in failed} == {"failed synthesis", "instrument fault"}
    assert sum(s.state is JobState.SUCCEEDED for s in statuses) == 2000 - len(failed)
    with pytest.raises(ResultNotReadyError, match="FAILED"):
        lab.result(lab.handle(failed[0].job_id))
    assert lab.total_cost == 2000.0  # failed runs cost too


def test_capacity_keeps_extra_jobs_queued(perov_truth: dict[str, dict[str, float]]) -> None:
    lab, clock = _lab(perov_truth, capacity=2, latency={"mean_s": 100.0}, cost_per_experiment=2.5)
    cids = sorted(perov_truth)[:5]
    handles = [lab.submit(_request(c), f"k{c}") for c in cids]
    states = lambda: [lab.poll(h).state.value for h in handles]  # noqa: E731
    assert states() == ["RUNNING"] * 2 + ["QUEUED"] * 3
    with pytest.raises(ResultNotReadyError):
        lab.result(handles[0])
    assert lab.next_completion_time() == 100.0
    clock.advance(100.0)
    assert states() == ["SUCCEEDED"] * 2 + ["RUNNING"] * 2 + ["QUEUED"]
    assert lab.total_cost == 5.0
    clock.advance(250.0)
    assert states() == ["SUCCEEDED"] * 5
    last = lab.result(handles[4])
    assert last.provenance["sim_started_s"] == 200.0 and last.provenance["sim_finished_s"] == 300.0
    assert last.cost == 2.5 and lab.total_cost == 12.5
    assert last.started_at is not None
    assert (last.finished_at - last.started_at).total_seconds() == pytest.approx(100.0)


def test_cancel_frees_a_slot(perov_truth: dict[str, dict[str, float]]) -> None:
    lab, clock = _lab(perov_truth, capacity=1, latency={"mean_s": 60.0})
    a, b, c = (lab.submit(_request(cid), cid) for cid in sorted(perov_truth)[:3])
    assert lab.cancel(c).state is JobState.CANCELLED  # queued
    clock.advance(10.0)
    assert lab.cancel(a).state is JobState.CANCELLED  # running: b starts at t = 10
    assert lab.poll(b).state is JobState.RUNNING
    clock.advance(60.0)
    assert lab.poll(b).state is JobState.SUCCEEDED
    assert lab.result(b).provenance["sim_started_s"] == 10.0
    assert lab.cancel(b).state is JobState.SUCCEEDED  # terminal: unchanged
    assert lab.total_cost == 1.0  # cancelled runs are not charged


@pytest.mark.parametrize("distribution", ["fixed", "exponential", "lognormal"])
def test_latency_distributions_on_a_virtual_clock(
    perov_truth: dict[str, dict[str, float]], distribution: str
) -> None:
    lab, clock = _lab(
        perov_truth, capacity=10_000, latency={"distribution": distribution, "mean_s": 3600.0}
    )
    handles = [lab.submit(_request(cid), cid) for cid in perov_truth]
    assert all(lab.poll(h).state is JobState.RUNNING for h in handles)
    clock.advance(1e6)
    durations = []
    for h in handles:
        prov = lab.result(h).provenance
        durations.append(prov["sim_finished_s"] - prov["sim_started_s"])
    sd = {"fixed": 0.0, "exponential": 3600.0, "lognormal": 3600.0 * 0.53}[distribution]
    assert statistics.fmean(durations) == pytest.approx(
        3600.0, abs=4 * sd / len(durations) ** 0.5 + 1e-9
    )
    if distribution == "exponential":
        assert statistics.stdev(durations) == pytest.approx(3600.0, rel=0.15)


def test_drift_moves_the_measured_value(perov_truth: dict[str, dict[str, float]]) -> None:
    lab, clock = _lab(perov_truth, latency={"mean_s": 7200.0}, drift_per_hour={"heat_ref": 0.5})
    cid = next(iter(perov_truth))
    handle = lab.submit(_request(cid), "k")
    clock.advance(7200.0)
    assert lab.result(handle).values["heat_ref"].value == pytest.approx(
        perov_truth[cid]["heat_ref"] + 1.0
    )


def test_idempotency_never_starts_a_second_experiment(
    perov_truth: dict[str, dict[str, float]],
) -> None:
    lab, _ = _lab(perov_truth, latency={"mean_s": 10.0})
    cid, other = sorted(perov_truth)[:2]
    first = lab.submit(_request(cid), "key-1")
    assert lab.submit(_request(cid), "key-1") == first
    assert lab.find("key-1") == first and lab.find("nope") is None
    with pytest.raises(PermanentAdapterError, match="different request"):
        lab.submit(_request(other), "key-1")
    assert sum(lab.counts().values()) == 1


def test_concurrent_duplicate_submits_make_one_job_per_key(
    perov_truth: dict[str, dict[str, float]],
) -> None:
    lab, _ = _lab(perov_truth, capacity=8, latency={"mean_s": 5.0})
    cids = sorted(perov_truth)[:50]
    handles: list[list[str]] = [[] for _ in range(4)]

    def worker(slot: int) -> None:
        handles[slot] = [lab.submit(_request(c), f"key-{c}").job_id for c in cids]

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert handles[0] == handles[1] == handles[2] == handles[3]
    assert sum(lab.counts().values()) == 50


def test_draws_depend_on_seed_and_key_not_on_call_order(
    perov_truth: dict[str, dict[str, float]],
) -> None:
    config = {"capacity": 1000, "noise": {"sigma": 0.2}, "failure": {"probability": 0.2}, "seed": 7}
    cids = sorted(perov_truth)[:100]

    def outcomes(order: list[str], **overrides: object) -> dict[str, object]:
        lab, _ = _lab(perov_truth, **{**config, **overrides})
        handles = {c: lab.submit(_request(c), f"job-{c}") for c in order}
        out: dict[str, object] = {}
        for c, h in handles.items():
            status = lab.poll(h)
            out[c] = (
                lab.result(h).values["heat_ref"].value
                if status.state is JobState.SUCCEEDED
                else status.message
            )
        return out

    forward = outcomes(cids)
    assert outcomes(cids[::-1]) == forward
    other_seed = outcomes(cids, seed=8)
    assert sum(other_seed[c] != forward[c] for c in cids) > 90


def test_unknown_candidate_and_target_are_permanent_errors(
    perov_truth: dict[str, dict[str, float]],
) -> None:
    lab, _ = _lab(perov_truth)
    with pytest.raises(PermanentAdapterError, match="unknown candidate 'mp-nope'"):
        lab.submit(_request("mp-nope"), "k1")
    with pytest.raises(PermanentAdapterError, match="unknown target 'band_gap'"):
        lab.submit(_request(next(iter(perov_truth)), "band_gap"), "k2")
    with pytest.raises(JobNotFoundError, match="no-such-job"):
        lab.status("no-such-job")
    nan_lab = SimulatedLab({"x": {"heat_ref": float("nan")}}, UNITS, clock=VirtualClock())
    with pytest.raises(PermanentAdapterError, match="cannot be measured"):
        nan_lab.submit(_request("x"), "k")
    assert sum(lab.counts().values()) == 0


def test_labels_do_not_leak_before_measurement(perov_truth: dict[str, dict[str, float]]) -> None:
    lab, clock = _lab(perov_truth, latency={"mean_s": 100.0}, noise={"sigma": 0.1})
    cid = next(iter(perov_truth))
    handle = lab.submit(_request(cid), "k")
    true = repr(perov_truth[cid]["heat_ref"])
    page, total = lab.list_jobs()
    exposed = [handle.model_dump_json(), lab.poll(handle).model_dump_json()]
    exposed += [h.model_dump_json() + s.model_dump_json() for h, s in page]
    assert total == 1 and not any(true in text for text in exposed)
    with pytest.raises(ResultNotReadyError, match="RUNNING"):
        lab.result(handle)
    assert not [n for n in dir(lab) if "truth" in n.lower() and not n.startswith("_")]
    clock.advance(100.0)
    assert lab.result(handle).values["heat_ref"].value != perov_truth[cid]["heat_ref"]  # noisy


def test_history_replay_reproduces_jobs_and_measurements(
    perov_truth: dict[str, dict[str, float]],
) -> None:
    config = SimulatedLabConfig(
        capacity=2,
        noise=NoiseConfig(sigma=0.05),
        failure=FailureConfig(probability=0.25),
        latency=LatencyConfig(distribution="exponential", mean_s=30.0),
        drift_per_hour={"heat_ref": 0.1},
    )
    journal: list[SubmitEvent | CancelEvent] = []

    class ListJournal:
        def append(self, event: SubmitEvent | CancelEvent) -> None:
            journal.append(event)

    clock = VirtualClock()
    lab = SimulatedLab(perov_truth, UNITS, config, clock=clock, journal=ListJournal())
    handles = []
    for i, cid in enumerate(sorted(perov_truth)[:20]):
        handles.append(lab.submit(_request(cid), f"k{i}"))
        clock.advance(7.0)
        if i % 7 == 3:
            lab.cancel(handles[-2])
    lab.submit(_request(sorted(perov_truth)[0]), "k0")  # duplicate: not journaled
    assert [e.kind for e in journal].count("submit") == 20
    clock.advance(1e4)

    restored_clock = VirtualClock(start=clock.now())
    restored = SimulatedLab(perov_truth, UNITS, config, clock=restored_clock, history=journal)
    for h in handles:
        status = lab.poll(h)
        assert restored.handle(h.job_id) == h
        assert restored.poll(h).state is status.state
        if status.state is JobState.SUCCEEDED:
            assert restored.result(h).values == lab.result(h).values
    assert restored.total_cost == lab.total_cost > 0


def test_engine_time_always_reaches_the_deadline_it_sleeps_until() -> None:
    """(t / scale) * scale can fall an ulp short of t: the engine must still wake at t."""
    import random as _random

    from simulators.clock import EngineTime

    rng = _random.Random(0)
    for _ in range(2000):
        scale = rng.choice([1.0, 3.0, 7200.0, 3600.0 * rng.random() + 1e-3])
        clock = EngineTime(VirtualClock(), scale=scale)
        deadline = rng.random() * 1e4
        clock.sleep_until(deadline)
        assert clock.monotonic() >= deadline
        sim = rng.random() * 1e6
        hinted = clock.from_sim(sim)
        clock.sleep_until(hinted)  # a wake hint from the lab: exactly that simulated instant
        assert clock.clock.now() >= sim
