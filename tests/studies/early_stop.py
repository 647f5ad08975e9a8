"""One tuned cell whose second trial ASHA stops at its first evaluation, then a
seed of the first: the study tests/test_faults.py kills the driver of (just
after that early stop, just after the seed starts) and silences a trial of.

Run one trial at a time (--max-concurrent 1). Optuna's random sampler, seeded,
draws lr 4e-3 for the first trial, which learns, and 1e-9 for the second,
which does not: worse at the first rung (step 12), it is stopped there. A
checkpoint every 4 steps leaves a trial most of its steps to run after its
first one.
"""
from orchestrator.study import Budget, Choice, Objective, Profile, Study

study = Study(
    name="early_stop",
    question="test: does a study killed just after an early stop or a trial's start resume without rerunning?",
    profiles={
        "local": Profile(
            axes={"patch_size": [4]},
            fixed={"preset": "tiny", "depth": 1, "img_size": 16, "batch_size": 16,
                   "probe_train_size": 200, "probe_eval_size": 100, "log_every_steps": 2,
                   "checkpoint_every_steps": 4, "norm_pix_loss": False},
            budget=Budget(steps=24),
        ),
    },
    tune={"lr": Choice(values=(1e-9, 4e-3))},
    sampler="random",
    trials_per_cell=2,
    replicates=1,
    objective=Objective(metric="eval_loss", mode="min"),
    evaluations=2,
)
