"""CHGNet adapter: the real pretrained model (skipped when chgnet is not installed).

Reference numbers were measured once with chgnet 0.4.2 / model 0.3.0 on CPU:
bulk Si at a = 5.43 A gives -5.3122 eV/atom and a pressure of +1.70 GPa (the
model's equilibrium lattice is larger, a ~ 5.47 A, like PBE's).
"""

from __future__ import annotations

import csv
import gzip
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("chgnet")

from adapters.base import (  # noqa: E402
    ExperimentRequest,
    JobHandle,
    JobState,
    JobStatus,
    PermanentAdapterError,
    ResultNotReadyError,
)
from adapters.mlip import ChgnetAdapter, ChgnetSettings  # noqa: E402

pytestmark = pytest.mark.dft

SI_ENERGY_PER_ATOM = -5.3122  # eV/atom, CHGNet 0.3.0 at a = 5.43 A
SI_PRESSURE_GPA = 1.70


def si_cif(a: float = 5.43, shift: float = 0.0) -> str:
    from ase.build import bulk
    from pymatgen.io.ase import AseAtomsAdaptor
    from pymatgen.io.cif import CifWriter

    atoms = bulk("Si", "diamond", a=a)
    atoms.positions[1, 0] += shift
    return str(CifWriter(AseAtomsAdaptor.get_structure(atoms)))


def mp_rows(data_dir: Path, ids: set[str]) -> dict[str, dict[str, str]]:
    """Rows of the MP-20 binary/ternary set (val and test) from the offline mirror."""
    csv.field_size_limit(1 << 30)
    rows = {}
    for split in ("val", "test"):
        with gzip.open(data_dir / "mp" / "mp_20_biternary" / f"{split}.csv.gz", "rt") as fh:
            rows.update(
                {r["material_id"]: r for r in csv.DictReader(fh) if r["material_id"] in ids}
            )
    return rows


def wait(adapter: ChgnetAdapter, handle: JobHandle, timeout_s: float = 300.0) -> JobStatus:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status = adapter.poll(handle)
        if status.state.is_terminal:
            return status
        time.sleep(0.01)
    raise TimeoutError(handle.job_id)


@pytest.fixture(scope="module")
def work_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("chgnet")


@pytest.fixture(scope="module")
def adapter(work_dir: Path) -> Iterator[ChgnetAdapter]:
    a = ChgnetAdapter(ChgnetSettings(work_dir=work_dir))
    yield a
    a.close()


def test_si_energy_forces_stress(adapter: ChgnetAdapter) -> None:
    targets = (
        "energy_per_atom",
        "total_energy",
        "max_force",
        "pressure",
        "formation_energy_per_atom",
    )
    request = ExperimentRequest(candidate_id="Si", targets=targets, structure_cif=si_cif())
    handle = adapter.submit(request, "si")
    assert wait(adapter, handle).state is JobState.SUCCEEDED
    m = adapter.result(handle)
    assert m.values["energy_per_atom"].value == pytest.approx(SI_ENERGY_PER_ATOM, abs=2e-3)
    assert m.values["total_energy"].value == pytest.approx(2 * m.values["energy_per_atom"].value)
    assert m.values["max_force"].value < 1e-3  # zero by symmetry
    assert m.values["pressure"].value == pytest.approx(SI_PRESSURE_GPA, abs=0.05)
    # the Si reference is diamond Si relaxed by CHGNet, so E_f(Si at 5.43 A) is small and >= 0
    assert 0.0 <= m.values["formation_energy_per_atom"].value < 0.01
    assert np.asarray(m.provenance["forces"]).shape == (2, 3)
    assert np.asarray(m.provenance["stress"]).shape == (3, 3)
    assert m.provenance["model_version"] == "0.3.0"
    assert type(m).model_validate_json(m.model_dump_json()) == m


def test_si_relaxation_removes_stress_and_forces(adapter: ChgnetAdapter) -> None:
    from pymatgen.core import Structure

    start = si_cif(5.43, shift=0.1)
    request = ExperimentRequest(
        candidate_id="Si-rattled",
        targets=("energy_per_atom", "pressure", "max_force"),
        structure_cif=start,
        parameters={"relax": True},
    )
    handle = adapter.submit(request, "si-relax")
    assert wait(adapter, handle).state is JobState.SUCCEEDED
    m = adapter.result(handle)
    assert abs(m.values["pressure"].value) < 0.3
    assert m.values["max_force"].value < 0.05
    assert m.values["energy_per_atom"].value < SI_ENERGY_PER_ATOM
    final = Structure.from_str(m.provenance["final_structure_cif"], fmt="cif")
    assert final.volume > Structure.from_str(start, fmt="cif").volume  # it was compressed
    assert m.provenance["relax_steps"] > 1


# MP formation energies of binaries without U-corrected elements (eV/atom).
BINARIES = ("mp-22862", "mp-1487", "mp-1065577")  # NaCl, AlNi, MgO


def test_binary_formation_energies_near_materials_project(
    adapter: ChgnetAdapter, data_dir: Path
) -> None:
    rows = mp_rows(data_dir, set(BINARIES))
    handles = {
        mid: adapter.submit(
            ExperimentRequest(
                candidate_id=mid,
                targets=("formation_energy_per_atom",),
                structure_cif=rows[mid]["cif"],
            ),
            f"ef-{mid}",
        )
        for mid in BINARIES
    }
    errors = {}
    for mid, handle in handles.items():
        assert wait(adapter, handle).state is JobState.SUCCEEDED
        value = adapter.result(handle).values["formation_energy_per_atom"].value
        errors[rows[mid]["pretty_formula"]] = value - float(rows[mid]["formation_energy_per_atom"])
    assert all(abs(e) < 0.15 for e in errors.values()), errors
    assert np.mean(np.abs(list(errors.values()))) < 0.08, errors


def test_idempotent_and_durable_across_adapters(adapter: ChgnetAdapter, work_dir: Path) -> None:
    request = ExperimentRequest(
        candidate_id="Si", targets=("energy_per_atom",), structure_cif=si_cif(5.45)
    )
    first = adapter.submit(request, "si-idem")
    assert adapter.submit(request, "si-idem") == first
    assert wait(adapter, first).state is JobState.SUCCEEDED
    measurement = adapter.result(first)
    job_dir = adapter.store.path(first.job_id)
    record, result_written = adapter.store.record(first.job_id), (job_dir / "result.json").stat()
    restarted = ChgnetAdapter({"work_dir": str(work_dir)})  # JSON settings, as from a config
    try:
        assert restarted.submit(request, "si-idem") == first
        assert restarted.result(first) == measurement
        # nothing was recomputed: the job's state and result are the first run's
        assert restarted.store.record(first.job_id) == record
        assert (job_dir / "result.json").stat().st_mtime_ns == result_written.st_mtime_ns
        assert len(list((work_dir / "jobs").glob(f"{first.job_id}*"))) == 1
        other = ExperimentRequest(
            candidate_id="Si", targets=("energy_per_atom",), structure_cif=si_cif(5.5)
        )
        with pytest.raises(PermanentAdapterError, match="already used"):
            restarted.submit(other, "si-idem")
    finally:
        restarted.close()


def test_cancel_timeout_and_bad_requests(adapter: ChgnetAdapter) -> None:
    # a long relaxation with a 0.05 s limit, and a job queued behind it
    parameters = {"relax": True, "fmax_ev_per_a": 1e-4, "max_relax_steps": 10, "timeout_s": 0.05}
    slow = ExperimentRequest(
        candidate_id="Si",
        targets=("energy_per_atom",),
        structure_cif=si_cif(5.8, 0.3),
        parameters=parameters,
    )
    running = adapter.submit(slow, "slow")
    queued = adapter.submit(slow.model_copy(update={"candidate_id": "Si-2"}), "queued")
    assert adapter.cancel(queued).state is JobState.CANCELLED
    status = wait(adapter, running)
    assert status.state is JobState.FAILED and "timed out" in (status.message or "")
    with pytest.raises(ResultNotReadyError):
        adapter.result(running)
    for bad in (
        ExperimentRequest(candidate_id="x", targets=("band_gap",), structure_cif=si_cif()),
        ExperimentRequest(candidate_id="x", targets=("pressure",)),
        ExperimentRequest(candidate_id="x", targets=("pressure",), structure_cif="garbage"),
        ExperimentRequest(
            candidate_id="x",
            targets=("pressure",),
            structure_cif=si_cif(),
            parameters={"threads": 8},
        ),
    ):
        with pytest.raises(PermanentAdapterError):
            adapter.submit(bad, "bad")
    # the timed-out worker was killed before a result, the cancelled job never ran
    probe = adapter.submit(
        ExperimentRequest(candidate_id="Si", targets=("pressure",), structure_cif=si_cif()), "probe"
    )
    assert wait(adapter, probe).state is JobState.SUCCEEDED
    assert adapter.poll(running).state is JobState.FAILED
    assert not (adapter.store.path(running.job_id) / "result.json").exists()
    assert adapter.poll(queued).state is JobState.CANCELLED
    assert not (adapter.store.path(queued.job_id) / "result.json").exists()
