"""Tables computed once and kept in storage under a key: the probe subsets that every
trial of a study shares are read from the dataset by the first trial only."""
from __future__ import annotations

import hashlib
import json
from typing import Callable

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from trainers.filesystems import write_atomic


def cached_table(fs: pafs.FileSystem, folder: str, name: str, key: dict,
                 build: Callable[[], pa.Table]) -> pa.Table:
    """The table kept at <folder>/<name>-<hash of key>.parquet on `fs`; built and written
    there first if it is not. Concurrent first calls build it each, and write the same
    table atomically, so a reader never sees a partial file."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    path = f"{folder}/{name}-{digest}.parquet"
    if fs.get_file_info(path).type == pafs.FileType.File:
        return pq.read_table(path, filesystem=fs)
    table = build()
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    fs.create_dir(folder, recursive=True)
    write_atomic(fs, path, sink.getvalue().to_pybytes())
    return table
