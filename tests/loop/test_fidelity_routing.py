"""Per-fidelity adapters: the fidelity router, its config, its wiring and real campaigns.

The campaign tests measure the cheap fidelity with the real CHGNet adapter (static
energies of small carbon_24 cells from the offline registry; skipped when chgnet is
not installed) and the expensive one with the simulated lab or, in the slow test,
with real GPAW.
"""

from __future__ import annotations

import copy
import importlib.util
import pickle
from pathlib import Path
from typing import Any

import pytest
import yaml

from adapters.base import (
    ExperimentRequest,
    JobHandle,
    JobNotFoundError,
    JobState,
    PermanentAdapterError,
)
from adapters.routing import FidelityRouter
from cloud_model.errors import ConfigError
from loop.campaign import Campaign
from loop.config import load_config, parse_config
from loop.store import CampaignStore
from loop.wiring import (
    adapter_factory,
    build_lab,
    engine_config,
    fidelity_limits,
    fidelity_routes,
)
from simulators.config import SimulatedLabConfig
from simulators.ground_truth import GroundTruth
from simulators.journal import open_lab
from tests.simulators.lab_server import TOKEN, TOKEN_ENV, free_port, start_server

REPO = Path(__file__).resolve().parents[2]
HAS_CHGNET = importlib.util.find_spec("chgnet") is not None
HAS_GPAW = importlib.util.find_spec("gpaw") is not None
needs_chgnet = pytest.mark.skipif(not HAS_CHGNET, reason="needs chgnet (make setup-dft)")

# six 6-atom carbon_24 (val) cells: CHGNet evaluates each in well under a second
CARBON_IDS = [
    "C-130499-1826-45",
    "C-170350-1491-20",
    "C-28240-2315-32",
    "C-170366-7168-49",
    "C-41268-3496-27",
    "C-141033-8048-13",
]


# ---------------------------------------------------------------- the router itself
def _truth(scale: float) -> GroundTruth:
    return GroundTruth(
        units={"y": "eV", "y@cheap": "eV"},
        values={f"c{i}": {"y": scale * i, "y@cheap": scale * i + 0.5} for i in range(4)},
        source="test",
    )


def _labs(root: Path) -> tuple[Any, Any]:
    """Two journalled simulated labs (reopened from ``root`` after a "restart")."""
    a = open_lab(_truth(1.0), SimulatedLabConfig(name="lab_a", capacity=2), root / "a")
    b = open_lab(_truth(10.0), SimulatedLabConfig(name="lab_b", capacity=3), root / "b")
    return a, b


def _request(cid: str, fidelity: str | None, target: str = "y") -> ExperimentRequest:
    parameters = {} if fidelity is None else {"fidelity": fidelity}
    return ExperimentRequest(candidate_id=cid, targets=(target,), parameters=parameters)


def test_router_routes_by_fidelity_and_finds_its_jobs_again_after_a_restart(
    tmp_path: Path,
) -> None:
    a, b = _labs(tmp_path)
    router = FidelityRouter({"cheap": a, "dft": b})
    assert router.capacity == 5 and router.name == "lab_a+lab_b"
    assert router.capacity_of("cheap") == 2
    cheap = router.submit(_request("c1", "cheap", "y@cheap"), "k/c1@cheap")
    high = router.submit(_request("c2", "dft"), "k/c2@dft")
    assert (cheap.adapter, high.adapter) == ("lab_a@cheap", "lab_b@dft")
    assert a.find("k/c1@cheap") is not None and b.find("k/c1@cheap") is None
    assert b.find("k/c2@dft") is not None and a.find("k/c2@dft") is None
    # an adapter serving one fidelity gets the request without the routing key
    with pytest.raises(PermanentAdapterError, match="different request"):
        a.submit(_request("c1", "cheap", "y@cheap"), "k/c1@cheap")
    assert a.submit(_request("c1", None, "y@cheap"), "k/c1@cheap").job_id == cheap.job_id
    # the same key again: the same job, never a second one
    assert router.submit(_request("c1", "cheap", "y@cheap"), "k/c1@cheap") == cheap
    stored = [h.model_dump_json() for h in (cheap, high)]  # what the campaign store keeps
    router.close()

    a2, b2 = _labs(tmp_path)  # a restarted process: new labs replaying their journals
    again = FidelityRouter({"cheap": a2, "dft": b2})
    cheap2, high2 = (JobHandle.model_validate_json(s) for s in stored)
    assert again.poll(cheap2).state is JobState.SUCCEEDED
    m_cheap, m_high = again.result(cheap2), again.result(high2)
    assert m_cheap.values["y@cheap"].value == pytest.approx(1.5)  # lab_a's truth
    assert m_high.values["y"].value == pytest.approx(20.0)  # lab_b's truth
    assert (m_high.provenance["fidelity"], m_high.provenance["adapter"]) == ("dft", "lab_b")
    assert again.cancel(high2).state is JobState.SUCCEEDED  # cancel reaches its lab too
    with pytest.raises(JobNotFoundError, match="not routed"):
        again.poll(cheap2.model_copy(update={"adapter": "lab_a"}))  # no route in the handle
    with pytest.raises(JobNotFoundError, match="not routed"):
        again.poll(cheap2.model_copy(update={"adapter": "lab_a@gone"}))
    again.close()


def test_router_refuses_requests_without_a_known_fidelity_and_shares_adapters(
    tmp_path: Path,
) -> None:
    a, b = _labs(tmp_path)
    router = FidelityRouter({"cheap": a, "mid": a, "dft": b})  # lab_a serves two fidelities
    assert router.capacity == 5  # lab_a counted once
    with pytest.raises(PermanentAdapterError, match="names no fidelity"):
        router.submit(_request("c1", None), "k/1")
    with pytest.raises(PermanentAdapterError, match="'robot' has no adapter"):
        router.submit(_request("c1", "robot"), "k/2")
    # a shared adapter keeps the routing key (it may need it to tell its fidelities apart)
    router.submit(_request("c3", "mid", "y@cheap"), "k/c3@mid")
    assert a.submit(_request("c3", "mid", "y@cheap"), "k/c3@mid").adapter == "lab_a"
    router.close()
    router.close()  # idempotent
    with pytest.raises(PermanentAdapterError, match="closed"):
        router.submit(_request("c1", "dft"), "k/3")
    with pytest.raises(ValueError, match="'@'"):
        FidelityRouter({"a@b": a})


# ---------------------------------------------------------------- config
def _carbon_config(**overrides: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "name": "routed",
        "seed": 0,
        "pool": {"dataset": "carbon_24", "splits": ["val"], "include_ids": CARBON_IDS},
        "objective": {"target": "energy_per_atom", "sense": "minimize"},
        "surrogate": {"kind": "gp"},
        "acquisition": {"kind": "random", "batch_size": 4},
        "initial_design": {"n_random": 2},
        "budget": {"experiments": 100, "cost": 24},
        "fidelities": [
            {"name": "dft", "cost": 10},
            {
                "name": "cheap",
                "cost": 1,
                "outputs": {"energy_per_atom": "energy_per_atom"},
                "adapter": {"kind": "chgnet", "settings": {"threads": 1, "timeout_s": 300}},
            },
        ],
        "adapter": {"kind": "simulated", "seed": 0, "capacity": 4, "noise": {"sigma": 0.0}},
        "dispatch": {"mode": "inline", "concurrency": 4, "poll_interval_s": 0.1},
        "finetune": {"every_n_results": 4},
    }
    data.update(overrides)
    return data


def _cheap(**changes: Any) -> dict[str, Any]:
    cheap = copy.deepcopy(_carbon_config()["fidelities"][1])
    cheap.update(changes)
    return {"fidelities": [{"name": "dft", "cost": 10}, cheap]}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (_cheap(adapter={"kind": "robot"}), r"fidelities\.1\.adapter: Input tag 'robot'"),
        (_cheap(adapter={"kind": "simulated"}), "fidelity 'cheap': adapter kind simulated"),
        (
            _cheap(simulated={"chgnet": "energy_per_atom"}),
            "fidelity 'cheap': `simulated` is read by a simulated lab only",
        ),
        (
            _cheap(outputs={}),
            r"fidelities\[1\] \(cheap\)\.outputs: the chgnet adapter cannot measure "
            r"\['energy_per_atom@cheap'\]",
        ),
        (
            _cheap(parameters={"relax": "perhaps"}),
            r"fidelities\[1\] \(cheap\)\.parameters\.relax",
        ),
        (
            _cheap(parameters={"threads": 2}),
            r"fidelities\[1\] \(cheap\)\.parameters: \['threads'\] are settings of the chgnet",
        ),
        (
            {
                "adapter": {"kind": "gpaw"},
                "fidelities": [
                    {"name": "dft", "cost": 10},
                    {"name": "cheap", "cost": 1, "simulated": {"chgnet": "energy_per_atom"}},
                ],
            },
            r"fidelities\[1\] \(cheap\)\.simulated: only a simulated lab reads it",
        ),
    ],
)
def test_bad_per_fidelity_adapters_are_errors_naming_the_fidelity(
    change: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_config(_carbon_config(**change))


def test_routed_config_round_trips_and_old_fingerprints_stay(tmp_path: Path) -> None:
    config = parse_config(_carbon_config())
    assert config.routes_fidelities
    assert config.fidelity_adapter("cheap").kind == "chgnet"
    assert config.fidelity_adapter("dft") == config.adapter
    assert [f.name for f in config.campaign_adapter_fidelities().fidelities] == ["dft"]
    again = parse_config(config.model_dump(mode="json"))
    assert again == config and again.fingerprint() == config.fingerprint()
    # a campaign without per-fidelity adapters keeps the fingerprint it had before they existed
    plain = load_config(REPO / "configs" / "carbon24_mf.yaml")
    data = plain.model_dump(mode="json")
    for f in data["fidelities"]:
        del f["adapter"]
    assert not plain.routes_fidelities
    assert "adapter" not in str(data["fidelities"])
    assert parse_config(data).fingerprint() == plain.fingerprint()


def test_each_fidelity_with_its_own_adapter_gets_that_adapters_in_flight_limit() -> None:
    config = load_config(REPO / "configs" / "mf_chgnet_gpaw.yaml")
    # chgnet: its own adapter's max_parallel; gpaw is measured by the campaign's adapter
    assert fidelity_limits(config) == {"chgnet": 1}
    assert engine_config(config).group_concurrency == {"chgnet": 1}
    data = config.model_dump(mode="json")
    data["fidelities"][1]["adapter"]["settings"]["max_parallel"] = 2
    data["fidelities"][0]["max_in_flight"] = 1
    changed = parse_config(data)
    assert fidelity_limits(changed) == {"gpaw": 1, "chgnet": 2}
    assert changed.fingerprint() != config.fingerprint()
    data["dispatch"]["group_concurrency"] = {"chgnet": 3}  # the dispatch section wins
    assert engine_config(parse_config(data)).group_concurrency == {"gpaw": 1, "chgnet": 3}
    data["dispatch"]["group_concurrency"] = {"dft": 3}
    with pytest.raises(ConfigError, match=r"group_concurrency names \['dft'\]"):
        parse_config(data)


def test_the_ray_factory_pickles_and_builds_the_router(tmp_path: Path) -> None:
    data = _carbon_config()
    data["fidelities"][1]["adapter"] = {"kind": "chgnet"}  # built, not run: no chgnet needed
    config = parse_config(data)
    truth = _truth(1.0)
    factory = pickle.loads(pickle.dumps(adapter_factory(config, tmp_path, truth)))
    router = factory()  # what each Ray actor does
    try:
        assert isinstance(router, FidelityRouter)
        assert {f: a.name for f, a in router.routes.items()} == {
            "dft": "simulated",
            "cheap": "chgnet",
        }
        assert router.send_fidelity == frozenset()  # each adapter serves one fidelity
        assert (tmp_path / "lab" / "truth.json").exists()
        assert router.routes["cheap"].settings.work_dir == (  # type: ignore[attr-defined]
            tmp_path / "fidelities" / "cheap" / "chgnet"
        )
    finally:
        router.close()
    # without per-fidelity adapters nothing is routed: the campaign's adapter itself
    plain = parse_config(_carbon_config(fidelities=_cheap(adapter=None)["fidelities"]))
    assert fidelity_routes(plain) and not plain.routes_fidelities


def test_a_local_campaign_adapter_gets_fidelity_parameters_not_the_routing_key(
    tmp_path: Path,
) -> None:
    """Two GPAW fidelities told apart by their parameters, through one (unstarted) adapter."""
    data = _carbon_config(
        adapter={"kind": "gpaw"},
        fidelities=[
            {"name": "pbe500", "cost": 10, "parameters": {"cutoff_ev": 500}},
            {
                "name": "pbe300",
                "cost": 1,
                "outputs": {"energy_per_atom": "energy_per_atom"},
                "parameters": {"cutoff_ev": 300},
            },
        ],
    )
    config = parse_config(data)
    assert config.routes_fidelities
    router = build_lab(config.adapter, fidelity_routes(config), directory=tmp_path)
    try:
        assert isinstance(router, FidelityRouter)
        assert router.routes["pbe500"] is router.routes["pbe300"]
        assert router.send_fidelity == frozenset()  # GPAW's settings refuse unknown parameters
    finally:
        router.close()


# ---------------------------------------------------------------- a robot lab over HTTP
def _http_config(tmp_path: Path, url: str) -> dict[str, Any]:
    """The expensive fidelity in a lab over HTTP, the cheap one on the campaign's simulated lab."""
    from cloud_model.datasets import load_dataset

    records = [r for r in load_dataset("carbon_24", ["val"]).records if r.id in set(CARBON_IDS)]
    low = tmp_path / "low.csv"
    low.write_text("id,value\n" + "".join(f"{r.id},{r.targets['energy_per_atom'] + 0.1}\n"
                                          for r in records))  # fmt: skip
    return _carbon_config(
        budget={"experiments": 100, "cost": 202},  # both fidelities for the initial design
        fidelities=[
            {
                "name": "robot",
                "cost": 100,
                "adapter": {
                    "kind": "http",
                    "name": "robot-lab",  # the adapter name stored with each job
                    "base_url": url,
                    "token_env": TOKEN_ENV,
                    "max_attempts": 1,
                    "connect_timeout_s": 2.0,
                },
            },
            {"name": "cheap", "cost": 1, "simulated": {"file": str(low), "id_column": "id"}},
        ],
    )


def test_a_robot_lab_over_http_measures_the_expensive_fidelity(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from cloud_model.datasets import load_dataset

    dft = {r.id: r.targets["energy_per_atom"] for r in load_dataset("carbon_24", ["val"]).records
           if r.id in set(CARBON_IDS)}  # fmt: skip
    truth = GroundTruth(
        units={"energy_per_atom": "eV/atom"},
        values={cid: {"energy_per_atom": v} for cid, v in dft.items()},
        source="carbon_24 val",
    )
    monkeypatch.setenv(TOKEN_ENV, TOKEN)
    server = start_server(tmp_path / "server", truth, SimulatedLabConfig(name="robot-lab"))
    try:
        config = parse_config(_http_config(tmp_path, server.url))
        out = tmp_path / "run"
        result = Campaign(config, out).run()
    finally:
        server.stop()
    assert result.stop_reason.startswith("cost budget reached"), result.stop_reason
    with CampaignStore(out, create=False) as store:
        jobs = store.jobs()
        rows = store.fidelity_measurements()
    assert sorted(j.fidelity for j in jobs) == ["cheap", "cheap", "robot", "robot"]
    assert {j.handle.adapter for j in jobs if j.handle and j.fidelity == "robot"} == {
        "robot-lab@robot"
    }
    assert {j.handle.adapter for j in jobs if j.handle and j.fidelity == "cheap"} == {
        "simulated@cheap"
    }
    for m, fidelity, _ in rows:
        if fidelity == "robot":
            assert m.values["energy_per_atom"].value == pytest.approx(dft[m.candidate_id])
        else:
            want = dft[m.candidate_id] + 0.1
            assert m.values["energy_per_atom@cheap"].value == pytest.approx(want)


def test_an_unreachable_fidelity_lab_stops_the_campaign_before_any_job(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from adapters.http_lab import LabUnreachableError

    monkeypatch.setenv(TOKEN_ENV, TOKEN)
    url = f"http://127.0.0.1:{free_port()}"  # nobody listens there
    config = parse_config(_http_config(tmp_path, url))
    with pytest.raises(LabUnreachableError, match="unreachable"):
        Campaign(config, tmp_path / "run").run()
    with CampaignStore(tmp_path / "run", create=False) as store:
        assert store.jobs() == []


# ---------------------------------------------------------------- a real campaign: CHGNet + lab
@needs_chgnet
@pytest.mark.dft
def test_campaign_with_chgnet_cheap_fidelity_routes_stays_in_budget_and_resumes(
    tmp_path: Path,
) -> None:
    """CHGNet measures the cheap fidelity, the simulated lab the expensive one; the run is
    interrupted while a CHGNet job is in flight and resumed to the end."""
    config = parse_config(_carbon_config())
    out = tmp_path / "run"
    campaign = Campaign(config, out)

    def interrupt_while_chgnet_runs(progress: object) -> None:
        jobs = campaign.prepare().store.jobs()
        if any(j.fidelity == "cheap" and j.handle is not None and not j.is_terminal for j in jobs):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        campaign.run(on_progress=interrupt_while_chgnet_runs)
    if campaign.store is not None:
        campaign.store.close()
    with CampaignStore(out, create=False) as store:
        in_flight = [j for j in store.jobs() if j.handle is not None and not j.is_terminal]
    assert any(j.fidelity == "cheap" for j in in_flight)  # routed handles were left open

    result = Campaign.resume(out).run()
    assert result.stop_reason.startswith("cost budget reached")
    with CampaignStore(out, create=False) as store:
        jobs = store.jobs()
        rows = store.fidelity_measurements()
        committed = store.committed_cost()
    assert committed <= 24.0
    assert sum(c for _, _, c in rows) == pytest.approx(committed)
    by_fidelity = {f: [j for j in jobs if j.fidelity == f] for f in ("dft", "cheap")}
    assert len(by_fidelity["dft"]) == 2 and len(by_fidelity["cheap"]) == 4
    assert all(j.state == "SUCCEEDED" for j in jobs)
    # each job went to its fidelity's adapter, and the stored handle says which
    assert {j.handle.adapter for j in by_fidelity["cheap"] if j.handle} == {"chgnet@cheap"}
    assert {j.handle.adapter for j in by_fidelity["dft"] if j.handle} == {"simulated@dft"}
    chgnet_jobs = list((out / "fidelities" / "cheap" / "chgnet" / "jobs").iterdir())
    assert len(chgnet_jobs) == 4  # one CHGNet job per cheap job: nothing ran twice
    from cloud_model.datasets import load_dataset

    dft = {r.id: r.targets["energy_per_atom"] for r in load_dataset("carbon_24", ["val"]).records
           if r.id in set(CARBON_IDS)}  # fmt: skip
    for m, fidelity, _ in rows:
        value = m.values["energy_per_atom"].value
        if fidelity == "dft":  # the simulated lab: the dataset's hidden value (no noise)
            assert value == pytest.approx(dft[m.candidate_id])
        else:  # CHGNet 0.3.0: carbon at ~ -9 eV/atom (the dataset's DFT zero is elsewhere)
            assert m.provenance["code"] == "CHGNet" and m.provenance["fidelity"] == "cheap"
            assert -10.5 < value < -8.0


# ---------------------------------------------------------------- the example: CHGNet + GPAW
@pytest.mark.slow
@pytest.mark.dft
@pytest.mark.skipif(not (HAS_CHGNET and HAS_GPAW), reason="needs chgnet and gpaw")
def test_example_chgnet_gpaw_campaign_on_three_tiny_cells(
    tmp_path: Path, ray_session: None
) -> None:
    """configs/mf_chgnet_gpaw.yaml on three 2-atom cells: CHGNet cost 1, GPAW cost 100, the
    router built inside the Ray actor as the example says (dispatch.mode ray)."""
    data = yaml.safe_load((REPO / "configs" / "mf_chgnet_gpaw.yaml").read_text())
    data["pool"]["include_ids"] = ["mp-1039148", "mp-1094889", "mp-8062"]  # CaMg, LiMg, SiC
    data["initial_design"] = {"n_random": 2}
    # two candidates at both fidelities; the cost-aware rule then makes no cheap query that
    # would leave no room for an expensive one
    data["budget"] = {"experiments": 20, "cost": 203}
    data["dispatch"] = {**data["dispatch"], "poll_interval_s": 0.2}
    assert data["dispatch"]["mode"] == "ray"
    data["adapter"]["settings"]["relax_references"] = "none"  # one SCF per element reference
    config = parse_config(data)
    out = tmp_path / "run"
    result = Campaign(config, out).run()
    assert result.stop_reason.startswith("cost budget reached"), result.stop_reason
    with CampaignStore(out, create=False) as store:
        jobs = store.jobs()
        rows = store.fidelity_measurements()
        assert store.committed_cost() == 202.0
    assert all(j.state == "SUCCEEDED" for j in jobs), [j.message for j in jobs]
    assert sorted(j.fidelity for j in jobs) == ["chgnet", "chgnet", "gpaw", "gpaw"]
    assert {j.handle.adapter for j in jobs if j.handle and j.fidelity == "gpaw"} == {"gpaw@gpaw"}
    assert {j.handle.adapter for j in jobs if j.handle and j.fidelity == "chgnet"} == {
        "chgnet@chgnet"
    }
    codes = {f: {m.provenance["code"] for m, g, _ in rows if g == f} for f in ("gpaw", "chgnet")}
    assert codes == {"gpaw": {"GPAW"}, "chgnet": {"CHGNet"}}
    # the same candidates at both fidelities: formation energies of the same sign and size
    e = {(m.candidate_id, f): m.values["formation_energy_per_atom"].value for m, f, _ in rows}
    for cid in {c for c, f in e if f == "gpaw"}:
        assert abs(e[(cid, "gpaw")] - e[(cid, "chgnet")]) < 0.5
