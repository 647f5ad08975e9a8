"""`status NAME`: a table of cells (trials ended of planned, best objective and its
trial, compute spent of planned) and the fitted curves' headline, on a real tiny
study (the `tiny_study` fixture) and tables derived from it."""
import io
import json
import shutil

import pytest
from rich.console import Console

from orchestrator.status import curve_lines, print_status

CURVE = "eval_loss_vs_seq_len"


def _status(storage) -> str:
    out = io.StringIO()
    print_status("tiny_grid", str(storage), Console(file=out, width=250))
    return out.getvalue()


def _copy_with_rows(tiny_study, rows, storage):
    folder = storage / "tiny_grid"
    folder.mkdir()
    shutil.copy(tiny_study.storage / "tiny_grid" / "study.json", folder)
    rows.to_parquet(folder / "results.parquet")


def test_status_draws_cells_with_best_trial_compute_and_curve_headline(tiny_study):
    text = _status(tiny_study.storage)
    assert text.startswith("tiny_grid (local): complete; 9 of 9 planned trials ended")
    rows = tiny_study.rows
    for cell, flops_per_trial in tiny_study.state["cell_flops_per_trial"].items():
        mine = rows[rows["cell"] == cell]
        best = mine[mine["status"] == "finished"].sort_values("eval_loss").iloc[0]
        line = next(line for line in text.splitlines() if cell in line)
        assert "3/3" in line and " complete " in line
        assert best["trial_id"] in line and f"{best['eval_loss']:.4g}" in line
        assert f"{mine['flops'].sum():.3g} / {flops_per_trial * 3:.3g}" in line
    fit = tiny_study.curve["groups"]["all"]["fit"]
    assert f"{CURVE}: eval_loss vs seq_len, law power" in text
    assert all(f"{name}={value:.3g}" in text for name, value in fit["params"].items())


def test_status_counts_a_cell_without_seeds_as_complete(tiny_study, tmp_path):
    """A cell none of whose tuning trials trained to its budget gets no seeds: the
    study is complete with fewer rows than planned."""
    rows = tiny_study.rows.copy()
    cell = rows["cell"].iloc[0]
    rows = rows[~((rows["cell"] == cell) & (rows["role"] == "seed"))]
    rows.loc[rows["cell"] == cell, "status"] = "stopped_early"
    _copy_with_rows(tiny_study, rows, tmp_path)
    text = _status(tmp_path)
    assert text.startswith("tiny_grid (local): complete; 8 of 9 planned trials ended")
    line = next(line for line in text.splitlines() if cell in line)
    assert "2/3" in line and "complete, no seeds" in line
    assert "resume" not in text


def test_status_of_a_study_with_a_cell_still_tuning_is_not_complete(tiny_study, tmp_path):
    rows = tiny_study.rows
    _copy_with_rows(tiny_study, rows[rows["role"] == "tune"].iloc[1:], tmp_path)
    text = _status(tmp_path)
    assert text.startswith("tiny_grid (local): not complete;")
    assert "`python -m orchestrator resume tiny_grid` continues it" in text


def test_status_headline_of_a_compute_optimal_curve():
    """Each budget's parabola with its optimum, and the optimum's exponent against compute."""
    import numpy as np
    import pandas as pd

    from orchestrator.curves import IsoFlopSpec, fit_study_curves

    rng = np.random.default_rng(0)
    rows = []
    for c in (1e15, 1e16, 1e17):
        n_opt = 1e6 * (c / 1e15) ** 0.5
        for n in n_opt * np.geomspace(1 / 4, 4, 5):
            rows.append(dict(trial_id=f"{c:g}-{n:.0f}", cell=f"{c:g}-{n:.0f}", status="finished", role="seed",
                             seed_of=None, flops_budget=c, flops=c, encoder_params=n, images_seen=c / (6 * n),
                             eval_loss=(2 + 0.1 * np.log(n / n_opt) ** 2) * np.exp(rng.normal(0, 0.002))))
    spec = IsoFlopSpec(name="loss_vs_size_per_budget")
    curve = fit_study_curves(pd.DataFrame(rows), [spec], ("eval_loss", "min"), bootstrap=100)[spec.name]
    lines = curve_lines(json.loads(json.dumps(curve.to_dict())))
    assert sum("optimum at" in line for line in lines) == 3
    a = curve.isoflop.n_opt.a
    assert a == pytest.approx(0.5, abs=0.05)
    assert any(line.startswith(f"  optimal size at the optimum ~ compute^{a:.3g} [") for line in lines)
