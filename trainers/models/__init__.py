"""MAE-family models. `build_model` picks one from a TrainConfig."""
from torch import nn

from trainers.config import TrainConfig
from trainers.models.lomar import LoMaR
from trainers.models.mae import MAE


def build_model(cfg: TrainConfig) -> nn.Module:
    return LoMaR(cfg) if cfg.model == "lomar" else MAE(cfg)


__all__ = ["MAE", "LoMaR", "build_model"]
