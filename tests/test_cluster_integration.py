"""The cluster path with real parts: a study run on a three-node Ray cluster.

One module-scoped run, several checks. On this machine it starts:

* a Ray cluster of three `ray start` processes: a head with 0 CPUs and the
  `head_driver` resource (as infra/cluster-hardened.yaml's head) and two 1-CPU worker
  nodes, with token authentication on (a token file of its own, handed to every
  process through RAY_AUTH_MODE/RAY_AUTH_TOKEN_PATH, so ~/.ray is never touched);
* the `s3_server` fixture's moto S3 server;
* an `mlflow server` with a sqlite backend that proxies artifacts to the bucket;

then runs `python -m orchestrator run` against all three, as an operator on the
head would, and checks what lands in the bucket, in MLflow and where Ray ran
the Train workers, and that no credential is recorded anywhere.

Teardown ends only the processes started here: their process groups (each
`ray start` and the MLflow server get a session of their own) and the nodes'
descendants, never other Ray instances on the machine (no `ray stop`, which
would stop every Ray on it). A watchdog process kills the same groups if pytest
dies before it can tear down. MIM_IT_KEEP_RAY_LOGS=1 keeps the nodes' session
logs beside the study file in pytest's temp dir.
"""
from __future__ import annotations

import io
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[1]
STUDY = "cluster_it"
CURVE = "eval_loss_vs_seq_len"
CELLS = ("patch_size=8", "patch_size=4")
STEPS, LOG_EVERY = 10, 2
OBJECT_STORE_BYTES = 100 * 2**20

STUDY_SOURCE = f'''
"""Integration study: two cells x one trial, tiny MAE, one curve."""
from orchestrator.curves import CurveSpec
from orchestrator.study import Budget, LogUniform, Objective, Profile, Study

study = Study(
    name="{STUDY}",
    question="does a tiny MAE study run across a multi-node Ray cluster?",
    profiles={{
        "local": Profile(
            axes={{"patch_size": [8, 4]}},
            fixed={{"preset": "tiny", "depth": 1, "img_size": 16, "batch_size": 16,
                   "probe_train_size": 150, "probe_eval_size": 100, "log_every_steps": {LOG_EVERY}}},
            budget=Budget(steps={STEPS}),
        ),
    }},
    tune={{"base_lr": LogUniform(low=1e-3, high=1e-2)}},
    trials_per_cell=1,
    replicates=0,  # two trials: the seeds of a cell's best are tested on one node
    objective=Objective(metric="eval_loss", mode="min"),
    evaluations=1,
    early_stopping=False,
    curves=[CurveSpec(name="{CURVE}", x="seq_len", y="eval_loss", law="power")],
)
'''


# --------------------------------------------------------------------------- helpers

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _base_env(s3_env: dict[str, str]) -> dict[str, str]:
    """This process's environment without anything pointing at another Ray or MLflow
    (the pytest process may run its own Ray), plus the S3 variables and the repo on
    PYTHONPATH (the project is used from its checkout)."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("RAY_", "MLFLOW_", "AWS_", "TUNE_"))}
    env.update(s3_env)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    return env


def _bin(name: str) -> str:
    """A console script of this interpreter's environment."""
    here = Path(sys.executable).parent / name
    return str(here) if here.exists() else (shutil.which(name) or name)


def _tail(path: Path, n: int = 60) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return f"<no {path}>"


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def _end_groups(procs: list[subprocess.Popen], grace: float = 5.0) -> None:
    """SIGTERM the process groups started for `procs` (start_new_session: a group's id
    is its leader's pid), then SIGKILL whatever is still there after `grace` seconds
    (grace 0: SIGKILL at once)."""
    steps = [(signal.SIGTERM, grace)] if grace > 0 else []
    for sig, wait in steps + [(signal.SIGKILL, 10.0)]:
        alive = [p for p in procs if _group_alive(p.pid)]
        for p in alive:
            try:
                os.killpg(p.pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + wait
        while alive and time.monotonic() < deadline:
            for p in alive:
                p.poll()  # reap the leader: it is our child
            alive = [p for p in alive if _group_alive(p.pid)]
            time.sleep(0.2)
    for p in procs:
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass


def _stat(pid: int) -> list[str] | None:
    """Fields of /proc/<pid>/stat after the command name (field 4, ppid, comes first)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text.rsplit(")", 1)[1].split()[1:]


def _start_time(pid: int) -> str | None:
    fields = _stat(pid)
    return fields[18] if fields else None  # field 22, starttime: tells a reused pid apart


def _descendants(roots: list[int]) -> dict[int, str]:
    """pid -> start time of every process below `roots`."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        fields = _stat(int(entry)) if entry.isdigit() else None
        if fields:
            children.setdefault(int(fields[0]), []).append(int(entry))
    found: dict[int, str] = {}
    todo = list(roots)
    while todo:
        for child in children.get(todo.pop(), []):
            started = _start_time(child)
            if started is not None and child not in found:
                found[child] = started
                todo.append(child)
    return found


def _kill_leftovers(marker: str) -> None:
    """SIGKILL any process whose command line names `marker` (this cluster's own temp
    dir): a Ray worker that left the process group of its node still goes."""
    me = os.getpid()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if marker in cmdline:
            try:
                os.kill(int(entry), signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass


class _Reaper:
    """A watchdog in a session of its own that SIGKILLs the process groups it was told
    about once its stdin closes: at the end of the fixture, or when pytest dies without
    tearing down (a killed CI job), so no node or server outlives the test session."""

    SCRIPT = ("import os, signal, sys\n"
              "groups = [int(line) for line in sys.stdin]\n"
              "for g in groups:\n"
              "    try:\n"
              "        os.killpg(g, signal.SIGKILL)\n"
              "    except OSError:\n"
              "        pass\n")

    def __init__(self):
        self.proc = subprocess.Popen([sys.executable, "-c", self.SCRIPT], stdin=subprocess.PIPE,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     start_new_session=True, text=True)

    def watch(self, proc: subprocess.Popen) -> subprocess.Popen:
        self.proc.stdin.write(f"{proc.pid}\n")
        self.proc.stdin.flush()
        return proc

    def close(self) -> None:
        try:
            self.proc.stdin.close()
        finally:
            self.proc.wait(timeout=30)


# --------------------------------------------------------------------------- Ray cluster

@dataclass
class RayCluster:
    """A head and two worker nodes started with `ray start`, token auth on."""

    root: Path  # short temp dir: Ray's unix sockets live under it
    gcs_port: int
    dashboard_port: int
    token: str
    env: dict[str, str]  # what a process joining the cluster needs
    reaper: _Reaper
    procs: list[subprocess.Popen] = field(default_factory=list)
    logs: list[Path] = field(default_factory=list)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.gcs_port}"

    @property
    def dashboard(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def _start(self, name: str, args: list[str]) -> None:
        log = self.root / f"{name}.out"
        ports = ["--dashboard-agent-listen-port", str(_free_port()),  # default 52365 is machine-wide
                 "--object-store-memory", str(OBJECT_STORE_BYTES), "--temp-dir", str(self.root / name),
                 "--include-log-monitor=false",  # streams worker logs to drivers; none wants them here
                 "--disable-usage-stats", "--block"]
        with open(log, "wb") as out:
            proc = subprocess.Popen([_bin("ray"), "start", *args, *ports], env=self.env, cwd=REPO,
                                    stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    start_new_session=True)
        self.procs.append(self.reaper.watch(proc))
        self.logs.append(log)

    def start_head(self) -> None:
        self._start("head", ["--head", f"--port={self.gcs_port}", "--num-cpus=0", "--num-gpus=0",
                             '--resources={"head_driver": 100}', "--include-dashboard=true",
                             "--dashboard-host=127.0.0.1", f"--dashboard-port={self.dashboard_port}",
                             "--ray-client-server-port", str(_free_port())])

    def start_worker(self, i: int) -> None:
        self._start(f"worker{i}", [f"--address={self.address}", "--num-cpus=1", "--num-gpus=0"])

    def wait_for_gcs(self, timeout: float) -> None:
        """Until the head's GCS takes connections: worker nodes can join from then on."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.check_running()
            try:
                with socket.create_connection(("127.0.0.1", self.gcs_port), timeout=2):
                    return
            except OSError:
                time.sleep(0.3)
        raise TimeoutError(f"the head's GCS does not answer after {timeout:.0f} s:\n{_tail(self.logs[0])}")

    def check_running(self) -> None:
        for proc, log in zip(self.procs, self.logs):
            if proc.poll() is not None:
                raise RuntimeError(f"`ray start` exited with {proc.returncode}:\n{_tail(log)}")

    def state(self, resource: str, **params) -> list[dict]:
        """Ray's state API over HTTP, with the cluster's token."""
        query = urllib.parse.urlencode({"limit": 10000, **params}, doseq=True)
        req = urllib.request.Request(f"{self.dashboard}/api/v0/{resource}?{query}",
                                     headers={"Authorization": f"Bearer {self.token}"})
        with urllib.request.urlopen(req, timeout=30) as resp:
            body = json.loads(resp.read())
        assert body.get("result"), body
        return body["data"]["result"]["result"]

    def wait_for_nodes(self, n: int, timeout: float) -> list[dict]:
        deadline = time.monotonic() + timeout
        nodes: list[dict] = []
        while time.monotonic() < deadline:
            self.check_running()
            try:
                nodes = [x for x in self.state("nodes", detail="true") if x["state"] == "ALIVE"]
            except (OSError, urllib.error.URLError, KeyError, ValueError, AssertionError):
                nodes = []
            if len(nodes) >= n:
                return nodes
            time.sleep(1)
        raise TimeoutError(f"{len(nodes)} of {n} Ray nodes alive after {timeout:.0f} s:\n"
                           + "\n".join(_tail(log, 20) for log in self.logs))

    def stop(self) -> None:
        # Ray puts each worker process in a process group of its own: note every
        # descendant of the nodes first, and make sure they are gone at the end.
        try:
            family = _descendants([p.pid for p in self.procs])
        except OSError:
            family = {}
        # nothing of a throwaway cluster needs a graceful end (and `ray start --block`
        # and the GCS take their time over SIGTERM)
        _end_groups(self.procs, grace=0)
        for pid, started in family.items():
            if _start_time(pid) == started:  # still the process found above, not a reused pid
                try:
                    os.kill(pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
        _kill_leftovers(str(self.root))


def _start_cluster(s3_env: dict[str, str], reaper: _Reaper) -> RayCluster:
    root = Path(tempfile.mkdtemp(prefix="mimrc-", dir="/tmp"))  # short: unix socket paths max 107 chars
    token_file = root / "auth_token"
    token = secrets.token_hex(32)
    token_file.write_text(token)
    token_file.chmod(0o600)
    gcs_port, dashboard_port = _free_port(), _free_port()
    env = _base_env(s3_env)
    env.update({
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN_PATH": str(token_file),
        # Train's placement-group cleaner asks the state API; with several Ray
        # instances on one machine it must be told which dashboard is ours.
        "RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{dashboard_port}",
        # On 2 busy cores a Train worker may take more than Train's default 60 s to
        # start (import torch, join gloo); a slow start is not what this test checks.
        "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "300",
    })
    return RayCluster(root, gcs_port, dashboard_port, token, env, reaper)


# --------------------------------------------------------------------------- MLflow server

@dataclass
class MlflowServer:
    url: str
    proc: subprocess.Popen
    log: Path

    def wait_healthy(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited with {self.proc.returncode}:\n{_tail(self.log)}")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=5) as resp:
                    if resp.status == 200:
                        return
            except (OSError, urllib.error.URLError):
                pass
            time.sleep(0.5)
        raise TimeoutError(f"mlflow server not healthy after {timeout:.0f} s:\n{_tail(self.log)}")


def _start_mlflow(folder: Path, s3_server, reaper: _Reaper) -> MlflowServer:
    port = _free_port()
    env = _base_env(s3_server.env)
    env["MLFLOW_S3_ENDPOINT_URL"] = s3_server.endpoint
    # no background job runner (seven more processes on a 2-core machine; unused here)
    env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"
    log = folder / "mlflow.out"
    cmd = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
           "--workers", "1", "--backend-store-uri", f"sqlite:///{folder / 'mlflow.db'}",
           "--serve-artifacts", "--artifacts-destination", s3_server.uri("mlartifacts")]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, env=env, cwd=folder, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    return MlflowServer(f"http://127.0.0.1:{port}", reaper.watch(proc), log)


# --------------------------------------------------------------------------- the run

@dataclass
class StudyRun:
    cluster: RayCluster
    nodes: list[dict]  # the cluster's nodes, as the state API saw them before the run
    tracking_uri: str
    storage_uri: str
    returncode: int
    output: str
    setup: str  # how long the cluster and the MLflow server took to start
    seconds: float  # the `run` command
    secrets: list[str]  # values that must never be recorded anywhere
    mlflow_log: Path

    @property
    def ray_log(self) -> Path | None:
        """The log file the orchestrator sends Ray's and Tune's lines to (it prints its path)."""
        found = re.search(r"Ray log: (\S+\.log)", self.output)
        return Path(found.group(1)) if found else None

    def diagnosis(self) -> str:
        """The end of the command's output and the errors in its Ray log, for failure messages."""
        text = f"exit code {self.returncode}\n--- output:\n{self.output[-4000:]}"
        if self.ray_log is not None and self.ray_log.exists():
            lines = self.ray_log.read_text(errors="replace").splitlines()
            errors = [ln for ln in lines if " ERROR " in ln or ln.startswith(("Traceback", "ray.exceptions"))
                      or "Error:" in ln]
            text += f"\n--- errors in {self.ray_log}:\n" + "\n".join(errors[-40:])
        return text

    @property
    def head_id(self) -> str:
        return next(n["node_id"] for n in self.nodes if n["is_head_node"])

    @property
    def worker_ids(self) -> set[str]:
        return {n["node_id"] for n in self.nodes if not n["is_head_node"]}


@pytest.fixture(scope="module")
def study_run(s3_server, tmp_path_factory):
    folder = tmp_path_factory.mktemp("cluster-it")
    study_file = folder / f"{STUDY}.py"
    study_file.write_text(textwrap.dedent(STUDY_SOURCE))

    began = time.monotonic()
    reaper = _Reaper()
    mlflow = _start_mlflow(folder, s3_server, reaper)  # starts while Ray does: both take a while
    cluster = _start_cluster(s3_server.env, reaper)
    try:
        cluster.start_head()
        cluster.wait_for_gcs(timeout=120)
        cluster.start_worker(1)
        cluster.start_worker(2)
        nodes = cluster.wait_for_nodes(3, timeout=120)
        ray_up = time.monotonic() - began
        mlflow.wait_healthy(timeout=180)

        storage = s3_server.uri("studies")
        env = {**cluster.env, "COLUMNS": "200"}  # as a shell on the head: S3 and Ray, no MLflow S3 settings
        cmd = [sys.executable, "-m", "orchestrator", "run", str(study_file), "--address", cluster.address,
               "--storage", storage, "--tracking-uri", mlflow.url]
        started = time.monotonic()
        setup = f"Ray cluster up in {ray_up:.0f} s, MLflow in {started - began:.0f} s"
        try:
            done = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=900)
            returncode, output = done.returncode, done.stdout + done.stderr
        except subprocess.TimeoutExpired as e:
            returncode = -1
            output = f"timed out after {e.timeout} s\n{e.stdout or ''}{e.stderr or ''}"
        credentials = [s3_server.env["AWS_SECRET_ACCESS_KEY"], s3_server.env["AWS_ACCESS_KEY_ID"], cluster.token]
        yield StudyRun(cluster, nodes, mlflow.url, storage, returncode, output, setup,
                       time.monotonic() - started, credentials, mlflow.log)
    finally:  # each step runs even if one before it fails
        try:
            cluster.stop()
        finally:
            try:
                _end_groups([mlflow.proc])
            finally:
                if os.environ.get("MIM_IT_KEEP_RAY_LOGS"):  # debugging: keep the nodes' session logs
                    shutil.copytree(cluster.root, folder / "ray", dirs_exist_ok=True,
                                    ignore=shutil.ignore_patterns("sockets", "auth_token"),
                                    ignore_dangling_symlinks=True)
                shutil.rmtree(cluster.root, ignore_errors=True)
                reaper.close()


@pytest.fixture(scope="module")
def finished(study_run) -> StudyRun:
    """The run, after it exited 0 (every check below needs that)."""
    assert study_run.returncode == 0, study_run.diagnosis()
    return study_run


@pytest.fixture(scope="module")
def s3(s3_server):
    import boto3

    return boto3.client("s3", endpoint_url=s3_server.endpoint)


def _keys(s3, bucket: str, prefix: str) -> list[str]:
    keys = []
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        keys += [o["Key"] for o in page.get("Contents", [])]
    return keys


@pytest.fixture(scope="module")
def results(finished, s3, s3_server):
    import pyarrow.parquet as pq

    body = s3.get_object(Bucket=s3_server.bucket, Key=f"studies/{STUDY}/results.parquet")["Body"].read()
    return pq.read_table(io.BytesIO(body))


@pytest.fixture(scope="module")
def mlflow_runs(finished):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(finished.tracking_uri)
    exp = client.get_experiment_by_name(STUDY)
    assert exp is not None, [e.name for e in client.search_experiments()]
    runs = client.search_runs([exp.experiment_id], max_results=100)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1, [r.info.run_name for r in parents]
    parent = parents[0]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    return client, exp, parent, children


# --------------------------------------------------------------------------- checks

def test_cluster_has_token_auth_a_driver_head_and_two_worker_nodes(study_run):
    nodes = study_run.nodes
    head = [n for n in nodes if n["is_head_node"]]
    workers = [n for n in nodes if not n["is_head_node"]]
    assert len(head) == 1 and len(workers) == 2
    assert head[0]["resources_total"].get("head_driver") == 100
    assert "CPU" not in head[0]["resources_total"]  # --num-cpus=0: no training work fits on the head
    assert all(w["resources_total"].get("CPU") == 1 for w in workers)
    # token auth is on: the dashboard refuses a request without the cluster's token
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(f"{study_run.cluster.dashboard}/api/v0/nodes", timeout=30)
    assert refused.value.code in (401, 403)


def test_study_runs_to_the_end_on_the_cluster(study_run):
    print(f"{study_run.setup}; the study ran in {study_run.seconds:.0f} s")
    assert study_run.returncode == 0, study_run.diagnosis()
    assert f"results: {study_run.storage_uri}/{STUDY}/results.parquet" in " ".join(study_run.output.split())


def test_results_table_has_one_finished_row_per_trial(finished, results):
    rows = results.to_pylist()
    assert sorted(r["cell"] for r in rows) == sorted(CELLS)
    assert len({r["trial_id"] for r in rows}) == len(rows) == len(CELLS)
    for r in rows:
        assert r["status"] == "finished", (r["cell"], r["status"], r["reason"], finished.diagnosis())
        assert r["steps_done"] == STEPS
        assert r["eval_loss"] is not None and r["probe_top1"] is not None and r["flops"] > 0


def test_checkpoints_results_and_curves_are_in_the_bucket(finished, results, s3, s3_server):
    keys = _keys(s3, s3_server.bucket, f"studies/{STUDY}/")
    assert f"studies/{STUDY}/study.json" in keys
    assert f"studies/{STUDY}/results.parquet" in keys
    assert any(k.startswith(f"studies/{STUDY}/tune/") for k in keys)  # Tune's experiment state
    for trial_id in results.column("trial_id").to_pylist():
        ckpts = [k for k in keys if k.startswith(f"studies/{STUDY}/trials/{trial_id}/")
                 and "/checkpoint_" in k and k.endswith("/state.pt")]
        assert ckpts, f"no checkpoint of trial {trial_id} in {sorted(keys)}"
    curves = {k.rsplit("/", 1)[1] for k in keys if k.startswith(f"studies/{STUDY}/curves/")}
    assert {f"{CURVE}.json", f"{CURVE}.png", "points.parquet"} <= curves


def test_mlflow_has_parent_and_nested_trial_runs_with_metrics(finished, results, mlflow_runs):
    client, exp, parent, children = mlflow_runs
    assert parent.info.status == "FINISHED"
    assert parent.data.metrics.get("trials_finished") == len(CELLS)
    assert any(k.startswith(f"curve.{CURVE}.") for k in parent.data.metrics), sorted(parent.data.metrics)
    assert parent.data.params.get(f"curve.{CURVE}.law") == "power"

    assert sorted(r.data.tags["trial_id"] for r in children) == sorted(results.column("trial_id").to_pylist())
    assert sorted(r.data.tags["cell"] for r in children) == sorted(CELLS)
    for run in children:
        assert run.info.status == "FINISHED" and run.data.tags.get("status") == "finished"
        # step metrics, sent by the Train worker through the relay on the head
        history = client.get_metric_history(run.info.run_id, "loss")
        assert {m.step for m in history} == set(range(LOG_EVERY, STEPS + 1, LOG_EVERY))
        assert len(client.get_metric_history(run.info.run_id, "lr")) >= 3
        # final metrics, written when Tune saw the trial end
        for key in ("final_loss", "final_eval_loss", "final_probe_top1", "final_flops"):
            assert key in run.data.metrics, (key, sorted(run.data.metrics))
        assert run.data.params["steps"] == str(STEPS) and "tuned.base_lr" in run.data.params


def test_mlflow_artifacts_are_in_the_bucket(finished, mlflow_runs, s3, s3_server):
    client, exp, parent, _ = mlflow_runs
    # clients upload through the server (--serve-artifacts), which writes to the bucket
    assert exp.artifact_location.startswith("mlflow-artifacts:"), exp.artifact_location
    listed = [a.path for a in client.list_artifacts(parent.info.run_id, "curves")]
    assert f"curves/{CURVE}.png" in listed
    keys = _keys(s3, s3_server.bucket, "mlartifacts/")
    wanted = f"{exp.experiment_id}/{parent.info.run_id}/artifacts/curves/{CURVE}.png"
    assert any(k.endswith(wanted) for k in keys), sorted(keys)


def test_train_workers_ran_on_worker_nodes_and_drivers_on_the_head(finished, results):
    cluster = finished.cluster
    actors = cluster.state("actors", detail="true")
    by_class: dict[str, list[dict]] = {}
    for a in actors:
        by_class.setdefault(a["class_name"], []).append(a)
    workers = by_class.get("RayTrainWorker", [])
    # at least one Train worker per trial (a retried trial would have more)
    assert len(workers) >= len(results), sorted(by_class)
    assert {a["node_id"] for a in workers} <= finished.worker_ids
    assert finished.head_id not in {a["node_id"] for a in workers}
    # the trial drivers (Tune's function trainables, on the head_driver resource), the
    # Train controllers they start and their metric relays all stay on the head
    for cls in ("ImplicitFunc", "TrainController", "MetricsRelay"):
        found = by_class.get(cls, [])
        assert len(found) >= len(results), (cls, sorted(by_class))
        assert {a["node_id"] for a in found} == {finished.head_id}, cls


def test_no_credentials_in_mlflow_results_or_output(finished, results, mlflow_runs):
    client, exp, parent, children = mlflow_runs
    for run in [parent, *children]:
        recorded = {**run.data.params, **run.data.tags}
        for name, value in recorded.items():
            for secret in finished.secrets:
                assert secret not in str(value) and secret not in name, (run.info.run_name, name)
    for column in results.column_names:
        for secret in finished.secrets:
            assert secret not in column
        for value in results.column(column).to_pylist():
            assert not any(secret in str(value) for secret in finished.secrets), column
    logs = {"the run's output": finished.output, "MLflow server log": finished.mlflow_log.read_text(errors="replace")}
    if finished.ray_log is not None:
        logs["the orchestrator's Ray log"] = finished.ray_log.read_text(errors="replace")
    for name, text in logs.items():
        assert not any(secret in text for secret in finished.secrets), name
