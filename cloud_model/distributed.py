"""Data-parallel pretraining with Ray Train: the same :func:`~cloud_model.pretrain.train_loop`
in ``num_workers`` processes under ``TorchTrainer`` (DDP; gloo on CPU, NCCL on GPUs).

Each worker gets the corpus and the tokenizer (as JSON text) through the
trainer's config, builds the same initial weights from the seed, wraps the
model with ``ray.train.torch.prepare_model`` and reads its own disjoint rows of
every global batch. Rank 0 writes the training states and the final checkpoint
to ``out_dir`` (a path every worker can reach: local disk for one machine, shared
storage for a cluster).
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cloud_model.errors import CheckpointError
from cloud_model.pretrain import RESULT_FILE, Corpus, PretrainConfig, PretrainResult, train_loop

if TYPE_CHECKING:
    from cloud_model.tokenizer import ScopeTokenizer

logger = logging.getLogger(__name__)


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
    out_dir: Path,
    corpus: Corpus,
    tokenizer: ScopeTokenizer,
    *,
    resume: bool = False,
    command: str = "",
) -> PretrainResult:
    """Run :func:`train_loop` on ``config.train.num_workers`` Ray Train workers.

    Starts a local Ray runtime (dashboard off) unless one is already connected.

    Returns:
        Rank 0's :class:`PretrainResult` (read back from ``out_dir/pretrain_result.json``;
        each rank's rows and losses are in ``out_dir/shards/rank_<r>.json``).
    """
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    if not ray.is_initialized():
        ray.init(include_dashboard=False, configure_logging=False, log_to_driver=True)
    train_cfg = config.train
    trainer = TorchTrainer(
        _worker,
        train_loop_config={
            "config": config.model_dump(mode="json"),
            "train": corpus.train,
            "validation": corpus.validation,
            "sources": corpus.sources,
            "tokenizer": _tokenizer_to_text(tokenizer),
            "out_dir": str(out_dir.resolve()),
            "resume": resume,
            "command": command,
        },
        torch_config=TorchConfig(backend="nccl" if train_cfg.use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=train_cfg.num_workers, use_gpu=train_cfg.use_gpu),
        run_config=RunConfig(name="pretrain", storage_path=str((out_dir / "ray").resolve())),
    )
    logger.info(
        "Ray Train: %d workers (%s)",
        train_cfg.num_workers,
        "GPU" if train_cfg.use_gpu else "CPU, gloo",
    )
    (out_dir / RESULT_FILE).unlink(missing_ok=True)  # never report a previous run's result
    trainer.fit()  # raises ray.train.TrainingFailedError if a worker failed
    result_file = out_dir / RESULT_FILE
    if not result_file.is_file():
        raise CheckpointError(f"{result_file}: the Ray Train run ended without rank 0's result")
    return PretrainResult.model_validate_json(result_file.read_text(encoding="utf-8"))
