"""What a study keeps in storage to be inspected or continued, read as data.

`study.json` holds what `status` and `fit` need (objective, curves, plan
totals) as plain JSON, so neither runs any code from storage. `resume` runs
the study file from the user's own disk, and only the file the study started
with: anyone able to write the bucket could otherwise have the head node run
their code. Tune's own saved state is checked to be readable before a resume,
since Tune, when it cannot read it, silently starts the grid again.
"""
from __future__ import annotations

import fnmatch
import hashlib
import json
import pickletools
from pathlib import Path
from typing import Optional

from orchestrator.curves import CurveSpec, spec_from_dict
from orchestrator.planning import Plan, make_plan
from orchestrator.storage import Storage
from orchestrator.study import Objective, Study, StudyError, load_study

STATE_FILE = "study.json"
TUNE_FOLDER = "tune"


def study_fields(study: Study, path: str) -> dict:
    """The parts of study.json that describe the study file itself."""
    source = Path(path).read_text()
    return {"study_path": str(path), "study_source": source,
            "study_sha256": hashlib.sha256(source.encode()).hexdigest(),
            "objective": study.objective.model_dump(), "curves": [c.model_dump(mode="json") for c in study.curves]}


def plan_fields(plan: Plan) -> dict:
    """The parts of study.json that `status` weighs each cell's progress against."""
    return {"trials_per_cell": plan.study.trials_per_cell, "replicates": plan.study.replicates,
            "cell_flops_per_trial": {c.id: c.flops_per_trial for c in plan.cells}}


def read_state(name: str, storage_uri: str) -> dict:
    storage = Storage(storage_uri)
    if not storage.exists(name, STATE_FILE):
        raise StudyError(f"no study {name!r} in {storage_uri} (looked for {storage.path(name, STATE_FILE)})")
    try:
        return storage.read_json(f"{name}/{STATE_FILE}")
    except ValueError as e:
        raise StudyError(f"{storage.path(name, STATE_FILE)}: unreadable ({e})") from None


def objective_of(state: dict) -> Objective:
    if "objective" not in state:  # a study.json written before these fields were kept
        return study_for_resume(state)[0].objective
    return Objective.model_validate(state["objective"])


def curves_of(state: dict) -> list[CurveSpec]:
    if "curves" not in state:
        return study_for_resume(state)[0].curves
    return [spec_from_dict(c) for c in state["curves"]]


def plan_of(state: dict) -> dict:
    if "cell_flops_per_trial" not in state:  # a study.json written before the plan was kept
        study, path = study_for_resume(state)
        return plan_fields(make_plan(study, state["profile"], path))
    return {k: state[k] for k in ("trials_per_cell", "replicates", "cell_flops_per_trial")}


def study_for_resume(state: dict, path: Optional[str] = None) -> tuple[Study, str]:
    """The study file the execution started from, as it was then, from this disk."""
    path = path or state["study_path"]
    if not Path(path).is_file():
        raise StudyError(f"{path}: the study file of {state['name']!r} is not on this machine; "
                         f"pass --study with a copy of it")
    text = Path(path).read_text()
    if text != state["study_source"]:
        line = _first_difference(text, state["study_source"])
        raise StudyError(f"{path}:{line}: the study file changed since {state['name']!r} started; resume runs "
                         f"the same file: restore it, or start a new execution with `run --name`")
    return load_study(path), path


def _first_difference(a: str, b: str) -> int:
    for i, (x, y) in enumerate(zip(a.splitlines(), b.splitlines()), start=1):
        if x != y:
            return i
    return min(len(a.splitlines()), len(b.splitlines())) + 1


def check_tune_state(storage: Storage, name: str) -> None:
    """Refuse, in one line, a resume whose Tune state is missing or unreadable
    (parsed as data: nothing in it is unpickled here)."""
    folder = storage.path(name, TUNE_FOLDER)
    files = {info.base_name: info.path for info in storage.list(name, TUNE_FOLDER)}
    states = sorted(fnmatch.filter(files, "experiment_state-*.json"))
    if not states:
        raise StudyError(f"{folder}: no Tune state to resume from (the study's driver died before Tune saved "
                         f"any); start it again with `run --name`")
    for pattern, parse in (("experiment_state-*.json", json.loads), ("searcher-state-*.pkl", json.loads),
                           ("search_gen_state-*.json", _pickle_opcodes)):
        matching = sorted(fnmatch.filter(files, pattern))
        if not matching:
            continue
        newest = matching[-1]
        try:
            parse(storage.read_bytes(f"{name}/{TUNE_FOLDER}/{newest}"))
        except (ValueError, UnicodeDecodeError) as e:
            raise StudyError(f"{folder}/{newest}: Tune's saved state is unreadable ({type(e).__name__}: "
                             f"{str(e)[:120]}); nothing was changed") from None


def _pickle_opcodes(data: bytes) -> None:
    """Walk a pickle's opcodes to the end without running it: a truncated or
    garbled file raises ValueError. (Tune saves its search state as a pickle.)"""
    for _ in pickletools.genops(data):
        pass
