"""Study-level curves: fitting a trials table, figures, files and MLflow logging."""
import json

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from matplotlib.image import imread
from pyarrow import fs as pafs
from pydantic import ValidationError

from orchestrator.curves import CurveSpec, fit_study_curves, log_curves_to_mlflow, write_curve_outputs
from orchestrator.curves.mlflow_log import step_scale
from trainers.filesystems import write_atomic

SEQ_LENS = [16, 36, 64, 144, 256, 576, 1024]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

SPECS = [
    CurveSpec(name="probe_vs_seq_len", x="seq_len", y="probe_top1", group_by="preset",
              law="saturating_power", higher_is_better=True),
    CurveSpec(name="loss_vs_mask_ratio", x="mask_ratio", y="mask_loss", group_by="model", law="quadratic"),
    CurveSpec(name="loss_vs_flops", x="flops", y="eval_loss", group_by="preset", law="saturating_power",
              frontier=True),
]


OBJECTIVE = ("probe_top1", "max")


def _trials() -> pd.DataFrame:
    """A small finished study: repeated trials per x, one group too small to fit, one failed trial."""
    rng = np.random.default_rng(0)
    rows = []
    for preset, width, turns_up in [("vit_b_standin", 1, True), ("vit_l_standin", 4, False)]:
        for seq_len in SEQ_LENS:
            for _ in range(3):
                error = 0.2 + 1.3 * seq_len**-0.45 + (0.04 * np.log(seq_len / 150) ** 2 if turns_up and seq_len > 150 else 0)
                flops = seq_len * width * 1e12
                rows.append(dict(preset=preset, seq_len=seq_len, flops=flops, status="finished",
                                 probe_top1=1 - error * np.exp(rng.normal(0, 0.02)),
                                 eval_loss=(0.3 + 2 * (flops / 1e12) ** -0.3) * np.exp(rng.normal(0, 0.02))))
    rows += [dict(preset="tiny", seq_len=s, flops=s * 1e11, status="finished", probe_top1=0.3 + 0.01 * i,
                  eval_loss=1.5) for i, s in enumerate([16, 64])]
    rows.append(dict(preset="vit_b_standin", seq_len=64, flops=64e12, status="failed", probe_top1=0.01,
                     eval_loss=50.0))
    for model, best in [("mae", 0.75), ("lomar", 0.8)]:
        for ratio in np.arange(0.3, 0.96, 0.075):
            for _ in range(2):
                rows.append(dict(model=model, mask_ratio=ratio, status="finished",
                                 mask_loss=(0.5 + 1.5 * (ratio - best) ** 2) * np.exp(rng.normal(0, 0.02))))
    return pd.DataFrame(rows)


@pytest.fixture(scope="module")
def trials() -> pd.DataFrame:
    return _trials()


@pytest.fixture(scope="module")
def results(trials):
    return fit_study_curves(trials, SPECS, OBJECTIVE, bootstrap=200, seed=0)


def test_groups_use_every_finished_trial_and_summarise_repeats(results, trials):
    probe = results["probe_vs_seq_len"]
    assert list(probe.groups) == ["tiny", "vit_b_standin", "vit_l_standin"]
    vit_b = probe.groups["vit_b_standin"]
    assert len(vit_b.y) == 3 * len(SEQ_LENS) and vit_b.fit.n_points == 21  # the failed trial is left out
    finished = trials[(trials.status == "finished") & (trials.preset == "vit_b_standin")]
    at_64 = finished[finished.seq_len == 64].probe_top1
    row = vit_b.summary[vit_b.summary.x == 64].iloc[0]
    assert row.n == 3
    assert (row["mean"], row["std"], row["min"], row["max"]) == pytest.approx(
        (at_64.mean(), at_64.std(), at_64.min(), at_64.max()))


def test_a_refused_group_does_not_break_the_others(results):
    probe = results["probe_vs_seq_len"]
    tiny = probe.groups["tiny"]
    assert tiny.fit is None and "too few points" in tiny.error
    assert len(tiny.summary) == 2  # its points are still reported
    for name in ("vit_b_standin", "vit_l_standin"):
        group = probe.groups[name]
        assert group.error is None and group.fit.higher_is_better
        assert group.holdout is not None and group.holdout.x == 1024 and group.holdout.n_heldout == 3


def test_turning_point_of_the_group_whose_accuracy_turns_down(results):
    groups = results["probe_vs_seq_len"].groups
    turn = groups["vit_b_standin"].turning_point
    assert turn is not None and turn.confident and 144 <= turn.x <= 576
    other = groups["vit_l_standin"].turning_point
    assert other is None or not other.confident


def test_quadratic_vertex_and_frontier(results):
    mask = results["loss_vs_mask_ratio"]
    assert mask.groups["mae"].fit.vertex == pytest.approx(0.75, abs=0.03)
    assert mask.groups["lomar"].fit.vertex == pytest.approx(0.8, abs=0.03)
    assert mask.groups["mae"].turning_point is None  # the vertex already is the optimum

    flops = results["loss_vs_flops"]
    points = flops.frontier.points
    assert [p.compute for p in points] == sorted(p.compute for p in points)
    assert all(b.objective < a.objective for a, b in zip(points, points[1:]))
    assert points[0].group == "tiny" and "vit_l_standin" in flops.frontier.groups
    assert flops.frontier_fit is not None and flops.frontier_fit.group == "frontier"


def test_pyarrow_input_and_a_missing_column(trials):
    specs = [SPECS[0], CurveSpec(name="broken", x="seq_len", y="not_a_metric", law="power")]
    out = fit_study_curves(pa.Table.from_pandas(trials), specs, OBJECTIVE, bootstrap=50)
    assert out["broken"].error == "columns not in the table: not_a_metric"
    assert out["probe_vs_seq_len"].groups["vit_l_standin"].fit is not None
    with pytest.raises(ValueError, match="status"):
        fit_study_curves(trials.drop(columns="status"), specs, OBJECTIVE, bootstrap=10)


def test_curve_spec_validation():
    assert CurveSpec(name="a", x="n", y="l", law="power").log_x
    assert not CurveSpec(name="a", x="mask_ratio", y="l", law="quadratic").log_x
    with pytest.raises(ValidationError, match="pair"):
        CurveSpec(name="a", x="n", y="l", law="chinchilla")
    with pytest.raises(ValidationError, match="log_x"):
        CurveSpec(name="a", x="n", y="l", law="power", log_x=False)
    with pytest.raises(ValidationError):
        CurveSpec(name="has space", x="n", y="l")


def test_write_curve_outputs(results, tmp_path):
    out_dir = tmp_path / "curves"
    written = write_curve_outputs(results, str(out_dir), pafs.LocalFileSystem())
    assert sorted(p.name for p in out_dir.iterdir()) == sorted(
        [f"{name}.{ext}" for name in results for ext in ("json", "png")] + ["points.parquet"])
    assert len(written) == 7

    doc = json.loads((out_dir / "probe_vs_seq_len.json").read_text())
    assert doc["spec"]["law"] == "saturating_power" and doc["spec"]["higher_is_better"]
    vit_b = doc["groups"]["vit_b_standin"]
    assert vit_b["fit"]["law"] == "saturating_power"
    assert set(vit_b["fit"]["params"]) == {"E", "A", "alpha"}
    low, high = vit_b["fit"]["ci"]["alpha"]
    assert low <= vit_b["fit"]["params"]["alpha"] <= high
    assert len(vit_b["fit"]["points"]["x"]) == 21 and vit_b["fit"]["diagnostics"]["space"] == "log"
    assert vit_b["fit"]["holdout"]["x"] == 1024 and vit_b["turning_point"]["confident"]
    assert doc["groups"]["tiny"]["fit"] is None and "too few points" in doc["groups"]["tiny"]["error"]
    assert json.loads((out_dir / "loss_vs_mask_ratio.json").read_text())["groups"]["mae"]["fit"]["vertex"]["is_optimum"]

    for name in results:
        png = (out_dir / f"{name}.png").read_bytes()
        assert png.startswith(PNG_MAGIC)
        height, width, _ = imread(out_dir / f"{name}.png").shape
        assert width > 800 and height > 400

    points = pq.read_table(out_dir / "points.parquet").to_pandas()
    assert {"curve", "group", "x", "y", "kind"} <= set(points.columns)
    assert set(points.kind) == {"point", "fit", "band_low", "band_high", "frontier"}
    trials = points[(points.curve == "probe_vs_seq_len") & (points.kind == "point")]
    assert len(trials) == 2 * 21 + 2
    fitted = points[(points.curve == "probe_vs_seq_len") & (points.group == "vit_b_standin")]
    assert (fitted[fitted.kind == "band_low"].y.to_numpy() <= fitted[fitted.kind == "band_high"].y.to_numpy()).all()


def test_write_atomic_replaces_a_file_without_leftovers(tmp_path):
    fs, path = pafs.LocalFileSystem(), str(tmp_path / "a.json")
    write_atomic(fs, path, b"old")
    write_atomic(fs, path, b"new")
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]
    assert (tmp_path / "a.json").read_bytes() == b"new"


def test_step_scale_names_rescaled_steps():
    assert step_scale(0.9) == (1000.0, ".x1000")
    assert step_scale(1024) == (1.0, "")
    factor, suffix = step_scale(3e18)
    assert suffix == ".x1e-7" and round(3e18 * factor) == 300_000_000_000


def test_log_curves_to_mlflow(results, tmp_path):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.create_experiment("curves", artifact_location=(tmp_path / "artifacts").as_uri())
    run_id = client.create_run(experiment).info.run_id
    log_curves_to_mlflow(results, client, run_id)

    data = client.get_run(run_id).data
    assert data.params["curve.probe_vs_seq_len.law"] == "saturating_power"
    assert data.params["curve.loss_vs_mask_ratio.law"] == "quadratic"
    prefix = "curve.probe_vs_seq_len.vit_b_standin"
    fit = results["probe_vs_seq_len"].groups["vit_b_standin"].fit
    assert data.metrics[f"{prefix}.alpha"] == pytest.approx(fit.params["alpha"])
    assert data.metrics[f"{prefix}.alpha_ci_low"] == pytest.approx(fit.ci["alpha"][0])
    assert data.metrics[f"{prefix}.alpha_ci_high"] == pytest.approx(fit.ci["alpha"][1])
    assert f"{prefix}.turning_point" in data.metrics
    assert "curve.loss_vs_flops.frontier.alpha" in data.metrics
    assert not any(k.startswith("curve.probe_vs_seq_len.tiny.") and k.endswith("alpha") for k in data.metrics)

    means = client.get_metric_history(run_id, f"{prefix}.mean")
    assert sorted(m.step for m in means) == SEQ_LENS
    fitted = client.get_metric_history(run_id, f"{prefix}.fit")
    assert min(m.step for m in fitted) == 16 and max(m.step for m in fitted) == 1024
    mask_fit = client.get_metric_history(run_id, "curve.loss_vs_mask_ratio.mae.fit.x1000")
    assert min(m.step for m in mask_fit) == 300 and max(m.step for m in mask_fit) == 900

    artifacts = {a.path for a in client.list_artifacts(run_id, "curves")}
    assert artifacts == {f"curves/{name}.png" for name in results}


def test_figure_keeps_the_points_readable_when_intervals_are_wild():
    """A real local mask-ratio sweep: 4 trials per group, and the held-out
    prediction interval of the parabola spanned hundreds of accuracy points."""
    from orchestrator.curves.figures import Y_MARGIN, plot_curve

    table = pd.DataFrame({
        "mask_unit": [1, 2, 2, 1, 1, 2, 1, 2, 2],
        "mask_ratio": [0.7018, 0.6294, 0.7962, 0.7934, 0.7315, 0.4001, 0.4112, 0.4086, 0.4111],
        "probe_top1": [0.731, 0.736, 0.738, 0.748, 0.756, 0.748, 0.782, 0.782, 0.752],
        "status": "finished"})
    spec = CurveSpec(name="probe_error_vs_mask_ratio", x="mask_ratio", y="probe_top1",
                     group_by="mask_unit", law="quadratic", higher_is_better=True)
    curve = fit_study_curves(table, [spec], OBJECTIVE, bootstrap=200)[spec.name]
    ax = plot_curve(curve).axes[0]
    lo, hi = table.probe_top1.min(), table.probe_top1.max()
    low, high = ax.get_ylim()
    assert low <= lo and hi <= high  # every point is on the plot
    span = hi - lo
    assert lo - Y_MARGIN * span - 1e-9 <= low and high <= hi + Y_MARGIN * span + 1e-9
    assert any("limited to the data" in t.get_text() for t in ax.texts)
