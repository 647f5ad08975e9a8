"""Checks made before a study writes anything: each refusal is one PreflightError
line naming the problem and the option or study field it comes from.

The checks on options and data need no Ray (`check_options`, `check_data`);
`joining_ray` turns a failed join into a refusal, and `check_cluster` looks at
the cluster joined: whether its nodes can share the storage and, for a profile
whose trials need GPUs, whether it has or can get some.
"""
from __future__ import annotations

import os
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Optional
from urllib.parse import urlparse

import pyarrow.fs as pafs
import pyarrow.parquet as pq

from orchestrator.planning import Plan
from orchestrator.storage import Storage
from orchestrator.study import check_plain_name
from trainers.config import TrainConfig
# the readers' own lookups: what preflight finds is what a trial will read
from trainers.data import _find_idx, _parquet_files
from trainers.filesystems import resolve_filesystem

STORAGE_SCHEMES = ("", "file", "s3")  # a local folder, file:///path, s3://bucket/prefix
CONNECT_TIMEOUT_S = 5.0
# How long a `--address` cluster without GPUs gets to add some (an autoscaler
# starts GPU nodes on demand); Ray started here has no autoscaler and is refused at once.
GPU_WAIT_S = float(os.environ.get("MIM_GPU_WAIT_S", "180"))
FOOTER_READERS = 16  # footers of S3 shards are read concurrently: each costs a few round trips


class PreflightError(ValueError):
    """A run refused before it wrote anything, with a one-line reason."""


# --------------------------------------------------------------------------- options (no Ray)

def check_options(name: Optional[str], storage_uri: str, address: Optional[str],
                  max_concurrent: Optional[int]) -> None:
    if name is not None:
        check_name(name)
    check_storage_scheme(storage_uri)
    check_max_concurrent(max_concurrent)
    check_address(address)


def check_name(name: str) -> None:
    """The name becomes a folder under the storage root: `../x` would leave it."""
    try:
        check_plain_name(name)
    except ValueError as e:
        raise PreflightError(f"--name: {e}") from None


def check_storage_scheme(uri: str) -> None:
    scheme = urlparse(uri).scheme
    if scheme not in STORAGE_SCHEMES:
        raise PreflightError(f"--storage {uri}: scheme {scheme!r} is not supported; use a local folder, "
                             f"file:///path or s3://bucket/prefix")


def check_max_concurrent(n: Optional[int]) -> None:
    if n is not None and n < 1:
        raise PreflightError(f"--max-concurrent {n}: must be at least 1")


def check_address(address: Optional[str]) -> None:
    """A host:port must accept a TCP connection now: ray.init would wait on it for minutes.
    `auto` (find the cluster on this machine) is left to ray.init, which fails fast."""
    if address in (None, "auto", "local"):
        return
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise PreflightError(f"--address {address}: expected auto or host:port")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as e:
        raise PreflightError(f"--address {address}: no Ray cluster answers there "
                             f"({type(e).__name__}: {e})") from None


# --------------------------------------------------------------------------- data (no Ray)

def check_data(plan: Plan, study_path) -> None:
    """Every cell's data is where its data_path says, and Parquet shards' footers read."""
    checked = set()
    for cell in plan.cells:
        cfg = cell.config
        if (cfg.dataset, cfg.data_path) in checked:
            continue
        checked.add((cfg.dataset, cfg.data_path))
        try:
            _check_source(cfg)
        except (OSError, ValueError) as e:
            raise PreflightError(f"{study_path}: profiles.{plan.profile}, cell {cell.id}: data_path "
                                 f"{cfg.data_path}: {str(e).splitlines()[0]}") from None


def _check_source(cfg: TrainConfig) -> None:
    if cfg.dataset == "fashion_mnist":
        for stem in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
                     "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
            _find_idx(cfg.data_path, stem)
        return
    fs, root = resolve_filesystem(cfg.data_path)
    if cfg.dataset == "image_folder":
        if fs.get_file_info(root).type != pafs.FileType.Directory:
            raise FileNotFoundError(f"image folder not found: {cfg.data_path}")
        return
    files = _parquet_files(fs, root, cfg.data_path)
    with ThreadPoolExecutor(FOOTER_READERS) as pool:
        list(pool.map(lambda path: _read_footer(fs, path), files))


def _read_footer(fs: pafs.FileSystem, path: str) -> None:
    try:
        pq.read_metadata(path, filesystem=fs)
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: Parquet footer unreadable (truncated or not Parquet): {e}") from None


# --------------------------------------------------------------------------- the Ray cluster

@contextmanager
def joining_ray(address: Optional[str]):
    """ray.init's failure to find or join the cluster, as a refusal."""
    try:
        yield
    except (ConnectionError, TimeoutError) as e:
        raise PreflightError(f"--address {address}: no Ray cluster to join "
                             f"({str(e).splitlines()[0]})") from None


def check_cluster(plan: Plan, storage: Storage, address: Optional[str]) -> None:
    import ray

    nodes = sum(node["Alive"] for node in ray.nodes())
    check_storage_shared(storage, nodes, ray.cluster_resources())
    check_gpus(plan, address)


def check_storage_shared(storage: Storage, nodes: int, resources: dict) -> None:
    """Trials on other nodes cannot see a local folder. A cluster made from
    infra/cluster-hardened.yaml (its head has `head_driver`) gets its worker nodes later."""
    if not isinstance(storage.fs, pafs.LocalFileSystem):
        return
    if nodes > 1 or resources.get("head_driver", 0) > 0:
        spread = f"{nodes} nodes" if nodes > 1 else "worker nodes to come (its head has head_driver)"
        raise PreflightError(f"--storage {storage.uri}: a local folder, but the Ray cluster has {spread} "
                             f"that cannot see it; use s3://bucket/prefix")


def check_gpus(plan: Plan, address: Optional[str], wait_s: float = GPU_WAIT_S) -> None:
    """A profile whose trials need GPUs on a cluster without any would wait forever.

    Whether an autoscaler could add GPUs is not cheap to tell in Ray 2.60 (every
    head runs a monitor, a read-only one where nothing can be added), so a joined
    cluster is asked for one GPU and given `wait_s` to show it."""
    import ray

    if not any(c.config.use_gpu for c in plan.cells) or ray.cluster_resources().get("GPU", 0) > 0:
        return
    if address is None:
        raise PreflightError(f"--profile {plan.profile}: its trials need GPUs and the Ray started here has "
                             f"none; join a cluster with GPUs (--address)")
    if not _gpus_appear(wait_s):
        raise PreflightError(f"--profile {plan.profile}: its trials need GPUs and the Ray cluster at {address} "
                             f"has none, nor did any appear in {wait_s:.0f} s (MIM_GPU_WAIT_S)")


def _gpus_appear(wait_s: float) -> bool:
    import ray
    from ray.autoscaler.sdk import request_resources

    print(f"The Ray cluster has no GPU yet: asking its autoscaler for one, waiting up to {wait_s:.0f} s",
          flush=True)
    request_resources(bundles=[{"GPU": 1}])  # what an autoscaler starts a GPU node for
    try:
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            if ray.cluster_resources().get("GPU", 0) > 0:
                return True
            time.sleep(min(2.0, wait_s))
        return False
    finally:
        request_resources(bundles=[])  # the trials' own requests take over
