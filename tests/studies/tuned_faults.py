"""A tuned study in which one cell diverges and every trial checkpoints between
its evaluation points: neither may stop the study (both once crashed Tune's searcher)."""
from orchestrator.curves import CurveSpec
from orchestrator.study import Budget, Objective, Profile, Study, Uniform

study = Study(
    name="tuned_faults",
    question="test: does a tuned study survive a diverged trial and checkpoints between evaluations?",
    profiles={
        "local": Profile(
            axes={"lr": [4e-3, 1e6]},  # lr 1e6 diverges (NaN loss) within a few steps
            fixed={"preset": "tiny", "depth": 1, "img_size": 16, "patch_size": 4, "batch_size": 16,
                   "probe_train_size": 200, "probe_eval_size": 100, "log_every_steps": 2,
                   "checkpoint_every_steps": 2, "norm_pix_loss": False},
            budget=Budget(steps=12),
        ),
    },
    tune={"weight_decay": Uniform(low=0.01, high=0.1)},
    trials_per_cell=2,
    replicates=1,  # the diverging cell has no finished trial to repeat: it gets none
    objective=Objective(metric="eval_loss", mode="min"),
    evaluations=2,
    curves=[CurveSpec(name="eval_loss_vs_lr", x="lr", y="eval_loss")],
)
