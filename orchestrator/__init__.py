"""Scaling studies of masked-image pretraining: study files become Ray Tune + Optuna
campaigns of Ray Train runs, tracked in MLflow, ending in fitted curves.

In a notebook: `from orchestrator import load_study_results` (see orchestrator/notebook.py).
"""


def __getattr__(name: str):
    # Imported on first use: every process that imports a part of orchestrator
    # (Ray's trial drivers and workers among them) would otherwise import pandas,
    # SciPy and matplotlib for the curves.
    if name == "load_study_results":
        from orchestrator.notebook import load_study_results

        return load_study_results
    raise AttributeError(f"module 'orchestrator' has no attribute {name!r}")
