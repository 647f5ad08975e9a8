"""Writing a study's curves as files: <curve>.json, <curve>.png and points.parquet."""
from __future__ import annotations

import json
from collections.abc import Iterable, Mapping

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pyarrow import fs as pafs

from trainers.filesystems import write_atomic

from .figures import figure_png, plot_curve
from .study_curves import GroupCurve, StudyCurve

POINTS_SCHEMA = pa.schema([("curve", pa.string()), ("group", pa.string()), ("x", pa.float64()),
                           ("x2", pa.float64()), ("y", pa.float64()), ("kind", pa.string())])


def _rows(curve: str, g: GroupCurve) -> list[dict]:
    group = g.group
    x = g.x.reshape(len(g.y), -1)
    rows = [{"curve": curve, "group": group, "x": float(xi[0]),
             "x2": float(xi[1]) if len(xi) > 1 else None, "y": float(yi), "kind": "point"}
            for xi, yi in zip(x, g.y)]
    for sample in g.samples().to_dict("records"):
        for kind in ("fit", "band_low", "band_high"):
            rows.append({"curve": curve, "group": group, "x": sample["x"],
                         "x2": None if np.isnan(sample["x2"]) else sample["x2"],
                         "y": sample[kind], "kind": kind})
    return rows


def points_table(curves: Iterable[StudyCurve]) -> pa.Table:
    """All trial points and fitted-curve samples.

    kind: "point" (one trial), "fit", "band_low", "band_high" (the curve and
    its bootstrap band), "frontier" (a frontier point: per-x mean of its
    group). x2 is D for the two-variable law, null otherwise. The law fitted
    to the frontier's trials appears as group "frontier".
    """
    rows: list[dict] = []
    for curve in curves:
        name = curve.spec.name
        for g in curve.groups.values():
            rows += _rows(name, g)
        if curve.frontier is not None:
            rows += [{"curve": name, "group": p.group, "x": p.compute, "x2": None, "y": p.objective,
                      "kind": "frontier"} for p in curve.frontier.points]
        if curve.frontier_fit is not None:
            rows += [r for r in _rows(name, curve.frontier_fit) if r["kind"] != "point"]
    return pa.Table.from_pylist(rows, schema=POINTS_SCHEMA)


def write_curve_outputs(results: Mapping[str, StudyCurve] | Iterable[StudyCurve], out_dir: str,
                        filesystem: pafs.FileSystem | None = None) -> list[str]:
    """Write <out_dir>/<curve>.json and .png per curve, and <out_dir>/points.parquet.

    `filesystem` defaults to the local one; pass a pyarrow S3FileSystem with
    a "bucket/prefix" out_dir for S3. Returns the paths written.
    """
    filesystem = filesystem or pafs.LocalFileSystem()
    curves = list(results.values() if isinstance(results, Mapping) else results)
    out_dir = out_dir.rstrip("/")
    filesystem.create_dir(out_dir, recursive=True)
    written = []
    for curve in curves:
        base = f"{out_dir}/{curve.spec.name}"
        write_atomic(filesystem, f"{base}.json", json.dumps(curve.to_dict(), indent=1, allow_nan=False).encode())
        write_atomic(filesystem, f"{base}.png", figure_png(plot_curve(curve)))
        written += [f"{base}.json", f"{base}.png"]
    buf = pa.BufferOutputStream()
    pq.write_table(points_table(curves), buf)
    write_atomic(filesystem, f"{out_dir}/points.parquet", buf.getvalue().to_pybytes())
    return written + [f"{out_dir}/points.parquet"]
