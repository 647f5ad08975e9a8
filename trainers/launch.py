"""Start one pretraining run as a Ray Train TorchTrainer."""
from __future__ import annotations

import os
from typing import Optional, Sequence

import pyarrow.fs
from ray.train import CheckpointConfig, FailureConfig, Result, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer

from trainers.config import TrainConfig

# Ray Train's controller polls workers every 2 s by default and every report
# waits for a poll; 0.1 s keeps evaluation and checkpoint points cheap.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.1")


def run_worker(loop_config: dict) -> None:
    """What each Train worker runs. The loop is imported here, in the worker: the
    processes that only start runs (Tune trial drivers, the Train controller) then
    skip importing timm and torchvision, seconds per process."""
    from trainers.loop import train_loop_per_worker

    train_loop_per_worker(loop_config)


def scaling_config(cfg: TrainConfig) -> ScalingConfig:
    resources = {"CPU": cfg.cpus_per_worker}
    if cfg.use_gpu:
        resources["GPU"] = 1
    return ScalingConfig(num_workers=cfg.workers, use_gpu=cfg.use_gpu, resources_per_worker=resources)


def build_trainer(cfg: TrainConfig, storage_path: str, name: str, *,
                  storage_filesystem: Optional[pyarrow.fs.FileSystem] = None,
                  step_sink=None, echo: bool = False, max_failures: int = 2,
                  callbacks: Sequence = ()) -> TorchTrainer:
    """A TorchTrainer for `cfg` whose checkpoints live at <storage_path>/<name>.

    Starting it again with the same storage and name resumes from the latest
    checkpoint there (Ray Train restores its checkpoint manager from storage).
    """
    return TorchTrainer(
        run_worker,
        train_loop_config={"config": cfg.model_dump(mode="json"), "step_sink": step_sink, "echo": echo},
        scaling_config=scaling_config(cfg),
        torch_config=TorchConfig(backend="nccl" if cfg.use_gpu else "gloo"),
        run_config=RunConfig(
            name=name,
            storage_path=storage_path,
            storage_filesystem=storage_filesystem,
            failure_config=FailureConfig(max_failures=max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            callbacks=list(callbacks),
        ),
    )


def run_pretraining(cfg: TrainConfig, storage_path: str, name: str, **kwargs) -> Result:
    return build_trainer(cfg, storage_path, name, **kwargs).fit()
