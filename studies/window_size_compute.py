"""How does LoMaR's window size trade quality against compute, against MAE?
(Chen et al. 2022: 7x7 windows best, 5x5 drops sharply, 14x14 costs about 2x
for no gain; LoMaR's cost grows with the number of windows, not with the
resolution.) When window sizes are compared, the number of windows is set so
that every setting sees about as many visible patches. Each setting trains for
several step budgets; the objective is read against the training FLOPs spent,
with the compute-efficient frontier across settings."""
from orchestrator.curves import CurveSpec
from orchestrator.study import Budget, Objective, Profile, Study

# visible patches per image every LoMaR setting sees (20% of its windows' patches)
VISIBLE_PER_IMAGE = {"local": 40, "cluster": 160}


def equal_visible_patches(cell: dict) -> dict:
    if cell["model"] != "lomar":
        return {}
    w = cell["window_size"]
    budget = VISIBLE_PER_IMAGE["cluster" if cell["img_size"] >= 224 else "local"]
    return {"windows": max(1, round(budget / ((1 - 0.8) * w * w)))}


study = Study(
    name="window_size_compute",
    question="Objective vs training FLOPs for LoMaR window sizes 5-14 (equal visible patches) and MAE",
    profiles={
        "local": Profile(
            description="tiny models on Fashion-MNIST at 28 and 42 px, patch 2 (14x14 and 21x21 grids)",
            axes={"model": ["lomar"], "window_size": [5, 7, 9, 14], "img_size": [28, 42], "steps": [30, 90]},
            include=[{"model": "mae", "img_size": r, "steps": s} for r in (28, 42) for s in (30, 90)],
            fixed={"preset": "tiny", "dataset": "fashion_mnist", "patch_size": 2,
                   "batch_size": 32, "base_lr": 6e-3, "probe_train_size": 800, "probe_eval_size": 400},
            budget=Budget(steps=80),
        ),
        "cluster": Profile(
            description="ViT-B sizes at 224 and 448 px, patch 16; 12.5k-50k steps of 4096 images",
            axes={"model": ["lomar"], "window_size": [5, 7, 9, 11, 14], "img_size": [224, 448],
                  "steps": [12_500, 25_000, 50_000]},
            include=[{"model": "mae", "img_size": r, "steps": s} for r in (224, 448)
                     for s in (12_500, 25_000, 50_000)],
            fixed={"preset": "vit_base", "dataset": "parquet",
                   "data_path": "s3://REPLACE-study-bucket/imagenet-parquet", "patch_size": 16, "in_chans": 3, "batch_size": 4096, "use_gpu": True, "workers": 8,
                   "probe_train_size": 50000, "probe_eval_size": 10000, "checkpoint_every_minutes": 30},
            budget=Budget(steps=25_000),
        ),
    },
    derive=equal_visible_patches,
    trials_per_cell=1,
    objective=Objective(metric="probe_top1", mode="max"),
    evaluations=1,
    early_stopping=False,
    curves=[
        CurveSpec(name="probe_error_vs_flops", x="flops", y="probe_top1", group_by="variant",
                  law="power", higher_is_better=True, log_x=True, frontier=True),
    ],
)
