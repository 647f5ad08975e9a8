"""What a study keeps in storage to be inspected or continued, read as data.

`study.json` holds what `status` and `fit` need (objective, curves, plan
totals) as plain JSON, so neither runs any code from storage. `resume` runs
the study file from the user's own disk, and only the file the study started
with: anyone able to write the bucket could otherwise have the head node run
their code. Tune's own saved state is checked before a resume: readable, since
Tune, when it cannot read it, silently starts the grid again, and calling
nothing through its pickles beyond what Tune writes there (pickle_scan.py).
"""
from __future__ import annotations

import binascii
import fnmatch
import hashlib
import json
import pickle
from pathlib import Path
from typing import Optional

from orchestrator.curves import CurveSpec, spec_from_dict
from orchestrator.pickle_scan import unexpected
from orchestrator.planning import Plan, make_plan
from orchestrator.storage import Storage
from orchestrator.study import Objective, Study, StudyError, load_study

STATE_FILE = "study.json"
TUNE_FOLDER = "tune"
EXPERIMENT_STATES = "experiment_state-*.json"  # Tune's saved states, newest last by name


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


def check_tune_state(storage: Storage, name: str, trust: bool = False) -> None:
    """Refuse, in one line, a resume whose Tune state is missing, unreadable or,
    unless `trust`, would call code that Tune does not write there (all read as
    data: nothing in it is unpickled here)."""
    folder = storage.path(name, TUNE_FOLDER)
    files = {info.base_name: info.path for info in storage.list(name, TUNE_FOLDER)}
    if not fnmatch.filter(files, EXPERIMENT_STATES):
        raise StudyError(f"{folder}: no Tune state to resume from (the study's driver died before Tune saved "
                         f"any); start it again with `run --name`")
    # every file of the kinds Tune loads on resume (it picks the newest by its own rule)
    for pattern, pickles_of in ((EXPERIMENT_STATES, _fallback_pickles), ("searcher-state-*.pkl", _json),
                                ("search_gen_state-*.json", _whole), ("callback-states-*.pkl", _whole)):
        for file in sorted(fnmatch.filter(files, pattern)):
            try:
                calls = sorted({c for data in pickles_of(storage.read_bytes(f"{name}/{TUNE_FOLDER}/{file}"))
                                for c in unexpected(data)})
            except (ValueError, UnicodeDecodeError, EOFError, pickle.UnpicklingError) as e:
                raise StudyError(f"{folder}/{file}: Tune's saved state is unreadable ({type(e).__name__}: "
                                 f"{str(e)[:120]}); nothing was changed") from None
            if calls and not trust:
                more = f" and {len(calls) - 1} more" if len(calls) > 1 else ""
                raise StudyError(f"{folder}/{file}: Tune's saved state would run {calls[0]}{more}, which Tune "
                                 f"does not write there (anyone able to write the storage could run code on "
                                 f"this machine through it); nothing was changed: if you trust the storage, "
                                 f"`resume --trust-tune-state` loads it")


def tune_trial_ids(storage: Storage, name: str) -> set[str]:
    """The trials of Tune's newest saved state (the one a resume continues), read as JSON."""
    files = sorted(fnmatch.filter((i.base_name for i in storage.list(name, TUNE_FOLDER)), EXPERIMENT_STATES))
    state = json.loads(storage.read_bytes(f"{name}/{TUNE_FOLDER}/{files[-1]}"))
    return {json.loads(trial)["trial_id"] for trial, _ in state["trial_data"]}


def _json(data: bytes) -> list[bytes]:
    """Our searcher's state: JSON, no pickle."""
    json.loads(data)
    return []


def _whole(data: bytes) -> list[bytes]:
    return [data]


def _fallback_pickles(data: bytes) -> list[bytes]:
    """The pickles Tune embeds in its experiment state (values it cannot write as
    JSON, marked CLOUDPICKLE_FALLBACK), at any depth, JSON inside strings included."""
    found: list[bytes] = []

    def walk(value) -> None:
        if isinstance(value, dict):
            if value.get("_type") == "CLOUDPICKLE_FALLBACK":
                found.append(binascii.unhexlify(value["value"]))
                return
            for v in value.values():
                walk(v)
        elif isinstance(value, list):
            for v in value:
                walk(v)
        elif isinstance(value, str) and value.lstrip().startswith(("{", "[")):
            try:
                inner = json.loads(value)
            except ValueError:
                return  # a plain string that starts like JSON
            walk(inner)

    walk(json.loads(data))
    return found
