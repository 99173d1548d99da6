from __future__ import annotations

import pytest
from pydantic import ValidationError

from adapters.base import (
    ExperimentRequest,
    JobHandle,
    JobState,
    JobStatus,
    MeasuredValue,
    Measurement,
    PermanentAdapterError,
    TransientAdapterError,
)
from cloud_model.errors import CloudlabError


def test_records_round_trip_through_json() -> None:
    request = ExperimentRequest(
        candidate_id="mp-1", targets=("band_gap",), parameters={"relax": True}
    )
    handle = JobHandle(adapter="sim", job_id="j1", idempotency_key="k1", candidate_id="mp-1")
    status = JobStatus(job_id="j1", state=JobState.FAILED, message="failed synthesis")
    measurement = Measurement(
        job_id="j1",
        candidate_id="mp-1",
        values={"band_gap": MeasuredValue(value=1.7, unit="eV", uncertainty=0.1)},
        cost=2.5,
        provenance={"instrument": "uv-vis"},
    )
    for record in (request, handle, status, measurement):
        assert type(record).model_validate_json(record.model_dump_json()) == record


def test_terminal_states() -> None:
    assert {s for s in JobState if s.is_terminal} == {
        JobState.SUCCEEDED,
        JobState.FAILED,
        JobState.CANCELLED,
        JobState.LOST,
    }


def test_bad_records_are_rejected() -> None:
    with pytest.raises(ValidationError):
        ExperimentRequest(candidate_id="", targets=("x",))
    with pytest.raises(ValidationError):
        ExperimentRequest(candidate_id="a", targets=())
    with pytest.raises(ValidationError):
        MeasuredValue(value=1.0, unit="eV", uncertainty=-1.0)
    with pytest.raises(ValidationError):
        JobStatus.model_validate({"job_id": "j", "state": "EXPLODED"})


def test_error_hierarchy() -> None:
    assert issubclass(TransientAdapterError, CloudlabError)
    assert issubclass(PermanentAdapterError, RuntimeError)
    assert not issubclass(TransientAdapterError, PermanentAdapterError)
