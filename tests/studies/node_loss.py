"""Two trials long enough to lose a node mid-run, checkpointing every 4 steps."""
from orchestrator.study import Budget, Objective, Profile, Study

study = Study(
    name="node_loss",
    question="test: do trials survive the loss of the node they train on?",
    profiles={
        "local": Profile(
            axes={"patch_size": [4]},
            fixed={"preset": "tiny", "depth": 1, "img_size": 16, "batch_size": 16, "base_lr": 4e-3,
                   "probe_train_size": 200, "probe_eval_size": 100, "log_every_steps": 4,
                   "checkpoint_every_steps": 4},
            budget=Budget(steps=60),
        ),
    },
    trials_per_cell=2,
    objective=Objective(metric="eval_loss", mode="min"),
    evaluations=1,
    early_stopping=False,
)
