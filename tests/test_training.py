"""Pretraining runs on real Ray Train: the CLI, resume after a killed driver, divergence."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from trainers.config import TrainConfig
from trainers.launch import run_pretraining

REPO = Path(__file__).resolve().parents[1]
SMALL = dict(preset="tiny", depth=2, img_size=16, patch_size=4, batch_size=16, probe_train_size=200,
             probe_eval_size=100, log_every_steps=2)


def _cli(out, *extra):
    return [sys.executable, "-m", "trainers.pretrain", "--out", str(out), "--preset", "tiny", "--depth", "2",
            "--img-size", "16", "--patch-size", "4", "--batch-size", "16", "--probe-train-size", "200",
            "--probe-eval-size", "100", "--log-every-steps", "2", *extra]


def test_resume_after_killed_driver_ends_at_same_step_with_same_loss(ray_local, tmp_path):
    steps = 400
    # reference: the same run without interruption, in this process's Ray
    ref = run_pretraining(TrainConfig(**SMALL, steps=steps, checkpoint_every_steps=40), str(tmp_path / "ref"), "ref")
    assert ref.metrics["step"] == steps and ref.metrics["resumed_from_step"] == 0

    out = tmp_path / "run"
    cmd = _cli(out, "--steps", str(steps), "--checkpoint-every-steps", "40")
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    snapshot = out / "ray" / "pretrain" / "checkpoint_manager_snapshot.json"
    deadline = time.time() + 240
    while time.time() < deadline and "checkpoint_" not in (snapshot.read_text() if snapshot.exists() else ""):
        time.sleep(0.1)
    assert snapshot.exists(), "no checkpoint was registered"
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and the Ray it started
    proc.wait()

    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == steps
    assert 0 < metrics["resumed_from_step"] < steps
    # masks, data order and augmentation depend only on the step: the resumed run is the same run
    assert metrics["loss"] == pytest.approx(ref.metrics["loss"], rel=1e-4)
    for key in ("first_loss", "flops", "images_per_s", "probe_top1", "knn_top1", "eval_loss"):
        assert key in metrics


@pytest.mark.parametrize("workers", [1, 2])
def test_killed_train_worker_resumes_from_its_checkpoint_with_the_same_loss(ray_local, tmp_path, workers):
    """A Train worker SIGKILLed mid-run (one worker, and one of two DDP workers
    over gloo): Train restarts the worker group from the latest committed
    checkpoint, and the run ends at the same step with an undisturbed run's loss."""
    import threading

    from ray.util.state import list_actors

    cfg = TrainConfig(**SMALL, steps=160, checkpoint_every_steps=20, workers=workers)
    ref = run_pretraining(cfg, str(tmp_path / "ref"), "ref")

    outcome = {}
    run = threading.Thread(target=lambda: outcome.update(result=run_pretraining(cfg, str(tmp_path), "killed")))
    run.start()
    snapshot = tmp_path / "killed" / "checkpoint_manager_snapshot.json"
    deadline = time.time() + 240
    while time.time() < deadline and "checkpoint_" not in (snapshot.read_text() if snapshot.exists() else ""):
        time.sleep(0.1)
    live = list_actors(filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])
    assert len(live) == workers, live
    os.kill(live[-1].pid, signal.SIGKILL)
    run.join(timeout=300)
    result = outcome["result"]
    assert result.error is None, result.error
    assert result.metrics["step"] == cfg.steps
    assert 0 < result.metrics["resumed_from_step"] < cfg.steps  # it resumed, it did not start over
    # tolerance: float sums may differ in the last bits after a restart; nothing more
    assert result.metrics["loss"] == pytest.approx(ref.metrics["loss"], rel=1e-4)


def test_nan_loss_stops_with_diverged(ray_local, tmp_path):
    cfg = TrainConfig(**SMALL, steps=40, lr=1e6, norm_pix_loss=False)
    result = run_pretraining(cfg, str(tmp_path), "nan")
    assert result.metrics["status"] == "diverged"
    assert result.metrics["reason"].startswith("diverged: loss")
    assert result.metrics["step"] < 40


def test_cli_refuses_bad_config_with_one_line(tmp_path):
    done = subprocess.run(_cli(tmp_path, "--mask-ratio", "1.5"), cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0 and "mask_ratio" in done.stderr
    assert not (tmp_path / "metrics.json").exists()


def test_local_ray_starts_no_preemption_watcher(ray_local, tmp_path):
    """Train v2 would start a spot-preemption watcher process per run; a local
    machine cannot be preempted, and each process costs seconds per trial."""
    from ray.util.state import list_actors

    run_pretraining(TrainConfig(**SMALL, steps=4), str(tmp_path), "watcher")
    classes = {a.class_name for a in list_actors(limit=1000)}
    assert "RayTrainWorker" in classes  # the state API sees this run's actors
    assert "PreemptionWatcher" not in classes


def test_a_run_given_the_cluster_gives_its_workers_every_core():
    from trainers.resources import cpus_per_worker

    assert cpus_per_worker([2], 1) == 2  # this machine: one worker trains on both cores
    assert cpus_per_worker([2], 2) == 1
    assert cpus_per_worker([8, 8], 3) == 4  # two workers on one node, one on the other
    assert cpus_per_worker([16, 4], 2) == 8
    assert cpus_per_worker([2], 3) == 1  # more workers than cores: Ray queues them, as before


def test_runs_sharing_a_storage_path_read_the_probe_sets_once(ray_local, tmp_path):
    """The trials of a study share their Train runs' storage path: the first run keeps
    the probe subsets there, and a later run (another seed) reads them unchanged."""
    from trainers.loop import PROBE_CACHE_FOLDER

    run_pretraining(TrainConfig(**SMALL, steps=2, seed=0), str(tmp_path), "first")
    cached = sorted((tmp_path / PROBE_CACHE_FOLDER).iterdir())
    assert [p.name.split("-")[0] for p in cached] == ["test", "train"]
    written = [p.stat().st_mtime_ns for p in cached]
    result = run_pretraining(TrainConfig(**SMALL, steps=2, seed=1), str(tmp_path), "second")
    assert result.error is None and "probe_top1" in result.metrics
    assert sorted((tmp_path / PROBE_CACHE_FOLDER).iterdir()) == cached
    assert [p.stat().st_mtime_ns for p in cached] == written  # read, not written again


def test_loader_threads_follow_the_worker_s_cpus():
    from trainers.resources import loader_threads

    assert loader_threads(TrainConfig()) == 1  # a local study's one-CPU trials
    assert loader_threads(TrainConfig(cpus_per_worker=8, use_gpu=True)) == 8
    assert loader_threads(TrainConfig(cpus_per_worker=8, num_loader_workers=0)) == 0
