"""AdamW with MAE's defaults and a per-step warmup + cosine schedule (timm)."""
from __future__ import annotations

import torch
from timm.scheduler import CosineLRScheduler
from torch import nn

from trainers.config import TrainConfig


def _decays(name: str, param: nn.Parameter) -> bool:
    """No weight decay on norms, biases, tokens, position tables and fusion weights.
    LoMaR's iRPE table is decayed, as in its reference (timm's add_weight_decay
    spares only 1-D parameters there)."""
    if param.ndim <= 1:
        return False
    return not any(key in name for key in ("token", "pos_embed"))


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (decay if _decays(name, p) else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    # The fused kernel is one call per step instead of one per tensor.
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, fused=True)


def build_schedule(optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> CosineLRScheduler:
    """Linear warmup from 0 to cfg.lr over warmup_steps, then cosine to min_lr at cfg.steps.
    Stepped per optimizer step with `schedule.step_update(step)`."""
    return CosineLRScheduler(
        optimizer, t_initial=cfg.steps - cfg.warmup_steps, lr_min=cfg.min_lr,
        warmup_t=cfg.warmup_steps, warmup_lr_init=0.0, warmup_prefix=True, t_in_epochs=False,
    )
