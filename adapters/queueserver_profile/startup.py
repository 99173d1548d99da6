"""Startup code of cloudlab's reference Bluesky profile collection (a simulated lab).

Loaded by a bluesky-queueserver RE Manager into its worker environment
(``start-re-manager --startup-dir adapters/queueserver_profile``). It defines what
:class:`adapters.queueserver.QueueServerAdapter` relies on:

* ``cloudlab_measure(candidate_id, targets, key)``: the plan one queue item runs. It
  loads the candidate (``lab_sample``), reads the ``lab_probe`` detector once per
  target inside one Bluesky run whose start document carries ``cloudlab_key``;
* ``cloudlab_result(key)``: the function the adapter executes in the worker to fetch a
  finished run's measurement (``{"values": {target: {value, unit, uncertainty}}, ...}``
  or ``None``).

The measurement is written, when the run's stop document says ``success``, by a
RunEngine subscriber into one JSON file per key under ``results_dir``: that store
outlives the worker and the RE Manager, so a measurement taken just before a restart
is still found. A beamline keeps the two signatures and reads its own data store
(databroker, tiled) in ``cloudlab_result`` instead.

The simulated lab is configured by the JSON file named in ``CLOUDLAB_QS_LAB``::

    {"truth": "/path/truth.json",    # a GroundTruth table: {"units": {...}, "values": {...}}
     "results_dir": "/path/results", # where finished measurements are kept
     "latency_s": 0.2,               # seconds per target reading
     "latency_s_by_candidate": {"cid": 5.0},  # slower candidates (optional)
     "noise_sigma": 0.05,            # Gaussian noise (target units), reported as uncertainty
     "fail": ["cid", ...]}           # candidates whose reading fails (the plan raises)

This file is not imported by cloudlab; it runs only inside a queueserver worker.
"""

import hashlib
import json
import os
import random
import threading
import time
from pathlib import Path

import bluesky.plan_stubs as bps
import bluesky.preprocessors as bpp
from bluesky import RunEngine
from ophyd import Component, Device, Signal
from ophyd.status import DeviceStatus

_SETTINGS_ENV = "CLOUDLAB_QS_LAB"


def _load_settings() -> dict:
    path = os.environ.get(_SETTINGS_ENV, "")
    if not path:
        raise RuntimeError(f"set {_SETTINGS_ENV} to the simulated lab's JSON settings file")
    settings = json.loads(Path(path).read_text())
    truth = json.loads(Path(settings["truth"]).read_text())
    settings["units"] = truth["units"]
    settings["values"] = truth["values"]
    Path(settings["results_dir"]).mkdir(parents=True, exist_ok=True)
    return settings


_LAB = _load_settings()


class LabProbe(Device):
    """A simulated instrument: reads the loaded sample's ``target`` from the truth table."""

    target = Component(Signal, value="", kind="normal")
    value = Component(Signal, value=0.0, kind="hinted")
    uncertainty = Component(Signal, value=0.0, kind="normal")
    unit = Component(Signal, value="", kind="normal")

    def __init__(self, *args, sample, **kwargs):
        super().__init__(*args, **kwargs)
        self._sample = sample

    def trigger(self):
        status = DeviceStatus(self)
        candidate, target = self._sample.get(), self.target.get()

        def finish():
            row = _LAB["values"].get(candidate)
            if candidate in _LAB["fail"]:
                status.set_exception(RuntimeError(f"sample {candidate} failed to synthesise"))
                return
            if row is None or target not in row:
                status.set_exception(ValueError(f"{candidate} cannot be measured for {target}"))
                return
            sigma = float(_LAB.get("noise_sigma", 0.0))
            seed = hashlib.sha256(f"{candidate}/{target}".encode()).digest()
            noise = random.Random(seed).gauss(0.0, sigma) if sigma > 0 else 0.0
            self.value.put(float(row[target]) + noise)
            self.uncertainty.put(sigma)
            self.unit.put(_LAB["units"][target])
            status.set_finished()

        latency = _LAB.get("latency_s_by_candidate", {}).get(candidate, _LAB.get("latency_s", 0.0))
        threading.Timer(float(latency), finish).start()
        return status


lab_sample = Signal(name="lab_sample", value="")
lab_probe = LabProbe(name="lab_probe", sample=lab_sample)


class MeasurementRecorder:
    """RunEngine subscriber: one JSON file per ``cloudlab_key`` for every successful run."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._runs: dict = {}

    def __call__(self, name: str, doc: dict) -> None:
        if name == "start" and doc.get("cloudlab_key"):
            self._runs[doc["uid"]] = {
                "key": doc["cloudlab_key"],
                "candidate_id": doc.get("candidate_id", ""),
                "run_uid": doc["uid"],
                "started_at": doc["time"],
                "values": {},
                "descriptors": set(),
            }
        elif name == "descriptor" and doc["run_start"] in self._runs:
            self._runs[doc["run_start"]]["descriptors"].add(doc["uid"])
        elif name == "event":
            for run in self._runs.values():
                if doc["descriptor"] in run["descriptors"]:
                    data = doc["data"]
                    run["values"][data["lab_probe_target"]] = {
                        "value": data["lab_probe_value"],
                        "unit": data["lab_probe_unit"],
                        "uncertainty": data["lab_probe_uncertainty"],
                    }
        elif name == "stop" and doc["run_start"] in self._runs:
            run = self._runs.pop(doc["run_start"])
            if doc.get("exit_status") == "success":
                run.pop("descriptors")
                run["finished_at"] = doc["time"]
                final = self.directory / f"{_file_name(run['key'])}.json"
                partial = final.with_suffix(".part")
                partial.write_text(json.dumps(run))
                os.replace(partial, final)  # a reader never sees half a record


def _file_name(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


RE = RunEngine({})
RE.subscribe(MeasurementRecorder(Path(_LAB["results_dir"])))


def cloudlab_measure(candidate_id: str, targets: list, key: str = ""):
    """Measure ``targets`` of ``candidate_id`` in one run tagged with ``key``."""
    md = {"cloudlab_key": key, "candidate_id": candidate_id, "targets": list(targets)}

    @bpp.run_decorator(md=md)
    def run():
        yield from bps.mv(lab_sample, candidate_id)
        for target in targets:
            yield from bps.mv(lab_probe.target, target)
            yield from bps.trigger_and_read([lab_sample, lab_probe])

    return (yield from run())


def cloudlab_result(key: str):
    """The measurement of the run tagged ``key``, or None if no run with it succeeded."""
    path = Path(_LAB["results_dir"]) / f"{_file_name(key)}.json"
    deadline = time.monotonic() + 2.0  # the stop document may be a moment behind the report
    while not path.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    return json.loads(path.read_text()) if path.exists() else None
