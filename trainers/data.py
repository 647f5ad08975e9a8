"""Images for pretraining and evaluation: readers, batched transforms, a resumable stream.

Sources (`cfg.dataset`)
  fashion_mnist  IDX files (gzip-compressed or plain) in `data_path`, by default the
                 folder of the Debian package dataset-fashion-mnist; split "train"
                 (60000 images) or "test" (10000, the t10k files). Held in memory.
  image_folder   `root/<class>/*.png|jpg|jpeg` (torchvision's ImageFolder layout);
                 file paths are listed up front and pixels decoded per batch.
  parquet        `*.parquet` files under a local folder or `s3://bucket/prefix`, with
                 columns `image` (PNG/JPEG bytes, or a struct with a `bytes` field as
                 HF datasets write) and `label`. Each Ray Train worker streams only
                 its own rows, a row group at a time, holding at most
                 cfg.loader_buffer_mb of them (see PretrainStream), and decodes per batch.

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
import copy
import gzip
import hashlib
import io
import itertools
import math
import os
import re
import struct
import threading
import zlib
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import torch
from PIL import Image
from torchvision.datasets.folder import find_classes, make_dataset
from torchvision.ops import roi_align
from torchvision.transforms.v2 import functional as TF

from trainers.config import TrainConfig
from trainers.filesystems import join, resolve_filesystem
from trainers.loader import Prefetcher
from trainers.probe_cache import cached_table
from trainers.resources import loader_threads

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

PIXELS_KEY = b"pixels"  # table metadata of raw pixel rows: their shape "C,H,W"


def _first_of_permutation(count: int, n: int, gen: torch.Generator) -> torch.Tensor:
    return torch.randperm(count, generator=gen)[:n]


class _HeldWhole:
    """A source whose every image (or its path) is in memory, in every worker."""

    shard = None
    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.labels)

    def sample(self, n: int, gen: torch.Generator) -> torch.Tensor:
        """Indices of n images at random (all if there are fewer)."""
        return _first_of_permutation(len(self), n, gen)


class ArrayImages(_HeldWhole):
    """Decoded images in memory, as one uint8 tensor (N, C, H, W)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        if images.ndim == 3:
            images = images.unsqueeze(1)
        elif images.ndim == 4 and images.shape[-1] == 3:
            images = images.permute(0, 3, 1, 2).contiguous()
        else:
            raise ValueError(f"images must be (N, H, W) or (N, H, W, 3), got {tuple(images.shape)}")
        self.pixels, self.labels = images, labels

    def take(self, indices: torch.Tensor) -> ArrayImages:
        """The images at `indices`, as a source of their own."""
        part = copy.copy(self)
        part.pixels, part.labels = self.pixels[indices], self.labels[indices]
        return part

    def to_table(self) -> pa.Table:
        """Columns image (raw pixels) and label; the pixels' shape is in the metadata."""
        rows = self.pixels.flatten(1).numpy()
        table = pa.table({"image": pa.array(list(map(bytes, rows)), pa.large_binary()),
                          "label": pa.array(self.labels.numpy(), pa.int64())})
        return table.replace_schema_metadata({PIXELS_KEY: ",".join(map(str, self.pixels.shape[1:]))})

    def crops(self, indices: torch.Tensor, boxes_for: BoxSampler, size: int) -> torch.Tensor:
        """The images at `indices` cropped to boxes_for(their sizes) and resized to
        size x size: float (B, C, size, size) in [0, 1], all in one roi_align call."""
        batch = self.pixels[indices].float().div_(255)
        sizes = torch.tensor([batch.shape[-2:]], dtype=torch.float32).expand(len(batch), 2)
        return resized_crops(batch, boxes_for(sizes), size)


class EncodedImages(_HeldWhole):
    """Images kept encoded, as file paths or PNG/JPEG bytes, and decoded with PIL on demand,
    as grayscale for in_chans=1 (luminance) and RGB for in_chans=3: an image folder's
    paths, or rows taken from a Parquet stream.
    """

    def __init__(self, items: pa.ChunkedArray, labels: torch.Tensor, in_chans: int):
        self.items, self.labels = items, labels
        self.mode = "L" if in_chans == 1 else "RGB"

    def take(self, indices: torch.Tensor) -> EncodedImages:
        """The images at `indices`, still encoded, as a source of their own."""
        part = copy.copy(self)
        part.items, part.labels = self.items.take(pa.array(indices.numpy())), self.labels[indices]
        return part

    def to_table(self) -> pa.Table:
        """Columns image (encoded bytes; an image folder's files are read) and label."""
        encoded = [item if isinstance(item, bytes) else _file_bytes(item) for item in self.items.to_pylist()]
        return pa.table({"image": pa.array(encoded, pa.large_binary()),
                         "label": pa.array(self.labels.numpy(), pa.int64())})

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


def _file_bytes(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def table_source(table: pa.Table, in_chans: int) -> ArrayImages | EncodedImages:
    """The source a to_table() table holds (raw pixels when its metadata gives their shape)."""
    labels = torch.from_numpy(table["label"].to_numpy().astype(np.int64))
    shape = (table.schema.metadata or {}).get(PIXELS_KEY)
    if shape is None:
        return EncodedImages(table["image"], labels, in_chans)
    c, h, w = map(int, shape.decode().split(","))
    pixels = np.frombuffer(b"".join(table["image"].to_pylist()), np.uint8).reshape(len(table), c, h, w)
    return ArrayImages(torch.from_numpy(pixels.copy()).permute(0, 2, 3, 1).squeeze(-1), labels)


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


# --------------------------------------------------------------------------- Parquet

_SPLIT_NAME = re.compile(r"(?:^|/)(train|test|val|validation)(?=[/_.-]|$)")
METADATA_THREADS = 16  # footers are read in parallel: one request each, latency-bound on S3
PROBE_ROW_GROUPS = 16  # a sample spreads over at least this many row groups (when there are)
SUBSET_VERSION = 1  # of how fixed subsets are picked: cached subsets picked otherwise are not reused


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


def _worker_rows(files: list[str], counts: dict[str, int], rank: int,
                 world_size: int) -> list[tuple[str, int, int]]:
    """(file, first row, end row) pieces that worker `rank` reads."""
    if len(files) >= world_size:
        return [(path, 0, counts[path]) for path in files[rank::world_size]]
    # Fewer files than workers: split the rows of all files into equal ranges.
    total = sum(counts[path] for path in files)
    lo, hi = total * rank // world_size, total * (rank + 1) // world_size
    pieces, offset = [], 0
    for path in files:
        start, stop = max(lo - offset, 0), min(hi - offset, counts[path])
        if start < stop:
            pieces.append((path, start, stop))
        offset += counts[path]
    return pieces


@dataclass(frozen=True)
class RowGroup:
    """Rows of one Parquet row group that a reader keeps (its split, its worker's range)."""

    path: str
    index: int  # of the row group in its file
    rows: np.ndarray  # kept rows, counted from the row group's first
    nbytes: int  # uncompressed size of its image and label columns: what reading it holds


def _group_bytes(group: pq.RowGroupMetaData) -> int:
    columns = (group.column(c) for c in range(group.num_columns))
    return sum(c.total_uncompressed_size for c in columns
               if c.path_in_schema.split(".")[0] in ("image", "label"))


def _image_and_label(table: pa.Table, path: str) -> pa.Table:
    """Columns image as large_binary (HF datasets' {bytes, path} struct unwrapped) and label as int64."""
    image = table["image"]
    if pa.types.is_struct(image.type) and image.type.get_field_index("bytes") >= 0:
        image = pc.struct_field(image, "bytes")
    if not (pa.types.is_binary(image.type) or pa.types.is_large_binary(image.type)):
        raise ValueError(f"{path}: column image must hold encoded image bytes "
                         f"(or a struct with a bytes field), not {image.type}")
    return pa.table({"image": image.cast(pa.large_binary()), "label": table["label"].cast(pa.int64())})


class ParquetRows:
    """Rows of Parquet row groups, read when asked for and dropped when told to: a source
    larger than memory. Row i is the i-th kept row of the groups, in their order.
    `shard` is (rank, world_size) when these are the rows of one worker only.

    A group is read whole (Parquet's unit of reading), on a pool of I/O threads, and
    held until `hold` is called without it. `held_bytes` and `peak_bytes` count the
    groups held (or being read) by their uncompressed size.
    """

    def __init__(self, fs: pafs.FileSystem, groups: list[RowGroup], in_chans: int,
                 shard: tuple[int, int] | None = None, io_threads: int = 4):
        self.fs, self.groups, self.in_chans, self.shard = fs, groups, in_chans, shard
        self.starts = np.cumsum([0] + [len(g.rows) for g in groups])
        self._io = ThreadPoolExecutor(io_threads, thread_name_prefix="parquet-io")
        self._held: dict[int, Future] = {}
        self.peak_bytes = 0
        self.groups_read = 0  # counted by the I/O threads, under the lock
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return int(self.starts[-1])

    def group_rows(self, group: int) -> torch.Tensor:
        """Indices of the rows of `group`."""
        return torch.arange(int(self.starts[group]), int(self.starts[group + 1]))

    @property
    def held_bytes(self) -> int:
        return sum(self.groups[g].nbytes for g in self._held)

    def hold(self, groups: Iterable[int]) -> None:
        """Start reading `groups` that are not held yet; drop every other group."""
        keep = set(groups)
        for g in [g for g in self._held if g not in keep]:
            self._held.pop(g).cancel()
        for g in keep:
            self._read_soon(g)

    def _read_soon(self, group: int) -> Future:
        if group not in self._held:
            self._held[group] = self._io.submit(self._read, group)
            self.peak_bytes = max(self.peak_bytes, self.held_bytes)
        return self._held[group]

    def _read(self, group: int) -> pa.Table:
        g = self.groups[group]
        with self.fs.open_input_file(g.path) as f:
            table = pq.ParquetFile(f).read_row_group(g.index, columns=["image", "label"])
        with self._lock:
            self.groups_read += 1
        table = _image_and_label(table, g.path)
        return table if len(g.rows) == len(table) else table.take(pa.array(g.rows))

    def sample(self, n: int, gen: torch.Generator) -> torch.Tensor:
        """Indices of n rows at random (all if there are fewer), from row groups picked at
        random: as few as hold n rows, but PROBE_ROW_GROUPS at least. Taking them reads
        only the groups that hold one, so the cost is bounded by n, not by the dataset;
        rows of a dataset whose files are sorted by class cover the groups' classes only."""
        picked, rows = [], 0
        for g in torch.randperm(len(self.groups), generator=gen).tolist():
            if rows >= n and len(picked) >= PROBE_ROW_GROUPS:
                break
            picked.append(g)
            rows += len(self.groups[g].rows)
        candidates = torch.cat([self.group_rows(g) for g in sorted(picked)])
        return candidates[_first_of_permutation(len(candidates), n, gen)]

    def take(self, indices: torch.Tensor) -> EncodedImages:
        """The rows at `indices`, in memory; groups not held are read and stay held."""
        idx = indices.numpy()
        groups = np.searchsorted(self.starts, idx, side="right") - 1
        images, labels = [None] * len(idx), np.empty(len(idx), np.int64)
        reads = {int(g): self._read_soon(int(g)) for g in np.unique(groups)}  # in parallel
        for g, read in reads.items():
            table = read.result()
            where = np.flatnonzero(groups == g)
            part = table.take(pa.array(idx[where] - self.starts[g]))
            for i, item in zip(where, part["image"].to_pylist()):
                images[i] = item
            labels[where] = part["label"].to_numpy()
        return EncodedImages(pa.chunked_array([pa.array(images, pa.large_binary())]),
                             torch.from_numpy(labels), self.in_chans)


def read_parquet(uri: str, split: str = "train", rank: int = 0, world_size: int = 1,
                 in_chans: int = 3) -> ParquetRows:
    """Worker `rank`'s share of the `split` of the Parquet files under `uri`, as row
    groups to read when needed; only the files' footers are read here.

    Files are taken in path order. With at least as many files as workers, worker
    r reads files r, r + world_size, ...; otherwise it reads the r-th of
    world_size equal ranges of all rows. The shares are disjoint and together
    cover the split.
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
    mine = files[rank::world_size] if len(files) >= world_size else files
    with ThreadPoolExecutor(METADATA_THREADS) as pool:
        footers = dict(zip(mine, pool.map(lambda path: pq.read_metadata(path, filesystem=fs), mine)))
    for path, footer in footers.items():
        names = footer.schema.to_arrow_schema().names
        if {"image", "label"} - set(names):
            raise ValueError(f"{path}: Parquet file lacks column(s) {sorted({'image', 'label'} - set(names))}; "
                             f"it has {names}")
    groups = []
    counts = {path: footer.num_rows for path, footer in footers.items()}
    for path, start, stop in _worker_rows(files, counts, rank, world_size):
        first = 0
        for index in range(footers[path].num_row_groups):
            meta = footers[path].row_group(index)
            rows = np.arange(max(start, first), min(stop, first + meta.num_rows))
            if by_hash:
                rel = path[len(root) + 1:]
                rows = rows[np.array([_split_by_hash(f"{rel}#{row}") == split for row in rows], bool)]
            if len(rows):
                groups.append(RowGroup(path, index, rows - first, _group_bytes(meta)))
            first += meta.num_rows
    if not groups:
        raise ValueError(f"worker {rank} of {world_size} got no rows of split {split!r} from {uri}")
    return ParquetRows(fs, groups, in_chans, shard=(rank, world_size))


Source = ArrayImages | EncodedImages | ParquetRows


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
DEFAULT_LOADER_BUFFER_MB = 1024.0


def _generator(*key: int) -> torch.Generator:
    """A generator seeded by a hash of `key`, so neighbouring keys give unrelated streams."""
    digest = hashlib.blake2b(repr(key).encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little"))


def loader_buffer_bytes(cfg: TrainConfig) -> int:
    return int((cfg.loader_buffer_mb or DEFAULT_LOADER_BUFFER_MB) * 2 ** 20)


@dataclass(frozen=True)
class _Epoch:
    """A worker's epoch: the source indices it visits in order, cut into windows whose
    rows are held in memory together (one window for a source held whole)."""

    order: torch.Tensor
    ends: np.ndarray  # position just after each window
    groups: list[list[int]]  # the row groups each window reads

    def window_of(self, position: int) -> int:
        return int(np.searchsorted(self.ends, position, side="right"))


class PretrainStream:
    """Worker `rank`'s training micro-batches, forever, fixed by (cfg, rank, world_size).

    Yields (images float32 (B, in_chans, img_size, img_size), labels int64 (B,)) with
    B = cfg.worker_batch; optimizer step s consumes micro-batches s * accum_steps to
    s * accum_steps + accum_steps - 1.

    `start_step` counts OPTIMIZER steps, like cfg.steps and checkpoints: the stream
    starts at micro-batch start_step * cfg.accum_steps and yields exactly what an
    uninterrupted stream yields from there (for the same cfg and world_size).

    Order: the worker's images form an endless run of epochs; micro-batch k holds
    positions k*B to k*B + B - 1 of that run, so a batch may straddle two epochs.
    Sources whole in every worker (fashion_mnist, image_folder) share one permutation
    per epoch, seeded by (cfg.seed, epoch), of which worker r takes the r-th of
    world_size equal slices (the n % world_size left over move with the next shuffle).
    Parquet workers stream disjoint rows that need not fit in memory: an epoch visits
    the worker's row groups in a permutation seeded by (cfg.seed, epoch, rank), cut
    into windows of consecutive groups of at most half of cfg.loader_buffer_mb, and
    permutes the rows inside each window (a shuffle buffer, like WebDataset's or Ray
    Data's local shuffle, but fixed by the seed, so a restart can jump to any batch).
    The stream holds the windows of the batch it makes and reads the next one ahead:
    two windows, at most loader_buffer_mb, are held (a row group larger than half of
    it is a window of its own; a window should hold at least a micro-batch).
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
        self.streamed = isinstance(self.source, ParquetRows)
        self.epoch_len = len(self.source) // (world_size if self.source.shard is None else 1)
        if self.epoch_len == 0:
            raise ValueError(f"{len(self.source)} training images cannot feed {world_size} workers")
        self._epochs: dict[int, _Epoch] = {}  # the last two asked for: a batch may straddle them

    def epoch(self, epoch: int) -> _Epoch:
        if epoch not in self._epochs:
            if len(self._epochs) == 2:
                del self._epochs[min(self._epochs)]
            self._epochs[epoch] = self._windows(epoch) if self.streamed else self._whole(epoch)
        return self._epochs[epoch]

    def _whole(self, epoch: int) -> _Epoch:
        n = self.epoch_len
        perm = torch.randperm(len(self.source), generator=_generator(self.cfg.seed, _ORDER, epoch))
        return _Epoch(perm[self.rank * n:(self.rank + 1) * n], np.array([n]), [[]])

    def _windows(self, epoch: int) -> _Epoch:
        groups, gen = self.source.groups, _generator(self.cfg.seed, _ORDER, epoch, self.rank)
        budget, windows, size = loader_buffer_bytes(self.cfg) / 2, [[]], 0
        for g in torch.randperm(len(groups), generator=gen).tolist():
            if windows[-1] and size + groups[g].nbytes > budget:
                windows.append([])
                size = 0
            windows[-1].append(g)
            size += groups[g].nbytes
        rows = [torch.cat([self.source.group_rows(g) for g in window]) for window in windows]
        order = torch.cat([r[torch.randperm(len(r), generator=gen)] for r in rows])
        return _Epoch(order, np.cumsum([len(r) for r in rows]), windows)

    def indices(self, micro_step: int) -> torch.Tensor:
        """Source indices of micro-batch `micro_step`, counted from the run's start."""
        size, length = self.cfg.worker_batch, self.epoch_len
        positions = torch.arange(micro_step * size, (micro_step + 1) * size)
        out = torch.empty(size, dtype=torch.long)
        for epoch in range(int(positions[0]) // length, int(positions[-1]) // length + 1):
            here = positions // length == epoch
            out[here] = self.epoch(epoch).order[positions[here] % length]
        return out

    def _groups_to_hold(self, micro_step: int) -> set[int]:
        """Row groups of the windows micro-batch `micro_step` lies in, and of the window
        after them when it lies in one only (read ahead)."""
        size, length = self.cfg.worker_batch, self.epoch_len
        first, last = micro_step * size, (micro_step + 1) * size - 1
        windows = []
        for epoch in range(first // length, last // length + 1):
            start, stop = max(first, epoch * length), min(last, (epoch + 1) * length - 1)
            ep = self.epoch(epoch)
            windows += [(epoch, w) for w in range(ep.window_of(start % length), ep.window_of(stop % length) + 1)]
        if len(windows) == 1:
            epoch, w = windows[0]
            windows.append((epoch, w + 1) if w + 1 < len(self.epoch(epoch).groups) else (epoch + 1, 0))
        return {g for epoch, w in windows for g in self.epoch(epoch).groups[w]}

    def rows(self, micro_step: int) -> Source:
        """The images of micro-batch `micro_step`, in memory, in batch order. A Parquet
        stream holds their windows and drops the others: ask in order (the training
        loop and trainers.loader do), or windows are read again."""
        if self.streamed:
            self.source.hold(self._groups_to_hold(micro_step))
        return self.source.take(self.indices(micro_step))

    def make(self, micro_step: int, rows: Source) -> tuple[torch.Tensor, torch.Tensor]:
        """Micro-batch `micro_step` from its rows: (images, labels). Safe to call from
        several threads at once."""
        every = torch.arange(len(rows))
        if self.cfg.augment:
            gen = _generator(self.cfg.seed, _AUGMENT, self.rank, micro_step)
            return augment_batch(rows, every, self.cfg, gen), rows.labels
        return eval_batch(rows, every, self.cfg), rows.labels

    def batch(self, micro_step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Micro-batch `micro_step`: (images, labels)."""
        return self.make(micro_step, self.rows(micro_step))

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for micro_step in itertools.count(self.first_micro_step):
            yield self.batch(micro_step)


def train_loader(cfg: TrainConfig, rank: int, world_size: int,
                 start_step: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """PretrainStream's batches from `start_step` on, made ahead of the training step by
    background threads (trainers.loader; how many: trainers.resources.loader_threads),
    or in the caller's thread when there are none; the batches and their order are the
    same either way. Call close() on it when done."""
    stream, threads = PretrainStream(cfg, rank, world_size, start_step), loader_threads(cfg)
    return Prefetcher(stream, threads) if threads else iter(stream)


# --------------------------------------------------------------------------- evaluation

def eval_arrays(rows: Source, cfg: TrainConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Images held in memory, ready for the model: (float (n, in_chans, S, S), int64 (n,)),
    without augmentation (see eval_batch)."""
    every = torch.arange(len(rows))
    # In chunks, so that only a few full-size images at a time are held as floats.
    return torch.cat([eval_batch(rows, part, cfg) for part in every.split(256)]), rows.labels


def _subset(cfg: TrainConfig, split: str, n: int, seed: int) -> Source:
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    source = open_source(cfg, split)
    return source.take(source.sample(n, torch.Generator().manual_seed(seed)))


def load_eval_arrays(cfg: TrainConfig, split: str, n: int,
                     seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed subset of `split` ready for the model (see eval_arrays): n images picked at
    random by `seed` (all if there are fewer). Of a Parquet split only the row groups
    the subset lies in are read (see ParquetRows.sample)."""
    return eval_arrays(_subset(cfg, split, n, seed), cfg)


def load_probe_sets(cfg: TrainConfig, cache: tuple[pafs.FileSystem, str] | None = None
                    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The probes' train and test subsets, picked by cfg.probe_seed (not the run's
    seed): every trial of a study, its seeds included, is probed on the same images.

    With `cache` (a filesystem and a folder in it), each subset is read from the dataset
    by the first trial only and kept there, still encoded (so trials that differ in
    img_size or in_chans share it); the other trials read that file alone.
    """
    subsets = []
    for split, n in (("train", cfg.probe_train_size), ("test", cfg.probe_eval_size)):
        if cache is None:
            rows = _subset(cfg, split, n, cfg.probe_seed)
        else:
            key = {"dataset": cfg.dataset, "data_path": cfg.data_path or FASHION_MNIST_DIR,
                   "split": split, "n": n, "seed": cfg.probe_seed, "picked_by": SUBSET_VERSION}
            table = cached_table(*cache, f"{split}-{n}", key,
                                 lambda: _subset(cfg, split, n, cfg.probe_seed).to_table())
            rows = table_source(table, cfg.in_chans)
        subsets.append(eval_arrays(rows, cfg))
    return subsets
