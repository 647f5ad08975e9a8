"""Scaling studies of masked-image pretraining: study files become Ray Tune + Optuna
campaigns of Ray Train runs, tracked in MLflow, ending in fitted curves."""
