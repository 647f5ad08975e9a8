"""The Ray Train loop of one pretraining run, run by every worker.

Checkpoints hold everything needed to continue exactly: model, optimizer, step
(which fixes the schedule, the data position and the per-step mask seeds),
cumulative FLOPs and timings, RNG state, and the config that wrote them.
"""
from __future__ import annotations

import json
import math
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Optional

import pyarrow.fs
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from ray.train import Checkpoint

from trainers.config import TrainConfig
from trainers.data import load_probe_sets, train_loader
from trainers.evaluation import evaluate
from trainers.flops import train_step_flops
from trainers.models import build_model
from trainers.optim import build_optimizer, build_schedule
from trainers.resources import train_threads, use_threads
from trainers.step import TrainStep
from trainers.step_log import StepLog

STATE_FILE = "state.pt"
CONFIG_FILE = "config.json"
DIVERGED_FILE = "diverged.json"
PROBE_CACHE_FOLDER = "probe_sets"
# Fields that may differ between a run and the run resuming it.
RESUMABLE_CHANGES = {"checkpoint_every_steps", "checkpoint_every_minutes", "log_every_steps",
                     "num_loader_workers"}


class ConfigMismatch(RuntimeError):
    pass


@dataclass
class Progress:
    step: int = 0
    flops: float = 0.0
    images: int = 0
    train_seconds: float = 0.0
    first_loss: float = float("nan")
    recent_losses: list = field(default_factory=list)

    def add(self, loss: float, seconds: float, cfg: TrainConfig, step_flops: float) -> None:
        if self.step == 0:
            self.first_loss = loss
        self.step += 1
        self.flops += step_flops
        self.images += cfg.batch_size
        self.train_seconds += seconds
        self.recent_losses = (self.recent_losses + [loss])[-cfg.log_every_steps:]

    def metrics(self) -> dict:
        return {
            "step": self.step,
            # the mean of the last log window: one step's loss is too noisy to compare runs by
            "loss": sum(self.recent_losses) / max(1, len(self.recent_losses)),
            "first_loss": self.first_loss,
            "flops": self.flops,
            "images_per_s": self.images / self.train_seconds if self.train_seconds else 0.0,
        }


def mask_seed(cfg: TrainConfig, rank: int, step: int) -> int:
    """Masks depend only on (seed, rank, step), so a resumed run draws the same ones."""
    return (cfg.seed * 1_000_003 + rank * 7919 + step) % (2 ** 63)


def _save(model, optimizer, progress: Progress, cfg: TrainConfig, metrics: dict) -> str:
    path = tempfile.mkdtemp(prefix="mim-ckpt-")
    torch.save({
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "progress": asdict(progress),
        "metrics": metrics,
        "rng": torch.get_rng_state(),
        "config": cfg.resolved(),
    }, os.path.join(path, STATE_FILE))
    with open(os.path.join(path, CONFIG_FILE), "w") as f:
        f.write(cfg.model_dump_json(indent=1))
    return path


def _diverged_marker(metrics: dict) -> str:
    """A checkpoint that only says the run diverged: Ray Train's result carries the
    metrics of the latest checkpoint, and a resumed diverged run must stay ended.
    The last good checkpoint is kept beside it (num_to_keep=2)."""
    path = tempfile.mkdtemp(prefix="mim-diverged-")
    with open(os.path.join(path, DIVERGED_FILE), "w") as f:
        json.dump(metrics, f)
    return path


def _load_state(folder: str) -> dict:
    """A checkpoint's state. weights_only: tensors and plain data, never code, so a
    checkpoint someone else could write to the bucket cannot run anything here."""
    return torch.load(os.path.join(folder, STATE_FILE), map_location="cpu", weights_only=True)


def _ended_metrics(checkpoint: Checkpoint) -> Optional[dict]:
    """The final metrics if the checkpoint is of a run that already ended
    (diverged, or trained to its last step), else None."""
    with checkpoint.as_directory() as path:
        marker = os.path.join(path, DIVERGED_FILE)
        if os.path.exists(marker):
            with open(marker) as f:
                return json.load(f)
        state = _load_state(path)
    ended = state["progress"]["step"] >= state["config"]["steps"]
    return state.get("metrics") if ended else None


def _restore(checkpoint: Checkpoint, model, optimizer, cfg: TrainConfig) -> Progress:
    with checkpoint.as_directory() as path:
        state = _load_state(path)
    saved, now = state["config"], cfg.resolved()
    changed = sorted(k for k in now if k not in RESUMABLE_CHANGES and saved.get(k) != now[k])
    if changed:
        k = changed[0]
        raise ConfigMismatch(f"checkpoint was written by another config: {k}={saved.get(k)!r}, "
                             f"now {now[k]!r}")
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["rng"])
    return Progress(**state["progress"])


def _agree(flag: bool, world: int) -> bool:
    """Rank 0's decision, for every rank (time-based decisions differ between ranks)."""
    if world == 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0])
    dist.broadcast(t, src=0)
    return bool(t.item())


def _global_mean(value: float, world: int) -> float:
    """Mean loss over ranks: every rank sees a divergence at the same step."""
    if world == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t)
    return t.item() / world


def _probe_cache() -> tuple[pyarrow.fs.FileSystem, str]:
    """Where the probe subsets are kept: beside the runs in the run's storage, so the
    trials of a study (whose Train runs share a storage path) read them once."""
    storage = ray.train.get_context().get_storage()  # a DeveloperAPI: the public API has no storage path
    return storage.storage_filesystem, f"{storage.storage_fs_path}/{PROBE_CACHE_FOLDER}"


def train_loop_per_worker(loop_config: dict) -> None:
    cfg = TrainConfig.model_validate(loop_config["config"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    use_threads(train_threads(cfg))
    device = ray.train.torch.get_device()

    torch.manual_seed(cfg.seed)
    model = build_model(cfg).to(device)
    optimizer = build_optimizer(model, cfg)
    schedule = build_schedule(optimizer, cfg)
    progress = Progress()
    checkpoint = ray.train.get_checkpoint()
    ended = _ended_metrics(checkpoint) if checkpoint is not None else None
    if ended is not None:
        # A run restarted after it ended (e.g. its study was resumed before Tune
        # saw it end): no training, but its final result is reported again.
        ray.train.report(ended)
        return
    if checkpoint is not None:
        progress = _restore(checkpoint, model, optimizer, cfg)
    resumed_from = progress.step
    wrapped = ray.train.torch.prepare_model(model) if world > 1 else model
    step_fn = TrainStep(wrapped, optimizer, schedule, cfg, device)
    step_flops = train_step_flops(cfg)

    lead = rank == 0
    probe_sets = None
    if lead:
        probe_sets = [tuple(t.to(device) for t in pair) for pair in load_probe_sets(cfg, _probe_cache())]
    log = StepLog(loop_config.get("step_sink") if lead else None,
                  echo=bool(loop_config.get("echo")) and lead, total_steps=cfg.steps)
    stream = iter(train_loader(cfg, rank, world, start_step=progress.step))
    gen = torch.Generator(device=device)
    last_checkpoint = time.monotonic()
    status = "finished"

    while progress.step < cfg.steps:
        micro = [next(stream)[0] for _ in range(cfg.accum_steps)]
        gen.manual_seed(mask_seed(cfg, rank, progress.step))
        t0 = time.perf_counter()
        loss = _global_mean(step_fn(progress.step, micro, gen), world)
        progress.add(loss, time.perf_counter() - t0, cfg, step_flops)
        step = progress.step
        if not math.isfinite(loss):
            status = "diverged"
            break
        if lead and (step % cfg.log_every_steps == 0 or step == cfg.steps):
            log.log(step, {"loss": loss, "lr": optimizer.param_groups[0]["lr"],
                           "images_per_s": progress.metrics()["images_per_s"],
                           "flops": progress.flops})

        eval_due = step == cfg.steps or (cfg.eval_every_steps and step % cfg.eval_every_steps == 0)
        ckpt_due = eval_due or bool(cfg.checkpoint_every_steps and step % cfg.checkpoint_every_steps == 0)
        if cfg.checkpoint_every_minutes and step % cfg.log_every_steps == 0:
            minutes = (time.monotonic() - last_checkpoint) / 60
            ckpt_due = ckpt_due or _agree(minutes >= cfg.checkpoint_every_minutes, world)
        if not ckpt_due:
            continue
        metrics = {**progress.metrics(), "lr": optimizer.param_groups[0]["lr"], "status": "running",
                   "resumed_from_step": resumed_from}
        if eval_due and lead:
            metrics.update(evaluate(model, cfg, *probe_sets))
            log.log(step, {k: metrics[k] for k in ("probe_top1", "knn_top1", "eval_loss")})
        if step == cfg.steps:
            metrics["status"] = status
        ckpt_dir = _save(model, optimizer, progress, cfg, metrics) if lead else None
        ray.train.report(
            metrics, checkpoint=Checkpoint.from_directory(ckpt_dir) if ckpt_dir else None,
            checkpoint_upload_mode=ray.train.CheckpointUploadMode.ASYNC,
            delete_local_checkpoint_after_upload=True,
        )
        last_checkpoint = time.monotonic()

    if status == "diverged":
        metrics = {**progress.metrics(), "status": "diverged", "resumed_from_step": resumed_from,
                   "reason": f"diverged: loss {progress.recent_losses[-1]} at step {progress.step}"}
        marker = _diverged_marker(metrics) if lead else None
        ray.train.report(metrics, checkpoint=Checkpoint.from_directory(marker) if marker else None)
    stream.close()
    log.close()
