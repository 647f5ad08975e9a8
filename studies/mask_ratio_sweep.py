"""Which mask ratio is best, and does masking 2x2 units move the optimum?
(He et al. 2021 find 75% best for MAE; Hu et al. 2022 mask units of k x k
patches.) Optuna's TPE picks the mask ratio inside each mask-unit cell; every trial is a
point at the ratio it ran in fact (the effective ratio: the keep count is whole
patches), so no trial is stopped early, which would drop the worse ratios from the
fit. The fitted quadratic's vertex is the optimum, with its interval. The held-out
reconstruction loss is not fitted here: each trial measures it under its own
ratio, so it rises with the ratio by construction."""
from orchestrator.curves import CurveSpec
from orchestrator.study import Budget, Objective, Profile, Study, Uniform

study = Study(
    name="mask_ratio_sweep",
    question="Which mask ratio minimises the held-out reconstruction-probe error, for mask units 1 and 2?",
    profiles={
        "local": Profile(
            description="tiny MAE on Fashion-MNIST at 32 px, patch 4 (L = 64)",
            axes={"mask_unit": [1, 2]},
            fixed={"preset": "tiny", "dataset": "fashion_mnist", "img_size": 32, "patch_size": 4,
                   "batch_size": 64, "base_lr": 6e-3, "probe_train_size": 2000, "probe_eval_size": 1000},
            budget=Budget(steps=100),
        ),
        "science": Profile(
            description="the local model for 4x the steps, with larger probe sets (docs/findings.md)",
            axes={"mask_unit": [1, 2]},
            fixed={"preset": "tiny", "dataset": "fashion_mnist", "img_size": 32, "patch_size": 4,
                   "batch_size": 64, "base_lr": 6e-3, "probe_train_size": 5000, "probe_eval_size": 2000},
            budget=Budget(steps=400),
        ),
        "cluster": Profile(
            description="ViT-B/16 at 224 px (L = 196)",
            axes={"mask_unit": [1, 2]},
            fixed={"preset": "vit_base", "dataset": "parquet",
                   "data_path": "s3://REPLACE-study-bucket/imagenet-parquet", "img_size": 224,
                   "patch_size": 16, "in_chans": 3, "batch_size": 4096, "use_gpu": True, "workers": 8,
                   "probe_train_size": 50000, "probe_eval_size": 10000, "checkpoint_every_minutes": 30},
            budget=Budget(epochs=200, train_images=1_281_167),  # ImageNet-1k
        ),
    },
    tune={"mask_ratio": Uniform(low=0.4, high=0.95)},
    sampler="tpe",
    trials_per_cell=6,
    replicates=2,  # seeds of each unit's best ratio: the spread at the optimum
    objective=Objective(metric="probe_top1", mode="max"),
    evaluations=2,
    early_stopping=False,
    curves=[
        CurveSpec(name="probe_error_vs_mask_ratio", x="effective_mask_ratio", y="probe_top1", group_by="mask_unit",
                  law="quadratic", higher_is_better=True, log_x=False),
    ],
)
