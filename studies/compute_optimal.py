"""For a given training compute, how large should a masked autoencoder be, and
on how many images should it train? The isoFLOP design (Hoffmann et al. 2022,
approach 2): at each FLOP budget, encoders from small to large, each trained on
as many images as the budget buys (FLOPs counted from the model: masked
encoder, full decoder; never 6·N·D). A parabola in log size per budget gives
that budget's optimal size; the optimal size and the images it sees are fitted
as power laws of compute, with intervals; the two-variable law is fitted to all
runs; and the laws fitted without the largest budget predict it, checked
against its own runs. A budget whose runs do not bracket its optimum is left
out and flagged, and one whose optimum sits at the edge of its grid is flagged.
N is the encoder's block parameters (the decoder is the same for every size);
the objective is the held-out reconstruction loss, the smooth one, beside which
the probe is recorded for each run."""
from orchestrator.curves import IsoFlopSpec
from orchestrator.study import Budget, Objective, Profile, Study

# encoder widths -> (depth, heads): a ladder growing in width and depth together
LOCAL_SIZES = {32: (2, 2), 48: (2, 3), 64: (3, 4), 96: (4, 4), 128: (4, 4)}
CLUSTER_SIZES = {192: (12, 3), 384: (12, 6), 512: (12, 8), 768: (12, 12), 1024: (24, 16)}


def encoder_of_width(cell: dict) -> dict:
    sizes = CLUSTER_SIZES if cell["img_size"] >= 224 else LOCAL_SIZES
    depth, heads = sizes[cell["embed_dim"]]
    return {"depth": depth, "num_heads": heads}


study = Study(
    name="compute_optimal",
    question="How does the compute-optimal MAE encoder size, and the images it sees, grow with compute?",
    profiles={
        "local": Profile(
            description="MAE encoders of 32-128 dims on Fashion-MNIST at 28 px, patch 4 (L = 49), "
                        "4 budgets of 1.5e11-4e12 FLOPs",
            axes={"flops_budget": [1.5e11, 4.5e11, 1.35e12, 4e12], "embed_dim": list(LOCAL_SIZES)},
            fixed={"preset": "tiny", "dataset": "fashion_mnist", "img_size": 28, "patch_size": 4,
                   "decoder_embed_dim": 64, "decoder_depth": 1, "decoder_num_heads": 4, "batch_size": 64,
                   "base_lr": 6e-3, "probe_train_size": 1000, "probe_eval_size": 500, "log_every_steps": 20},
            budget=Budget(steps=100),  # each cell's flops_budget sets its steps
        ),
        "cluster": Profile(
            description="ViT-Ti to ViT-L encoders at 224 px, patch 16, ImageNet-1k; budgets 1e18-3e19 FLOPs",
            axes={"flops_budget": [1e18, 3e18, 1e19, 3e19], "embed_dim": list(CLUSTER_SIZES)},
            fixed={"preset": "vit_base", "dataset": "parquet",
                   "data_path": "s3://REPLACE-study-bucket/imagenet-parquet", "img_size": 224, "patch_size": 16,
                   "in_chans": 3, "batch_size": 4096, "use_gpu": True, "workers": 8,
                   "probe_train_size": 50000, "probe_eval_size": 10000, "checkpoint_every_minutes": 30},
            budget=Budget(steps=1000),
        ),
    },
    derive=encoder_of_width,
    trials_per_cell=1,
    objective=Objective(metric="eval_loss", mode="min"),
    evaluations=1,
    early_stopping=False,
    curves=[IsoFlopSpec(name="heldout_loss_vs_size_per_budget", y="eval_loss")],
)
