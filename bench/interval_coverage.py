"""How often the curves' 95% intervals hold the truth, on synthetic studies with
known truth at the sizes studies have (4 to 8 distinct x, 1 to 3 replicates,
2% to 10% noise). Prints, per setting and law, the coverage of the parameter
intervals, of the vertex (quadratic), of the curve band at the largest x and of
the prediction interval for a new trial at the next x, with their mean widths.

    python bench/interval_coverage.py [--datasets 300] [--bootstrap 200]

Last line: worst_coverage=<lowest coverage of any interval, in %>.
"""
from __future__ import annotations

import argparse
import itertools
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from orchestrator.curves.calibration import coverage  # noqa: E402

def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--datasets", type=int, default=300)
    p.add_argument("--bootstrap", type=int, default=200)
    args = p.parse_args()
    worst = 100.0
    t0 = time.time()
    for law, n_x, reps, noise in itertools.product(("power", "quadratic"), (4, 8), (1, 3), (0.02, 0.10)):
        cov, refused = coverage(law, n_x, reps, noise, args.datasets, args.bootstrap)
        cells = "  ".join(f"{k} {c:5.1f}% (w {w:.3g})" for k, (c, w) in cov.items())
        print(f"{law:9s} x={n_x} reps={reps} noise={noise:.0%}: {cells}" + (f"  [{refused} refused]" if refused else ""),
              flush=True)
        worst = min([worst] + [c for c, _ in cov.values()])
    print(f"# {time.time() - t0:.0f} s")
    print(f"worst_coverage={worst:.1f}")


if __name__ == "__main__":
    main()
