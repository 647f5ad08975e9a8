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

from trainers.filesystems import resolve_filesystem, write_atomic

RESULTS_FILE = "results.parquet"  # one row per ended trial (orchestrator/results.py)


class StorageError(RuntimeError):
    pass


class Storage:
    def __init__(self, uri: str):
        self.uri = uri
        try:
            self.fs, self.root = resolve_filesystem(uri)
        except ValueError as e:
            raise StorageError(f"storage {uri}: {e}") from None

    @property
    def is_local(self) -> bool:
        return isinstance(self.fs, pafs.LocalFileSystem)

    def path(self, *parts: str) -> str:
        return "/".join([self.root.rstrip("/"), *(p.strip("/") for p in parts if p)])

    def check(self) -> None:
        """Write, read and delete a probe object: fail fast before any trial runs."""
        probe = self.path(f".probe-{uuid.uuid4().hex}")
        try:
            self.fs.create_dir(self.root, recursive=True)
            with self.fs.open_output_stream(probe) as f:
                f.write(b"ok")
            with self.fs.open_input_stream(probe) as f:
                f.read()
            self.fs.delete_file(probe)
        except Exception as e:  # any failure means we cannot keep results there
            raise StorageError(f"storage {self.uri} is unreachable or not writable: "
                               f"{type(e).__name__}: {str(e).splitlines()[0]}") from None

    def exists(self, *parts: str) -> bool:
        return self.fs.get_file_info(self.path(*parts)).type != pafs.FileType.NotFound

    def list(self, *parts: str) -> list[pafs.FileInfo]:
        """What a folder holds (not recursive); nothing if it does not exist."""
        return self.fs.get_file_info(pafs.FileSelector(self.path(*parts), allow_not_found=True))

    def write_bytes(self, rel: str, data: bytes) -> None:
        """Readers see the old content or the new, never a part."""
        target = self.path(rel)
        self.fs.create_dir(target.rsplit("/", 1)[0], recursive=True)
        write_atomic(self.fs, target, data)

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

    def ray_storage(self, *parts: str) -> tuple[str, pafs.FileSystem | None]:
        """(storage_path, storage_filesystem) for Ray Tune/Train run configs."""
        if self.is_local:
            return self.path(*parts), None
        return self.path(*parts), self.fs
