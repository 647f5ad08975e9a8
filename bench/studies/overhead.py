"""The study of bench/orchestration_overhead.py: identical tiny MAE trials, one cell
per seed, no tuning, no early stopping, one evaluation (at the end).

The number of trials and the steps per trial come from the environment
(BENCH_OVERHEAD_TRIALS, BENCH_OVERHEAD_STEPS), which the bench sets from its
--trials and --trial-seconds; the defaults make about a minute per trial here.
"""
import os

from orchestrator.study import Budget, Objective, Profile, Study

TRIALS = int(os.environ.get("BENCH_OVERHEAD_TRIALS", "4"))
STEPS = int(os.environ.get("BENCH_OVERHEAD_STEPS", "450"))

study = Study(
    name="orchestration_overhead",
    question="bench: what does running trials through the orchestrator cost over a plain loop?",
    profiles={
        "local": Profile(
            description="tiny MAE on Fashion-MNIST at 32 px, patch 4 (L = 64)",
            axes={"seed": list(range(TRIALS))},
            fixed={"preset": "tiny", "dataset": "fashion_mnist", "img_size": 32, "patch_size": 4,
                   "batch_size": 64, "base_lr": 5e-3, "probe_train_size": 2000,
                   "probe_eval_size": 1000},
            budget=Budget(steps=STEPS),
        ),
    },
    trials_per_cell=1,
    objective=Objective(metric="probe_top1", mode="max"),
    evaluations=1,
    early_stopping=False,
)
