"""Images for pretraining and evaluation: readers, batched transforms, a resumable stream.

Sources (`cfg.dataset`)
  fashion_mnist  IDX files (gzip-compressed or plain) in `data_path`, by default the
                 folder of the Debian package dataset-fashion-mnist; split "train"
                 (60000 images) or "test" (10000, the t10k files). Held in memory.
  image_folder   `root/<class>/*.png|jpg|jpeg` (torchvision's ImageFolder layout);
                 file paths are listed up front and pixels decoded per batch.
  parquet        `*.parquet` files under a local folder or `s3://bucket/prefix`, with
                 columns `image` (PNG/JPEG bytes, or a struct with a `bytes` field as
                 HF datasets write) and `label`. Each Ray Train worker reads only its
                 own rows, keeps them encoded in memory and decodes per batch.

Splits are "train" and "test". An image folder with a `train/` subfolder takes
"test" from `val/` (or `test/`); Parquet files belong to a split when a component
of their path is or starts with its name (`train/...`, `train-00000-of-00004.parquet`;
`test`, `val` or `validation` for "test"). A source without such names is split
by a fixed hash of each file's path (Parquet: of path and row): 1 in 10 is "test".

Crops are resized to img_size bilinearly (area-averaged when shrinking) by one
roi_align call per batch for images held as arrays (Fashion-MNIST), and bicubically
by PIL, one image at a time, for images decoded from files or bytes.

Pixels: float32 (B, in_chans, img_size, img_size), normalised with Fashion-MNIST's
mean/std (0.2860/0.3530) for fashion_mnist and with ImageNet's for the other
datasets (for in_chans=1, ImageNet's luminance-weighted mean/std). A grayscale
source feeds in_chans=3 by repeating its channel; RGB feeds in_chans=1 as luminance.
"""
from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import itertools
import math
import os
import re
import struct
import zlib
from collections.abc import Callable, Iterable, Iterator
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from torchvision.datasets.folder import find_classes, make_dataset
from torchvision.ops import roi_align
from torchvision.transforms.v2 import functional as TF

from trainers.config import TrainConfig
from trainers.filesystems import join, resolve_filesystem

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
SPLITS = ("train", "test")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")

FASHION_MNIST_MEAN, FASHION_MNIST_STD = 0.2860, 0.3530  # over its 60000 training images
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
LUMA = (0.299, 0.587, 0.114)  # ITU-R 601-2 weights, as PIL and torchvision convert RGB -> L

CROP_SCALE = (0.2, 1.0)  # MAE's RandomResizedCrop: fraction of the area, and aspect w/h
CROP_RATIO = (3 / 4, 4 / 3)


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected 'train' or 'test'")


def _split_by_hash(key: str) -> str:
    """The fixed split of a source without split names: 1 key in 10 is "test"."""
    return "test" if zlib.crc32(key.encode()) % 10 == 0 else "train"


# --------------------------------------------------------------------------- IDX files

_IDX_DTYPES = {0x08: "u1", 0x09: "i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def parse_idx(data: bytes, name: str) -> np.ndarray:
    """The array in IDX bytes: 0, 0, a type code, the number of dims, the dims as
    big-endian uint32, then the values big-endian. `name` is used in errors."""
    if len(data) < 4 or data[:2] != b"\0\0" or data[2] not in _IDX_DTYPES:
        raise ValueError(f"{name}: not an IDX file (magic number {data[:4].hex() or 'missing'})")
    ndim, header = data[3], 4 + 4 * data[3]
    if len(data) < header:
        raise ValueError(f"{name}: malformed IDX file: header of {ndim} dims cut short")
    dims = struct.unpack(f">{ndim}I", data[4:header])
    dtype = np.dtype(_IDX_DTYPES[data[2]])
    expected = header + math.prod(dims) * dtype.itemsize
    if len(data) != expected:
        raise ValueError(f"{name}: malformed IDX file: header says shape {dims} ({expected} bytes) "
                         f"but the file has {len(data)} bytes")
    return np.frombuffer(data, dtype, offset=header).reshape(dims).astype(dtype.newbyteorder("="))


def read_idx(uri: str) -> np.ndarray:
    """The array in an IDX file, gzip-compressed or plain, local or on S3."""
    fs, path = resolve_filesystem(uri)
    with fs.open_input_stream(path) as f:
        data = f.read()
    if data[:2] == b"\x1f\x8b":  # gzip's magic number
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError, zlib.error) as e:
            raise ValueError(f"{uri}: corrupt gzip data ({e})") from None
    return parse_idx(data, uri)


def _find_idx(root: str | None, stem: str) -> str:
    """The IDX file `stem`, .gz or plain, in `root` (default: the Debian package's folder)."""
    folder = root or FASHION_MNIST_DIR
    fs, path = resolve_filesystem(folder)
    for name in (stem + ".gz", stem):
        if fs.get_file_info(f"{path}/{name}").type == pafs.FileType.File:
            return join(folder, name)
    raise FileNotFoundError(
        f"Fashion-MNIST file not found: {join(folder, stem)}[.gz]; install the Debian package "
        f"dataset-fashion-mnist (apt-get install dataset-fashion-mnist) or set data_path "
        f"to a folder holding the IDX files")


def read_fashion_mnist(root: str | None = None,
                       split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """Fashion-MNIST's `split`: uint8 images (N, 28, 28) and int64 labels (N,)."""
    _check_split(split)
    prefix = "train" if split == "train" else "t10k"
    images = read_idx(_find_idx(root, f"{prefix}-images-idx3-ubyte"))
    labels = read_idx(_find_idx(root, f"{prefix}-labels-idx1-ubyte"))
    if images.dtype != np.uint8 or images.ndim != 3 or labels.shape != images.shape[:1]:
        raise ValueError(f"Fashion-MNIST {split} in {root or FASHION_MNIST_DIR}: expected uint8 "
                         f"images (N, H, W) and N labels, got {images.dtype} {images.shape} "
                         f"and labels {labels.shape}")
    return torch.from_numpy(images), torch.from_numpy(labels.astype(np.int64))


# --------------------------------------------------------------------------- sources

# A function from image sizes (B, 2) as (h, w) to crop boxes (B, 4) as (x1, y1, x2, y2).
BoxSampler = Callable[[torch.Tensor], torch.Tensor]


class ArrayImages:
    """Decoded images in memory, as one uint8 tensor (N, C, H, W)."""

    shard = None  # every worker holds all of it

    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        if images.ndim == 3:
            images = images.unsqueeze(1)
        elif images.ndim == 4 and images.shape[-1] == 3:
            images = images.permute(0, 3, 1, 2).contiguous()
        else:
            raise ValueError(f"images must be (N, H, W) or (N, H, W, 3), got {tuple(images.shape)}")
        self.pixels, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.labels)

    def crops(self, indices: torch.Tensor, boxes_for: BoxSampler, size: int) -> torch.Tensor:
        """The images at `indices` cropped to boxes_for(their sizes) and resized to
        size x size: float (B, C, size, size) in [0, 1], all in one roi_align call."""
        batch = self.pixels[indices].float().div_(255)
        sizes = torch.tensor([batch.shape[-2:]], dtype=torch.float32).expand(len(batch), 2)
        return resized_crops(batch, boxes_for(sizes), size)


class EncodedImages:
    """Images kept encoded, as file paths or PNG/JPEG bytes, and decoded with PIL on demand,
    as grayscale for in_chans=1 (luminance) and RGB for in_chans=3.

    `shard` is (rank, world_size) when these are the rows of one worker only.
    """

    def __init__(self, items: pa.ChunkedArray, labels: torch.Tensor, in_chans: int,
                 shard: tuple[int, int] | None = None):
        self.items, self.labels, self.shard = items, labels, shard
        self.mode = "L" if in_chans == 1 else "RGB"

    def __len__(self) -> int:
        return len(self.labels)

    def crops(self, indices: torch.Tensor, boxes_for: BoxSampler, size: int) -> torch.Tensor:
        """Like ArrayImages.crops, one image at a time: PIL crops and resizes (bicubic,
        antialiased) while the image is still uint8 and never pads it into a batch."""
        items = self.items.take(pa.array(indices.numpy())).to_pylist()
        with contextlib.ExitStack() as opened:
            images = [opened.enter_context(self._open(item, size)) for item in items]
            sizes = torch.tensor([(img.height, img.width) for img in images], dtype=torch.float32)
            boxes = boxes_for(sizes).tolist()
            crops = np.stack([np.asarray(img.convert(self.mode).resize(
                (size, size), Image.Resampling.BICUBIC, box=tuple(box), reducing_gap=3.0))
                for img, box in zip(images, boxes)])
        channels_last = torch.from_numpy(crops.reshape(len(crops), size, size, -1))
        return channels_last.permute(0, 3, 1, 2).float().div_(255)

    def _open(self, item: str | bytes, size: int) -> Image.Image:
        img = Image.open(io.BytesIO(item) if isinstance(item, bytes) else item)
        # A JPEG decodes at 1/2, 1/4 or 1/8 scale, several times faster, when both sides
        # stay >= size / sqrt(0.2 * 3/4) ~ 2.6 x size: then even the smallest random crop
        # (0.2 of the area at aspect 3:4) keeps at least the output's resolution.
        least = math.ceil(size / math.sqrt(CROP_SCALE[0] * CROP_RATIO[0]))
        img.draft(self.mode, (least, least))
        return img


def read_image_folder(root: str, split: str = "train", in_chans: int = 3) -> EncodedImages:
    """The `split` of an image folder, lazily: paths now, pixels when asked.

    Labels number the class folders (of `train/` when there are split folders)
    in alphabetical order, the same in both splits.
    """
    _check_split(split)
    if not os.path.isdir(root):
        raise FileNotFoundError(f"image folder not found: {root}")
    train_dir = os.path.join(root, "train")
    if os.path.isdir(train_dir):
        _, class_to_idx = find_classes(train_dir)
        split_dir = train_dir if split == "train" else _test_dir(root)
        samples = make_dataset(split_dir, class_to_idx, IMAGE_EXTENSIONS, allow_empty=True)
    else:
        _, class_to_idx = find_classes(root)
        samples = [(path, label) for path, label
                   in make_dataset(root, class_to_idx, IMAGE_EXTENSIONS, allow_empty=True)
                   if _split_by_hash(os.path.relpath(path, root)) == split]
    if not samples:
        raise FileNotFoundError(f"no {'/'.join(IMAGE_EXTENSIONS)} images of split {split!r} "
                                f"under {root}")
    paths, labels = zip(*samples)
    return EncodedImages(pa.chunked_array([pa.array(paths)]), torch.tensor(labels), in_chans)


def _test_dir(root: str) -> str:
    for name in ("val", "test"):
        if os.path.isdir(os.path.join(root, name)):
            return os.path.join(root, name)
    raise FileNotFoundError(f"image folder {root} has train/ but no val/ or test/ "
                            f"for the test split")


_SPLIT_NAME = re.compile(r"(?:^|/)(train|test|val|validation)(?=[/_.-]|$)")


def _split_of(relpath: str) -> str | None:
    """The split a Parquet file's path names, if any."""
    found = _SPLIT_NAME.search(relpath)
    return None if found is None else "train" if found.group(1) == "train" else "test"


def _parquet_files(fs: pafs.FileSystem, root: str, uri: str) -> list[str]:
    if fs.get_file_info(root).type != pafs.FileType.Directory:
        raise FileNotFoundError(f"Parquet folder not found: {uri}")
    infos = fs.get_file_info(pafs.FileSelector(root, recursive=True))
    files = sorted(i.path for i in infos if i.is_file and i.path.endswith(".parquet"))
    if not files:
        raise FileNotFoundError(f"no .parquet files under {uri}")
    return files


def _worker_rows(fs: pafs.FileSystem, files: list[str], rank: int,
                 world_size: int) -> list[tuple[str, int, int | None]]:
    """(file, first row, end row or None for all) pieces that worker `rank` reads."""
    if len(files) >= world_size:
        return [(path, 0, None) for path in files[rank::world_size]]
    # Fewer files than workers: split the rows of all files into equal ranges.
    counts = [pq.read_metadata(path, filesystem=fs).num_rows for path in files]
    total = sum(counts)
    lo, hi = total * rank // world_size, total * (rank + 1) // world_size
    pieces, offset = [], 0
    for path, count in zip(files, counts):
        start, stop = max(lo - offset, 0), min(hi - offset, count)
        if start < stop:
            pieces.append((path, start, stop))
        offset += count
    return pieces


def _read_rows(fs: pafs.FileSystem, path: str, start: int, stop: int | None) -> pa.Table:
    """Columns image and label of rows [start, stop) of a Parquet file, reading only
    the row groups they touch; the image column as large_binary, labels as int64."""
    with fs.open_input_file(path) as f:
        pf = pq.ParquetFile(f)
        missing = {"image", "label"} - set(pf.schema_arrow.names)
        if missing:
            raise ValueError(f"{path}: Parquet file lacks column(s) {sorted(missing)}; "
                             f"it has {pf.schema_arrow.names}")
        sizes = [pf.metadata.row_group(g).num_rows for g in range(pf.metadata.num_row_groups)]
        stop = pf.metadata.num_rows if stop is None else stop
        ends = list(itertools.accumulate(sizes))
        groups = [g for g, end in enumerate(ends) if end > start and end - sizes[g] < stop]
        first = ends[groups[0]] - sizes[groups[0]] if groups else start
        table = pf.read_row_groups(groups, columns=["image", "label"])
    table = table.slice(start - first, stop - start)
    image = table["image"]
    if pa.types.is_struct(image.type) and image.type.get_field_index("bytes") >= 0:
        image = pc.struct_field(image, "bytes")  # HF datasets' Image feature: {bytes, path}
    if not (pa.types.is_binary(image.type) or pa.types.is_large_binary(image.type)):
        raise ValueError(f"{path}: column image must hold encoded image bytes "
                         f"(or a struct with a bytes field), not {image.type}")
    labels = table["label"].cast(pa.int64())
    return pa.table({"image": image.cast(pa.large_binary()), "label": labels})


def read_parquet(uri: str, split: str = "train", rank: int = 0, world_size: int = 1,
                 in_chans: int = 3) -> EncodedImages:
    """Worker `rank`'s share of the `split` of the Parquet files under `uri`.

    Files are taken in path order. With at least as many files as workers, worker
    r reads files r, r + world_size, ...; otherwise it reads the r-th of
    world_size equal ranges of all rows. The shares are disjoint and together
    cover the split. Rows stay encoded in memory (about the size of their files).
    """
    _check_split(split)
    fs, root = resolve_filesystem(uri)
    files = _parquet_files(fs, root, uri)
    named = {path: _split_of(path[len(root) + 1:]) for path in files}
    by_hash = not any(named.values())
    if not by_hash:
        files = [path for path in files if named[path] == split]
        if not files:
            names = "train" if split == "train" else "test, val or validation"
            raise FileNotFoundError(f"no Parquet files of split {split!r} under {uri} "
                                    f"(looked for paths naming {names})")
    tables = []
    for path, start, stop in _worker_rows(fs, files, rank, world_size):
        table = _read_rows(fs, path, start, stop)
        if by_hash:
            rel = path[len(root) + 1:]
            rows = range(start, start + len(table))
            keep = [_split_by_hash(f"{rel}#{row}") == split for row in rows]
            table = table.filter(pa.array(keep, pa.bool_()))
        tables.append(table)
    if sum(map(len, tables)) == 0:
        raise ValueError(f"worker {rank} of {world_size} got no rows of split {split!r} from {uri}")
    rows = pa.concat_tables(tables)
    labels = torch.tensor(rows["label"].to_numpy())
    return EncodedImages(rows["image"], labels, in_chans, shard=(rank, world_size))


Source = ArrayImages | EncodedImages


def open_source(cfg: TrainConfig, split: str, rank: int = 0, world_size: int = 1) -> Source:
    """The images of `split` of cfg's dataset; for parquet, only worker `rank`'s share."""
    if cfg.dataset == "fashion_mnist":
        return ArrayImages(*read_fashion_mnist(cfg.data_path, split))
    if cfg.dataset == "image_folder":
        return read_image_folder(cfg.data_path, split, cfg.in_chans)
    return read_parquet(cfg.data_path, split, rank, world_size, cfg.in_chans)


# --------------------------------------------------------------------------- transforms

def center_boxes(sizes: torch.Tensor, ratio: tuple[float, float] = (1.0, 1.0)) -> torch.Tensor:
    """Boxes (x1, y1, x2, y2) of the largest central crop of each image (sizes (B, 2)
    as (h, w)) whose aspect w/h lies in `ratio`; the default is a central square."""
    h, w = sizes.unbind(1)
    cw, ch = torch.minimum(w, h * ratio[1]), torch.minimum(h, w / ratio[0])
    x1, y1 = (w - cw) / 2, (h - ch) / 2
    return torch.stack([x1, y1, x1 + cw, y1 + ch], 1)


def random_resized_boxes(sizes: torch.Tensor, gen: torch.Generator,
                         scale: tuple[float, float] = CROP_SCALE,
                         ratio: tuple[float, float] = CROP_RATIO,
                         attempts: int = 10) -> torch.Tensor:
    """RandomResizedCrop's boxes (x1, y1, x2, y2) for images of sizes (B, 2) as (h, w).

    torchvision's sampling, for the whole batch at once: up to `attempts` draws of
    an area fraction uniform in `scale` and an aspect log-uniform in `ratio`; the
    first that fits is placed uniformly, and an image where none fits gets the
    central crop of clamped aspect. Boxes are not rounded to whole pixels.
    """
    h, w = sizes[:, :1], sizes[:, 1:]
    area = h * w * torch.empty(len(sizes), attempts).uniform_(*scale, generator=gen)
    log_ratio = torch.empty(len(sizes), attempts).uniform_(*map(math.log, ratio), generator=gen)
    cw, ch = (area * log_ratio.exp()).sqrt(), (area / log_ratio.exp()).sqrt()
    fits = (cw <= w) & (ch <= h)
    first = fits.int().argmax(1, keepdim=True)  # index of the first attempt that fits
    cw, ch = cw.gather(1, first), ch.gather(1, first)
    x1 = torch.rand(len(sizes), 1, generator=gen) * (w - cw)
    y1 = torch.rand(len(sizes), 1, generator=gen) * (h - ch)
    boxes = torch.cat([x1, y1, x1 + cw, y1 + ch], 1)
    return torch.where(fits.any(1, keepdim=True), boxes, center_boxes(sizes, ratio))


def resized_crops(batch: torch.Tensor, boxes: torch.Tensor, size: int) -> torch.Tensor:
    """Each image of `batch` cropped to its box and resized to size x size, in one call.

    roi_align interpolates bilinearly and, with sampling_ratio=-1, averages about
    (box side / size)^2 samples per output pixel, so shrinking is antialiased like an
    area filter; aligned=True puts pixel centres at +0.5, so (0, 0, w, h) is the
    whole image exactly.
    """
    rois = torch.cat([torch.arange(len(boxes), dtype=boxes.dtype)[:, None], boxes], 1)
    return roi_align(batch, rois, (size, size), spatial_scale=1.0, sampling_ratio=-1, aligned=True)


def match_channels(x: torch.Tensor, in_chans: int) -> torch.Tensor:
    """Float images (B, C, H, W) with C made in_chans: 1 -> 3 repeats, 3 -> 1 takes luminance."""
    if x.shape[1] == in_chans:
        return x
    if x.shape[1] == 1 and in_chans == 3:
        return x.expand(-1, 3, -1, -1)
    if x.shape[1] == 3 and in_chans == 1:
        return TF.rgb_to_grayscale(x)
    raise ValueError(f"cannot turn {x.shape[1]} channels into {in_chans}")


def normalization(cfg: TrainConfig) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel (mean, std) the model's inputs are normalised with (see module doc)."""
    if cfg.dataset == "fashion_mnist":
        return (FASHION_MNIST_MEAN,) * cfg.in_chans, (FASHION_MNIST_STD,) * cfg.in_chans
    if cfg.in_chans == 3:
        return IMAGENET_MEAN, IMAGENET_STD
    # The mean of luminance is exact; the std is an approximation, which is all it needs to be.
    return ((sum(map(math.prod, zip(LUMA, IMAGENET_MEAN))),),
            (sum(map(math.prod, zip(LUMA, IMAGENET_STD))),))


def _to_model_input(x: torch.Tensor, cfg: TrainConfig) -> torch.Tensor:
    # Channels are matched after resizing: both are linear, and the output is the smaller.
    mean, std = normalization(cfg)
    return TF.normalize(match_channels(x, cfg.in_chans), mean, std)


def augment_batch(source: Source, indices: torch.Tensor, cfg: TrainConfig,
                  gen: torch.Generator) -> torch.Tensor:
    """MAE's training augmentation of the images at `indices`: a random resized crop
    (area 0.2-1, aspect 3:4-4:3) to img_size and a horizontal flip with probability 1/2."""
    x = source.crops(indices, lambda sizes: random_resized_boxes(sizes, gen), cfg.img_size)
    flip = torch.rand(len(x), generator=gen) < 0.5
    return _to_model_input(torch.where(flip[:, None, None, None], x.flip(-1), x), cfg)


def eval_batch(source: Source, indices: torch.Tensor, cfg: TrainConfig) -> torch.Tensor:
    """No augmentation: the central square of each image at `indices`, resized to img_size."""
    return _to_model_input(source.crops(indices, center_boxes, cfg.img_size), cfg)


# --------------------------------------------------------------------------- training stream

_ORDER, _AUGMENT = 0, 1  # keep the epoch-order and augmentation random streams apart


def _generator(*key: int) -> torch.Generator:
    """A generator seeded by a hash of `key`, so neighbouring keys give unrelated streams."""
    digest = hashlib.blake2b(repr(key).encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little"))


class PretrainStream(IterableDataset):
    """Worker `rank`'s training micro-batches, forever, fixed by (cfg, rank, world_size).

    Yields (images float32 (B, in_chans, img_size, img_size), labels int64 (B,)) with
    B = cfg.worker_batch; optimizer step s consumes micro-batches s * accum_steps to
    s * accum_steps + accum_steps - 1.

    `start_step` counts OPTIMIZER steps, like cfg.steps and checkpoints: the stream
    starts at micro-batch start_step * cfg.accum_steps and yields exactly what an
    uninterrupted stream yields from there (for the same cfg and world_size).

    Order: the worker's images form an endless run of epochs, each a permutation
    seeded by (cfg.seed, epoch); micro-batch k holds positions k*B to k*B + B - 1 of
    that run, so a batch may straddle two epochs. Sources whole in every worker
    (fashion_mnist, image_folder) share one permutation per epoch, of which worker r
    takes the r-th of world_size equal slices (the n % world_size left over move
    with the next shuffle); Parquet workers hold disjoint rows and permute their own.
    Augmentation of micro-batch k draws from a generator seeded by (cfg.seed, rank, k).

    `source` replaces the dataset of cfg (tests, synthetic data).
    """

    def __init__(self, cfg: TrainConfig, rank: int, world_size: int, start_step: int = 0,
                 source: Source | None = None):
        if world_size != cfg.workers:
            raise ValueError(f"world_size {world_size} differs from cfg.workers {cfg.workers}, "
                             f"which sets the per-worker batch")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in 0..{world_size - 1}")
        self.cfg, self.rank, self.world_size = cfg, rank, world_size
        self.first_micro_step = start_step * cfg.accum_steps
        self.source = source if source is not None else open_source(cfg, "train", rank, world_size)
        if self.source.shard not in (None, (rank, world_size)):
            raise ValueError(f"source holds the rows of worker {self.source.shard}, "
                             f"not of {(rank, world_size)}")
        self.epoch_len = len(self.source) // (world_size if self.source.shard is None else 1)
        if self.epoch_len == 0:
            raise ValueError(f"{len(self.source)} training images cannot feed {world_size} workers")
        self._order: tuple[int, torch.Tensor] | None = None  # the last epoch's order, cached

    def epoch_order(self, epoch: int) -> torch.Tensor:
        """Source indices this worker visits in `epoch`, in order."""
        if self._order is None or self._order[0] != epoch:
            seed, n = self.cfg.seed, self.epoch_len
            if self.source.shard is None:
                perm = torch.randperm(len(self.source), generator=_generator(seed, _ORDER, epoch))
                order = perm[self.rank * n:(self.rank + 1) * n]
            else:
                order = torch.randperm(n, generator=_generator(seed, _ORDER, epoch, self.rank))
            self._order = (epoch, order)
        return self._order[1]

    def indices(self, micro_step: int) -> torch.Tensor:
        """Source indices of micro-batch `micro_step`, counted from the run's start."""
        size, length = self.cfg.worker_batch, self.epoch_len
        positions = torch.arange(micro_step * size, (micro_step + 1) * size)
        out = torch.empty(size, dtype=torch.long)
        for epoch in range(int(positions[0]) // length, int(positions[-1]) // length + 1):
            here = positions // length == epoch
            out[here] = self.epoch_order(epoch)[positions[here] % length]
        return out

    def batch(self, micro_step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Micro-batch `micro_step`: (images, labels)."""
        idx = self.indices(micro_step)
        if self.cfg.augment:
            gen = _generator(self.cfg.seed, _AUGMENT, self.rank, micro_step)
            return augment_batch(self.source, idx, self.cfg, gen), self.source.labels[idx]
        return eval_batch(self.source, idx, self.cfg), self.source.labels[idx]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        # Under a DataLoader with K processes, process j makes micro-batches j, j + K, ...
        # and the DataLoader hands them out round-robin, which is their order.
        info = get_worker_info()
        offset, stride = (0, 1) if info is None else (info.id, info.num_workers)
        for micro_step in itertools.count(self.first_micro_step + offset, stride):
            yield self.batch(micro_step)


def train_loader(cfg: TrainConfig, rank: int, world_size: int,
                 start_step: int = 0) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
    """PretrainStream, made by cfg.num_loader_workers background processes when > 0;
    the batches and their order are the same either way."""
    stream = PretrainStream(cfg, rank, world_size, start_step)
    if cfg.num_loader_workers == 0:
        return stream
    return DataLoader(stream, batch_size=None, num_workers=cfg.num_loader_workers)


# --------------------------------------------------------------------------- evaluation

def load_probe_sets(cfg: TrainConfig) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The probes' train and test subsets, picked by cfg.probe_seed (not the run's
    seed): every trial of a study, its seeds included, is probed on the same images."""
    return [load_eval_arrays(cfg, split, n, cfg.probe_seed)
            for split, n in (("train", cfg.probe_train_size), ("test", cfg.probe_eval_size))]


def load_eval_arrays(cfg: TrainConfig, split: str, n: int,
                     seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed subset of `split` ready for the model: (float (n, in_chans, S, S), int64 (n,)).

    The subset is the first n of a permutation seeded by `seed` (all images if there
    are fewer), without augmentation (see eval_batch). For parquet, this process
    reads the whole split.
    """
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    source = open_source(cfg, split)
    pick = torch.randperm(len(source), generator=torch.Generator().manual_seed(seed))[:n]
    # In chunks, so that only a few full-size images at a time are held as floats.
    images = torch.cat([eval_batch(source, part, cfg) for part in pick.split(256)])
    return images, source.labels[pick]
