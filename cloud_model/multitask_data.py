"""What supervised multi-task pretraining consumes: labelled SCOPE strings per task, plus
unlabelled strings for the masked-language-model loss, plus what the leakage guard removed.

A *task* is one (dataset, target) pair, named ``"<dataset>:<target>"`` (for example
``"crabnet_mp_e_form:e_form"`` or ``"aflow_ael:debye_temperature"``). Its rows are
``(scope_string, value)`` in the target's own unit; the trainer z-scores them on the
task's training rows. Composition-only rows use the composition SCOPE form (symmetry
and Wyckoff parts replaced by a dedicated "unknown" token sequence), so every row of
every task goes through the same tokenizer and trunk.

The corpus builder (:mod:`cloud_model.multitask_corpus`) makes these objects; the
multi-task trainer (:mod:`cloud_model.multitask`) reads them. Nothing here touches disk.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class TaskData:
    """The labelled rows of one (dataset, target) task, split by a fixed hash of the string."""

    name: str  # "<dataset>:<target>"
    unit: str  # the target's unit, as the registry states it
    train: list[tuple[str, float]]  # (SCOPE string, value)
    validation: list[tuple[str, float]]
    composition_only: bool = False  # rows carry no structure (composition SCOPE form)

    def __post_init__(self) -> None:
        if not self.train:
            raise ValueError(f"task {self.name!r} has no training rows")


@dataclass(frozen=True)
class GuardReport:
    """What the leakage guard removed from each labelled set, and why.

    ``removed[dataset][reason]`` counts rows dropped because their id, structure
    (SCOPE native string) or reduced formula occurs in an excluded pool; ``kept[dataset]``
    counts what remained; ``pools`` names every excluded pool (dataset and splits).
    """

    pools: list[str]
    removed: dict[str, dict[str, int]] = field(default_factory=dict)
    kept: dict[str, int] = field(default_factory=dict)

    def total_removed(self) -> int:
        return sum(sum(reasons.values()) for reasons in self.removed.values())


@dataclass(frozen=True)
class MultiTaskCorpus:
    """Labelled tasks, unlabelled strings for MLM (train, validation), and the guard's report."""

    tasks: list[TaskData]
    mlm_train: list[str]
    mlm_validation: list[str]
    guard: GuardReport

    def task(self, name: str) -> TaskData:
        for task in self.tasks:
            if task.name == name:
                return task
        raise KeyError(f"no task {name!r}; tasks: {[t.name for t in self.tasks]}")
