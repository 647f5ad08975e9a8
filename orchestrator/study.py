"""What a study file declares, and loading one.

A study file is Python that declares and does not execute: it assigns a `Study`
to the name `study`. The grid axes, fixed settings and budget live in profiles
(`local`: CPU stand-ins on Fashion-MNIST; `cluster`: real sizes on GPUs), the
question, the tuned parameters, the objective and the curves are shared.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any, Callable, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from orchestrator.curves import CurveSpec, IsoFlopSpec, x_is_searched
from trainers.config import TrainConfig

# local: minutes on a laptop's CPU; cluster: the paper-sized run on GPUs; science:
# a longer CPU run (an hour or two) meant to support a finding at this scale.
ProfileName = Literal["local", "cluster", "science"]
PROFILES: tuple[str, ...] = ProfileName.__args__


class StudyError(ValueError):
    """A study that cannot run, with a one-line message naming the file and the field."""


class _Param(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class LogUniform(_Param):
    kind: Literal["log_uniform"] = "log_uniform"
    low: float
    high: float

    @model_validator(mode="after")
    def _check(self):
        if not 0 < self.low < self.high:
            raise ValueError(f"needs 0 < low < high, got {self.low}, {self.high}")
        return self


class Uniform(_Param):
    kind: Literal["uniform"] = "uniform"
    low: float
    high: float

    @model_validator(mode="after")
    def _check(self):
        if not self.low < self.high:
            raise ValueError(f"needs low < high, got {self.low}, {self.high}")
        return self


class IntRange(_Param):
    kind: Literal["int"] = "int"
    low: int
    high: int  # inclusive

    @model_validator(mode="after")
    def _check(self):
        if not self.low <= self.high:
            raise ValueError(f"needs low <= high, got {self.low}, {self.high}")
        return self


class Choice(_Param):
    kind: Literal["choice"] = "choice"
    values: tuple[Any, ...]

    @model_validator(mode="after")
    def _check(self):
        if not self.values:
            raise ValueError("needs at least one value")
        return self


Param = Union[LogUniform, Uniform, IntRange, Choice]


class Budget(BaseModel):
    """How long each trial trains: exactly one of steps, epochs or FLOPs."""

    model_config = ConfigDict(extra="forbid")
    steps: Optional[int] = None
    epochs: Optional[float] = None
    flops: Optional[float] = None
    # images per epoch, for an epochs budget on a dataset whose size is not built in
    train_images: Optional[int] = None

    @model_validator(mode="after")
    def _one(self):
        given = [k for k in ("steps", "epochs", "flops") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of steps, epochs, flops (got {given or 'none'})")
        if getattr(self, given[0]) <= 0:
            raise ValueError(f"{given[0]} must be positive")
        return self


class Objective(BaseModel):
    model_config = ConfigDict(extra="forbid")
    metric: Literal["probe_top1", "knn_top1", "eval_loss", "loss"]
    mode: Literal["min", "max"]


class Profile(BaseModel):
    """Where and at what size a study runs."""

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)
    axes: dict[str, list[Any]]  # TrainConfig field -> values; cells are their product
    include: list[dict[str, Any]] = Field(default_factory=list)  # extra cells, e.g. a baseline
    fixed: dict[str, Any] = Field(default_factory=dict)  # TrainConfig fields for every trial
    budget: Budget
    description: str = ""

    @field_validator("axes")
    @classmethod
    def _axes(cls, axes):
        if not axes:
            raise ValueError("needs at least one axis")
        for name, values in axes.items():
            if not values:
                raise ValueError(f"axis {name!r} has no values")
        return axes


class Study(BaseModel):
    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)
    name: str
    question: str
    profiles: dict[ProfileName, Profile]
    tune: dict[str, Param] = Field(default_factory=dict)  # tuned by Optuna inside each cell
    sampler: Literal["tpe", "random"] = "tpe"
    trials_per_cell: int = 1  # tuning trials of a cell (seeds of it, when nothing is tuned)
    # Seeds of each cell's best tuned configuration, run once the cell's tuning has
    # ended and never stopped early: with that best trial they are the cell's point
    # on a curve and its spread. None: 2 when something is tuned, else 0 (a study
    # that tunes nothing runs trials_per_cell seeds of each cell already).
    replicates: Optional[int] = None
    objective: Objective
    evaluations: int = 2  # evaluation points per trial, where ASHA may stop a tuning trial
    early_stopping: bool = True
    # cell values -> extra TrainConfig fields (e.g. a mask unit that follows the patch size)
    derive: Optional[Callable[[dict], dict]] = None
    curves: list[Union[CurveSpec, IsoFlopSpec]] = Field(default_factory=list)

    @field_validator("trials_per_cell", "evaluations")
    @classmethod
    def _at_least_one(cls, v, info):
        if v < 1:
            raise ValueError(f"{info.field_name} must be at least 1 (got {v})")
        return v

    @field_validator("name")
    @classmethod
    def _name(cls, v):
        return check_plain_name(v)

    @model_validator(mode="after")
    def _points_are_sound(self):
        if self.replicates is None:
            self.replicates = 2 if self.tune else 0
        if self.replicates < 0:
            raise ValueError(f"replicates must be at least 0 (got {self.replicates})")
        if self.replicates and not self.tune:
            raise ValueError("replicates: nothing is tuned, so each cell's trials_per_cell trials are "
                             "its seeds already; set trials_per_cell instead")
        for spec in self.curves:
            if isinstance(spec, CurveSpec) and self.early_stopping and x_is_searched(spec, self.tune):
                raise ValueError(f"curves: {spec.name}'s x {spec.x!r} is searched by tune, so every trial "
                                 f"is a point of it, and early stopping would drop the worse ones from the "
                                 f"fit; set early_stopping=False")
        return self

    @property
    def trials_in_cell(self) -> int:
        """Tuning trials and the seeds of the best one."""
        return self.trials_per_cell + self.replicates


def check_plain_name(name: str) -> str:
    """A study's name is a folder under the storage root and an MLflow experiment."""
    if not name or name.startswith(".") or any(c in "/\\" or c.isspace() for c in name):
        raise ValueError(f"{name!r} must be a plain folder name (no slashes, spaces or leading dot)")
    return name


def _one_line(e: ValidationError) -> str:
    """The first error, as `Model.field: message (got value)`; the model is the one
    whose constructor refused (Study, Budget, Choice ...)."""
    err = e.errors()[0]
    where = ".".join([e.title, *map(str, err["loc"])])
    msg = err["msg"].removeprefix("Value error, ")
    got = err.get("input")
    if isinstance(got, (str, int, float)) and err["type"] != "value_error":
        msg += f" (got {got!r})"
    return f"{where}: {msg}"


def load_study(path: str | Path) -> Study:
    """Import a study file and return its `study`; any problem is a one-line StudyError."""
    path = Path(path)
    if not path.is_file():
        raise StudyError(f"{path}: no such study file")
    if path.suffix != ".py":
        raise StudyError(f"{path}: a study file is Python source ending in .py")
    spec = importlib.util.spec_from_file_location(f"_study_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except ValidationError as e:
        raise StudyError(f"{path}{_error_line(e, path)}: {_one_line(e)}") from None
    except (Exception, SystemExit) as e:  # a study file that fails to import, whatever the reason
        line = _error_line(e, path)
        raise StudyError(f"{path}{line}: failed to import: {type(e).__name__}: {e}") from None
    study = getattr(module, "study", None)
    if study is None:
        raise StudyError(f"{path}: study: the file defines no `study = Study(...)`")
    if not isinstance(study, Study):
        raise StudyError(f"{path}: study: expected a Study, got {type(study).__name__}")
    return study


def _error_line(e: Exception, path: Path) -> str:
    if isinstance(e, SyntaxError) and e.lineno:
        return f":{e.lineno}"
    tb = e.__traceback__
    line = None
    while tb is not None:
        if Path(tb.tb_frame.f_code.co_filename) == path:
            line = tb.tb_lineno
        tb = tb.tb_next
    return f":{line}" if line else ""


def tune_bounds(study: Study) -> list[dict[str, Any]]:
    """Corner values of the tuned space, to validate configs before anything runs."""
    corners: list[dict[str, Any]] = [{}]
    for name, p in study.tune.items():
        ends = p.values if isinstance(p, Choice) else (p.low, p.high)
        corners = [{**c, name: v} for c in corners for v in ends]
    return corners


def check_fields(study: Study, path: str | Path) -> None:
    """Names in axes, fixed settings and the tuned space must be TrainConfig fields."""
    known = set(TrainConfig.model_fields)
    for pname, prof in study.profiles.items():
        extra = {k: v for cell in prof.include for k, v in cell.items()}
        for where, names in (("axes", prof.axes), ("fixed", prof.fixed), ("include", extra)):
            for n in names:
                if n not in known:
                    raise StudyError(f"{path}: profiles.{pname}.{where}.{n}: not a training setting")
    for n in study.tune:
        if n not in known:
            raise StudyError(f"{path}: tune.{n}: not a training setting")
