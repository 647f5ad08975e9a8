"""The notebook API: a study's results table and fitted curves from its storage
(local or S3), without Ray, on a real tiny study (the `tiny_study` fixture)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CURVE = "eval_loss_vs_seq_len"

NOTEBOOK = """
import json, sys
from orchestrator import load_study_results
results = load_study_results("tiny_grid", sys.argv[1])
fit = results.fit("{curve}")
assert fit is results.curves["{curve}"].groups["all"].fit
low, high = fit.predict_interval([64.0])
print(json.dumps({{"rows": len(results.trials), "columns": list(results.trials.columns), "params": fit.params,
                  "predicted": float(fit.predict([64.0])[0]), "interval": [float(low[0]), float(high[0])],
                  "ray_imported": "ray" in sys.modules}}))
""".format(curve=CURVE)


def _notebook(storage: str, env: dict) -> dict:
    done = subprocess.run([sys.executable, "-c", NOTEBOOK, storage], cwd=REPO, capture_output=True, text=True,
                          timeout=300, env={**os.environ, **env})
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)


def _same_results(tiny_study, seen: dict) -> None:
    assert seen["rows"] == len(tiny_study.rows) == tiny_study.state["trials"]
    assert {"trial_id", "cell", "role", "seed_of", "status", "eval_loss", "flops"} <= set(seen["columns"])
    # fitted here as `run` fitted it (same specs, objective, bootstrap and seed)
    assert seen["params"] == tiny_study.curve["groups"]["all"]["fit"]["params"]
    assert seen["interval"][0] <= seen["predicted"] <= seen["interval"][1]
    assert not seen["ray_imported"]


def test_notebook_loads_trials_and_fits_curves_without_ray(tiny_study):
    _same_results(tiny_study, _notebook(str(tiny_study.storage), {}))


def test_notebook_loads_a_study_kept_on_s3(tiny_study, s3_server):
    import boto3

    s3 = boto3.client("s3", endpoint_url=s3_server.endpoint)
    existing = {b["Name"] for b in s3.list_buckets()["Buckets"]}
    if s3_server.bucket not in existing:  # an earlier test reset the shared moto server
        s3.create_bucket(Bucket=s3_server.bucket)
    for name in ("study.json", "results.parquet"):
        s3.upload_file(str(tiny_study.storage / "tiny_grid" / name), s3_server.bucket, f"studies/tiny_grid/{name}")
    _same_results(tiny_study, _notebook(s3_server.uri("studies"), s3_server.env))


def test_notebook_says_which_curves_and_groups_there_are(tiny_study):
    from orchestrator import load_study_results

    results = load_study_results("tiny_grid", str(tiny_study.storage))
    with pytest.raises(KeyError, match=CURVE):
        results.fit("no_such_curve")
    with pytest.raises(KeyError, match="all"):
        results.fit(CURVE, "no_such_group")
