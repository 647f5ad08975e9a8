"""python -m orchestrator {run,plan,resume,status,fit} ...

Every refusal (a mistyped command line included) is one line on stderr, exit
code 2 and no traceback, before anything is written. A study that storage
stops mid-way (full, read-only) ends the same way with exit code 1.
"""
from __future__ import annotations

import argparse
import sys
from typing import Optional

from rich.console import Console
from rich.table import Table

from orchestrator.planning import CostModel, Plan, make_plan
from orchestrator.preflight import PreflightError
from orchestrator.storage import StorageError, StorageRefused
from orchestrator.study import PROFILES, StudyError, load_study
from orchestrator.tracking import TrackingError, ui_hint

DEFAULT_STORAGE = "runs"
DEFAULT_SILENCE_LIMIT_S = 3600  # far longer than a step, an evaluation or a checkpoint upload takes


class UsageError(ValueError):
    """A command line that argparse cannot read."""


class _Parser(argparse.ArgumentParser):
    """Refuses a bad command line like any other input: one line (argparse's own
    error also prints the usage) and exit code 2, from main."""

    def error(self, message):
        raise UsageError(message)


def _positive_int(text: str) -> int:
    if not text.strip().isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number of at least 1, got {text!r}")
    return int(text)


def _common(p: argparse.ArgumentParser, tracking: bool = True) -> None:
    p.add_argument("--storage", default=DEFAULT_STORAGE,
                   help=f"local folder or s3://bucket/prefix for checkpoints, results and curves "
                        f"(default: ./{DEFAULT_STORAGE}; S3-compatible endpoints from AWS_ENDPOINT_URL)")
    if tracking:
        p.add_argument("--tracking-uri", default=None,
                       help="MLflow tracking URI, e.g. http://127.0.0.1:5000 "
                            "(default: sqlite file <storage>/mlflow.db for local storage)")


def _silence(p: argparse.ArgumentParser) -> None:
    p.add_argument("--silence-limit", type=_positive_int, default=DEFAULT_SILENCE_LIMIT_S, metavar="SECONDS",
                   help="a trial not heard from for this long (no step, no result) is started again from its "
                        f"latest checkpoint (default: {DEFAULT_SILENCE_LIMIT_S})")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m orchestrator", description=__doc__,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run a study file as a Ray Tune + Optuna campaign")
    run.add_argument("study", help="path to a study file, e.g. studies/seq_len_scaling.py")
    run.add_argument("--profile", choices=PROFILES, default=None,
                     help="default: local when the Ray cluster has no GPU, cluster otherwise")
    _common(run)
    run.add_argument("--address", default=None, help="Ray address, e.g. auto (default: start Ray here)")
    run.add_argument("--max-concurrent", type=_positive_int, default=None,
                     help="at most this many trials at once (default: what the cluster fits)")
    run.add_argument("--name", default=None, help="name of this execution (default: the study's name)")
    _silence(run)

    plan = sub.add_parser("plan", help="cells, trials, FLOPs and cluster cost of a study, without Ray")
    plan.add_argument("study")
    plan.add_argument("--profile", choices=PROFILES, default="local")
    cost = CostModel()
    plan.add_argument("--gpu-tflops", type=float, default=cost.gpu_tflops, help="peak GPU TFLOP/s (bf16)")
    plan.add_argument("--mfu", type=float, default=cost.mfu, help="model FLOPs utilisation assumed")
    plan.add_argument("--usd-per-gpu-hour", type=float, default=cost.usd_per_gpu_hour)

    res = sub.add_parser("resume", help="continue an interrupted study; nothing finished runs again")
    res.add_argument("name")
    res.add_argument("--study", default=None,
                     help="the study file it started from (default: the path it was started with); "
                          "it must be unchanged")
    _common(res)
    res.add_argument("--address", default=None)
    res.add_argument("--max-concurrent", type=_positive_int, default=None)
    res.add_argument("--trust-tune-state", action="store_true",
                     help="load Tune's saved state even where its pickles would run code that Tune does not "
                          "write there (only for storage that no one else can write)")
    _silence(res)

    st = sub.add_parser("status", help="per cell: trials ended of planned, best objective and its trial, "
                                       "compute spent of planned; the fitted curves' laws")
    st.add_argument("name")
    _common(st, tracking=False)

    fit = sub.add_parser("fit", help="refit the study's curves from results.parquet alone")
    fit.add_argument("name")
    _common(fit)
    fit.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples per fit")
    return parser


def _flops(x: float) -> str:
    return f"{x:.3g}"


def _cell_trials(s) -> str:
    if s.replicates:
        return f"({s.trials_per_cell} tuning + {s.replicates} seed{'s' * (s.replicates > 1)} of the best) trials"
    return f"{s.trials_per_cell} trials"


def print_plan(plan: Plan, cost: CostModel, console: Console, cluster: Optional[Plan]) -> None:
    s = plan.study
    console.print(f"[bold]{s.name}[/bold]: {s.question}")
    console.print(f"profile {plan.profile}: {len(plan.cells)} cells x {_cell_trials(s)} = "
                  f"{plan.trials} trials; tuned: {', '.join(s.tune) or 'nothing'}; "
                  f"objective {s.objective.metric} ({s.objective.mode})")
    table = Table()
    table.add_column("cell", overflow="fold")
    for col in ("seq_len", "steps", "batch", "FLOPs/trial"):
        table.add_column(col, justify="right")
    for c in plan.cells:
        table.add_row(c.id, str(c.config.seq_len), str(c.config.steps), str(c.config.batch_size),
                      _flops(c.flops_per_trial))
    console.print(table)
    console.print(f"total training compute: {_flops(plan.total_flops)} FLOPs "
                  f"(analytic, 2 FLOPs per multiply-add; tuned values at their midpoint)")
    if cluster is not None:
        hours = cost.gpu_hours(cluster.total_flops)
        console.print(f"cluster profile: {cluster.trials} trials, {_flops(cluster.total_flops)} FLOPs, "
                      f"about {hours:.1f} GPU-hours, ${hours * cost.usd_per_gpu_hour:,.0f} "
                      f"(assuming {cost.gpu_tflops:g} TFLOP/s peak, {cost.mfu:.0%} MFU, "
                      f"${cost.usd_per_gpu_hour:.2f}/GPU-hour)")


def cmd_plan(args, console: Console) -> int:
    study = load_study(args.study)
    plan = make_plan(study, args.profile, args.study)
    cluster = make_plan(study, "cluster", args.study) if "cluster" in study.profiles else None
    print_plan(plan, CostModel(args.gpu_tflops, args.mfu, args.usd_per_gpu_hour), console, cluster)
    return 0


def cmd_run(args, console: Console) -> int:
    from orchestrator import campaign

    state = campaign.start(args.study, profile=args.profile, storage_uri=args.storage,
                           tracking_uri=args.tracking_uri, address=args.address,
                           max_concurrent=args.max_concurrent, name=args.name, console=console,
                           silence_limit_s=args.silence_limit)
    return _finish(state, args, console)


def cmd_resume(args, console: Console) -> int:
    from orchestrator import campaign

    state = campaign.resume(args.name, storage_uri=args.storage, tracking_uri=args.tracking_uri,
                            address=args.address, max_concurrent=args.max_concurrent, console=console,
                            study_path=args.study, silence_limit_s=args.silence_limit,
                            trust_tune_state=args.trust_tune_state)
    return _finish(state, args, console)


def _finish(state: dict, args, console: Console) -> int:
    """Fit the curves; exit 1 if any trial failed (its reason is in results.parquet)
    or the results could not be written, 130 if interrupted (Ctrl-C) before every
    trial ended; say what MLflow never received."""
    from orchestrator.fitting import fit_study
    from orchestrator.results import ResultsTable
    from orchestrator.storage import Storage

    unwritten = state.get("unwritten", [])
    for what in unwritten:
        print(f"warning: not written: {what}", file=sys.stderr)
    if any(w.startswith("results store") for w in unwritten):
        print(f"error: results.parquet could not be written to {args.storage}; once storage is back, "
              f"`resume {state['name']}` writes it", file=sys.stderr)
        return 1
    if state.get("interrupted"):  # curves of a part of the grid would answer another question
        rows = ResultsTable(Storage(args.storage), state["name"]).rows
        print(f"interrupted: {len(rows)} of {state['trials']} trials ended; `resume {state['name']}` "
              f"continues the study from its checkpoints and fits its curves", file=sys.stderr)
        return 130
    fit_study(state, args.storage, console)
    console.print(f"results: {args.storage}/{state['name']}/results.parquet; "
                  f"{ui_hint(state['tracking_uri'], state['experiment_id'])}", soft_wrap=True)
    rows = ResultsTable(Storage(args.storage), state["name"]).rows.values()
    lost = sum(r.get("step_metrics_lost") or 0 for r in rows)
    if lost:
        print(f"warning: {lost:.0f} batches of step metrics never reached MLflow (the tracking server was "
              f"away); each trial's count is in results.parquet (step_metrics_lost)", file=sys.stderr)
    failed = sum(r["status"] == "failed" for r in rows)
    if failed:
        print(f"error: {failed} of {len(rows)} trials failed; see their status in results.parquet "
              f"and MLflow", file=sys.stderr)
        return 1
    return 0


def cmd_status(args, console: Console) -> int:
    from orchestrator.status import print_status

    print_status(args.name, args.storage, console)
    return 0


def cmd_fit(args, console: Console) -> int:
    from orchestrator.fitting import fit_study
    from orchestrator.saved_state import read_state

    state = read_state(args.name, args.storage)
    if args.tracking_uri:
        state["tracking_uri"] = args.tracking_uri
    fit_study(state, args.storage, console, bootstrap=args.bootstrap)
    return 0


COMMANDS = {"run": cmd_run, "plan": cmd_plan, "resume": cmd_resume, "status": cmd_status, "fit": cmd_fit}


REFUSALS = (UsageError, PreflightError, StudyError, StorageError, TrackingError)


def _error_line(e: Exception) -> None:
    # one line even when a message quotes a study file's multi-line exception
    print("error: " + " ".join(str(e).splitlines()), file=sys.stderr)


def main(argv=None) -> int:
    try:
        args = build_parser().parse_args(argv)
        return COMMANDS[args.command](args, Console())
    except StorageRefused as e:
        _error_line(e)
        return 1
    except REFUSALS as e:
        _error_line(e)
        return 2
