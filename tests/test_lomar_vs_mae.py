"""bench/lomar_vs_mae.py on a tiny preset: both methods train in alternating rounds with
a torch thread per core this process is given, and the last line is the speedup."""
import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_lomar_vs_mae_smoke():
    done = subprocess.run([sys.executable, "bench/lomar_vs_mae.py", "--preset", "tiny", "--patch-size", "4",
                           "--sizes", "28,56", "--rounds", "2"], cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-4000:]
    assert f"cpu, {len(os.sched_getaffinity(0))} torch threads" in out
    assert out.count("round 1:") == 2
    assert re.fullmatch(r"lomar_speedup_56=\d+\.\d\d", done.stdout.strip().splitlines()[-1])
