"""A study's MLflow experiment opens on its runs: MLflow 3.17's UI opens an
experiment on GenAI traces unless the link names the Model training view
(`workflowType`); older MLflow 3 UIs read the experiment's kind tag instead.
(Seen in headless Chromium against MLflow 3.17.2's `mlflow ui`.)"""
from orchestrator.tracking import ui_hint


def test_run_prints_a_link_that_opens_the_experiment_on_its_runs(tiny_study):
    from mlflow.tracking import MlflowClient

    exp_id = tiny_study.state["experiment_id"]
    url = f"http://127.0.0.1:5000/#/experiments/{exp_id}/runs?workflowType=machine_learning"
    assert f"mlflow ui --backend-store-uri {tiny_study.tracking_uri}`, then {url}" in tiny_study.out
    exp = MlflowClient(tiny_study.tracking_uri).get_experiment(exp_id)
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"


def test_a_tracking_server_is_linked_directly():
    assert ui_hint("http://127.0.0.1:5005/", "7") == \
        "MLflow: http://127.0.0.1:5005/#/experiments/7/runs?workflowType=machine_learning"
