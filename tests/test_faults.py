"""Faults injected for real into studies: a diverging trial and checkpoints between
evaluations in a tuned study, resumes that must be no-ops or refusals, two
executions of one study, and code from storage that must not run."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pyarrow.parquet as pq
import pytest

REPO = Path(__file__).resolve().parents[1]
STUDIES = REPO / "tests" / "studies"


def orchestrator(*args, timeout=900, **kwargs):
    return subprocess.run([sys.executable, "-m", "orchestrator", *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout, **kwargs)


def results(storage, name):
    path = Path(storage) / name / "results.parquet"
    return {r["trial_id"]: r for r in pq.read_table(path).to_pylist()} if path.exists() else {}


def snapshot(folder: Path) -> dict:
    """Every file under `folder` with its size and modification time."""
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in folder.rglob("*") if p.is_file()}


def one_error_line(done) -> str:
    assert done.returncode == 2, done.stdout[-2000:] + done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr
    return lines[0]


# ---------------------------------------------------------------- a tuned study with a diverging cell

@pytest.fixture(scope="module")
def tuned(tmp_path_factory, mlflow_server):
    """tests/studies/tuned_faults.py (copied: one test edits it), run to its end."""
    root = tmp_path_factory.mktemp("tuned")
    study_file = root / "tuned_faults.py"
    shutil.copy(STUDIES / "tuned_faults.py", study_file)
    storage = root / "storage"
    common = ["--storage", storage, "--tracking-uri", mlflow_server.uri]
    done = orchestrator("run", study_file, *common)
    return SimpleNamespace(study_file=study_file, storage=storage, common=common, done=done,
                           uri=mlflow_server.uri, rows=results(storage, "tuned_faults"))


def test_diverged_trial_ends_diverged_and_the_tuned_study_goes_on(tuned):
    assert tuned.done.returncode == 0, tuned.done.stdout[-3000:] + tuned.done.stderr[-3000:]
    assert "Traceback" not in tuned.done.stdout + tuned.done.stderr
    by_lr = {}
    for row in tuned.rows.values():
        by_lr.setdefault(row["lr"], []).append(row)
    tuning = {lr: [r for r in rows if r["role"] == "tune"] for lr, rows in by_lr.items()}
    assert sorted(by_lr) == [4e-3, 1e6] and all(len(rows) == 2 for rows in tuning.values())
    assert all(r["status"] == "diverged" and r["reason"].startswith("diverged: loss") for r in by_lr[1e6])
    assert all(r["status"] in ("finished", "stopped_early") for r in tuning[4e-3])
    assert any(r["status"] == "finished" and r["eval_loss"] is not None for r in tuning[4e-3])
    # the healthy cell gets a seed of its best finished trial; the diverged one has none to repeat
    (seed,) = [r for r in by_lr[4e-3] if r["role"] == "seed"]
    assert seed["status"] == "finished" and tuned.rows[seed["seed_of"]]["status"] == "finished"
    assert len(by_lr[1e6]) == 2

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tuned.uri)
    exp = client.get_experiment_by_name("tuned_faults")
    runs = {r.data.tags.get("trial_id"): r for r in client.search_runs([exp.experiment_id])}
    for tid, row in tuned.rows.items():
        assert runs[tid].data.tags["status"] == row["status"]
        assert runs[tid].info.status == ("FAILED" if row["status"] == "diverged" else "FINISHED")


def test_the_study_log_is_readable_by_its_owner_only(tuned):
    import re
    import stat

    log = Path(re.search(r"Ray log: (\S+?\.log)", tuned.done.stdout.replace("\n", "")).group(1))
    assert stat.S_IMODE(log.stat().st_mode) & 0o077 == 0


def test_searcher_was_told_every_ending_and_heard_only_evaluation_points(tuned):
    states = sorted((tuned.storage / "tuned_faults" / "tune").glob("searcher-state-*.pkl"))
    saved = json.loads(states[-1].read_text())
    rows = tuned.rows
    for tid, number in saved["trial_number"].items():  # the tuning trials (seeds are not Optuna's)
        trial = saved["optuna"][saved["trial_cell"][tid]][number]
        expected = {"finished": "COMPLETE", "stopped_early": "PRUNED", "diverged": "PRUNED"}[rows[tid]["status"]]
        assert trial["state"] == expected
        evaluation_points = {6, 12}  # checkpoints every 2 steps are not reported to Optuna
        reported = {int(step) for step, value in trial["intermediate"].items() if value == value}
        assert reported <= evaluation_points


def test_resume_of_a_finished_study_is_a_no_op(tuned):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tuned.uri)
    exp = client.get_experiment_by_name("tuned_faults")
    runs_before = len(client.search_runs([exp.experiment_id]))
    done = orchestrator("resume", "tuned_faults", "--study", tuned.study_file, *tuned.common)
    assert done.returncode == 0, done.stderr[-3000:]
    after = results(tuned.storage, "tuned_faults")
    # nothing trained again, no row rewritten differently (JSON: a diverged loss is NaN)
    assert json.dumps(after, sort_keys=True) == json.dumps(tuned.rows, sort_keys=True)
    assert len(client.search_runs([exp.experiment_id])) == runs_before


def test_resume_refuses_a_changed_study_file(tuned):
    original = tuned.study_file.read_text()
    before = snapshot(tuned.storage)
    try:
        tuned.study_file.write_text(original.replace("steps=12", "steps=24"))
        line = one_error_line(orchestrator("resume", "tuned_faults", "--study", tuned.study_file, *tuned.common))
        assert str(tuned.study_file) in line and "changed since" in line
    finally:
        tuned.study_file.write_text(original)
    assert snapshot(tuned.storage) == before


def test_resume_refuses_unreadable_tune_state_and_changes_nothing(tuned):
    tune = tuned.storage / "tuned_faults" / "tune"
    newest = sorted(tune.glob("experiment_state-*.json"))[-1]
    kept = newest.read_bytes()
    try:
        newest.write_bytes(kept[: len(kept) // 2])  # a truncated upload
        before = snapshot(tuned.storage)
        line = one_error_line(orchestrator("resume", "tuned_faults", "--study", tuned.study_file, *tuned.common))
        assert newest.name in line and "unreadable" in line
        assert snapshot(tuned.storage) == before
    finally:
        newest.write_bytes(kept)


def test_status_and_fit_run_no_code_from_storage(tuned, tmp_path):
    """Anyone who can write the bucket can change study.json: reading it must not run it."""
    marker = tmp_path / "ran"
    state_file = tuned.storage / "tuned_faults" / "study.json"
    kept = state_file.read_text()
    state = json.loads(kept)
    state["study_source"] = f"open({str(marker)!r}, 'w').write('pwned')\n" + state["study_source"]
    try:
        state_file.write_text(json.dumps(state))
        assert orchestrator("status", "tuned_faults", "--storage", tuned.storage).returncode == 0
        assert orchestrator("fit", "tuned_faults", *tuned.common, "--bootstrap", "10").returncode == 0
        assert not marker.exists()
        # and resume runs only the file on this disk, which differs: refused
        one_error_line(orchestrator("resume", "tuned_faults", "--study", tuned.study_file, *tuned.common))
        assert not marker.exists()
    finally:
        state_file.write_text(kept)


def test_credentials_in_a_tracking_uri_are_refused_without_being_echoed(tmp_path):
    """A `user:token@` tracking URI would land in study.json and on the terminal."""
    storage = tmp_path / "storage"
    done = orchestrator("run", STUDIES / "tiny_grid.py", "--storage", storage,
                        "--tracking-uri", "http://alice:tok-5ecret@127.0.0.1:9", timeout=120)
    line = one_error_line(done)
    assert "MLFLOW_TRACKING_PASSWORD" in line
    assert "tok-5ecret" not in done.stdout + done.stderr
    assert not any(storage.rglob("study.json"))


# ---------------------------------------------------------------- one execution at a time

def _hold_local_lock(storage: Path, name: str) -> subprocess.Popen:
    code = ("import sys, time; from orchestrator.storage import Storage; "
            "from orchestrator.study_lock import StudyLock; "
            f"lock = StudyLock(Storage({str(storage)!r}), {name!r}).acquire(); print('held', flush=True); time.sleep(600)")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_resume_while_the_study_runs_is_refused(tuned):
    holder = _hold_local_lock(tuned.storage, "tuned_faults")  # what a running `run` holds
    try:
        before = snapshot(tuned.storage)
        line = one_error_line(orchestrator("resume", "tuned_faults", "--study", tuned.study_file, *tuned.common))
        assert "held by another execution" in line and f"pid {holder.pid}" in line
        assert snapshot(tuned.storage) == before
    finally:
        holder.kill()
        holder.wait()


def test_local_lock_is_freed_when_its_holder_is_killed(tmp_path):
    from orchestrator.storage import Storage
    from orchestrator.study_lock import StudyLock, StudyLocked

    holder = _hold_local_lock(tmp_path, "s")
    with pytest.raises(StudyLocked, match="held by another execution"):
        StudyLock(Storage(str(tmp_path)), "s").acquire()
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait()
    StudyLock(Storage(str(tmp_path)), "s").acquire().release()  # no stale lock after a SIGKILL


def test_s3_lock_is_exclusive_renewed_and_taken_over_when_stale(s3_server, monkeypatch):
    import boto3

    from orchestrator import study_lock
    from orchestrator.storage import Storage
    from orchestrator.study_lock import StudyLock, StudyLocked

    storage = Storage(s3_server.uri("locks"))
    first = StudyLock(storage, "s").acquire()
    with pytest.raises(StudyLocked, match="held by another execution"):
        StudyLock(storage, "s").acquire()
    first.release()
    second = StudyLock(storage, "s").acquire()  # released: free again
    # a holder that stopped renewing (its driver died) is taken over after STALE_AFTER_S
    second._stop.set()
    s3 = boto3.client("s3", endpoint_url=s3_server.endpoint)
    key = "locks/s/.lock"
    owner = json.loads(s3.get_object(Bucket=s3_server.bucket, Key=key)["Body"].read())
    owner["renewed"] -= study_lock.STALE_AFTER_S + 1
    s3.put_object(Bucket=s3_server.bucket, Key=key, Body=json.dumps(owner).encode())
    third = StudyLock(storage, "s").acquire()
    assert json.loads(s3.get_object(Bucket=s3_server.bucket, Key=key)["Body"].read())["pid"] == os.getpid()
    # renewal keeps a live holder fresh
    monkeypatch.setattr(study_lock, "RENEW_EVERY_S", 0.2)
    third.release()
    fourth = StudyLock(storage, "s").acquire()
    first_stamp = json.loads(s3.get_object(Bucket=s3_server.bucket, Key=key)["Body"].read())["renewed"]
    time.sleep(1.0)
    assert json.loads(s3.get_object(Bucket=s3_server.bucket, Key=key)["Body"].read())["renewed"] > first_stamp
    fourth.release()


# ---------------------------------------------------------------- the tracking server goes away

def test_mlflow_server_stopped_for_60_s_mid_study(tmp_path):
    """SIGSTOP the MLflow server (it accepts connections and answers nothing) for
    60 s while trials train: the study finishes, every run ends in a final state,
    and step metrics arrive late or are reported as lost."""
    from mlflow.tracking import MlflowClient

    from conftest import start_mlflow_server, stop_process_group

    (tmp_path / "mlflow").mkdir()
    server, uri = start_mlflow_server(tmp_path / "mlflow")
    storage = tmp_path / "storage"
    try:
        study = subprocess.Popen([sys.executable, "-m", "orchestrator", "run", str(STUDIES / "tiny_grid.py"),
                                  "--storage", str(storage), "--tracking-uri", uri], cwd=REPO,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        client = MlflowClient(uri)
        deadline = time.time() + 300
        while time.time() < deadline:  # until a trial's run has step metrics
            exp = client.get_experiment_by_name("tiny_grid")
            runs = client.search_runs([exp.experiment_id]) if exp else []
            if any("loss" in r.data.metrics and "mlflow.parentRunId" in r.data.tags for r in runs):
                break
            time.sleep(0.5)
        os.killpg(server.pid, signal.SIGSTOP)
        time.sleep(60)
        os.killpg(server.pid, signal.SIGCONT)
        out, err = study.communicate(timeout=900)
        assert study.returncode == 0, out[-3000:] + err[-3000:]
        rows = results(storage, "tiny_grid")
        assert len(rows) == 9 and {r["status"] for r in rows.values()} <= {"finished", "stopped_early"}
        exp = client.get_experiment_by_name("tiny_grid")
        runs = client.search_runs([exp.experiment_id])
        assert len(runs) == 1 + len(rows) and all(r.info.status == "FINISHED" for r in runs), \
            [(r.info.run_name, r.info.status) for r in runs]
        for run in runs:
            if "mlflow.parentRunId" not in run.data.tags:
                continue
            row = rows[run.data.tags["trial_id"]]
            logged = len(client.get_metric_history(run.info.run_id, "loss"))
            assert logged >= 2 or row["step_metrics_lost"], (row["trial_id"], logged)
        if any(r["step_metrics_lost"] for r in rows.values()):
            assert "never reached MLflow" in err
    finally:
        stop_process_group(server)


# ---------------------------------------------------------------- the bucket goes away

@pytest.mark.skipif(os.environ.get("MIM_S3_OUTAGE_TEST") != "1",
                    reason="passed in a whole-suite run, then hung in the next: a trial's Tune actor deadlocked in "
                           "Ray's own _TrainSession.get_next (report -> result_queue.put on a full queue that only "
                           "it reads); run by hand with MIM_S3_OUTAGE_TEST=1 until a watchdog covers it")
def test_s3_stalled_then_refusing_for_30_s_each_mid_study(s3_server, tmp_path):
    """A proxy in front of the S3 server stalls every connection for 30 s once a
    checkpoint is in the bucket, then refuses connections for 30 s once a row is
    in results.parquet: the study finishes with no failed trial, and every
    checkpoint in the bucket loads."""
    import io

    import boto3
    import torch

    from tcp_proxy import TcpProxy

    host, port = s3_server.endpoint.removeprefix("http://").split(":")
    proxy = TcpProxy(host, int(port))
    direct = boto3.client("s3", endpoint_url=s3_server.endpoint)
    bucket, prefix = s3_server.bucket, "outage"

    def keys(part: str) -> list[str]:
        pages = direct.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=f"{prefix}/tiny_grid/")
        return [o["Key"] for page in pages for o in page.get("Contents", []) if part in o["Key"]]

    def wait_for(part: str, seconds: float = 300) -> None:
        deadline = time.time() + seconds
        while not keys(part) and time.time() < deadline:
            time.sleep(0.5)
        assert keys(part), f"no {part} in the bucket after {seconds} s"

    env = {**os.environ, **s3_server.env, "AWS_ENDPOINT_URL": proxy.endpoint}
    study = subprocess.Popen([sys.executable, "-m", "orchestrator", "run", str(STUDIES / "tiny_grid.py"),
                              "--storage", s3_server.uri(prefix),
                              "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db"],
                             cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for("/state.pt")
        proxy.stall()
        time.sleep(30)
        proxy.resume()
        wait_for("results.parquet")
        proxy.refuse()
        time.sleep(30)
        proxy.resume()
        out, err = study.communicate(timeout=900)
    finally:
        proxy.resume()
        if study.poll() is None:
            study.kill()
    assert study.returncode == 0, out[-3000:] + err[-3000:]
    table = pq.read_table(io.BytesIO(direct.get_object(
        Bucket=bucket, Key=f"{prefix}/tiny_grid/results.parquet")["Body"].read())).to_pylist()
    assert len(table) == 9 and {r["status"] for r in table} <= {"finished", "stopped_early"}
    states = keys("/state.pt")
    assert states
    for key in states:  # every checkpoint a resume could pick loads
        state = torch.load(io.BytesIO(direct.get_object(Bucket=bucket, Key=key)["Body"].read()),
                           weights_only=True)
        assert state["progress"]["step"] > 0


# ---------------------------------------------------------------- what a killed driver leaves behind

def test_recorder_catches_up_with_what_a_killed_driver_left(ray_local, tmp_path):
    """After a driver SIGKILL: a trial Tune saw end but whose row was never written
    gets its row; runs left RUNNING end in their trial's state, or KILLED (status
    `lost`) for a trial Tune never saved, which the resumed study runs again."""
    from mlflow.tracking import MlflowClient

    from orchestrator.planning import make_plan
    from orchestrator.results import TrialRecorder
    from orchestrator.storage import Storage
    from orchestrator.study import load_study
    from orchestrator.tracking import trial_run

    plan = make_plan(load_study(STUDIES / "tiny_grid.py"), "local")
    train = plan.trial_config("patch_size=8", {"base_lr": 4e-3}, 0).model_dump(mode="json")
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    exp = client.create_experiment("s")
    parent = client.create_run(exp).info.run_id
    ended, unsaved = "ended01", "unsaved1"
    for tid in (ended, unsaved):
        trial_run(client, exp, parent, tid, tid, {})
    trial = SimpleNamespace(trial_id=ended, status="TERMINATED",
                            config={"cell": "patch_size=8", "replicate": 0, "base_lr": 4e-3, "train": train},
                            last_result={"step": 12, "status": "finished", "eval_loss": 0.5, "flops": 1e9})
    recorder = TrialRecorder(Storage(str(tmp_path / "storage")), "s", uri, exp, parent)
    recorder.on_step_begin(iteration=0, trials=[trial])
    assert recorder.close(parent_status="FINISHED") == []
    rows = results(tmp_path / "storage", "s")
    assert rows[ended]["status"] == "finished" and rows[ended]["eval_loss"] == 0.5
    runs = {r.data.tags["trial_id"]: r for r in client.search_runs([exp]) if "trial_id" in r.data.tags}
    assert runs[ended].info.status == "FINISHED" and runs[ended].data.tags["status"] == "finished"
    assert runs[unsaved].info.status == "KILLED" and runs[unsaved].data.tags["status"] == "lost"
    assert client.get_run(parent).info.status == "FINISHED"


# ---------------------------------------------------------------- a spot node goes away

@pytest.mark.skipif(os.environ.get("MIM_NODE_LOSS_TEST") != "1",
                    reason="hung once in a fresh-clone run (two Train controllers waiting for workers after the "
                           "node loss, placement groups left holding the CPUs); run by hand with "
                           "MIM_NODE_LOSS_TEST=1 until the fix for that is seen to hold in the whole suite")
def test_worker_node_killed_mid_study_its_trials_continue_elsewhere_from_s3(s3_server, monkeypatch):
    """A head (trial drivers only, as infra/cluster.yaml's) and two 1-CPU worker
    nodes, one trial training on each; once both have a checkpoint in the bucket,
    one worker node is killed (its raylet and workers SIGKILLed) and a fresh one
    joins: the interrupted trial resumes from its checkpoint in S3, none fails."""
    import io

    import boto3
    from ray.cluster_utils import Cluster

    # This process's own Ray (ray_local) announces its dashboard in the environment;
    # the cluster's processes must not inherit it, or they ask the wrong state API.
    monkeypatch.delenv("RAY_API_SERVER_ADDRESS", raising=False)
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 0, "resources": {"head_driver": 8}, "include_dashboard": True})
    doomed = cluster.add_node(num_cpus=1)
    cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    direct = boto3.client("s3", endpoint_url=s3_server.endpoint)
    prefix = "node-loss/node_loss"

    def keys(part: str) -> list[str]:
        pages = direct.get_paginator("list_objects_v2").paginate(Bucket=s3_server.bucket, Prefix=prefix)
        return [o["Key"] for page in pages for o in page.get("Contents", []) if part in o["Key"]]

    try:
        address = f"127.0.0.1:{cluster.address.rsplit(':', 1)[1]}"
        study = subprocess.Popen([sys.executable, "-m", "orchestrator", "run", str(STUDIES / "node_loss.py"),
                                  "--address", address, "--storage", s3_server.uri("node-loss"),
                                  "--tracking-uri", "sqlite:////tmp/mim-node-loss-mlflow.db"],
                                 cwd=REPO, env={**os.environ, **s3_server.env}, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True)
        def trials_with_checkpoints() -> set[str]:
            return {k.split("/trials/")[1].split("/")[0] for k in keys("/state.pt")}

        # both trials (one per worker node) have a checkpoint: the doomed node's has one to resume from
        deadline = time.time() + 300
        while len(trials_with_checkpoints()) < 2 and time.time() < deadline and study.poll() is None:
            time.sleep(0.5)
        assert len(trials_with_checkpoints()) == 2, "the two trials did not both checkpoint"
        cluster.remove_node(doomed, allow_graceful=False)
        cluster.add_node(num_cpus=1)
        out, err = study.communicate(timeout=900)
    finally:
        if study.poll() is None:
            study.kill()
        cluster.shutdown()
        for path in Path("/tmp").glob("mim-node-loss-mlflow.db*"):
            path.unlink()
    assert study.returncode == 0, out[-3000:] + err[-3000:]
    rows = pq.read_table(io.BytesIO(direct.get_object(
        Bucket=s3_server.bucket, Key=f"{prefix}/results.parquet")["Body"].read())).to_pylist()
    assert len(rows) == 2 and {r["status"] for r in rows} == {"finished"}
    assert any((r["resumed_from_step"] or 0) > 0 for r in rows), "no trial resumed from a checkpoint"
