"""A two-cell study small enough for tests: MAE at two sequence lengths."""
from orchestrator.curves import CurveSpec
from orchestrator.study import Budget, LogUniform, Objective, Profile, Study

study = Study(
    name="tiny_grid",
    question="test: does a tiny MAE run end to end?",
    profiles={
        "local": Profile(
            axes={"patch_size": [8, 4, 2]},
            fixed={"preset": "tiny", "depth": 1, "img_size": 16, "batch_size": 16,
                   "probe_train_size": 200, "probe_eval_size": 100, "log_every_steps": 2,
                   "base_lr": 4e-3},
            budget=Budget(steps=12),
        ),
    },
    tune={"base_lr": LogUniform(low=1e-3, high=1e-2)},
    trials_per_cell=2,
    replicates=1,  # a seed of each cell's best learning rate, run once its tuning ended
    objective=Objective(metric="eval_loss", mode="min"),
    evaluations=2,
    curves=[CurveSpec(name="eval_loss_vs_seq_len", x="seq_len", y="eval_loss", law="power")],
)
