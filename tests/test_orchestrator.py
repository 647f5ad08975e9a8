"""Studies: validation, planning without Ray, exact grid coverage, per-cell ASHA,
and a whole study on real Ray + a real MLflow server, interrupted and resumed."""
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pyarrow.parquet as pq
import pytest
from ray.tune.schedulers import TrialScheduler
from ray.tune.search import Searcher

from orchestrator.cli import main
from orchestrator.planning import make_plan
from orchestrator.search import CellSearcher, PerCellScheduler
from orchestrator.study import load_study
from trainers.loop import PROBE_CACHE_FOLDER

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "tests" / "studies" / "tiny_grid.py"


def _plan():
    return make_plan(load_study(TINY), "local", TINY)


# ---------------------------------------------------------------- refusals

BASE = """
from orchestrator.study import Budget, Objective, Profile, Study, Uniform
study = Study(
    name="bad", question="q",
    profiles={{"local": Profile(axes={axes}, fixed={fixed}, budget=Budget(steps=5))}},
    tune={tune}, trials_per_cell={trials},
    objective=Objective(metric="eval_loss", mode="min"),
)
"""


def _study_file(tmp_path, axes='{"patch_size": [4]}', fixed="{}", tune="{}", trials=1, text=None):
    path = tmp_path / "study_file.py"
    path.write_text(text if text is not None else BASE.format(axes=axes, fixed=fixed, tune=tune, trials=trials))
    return path


@pytest.mark.parametrize("kwargs,field", [
    (dict(text="study = (\n"), "failed to import"),
    (dict(text="x = 1\n"), "study"),
    (dict(text=BASE.replace('objective=Objective(metric="eval_loss", mode="min"),', "")
          .format(axes='{"patch_size": [4]}', fixed="{}", tune="{}", trials=1)), "objective"),
    (dict(fixed='{"model": "vit"}'), "model"),
    (dict(fixed='{"dataset": "imagenet"}'), "dataset"),
    (dict(tune='{"mask_ratio": Uniform(low=0.5, high=1.2)}'), "mask_ratio"),
    (dict(axes='{"patch_size": [4, 5]}'), "patch_size"),
    (dict(axes='{"mask_unit": [3]}'), "mask_unit"),
    (dict(fixed='{"model": "lomar", "window_size": 9}'), "window_size"),
    (dict(trials=0), "trials_per_cell"),
    (dict(axes='{"patch_sise": [4]}'), "patch_sise"),
])
def test_bad_study_file_is_refused_in_one_line_naming_file_and_field(tmp_path, capsys, kwargs, field):
    path = _study_file(tmp_path, **kwargs)
    assert main(["plan", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err
    assert err.startswith(f"error: {path}") and field in err


def test_run_refuses_before_ray_starts(tmp_path):
    path = _study_file(tmp_path, axes='{"patch_size": [5]}')
    done = subprocess.run([sys.executable, "-m", "orchestrator", "run", str(path), "--storage", str(tmp_path / "s")],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and "patch_size" in done.stderr
    assert not (tmp_path / "s").exists()  # nothing half-done


def test_unreachable_tracking_is_refused_before_trials(tmp_path, capsys):
    code = main(["run", str(TINY), "--storage", str(tmp_path / "s"), "--tracking-uri", "http://127.0.0.1:9"])
    assert code == 2
    assert "tracking http://127.0.0.1:9 is unreachable" in capsys.readouterr().err


def test_plan_needs_no_ray():
    code = ("import sys; from orchestrator.cli import main; "
            f"assert main(['plan', {str(REPO / 'studies' / 'seq_len_scaling.py')!r}]) == 0; "
            "assert 'ray' not in sys.modules, 'plan imported ray'")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "GPU-hours" in done.stdout and "18 trials" in done.stdout


def test_shipped_studies_plan_for_both_profiles():
    for path in sorted((REPO / "studies").glob("*.py")):
        study = load_study(path)
        for profile in ("local", "cluster"):
            assert make_plan(study, profile, path).trials > 0


# ---------------------------------------------------------------- search and scheduling

def test_grid_coverage_is_exact_with_everything_in_flight():
    plan = _plan()
    searcher = CellSearcher(plan)
    tuning = [searcher.suggest(f"t{i}") for i in range(2 * len(plan.cells))]  # none completed yet
    assert searcher.suggest("waiting") is None  # seeds wait for their cell's tuning to end
    per_cell = {c.id: sorted(cfg["replicate"] for cfg in tuning if cfg["cell"] == c.id) for c in plan.cells}
    assert all(reps == [0, 1] for reps in per_cell.values())
    for cfg in tuning:
        assert cfg["role"] == "tune" and cfg["seed_of"] is None
        assert 1e-3 <= cfg["base_lr"] <= 1e-2  # Optuna's suggestion
        assert cfg["train"]["base_lr"] == cfg["base_lr"]  # reaches the trial's config
        assert cfg["train"]["seed"] == cfg["replicate"]  # replicates differ in their seed


def test_a_cell_gets_seeds_of_its_best_finished_trial_once_its_tuning_ended():
    plan = _plan()
    searcher = CellSearcher(plan)
    tuning = {f"t{i}": searcher.suggest(f"t{i}") for i in range(2 * len(plan.cells))}
    a, b, c = (cell.id for cell in plan.cells)
    ids = {cell: [tid for tid, cfg in tuning.items() if cfg["cell"] == cell] for cell in (a, b, c)}
    # cell a: the better trial was stopped early by ASHA, so the finished one is repeated
    searcher.on_trial_complete(ids[a][0], {"eval_loss": 0.1, "step": 6, "status": "running"})
    searcher.on_trial_complete(ids[a][1], {"eval_loss": 0.5, "step": 12, "status": "finished"})
    # cell b: one of its tuning trials is still running
    searcher.on_trial_complete(ids[b][0], {"eval_loss": 0.3, "step": 12, "status": "finished"})
    # cell c: nothing finished (diverged, errored): no configuration to repeat
    searcher.on_trial_complete(ids[c][0], {"loss": float("nan"), "step": 3, "status": "diverged"})
    searcher.on_trial_complete(ids[c][1], {"step": 4}, error=True)
    seed = searcher.suggest("s-a")
    assert (seed["cell"], seed["role"], seed["seed_of"]) == (a, "seed", ids[a][1])
    assert seed["base_lr"] == tuning[ids[a][1]]["base_lr"] == seed["train"]["base_lr"]
    assert seed["replicate"] == 2 and seed["train"]["seed"] == 2  # a seed no tuning trial used
    assert searcher.suggest("waiting") is None  # b still tunes; c gets no seed
    searcher.on_trial_complete(ids[b][1], {"eval_loss": 0.2, "step": 12, "status": "finished"})
    seed_b = searcher.suggest("s-b")
    assert (seed_b["cell"], seed_b["seed_of"]) == (b, ids[b][1])  # the lower eval_loss
    assert searcher.suggest("extra") == Searcher.FINISHED


def test_costliest_cells_start_first_in_each_round():
    plan = make_plan(load_study(REPO / "studies" / "seq_len_scaling.py"), "local")
    searcher = CellSearcher(plan)
    order = [searcher.suggest(f"t{i}")["cell"] for i in range(len(plan.cells) * plan.study.trials_per_cell)]
    cost = {c.id: c.flops_per_trial for c in plan.cells}
    rounds = [order[:len(cost)], order[len(cost):]]
    assert all(sorted(r) == sorted(cost) for r in rounds)  # every cell once per round
    assert all([cost[c] for c in r] == sorted((cost[c] for c in r), reverse=True) for r in rounds)


def test_optuna_history_survives_save_and_restore(tmp_path):
    plan = _plan()
    searcher = CellSearcher(plan)
    first = [searcher.suggest(f"t{i}") for i in range(3)]
    for i, cfg in enumerate(first):
        searcher.on_trial_complete(f"t{i}", {"eval_loss": 1.0 + i, "step": 12, "status": "finished"})
    searcher.save(str(tmp_path / "searcher.pkl"))
    json.loads((tmp_path / "searcher.pkl").read_text())  # data, not a pickle

    restored = CellSearcher(plan)
    restored.restore(str(tmp_path / "searcher.pkl"))
    history = [t for c in plan.cells for t in restored.optuna_trials(c.id)]
    assert sorted(t.value for t in history) == [1.0, 2.0, 3.0]
    rest = [restored.suggest(f"u{i}") for i in range(2 * len(plan.cells) - 3)]
    for i, cfg in enumerate(rest):
        restored.on_trial_complete(f"u{i}", {"eval_loss": 5.0 + i, "step": 12, "status": "finished"})
    seeds = [restored.suggest(f"s{i}") for i in range(len(plan.cells))]
    assert restored.suggest("extra") == Searcher.FINISHED
    cells = [cfg["cell"] for cfg in first + rest]
    assert all(cells.count(c.id) == 2 for c in plan.cells)
    # the seeds repeat the best of each cell, the restored trials among them
    best = {cfg["cell"]: f"t{i}" for i, cfg in enumerate(first)}
    assert {s["cell"]: s["seed_of"] for s in seeds if s["cell"] in best} == best


def test_searcher_hears_each_ending_and_ignores_reports_without_the_objective():
    """A checkpoint between evaluation points (no objective) once crashed Ray's
    OptunaSearch with KeyError; a diverged trial reported the same way."""
    from optuna.trial import TrialState

    plan = _plan()
    searcher = CellSearcher(plan)
    ids = [f"t{i}" for i in range(4)]
    for tid in ids:
        searcher.suggest(tid)
    for tid in ids:
        searcher.on_trial_result(tid, {"step": 2, "loss": 0.9, "status": "running"})  # checkpoint only
        searcher.on_trial_result(tid, {"step": 6, "eval_loss": 0.5, "status": "running"})
    searcher.on_trial_complete("t0", {"step": 12, "eval_loss": 0.4, "status": "finished"})
    searcher.on_trial_complete("t1", {"step": 6, "eval_loss": 0.5, "status": "running"})  # stopped early
    searcher.on_trial_complete("t2", {"step": 8, "loss": float("nan"), "status": "diverged"})
    searcher.on_trial_complete("t3", {"step": 4}, error=True)
    by_id = {tid: searcher.optuna_trials(searcher._trial_cell[tid])[searcher._trial_number[tid]] for tid in ids}
    assert by_id["t0"].state == TrialState.COMPLETE and by_id["t0"].value == 0.4
    assert by_id["t1"].state == TrialState.PRUNED and by_id["t1"].intermediate_values == {6: 0.5}
    assert by_id["t2"].state == TrialState.PRUNED and math.isnan(by_id["t2"].intermediate_values[8])
    assert by_id["t3"].state == TrialState.FAIL
    # a replayed report or ending after a resume changes nothing
    searcher.on_trial_result("t0", {"step": 6, "eval_loss": 9.0})
    searcher.on_trial_complete("t0", {"step": 12, "eval_loss": 9.0, "status": "finished"})
    again = searcher.optuna_trials(searcher._trial_cell["t0"])[searcher._trial_number["t0"]]
    assert again.value == 0.4 and again.intermediate_values == {6: 0.5}


def _trial(tid, cell, role="tune"):
    return SimpleNamespace(trial_id=tid, config={"cell": cell, "role": role})


def test_asha_stops_within_a_cell_only():
    plan = _plan()
    sched = PerCellScheduler(plan, CellSearcher(plan))
    a, b = plan.cells[0], plan.cells[1]
    grace = a.config.eval_every_steps
    t1, t2, t3 = _trial("1", a.id), _trial("2", a.id), _trial("3", b.id)
    for t in (t1, t2, t3):
        sched.on_trial_add(None, t)
    # the first at a rung continues; a worse one in the same cell is stopped
    assert sched.on_trial_result(None, t1, {"step": grace, "eval_loss": 1.0}) == TrialScheduler.CONTINUE
    assert sched.on_trial_result(None, t2, {"step": grace, "eval_loss": 2.0}) == TrialScheduler.STOP
    # a trial of another cell is not measured against cell a's trials
    assert sched.on_trial_result(None, t3, {"step": grace, "eval_loss": 5.0}) == TrialScheduler.CONTINUE
    # reports without the objective (checkpoint-only) never stop a trial
    assert sched.on_trial_result(None, t3, {"step": grace + 1}) == TrialScheduler.CONTINUE
    # a seed of the best configuration is a curve point: never stopped, however bad
    seed = _trial("4", a.id, role="seed")
    sched.on_trial_add(None, seed)
    assert sched.on_trial_result(None, seed, {"step": grace, "eval_loss": 9.0}) == TrialScheduler.CONTINUE


def test_a_resumed_search_draws_new_configurations_and_the_same_on_each_resume(tmp_path):
    """A sampler rebuilt from its seed drew, after a resume, the values it drew
    before the kill: a cell got one configuration twice."""
    study = load_study(TINY).model_copy(update={"sampler": "random"})
    plan = make_plan(study, "local", TINY)
    searcher = CellSearcher(plan)
    before = {cfg["cell"]: cfg["base_lr"] for cfg in (searcher.suggest(f"t{i}") for i in range(len(plan.cells)))}
    searcher.save(str(tmp_path / "searcher.json"))
    after = []
    for _ in range(2):
        restored = CellSearcher(plan)
        restored.restore(str(tmp_path / "searcher.json"))
        after.append({cfg["cell"]: cfg["base_lr"] for cfg in (restored.suggest(f"u{i}") for i in range(len(plan.cells)))})
    assert all(after[0][c] != before[c] for c in before)
    assert after[0] == after[1]  # a resume of the same state draws the same


def test_a_resumed_search_hands_out_again_a_trial_tune_never_saved(tmp_path):
    """A full disk let the searcher's state reach storage while Tune's experiment
    state, written in the same save, did not: the resumed searcher waited for a
    trial Tune would never run, and the study hung (seen in the suite)."""
    plan = _plan()
    searcher = CellSearcher(plan)
    ids = [f"t{i}" for i in range(2 * len(plan.cells))]
    configs = {tid: searcher.suggest(tid) for tid in ids}
    for tid in ids[:-1]:
        searcher.on_trial_complete(tid, {"eval_loss": 1.0, "step": 12, "status": "finished"})
    searcher.save(str(tmp_path / "searcher.json"))
    lost = ids[-1]

    restored = CellSearcher(plan, known_trials=set(ids[:-1]))
    restored.restore(str(tmp_path / "searcher.json"))
    again = restored.suggest("r0")
    assert (again["cell"], again["role"], again["replicate"]) == (configs[lost]["cell"], "tune", configs[lost]["replicate"])
    restored.on_trial_complete("r0", {"eval_loss": 0.5, "step": 12, "status": "finished"})
    seeds = [restored.suggest(f"s{i}") for i in range(len(plan.cells))]
    assert all(s["role"] == "seed" for s in seeds) and restored.suggest("extra") == Searcher.FINISHED
    assert {s["seed_of"] for s in seeds if s["cell"] == again["cell"]} == {"r0"}


def test_asha_after_a_resume_measures_trials_against_the_rungs_reached_before(tmp_path):
    """Tune saves no scheduler state: ASHA started empty after a resume, and a
    trial worse than every trial before it at a rung went on to its budget."""
    plan = _plan()
    searcher = CellSearcher(plan)
    configs = {f"t{i}": searcher.suggest(f"t{i}") for i in range(2 * len(plan.cells))}
    cell = plan.cells[0]
    first, second = [tid for tid, cfg in configs.items() if cfg["cell"] == cell.id]
    grace = cell.config.eval_every_steps
    searcher.on_trial_result(first, {"step": grace, "eval_loss": 1.0})
    # the report that stops a trial early reaches the searcher with its end only
    other = [tid for tid, cfg in configs.items() if cfg["cell"] == plan.cells[1].id][0]
    searcher.on_trial_complete(other, {"step": grace, "eval_loss": 3.0, "status": "running"})
    assert searcher.optuna_trials(plan.cells[1].id)[0].intermediate_values == {grace: 3.0}
    searcher.save(str(tmp_path / "searcher.json"))

    restored = CellSearcher(plan)
    restored.restore(str(tmp_path / "searcher.json"))
    sched = PerCellScheduler(plan, restored)
    for tid in (first, second):  # Tune adds its saved trials again
        sched.on_trial_add(None, _trial(tid, cell.id))
    assert sched.on_trial_result(None, _trial(second, cell.id), {"step": grace, "eval_loss": 2.0}) == TrialScheduler.STOP
    # the trial that reached the rung before the kill is not measured there again
    assert sched.on_trial_result(None, _trial(first, cell.id), {"step": grace, "eval_loss": 9.0}) == TrialScheduler.CONTINUE


# ---------------------------------------------------------------- a whole study, interrupted and resumed

def _results(storage):
    path = storage / "tiny_grid" / "results.parquet"
    return pq.read_table(path).to_pylist() if path.exists() else []


@pytest.fixture(scope="module")
def resumed_study(tmp_path_factory, mlflow_server):
    storage = tmp_path_factory.mktemp("storage")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    common = ["--storage", str(storage), "--tracking-uri", mlflow_server.uri]
    proc = subprocess.Popen([sys.executable, "-m", "orchestrator", "run", str(TINY), *common], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + 600
    while time.time() < deadline and len(_results(storage)) < 2 and proc.poll() is None:
        time.sleep(1)
    interrupted_after = _results(storage)
    os.killpg(proc.pid, signal.SIGKILL)  # the driver, and the Ray it started
    proc.wait()
    assert len(interrupted_after) >= 2, proc.stdout.read().decode()[-3000:]
    done = subprocess.run([sys.executable, "-m", "orchestrator", "resume", "tiny_grid", *common], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=900)
    return SimpleNamespace(storage=storage, before=interrupted_after, done=done, uri=mlflow_server.uri)


def test_terminal_shows_progress_and_no_log_noise(resumed_study):
    out = resumed_study.done.stdout + resumed_study.done.stderr
    assert "done (" in out  # the progress view's lines
    for noise in ("(raylet)", "Token authentication", " INFO ", "WARNING", "Traceback"):
        assert noise not in out, f"{noise!r} reached the terminal:\n{out[-3000:]}"


def test_resume_completes_the_grid_without_rerunning(resumed_study):
    assert resumed_study.done.returncode == 0, resumed_study.done.stdout[-3000:] + resumed_study.done.stderr[-3000:]
    rows = _results(resumed_study.storage)
    plan = _plan()
    assert len(rows) == plan.trials
    for cell in plan.cells:
        assert sorted(r["replicate"] for r in rows if r["cell"] == cell.id) == [0, 1, 2]
    before = {r["trial_id"]: r for r in resumed_study.before}
    after = {r["trial_id"]: r for r in rows}
    for tid, row in before.items():  # finished trials were not run again
        assert after[tid]["flops"] == row["flops"] and after[tid]["eval_loss"] == row["eval_loss"]
    assert {r["status"] for r in rows} <= {"finished", "stopped_early"}
    by_id = {r["trial_id"]: r for r in rows}
    for cell in plan.cells:  # each cell's seed repeats its best finished tuning trial, to the end
        tuning = [r for r in rows if r["cell"] == cell.id and r["role"] == "tune"]
        (seed,) = [r for r in rows if r["cell"] == cell.id and r["role"] == "seed"]
        best = min((r for r in tuning if r["status"] == "finished"), key=lambda r: r["eval_loss"])
        assert seed["seed_of"] == best["trial_id"] and seed["status"] == "finished"
        assert seed["tuned.base_lr"] == best["tuned.base_lr"] and seed["seed"] not in {r["seed"] for r in tuning}
        assert by_id[seed["seed_of"]]["cell"] == cell.id
    for r in rows:
        assert r["flops"] > 0 and r["steps_done"] > 0
        if r["status"] == "finished":
            assert r["steps_done"] == r["steps"] and r["eval_loss"] is not None
        else:
            assert r["steps_done"] < r["steps"]


def test_mlflow_holds_parent_and_nested_trial_runs(resumed_study):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(resumed_study.uri)
    exp = client.get_experiment_by_name("tiny_grid")
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 1
    parent = parents[0]
    assert len(children) == _plan().trials  # a resumed trial keeps its run
    assert all(r.info.status == "FINISHED" for r in runs)  # none left RUNNING by the killed driver
    for run in children:
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert {"study", "cell", "trial_id", "git_commit", "status"} <= set(run.data.tags)
        assert run.data.params["preset"] == "tiny" and "seq_len" in run.data.params
        assert run.data.tags["status"] in ("finished", "stopped_early")
        assert "final_flops" in run.data.metrics
        history = client.get_metric_history(run.info.run_id, "loss")
        assert len(history) >= 2 and all(h.step > 0 for h in history)
    assert parent.data.metrics["trials_finished"] + parent.data.metrics.get("trials_stopped_early", 0) == 9
    assert any(k.startswith("curve.eval_loss_vs_seq_len") for k in parent.data.metrics)
    artifacts = [a.path for a in client.list_artifacts(parent.info.run_id, "curves")]
    assert "curves/eval_loss_vs_seq_len.png" in artifacts


def test_curves_land_in_storage(resumed_study):
    curves = resumed_study.storage / "tiny_grid" / "curves"
    assert (curves / "eval_loss_vs_seq_len.json").exists()
    assert (curves / "eval_loss_vs_seq_len.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert pq.read_table(curves / "points.parquet").num_rows > 0
    # a point is a cell's best tuned trial and its seed, never a stopped-early or other tuning trial
    rows = _results(resumed_study.storage)
    curve = json.loads((curves / "eval_loss_vs_seq_len.json").read_text())
    named = sorted(p["trial_id"] for g in curve["groups"].values() for p in g["points"])
    seeds = [r for r in rows if r["role"] == "seed"]
    assert named == sorted([r["trial_id"] for r in seeds] + [r["seed_of"] for r in seeds])
    assert "best tuned configuration" in curve["points_are"]
    # checkpoints of every trial live under <study>/trials/, beside the probe sets the trials share
    trials = {p.name for p in (resumed_study.storage / "tiny_grid" / "trials").iterdir()}
    assert PROBE_CACHE_FOLDER in trials and len(trials - {PROBE_CACHE_FOLDER}) == _plan().trials


def test_an_ending_replayed_from_its_row_gives_back_the_same_row():
    """A trial restarted after its row was written (its driver killed before Tune
    saved the ending) reports that ending from the row instead of training
    (orchestrator/trial.py); recorded again, it is the same row. A failed trial
    is not replayed: a resume runs it again."""
    from orchestrator.results import replayed_result, result_row, trial_status

    plan = _plan()
    cell = plan.cells[0].id
    config = {"cell": cell, "replicate": 1, "role": "tune", "seed_of": None, "base_lr": 4e-3,
              "train": plan.trial_config(cell, {"base_lr": 4e-3}, 1).model_dump(mode="json")}
    endings = {
        "finished": {"step": 12, "status": "finished", "loss": 0.4, "eval_loss": 0.5, "flops": 1e9,
                     "resumed_from_step": 6},
        "stopped_early": {"step": 6, "status": "running", "loss": 0.8, "eval_loss": 0.9, "flops": 5e8},
        "diverged": {"step": 3, "status": "diverged", "loss": float("nan"), "flops": 2e8,
                     "reason": "diverged: loss nan at step 3"},
    }
    for status, last in endings.items():
        row = result_row("t1", config, last, trial_status(last, errored=False))
        assert row["status"] == status
        replayed = replayed_result(row)
        again = result_row("t1", config, replayed, trial_status(replayed, errored=False))
        assert json.dumps(again, sort_keys=True) == json.dumps(row, sort_keys=True)
    assert replayed_result(result_row("t1", config, {"step": 4}, "failed")) is None


def test_a_trial_reports_every_result_of_its_train_run_however_late_tune_asks(ray_local, tmp_path):
    """With Ray's TuneReportCallback, Tune's actor took a Train run's reports from
    a queue of its own: when the run ended before Tune took its last report, Tune
    lost it or, taking it while the function's end marker filled its one-slot
    result queue, blocked for good (a study that never ended). A driver slower
    than the run (here a callback that takes 4 s per result) has the run end first."""
    import threading

    from ray import train, tune
    from ray.train.torch import TorchTrainer

    from orchestrator.trial import report_until_fit_ends

    def train_fn():
        for step in (1, 2, 3):
            train.report({"step": step})

    def trial(config):
        report_until_fit_ends(lambda forward: TorchTrainer(
            train_fn, scaling_config=train.ScalingConfig(num_workers=1),
            run_config=train.RunConfig(name="run", storage_path=str(tmp_path / "train"), callbacks=[forward])))

    class SlowDriver(tune.Callback):
        def on_trial_result(self, iteration, trials, trial, result, **info):
            time.sleep(4)

    tuner = tune.Tuner(trial, run_config=tune.RunConfig(
        name="slow_driver", storage_path=str(tmp_path / "tune"), callbacks=[SlowDriver()], verbose=0))
    done = {}
    runner = threading.Thread(target=lambda: done.update(results=tuner.fit()), daemon=True)
    runner.start()
    runner.join(timeout=240)
    assert not runner.is_alive(), "Tune never saw the trial end"
    (result,) = done["results"]
    assert result.error is None and list(result.metrics_dataframe["step"]) == [1, 2, 3]


def test_a_trial_whose_last_report_tune_never_took_is_recorded_from_its_train_run(tmp_path):
    """Tune's function trainable can return before it takes Train's last report
    (a one-slot queue between them): the trial ends with nothing heard. Its row
    then comes from the Train run's checkpoint snapshot, not `stopped_early` at
    step 0 (seen in a window_size_compute run: 2 finished trials of 24 lost
    from its curves). What Tune heard, when it heard a step, is kept."""
    from orchestrator.results import TRAIN_SNAPSHOT, last_result_of, trial_status
    from orchestrator.storage import Storage

    storage = Storage(str(tmp_path))
    final = {"step": 80, "status": "finished", "probe_top1": 0.5575, "eval_loss": 0.577, "flops": 5.4e11}
    storage.write_json(f"study/trials/t1/{TRAIN_SNAPSHOT}",
                       {"checkpoint_results": [{"metrics": final}], "latest_checkpoint_result": {"metrics": final}})
    for heard in ({}, None, {"trial_id": "t1"}):
        last = last_result_of(storage, "study", "t1", heard)
        assert last == final and trial_status(last, errored=False) == "finished"
    stopped = {"step": 12, "status": "running", "probe_top1": 0.3}
    assert last_result_of(storage, "study", "t1", stopped) is stopped
    assert last_result_of(storage, "study", "t2", {}) == {}  # no Train run in storage
