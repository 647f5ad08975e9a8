"""From a Study to cells and trial configurations, with their compute.

Everything here runs without Ray: `plan` must answer before anything starts,
and a study whose configurations are impossible is refused here.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from orchestrator.study import Study, StudyError, check_fields, tune_bounds
from trainers.config import TrainConfig
from trainers.flops import run_flops, train_step_flops

# Images per training split of the datasets whose size is known without reading them.
KNOWN_TRAIN_SIZES = {"fashion_mnist": 60_000}


@dataclass(frozen=True)
class CostModel:
    """Assumptions behind GPU-hour and cost estimates (printed with them)."""

    gpu_tflops: float = 312.0  # A100 bf16 dense peak
    mfu: float = 0.40  # model FLOPs utilisation a tuned MAE run reaches
    usd_per_gpu_hour: float = 4.10  # p4d.24xlarge on demand, per GPU (us-east-1)

    def gpu_hours(self, flops: float) -> float:
        return flops / (self.gpu_tflops * 1e12 * self.mfu) / 3600


@dataclass
class Cell:
    id: str
    values: dict[str, Any]
    config: TrainConfig  # the cell's configuration at the midpoint of the tuned space

    @property
    def flops_per_trial(self) -> float:
        return run_flops(self.config)


@dataclass
class Plan:
    study: Study
    profile: str
    cells: list[Cell]

    @property
    def trials(self) -> int:
        return len(self.cells) * self.study.trials_in_cell

    @property
    def total_flops(self) -> float:
        return sum(c.flops_per_trial for c in self.cells) * self.study.trials_in_cell

    def cell(self, cell_id: str) -> Cell:
        return next(c for c in self.cells if c.id == cell_id)

    def trial_config(self, cell_id: str, params: dict[str, Any], replicate: int) -> TrainConfig:
        """Replicates of a cell differ in their seed."""
        return trial_config(self.study, self.profile, self.cell(cell_id).values, params, seed=replicate)


# What a Tune trial's config holds besides the tuned parameters (see CellSearcher):
# its cell, its index there (its seed offset), its role ("tune": a tuning trial;
# "seed": a seed of the cell's best configuration, or of the cell when nothing is
# tuned), the tuning trial a seed repeats, and the whole TrainConfig.
TRIAL_KEYS = ("cell", "replicate", "role", "seed_of", "train")


def tuned_params(config: dict) -> dict[str, Any]:
    """The tuned parameters of a Tune trial's config, named tuned.<name>."""
    return {f"tuned.{k}": v for k, v in config.items() if k not in TRIAL_KEYS}


def cell_id(values: dict[str, Any]) -> str:
    return ",".join(f"{k}={v}" for k, v in values.items())


def _steps_for(budget, cfg: TrainConfig) -> int:
    if budget.steps is not None:
        return budget.steps
    if budget.epochs is not None:
        size = budget.train_images or KNOWN_TRAIN_SIZES.get(cfg.dataset)
        if size is None:
            raise ValueError(f"budget: train_images is needed to turn epochs into steps for {cfg.dataset!r}")
        return max(1, math.ceil(budget.epochs * size / cfg.batch_size))
    return max(1, round(budget.flops / train_step_flops(cfg)))


def trial_config(study: Study, profile: str, values: dict[str, Any], params: dict[str, Any],
                 seed: int = 0) -> TrainConfig:
    """The whole configuration of one trial: fixed settings, cell values, what the
    study derives from them, the tuned parameters, the budget and evaluation points."""
    prof = study.profiles[profile]
    fields = {**prof.fixed, **values}
    if study.derive is not None:
        fields.update(_derived(study, fields))
    fields.update(params)
    fields["seed"] = fields.get("seed", 0) + seed
    # a `steps` axis (a compute sweep) or a `flops_budget` one (an isoFLOP study)
    # overrides the profile's budget
    steps = fields.pop("steps", None)
    if steps is None and fields.get("flops_budget"):
        steps = max(1, round(fields["flops_budget"] / train_step_flops(TrainConfig(**{**fields, "steps": 1}))))
    if steps is None:
        steps = _steps_for(prof.budget, TrainConfig(**{**fields, "steps": 1}))
    every = max(1, steps // study.evaluations)
    return TrainConfig(**{**fields, "steps": steps, "eval_every_steps": every if every < steps else 0})


def _derived(study: Study, fields: dict[str, Any]) -> dict[str, Any]:
    """What the study's `derive` adds to a cell; whatever it raises becomes a
    ValueError naming it, which make_plan turns into a refusal naming the cell."""
    try:
        extra = study.derive(dict(fields))
    except Exception as e:  # the study's own code: any exception is its bug
        raise ValueError(f"derive raised {type(e).__name__}: {e}") from None
    if not isinstance(extra, dict):
        raise ValueError(f"derive must return a dict of training settings, got {type(extra).__name__}")
    return extra


def _midpoint(study: Study) -> dict[str, Any]:
    mid = {}
    for name, p in study.tune.items():
        if hasattr(p, "values"):
            mid[name] = p.values[0]
        elif p.kind == "log_uniform":
            mid[name] = math.sqrt(p.low * p.high)
        elif p.kind == "int":
            mid[name] = (p.low + p.high) // 2
        else:
            mid[name] = (p.low + p.high) / 2
    return mid


def _refusal(path, profile: str, cid: str, e: Exception) -> StudyError:
    if isinstance(e, ValidationError):
        err = e.errors()[0]
        loc = "".join(f"{x}: " for x in err["loc"])
        msg = f"{loc}{err['msg'].removeprefix('Value error, ')}"
    else:
        msg = str(e)
    return StudyError(f"{path}: profiles.{profile}, cell {cid}: {msg}")


def make_plan(study: Study, profile: str, path: str | Path = "<study>") -> Plan:
    """Cells of `profile` with their configurations; every corner of the tuned
    space is validated, so an impossible value is refused before Ray starts."""
    if profile not in study.profiles:
        raise StudyError(f"{path}: profiles.{profile}: the study declares no {profile!r} profile "
                         f"(it has {', '.join(study.profiles)})")
    check_fields(study, path)
    prof = study.profiles[profile]
    grid = [dict(zip(prof.axes, combo)) for combo in itertools.product(*prof.axes.values())]
    cells = []
    for values in grid + [dict(c) for c in prof.include]:
        cid = cell_id(values)
        try:
            for corner in tune_bounds(study):
                trial_config(study, profile, values, corner)
            cfg = trial_config(study, profile, values, _midpoint(study))
        except (ValidationError, ValueError, TypeError) as e:
            raise _refusal(path, profile, cid, e) from None
        cells.append(Cell(cid, values, cfg))
    return Plan(study, profile, cells)
