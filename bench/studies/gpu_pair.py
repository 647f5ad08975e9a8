"""The study of bench/gpu_check.sh: two seeds of a small MAE, run through
`python -m orchestrator run` on a local Ray. The `cluster` profile trains on the
GPU (chosen when Ray sees one); `local` is the same on the CPU, for the
script's smoke mode."""
from orchestrator.study import Budget, Objective, Profile, Study

FIXED = {"preset": "tiny", "dataset": "fashion_mnist", "img_size": 32, "patch_size": 4,
         "probe_train_size": 500, "probe_eval_size": 200, "log_every_steps": 5}

study = Study(
    name="gpu_pair",
    question="bench: does a study's trial train on the GPU, through Ray Train, end to end?",
    profiles={
        "local": Profile(axes={"mask_unit": [1]}, fixed={**FIXED, "batch_size": 32}, budget=Budget(steps=6)),
        "cluster": Profile(axes={"mask_unit": [1]}, fixed={**FIXED, "batch_size": 256, "use_gpu": True},
                           budget=Budget(steps=60)),
    },
    trials_per_cell=2,
    objective=Objective(metric="eval_loss", mode="min"),
    evaluations=1,
    early_stopping=False,
)
