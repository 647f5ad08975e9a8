"""Shared pytest fixtures. Each fixture is one clearly named function; add yours below."""
from __future__ import annotations

from dataclasses import dataclass

import pytest


# --------------------------------------------------------------------------- S3 (moto)

@dataclass(frozen=True)
class S3Server:
    """A moto S3 server on loopback with one empty bucket.

    `env` holds the AWS variables that point clients at it; they are set in this
    process while the fixture lives, and can be passed on to subprocesses:
    subprocess.run(..., env={**os.environ, **s3_server.env}).
    """

    endpoint: str
    bucket: str
    env: dict[str, str]

    def uri(self, *parts: str) -> str:
        """s3:// URI of a path inside the bucket."""
        return "/".join([f"s3://{self.bucket}", *parts])


@pytest.fixture(scope="session")
def s3_server():
    """Session-wide moto S3 server (see S3Server); stopped and the variables restored at the end."""
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    env = {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_REGION": "us-east-1",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    with pytest.MonkeyPatch.context() as patch:
        for name, value in env.items():
            patch.setenv(name, value)
        # These would override the variables above or bring in other credentials.
        for name in ("AWS_ENDPOINT_URL_S3", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
            patch.delenv(name, raising=False)
        bucket = "test-bucket"
        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=bucket)
        try:
            yield S3Server(endpoint, bucket, env)
        finally:
            server.stop()


# --------------------------------------------------------------------------- Ray

@pytest.fixture(scope="session")
def ray_local():
    """Ray started in this process with this machine's 2 CPUs, shared by the session."""
    import ray

    from trainers.ray_session import init_ray

    init_ray(num_cpus=2, log_to_driver=False)
    try:
        yield ray
    finally:
        ray.shutdown()


# --------------------------------------------------------------------------- MLflow

@dataclass(frozen=True)
class MlflowServer:
    uri: str
    artifacts: str


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_mlflow_server(root) -> tuple:
    """A real `mlflow server` on loopback (sqlite backend, local artifacts under
    `root`), in its own process group; returns (process, uri) once it answers."""
    import os
    import subprocess
    import sys
    import time
    import urllib.request

    port = _free_port()
    # no background job runner: seven more processes on a 2-core machine, unused here
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{root}/mlflow.db", "--artifacts-destination", str(root / "artifacts"),
         "--serve-artifacts", "--workers", "1"],
        env=env, stdout=subprocess.DEVNULL, stderr=open(root / "server.log", "wb"), start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    deadline = time.time() + 300  # it took over 2 minutes on this machine under load
    while time.time() < deadline:
        try:
            urllib.request.urlopen(f"{uri}/health", timeout=2)
            return proc, uri
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError((root / "server.log").read_text()[-2000:])
            time.sleep(0.5)
    raise RuntimeError("mlflow server did not answer /health in 300 s")


def stop_process_group(proc) -> None:
    import os
    import signal

    os.killpg(proc.pid, signal.SIGCONT)  # in case a test left it stopped
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(timeout=30)


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real `mlflow server` on loopback with a sqlite backend and local artifacts."""
    root = tmp_path_factory.mktemp("mlflow")
    proc, uri = start_mlflow_server(root)
    try:
        yield MlflowServer(uri, str(root / "artifacts"))
    finally:
        stop_process_group(proc)


# --------------------------------------------------------------------------- a finished study

@dataclass(frozen=True)
class FinishedStudy:
    """What `run` left of tests/studies/tiny_grid.py: its storage folder, its
    terminal output, study.json, results.parquet and its curve's JSON."""

    storage: object  # pathlib.Path of the storage root
    tracking_uri: str
    out: str
    state: dict
    rows: object  # pandas DataFrame
    curve: dict


@pytest.fixture(scope="session")
def tiny_study(tmp_path_factory):
    """tests/studies/tiny_grid.py run to its end by the CLI (minutes here), with a sqlite MLflow store."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    import pyarrow.parquet as pq

    repo = Path(__file__).resolve().parents[1]
    root = tmp_path_factory.mktemp("tiny_study")
    storage, tracking = root / "storage", f"sqlite:///{root}/mlflow.db"
    done = subprocess.run([sys.executable, "-m", "orchestrator", "run", "tests/studies/tiny_grid.py",
                           "--storage", str(storage), "--tracking-uri", tracking], cwd=repo, capture_output=True,
                          text=True, timeout=900, env={**os.environ, "COLUMNS": "250"})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    folder = storage / "tiny_grid"
    return FinishedStudy(storage, tracking, done.stdout + done.stderr,
                         json.loads((folder / "study.json").read_text()),
                         pq.read_table(folder / "results.parquet").to_pandas(),
                         json.loads((folder / "curves" / "eval_loss_vs_seq_len.json").read_text()))
