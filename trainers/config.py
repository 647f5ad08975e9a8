"""One validated object holds a training run's whole configuration.

It travels unchanged into MLflow params and into every checkpoint, so a run can
always be reproduced from what was recorded about it.
"""
from __future__ import annotations

from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, model_validator

from trainers.mask_counts import effective_mask_ratio, kept_patches, window_masked


class ModelSize(BaseModel):
    model_config = ConfigDict(frozen=True)
    embed_dim: int
    depth: int
    num_heads: int
    decoder_embed_dim: int
    decoder_depth: int
    decoder_num_heads: int


# The paper sizes (MAE: decoder 512-d, 8 blocks, 16 heads) and CPU stand-ins.
# Stand-ins are named for what they are; their real width and depth are logged.
PRESETS: dict[str, ModelSize] = {
    "vit_base": ModelSize(embed_dim=768, depth=12, num_heads=12,
                          decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16),
    "vit_large": ModelSize(embed_dim=1024, depth=24, num_heads=16,
                           decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16),
    "vit_huge": ModelSize(embed_dim=1280, depth=32, num_heads=16,
                          decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16),
    # CPU presets, smallest first.
    "tiny": ModelSize(embed_dim=96, depth=4, num_heads=3,
                      decoder_embed_dim=64, decoder_depth=1, decoder_num_heads=4),
    "cpu_small": ModelSize(embed_dim=192, depth=6, num_heads=3,
                           decoder_embed_dim=128, decoder_depth=2, decoder_num_heads=4),
    # Stand-ins for ViT-B and ViT-L in local study profiles: same ratio of
    # depth (1:2) and a wider/narrower pair, small enough for 2 CPU cores.
    "vit_b_standin": ModelSize(embed_dim=96, depth=3, num_heads=3,
                               decoder_embed_dim=64, decoder_depth=1, decoder_num_heads=4),
    "vit_l_standin": ModelSize(embed_dim=128, depth=6, num_heads=4,
                               decoder_embed_dim=64, decoder_depth=1, decoder_num_heads=4),
}

DATASETS = ("fashion_mnist", "image_folder", "parquet")


class TrainConfig(BaseModel):
    """A pretraining run. Fields left as None are resolved by the validator."""

    model_config = ConfigDict(extra="forbid", validate_assignment=False)

    # --- model
    model: Literal["mae", "lomar"] = "mae"
    preset: str = "tiny"
    embed_dim: Optional[int] = None
    depth: Optional[int] = None
    num_heads: Optional[int] = None
    decoder_embed_dim: Optional[int] = None
    decoder_depth: Optional[int] = None
    decoder_num_heads: Optional[int] = None
    mlp_ratio: float = 4.0
    img_size: int = 32
    patch_size: int = 4
    in_chans: int = 1
    mask_ratio: Optional[float] = None  # 0.75 for MAE, 0.8 inside LoMaR windows
    mask_unit: int = 1  # k: mask k x k adjacent patches together (long-sequence MAE)
    norm_pix_loss: bool = True
    mff: bool = False  # multi-level feature fusion (MFF) before the decoder
    mff_layers: Optional[tuple[int, ...]] = None  # default: 0, 2, 4, ... and the last block
    window_size: int = 7  # LoMaR: w x w patches per window
    windows: int = 4  # LoMaR: windows per image

    # --- data
    dataset: str = "fashion_mnist"
    data_path: Optional[str] = None  # None: the Debian package's folder for fashion_mnist
    augment: bool = True  # MAE's random resized crop (scale 0.2-1) and horizontal flip
    # background threads that decode and augment training batches ahead of the step (0: the
    # training thread does it; None: one per CPU of the worker, trainers.resources.loader_threads);
    # the batches are the same for any number
    num_loader_workers: Optional[int] = None
    # encoded training rows a Parquet worker holds at most (its shuffle buffer: two windows,
    # see trainers.data.PretrainStream); None: 1024. None rather than the number, so that
    # checkpoints written before this setting existed still resume
    loader_buffer_mb: Optional[float] = None

    # --- optimisation
    steps: int = 100
    # the training FLOPs (counted from the model) this run was sized to, when its
    # steps come from a compute budget (an isoFLOP study); None: steps were given
    flops_budget: Optional[float] = None
    batch_size: int = 64  # per optimizer step, summed over workers and accumulation
    accum_steps: int = 1
    base_lr: float = 1.5e-4
    lr: Optional[float] = None  # None: base_lr * batch_size / 256
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.95)
    warmup_steps: Optional[int] = None  # None: 5% of steps
    min_lr: float = 0.0
    clip_grad: Optional[float] = None
    seed: int = 0

    # --- checkpoints, evaluation, logging
    checkpoint_every_steps: int = 0  # 0: only at evaluation points and the end
    checkpoint_every_minutes: Optional[float] = None
    eval_every_steps: int = 0  # 0: evaluate at the end only
    probe_train_size: int = 2000
    probe_eval_size: int = 1000
    knn_k: int = 20
    # which images the probes use: a study's trials share it (replicates differ in
    # `seed` only), so the trials of a cell are compared on the same images
    probe_seed: int = 0
    eval_mask_seed: int = 1234
    log_every_steps: int = 10

    # --- resources
    workers: int = 1
    cpus_per_worker: int = 1
    use_gpu: bool = False
    amp: Literal["auto", "off", "bf16"] = "auto"  # auto: bf16 on GPU, fp32 on CPU
    threads_per_worker: Optional[int] = None  # torch intra-op threads; None: cpus_per_worker

    @model_validator(mode="after")
    def _resolve_and_check(self) -> "TrainConfig":
        if self.preset not in PRESETS:
            raise ValueError(f"preset: unknown preset {self.preset!r}; known: {', '.join(PRESETS)}")
        size = PRESETS[self.preset]
        for name in ModelSize.model_fields:
            if getattr(self, name) is None:
                object.__setattr__(self, name, getattr(size, name))
        if self.mask_ratio is None:
            object.__setattr__(self, "mask_ratio", 0.8 if self.model == "lomar" else 0.75)
        if self.lr is None:
            object.__setattr__(self, "lr", self.base_lr * self.batch_size / 256)
        if self.warmup_steps is None:
            object.__setattr__(self, "warmup_steps", max(1, self.steps // 20))
        if self.mff and self.mff_layers is None:
            layers = tuple(range(0, self.depth - 2, 2)) + (self.depth - 1,)
            object.__setattr__(self, "mff_layers", layers)
        _check(self)
        return self

    @property
    def grid(self) -> int:
        return self.img_size // self.patch_size

    @property
    def seq_len(self) -> int:
        """Tokens per image: (image / patch)^2."""
        return self.grid ** 2

    @property
    def visible_patches(self) -> int:
        """Patches per image the encoder sees unmasked: all windows' for LoMaR."""
        if self.model == "lomar":
            return self.windows * (self.window_size ** 2 - window_masked(self.window_size, self.mask_ratio))
        return kept_patches(self.grid, self.mask_ratio)

    @property
    def encoder_params(self) -> int:
        """Parameters of the encoder's transformer blocks: the model size N of
        scaling laws (Kaplan et al.: embeddings excluded; MAE's decoder is fixed)."""
        d, r = self.embed_dim, self.mlp_ratio
        per_block = (4 + 2 * r) * d * d + (9 + r) * d  # qkv, proj, MLP and two norms, with biases
        return int(self.depth * per_block)

    @property
    def images_seen(self) -> int:
        """The data size D of a run: images through the encoder, repeats counted."""
        return self.steps * self.batch_size

    @property
    def worker_batch(self) -> int:
        """Images one worker feeds through the model per micro-step."""
        return self.batch_size // (self.workers * self.accum_steps)

    @property
    def variant(self) -> str:
        """Short name of the model variant, e.g. "mae", "mae k2 mff", "lomar w7"."""
        if self.model == "lomar":
            return f"lomar w{self.window_size}"
        return "mae" + (f" k{self.mask_unit}" if self.mask_unit > 1 else "") + (" mff" if self.mff else "")

    def resolved(self) -> dict:
        """Flat, fully resolved view: what MLflow params and checkpoints record."""
        out = self.model_dump(mode="json")
        out["seq_len"] = self.seq_len
        out["variant"] = self.variant
        out["effective_mask_ratio"] = effective_mask_ratio(self.model, self.grid, self.window_size,
                                                           self.mask_ratio)
        out["visible_patches"] = self.visible_patches
        out["encoder_params"] = self.encoder_params
        out["images_seen"] = self.images_seen
        return out


def _check(c: TrainConfig) -> None:
    def bad(field: str, why: str) -> None:
        raise ValueError(f"{field}: {why}")

    if not 0 < c.mask_ratio < 1:
        bad("mask_ratio", f"must be strictly between 0 and 1, got {c.mask_ratio}")
    if c.img_size <= 0 or c.patch_size <= 0:
        bad("patch_size", "img_size and patch_size must be positive")
    if c.img_size % c.patch_size:
        bad("patch_size", f"{c.patch_size} does not divide img_size {c.img_size}")
    if c.mask_unit < 1 or c.grid % c.mask_unit:
        bad("mask_unit", f"{c.mask_unit} does not divide the {c.grid}x{c.grid} patch grid")
    if c.model == "lomar":
        if not 1 <= c.window_size <= c.grid:
            bad("window_size", f"{c.window_size} is larger than the {c.grid}x{c.grid} patch grid")
        if c.windows < 1:
            bad("windows", "must be at least 1")
        if c.mff:
            bad("mff", "feature fusion is a switch of MAE, not of LoMaR")
    if c.embed_dim % c.num_heads or c.decoder_embed_dim % c.decoder_num_heads:
        bad("num_heads", "embedding widths must be divisible by their head counts")
    if c.mff and any(not 0 <= i < c.depth for i in c.mff_layers):
        bad("mff_layers", f"layers must lie in 0..{c.depth - 1}, got {list(c.mff_layers)}")
    if c.dataset not in DATASETS:
        bad("dataset", f"unknown dataset {c.dataset!r}; known: {', '.join(DATASETS)}")
    if c.dataset != "fashion_mnist" and not c.data_path:
        bad("data_path", f"dataset {c.dataset!r} needs a data_path")
    if c.in_chans not in (1, 3):
        bad("in_chans", "must be 1 (grayscale) or 3 (RGB)")
    for name in ("steps", "batch_size", "accum_steps", "workers", "cpus_per_worker"):
        if getattr(c, name) < 1:
            bad(name, "must be at least 1")
    if c.num_loader_workers is not None and c.num_loader_workers < 0:
        bad("num_loader_workers", "must be 0 or more")
    if c.loader_buffer_mb is not None and not c.loader_buffer_mb > 0:
        bad("loader_buffer_mb", f"must be positive, got {c.loader_buffer_mb}")
    if c.batch_size % (c.workers * c.accum_steps):
        bad("batch_size", f"{c.batch_size} is not divisible by workers x accum_steps "
                          f"= {c.workers * c.accum_steps}")
    if c.model == "mae" and kept_patches(c.grid, c.mask_ratio) < 1:
        bad("mask_ratio", f"{c.mask_ratio} leaves the encoder no visible patch of {c.seq_len}")
    if c.model == "lomar":
        masked = window_masked(c.window_size, c.mask_ratio)
        if not 0 < masked < c.window_size ** 2:
            bad("mask_ratio", f"{c.mask_ratio} masks {masked} of the {c.window_size ** 2} patches of a "
                              f"{c.window_size}x{c.window_size} window: none would be {'visible' if masked else 'masked'}")
