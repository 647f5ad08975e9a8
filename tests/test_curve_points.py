"""What a curve's points are: a cell's best tuned configuration and its seeds,
never a stopped-early trial; x as it was run; groups as the question compares."""
from pathlib import Path

import pandas as pd
import pytest
import torch

from orchestrator.curves import CurveSpec, fit_study_curves
from orchestrator.planning import make_plan
from orchestrator.results import result_row
from orchestrator.study import Budget, Objective, Profile, Study, StudyError, Uniform, load_study
from trainers.config import TrainConfig
from trainers.data import load_probe_sets

REPO = Path(__file__).resolve().parents[1]
OBJECTIVE = ("probe_top1", "max")


def _row(tid, cell, seq_len, probe, status="finished", role="tune", seed_of=None, lr=1e-3):
    return dict(trial_id=tid, cell=cell, seq_len=seq_len, probe_top1=probe, status=status, role=role,
                seed_of=seed_of, **{"tuned.base_lr": lr})


def _table():
    rows = []
    for cell, seq_len, base in (("p8", 16, 0.60), ("p4", 64, 0.70), ("p2", 256, 0.75)):
        rows += [
            # the best by far, but ASHA stopped it at the first rung: never a point
            _row(f"{cell}-stopped", cell, seq_len, base + 0.2, status="stopped_early", lr=9e-3),
            _row(f"{cell}-good", cell, seq_len, base, lr=3e-3),
            _row(f"{cell}-poor", cell, seq_len, base - 0.3, lr=1e-2),  # a bad learning rate
            _row(f"{cell}-seed", cell, seq_len, base - 0.01, role="seed", seed_of=f"{cell}-good", lr=3e-3),
        ]
    return pd.DataFrame(rows)


SPEC = CurveSpec(name="probe_vs_seq_len", x="seq_len", y="probe_top1", law="power", higher_is_better=True)


def test_a_point_is_the_cells_best_finished_configuration_and_its_seeds():
    curve = fit_study_curves(_table(), [SPEC], OBJECTIVE, bootstrap=20)[SPEC.name]
    group = curve.groups["all"]
    assert sorted(group.trial_ids) == sorted(f"{c}-{k}" for c in ("p8", "p4", "p2") for k in ("good", "seed"))
    assert list(group.summary["n"]) == [2, 2, 2]
    assert group.summary["mean"].tolist() == pytest.approx([0.595, 0.695, 0.745])
    saved = curve.to_dict()
    assert saved["points_are"].startswith("each cell's best tuned configuration")
    assert {p["trial_id"] for p in saved["groups"]["all"]["points"]} == set(group.trial_ids)


def test_without_seeds_the_best_finished_tuning_trial_is_the_point():
    table = _table()
    table = table[table.role == "tune"]
    group = fit_study_curves(table, [SPEC], OBJECTIVE, bootstrap=20)[SPEC.name].groups["all"]
    assert sorted(group.trial_ids) == ["p2-good", "p4-good", "p8-good"]


def test_a_searched_x_takes_every_finished_trial_and_refuses_early_stopping():
    table = pd.DataFrame([dict(trial_id=f"t{i}", cell="u1", status=s, role="tune", seed_of=None,
                               effective_mask_ratio=r, probe_top1=0.7 - (r - 0.75) ** 2,
                               **{"tuned.mask_ratio": r})
                          for i, (r, s) in enumerate([(0.5, "finished"), (0.6, "finished"), (0.75, "finished"),
                                                      (0.9, "finished"), (0.95, "stopped_early")])])
    spec = CurveSpec(name="m", x="effective_mask_ratio", y="probe_top1", law="quadratic", higher_is_better=True)
    curve = fit_study_curves(table, [spec], OBJECTIVE, bootstrap=20)["m"]
    assert sorted(curve.groups["all"].trial_ids) == ["t0", "t1", "t2", "t3"]
    assert curve.point_rule.startswith("every trial that trained to its budget")
    profile = Profile(axes={"mask_unit": [1, 2]}, budget=Budget(steps=4))
    with pytest.raises(ValueError, match="early stopping would drop the worse ones"):
        Study(name="m", question="q", profiles={"local": profile}, tune={"mask_ratio": Uniform(low=0.5, high=0.9)},
              objective=Objective(metric="probe_top1", mode="max"), curves=[spec])


def test_the_mask_ratio_curve_is_drawn_at_the_ratio_run():
    study = load_study(REPO / "studies" / "mask_ratio_sweep.py")
    assert [c.x for c in study.curves] == ["effective_mask_ratio"] and not study.early_stopping
    cfg = TrainConfig(img_size=32, patch_size=4, mask_ratio=0.7, mask_unit=2)
    row = result_row("t", {"cell": "mask_unit=2", "replicate": 0, "role": "tune", "mask_ratio": 0.7,
                           "train": cfg.model_dump(mode="json")}, {"status": "finished"}, "finished")
    assert row["effective_mask_ratio"] == 1 - 19 / 64 and row["tuned.mask_ratio"] == 0.7


def test_the_window_study_compares_variants_at_each_resolution_with_equal_visible_patches():
    study = load_study(REPO / "studies" / "window_size_compute.py")
    assert all(c.group_by == ("variant", "img_size") for c in study.curves)
    assert {c.y for c in study.curves} == {"probe_top1", "eval_loss"}  # the smooth objective beside
    for profile in ("local", "cluster"):
        plan = make_plan(study, profile)
        lomar = [c.config for c in plan.cells if c.config.model == "lomar"]
        assert {c.visible_patches for c in lomar} == {40}, profile  # exact, as the study claims
        assert all(c.windows == 4 for c in lomar if c.window_size == 7)  # the paper's 4 windows of 7x7
    table = pd.DataFrame([dict(trial_id=f"{v}{r}{s}", cell=f"{v}{r}{s}", variant=v, img_size=r, flops=s * 1e9,
                               probe_top1=0.5 + 0.01 * s, status="finished", role="seed", seed_of=None)
                          for v in ("lomar w7", "mae") for r in (28, 42) for s in (1, 2, 4)])
    curve = fit_study_curves(table, study.curves[:1], OBJECTIVE, bootstrap=20)[study.curves[0].name]
    assert list(curve.groups) == ["lomar w7, img_size=28", "lomar w7, img_size=42", "mae, img_size=28",
                                  "mae, img_size=42"]


def test_a_window_that_cannot_show_the_same_visible_patches_is_refused(tmp_path):
    text = (REPO / "studies" / "window_size_compute.py").read_text().replace(
        '"window_size": [5, 7, 14], "img_size": [28, 42]', '"window_size": [5, 7, 9], "img_size": [28, 42]')
    path = tmp_path / "w.py"
    path.write_text(text)
    with pytest.raises(StudyError, match="window 9x9 shows 17 patches"):
        make_plan(load_study(path), "local", path)


def test_the_trials_of_a_cell_are_probed_on_the_same_images():
    base = dict(preset="tiny", img_size=16, patch_size=4, probe_train_size=50, probe_eval_size=20)
    a, b = load_probe_sets(TrainConfig(**base, seed=0)), load_probe_sets(TrainConfig(**base, seed=3))
    for (xa, ya), (xb, yb) in zip(a, b):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    other = load_probe_sets(TrainConfig(**base, probe_seed=1))
    assert not torch.equal(other[0][1], a[0][1])  # the setting does pick the subset
