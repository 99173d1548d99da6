"""The model package's work on Ray: ensemble members as Ray actors, pretraining under Ray Train.

Nothing here starts Ray. The caller (the CLI, a benchmark, the campaign loop)
starts or joins it first, e.g. with ``adapters.ray_runtime.ensure_ray``; every
entry point checks with :func:`require_ray` and raises
:class:`~cloud_model.errors.RayNotStartedError` otherwise, so that one place
decides how Ray is started (local size, cluster address, authentication, logs).

* :func:`fit_members_with_ray`: members of an ensemble train in parallel as
  :class:`MemberTrainer` actors, each pinned to a GPU or a fraction of one
  (``gpus_per_member``), or to one CPU. Members go to the actors as JSON spec +
  tensor dicts and come back the same way.
* :func:`pretrain_with_ray`: the same :func:`~cloud_model.pretrain.train_loop`
  in ``train.num_workers`` processes under ``TorchTrainer`` (DDP; gloo on CPU,
  NCCL on GPUs). Each worker gets the corpus and the tokenizer (as JSON text)
  through the trainer's config, builds the same initial weights from the seed,
  wraps the model with ``ray.train.torch.prepare_model`` and reads its own
  disjoint rows of every global batch. Rank 0 writes the training states and the
  final checkpoint to ``out_dir`` (a path every worker can reach: local disk for
  one machine, shared storage for a cluster).

Imports: this module imports :mod:`cloud_model.finetune` and
:mod:`cloud_model.pretrain`; neither imports it back.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import Tensor

from cloud_model.errors import CheckpointError, RayNotStartedError
from cloud_model.finetune import (
    FeatureSet,
    FinetuneConfig,
    MemberFitReport,
    MemberNet,
    resolve_device,
    train_member,
)
from cloud_model.pretrain import (
    RESULT_FILE,
    Corpus,
    PretrainConfig,
    PretrainResult,
    prepare_run,
    train_loop,
)
from cloud_model.trunk import MemberSpec

if TYPE_CHECKING:
    from cloud_model.tokenizer import ScopeTokenizer

logger = logging.getLogger(__name__)


def ray_is_running() -> bool:
    """Whether this process is connected to Ray (False when Ray is not installed)."""
    try:
        import ray
    except ImportError:
        return False
    return bool(ray.is_initialized())


def require_ray(what: str) -> None:
    """Raise unless this process is connected to Ray.

    Args:
        what: the work that needs Ray, for the message.

    Raises:
        RayNotStartedError: Ray is not initialised in this process.
    """
    if not ray_is_running():
        raise RayNotStartedError(
            f"{what} runs on Ray, but this process is not connected to Ray: start or join it "
            "first (e.g. adapters.ray_runtime.ensure_ray(); `cloudlab` commands do this), "
            "or choose in-process work"
        )


# ----------------------------------------------------------------- ensemble members


class MemberTrainer:
    """A Ray actor that trains members on its own device (a GPU share, or the CPU)."""

    def __init__(self) -> None:
        self.device = resolve_device("auto")

    def train(
        self,
        spec_json: str,
        state: dict[str, Tensor],
        train: FeatureSet,
        val: FeatureSet | None,
        config_json: str,
        epochs: int,
        seed: int,
    ) -> tuple[dict[str, Tensor], str]:
        """Rebuild the member, train it, return its CPU weights and the report as JSON."""
        member = MemberNet(MemberSpec.model_validate_json(spec_json))
        member.load_state_dict(state)
        config = FinetuneConfig.model_validate_json(config_json)
        report = train_member(
            member, train, val, config, epochs=epochs, seed=seed, device=self.device
        )
        weights = {k: v.detach().cpu() for k, v in member.state_dict().items()}
        return weights, report.model_dump_json()


def fit_members_with_ray(
    members: list[MemberNet],
    trains: list[FeatureSet],
    val: FeatureSet | None,
    config: FinetuneConfig,
    epochs: int,
    gpus_per_member: float,
) -> list[MemberFitReport]:
    """Train member k on ``trains[k]`` (seed ``config.seed + k``) in Ray actors; in place.

    Args:
        members: the K member modules; trains: their K training sets (a set shared
            by several members is sent once).
        val: shared validation rows for early stopping (None = none).
        config: training hyperparameters; epochs: at most this many passes.
        gpus_per_member: GPU share of each actor when the cluster has GPUs and CUDA exists.

    Returns:
        One report per member; the members hold the trained weights, in eval mode.

    Raises:
        RayNotStartedError: Ray is not running in this process.
    """
    require_ray("training ensemble members in parallel (parallel='ray')")
    import ray
    import torch

    resources = ray.cluster_resources()
    use_gpu = torch.cuda.is_available() and resources.get("GPU", 0) > 0 and gpus_per_member > 0
    if use_gpu:
        slots = int(resources.get("GPU", 0) / gpus_per_member)
        options = {"num_gpus": gpus_per_member, "num_cpus": 0}
    else:
        slots = int(resources.get("CPU", 1))
        options = {"num_gpus": 0, "num_cpus": 1}
    n_actors = max(1, min(len(members), slots))
    actor_cls: Any = ray.remote(MemberTrainer)
    actors: list[Any] = [actor_cls.options(**options).remote() for _ in range(n_actors)]
    base = {name: getattr(config, name) for name in FinetuneConfig.model_fields}
    config_json = FinetuneConfig.model_validate(base).model_dump_json()
    val_ref = ray.put(val)
    train_refs = {id(t): ray.put(t) for t in trains}  # a shared training set is sent once
    futures = []
    for k, (member, train) in enumerate(zip(members, trains, strict=True)):
        state = {name: v.detach().cpu() for name, v in member.state_dict().items()}
        futures.append(
            actors[k % n_actors].train.remote(
                member.spec.model_dump_json(),
                state,
                train_refs[id(train)],
                val_ref,
                config_json,
                epochs,
                config.seed + k,
            )
        )
    logger.info("training %d members on %d Ray actors (%s)", len(members), n_actors, options)
    try:
        results = ray.get(futures)
    finally:
        for actor in actors:
            ray.kill(actor)
    reports = []
    for member, (state, report_json) in zip(members, results, strict=True):
        member.load_state_dict(state)
        member.eval()
        reports.append(MemberFitReport.model_validate_json(report_json))
    return reports


# ----------------------------------------------------------------- pretraining


def _tokenizer_to_text(tokenizer: ScopeTokenizer) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "tokenizer.json"
        tokenizer.save(path)
        return path.read_text(encoding="utf-8")


def _tokenizer_from_text(text: str) -> ScopeTokenizer:
    from cloud_model.tokenizer import ScopeTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "tokenizer.json"
        path.write_text(text, encoding="utf-8")
        return ScopeTokenizer.load(path)


def _worker(loop_config: dict[str, Any]) -> None:
    """Body of each Ray Train worker (module level so Ray can import it)."""
    import ray.train
    import ray.train.torch

    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    logging.basicConfig(
        level=logging.INFO, format=f"[rank {rank}] %(levelname)s %(name)s: %(message)s"
    )
    config = PretrainConfig.model_validate(loop_config["config"])
    corpus = Corpus(loop_config["train"], loop_config["validation"], loop_config["sources"])
    train_loop(
        config,
        Path(loop_config["out_dir"]),
        corpus,
        _tokenizer_from_text(loop_config["tokenizer"]),
        resume=loop_config["resume"],
        command=loop_config["command"],
        rank=rank,
        world_size=world_size,
        device=ray.train.torch.get_device(),
        wrap_model=ray.train.torch.prepare_model,
    )


def pretrain_with_ray(
    config: PretrainConfig,
    out_dir: str | Path,
    *,
    resume: bool = False,
    corpus: Corpus | None = None,
    tokenizer: ScopeTokenizer | None = None,
    command: str = "",
) -> PretrainResult:
    """:func:`~cloud_model.pretrain.pretrain` on ``config.train.num_workers`` Ray Train workers.

    Args:
        config, out_dir, resume, corpus, tokenizer, command: as for
            :func:`~cloud_model.pretrain.pretrain` (workers log instead of calling back).

    Returns:
        Rank 0's :class:`~cloud_model.pretrain.PretrainResult` (read back from
        ``out_dir/pretrain_result.json``; each rank's rows and losses are in
        ``out_dir/shards/rank_<r>.json``).

    Raises:
        RayNotStartedError: Ray is not running in this process.
        ConfigError: ``out_dir`` holds a run and ``resume`` is False.
        CheckpointError: the run ended without rank 0's result.
    """
    require_ray(f"pretraining on {config.train.num_workers} Ray Train workers")
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    out, corpus, tokenizer = prepare_run(
        config, out_dir, resume=resume, corpus=corpus, tokenizer=tokenizer
    )
    train_cfg = config.train
    trainer = TorchTrainer(
        _worker,
        train_loop_config={
            "config": config.model_dump(mode="json"),
            "train": corpus.train,
            "validation": corpus.validation,
            "sources": corpus.sources,
            "tokenizer": _tokenizer_to_text(tokenizer),
            "out_dir": str(out.resolve()),
            "resume": resume,
            "command": command,
        },
        torch_config=TorchConfig(backend="nccl" if train_cfg.use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=train_cfg.num_workers, use_gpu=train_cfg.use_gpu),
        run_config=RunConfig(name="pretrain", storage_path=str((out / "ray").resolve())),
    )
    logger.info(
        "Ray Train: %d workers (%s)",
        train_cfg.num_workers,
        "GPU" if train_cfg.use_gpu else "CPU, gloo",
    )
    (out / RESULT_FILE).unlink(missing_ok=True)  # never report a previous run's result
    trainer.fit()  # raises ray.train.TrainingFailedError if a worker failed
    result_file = out / RESULT_FILE
    if not result_file.is_file():
        raise CheckpointError(f"{result_file}: the Ray Train run ended without rank 0's result")
    return PretrainResult.model_validate_json(result_file.read_text(encoding="utf-8"))
