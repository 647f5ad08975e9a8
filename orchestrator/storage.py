"""The study's one storage URI: a local folder or s3://bucket/prefix.

Layout under <root>/<study>/: `study.json` (what resume needs), `tune/` (Ray
Tune's experiment state, with the searcher's Optuna studies), `trials/<id>/`
(each trial's Ray Train checkpoints), `results.parquet`, `curves/`.
"""
from __future__ import annotations

import io
import json
import uuid

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from orchestrator.local_fs import whole_file_local_fs
from trainers.filesystems import resolve_filesystem

RESULTS_FILE = "results.parquet"  # one row per ended trial (orchestrator/results.py)


class StorageError(RuntimeError):
    pass


class StorageRefused(StorageError):
    """A study stopped mid-way because its storage refused writes (orchestrator/storage_guard.py)."""


class Storage:
    def __init__(self, uri: str):
        self.uri = uri
        try:
            self.fs, self.root = resolve_filesystem(uri)
        except ValueError as e:
            raise StorageError(f"storage {uri}: {e}") from None
        # What writes go through, ours and Ray's, so that a reader sees a file's old
        # content or its new, never a part: on a local folder, one that writes each
        # file whole or not at all (a disk may fill up mid-write); an object store's
        # upload is whole already.
        self.write_fs = whole_file_local_fs() if self.is_local else self.fs

    @property
    def is_local(self) -> bool:
        return isinstance(self.fs, pafs.LocalFileSystem)

    def path(self, *parts: str) -> str:
        return "/".join([self.root.rstrip("/"), *(p.strip("/") for p in parts if p)])

    def probe(self, *parts: str) -> None:
        """Write, read and delete a probe object in the folder `parts` (the root
        if none); raises what storage raised."""
        probe = self.path(*parts, f".probe-{uuid.uuid4().hex}")
        self.fs.create_dir(probe.rsplit("/", 1)[0], recursive=True)
        with self.write_fs.open_output_stream(probe) as f:  # a failed probe leaves nothing
            f.write(b"ok")
        with self.fs.open_input_stream(probe) as f:
            f.read()
        self.fs.delete_file(probe)

    def check(self) -> None:
        """Fail fast, before any trial runs, if storage cannot keep results."""
        try:
            self.probe()
        except Exception as e:  # any failure means we cannot keep results there
            raise StorageError(f"storage {self.uri} is unreachable or not writable: "
                               f"{type(e).__name__}: {str(e).splitlines()[0]}") from None

    def exists(self, *parts: str) -> bool:
        return self.fs.get_file_info(self.path(*parts)).type != pafs.FileType.NotFound

    def list(self, *parts: str) -> list[pafs.FileInfo]:
        """What a folder holds (not recursive); nothing if it does not exist."""
        return self.fs.get_file_info(pafs.FileSelector(self.path(*parts), allow_not_found=True))

    def write_bytes(self, rel: str, data: bytes) -> None:
        target = self.path(rel)
        self.fs.create_dir(target.rsplit("/", 1)[0], recursive=True)
        with self.write_fs.open_output_stream(target) as out:
            out.write(data)

    def read_bytes(self, rel: str) -> bytes:
        with self.fs.open_input_stream(self.path(rel)) as f:
            return f.read()

    def write_json(self, rel: str, obj) -> None:
        self.write_bytes(rel, json.dumps(obj, indent=1, default=str).encode())

    def read_json(self, rel: str):
        return json.loads(self.read_bytes(rel))

    def write_table(self, rel: str, table: pa.Table) -> None:
        buf = io.BytesIO()
        pq.write_table(table, buf)
        self.write_bytes(rel, buf.getvalue())

    def read_table(self, rel: str) -> pa.Table:
        return pq.read_table(io.BytesIO(self.read_bytes(rel)))

    def ray_storage(self, *parts: str) -> tuple[str, pafs.FileSystem]:
        """(storage_path, storage_filesystem) for Ray Tune/Train run configs."""
        return self.path(*parts), self.write_fs
