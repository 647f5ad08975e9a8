"""One optimizer step: micro-batches with gradient accumulation, autocast, clipping."""
from __future__ import annotations

import contextlib
from typing import Iterable, Optional

import torch
from torch import nn

from trainers.config import TrainConfig


def use_bf16(cfg: TrainConfig, device: torch.device) -> bool:
    """bf16 autocast on GPUs; fp32 on CPUs, where bf16 matmuls run at half speed without AMX."""
    if cfg.amp == "off":
        return False
    if cfg.amp == "bf16":
        return True
    return device.type == "cuda"


class TrainStep:
    """Runs optimizer steps for a (possibly DDP-wrapped) model."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, schedule,
                 cfg: TrainConfig, device: torch.device):
        self.model, self.optimizer, self.schedule, self.cfg = model, optimizer, schedule, cfg
        self.device = device
        self.bf16 = use_bf16(cfg, device)

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16)

    def __call__(self, step: int, micro_batches: Iterable[torch.Tensor],
                 generator: Optional[torch.Generator] = None) -> float:
        """Step `step` (0-based) over cfg.accum_steps micro-batches; returns the mean loss."""
        self.schedule.step_update(step)
        self.optimizer.zero_grad(set_to_none=True)
        total = 0.0
        micro_batches = list(micro_batches)
        for i, imgs in enumerate(micro_batches):
            last = i == len(micro_batches) - 1
            # DDP all-reduces gradients on the last micro-batch only.
            sync = contextlib.nullcontext() if last or not hasattr(self.model, "no_sync") \
                else self.model.no_sync()
            with sync:
                with self._autocast():
                    loss, _, _ = self.model(imgs.to(self.device, non_blocking=True), generator)
                (loss / len(micro_batches)).backward()
            total += loss.detach()
        if self.cfg.clip_grad:
            nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.clip_grad)
        self.optimizer.step()
        return float(total) / len(micro_batches)
