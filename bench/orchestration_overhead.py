"""What running trials through the orchestrator costs over running them in a plain loop.

    python bench/orchestration_overhead.py [--trials 4] [--trial-seconds 60]

The same trials (bench/studies/overhead.py: tiny MAE, one cell per seed, no tuning,
no early stopping, one evaluation at the end; steps per trial chosen from a short
warm-up so that each trains for about --trial-seconds) run, one after another, as:

  plain     the trainer's steps without Ray: build_model, TrainStep, PretrainStream,
            evaluate and a checkpoint file, trial after trial in one process;
  ray       trainers.launch.run_pretraining (Ray Train) for each TrainConfig, in one
            Ray session;
  study-1   `python -m orchestrator run bench/studies/overhead.py --max-concurrent 1`;
  study     the same with the orchestrator's default concurrency (what the machine's
            CPUs fit: 2 trials at once on 2 CPUs, so it may beat the sequential peers).

Each is a subprocess timed from the outside (interpreter start to exit), with its
own RAY_TMPDIR, so that the Ray Train controller/worker logs of each can be read
afterwards for the breakdown of where the time goes (worker-group start-up phases,
train function, time between trials). TrainConfigs are the study's own (its plan's
trial_config), so every peer trains exactly the same runs.

The last line is `overhead_ratio=<study-1 wall / plain wall>` (--peer ray divides
by the Ray Train loop instead).
"""
from __future__ import annotations

import argparse
import datetime as dt
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from step_timing import seconds_per_step  # noqa: E402  (bench/, the script's folder)

STUDY_FILE = REPO / "bench" / "studies" / "overhead.py"


# --------------------------------------------------------------------------- peers (subprocesses)

def _now() -> float:
    return time.time()


def run_plain(configs: list[dict], out: str) -> dict:
    """The trials' steps without Ray, as train_loop_per_worker does them for one worker."""
    import torch

    from trainers.config import TrainConfig
    from trainers.data import load_eval_arrays, train_loader
    from trainers.evaluation import evaluate
    from trainers.models import build_model
    from trainers.optim import build_optimizer, build_schedule
    from trainers.resources import train_threads, use_threads
    from trainers.step import TrainStep

    timeline = {"imported": _now(), "trials": []}
    for i, raw in enumerate(configs):
        t = {"start": _now()}
        cfg = TrainConfig.model_validate(raw)
        use_threads(train_threads(cfg))
        torch.manual_seed(cfg.seed)
        device = torch.device("cpu")
        model = build_model(cfg)
        opt = build_optimizer(model, cfg)
        step_fn = TrainStep(model, opt, build_schedule(opt, cfg), cfg, device)
        probe_sets = [load_eval_arrays(cfg, split, n, cfg.seed)
                      for split, n in (("train", cfg.probe_train_size), ("test", cfg.probe_eval_size))]
        stream = iter(train_loader(cfg, 0, 1))
        gen = torch.Generator()
        t["setup_done"] = _now()
        step_s = 0.0
        for step in range(cfg.steps):
            micro = [next(stream)[0] for _ in range(cfg.accum_steps)]
            gen.manual_seed((cfg.seed * 1_000_003 + step) % (2 ** 63))  # loop.mask_seed, rank 0
            t0 = time.perf_counter()
            step_fn(step, micro, gen)
            step_s += time.perf_counter() - t0
        t["train_done"], t["step_seconds"] = _now(), step_s
        t["metrics"] = evaluate(model, cfg, *probe_sets)
        t["eval_done"] = _now()
        folder = os.path.join(out, f"trial{i}")
        os.makedirs(folder, exist_ok=True)
        torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(),
                    "rng": torch.get_rng_state(), "config": cfg.resolved()},
                   os.path.join(folder, "state.pt"))
        t["end"] = _now()
        timeline["trials"].append(t)
    return timeline


def run_ray(configs: list[dict], out: str) -> dict:
    """trainers.launch.run_pretraining for each config, in one Ray session."""
    from trainers.config import TrainConfig
    from trainers.launch import run_pretraining
    from trainers.ray_session import init_ray

    timeline = {"imported": _now(), "trials": []}
    init_ray()
    timeline["ray_ready"] = _now()
    for i, raw in enumerate(configs):
        cfg = TrainConfig.model_validate(raw)
        t = {"start": _now()}
        result = run_pretraining(cfg, out, f"trial{i}")
        t["end"] = _now()
        m = result.metrics or {}
        t["step_seconds"] = m["step"] * cfg.batch_size / m["images_per_s"] if m.get("images_per_s") else None
        t["metrics"] = {k: m.get(k) for k in ("probe_top1", "knn_top1", "eval_loss")}
        timeline["trials"].append(t)
    import ray

    ray.shutdown()
    timeline["ray_down"] = _now()
    return timeline


# --------------------------------------------------------------------------- log reading

def _ts(s: str) -> float:
    return dt.datetime.strptime(s, "%Y-%m-%d %H:%M:%S,%f").timestamp()


def _json_lines(path: str):
    with open(path) as f:
        for line in f:
            try:
                yield json.loads(line)
            except json.JSONDecodeError:
                continue


_PHASES = {
    "actors": re.compile(r"(\d+) worker actors created in ([\d.]+)s"),
    "context": re.compile(r"Train context initialized on workers in ([\d.]+)s"),
    "launch": re.compile(r"Train function launched on workers in ([\d.]+)s"),
    "group_total": re.compile(r"Worker group startup completed in ([\d.]+)s total"),
}


def train_runs(ray_tmp: str) -> list[dict]:
    """Every Ray Train run under a RAY_TMPDIR, from the controllers' and workers' logs:
    controller start, worker-group start-up phases, train function start and final
    checkpoint (worker side), worker group shut down; sorted by controller start."""
    workers = {}
    for path in glob.glob(f"{ray_tmp}/ray/session_2*/logs/train/ray-train-sys-worker-*.log"):
        w = {}
        for rec in _json_lines(path):
            t, msg = _ts(rec["asctime"]), rec["message"]
            w["pid"] = rec.get("process")
            if "Launching training function" in msg:
                w["fn_start"] = t
            if msg.startswith("Checkpoint successfully created"):
                w["last_ckpt"] = t
                found = re.search(r"path=(.*?)/checkpoint_", msg)
                w["run"] = os.path.basename(found.group(1)) if found else None
            w["last"] = t
        workers[w.get("pid")] = w
    runs = []
    for path in glob.glob(f"{ray_tmp}/ray/session_2*/logs/train/ray-train-sys-controller-*.log"):
        r = {}
        for rec in _json_lines(path):
            t, msg = _ts(rec["asctime"]), rec["message"]
            r.setdefault("ctrl_start", t)
            for key, rx in _PHASES.items():
                m = rx.search(msg)
                if m:
                    r[key] = float(m.groups()[-1])
            m = re.search(r"Started training worker group.*?pid=(\d+)", msg, re.S)
            if m:
                r["group_started"], r["worker_pid"] = t, int(m.group(1))
            if "Worker group shutdown successful" in msg:
                r["group_down"] = t
            r["ctrl_last"] = t
        w = workers.get(r.get("worker_pid"), {})
        r.update({k: w.get(k) for k in ("fn_start", "last_ckpt", "run")})
        runs.append(r)
    return sorted(runs, key=lambda r: r["ctrl_start"])


def mlflow_trials(storage: str, name: str) -> list[dict]:
    """Per trial of a study execution: MLflow run start (inside the trial, after its
    actor started), first step-metric arrival, end (closed by the results callback)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{storage}/mlflow.db")
    exp = client.get_experiment_by_name(name)
    out = []
    for run in client.search_runs([exp.experiment_id], max_results=1000):
        tags = run.data.tags
        if "trial_id" not in tags:
            if run.info.end_time:
                out.append({"parent": True, "start": run.info.start_time / 1e3, "end": run.info.end_time / 1e3})
            continue
        losses = client.get_metric_history(run.info.run_id, "loss")
        out.append({"trial_id": tags["trial_id"], "start": run.info.start_time / 1e3,
                    "end": (run.info.end_time or 0) / 1e3,
                    "first_metric": min((m.timestamp for m in losses), default=0) / 1e3})
    return sorted(out, key=lambda r: (not r.get("parent"), r["start"]))


def study_step_seconds(storage: str, name: str) -> list[float]:
    import pyarrow.parquet as pq

    rows = pq.read_table(f"{storage}/{name}/results.parquet").to_pylist()
    return [r["steps_done"] * r["batch_size"] / r["images_per_s"] for r in rows if r["images_per_s"]]


# --------------------------------------------------------------------------- the bench

def _subprocess(label: str, cmd: list[str], env: dict, log_path: str) -> float:
    print(f"[{time.strftime('%H:%M:%S')}] {label}: {' '.join(cmd[1:4])} ...", flush=True)
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.run(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        print(Path(log_path).read_text()[-4000:], file=sys.stderr)
        raise SystemExit(f"{label} failed (exit {proc.returncode}); log: {log_path}")
    print(f"[{time.strftime('%H:%M:%S')}] {label}: {wall:.1f} s", flush=True)
    return wall


def _mean(xs) -> float:
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else float("nan")


def _train_phases(r: dict) -> dict:
    """Ray Train phases of one run, from its logs (seconds)."""
    return {
        "controller -> worker group running": r.get("group_started", r["ctrl_start"]) - r["ctrl_start"],
        "  of which worker actor start": r.get("actors"),
        "  of which train context init": r.get("context"),
        "  of which train fn launch (unpickle/imports)": r.get("launch"),
        "train fn (setup, steps, eval, report)": (r.get("last_ckpt") or 0) - (r.get("fn_start") or 0),
    }


def _print_phases(label: str, rows: list[dict]) -> None:
    keys = list(dict.fromkeys(k for row in rows for k in row))
    print(f"  {label}, mean per trial over {len(rows)}:")
    for k in keys:
        vals = [row.get(k) for row in rows]
        each = " ".join("  -  " if v is None else f"{v:5.1f}" for v in vals)
        print(f"    {k:54} {_mean(vals):6.1f} s   [{each}]")


def report_plain(tl: dict, start: float, wall: float) -> dict:
    trials = tl["trials"]
    rows = [{"setup (model, optimizer, probe sets)": t["setup_done"] - t["start"],
             "optimizer steps": t["step_seconds"],
             "data batches + loop": t["train_done"] - t["setup_done"] - t["step_seconds"],
             "evaluation (features, probes, held-out loss)": t["eval_done"] - t["train_done"],
             "checkpoint file": t["end"] - t["eval_done"],
             "= trial": t["end"] - t["start"]} for t in trials]
    print(f"  plain: process start + imports {tl['imported'] - start:.1f} s; "
          f"last trial -> exit {start + wall - trials[-1]['end']:.1f} s")
    _print_phases("plain", rows)
    return {"step_total": sum(t["step_seconds"] for t in trials),
            "trial": _mean(r["= trial"] for r in rows)}


def report_ray(tl: dict, runs: list[dict], start: float, wall: float) -> dict:
    trials = tl["trials"]
    print(f"  ray: process start + imports {tl['imported'] - start:.1f} s, ray.init {tl['ray_ready'] - tl['imported']:.1f} s, "
          f"last fit -> exit (ray.shutdown) {start + wall - trials[-1]['end']:.1f} s")
    rows = []
    for t, r in zip(trials, runs):
        row = {"fit() -> controller running (actor start, imports)": r["ctrl_start"] - t["start"]}
        row.update(_train_phases(r))
        row["  of which optimizer steps"] = t["step_seconds"]
        row["final report -> fit() returns"] = t["end"] - (r.get("last_ckpt") or t["end"])
        row["= fit()"] = t["end"] - t["start"]
        rows.append(row)
    _print_phases("ray", rows)
    return {"step_total": sum(t["step_seconds"] or 0 for t in trials)}


def report_study(label: str, storage: str, name: str, runs: list[dict], start: float, wall: float,
                 sequential: bool) -> dict:
    ml = mlflow_trials(storage, name)
    parent = next((m for m in ml if m.get("parent")), None)
    trials = [m for m in ml if not m.get("parent")]
    by_id = {m["trial_id"]: m for m in trials}
    steps = study_step_seconds(storage, name)
    first = min(m["start"] for m in trials)
    print(f"  {label}: process start -> MLflow parent run (imports, MLflow db, ray.init) "
          f"{(parent['start'] if parent else first) - start:.1f} s -> first trial's MLflow run "
          f"{first - (parent['start'] if parent else start):.1f} s; last trial closed -> exit "
          f"{start + wall - max(m['end'] for m in trials):.1f} s")
    rows, prev_end = [], None
    for r in runs:
        m = by_id.get(r.get("run"), {})
        row = {}
        if sequential:
            row["previous trial closed -> trial's MLflow run"] = m["start"] - prev_end if prev_end and m else None
        row["trial's MLflow run -> controller running"] = r["ctrl_start"] - m["start"] if m else None
        row.update(_train_phases(r))
        row["final report -> trial closed (Tune, results, MLflow)"] = (m.get("end", 0) - (r.get("last_ckpt") or 0)) if m else None
        rows.append(row)
        prev_end = m.get("end")
    _print_phases(label, rows)
    return {"step_total": sum(steps)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trials", type=int, default=4)
    p.add_argument("--trial-seconds", type=float, default=60.0, help="optimizer-step seconds per trial")
    p.add_argument("--steps", type=int, default=None, help="steps per trial (skips the warm-up)")
    p.add_argument("--peer", choices=("plain", "ray"), default="plain", help="denominator of the last line")
    p.add_argument("--skip", action="append", default=[], choices=("ray", "study"),
                   help="leave out a peer (ray: the Ray Train loop; study: the default-concurrency study)")
    p.add_argument("--variant-env", action="append", default=[], metavar="NAME=VALUE",
                   help="also run study-1 with these environment variables (repeatable), as study-1+env, "
                        "e.g. RAY_TRAIN_ENABLE_PREEMPTION_WATCHER=0")
    p.add_argument("--keep", default=None, help="keep the work folder here (default: temporary, deleted)")
    p.add_argument("--_run", choices=("plain", "ray"), help=argparse.SUPPRESS)
    p.add_argument("--_configs", help=argparse.SUPPRESS)
    p.add_argument("--_out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args._run:  # inside a peer subprocess
        configs = json.loads(Path(args._configs).read_text())
        tl = (run_plain if args._run == "plain" else run_ray)(configs, args._out)
        Path(args._out, "timeline.json").write_text(json.dumps(tl))
        return 0

    from trainers.config import TrainConfig

    os.environ["BENCH_OVERHEAD_TRIALS"] = str(args.trials)
    if args.steps is None:
        from orchestrator.study import load_study

        probe_cfg = TrainConfig(**{**load_study(STUDY_FILE).profiles["local"].fixed, "steps": 1000})
        sec, _ = seconds_per_step(probe_cfg, 6.0)
        args.steps = max(10, round(args.trial_seconds / sec))
        print(f"warm-up: {sec * 1000:.0f} ms/step -> {args.steps} steps per trial", flush=True)
    os.environ["BENCH_OVERHEAD_STEPS"] = str(args.steps)
    from orchestrator.planning import make_plan
    from orchestrator.study import load_study

    plan = make_plan(load_study(STUDY_FILE), "local", STUDY_FILE)
    configs = [plan.trial_config(c.id, {}, 0).model_dump(mode="json") for c in plan.cells]

    work = args.keep or tempfile.mkdtemp(prefix="oh-", dir="/tmp")  # short: Ray's socket paths
    os.makedirs(work, exist_ok=True)
    Path(work, "configs.json").write_text(json.dumps(configs))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    from trainers.resources import train_threads

    threads = {train_threads(TrainConfig.model_validate(c)) for c in configs}
    print(f"{args.trials} trials x {args.steps} steps, each trial {'/'.join(map(str, sorted(threads)))} torch "
          f"thread(s) (its CPUs, as the study gives them); work folder {work}; "
          f"date {dt.datetime.now().isoformat(timespec='minutes')}", flush=True)

    walls, starts = {}, {}
    peers = ["plain"] + ([] if "ray" in args.skip else ["ray"])
    for peer in peers:
        out = os.path.join(work, peer)
        os.makedirs(out, exist_ok=True)
        starts[peer] = time.time()
        walls[peer] = _subprocess(peer, [sys.executable, __file__, "--_run", peer, "--_configs",
                                         os.path.join(work, "configs.json"), "--_out", out],
                                  {**env, "RAY_TMPDIR": os.path.join(work, f"t-{peer}")},
                                  os.path.join(work, f"{peer}.log"))
    variant = dict(item.split("=", 1) for item in args.variant_env)
    studies = [("study-1", ["--max-concurrent", "1"], {})]
    studies += [] if "study" in args.skip else [("study", [], {})]
    studies += [("study-1+env", ["--max-concurrent", "1"], variant)] if variant else []
    for label, extra, extra_env in studies:
        name = f"oh-{label.replace('+', '-')}-{int(time.time())}"
        starts[label] = time.time()
        walls[label] = _subprocess(label, [sys.executable, "-m", "orchestrator", "run", str(STUDY_FILE),
                                           "--storage", os.path.join(work, label), "--name", name, *extra],
                                   {**env, **extra_env, "RAY_TMPDIR": os.path.join(work, f"t-{label}")},
                                   os.path.join(work, f"{label}.log"))
        starts[label + ":name"] = name

    # ---- where the time goes
    print("\nbreakdown (wall clock; Ray Train phases from its controller/worker logs):")
    plain_tl = json.loads(Path(work, "plain", "timeline.json").read_text())
    step_totals = {"plain": report_plain(plain_tl, starts["plain"], walls["plain"])["step_total"]}
    if "ray" in walls:
        ray_tl = json.loads(Path(work, "ray", "timeline.json").read_text())
        runs = train_runs(os.path.join(work, "t-ray"))
        step_totals["ray"] = report_ray(ray_tl, runs, starts["ray"], walls["ray"])["step_total"]
    for label, extra, _ in studies:
        runs = train_runs(os.path.join(work, f"t-{label}"))
        step_totals[label] = report_study(label, os.path.join(work, label), starts[label + ":name"], runs,
                                          starts[label], walls[label], "1" in extra)["step_total"]

    if variant:
        print(f"study-1+env ({' '.join(args.variant_env)}) / study-1: "
              f"{walls['study-1+env'] / walls['study-1']:.3f}")
    print(f"\n{'peer':11} {'wall s':>7} {'steps s':>8} {'other s':>8} {'other/trial':>11} {'÷ plain':>8}")
    for peer, wall in walls.items():
        st = step_totals.get(peer, float("nan"))
        print(f"{peer:11} {wall:7.1f} {st:8.1f} {wall - st:8.1f} {(wall - st) / args.trials:11.1f} "
              f"{wall / walls['plain']:8.3f}")
    # The same ratio with the study's optimizer-step seconds replaced by the plain loop's:
    # what it would be if the (noisy, shared) machine had stepped equally fast in both.
    same_steps = (walls["study-1"] - step_totals["study-1"] + step_totals["plain"]) / walls["plain"]
    print(f"study-1 / plain with equal step seconds: {same_steps:.3f}")
    if "ray" in walls:
        print(f"study-1 / ray: {walls['study-1'] / walls['ray']:.3f}")
    if args.keep is None:
        shutil.rmtree(work, ignore_errors=True)
    denominator = walls[args.peer] if args.peer in walls else walls["plain"]
    print(f"overhead_ratio={walls['study-1'] / denominator:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
