"""How does LoMaR's window size trade quality against compute, against MAE?
(Chen et al. 2022: 7x7 windows best, 5x5 drops sharply, 14x14 costs about 2x
for no gain; LoMaR's cost grows with the number of windows, not with the
resolution.) Every window size sees exactly the visible patches of the paper's
setting, 4 windows of 7x7 with int(0.8 * 49) = 39 masked: 40 per image, which
5x5 (8 windows) and 14x14 (1 window) match exactly and 9x9 or 11x11 cannot.
Each setting trains for several step budgets; the objective is read against the
training FLOPs spent, one curve per variant and resolution (LoMaR's two
resolutions cost nearly the same), with the compute-efficient frontier across
them. The held-out reconstruction loss is fitted beside the probe."""
from orchestrator.curves import CurveSpec
from orchestrator.study import Budget, Objective, Profile, Study
from trainers.mask_counts import window_masked

VISIBLE_PER_IMAGE = 4 * (49 - window_masked(7, 0.8))  # the paper's 4 windows of 7x7


def equal_visible_patches(cell: dict) -> dict:
    if cell["model"] != "lomar":
        return {}
    w = cell["window_size"]
    visible = w * w - window_masked(w, 0.8)
    if VISIBLE_PER_IMAGE % visible:
        raise ValueError(f"window {w}x{w} shows {visible} patches: no number of windows shows exactly "
                         f"{VISIBLE_PER_IMAGE}")
    return {"windows": VISIBLE_PER_IMAGE // visible}


study = Study(
    name="window_size_compute",
    question="Objective vs training FLOPs for LoMaR window sizes 5-14 (equal visible patches) and MAE",
    profiles={
        "local": Profile(
            description="64-d, 3-block encoders on Fashion-MNIST at 28 and 42 px, patch 2 (14x14 and 21x21 "
                        "grids)",
            axes={"model": ["lomar"], "window_size": [5, 7, 14], "img_size": [28, 42], "steps": [20, 40, 80]},
            include=[{"model": "mae", "img_size": r, "steps": s} for r in (28, 42) for s in (20, 40, 80)],
            # smaller than `tiny` (96-d, 4 blocks): 24 trials of it took 25 minutes here
            fixed={"preset": "tiny", "embed_dim": 64, "depth": 3, "num_heads": 4, "dataset": "fashion_mnist",
                   "patch_size": 2,
                   "batch_size": 32, "base_lr": 6e-3, "probe_train_size": 800, "probe_eval_size": 400},
            budget=Budget(steps=80),
        ),
        "cluster": Profile(
            description="ViT-B sizes at 224 and 448 px, patch 16; 12.5k-50k steps of 4096 images",
            axes={"model": ["lomar"], "window_size": [5, 7, 14], "img_size": [224, 448],
                  "steps": [12_500, 25_000, 50_000]},
            include=[{"model": "mae", "img_size": r, "steps": s} for r in (224, 448)
                     for s in (12_500, 25_000, 50_000)],
            fixed={"preset": "vit_base", "dataset": "parquet",
                   "data_path": "s3://REPLACE-study-bucket/imagenet-parquet", "patch_size": 16, "in_chans": 3,
                   "batch_size": 4096, "use_gpu": True, "workers": 8,
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
        CurveSpec(name="probe_error_vs_flops", x="flops", y="probe_top1", group_by=("variant", "img_size"),
                  law="power", higher_is_better=True, log_x=True, frontier=True),
        CurveSpec(name="heldout_loss_vs_flops", x="flops", y="eval_loss", group_by=("variant", "img_size"),
                  law="power", log_x=True),
    ],
)
