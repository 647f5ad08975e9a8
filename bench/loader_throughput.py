"""Images/s the training data loader delivers against images/s the training step consumes.

Two sources, each feeding the `tiny` preset (the hungriest consumer on this CPU)
at the trainer's default image size:

  parquet  Parquet shards of JPEG images of ImageNet's typical size (~500 x 375,
           ~80 KB) on a loopback S3 server (moto's standalone server, in its own
           process), decoded to RGB;
  fashion  Fashion-MNIST from its IDX files.

For each, `train_loader` with the default settings of a run given this machine
(a decode thread per core; the Parquet stream reading row groups ahead) is
drained alone, and TrainStep (the trainer's step, a torch thread per core, OpenMP
waiting passively as trainers.pretrain's workers do) trains alone on batches
that loader made, in alternating rounds; the medians' ratio, loader images/s
over the step's, is the figure. CPU seconds per image of each are printed too:
on a shared machine they move less than rates do, and a run shares its cores
between the two.

Then the decode-and-augment rate of one core at 224 px (the same JPEGs, one
thread, rows already in memory, per CPU second) and the cores per GPU it implies for ViT-B/16
MAE, for a GPU rate assumed from the GPU's bf16 peak at a stated utilisation.

With --ray-data, Ray Data (read_parquet, map_batches with the same decode and
augmentation, iter_torch_batches) reads the same shards on a local Ray of this
machine's cores, as the peer the own loader is measured against.

    python bench/loader_throughput.py [--seconds 20] [--ray-data]

The last line is `loader_ratio=<the smaller of the two sources' loader / step images/s>`.
"""
from __future__ import annotations

import argparse
import io
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trainers.resources import loader_threads, local_cpus, use_threads, wait_passively  # noqa: E402

wait_passively()  # as trainers.pretrain's workers run; before torch loads

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from trainers.config import TrainConfig  # noqa: E402
from trainers.data import EncodedImages, PretrainStream, augment_batch, train_loader  # noqa: E402
from trainers.filesystems import resolve_filesystem  # noqa: E402
from trainers.flops import train_flops_per_image  # noqa: E402
from trainers.models import build_model  # noqa: E402
from trainers.optim import build_optimizer, build_schedule  # noqa: E402
from trainers.step import TrainStep  # noqa: E402

BUCKET = "bench"
# The GPU rate the cores-per-GPU figure assumes: H100 SXM's dense bf16 peak (NVIDIA's
# data sheet: 989.4 TFLOP/s) at 45% model-FLOPs utilisation (issue 12's goal for ViT-B
# MAE in bf16), divided by the analytic training FLOPs per image of trainers.flops.
H100_BF16_PEAK, ASSUMED_MFU = 989.4e12, 0.45


def start_s3() -> subprocess.Popen:
    """moto's standalone S3 server on loopback, in a process of its own (serving from this
    one would bill its CPU and GIL time to the loader), with an empty bucket; the AWS
    variables point this process (and Ray's workers, started after) at it."""
    import boto3

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    os.environ.update({"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "bench",
                       "AWS_SECRET_ACCESS_KEY": "bench", "AWS_REGION": "us-east-1"})
    for name in ("AWS_ENDPOINT_URL_S3", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        os.environ.pop(name, None)
    s3 = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"])
    deadline = time.monotonic() + 60
    while True:
        try:
            s3.create_bucket(Bucket=BUCKET)
            return server
        except Exception:  # not listening yet
            if time.monotonic() > deadline or server.poll() is not None:
                raise
            time.sleep(0.2)


def photo_like_jpegs(n: int, seed: int = 0) -> list[bytes]:
    """n JPEGs (quality 90) of 400-600 x 300-450 smooth colour fields with grain: about
    the size and entropy of photos (~80 KB; ImageNet's average ~110 KB), so decoding
    costs about what theirs does."""
    rng = np.random.default_rng(seed)
    grain = rng.normal(0, 14, (450 + 64, 600 + 64, 3)).astype(np.float32)  # drawn once, shifted per image
    jpegs = []
    for _ in range(n):
        w, h = int(rng.integers(400, 600)), int(rng.integers(300, 450))
        dx, dy = rng.integers(0, 64, 2)
        coarse = Image.fromarray(rng.integers(0, 256, (6, 8, 3), np.uint8)).resize((w, h), Image.Resampling.BICUBIC)
        pixels = np.clip(np.asarray(coarse, np.float32) + grain[dy:dy + h, dx:dx + w], 0, 255).astype(np.uint8)
        out = io.BytesIO()
        Image.fromarray(pixels).save(out, format="JPEG", quality=90)
        jpegs.append(out.getvalue())
    return jpegs


def write_jpeg_shards(uri: str, files: int, rows_per_file: int, distinct: int) -> float:
    """`files` training shards of `rows_per_file` JPEGs (row groups of 64), cycling
    through `distinct` images, each uploaded in one PUT; returns the mean JPEG size."""
    import boto3

    jpegs = photo_like_jpegs(distinct)
    bucket, prefix = uri.removeprefix("s3://").split("/", 1)
    s3 = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"])
    for f in range(files):
        ids = range(f * rows_per_file, (f + 1) * rows_per_file)
        table = pa.table({"image": [jpegs[i % distinct] for i in ids], "label": [i % 1000 for i in ids]})
        out = io.BytesIO()
        pq.write_table(table, out, row_group_size=64)
        s3.put_object(Bucket=bucket, Key=f"{prefix}/train-{f:05d}.parquet", Body=out.getvalue())
    return float(np.mean([len(j) for j in jpegs]))


class Peers:
    """The loader and the step of one config, measured in alternating rounds (noise from
    other work on a shared machine then hits both alike): images/s of each alone, and
    CPU seconds per image (this process's, which the other is idle for)."""

    def __init__(self, cfg: TrainConfig):
        self.cfg, self.loader = cfg, train_loader(cfg, 0, 1)
        self.batches = [next(self.loader)[0] for _ in range(4)]  # the first row groups read
        torch.manual_seed(cfg.seed)
        model = build_model(cfg)
        optimizer = build_optimizer(model, cfg)
        self.step = TrainStep(model, optimizer, build_schedule(optimizer, cfg), cfg, torch.device("cpu"))
        self.gen, self.steps = torch.Generator().manual_seed(0), 0
        self.run_step(3)  # warm-up
        self.rates = {"loader": [], "step": []}
        self.cpu = {"loader": [], "step": []}

    def run_step(self, count: int) -> int:
        for _ in range(count):
            self.step(self.steps % self.cfg.steps, [self.batches[self.steps % len(self.batches)]], self.gen)
            self.steps += 1
        return count * self.cfg.batch_size

    def next_batch(self) -> int:
        self.batches.append(next(self.loader)[0])
        return len(self.batches[-1])

    def round(self, seconds: float) -> None:
        for name, work in (("loader", self.next_batch), ("step", lambda: self.run_step(1))):
            images, wall, cpu = 0, time.perf_counter(), time.process_time()
            while time.perf_counter() - wall < seconds:
                images += work()
            self.rates[name].append(images / (time.perf_counter() - wall))
            self.cpu[name].append((time.process_time() - cpu) / images)

    def close(self) -> None:
        self.loader.close()


def decode_rate_per_core(cfg: TrainConfig, seconds: float) -> float:
    """Images per CPU second of one thread decoding, cropping, resizing and flipping
    micro-batches whose rows are already in memory (Parquet reading excluded). CPU
    time, not wall time: on a shared machine the thread does not have its core alone."""
    stream = PretrainStream(cfg, 0, 1)
    rows = [stream.rows(k) for k in range(4)]
    stream.make(0, rows[0])
    images, k, wall, cpu = 0, 0, time.perf_counter(), time.thread_time()
    while time.perf_counter() - wall < seconds:
        images += len(stream.make(k, rows[k % len(rows)])[0])
        k += 1
    return images / (time.thread_time() - cpu)


def ray_data_rate(cfg: TrainConfig, seconds: float, cpus: int) -> float:
    """Images/s of Ray Data delivering the same augmented batches from the same shards
    on a local Ray of `cpus` CPUs (a fresh one: address="local")."""
    import ray

    ray.init(address="local", num_cpus=cpus, include_dashboard=False, log_to_driver=False)
    try:
        fs, root = resolve_filesystem(cfg.data_path)

        def decode(batch: dict) -> dict:
            rows = EncodedImages(pa.chunked_array([pa.array(list(batch["image"]), pa.large_binary())]),
                                 torch.from_numpy(batch["label"]), cfg.in_chans)
            gen = torch.Generator().manual_seed(int(batch["label"][0]))
            images = augment_batch(rows, torch.arange(len(rows)), cfg, gen)
            return {"image": images.numpy(), "label": batch["label"]}

        ds = ray.data.read_parquet(root, filesystem=fs).select_columns(["image", "label"])
        ds = ds.map_batches(decode, batch_size=cfg.worker_batch, batch_format="numpy")

        def epochs():
            while True:
                yield from ds.iter_torch_batches(batch_size=cfg.worker_batch,
                                                 local_shuffle_buffer_size=4 * cfg.worker_batch)

        batches = epochs()
        try:
            next(batches)
            images, t = 0, time.perf_counter()
            while time.perf_counter() - t < seconds:
                images += len(next(batches)["image"])
            return images / (time.perf_counter() - t)
        finally:
            batches.close()  # before Ray goes: the iterator reports its stats to Ray
    finally:
        ray.shutdown()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=30.0, help="per peer and source, over all rounds")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--files", type=int, default=8)
    p.add_argument("--rows-per-file", type=int, default=256)
    p.add_argument("--distinct", type=int, default=64, help="distinct JPEGs, cycled through the rows")
    p.add_argument("--ray-data", action="store_true", help="measure Ray Data on the same shards")
    args = p.parse_args()
    cores = use_threads(local_cpus())  # the step's threads: a run given the machine (trainers.pretrain)
    print(f"{cores} torch threads (the cores this process is given), OMP_WAIT_POLICY="
          f"{os.environ['OMP_WAIT_POLICY']}", flush=True)

    server = start_s3()
    try:
        uri = f"s3://{BUCKET}/jpeg"
        t = time.perf_counter()
        jpeg_bytes = write_jpeg_shards(uri, args.files, args.rows_per_file, args.distinct)
        print(f"shards: {args.files} x {args.rows_per_file} JPEGs (mean {jpeg_bytes / 1e3:.0f} KB) "
              f"written to {uri} on moto in {time.perf_counter() - t:.1f} s", flush=True)
        # a run given this machine, as trainers.pretrain starts it: its CPUs set the loader's threads
        configs = {"parquet": TrainConfig(dataset="parquet", data_path=uri, in_chans=3, steps=10_000,
                                          cpus_per_worker=cores),
                   "fashion": TrainConfig(steps=10_000, cpus_per_worker=cores)}
        ratios = {}
        for name, cfg in configs.items():
            peers = Peers(cfg)
            for _ in range(args.rounds):
                peers.round(args.seconds / args.rounds)
            peers.close()
            loaded, consumed = (statistics.median(peers.rates[k]) for k in ("loader", "step"))
            cpu_loader, cpu_step = (statistics.median(peers.cpu[k]) for k in ("loader", "step"))
            ratios[name] = loaded / consumed
            print(f"{name}: preset={cfg.preset} img={cfg.img_size} patch={cfg.patch_size} "
                  f"in_chans={cfg.in_chans} batch={cfg.batch_size} loader_threads={loader_threads(cfg)} "
                  f"step_threads={cores} rounds={args.rounds}", flush=True)
            print(f"  loader {loaded:.0f} img/s, {cpu_loader * 1e3:.2f} ms CPU per image  "
                  f"step {consumed:.0f} img/s, {cpu_step * 1e3:.2f} ms CPU per image  ratio {ratios[name]:.2f} "
                  f"(per CPU second: {cpu_step / cpu_loader:.2f})  rounds: loader "
                  f"{' '.join(f'{r:.0f}' for r in peers.rates['loader'])}, step "
                  f"{' '.join(f'{r:.0f}' for r in peers.rates['step'])}", flush=True)

        big = TrainConfig(dataset="parquet", data_path=uri, in_chans=3, img_size=224, patch_size=16,
                          preset="vit_base", batch_size=64, steps=10_000)
        use_threads(1)
        per_core = decode_rate_per_core(big, args.seconds)
        gpu = H100_BF16_PEAK * ASSUMED_MFU / train_flops_per_image(big)
        print(f"decode+augment at 224 px: {per_core:.0f} img/s per core (JPEG ~{jpeg_bytes / 1e3:.0f} KB, "
              f"random resized crop + flip + normalise, one thread)")
        print(f"ViT-B/16 MAE on an H100: {train_flops_per_image(big) / 1e9:.1f} GFLOP per image trained; "
              f"at {ASSUMED_MFU:.0%} of {H100_BF16_PEAK / 1e12:.0f} TFLOP/s bf16 -> {gpu:.0f} img/s "
              f"-> {gpu / per_core:.1f} cores per GPU for decoding alone")
        use_threads(cores)

        if args.ray_data:
            peers = Peers(configs["parquet"])
            peers.round(args.seconds)
            peers.close()
            ours = peers.rates["loader"][0]
            theirs = ray_data_rate(configs["parquet"], args.seconds, cores)
            print(f"parquet loader: ours {ours:.0f} img/s, Ray Data {theirs:.0f} img/s on {cores} CPUs "
                  f"(ours / Ray Data {ours / theirs:.2f})", flush=True)
    finally:
        server.terminate()
    print(f"loader_ratio={min(ratios.values()):.2f}")


if __name__ == "__main__":
    main()
