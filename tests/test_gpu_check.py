"""bench/gpu_check.sh, the script a GPU machine runs once, in its CPU smoke mode:
every part runs on the code paths the GPU uses (TrainStep, HF's peer, the three
methods, a study through `python -m orchestrator run`)."""
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_gpu_check_smoke_mode_runs_every_part():
    done = subprocess.run(["bash", "bench/gpu_check.sh", "--smoke"], cwd=REPO, capture_output=True, text=True,
                          timeout=900)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-4000:]
    for part in ("== 1.", "== 2.", "== 3."):
        assert part in out
    assert "skipped" not in out and "FAILED" not in out
    assert "ratio_vs_hf=" in out and "lomar_vs_mae_img_per_s=" in out
    assert "2/2 done (2 finished" in out  # the study's two trials
