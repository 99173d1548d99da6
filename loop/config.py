"""Campaign configuration: one YAML file, validated before anything starts.

Every section is a pydantic model with ``extra="forbid"``, so a misspelt key is an
error naming its path (``acquisition.bach_size: extra inputs are not permitted``).
The adapter section is a discriminated union on ``kind``: ``simulated`` (the
dataset-backed simulated lab, in-process or in a Ray actor), ``http`` (any lab
orchestrator speaking the cloudlab lab protocol), ``gpaw`` (real DFT),
``chgnet`` (ML potential), ``queueserver`` (a Bluesky RE Manager) and ``sila``
(a SiLA 2 ExperimentRunner server). Secrets are never written in a config: only the *name*
of the environment variable that holds them (``adapter.token_env``).

See ``configs/*.yaml`` for commented examples; every one of them is loaded by a test.
Validating a config imports neither torch, Ray nor BoTorch (a test checks ``sys.modules``).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from adapters.engine import DispatchConfig
from adapters.http_lab import HttpLabConfig
from adapters.queueserver import QueueServerConfig
from adapters.sila2_lab import SilaConfig
from cloud_model.configs import EnsembleConfig
from cloud_model.errors import ConfigError
from loop.fidelity import FidelityConfig, highest_fidelity, output_names
from loop.generate.pipeline import GenerateConfig
from simulators.config import SimulatedLabConfig

if TYPE_CHECKING:
    from loop.objective import ObjectiveSpec

SCHEMA_VERSION = 1

# acquisition strategies (loop.acquisition implements them); defined here so that validating
# a config imports no BoTorch
AcquisitionKind = Literal[
    "qlogei", "qlognei", "qucb", "thompson", "greedy", "hits", "random", "qlognehvi"
]
# the strategies that work on a Pareto front of several objectives
MULTI_OBJECTIVE_KINDS = ("qlognehvi", "random")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PoolConfig(_Section):
    """The candidates: a registry dataset or a CSV file of CIF or SCOPE strings."""

    dataset: str | None = None  # registry name, e.g. perov_5
    splits: list[str] | None = None  # None = every split of the dataset
    file: Path | None = None  # CSV with an id column and a cif or scope column
    id_column: str = "material_id"
    structure_column: str = "cif"  # "cif" (encoded with SCOPE) or a column of SCOPE strings
    structure_format: Literal["cif", "scope"] = "cif"
    max_candidates: int | None = Field(default=None, ge=2)  # seeded subsample of the pool
    include_ids: list[str] | None = None  # keep only these candidates (e.g. a hand-picked DFT set)
    exclude_ids: list[str] = Field(default_factory=list)
    variant: Literal["cloud", "native"] = "cloud"  # SCOPE variant the surrogate reads
    symprec: float = Field(default=0.1, gt=0)  # spglib tolerance, Angstrom
    # candidate generators (loop/generate): `grow` adds candidates from the hits while it runs
    generators: GenerateConfig | None = None

    @model_validator(mode="after")
    def _one_source(self) -> PoolConfig:
        if (self.dataset is None) == (self.file is None):
            raise ValueError("give exactly one of pool.dataset or pool.file")
        return self


class ConstraintConfig(_Section):
    """``lower <= target <= upper``; at least one bound."""

    target: str
    lower: float | None = None
    upper: float | None = None

    @model_validator(mode="after")
    def _some_bound(self) -> ConstraintConfig:
        if self.lower is None and self.upper is None:
            raise ValueError(f"constraint on {self.target!r} needs a lower or an upper bound")
        if self.lower is not None and self.upper is not None and self.lower > self.upper:
            raise ValueError(
                f"constraint on {self.target!r}: lower {self.lower} > upper {self.upper}"
            )
        return self


class ObjectiveConfig(_Section):
    """What to optimise: maximise or minimise a target, or bring it into a window."""

    target: str
    sense: Literal["maximize", "minimize", "window"]
    window: tuple[float, float] | None = None

    @model_validator(mode="after")
    def _window(self) -> ObjectiveConfig:
        if (self.sense == "window") != (self.window is not None):
            raise ValueError("objective.window is required with sense 'window' and only then")
        if self.window is not None and self.window[0] >= self.window[1]:
            raise ValueError(f"objective.window {self.window} must be (low, high) with low < high")
        return self


LearningKind = Literal[
    "cloud_ensemble", "gp", "gp_chgnet", "gp_cloud", "gp_transfer", "gp_transfer_chgnet"
]
# the kinds that are one exact GP over feature blocks (the composition descriptor first)
GP_KINDS = ("gp", "gp_chgnet", "gp_cloud", "gp_transfer", "gp_transfer_chgnet")
# gp_transfer: composition models trained on these formula sets predict the pool (loop/transfer.py)
DEFAULT_TRANSFER_SETS = (
    "crabnet_log10_gvrh",
    "crabnet_log10_kvrh",
    "crabnet_mp_e_form",
    "crabnet_mp_gap",
    "crabnet_mp_e_hull",
)


class SurrogateConfig(_Section):
    """The model inside the acquisition loop."""

    # gp_cloud: the GP with a composition block and a block on the checkpoint's CLOUD embeddings;
    # auto: every kind in `candidates` is fitted, the one whose predictions of each batch (made
    # before it was measured) were most likely so far makes the decisions (loop.auto_surrogate)
    # gp_transfer: the GP with a composition block and a block of what models trained on other
    # labelled formula sets (`transfer_sets`) predict for each candidate
    # gp_chgnet: the GP with a composition block and a block of CHGNet crystal features of each
    # candidate's structure (loop/chgnet_block.py; needs structures; contaminated on pools of
    # Materials Project energies, which CHGNet was trained on)
    # gp_transfer_chgnet: the three blocks of gp_transfer and gp_chgnet in one additive kernel
    kind: Literal[
        "auto",
        "cloud_ensemble",
        "gp",
        "gp_chgnet",
        "gp_cloud",
        "gp_transfer",
        "gp_transfer_chgnet",
        "random",
    ] = "cloud_ensemble"
    transfer_sets: list[str] = Field(
        default_factory=lambda: list(DEFAULT_TRANSFER_SETS), min_length=1, max_length=16
    )
    candidates: list[LearningKind] = Field(
        # the first is used until the candidates have been scored
        default_factory=lambda: list[LearningKind](["gp_transfer", "cloud_ensemble"])
    )
    # pretrained checkpoint directory; "default" = the shipped cloud-small-multitask; null = no pretraining
    checkpoint: str | None = "default"
    n_members: int = Field(default=5, ge=1, le=64)  # K of the deep ensemble; 5 is usual
    # cloud_ensemble output head: regression, debye (theta or Cv(T) via the Debye model) or
    # debye_einstein (Cv(T), acoustic branches Debye + optical Einstein modes; needs
    # ensemble.debye_output: heat_capacity)
    head: Literal["regression", "debye", "debye_einstein"] = "regression"
    # gp: training rows kept (own measurements first, then a random share of prior data)
    gp_max_train: int = Field(default=500, ge=2, le=20_000)  # exact GP: O(n^3) per fit step
    # gp kinds: rows the posterior conditions on with the hyperparameters fitted on
    # gp_max_train (the same order, so those are among them); one O(n^3) factorisation a refit;
    # never fewer than gp_max_train
    gp_max_condition: int = Field(default=2000, ge=2, le=20_000)
    # gp, gp_cloud: model Yeo-Johnson-warped values (fitted per refit; loop/warp.py)
    gp_warp: bool = False
    # campaigns with fidelities: icm (one kernel shared by the fidelities) or lmc (two kernels:
    # a shared trend and a highest-fidelity correction with its own length scales;
    # loop/mf_surrogate.py)
    mf_kernel: Literal["icm", "lmc"] = "icm"
    ensemble: EnsembleConfig = Field(
        default_factory=lambda: EnsembleConfig(
            n_trainable_blocks=0, epochs=60, warm_start_epochs=30
        )
    )

    @model_validator(mode="after")
    def _check_candidates(self) -> SurrogateConfig:
        if self.kind == "auto":
            if len(set(self.candidates)) < 2 or len(set(self.candidates)) != len(self.candidates):
                raise ValueError(
                    f"surrogate.candidates {self.candidates} must name two or more different "
                    "kinds for surrogate.kind auto"
                )
            if "gp_cloud" in self.candidates and self.checkpoint is None:
                raise ValueError("surrogate.candidates gp_cloud needs a surrogate.checkpoint")
        if self.head == "debye_einstein" and self.ensemble.debye_output != "heat_capacity":
            raise ValueError(
                "surrogate.head debye_einstein predicts heat capacities: set "
                "surrogate.ensemble.debye_output: heat_capacity (the debye head also takes theta)"
            )
        return self


class AcquisitionConfig(_Section):
    kind: AcquisitionKind = "qlogei"
    batch_size: int = Field(default=8, ge=1, le=4096)  # q: candidates chosen per decision
    beta: float = Field(default=2.0, gt=0)  # qUCB exploration weight
    # hits: the share of the pool a campaign counts as its hits (the best, feasible ones)
    top_fraction: float = Field(default=0.01, gt=0, le=0.5)
    # candidates the pending-aware batch optimisation runs over (see loop.acquisition.select_batch);
    # None: 2,048 for ensembles (cached predictions), 256 for the GP (exact joint posteriors)
    shortlist: int | None = Field(default=None, ge=16, le=100_000)

    def shortlist_for(self, surrogate_kind: str) -> int:
        """The shortlist size used with a surrogate of ``surrogate_kind``."""
        if self.shortlist is not None:
            return self.shortlist
        return 256 if surrogate_kind in GP_KINDS else 2048


class InitialDesignConfig(_Section):
    """Experiments before the surrogate has data: given ids, then ``n_random`` more.

    ``method``: ``random`` (seeded uniform picks) or ``diverse`` (greedy max-min distance over
    the surrogate's label-free pool features, :mod:`loop.design`; random when it has none).
    """

    n_random: int = Field(default=16, ge=0, le=1_000_000)
    ids: list[str] = Field(default_factory=list)
    method: Literal["random", "diverse"] = "random"


class BudgetConfig(_Section):
    experiments: int = Field(default=100, ge=1, le=1_000_000)  # jobs submitted, failures included
    cost: float | None = Field(default=None, gt=0)  # in the adapter's cost unit
    wall_time_s: float | None = Field(default=None, gt=0)


def _check_settings(settings: dict[str, Any], model: type[BaseModel]) -> dict[str, Any]:
    """Validate ``settings`` against the adapter's settings model; keep them as given."""
    try:
        model.model_validate(settings)
    except ValidationError as exc:
        problems = "; ".join(
            f"settings.{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()
        )
        raise ValueError(problems) from None
    return settings


class GpawAdapterConfig(_Section):
    kind: Literal["gpaw"] = "gpaw"
    settings: dict[str, Any] = Field(default_factory=dict)  # adapters.dft.GpawSettings fields
    work_dir: Path | None = None  # job directories; default: <campaign dir>/gpaw

    @field_validator("settings")
    @classmethod
    def _typed(cls, value: dict[str, Any]) -> dict[str, Any]:
        from adapters.dft import GpawSettings  # imports neither GPAW nor torch

        return _check_settings(value, GpawSettings)


class ChgnetAdapterConfig(_Section):
    kind: Literal["chgnet"] = "chgnet"
    settings: dict[str, Any] = Field(default_factory=dict)  # adapters.mlip.ChgnetSettings fields
    work_dir: Path | None = None  # job directories; default: <campaign dir>/chgnet

    @field_validator("settings")
    @classmethod
    def _typed(cls, value: dict[str, Any]) -> dict[str, Any]:
        from adapters.mlip import ChgnetSettings  # imports neither CHGNet nor torch

        return _check_settings(value, ChgnetSettings)


# orchestrator adapters (Bluesky queueserver, SiLA 2) keep their typed configs beside them
AdapterConfig = Annotated[
    SimulatedLabConfig
    | HttpLabConfig
    | GpawAdapterConfig
    | ChgnetAdapterConfig
    | QueueServerConfig
    | SilaConfig,
    Field(discriminator="kind"),
]
# a fidelity may name its own adapter (loop/fidelity.py): the union above completes its model
FidelityConfig.model_rebuild(_types_namespace={"AdapterConfig": AdapterConfig})
# adapters that compute on this machine: their settings take no unknown request parameter
LocalAdapterConfig = GpawAdapterConfig | ChgnetAdapterConfig


def _check_local_fidelity(
    f: FidelityConfig, adapter: LocalAdapterConfig, outputs: dict[str, str]
) -> None:
    """A GPAW or CHGNet adapter can measure ``outputs`` (target -> reported name) and takes
    ``f.parameters``."""
    if isinstance(adapter, GpawAdapterConfig):
        from adapters.dft import GPAW_TARGET_UNITS as units
        from adapters.dft import GpawAdapter as local
        from adapters.dft import GpawSettings as model
    else:
        from adapters.mlip import CHGNET_TARGET_UNITS as units  # type: ignore[assignment]
        from adapters.mlip import ChgnetAdapter as local  # type: ignore[assignment]
        from adapters.mlip import ChgnetSettings as model  # type: ignore[assignment]
    unknown = {t: name for t, name in outputs.items() if name not in units}
    if unknown:
        target = next(iter(unknown))
        example = target if target in units else sorted(units)[0]
        raise ValueError(
            f"outputs: the {adapter.kind} adapter cannot measure {sorted(unknown.values())} (it "
            f"reports {sorted(units)}); map the objective's target to one of them, e.g. "
            f"outputs: {{{target}: {example}}}"
        )
    forbidden = sorted(({"work_dir", "max_parallel"} | local.adapter_only) & f.parameters.keys())
    if forbidden:
        raise ValueError(
            f"parameters: {forbidden} are settings of the {adapter.kind} adapter itself; put them "
            "in the adapter's `settings`"
        )
    try:
        model.model_validate({**adapter.settings, **f.parameters})
    except ValidationError as exc:
        problems = "; ".join(
            f"parameters.{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()
        )
        raise ValueError(problems) from None


class DispatchSection(DispatchConfig):
    """Ray dispatch settings plus how the loop waits for jobs."""

    # "ray": adapter calls in Ray actors (the default); "inline": in this process, with the
    # simulated lab on a virtual clock (no waiting at all: benchmarks and tests)
    mode: Literal["ray", "inline"] = "ray"
    # refill free slots as soon as "any" job ends, or only when "all" in-flight jobs ended
    # (synchronous batches: decisions then do not depend on completion order)
    wait_for: Literal["any", "all"] = "any"
    # stop the campaign (non-zero exit, store consistent, `cloudlab resume` continues) when no
    # adapter call has succeeded for this many seconds while calls keep failing; a job whose
    # retries run out then is not counted as failed either. None: only max_retries decides
    lab_deadline_s: float | None = Field(default=600.0, gt=0)


class FinetunePolicy(_Section):
    every_n_results: int = Field(default=8, ge=1)  # refit after this many new measurements
    warm_start: bool = True  # continue from the previous weights (replaying all data)


class StopConfig(_Section):
    no_improvement_rounds: int | None = Field(default=None, ge=1)  # decisions without a new best
    max_failure_fraction: float = Field(default=0.8, gt=0, le=1)  # stop when failing this often


class ApprovalConfig(_Section):
    """The approval gate: whether a person must approve each proposed experiment first."""

    # auto: proposals are submitted at once; required: stored as PROPOSED and submitted only
    # after `cloudlab approve` (or the dashboard's operator) approved them (loop/approval.py)
    mode: Literal["auto", "required"] = "auto"
    # wall seconds a proposal may wait for a decision; None: wait as long as it takes
    timeout_s: float | None = Field(default=None, gt=0)
    # what a timeout does: skip (rejected by "timeout", never proposed again) or approve
    on_timeout: Literal["skip", "approve"] = "skip"
    # wall seconds between looks at the store for decisions made by another process
    poll_interval_s: float = Field(default=0.5, gt=0, le=60)


class CampaignConfig(_Section):
    """A whole campaign. ``schema_version`` guards against configs from another release."""

    schema_version: Literal[1] = 1
    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    seed: int = Field(default=0, ge=0, le=2**32 - 1)  # numpy and torch generators take it
    pool: PoolConfig
    # labelled data the surrogate trains on from the start (e.g. materials published before a
    # cut-off year); never selectable, never counted as experiments
    prior: PoolConfig | None = None
    objective: ObjectiveConfig
    # further objectives: with any, the campaign searches the Pareto front of `objective` and
    # these (acquisition qlognehvi) and the report shows the front and its hypervolume
    objectives: list[ObjectiveConfig] = Field(default_factory=list, max_length=4)
    constraints: list[ConstraintConfig] = Field(default_factory=list)
    surrogate: SurrogateConfig = SurrogateConfig()
    acquisition: AcquisitionConfig = AcquisitionConfig()
    initial_design: InitialDesignConfig = InitialDesignConfig()
    budget: BudgetConfig = BudgetConfig()
    adapter: AdapterConfig = Field(default_factory=SimulatedLabConfig)
    dispatch: DispatchSection = DispatchSection()
    finetune: FinetunePolicy = FinetunePolicy()
    stop: StopConfig = StopConfig()
    # torch/OpenMP threads of the campaign process and of what it starts (Ray workers inherit
    # them); "auto": $CLOUDLAB_THREADS, else the cores this process may use (cloud_model.threads)
    threads: Annotated[int, Field(ge=1, le=256)] | Literal["auto"] = "auto"
    approval: ApprovalConfig = ApprovalConfig()
    # multi-fidelity (loop/fidelity.py): named measurements with costs; none = one fidelity,
    # every experiment costing 1
    fidelities: list[FidelityConfig] = Field(default_factory=list, max_length=8)

    @model_validator(mode="after")
    def _check_fidelities(self) -> CampaignConfig:
        if not self.fidelities:
            return self
        names = [f.name for f in self.fidelities]
        if len(set(names)) != len(names):
            raise ValueError(f"fidelities: duplicate names {names}")
        highest_fidelity(self.fidelities)  # raises naming the problem
        if len(self.targets) != 1:
            raise ValueError(
                f"fidelities: a multi-fidelity campaign measures one target, got {self.targets} "
                "(constraints are not supported with fidelities)"
            )
        if self.surrogate.kind not in GP_KINDS:
            raise ValueError(
                f"fidelities: surrogate.kind {self.surrogate.kind} is not a GP; the "
                f"multi-fidelity GP uses the features of {', '.join(GP_KINDS)}"
            )
        highest = self.highest_fidelity
        for i, f in enumerate(self.fidelities):
            where = f"fidelities[{i}] ({f.name})"
            unknown = sorted(set(f.outputs) - set(self.targets))
            if unknown:
                raise ValueError(
                    f"{where}.outputs: {unknown} are not targets of the "
                    f"objective or constraints {list(self.targets)}"
                )
            adapter = self.fidelity_adapter(f.name)
            if f.simulated is not None and not isinstance(adapter, SimulatedLabConfig):
                raise ValueError(
                    f"{where}.simulated: only a simulated lab reads it, but this fidelity is "
                    f"measured by the campaign's {adapter.kind} adapter; drop `simulated`, or "
                    "give the campaign adapter kind simulated"
                )
            if isinstance(adapter, GpawAdapterConfig | ChgnetAdapterConfig):
                reported = output_names(f, self.targets, is_highest=f.name == highest)
                try:
                    _check_local_fidelity(f, adapter, reported)
                except ValueError as exc:
                    raise ValueError(f"{where}.{exc}") from None
        if self.objectives or self.acquisition.kind not in ("qlogei", "random"):
            raise ValueError(
                "fidelities: the cost-aware acquisition optimises one objective; use "
                "acquisition.kind qlogei (cost-aware) or random, without `objectives`"
            )
        if self.budget.cost is None:
            raise ValueError("fidelities: give budget.cost (the budget is in cost units)")
        if self.pool.generators is not None and self.pool.generators.grow is not None:
            raise ValueError(
                "fidelities: pool.generators.grow is not supported in a multi-fidelity campaign "
                "(the cost-aware agent is not rebuilt over a grown pool); drop one of them"
            )
        return self

    @property
    def fidelity_names(self) -> tuple[str, ...]:
        """The fidelities' names; ``("",)`` for a single-fidelity campaign."""
        return tuple(f.name for f in self.fidelities) or ("",)

    @property
    def highest_fidelity(self) -> str:
        """The name of the fidelity the campaign optimises; ``""`` without fidelities."""
        return self.fidelities[highest_fidelity(self.fidelities)].name if self.fidelities else ""

    def fidelity_adapter(self, name: str) -> AdapterConfig:
        """The adapter that measures fidelity ``name``: its own, else the campaign's."""
        for f in self.fidelities:
            if f.name == name:
                return f.adapter if f.adapter is not None else self.adapter
        raise ConfigError(f"unknown fidelity {name!r}; the campaign has {self.fidelity_names}")

    @property
    def routes_fidelities(self) -> bool:
        """Whether jobs go through :class:`adapters.routing.FidelityRouter`: some fidelity has
        its own adapter, or the campaign's adapter computes locally (GPAW, CHGNet), whose
        settings take no ``fidelity`` parameter (the router sends them each fidelity's
        ``parameters`` only)."""
        if not self.fidelities:
            return False
        local = isinstance(self.adapter, GpawAdapterConfig | ChgnetAdapterConfig)
        return local or any(f.adapter is not None for f in self.fidelities)

    def campaign_adapter_fidelities(self) -> CampaignConfig:
        """This config with only the fidelities the campaign's ``adapter`` measures (and the
        highest, which names the objective's columns): what a simulated lab is built from."""
        highest = self.highest_fidelity
        kept = [f for f in self.fidelities if f.adapter is None or f.name == highest]
        return self.model_copy(update={"fidelities": kept})

    def fidelity_cost(self, name: str) -> float:
        """Cost of one experiment at fidelity ``name`` (1 without fidelities)."""
        for f in self.fidelities:
            if f.name == name:
                return f.cost
        if not self.fidelities and name == "":
            return 1.0
        raise ConfigError(f"unknown fidelity {name!r}; the campaign has {self.fidelity_names}")

    @model_validator(mode="after")
    def _batch_fits_concurrency(self) -> CampaignConfig:
        concurrency = self.dispatch.concurrency
        if concurrency is not None and self.acquisition.batch_size > concurrency:
            raise ValueError(
                f"acquisition.batch_size {self.acquisition.batch_size} exceeds dispatch.concurrency "
                f"{concurrency}: a batch could never be submitted; lower the batch or raise "
                "the concurrency"
            )
        unknown = sorted(set(self.dispatch.group_concurrency) - set(self.fidelity_names))
        if unknown:
            raise ValueError(
                f"dispatch.group_concurrency names {unknown}, not fidelities of this campaign "
                f"(its fidelities: {self.fidelity_names}); set a fidelity's limit with its "
                "`max_in_flight`"
            )
        return self

    @model_validator(mode="after")
    def _pareto_needs_a_pareto_strategy(self) -> CampaignConfig:
        kind = self.acquisition.kind
        names = [self.objective.target] + [o.target for o in self.objectives]
        if len(set(names)) != len(names):
            raise ValueError(f"objectives repeat a target: {names}")
        if self.objectives and kind not in MULTI_OBJECTIVE_KINDS:
            raise ValueError(
                f"acquisition.kind {kind} optimises one objective; with `objectives` use one of "
                f"{', '.join(MULTI_OBJECTIVE_KINDS)}"
            )
        if not self.objectives and kind == "qlognehvi":
            raise ValueError(
                "acquisition.kind qlognehvi needs two or more objectives (`objectives`)"
            )
        return self

    @property
    def targets(self) -> tuple[str, ...]:
        """Every measured target: the objectives' first, then the constraints', no repeats."""
        names = [self.objective.target] + [o.target for o in self.objectives]
        names += [c.target for c in self.constraints]
        return tuple(dict.fromkeys(names))

    def objective_spec(self) -> ObjectiveSpec:
        from loop.objective import Bound, Goal, ObjectiveSpec

        col = {t: i for i, t in enumerate(self.targets)}
        return ObjectiveSpec(
            targets=self.targets,
            primary=0,
            sense=self.objective.sense,
            window=self.objective.window,
            constraints=tuple(Bound(col[c.target], c.lower, c.upper) for c in self.constraints),
            others=tuple(Goal(col[o.target], o.sense, o.window) for o in self.objectives),
        )

    def fingerprint(self) -> str:
        """sha256 of the canonical JSON: a resumed campaign must have the same config."""
        data = self.model_dump(mode="json")
        data.pop("threads")  # how fast it runs, not what it does: may change on resume
        for section in ("pool", "prior"):  # campaigns from before pool generators existed resume
            if isinstance(data.get(section), dict) and data[section].get("generators") is None:
                data[section].pop("generators", None)
        if self.approval == ApprovalConfig():  # campaigns from before the gate existed resume
            data.pop("approval")
        if not self.fidelities:  # nor do those from before fidelities existed
            data.pop("fidelities")
        for f in data.get("fidelities", []):  # nor those from before fidelities had adapters
            if f.get("adapter") is None:
                f.pop("adapter", None)
            if f.get("max_in_flight") is None:  # nor before they had in-flight limits
                f.pop("max_in_flight", None)
        if data["initial_design"].get("method") == "random":  # nor before diverse designs
            data["initial_design"].pop("method")
        if not data["dispatch"].get("group_concurrency"):
            data["dispatch"].pop("group_concurrency", None)
        text = json.dumps(data, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()


def format_validation_error(exc: ValidationError, source: str) -> str:
    """One line per problem: ``source: field.path: reason``."""
    lines = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"]) or "(top level)"
        lines.append(f"{source}: {where}: {err['msg']}")
    return "\n".join(lines)


def parse_config(data: Any, *, source: str = "config") -> CampaignConfig:
    """Validate a mapping into a :class:`CampaignConfig`.

    Raises:
        ConfigError: naming each invalid field path and the reason.
    """
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping of sections, got {type(data).__name__}")
    try:
        return CampaignConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, source)) from None


def load_config(path: str | Path) -> CampaignConfig:
    """Read and validate a campaign YAML file.

    Raises:
        ConfigError: the file is missing, is not UTF-8 YAML, repeats a key, or does not
            validate.
    """
    from cloud_model.yaml_file import read_yaml

    data = read_yaml(path, what="campaign config")
    return parse_config(data, source=str(path))
