"""Bad input, one test each: a refusal is one line on stderr starting with
`error: ` that names the problem and where it is, exit code 2, no traceback, and
nothing written (no study folder, no study.json, no MLflow experiment).

Refusals made before Ray starts are checked in this process, without Ray; the two
that need a Ray cluster (local storage on several nodes, a GPU profile on a
cluster without GPUs) run the CLI in a subprocess against a two-node cluster.
"""
import os
import socket
import subprocess
import sys
import textwrap
import urllib.request
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from orchestrator.cli import main

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "tests" / "studies" / "tiny_grid.py"


# --------------------------------------------------------------------------- helpers

@pytest.fixture(autouse=True)
def _mlflow_warnings_only():
    """What `python -m orchestrator` sets (MLFLOW_LOGGING_LEVEL, read when MLflow is
    first imported): MLflow's INFO lines, e.g. on creating a sqlite store, stay off stderr."""
    import logging

    logger = logging.getLogger("mlflow")
    level = logger.level
    logger.setLevel(logging.WARNING)
    yield
    logger.setLevel(level)


def _refused(capfd, argv, *needles) -> str:
    """Run the CLI here; assert a one-line refusal holding every needle; return the line."""
    code = main([str(a) for a in argv])
    err = capfd.readouterr().err
    lines = err.splitlines()
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for needle in needles:
        assert str(needle) in lines[0], lines[0]
    return lines[0]


def _no_experiment(tracking_uri: str, name: str) -> None:
    from mlflow.tracking import MlflowClient

    assert MlflowClient(tracking_uri).get_experiment_by_name(name) is None


def _nothing_written(storage: Path, name: str, tracking_uri: str | None = None) -> None:
    """No study folder (so no study.json), and no experiment where MLflow lives."""
    assert not (storage / name).exists()
    default_db = storage / "mlflow.db"
    for uri in [tracking_uri] if tracking_uri else [f"sqlite:///{default_db}"] if default_db.exists() else []:
        _no_experiment(uri, name)


def _free_port() -> int:
    """A loopback port nothing listens on (bound, released, not listened on)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


STUDY = '''
from orchestrator.study import Budget, Choice, IntRange, LogUniform, Objective, Profile, Study, Uniform
{prelude}
study = Study(
    name={name!r}, question="q",
    profiles={{"local": Profile(axes={axes}, fixed={fixed}, budget={budget}){cluster}}},
    tune={tune}, {extra}
    objective=Objective(metric="eval_loss", mode="min"),
)
'''
TINY_FIXED = '{"preset": "tiny", "depth": 1, "img_size": 16, "batch_size": 16}'
GPU_PROFILE = ', "cluster": Profile(axes={"patch_size": [4]}, fixed={**%s, "use_gpu": True}, budget=Budget(steps=4))'


def _study(tmp_path, *, name="bad", axes='{"patch_size": [4, 8]}', fixed=TINY_FIXED, budget="Budget(steps=4)",
           tune="{}", extra="", prelude="", cluster="", text=None, template=STUDY,
           filename="study_file.py") -> Path:
    path = tmp_path / filename
    path.write_text(text if text is not None else template.format(
        name=name, axes=axes, fixed=fixed, budget=budget, tune=tune, extra=extra, prelude=prelude,
        cluster=cluster))
    return path


# --------------------------------------------------------------------------- study files (`plan`, no Ray)

STUDY_FILES = {
    # broken files
    "syntax_error": (dict(text="study = (\n"), ["study_file.py:1", "SyntaxError"]),
    "raises_on_import": (dict(prelude="1 / 0"), ["study_file.py:3", "ZeroDivisionError"]),
    "exits_on_import": (dict(prelude="import sys; sys.exit(3)"), ["study_file.py:3", "SystemExit"]),
    "no_study": (dict(text="x = 1\n"), ["study: the file defines no"]),
    "study_not_a_study": (dict(text="study = 3\n"), ["study: expected a Study, got int"]),
    "missing_field": (dict(template=STUDY.replace('objective=Objective(metric="eval_loss", mode="min"),', "")),
                      ["objective", "Field required"]),
    "not_a_python_file": (dict(filename="study_file.txt"), ["study_file.txt", ".py"]),
    # ill-typed values
    "trials_per_cell_text": (dict(extra='trials_per_cell="two",'), ["trials_per_cell", "integer"]),
    "axis_not_a_list": (dict(axes='{"patch_size": 4}'), ["axes.patch_size", "list"]),
    "budget_steps_fraction": (dict(budget="Budget(steps=2.5)"), ["study_file.py:6", "Budget.steps", "2.5"]),
    "derive_not_callable": (dict(extra="derive=3,"), ["derive"]),
    # impossible values
    "empty_choice": (dict(tune='{"mask_ratio": Choice(values=())}'), ["study_file.py:7", "Choice", "at least one value"]),
    "int_range_low_above_high": (dict(tune='{"warmup_steps": IntRange(low=5, high=2)}'),
                                 ["study_file.py:7", "IntRange", "low <= high"]),
    "uniform_low_above_high": (dict(tune='{"mask_ratio": Uniform(low=0.9, high=0.5)}'),
                               ["study_file.py:7", "Uniform", "low < high"]),
    "log_uniform_zero_low": (dict(tune='{"base_lr": LogUniform(low=0, high=1e-2)}'),
                             ["study_file.py:7", "LogUniform", "0 < low"]),
    "tuned_value_out_of_range": (dict(tune='{"mask_ratio": Uniform(low=0.5, high=1.2)}'), ["cell", "mask_ratio"]),
    "budget_zero_steps": (dict(budget="Budget(steps=0)"), ["study_file.py:6", "Budget", "steps must be positive"]),
    "budget_negative_flops": (dict(budget="Budget(flops=-1.0)"), ["Budget", "flops must be positive"]),
    "budget_two_kinds": (dict(budget="Budget(steps=4, epochs=1)"), ["Budget", "exactly one of"]),
    "axis_zero_steps": (dict(axes='{"steps": [0, 4]}'), ["cell steps=0", "steps"]),
    "trials_per_cell_zero": (dict(extra="trials_per_cell=0,"), ["trials_per_cell", "at least 1"]),
    "evaluations_zero": (dict(extra="evaluations=0,"), ["evaluations", "at least 1"]),
    "axis_without_values": (dict(axes='{"patch_size": []}'), ["axes", "patch_size", "no values"]),
    "patch_not_dividing_image": (dict(axes='{"patch_size": [5]}'), ["cell patch_size=5", "patch_size"]),
    "derive_raises": (dict(prelude="def d(cell):\n    return {'mask_unit': cell['img_sise']}",
                           extra="derive=d,"), ["cell patch_size=4", "derive raised KeyError", "img_sise"]),
    "derive_returns_no_dict": (dict(prelude="def d(cell):\n    return 2", extra="derive=d,"),
                               ["cell patch_size=4", "derive", "dict", "int"]),
    # unknown names
    "unknown_model": (dict(fixed='{"model": "vit"}'), ["cell", "model"]),
    "unknown_preset": (dict(fixed='{"preset": "vit_giant"}'), ["cell", "preset", "vit_giant"]),
    "unknown_dataset": (dict(fixed='{"dataset": "imagenet"}'), ["cell", "dataset", "imagenet"]),
    "unknown_axis": (dict(axes='{"patch_sise": [4]}'), ["profiles.local.axes.patch_sise", "not a training setting"]),
    "unknown_tuned": (dict(tune='{"learning_rate": LogUniform(low=1e-4, high=1e-2)}'),
                      ["tune.learning_rate", "not a training setting"]),
    "unknown_profile": (dict(cluster=', "gpu": Profile(axes={"patch_size": [4]}, budget=Budget(steps=4))'),
                        ["profiles.gpu"]),
    "unknown_objective_metric": (dict(template=STUDY.replace('metric="eval_loss"', 'metric="accuracy"')),
                                 ["Objective.metric", "accuracy"]),
    "study_name_with_slash": (dict(name="a/b"), ["name", "plain folder name"]),
}


@pytest.mark.parametrize("kwargs,needles", list(STUDY_FILES.values()), ids=list(STUDY_FILES))
def test_bad_study_file(tmp_path, capfd, kwargs, needles):
    path = _study(tmp_path, **kwargs)
    line = _refused(capfd, ["plan", path], *needles)
    assert line.startswith(f"error: {path}")


def test_missing_study_file(tmp_path, capfd):
    _refused(capfd, ["plan", tmp_path / "nope.py"], "nope.py", "no such study file")


def test_derive_raising_is_refused_by_run_before_anything_is_written(tmp_path, capfd):
    path = _study(tmp_path, prelude="def d(cell):\n    raise RuntimeError('no unit for this patch')",
                  extra="derive=d,")
    _refused(capfd, ["run", path, "--storage", tmp_path / "s"], path, "cell patch_size=4",
             "derive raised RuntimeError: no unit for this patch")
    assert not (tmp_path / "s").exists()


# --------------------------------------------------------------------------- command line (no Ray)

@pytest.mark.parametrize("argv,needles", [
    (["runn", TINY], ["invalid choice", "runn"]),
    (["run"], ["study"]),
    (["run", TINY, "--bogus", "x"], ["--bogus"]),
    (["run", TINY, "--profile", "gpu"], ["--profile", "gpu"]),
    (["plan", TINY, "--gpu-tflops", "fast"], ["--gpu-tflops", "fast"]),
    (["run", TINY, "--max-concurrent", "-1"], ["--max-concurrent", "-1"]),
    (["run", TINY, "--max-concurrent", "0"], ["--max-concurrent", "0"]),
    (["run", TINY, "--max-concurrent", "two"], ["--max-concurrent", "two"]),
    (["resume", "tiny_grid", "--max-concurrent", "-1"], ["--max-concurrent", "-1"]),
], ids=["unknown_command", "missing_study_argument", "unknown_option", "unknown_profile_choice",
        "ill_typed_plan_option", "max_concurrent_negative", "max_concurrent_zero", "max_concurrent_text",
        "resume_max_concurrent_negative"])
def test_bad_command_line(tmp_path, capfd, monkeypatch, argv, needles):
    monkeypatch.chdir(tmp_path)  # a run that wrongly went ahead would write ./runs here
    _refused(capfd, argv, *needles)
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("name", ["../x", "a/b", ".hidden", "with space", "/abs"])
def test_bad_name(tmp_path, capfd, name):
    storage = tmp_path / "s"
    _refused(capfd, ["run", TINY, "--storage", storage, "--name", name], "--name", name)
    assert not (tmp_path / "x").exists() and not storage.exists()


@pytest.mark.parametrize("uri,needles", [
    ("hdfs://namenode:8020/studies", ["--storage hdfs://namenode:8020/studies", "'hdfs'", "s3://"]),
    ("gs://bucket/studies", ["--storage gs://bucket/studies", "'gs'", "s3://"]),
    ("s3:///no-bucket", ["s3:///no-bucket", "bucket"]),
], ids=["hdfs", "gcs", "s3_without_bucket"])
def test_unsupported_storage(tmp_path, capfd, monkeypatch, uri, needles):
    monkeypatch.chdir(tmp_path)
    _refused(capfd, ["run", TINY, "--storage", uri], *needles)
    assert list(tmp_path.iterdir()) == []  # not even a default sqlite file


def test_undeclared_profile(tmp_path, capfd):
    _refused(capfd, ["run", TINY, "--profile", "cluster", "--storage", tmp_path / "s"],
             "tiny_grid.py", "profiles.cluster", "no 'cluster' profile")
    assert not (tmp_path / "s").exists()


def test_unreachable_address(tmp_path, capfd):
    address = f"127.0.0.1:{_free_port()}"
    _refused(capfd, ["run", TINY, "--storage", tmp_path / "s", "--address", address], f"--address {address}")
    assert not (tmp_path / "s").exists()


def test_malformed_address(tmp_path, capfd):
    _refused(capfd, ["run", TINY, "--storage", tmp_path / "s", "--address", "headnode"], "--address headnode",
             "host:port")
    assert not (tmp_path / "s").exists()


def test_address_auto_without_a_cluster(tmp_path):
    """No Ray cluster to join: Ray's discovery is pointed at an empty place, so a
    cluster someone else runs on this machine is never joined. In its own process:
    a Ray this test process started for other tests would be joined instead."""
    tracking = f"sqlite:///{tmp_path}/mlflow.db"
    argv = ["run", str(TINY), "--storage", str(tmp_path / "s"), "--tracking-uri", tracking, "--address", "auto"]
    code = textwrap.dedent(f"""
        import sys
        import ray._private.services as services
        def no_gcs_processes():
            return []
        no_gcs_processes.cache_clear = lambda: None  # ray.init clears the real one's cache
        services.find_gcs_addresses = no_gcs_processes
        services.find_bootstrap_address = lambda temp_dir: None
        from orchestrator.cli import main
        sys.exit(main({argv!r}))
    """)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    lines = done.stderr.splitlines()
    assert done.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), done.stderr
    assert "--address auto" in lines[0] and "no Ray cluster" in lines[0]
    _nothing_written(tmp_path / "s", "tiny_grid", tracking)


def test_unreachable_tracking_server(tmp_path, capfd):
    uri = f"http://127.0.0.1:{_free_port()}"
    _refused(capfd, ["run", TINY, "--storage", tmp_path / "s", "--tracking-uri", uri], f"tracking {uri}",
             "unreachable")
    _nothing_written(tmp_path / "s", "tiny_grid")


def test_unknown_tracking_scheme(tmp_path, capfd):
    _refused(capfd, ["run", TINY, "--storage", tmp_path / "s", "--tracking-uri", "mlfloww://x"],
             "tracking mlfloww://x")
    _nothing_written(tmp_path / "s", "tiny_grid")


def test_name_already_taken(tmp_path, capfd):
    state = tmp_path / "s" / "tiny_grid" / "study.json"
    state.parent.mkdir(parents=True)
    state.write_text('{"name": "tiny_grid"}')
    _refused(capfd, ["run", TINY, "--storage", tmp_path / "s"], "study 'tiny_grid' already exists", "--name")
    assert state.read_text() == '{"name": "tiny_grid"}'


@pytest.mark.parametrize("command", [["resume", "nothere"], ["status", "nothere"], ["fit", "nothere"]],
                         ids=["resume", "status", "fit"])
def test_unknown_study_name(tmp_path, capfd, command):
    _refused(capfd, [*command, "--storage", tmp_path / "s"], "no study 'nothere'")


# --------------------------------------------------------------------------- S3 credentials

@pytest.fixture
def s3_checks_credentials(s3_server):
    """moto checks signatures against its IAM users while this lives (its
    /moto-api/reset-auth switch); the test's keys belong to no user."""
    def reset(count: str) -> None:
        request = urllib.request.Request(f"{s3_server.endpoint}/moto-api/reset-auth", data=count.encode(),
                                         headers={"Content-Type": "text/plain"}, method="POST")
        urllib.request.urlopen(request, timeout=10).read()
    reset("0")
    try:
        yield s3_server
    finally:
        reset("inf")


def test_wrong_s3_credentials(tmp_path, capfd, monkeypatch, s3_checks_credentials):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAWRONGWRONGWRONG0")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
    uri = s3_checks_credentials.uri("studies")
    tracking = f"sqlite:///{tmp_path}/mlflow.db"
    _refused(capfd, ["run", TINY, "--storage", uri, "--tracking-uri", tracking], f"storage {uri}",
             "not writable")
    assert not (tmp_path / "mlflow.db").exists()  # refused before the tracking store was opened


# --------------------------------------------------------------------------- data (no Ray)

def _data_study(tmp_path, dataset: str, data_path: Path) -> Path:
    fixed = f'{{**{TINY_FIXED}, "dataset": "{dataset}", "data_path": "{data_path}"}}'
    return _study(tmp_path, axes='{"patch_size": [4]}', fixed=fixed)


def _shards(folder: Path, n: int) -> None:
    folder.mkdir(parents=True)
    for i in range(n):
        pq.write_table(pa.table({"image": [b"\x89PNG"] * 4, "label": [0, 1, 2, 3]}),
                       folder / f"train-{i:05d}.parquet")


@pytest.mark.parametrize("dataset,make,needles", [
    ("fashion_mnist", None, ["Fashion-MNIST file not found"]),
    ("parquet", None, ["Parquet folder not found"]),
    ("parquet", lambda d: d.mkdir(), ["no .parquet files"]),
    ("image_folder", None, ["image folder not found"]),
], ids=["fashion_mnist_missing", "parquet_folder_missing", "parquet_folder_empty", "image_folder_missing"])
def test_missing_data(tmp_path, capfd, dataset, make, needles):
    data = tmp_path / "data"
    if make:
        make(data)
    path = _data_study(tmp_path, dataset, data)
    _refused(capfd, ["run", path, "--profile", "local", "--storage", tmp_path / "s"], path,
             "profiles.local, cell patch_size=4", f"data_path {data}", *needles)
    assert not (tmp_path / "s").exists()


def test_truncated_parquet_shard(tmp_path, capfd):
    data = tmp_path / "data"
    _shards(data, 3)
    shard = data / "train-00001.parquet"
    shard.write_bytes(shard.read_bytes()[:-20])  # cut inside the footer
    path = _data_study(tmp_path, "parquet", data)
    _refused(capfd, ["run", path, "--profile", "local", "--storage", tmp_path / "s"], path,
             "cell patch_size=4", str(shard), "footer")
    assert not (tmp_path / "s").exists()


def test_readable_parquet_shards_pass(tmp_path):
    from orchestrator import preflight
    from orchestrator.planning import make_plan
    from orchestrator.study import load_study

    _shards(tmp_path / "data", 2)
    path = _data_study(tmp_path, "parquet", tmp_path / "data")
    preflight.check_data(make_plan(load_study(path), "local", path), path)


# --------------------------------------------------------------------------- a real process

def test_refused_run_prints_one_line_and_no_traceback(tmp_path):
    done = subprocess.run([sys.executable, "-m", "orchestrator", "run", str(TINY), "--storage",
                           "hdfs://namenode:8020/studies"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("error: --storage hdfs://"), done.stderr
    assert "Traceback" not in done.stderr + done.stdout
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- where the cluster matters

@pytest.mark.parametrize("nodes,resources,refused", [
    (1, {"CPU": 2}, False),
    (2, {"CPU": 2}, True),
    (1, {"CPU": 0, "head_driver": 100}, True),
])
def test_local_storage_needs_a_single_node(tmp_path, nodes, resources, refused):
    from orchestrator import preflight
    from orchestrator.storage import Storage

    local, remote = Storage(str(tmp_path)), Storage("s3://bucket/studies")
    preflight.check_storage_shared(remote, nodes, resources)  # object storage: every node sees it
    if not refused:
        preflight.check_storage_shared(local, nodes, resources)
        return
    with pytest.raises(preflight.PreflightError, match=f"--storage {tmp_path}: .*s3://"):
        preflight.check_storage_shared(local, nodes, resources)


@pytest.fixture(scope="module")
def two_nodes(s3_server):
    """A head and a worker node of 1 CPU each, no GPU, no autoscaler. Its processes
    inherit the S3 variables: anything that reached storage would reach moto."""
    import ray
    from ray.cluster_utils import Cluster

    # An in-process refusal that came after Ray started leaves it connected here;
    # a second Ray in this process cannot start its head node.
    ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    try:
        yield cluster
    finally:
        cluster.shutdown()


def _loopback(cluster) -> str:
    """The cluster's address on loopback (Cluster names the machine's own interface)."""
    return f"127.0.0.1:{cluster.address.rsplit(':', 1)[1]}"


def _run_cli(args: list, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "orchestrator", "run", *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=180, env={**os.environ, **env})


def _assert_one_line(done: subprocess.CompletedProcess, *needles) -> None:
    assert done.returncode == 2, done.stdout[-2000:] + done.stderr[-2000:]
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("error: "), done.stderr
    assert "Traceback" not in done.stderr + done.stdout
    for needle in needles:
        assert needle in done.stderr, done.stderr


def test_local_storage_on_two_nodes_is_refused(tmp_path, two_nodes):
    storage = tmp_path / "s"
    done = _run_cli([TINY, "--address", _loopback(two_nodes), "--storage", storage], {})
    _assert_one_line(done, f"--storage {storage}", "2 nodes", "s3://")
    _nothing_written(storage, "tiny_grid")


def test_gpu_profile_without_gpus_is_refused(tmp_path, two_nodes, s3_server):
    path = _study(tmp_path, name="gpu_study", cluster=GPU_PROFILE % TINY_FIXED)
    tracking = f"sqlite:///{tmp_path}/mlflow.db"
    done = _run_cli([path, "--profile", "cluster", "--address", _loopback(two_nodes),
                     "--storage", s3_server.uri("gpu"), "--tracking-uri", tracking],
                    {**s3_server.env, "MIM_GPU_WAIT_S": "3"})
    _assert_one_line(done, "--profile cluster", "GPU", "3 s")
    _no_experiment(tracking, "gpu_study")
    import boto3

    listed = boto3.client("s3", endpoint_url=s3_server.endpoint).list_objects_v2(Bucket=s3_server.bucket,
                                                                                  Prefix="gpu/gpu_study/")
    assert listed.get("KeyCount", 0) == 0
