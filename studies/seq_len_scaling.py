"""Does MAE keep improving as the sequence length grows, and does the answer
differ for ViT-B and ViT-L? (Hu et al. 2022, "Exploring long-sequence masked
autoencoders")

Sequence length is set by the patch size at a fixed image size. For long
sequences the mask unit is decoupled from the patch: it stays at the pixel size
of the coarsest patch (k x k patches masked together), which the paper finds
necessary for longer sequences to help. The learning rate is tuned per cell; a
point is the cell's best learning rate with a second seed of it. The held-out
reconstruction loss is fitted beside the probe: it is smoother, and tracks
downstream quality in masked image modelling (Xie et al. 2023).
"""
from orchestrator.curves import CurveSpec
from orchestrator.study import Budget, LogUniform, Objective, Profile, Study


def decoupled_mask_unit(cell: dict) -> dict:
    # mask units of 16 px at 224 (cluster) / 4 px at 32 (local): k = unit px / patch px
    unit_px = 16 if cell["img_size"] >= 224 else 4
    return {"mask_unit": max(1, unit_px // cell["patch_size"])}


study = Study(
    name="seq_len_scaling",
    question="Does MAE pretraining keep improving with sequence length, for ViT-B vs ViT-L?",
    profiles={
        "local": Profile(
            description="CPU stand-ins of ViT-B/L on Fashion-MNIST at 32 px; L = 16, 64, 256",
            axes={"preset": ["vit_b_standin", "vit_l_standin"], "patch_size": [8, 4, 2]},
            fixed={"dataset": "fashion_mnist", "img_size": 32, "in_chans": 1, "batch_size": 64,
                   "probe_train_size": 1500, "probe_eval_size": 750, "log_every_steps": 10},
            budget=Budget(steps=80),
        ),
        "cluster": Profile(
            description="ViT-B/16 and ViT-L/16 sizes at 224 px; L = 49, 196, 784 (patch 32, 16, 8)",
            axes={"preset": ["vit_base", "vit_large"], "patch_size": [32, 16, 8]},
            fixed={"dataset": "parquet", "data_path": "s3://REPLACE-study-bucket/imagenet-parquet",
                   "img_size": 224, "in_chans": 3, "batch_size": 4096, "use_gpu": True, "workers": 8,
                   "probe_train_size": 50000, "probe_eval_size": 10000, "log_every_steps": 50,
                   "checkpoint_every_minutes": 30},
            budget=Budget(epochs=100, train_images=1_281_167),  # ImageNet-1k
        ),
    },
    derive=decoupled_mask_unit,
    tune={"base_lr": LogUniform(low=1e-3, high=1.5e-2)},
    trials_per_cell=2,
    replicates=1,
    objective=Objective(metric="probe_top1", mode="max"),
    evaluations=2,
    # Three sequence lengths per model: a power law (2 parameters) leaves one degree
    # of freedom for its intervals; a saturating law (3) would pass through the points.
    curves=[
        CurveSpec(name="probe_error_vs_seq_len", x="seq_len", y="probe_top1", group_by="preset",
                  law="power", higher_is_better=True, log_x=True),
        CurveSpec(name="heldout_loss_vs_seq_len", x="seq_len", y="eval_loss", group_by="preset",
                  law="power", log_x=True),
    ],
)
