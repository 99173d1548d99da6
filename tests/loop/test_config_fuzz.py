"""Config fuzzing through the real CLI: every broken campaign file is one short error and exit 2.

Each case mutates ``configs/perovskite_water_splitting.yaml`` (as data or as text) and runs
``python -m loop run <file> --out <dir>`` in a subprocess. The answer must be exit status 2,
a few one-line problems (no traceback), the field or problem named, and no ``--out``
directory. Starting the CLI costs a few seconds, so the default run takes a spread of
:data:`QUICK` cases and the whole table is marked ``slow``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
BASE = REPO / "configs" / "perovskite_water_splitting.yaml"
MAX_LINE_CHARS = 400  # one problem per line, readable in a terminal


@dataclass(frozen=True)
class Case:
    """A broken config: ``data`` mutates the parsed YAML, ``text`` builds the file's bytes."""

    name: str
    expect: str  # must appear in the error
    data: Callable[[dict[str, Any]], Any] | None = None
    text: Callable[[str], bytes] | None = None
    max_lines: int = 3  # problems reported (one line each)


def _set(path: str, value: object) -> Callable[[dict[str, Any]], dict[str, Any]]:
    """Set a dotted ``path`` (``budget.experiments``) to ``value``."""

    def mutate(data: dict[str, Any]) -> dict[str, Any]:
        *parents, leaf = path.split(".")
        node = data
        for key in parents:
            node = node[int(key)] if isinstance(node, list) else node.setdefault(key, {})
        node[leaf] = value
        return data

    return mutate


def _drop(path: str) -> Callable[[dict[str, Any]], dict[str, Any]]:
    def mutate(data: dict[str, Any]) -> dict[str, Any]:
        *parents, leaf = path.split(".")
        node = data
        for key in parents:
            node = node[key]
        del node[leaf]
        return data

    return mutate


def _both(*mutations: Callable[[dict[str, Any]], Any]) -> Callable[[dict[str, Any]], Any]:
    def mutate(data: dict[str, Any]) -> Any:
        for m in mutations:
            data = m(data)
        return data

    return mutate


def _text(fn: Callable[[str], str]) -> Callable[[str], bytes]:
    return lambda text: fn(text).encode()


def _alias_bomb(_: str) -> str:
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 9)]
    return "\n".join(lines) + "\nname: bomb\n"


CASES = [
    # wrong types
    Case("experiments-string", "budget.experiments", data=_set("budget.experiments", "ten")),
    Case("n-members-string", "surrogate.n_members", data=_set("surrogate.n_members", "five")),
    Case("constraints-string", "constraints", data=_set("constraints", "ind_gap")),
    Case("budget-null", "budget", data=_set("budget", None)),
    Case("pool-list", "pool", data=_set("pool", ["perov_5"])),
    Case("splits-int", "pool.splits", data=_set("pool.splits", 3)),
    Case("top-level-list", "expected a mapping", text=_text(lambda t: "- a\n- b\n")),
    Case("top-level-scalar", "expected a mapping", text=_text(lambda t: "42\n")),
    Case("empty-file", "expected a mapping", text=_text(lambda t: "")),
    # missing sections
    Case("no-pool", "pool: Field required", data=_drop("pool")),
    Case("no-objective", "objective: Field required", data=_drop("objective")),
    Case("no-name", "name: Field required", data=_drop("name")),
    Case("no-pool-source", "exactly one of pool.dataset or pool.file", data=_drop("pool.dataset")),
    # huge numbers
    Case("n-members-1e9", "surrogate.n_members", data=_set("surrogate.n_members", 1e9)),
    Case("experiments-huge", "budget.experiments", data=_set("budget.experiments", 10**15)),
    Case("batch-huge", "acquisition.batch_size", data=_set("acquisition.batch_size", 10**6)),
    Case("gp-max-train-huge", "surrogate.gp_max_train", data=_set("surrogate.gp_max_train", 10**8)),
    Case("n-random-huge", "initial_design.n_random", data=_set("initial_design.n_random", 10**10)),
    Case("shortlist-huge", "acquisition.shortlist", data=_set("acquisition.shortlist", 10**9)),
    Case("seed-huge", "seed", data=_set("seed", 2**40)),
    # negative or zero sizes
    Case("experiments-negative", "budget.experiments", data=_set("budget.experiments", -5)),
    Case("batch-negative", "acquisition.batch_size", data=_set("acquisition.batch_size", -1)),
    Case("n-members-zero", "surrogate.n_members", data=_set("surrogate.n_members", 0)),
    Case("n-random-negative", "initial_design.n_random", data=_set("initial_design.n_random", -3)),
    Case("symprec-negative", "pool.symprec", data=_set("pool.symprec", -0.1)),
    Case("seed-negative", "seed", data=_set("seed", -1)),
    Case("refit-zero", "finetune.every_n_results", data=_set("finetune.every_n_results", 0)),
    Case(
        "failure-fraction", "stop.max_failure_fraction", data=_set("stop.max_failure_fraction", 1.5)
    ),  # fmt: skip
    # unknown keys and kinds
    Case("unknown-top-key", "budgte", data=_set("budgte", {"experiments": 5})),
    Case("unknown-nested-key", "acquisition.bach_size", data=_set("acquisition.bach_size", 4)),
    Case("unknown-acquisition", "acquisition.kind", data=_set("acquisition.kind", "magic")),
    Case("unknown-adapter", "adapter", data=_set("adapter.kind", "teleporter")),
    Case("unknown-dispatch-mode", "dispatch.mode", data=_set("dispatch.mode", "warp")),
    Case("schema-version", "schema_version", data=_set("schema_version", 2)),
    Case("bad-name", "name", data=_set("name", "bad name/with slash")),
    # inconsistent values
    Case(
        "window-low-high",
        "low < high",
        data=_both(_set("objective.sense", "window"), _set("objective.window", [3.0, 1.0])),
    ),  # fmt: skip
    Case("window-without-sense", "window is required", data=_set("objective.window", [1.0, 2.0])),
    Case(
        "constraint-inverted",
        "lower 5.0 > upper 1.0",
        data=_both(_set("constraints.0.lower", 5.0), _set("constraints.0.upper", 1.0)),
    ),  # fmt: skip
    Case(
        "constraint-unbounded",
        "needs a lower or an upper bound",
        data=_set("constraints", [{"target": "ind_gap"}]),
    ),  # fmt: skip
    Case(
        "batch-over-concurrency",
        "exceeds dispatch.concurrency",
        data=_set("dispatch.concurrency", 4),
    ),  # fmt: skip
    Case("adapter-capacity-zero", "capacity", data=_set("adapter.capacity", 0)),
    # broken files
    Case(
        "duplicate-section",
        "duplicate key 'budget'",
        text=_text(lambda t: t + "\nbudget:\n  experiments: 5\n"),
    ),  # fmt: skip
    Case(
        "duplicate-nested",
        "duplicate key 'n_members'",
        text=_text(lambda t: t.replace("  n_members: 5\n", "  n_members: 5\n  n_members: 500\n")),
    ),  # fmt: skip
    Case(
        "binary",
        "not a UTF-8 text file",
        text=lambda t: b"\x89PNG\r\n\x1a\n\x00\x00\xff" + t.encode(),
    ),  # fmt: skip
    Case("nul-byte", "unacceptable character #x0000", text=_text(lambda t: t + "\x00\n")),
    Case("unclosed-bracket", "not valid YAML", text=_text(lambda t: t + "extra: [unclosed\n")),
    Case(
        "tab-indent",
        "not valid YAML",
        text=_text(lambda t: t.replace("  n_members", "\tn_members")),
    ),  # fmt: skip
    Case(
        "python-tag",
        "could not determine a constructor",
        text=_text(lambda t: t + "evil: !!python/object/apply:os.system [echo hi]\n"),
    ),  # fmt: skip
    Case("alias-bomb", "aliases are expanded", text=_text(_alias_bomb)),
    Case("two-documents", "expected a single document", text=_text(lambda t: t + "---\nname: x\n")),
]
QUICK = {
    "experiments-string", "no-pool", "n-members-1e9", "batch-negative", "unknown-nested-key",
    "unknown-acquisition", "window-low-high", "duplicate-section", "binary", "alias-bomb",
}  # fmt: skip


def _write(case: Case, path: Path) -> None:
    if case.text is not None:
        path.write_bytes(case.text(BASE.read_text()))
        return
    assert case.data is not None
    data = case.data(yaml.safe_load(BASE.read_text()))
    path.write_text(yaml.safe_dump(data, sort_keys=False))


def _params() -> list[Any]:
    return [
        pytest.param(c, id=c.name, marks=() if c.name in QUICK else pytest.mark.slow) for c in CASES
    ]


def test_the_table_is_as_described() -> None:
    assert len(CASES) >= 40 and len({c.name for c in CASES}) == len(CASES)
    assert QUICK <= {c.name for c in CASES}


@pytest.mark.parametrize("case", _params())
def test_a_broken_config_is_a_short_error_and_exit_2(case: Case, tmp_path: Path) -> None:
    config, out = tmp_path / f"{case.name}.yaml", tmp_path / "out"
    _write(case, config)
    env = {**os.environ, "COLUMNS": "200", "NO_COLOR": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "loop", "run", str(config), "--out", str(out)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    output = done.stdout + done.stderr
    assert done.returncode == 2, output
    assert "Traceback" not in output, output
    assert case.expect in output, output
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert lines and lines[0].startswith("error: "), output
    assert len(lines) <= case.max_lines, output
    assert all(len(line) <= MAX_LINE_CHARS for line in lines), output
    assert not out.exists()
