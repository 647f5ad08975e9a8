"""Readers, transforms, the resumable stream and evaluation arrays of trainers.data."""
from __future__ import annotations

import gzip
import io
import os
import struct

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from trainers import data
from trainers.config import TrainConfig
from trainers.filesystems import join, resolve_filesystem, s3_endpoint


def cfg_of(**overrides) -> TrainConfig:
    return TrainConfig(**{"batch_size": 16, "img_size": 32, "patch_size": 2, **overrides})


def png_bytes(array: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(array).save(out, format="PNG")
    return out.getvalue()


def numbered_images(n: int, size: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """n grayscale images whose pixels all equal their index (mod 256), labelled by index."""
    images = torch.arange(n, dtype=torch.uint8)[:, None, None].expand(n, size, size).contiguous()
    return images, torch.arange(n)


@pytest.fixture(scope="module")
def fashion_train():
    return data.read_fashion_mnist(split="train")


# --------------------------------------------------------------------------- Fashion-MNIST / IDX

def test_fashion_mnist_train_has_6000_images_per_class(fashion_train):
    images, labels = fashion_train
    assert images.shape == (60000, 28, 28) and images.dtype == torch.uint8
    assert labels.dtype == torch.int64 and int(labels.min()) == 0 and int(labels.max()) == 9
    assert torch.bincount(labels).tolist() == [6000] * 10


def test_fashion_mnist_test_split_is_the_t10k_files():
    images, labels = data.read_fashion_mnist(split="test")
    assert images.shape == (10000, 28, 28)
    assert torch.bincount(labels).tolist() == [1000] * 10


def test_fashion_mnist_missing_files_name_the_debian_package(tmp_path):
    with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist") as err:
        data.read_fashion_mnist(str(tmp_path))
    assert str(tmp_path) in str(err.value)


def test_unknown_split_is_refused():
    with pytest.raises(ValueError, match="unknown split 'validation'"):
        data.read_fashion_mnist(split="validation")


def idx_bytes(array: np.ndarray, code: int = 0x08) -> bytes:
    header = bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.tobytes()


def test_idx_reader_reads_plain_and_gzip_files(tmp_path):
    array = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    (tmp_path / "a-idx3-ubyte").write_bytes(idx_bytes(array))
    (tmp_path / "a-idx3-ubyte.gz").write_bytes(gzip.compress(idx_bytes(array)))
    wide = np.array([1, -2, 300], dtype=">i2")  # values are big-endian in IDX files
    (tmp_path / "b-idx1").write_bytes(idx_bytes(wide, code=0x0B))
    assert np.array_equal(data.read_idx(str(tmp_path / "a-idx3-ubyte")), array)
    assert np.array_equal(data.read_idx(str(tmp_path / "a-idx3-ubyte.gz")), array)
    assert data.read_idx(str(tmp_path / "b-idx1")).tolist() == [1, -2, 300]


@pytest.mark.parametrize("content, message", [
    (b"\x89PNG\r\n\x1a\n", "not an IDX file"),
    (bytes([0, 0, 8, 3, 0, 0]), "header of 3 dims cut short"),
    (idx_bytes(np.zeros((4, 28, 28), np.uint8))[:-10], r"shape \(4, 28, 28\)"),
    (gzip.compress(b"\0\0\x08\x01\0\0\0\x05abcde")[:-12], "corrupt gzip"),
])
def test_malformed_idx_file_is_refused_naming_it(tmp_path, content, message):
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=message) as err:
        data.read_idx(str(path))
    assert str(path) in str(err.value) and "\n" not in str(err.value)


# --------------------------------------------------------------------------- transforms

def test_whole_image_at_its_own_size_is_unchanged():
    images = torch.randint(0, 256, (3, 1, 7, 7), dtype=torch.uint8)
    source = data.ArrayImages(images[:, 0], torch.zeros(3))
    out = source.crops(torch.arange(3), data.center_boxes, 7)
    assert torch.allclose(out, images.float() / 255, atol=1e-6)


def test_random_boxes_follow_mae_scale_and_aspect():
    sizes = torch.tensor([[28.0, 28.0], [40.0, 20.0]]).repeat(500, 1)
    boxes = data.random_resized_boxes(sizes, torch.Generator().manual_seed(0))
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    assert (boxes[:, :2] >= 0).all() and (boxes[:, 2] <= sizes[:, 1] + 1e-4).all()
    assert (boxes[:, 3] <= sizes[:, 0] + 1e-4).all()
    area = w * h / (sizes[:, 0] * sizes[:, 1])
    assert area.min() >= 0.2 - 1e-4 and area.max() <= 1 + 1e-4
    assert (w / h).min() >= 3 / 4 - 1e-4 and (w / h).max() <= 4 / 3 + 1e-4
    assert area.std() > 0.1  # actually random


def test_augmentation_shape_range_and_reproducibility(fashion_train):
    cfg = cfg_of(img_size=32)
    source, first = data.ArrayImages(*fashion_train), torch.arange(16)
    out = data.augment_batch(source, first, cfg, torch.Generator().manual_seed(1))
    again = data.augment_batch(source, first, cfg, torch.Generator().manual_seed(1))
    other = data.augment_batch(source, first, cfg, torch.Generator().manual_seed(2))
    assert out.shape == (16, 1, 32, 32) and out.dtype == torch.float32
    mean, std = data.FASHION_MNIST_MEAN, data.FASHION_MNIST_STD
    assert out.min() >= -mean / std - 1e-5 and out.max() <= (1 - mean) / std + 1e-5
    assert torch.equal(out, again) and not torch.equal(out, other)


def test_gray_source_feeds_three_channels_by_repeating():
    source = data.ArrayImages(*numbered_images(4))
    out = data.eval_batch(source, torch.arange(4), cfg_of(in_chans=3))
    assert out.shape == (4, 3, 32, 32)
    assert torch.equal(out[:, 0], out[:, 1]) and torch.equal(out[:, 0], out[:, 2])
    expected = (torch.arange(4) / 255 - data.FASHION_MNIST_MEAN) / data.FASHION_MNIST_STD
    assert torch.allclose(out[:, 0, 5, 5], expected, atol=1e-5)


def test_rgb_source_feeds_one_channel_as_luminance():
    red = torch.zeros(2, 10, 12, 3, dtype=torch.uint8)
    red[..., 0] = 255
    cfg = cfg_of(dataset="image_folder", data_path="unused", in_chans=1, img_size=8)
    out = data.eval_batch(data.ArrayImages(red, torch.zeros(2)), torch.arange(2), cfg)
    (mean,), (std,) = data.normalization(cfg)
    assert out.shape == (2, 1, 8, 8)
    assert torch.allclose(out, torch.full_like(out, (0.2989 - mean) / std), atol=1e-3)


def test_encoded_images_of_mixed_sizes_give_their_central_square():
    wide = np.zeros((4, 8), np.uint8)
    wide[:, 2:6] = 255  # the central 4 x 4 square is white, the sides black
    tall = np.full((6, 4), 255, np.uint8)
    encoded = pa.chunked_array([[png_bytes(wide), png_bytes(tall)]])
    source = data.EncodedImages(encoded, torch.zeros(2), in_chans=3)
    out = data.eval_batch(source, torch.arange(2), cfg_of(img_size=4, in_chans=3))
    assert out.shape == (2, 3, 4, 4)
    white = (1 - data.FASHION_MNIST_MEAN) / data.FASHION_MNIST_STD
    assert torch.allclose(out, torch.full_like(out, white))


# --------------------------------------------------------------------------- training stream

def test_stream_resumes_with_the_batches_it_would_have_seen():
    cfg = cfg_of(workers=2, batch_size=16, accum_steps=2)  # 4 images per micro-batch
    source = data.ArrayImages(*numbered_images(50))
    fresh = data.PretrainStream(cfg, 1, 2, source=source)
    first = [b for b, _ in zip(fresh, range(12))]
    resumed = data.PretrainStream(cfg, 1, 2, start_step=3, source=source)
    # start_step counts optimizer steps: step 3 starts at micro-batch 3 * accum_steps = 6.
    for (images, labels), (want_images, want_labels) in zip(resumed, first[6:]):
        assert torch.equal(images, want_images) and torch.equal(labels, want_labels)


def test_workers_see_disjoint_parts_of_each_epoch_and_epochs_reshuffle():
    cfg = cfg_of(workers=2, batch_size=10)  # 5 per worker; 50 images -> 25 per worker per epoch
    source = data.ArrayImages(*numbered_images(50))
    streams = [data.PretrainStream(cfg, rank, 2, source=source) for rank in range(2)]
    epochs = [[torch.cat([s.indices(k) for k in range(e * 5, e * 5 + 5)]) for e in range(2)]
              for s in streams]
    for e in range(2):
        seen = torch.cat([epochs[0][e], epochs[1][e]])
        assert sorted(seen.tolist()) == list(range(50))  # disjoint and complete
    assert not torch.equal(epochs[0][0], epochs[0][1])
    assert sorted(epochs[0][0].tolist()) != sorted(epochs[0][1].tolist())  # not a fixed shard


def test_batches_straddle_epochs_and_labels_follow_images():
    cfg = cfg_of(batch_size=8, augment=False, img_size=8)
    stream = data.PretrainStream(cfg, 0, 1, source=data.ArrayImages(*numbered_images(12)))
    seen = torch.cat([stream.indices(k) for k in range(3)])  # 24 positions = two epochs
    assert sorted(seen[:12].tolist()) == sorted(seen[12:].tolist()) == list(range(12))
    images, labels = stream.batch(1)
    expected = (labels.float() / 255 - data.FASHION_MNIST_MEAN) / data.FASHION_MNIST_STD
    assert torch.allclose(images[:, 0, 4, 4], expected, atol=1e-5)


def test_loader_threads_give_the_stream_s_batches_in_order():
    cfg = cfg_of(batch_size=8, num_loader_workers=2)
    stream = data.PretrainStream(cfg, 0, 1, start_step=2)
    loader = data.train_loader(cfg, 0, 1, start_step=2)
    for k, (images, labels) in zip(range(2, 12), loader):
        want_images, want_labels = stream.batch(k)
        assert images.shape == (8, 1, 32, 32) and labels.shape == (8,)
        assert torch.equal(images, want_images) and torch.equal(labels, want_labels)
    loader.close()


# --------------------------------------------------------------------------- image folders

def write_folder(root, classes=("cat", "dog"), per_class=3, size=(10, 14)):
    for c, name in enumerate(classes):
        os.makedirs(root / name, exist_ok=True)
        for i in range(per_class):
            array = np.full((*size, 3), 40 * c + i, np.uint8)
            Image.fromarray(array).save(root / name / f"{i}.{'png' if i % 2 else 'jpg'}")


def test_image_folder_with_train_and_val(tmp_path):
    write_folder(tmp_path / "train", per_class=3)
    write_folder(tmp_path / "val", per_class=1)
    train = data.read_image_folder(str(tmp_path), "train", in_chans=3)
    val = data.read_image_folder(str(tmp_path), "test", in_chans=1)
    assert len(train) == 6 and train.labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert len(val) == 2 and val.labels.tolist() == [0, 1]
    images = train.crops(torch.tensor([0, 4]), data.center_boxes, 5)
    assert images.shape == (2, 3, 5, 5)
    assert torch.allclose(images[1] * 255, torch.tensor(41.0), atol=2)  # dog #1, a PNG
    assert val.crops(torch.tensor([1]), data.center_boxes, 5).shape == (1, 1, 5, 5)


def test_image_folder_without_split_folders_is_hash_split(tmp_path):
    write_folder(tmp_path, per_class=20, size=(4, 4))
    train = data.read_image_folder(str(tmp_path), "train")
    test = data.read_image_folder(str(tmp_path), "test")
    paths = set(train.items.to_pylist()) | set(test.items.to_pylist())
    assert len(train) + len(test) == len(paths) == 40 and 0 < len(test) < 12


def test_empty_image_folder_is_refused(tmp_path):
    (tmp_path / "cat").mkdir()
    with pytest.raises(FileNotFoundError, match="no .png/.jpg/.jpeg images"):
        data.read_image_folder(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="image folder not found"):
        data.read_image_folder(str(tmp_path / "nothing"))


def test_eval_arrays_from_image_folder_are_fixed(tmp_path):
    write_folder(tmp_path / "train", per_class=4)
    write_folder(tmp_path / "val", per_class=2)
    cfg = cfg_of(dataset="image_folder", data_path=str(tmp_path), in_chans=3, img_size=16)
    images, labels = data.load_eval_arrays(cfg, "train", 5, seed=3)
    again, _ = data.load_eval_arrays(cfg, "train", 5, seed=3)
    assert images.shape == (5, 3, 16, 16) and torch.equal(images, again)
    everything, labels = data.load_eval_arrays(cfg, "test", 100, seed=0)
    assert everything.shape == (4, 3, 16, 16) and sorted(labels.tolist()) == [0, 0, 1, 1]


# --------------------------------------------------------------------------- filesystems

def test_resolve_filesystem_local_and_s3(tmp_path, monkeypatch):
    fs, path = resolve_filesystem(str(tmp_path))
    assert isinstance(fs, pafs.LocalFileSystem) and path == str(tmp_path)
    assert resolve_filesystem(f"file://{tmp_path}")[1] == str(tmp_path)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:10")
    assert s3_endpoint() == "http://127.0.0.1:10"  # the S3-specific variable wins
    fs, path = resolve_filesystem("s3://bucket/some/prefix/")
    assert isinstance(fs, pafs.S3FileSystem) and path == "bucket/some/prefix"
    assert join("s3://bucket/p/", "runs", "/a/") == "s3://bucket/p/runs/a"


# --------------------------------------------------------------------------- Parquet on S3

def write_shards(uri: str, rows_per_file: list[int], hf_struct: bool = False,
                 first_id: int = 0) -> int:
    """Parquet files of 6x6 PNGs whose pixels equal their label, a running row id."""
    fs, root = resolve_filesystem(uri)
    row_id = first_id
    for f, count in enumerate(rows_per_file):
        ids = list(range(row_id, row_id + count))
        encoded = [png_bytes(np.full((6, 6), i % 256, np.uint8)) for i in ids]
        image = pa.array([{"bytes": b, "path": None} for b in encoded] if hf_struct else encoded)
        with fs.open_output_stream(f"{root}/part-{f:03d}.parquet") as out:
            pq.write_table(pa.table({"image": image, "label": ids}), out, row_group_size=3)
        row_id += count
    return row_id


def every_row(source):
    return source.take(torch.arange(len(source)))


@pytest.mark.parametrize("rows_per_file, hf_struct", [([5, 4, 3], False), ([7], True)])
def test_parquet_on_s3_workers_get_disjoint_complete_shares(s3_server, rows_per_file, hf_struct):
    uri = s3_server.uri(f"shards-{len(rows_per_file)}")
    total = write_shards(uri, rows_per_file, hf_struct)
    shares = [every_row(data.read_parquet(uri, "train", rank, 2, in_chans=1)) for rank in range(2)]
    labels = [share.labels.tolist() for share in shares]
    assert not set(labels[0]) & set(labels[1])
    # Without split names the files are hash-split: train and test together are every row.
    test = every_row(data.read_parquet(uri, "test", in_chans=1)).labels.tolist()
    assert sorted(labels[0] + labels[1] + test) == list(range(total))
    share = shares[1]
    images = share.crops(torch.arange(len(share)), data.center_boxes, 6)
    assert (images[:, 0, 3, 3] * 255).round().tolist() == labels[1]  # pixels decode to their label


def test_parquet_stream_and_eval_with_split_folders(s3_server):
    uri = s3_server.uri("splits")
    n_train = write_shards(join(uri, "train"), [6, 6])
    write_shards(join(uri, "test"), [5], first_id=n_train)
    cfg = cfg_of(dataset="parquet", data_path=uri, workers=2, batch_size=6, img_size=8)
    streams = [data.PretrainStream(cfg, rank, 2) for rank in range(2)]
    seen = [torch.cat([s.rows(k).labels for k in range(2)]).tolist() for s in streams]
    assert sorted(seen[0] + seen[1]) == list(range(n_train))  # one epoch each, disjoint
    images, labels = streams[0].batch(0)
    assert images.shape == (3, 1, 8, 8)
    images, labels = data.load_eval_arrays(cfg, "test", 10, seed=0)
    assert images.shape == (5, 1, 8, 8) and sorted(labels.tolist()) == list(range(12, 17))


def test_parquet_errors_are_clear(s3_server, tmp_path):
    with pytest.raises(FileNotFoundError, match="Parquet folder not found"):
        data.read_parquet(s3_server.uri("nothing-here"))
    (tmp_path / "train").mkdir()
    pq.write_table(pa.table({"pixels": [b"x"], "label": [0]}), tmp_path / "train" / "a.parquet")
    with pytest.raises(ValueError, match=r"lacks column\(s\) \['image'\]"):
        data.read_parquet(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="no Parquet files of split 'test'"):
        data.read_parquet(str(tmp_path), "test")


# --------------------------------------------------------------------------- streamed Parquet

def write_noise_shards(folder, files: int, rows_per_file: int, size: int) -> int:
    """Training Parquet files of incompressible size x size RGB PNGs (row groups of 3),
    labelled by a running row id; returns the bytes of all images."""
    os.makedirs(folder, exist_ok=True)
    rng, total = np.random.default_rng(0), 0
    for f in range(files):
        ids = list(range(f * rows_per_file, (f + 1) * rows_per_file))
        encoded = [png_bytes(rng.integers(0, 256, (size, size, 3), np.uint8)) for _ in ids]
        total += sum(map(len, encoded))
        pq.write_table(pa.table({"image": encoded, "label": ids}),
                       os.path.join(folder, f"train-{f:03d}.parquet"), row_group_size=3)
    return total


def test_parquet_stream_holds_at_most_its_buffer(tmp_path):
    total = write_noise_shards(tmp_path, files=4, rows_per_file=30, size=56)  # 40 row groups
    cfg = cfg_of(dataset="parquet", data_path=str(tmp_path), in_chans=3, img_size=16, batch_size=4,
                 loader_buffer_mb=0.125)
    bound = 0.125 * 2 ** 20
    assert total > 6 * bound
    stream = data.PretrainStream(cfg, 0, 1)
    groups = stream.source.groups
    # Arrow's own count of the bytes it holds, beside the reader's: between batches each of
    # the 4 I/O threads may be decoding a row group (its pages and its arrays)
    slack = 4 * 2 * max(g.nbytes for g in groups)
    baseline, held, labels = pa.total_allocated_bytes(), 0, []
    for k in range(60):  # two epochs of 120 images
        labels.append(stream.batch(k)[1])
        held = max(held, pa.total_allocated_bytes() - baseline)
    assert stream.source.peak_bytes <= bound
    assert held <= bound + slack, (held, bound)
    epochs = torch.cat(labels).view(2, 120)
    assert sorted(epochs[0].tolist()) == sorted(epochs[1].tolist()) == list(range(120))
    assert not torch.equal(epochs[0], epochs[1])  # reshuffled
    # each epoch reads each row group once (and the next epoch's first window ahead)
    assert 2 * len(groups) <= stream.source.groups_read < 2 * len(groups) + 10


def test_parquet_stream_resumes_exactly_across_windows_and_epochs(tmp_path):
    write_noise_shards(tmp_path, files=2, rows_per_file=15, size=16)
    base = dict(dataset="parquet", data_path=str(tmp_path), in_chans=3, img_size=8, batch_size=4,
                loader_buffer_mb=0.01)  # windows of a few row groups
    fresh = data.PretrainStream(cfg_of(**base), 0, 1)
    first = [fresh.batch(k) for k in range(20)]  # 30 images: batches straddle epochs
    assert len(fresh.epoch(0).groups) > 2
    resumed = data.train_loader(cfg_of(**base, num_loader_workers=2), 0, 1, start_step=9)
    for (images, labels), (want_images, want_labels) in zip(resumed, first[9:]):
        assert torch.equal(images, want_images) and torch.equal(labels, want_labels)
    resumed.close()


def test_parquet_sample_reads_only_the_row_groups_it_needs(tmp_path):
    (tmp_path / "train").mkdir()
    write_shards(str(tmp_path / "train"), [30] * 4)  # 40 row groups of 3 rows
    source = data.read_parquet(str(tmp_path), "train", in_chans=1)
    assert len(source.groups) == 40 and source.groups_read == 0  # the footers only
    few = source.take(source.sample(5, torch.Generator().manual_seed(0)))
    assert len(few) == 5 and source.groups_read <= 5  # the groups of the rows picked
    more = data.read_parquet(str(tmp_path), "train", in_chans=1)
    rows = more.take(more.sample(100, torch.Generator().manual_seed(0)))
    assert len(set(rows.labels.tolist())) == 100 and more.groups_read <= 34  # 34 x 3 >= 100


# --------------------------------------------------------------------------- probe sets

def test_probe_sets_are_read_once_per_study_and_shared_by_its_trials(s3_server):
    uri = s3_server.uri("probe-data")
    n_train = write_shards(join(uri, "train"), [6, 6])
    write_shards(join(uri, "test"), [5], first_id=n_train)
    cache = resolve_filesystem(s3_server.uri("study", "trials", "probe_sets"))
    base = dict(dataset="parquet", data_path=uri, probe_train_size=8, probe_eval_size=4)
    first = data.load_probe_sets(cfg_of(**base, seed=0), cache)
    uncached = data.load_probe_sets(cfg_of(**base, seed=0))
    data_fs, root = resolve_filesystem(uri)
    data_fs.delete_dir(root)  # the other trials of the study read the cache alone
    again = data.load_probe_sets(cfg_of(**base, seed=3), cache)
    assert [len(labels) for _, labels in first] == [8, 4]
    for (x, y), (x2, y2), (x3, y3) in zip(first, again, uncached):
        assert torch.equal(x, x2) and torch.equal(y, y2) and torch.equal(x, x3) and torch.equal(y, y3)
    # a trial at another image size decodes the same cached rows at its own size
    larger = data.load_probe_sets(cfg_of(**base, img_size=16, patch_size=4), cache)
    assert larger[0][0].shape == (8, 1, 16, 16) and torch.equal(larger[0][1], first[0][1])
    with pytest.raises(FileNotFoundError):  # another subset is not in the cache
        data.load_probe_sets(cfg_of(**base, probe_seed=1), cache)


def test_cached_fashion_mnist_probe_sets_are_the_uncached_ones(tmp_path, monkeypatch):
    cfg = cfg_of(probe_train_size=50, probe_eval_size=20, img_size=16, patch_size=4)
    cache = resolve_filesystem(str(tmp_path / "probe_sets"))
    plain, cached = data.load_probe_sets(cfg), data.load_probe_sets(cfg, cache)
    monkeypatch.setattr(data, "read_fashion_mnist", lambda *args: pytest.fail("read the dataset again"))
    again = data.load_probe_sets(cfg, cache)
    for (x, y), (x2, y2), (x3, y3) in zip(plain, cached, again):
        assert torch.equal(x, x2) and torch.equal(x, x3) and torch.equal(y, y2) and torch.equal(y, y3)
