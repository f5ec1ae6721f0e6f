"""The first guided project, beyond what every project does (tests/test_projects.py): its stages log the
metrics a fraud model is judged by, the registered champion loads in a fresh process and, served, answers a raw
transaction with the batch score (its velocity features from the online store), and the monitoring
stage alarms on the drifted week only."""
import json
import subprocess
import sys

import pytest

from conftest import stage_runs

pytestmark = pytest.mark.parametrize("project_run", ["fraud-detection"], indirect=True)


def test_stages_log_the_fraud_metrics_and_the_smaller_data(project_run):
    by_stage = stage_runs(project_run.ws, "fraud-detection")
    assert by_stage["train"].data.metrics["valid_average_precision"] > 0.3
    assert by_stage["evaluate"].data.metrics["test_roc_auc"] > 0.8
    assert by_stage["ingest"].data.params["n_cards"] == "1000"


def test_champion_is_registered_and_loads_in_a_fresh_process(project_run):
    ws = project_run.ws
    code = """
import json, sys, mlflow, pandas as pd
mlflow.set_tracking_uri(sys.argv[1]); mlflow.set_registry_uri(sys.argv[1])
uri = "models:/fraud-detection@champion"
info = mlflow.models.get_model_info(uri)
assert info.signature is not None and info.saved_input_example_info is not None
example = pd.read_parquet("projects/fraud-detection/data/features.parquet")
names = [c.name for c in info.signature.inputs.inputs]
predictions = mlflow.pyfunc.load_model(uri).predict(example[names].head(50))
print(json.dumps({"n": len(predictions), "columns": names}))
"""
    uri = f"sqlite:///{ws / 'mlruns' / 'mlflow.db'}"
    out = subprocess.run([sys.executable, "-c", code, uri], cwd=ws, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["n"] == 50 and "amount" in result["columns"]


def test_monitoring_alarms_on_the_drifted_week_only(project_run):
    folder = project_run.folder / "artifacts" / "monitoring"
    weekly = json.loads((folder / "weekly.json").read_text())
    assert [w["window"] for w in weekly if w["exit_code"] != 0] == ["week-3"] and weekly[2]["drift"]
    assert all(set(w) == {"window", "drift", "data_quality_failed", "drifted_features", "exit_code"} for w in weekly)
    assert (folder / "report.html").is_file()


def test_served_champion_answers_a_raw_transaction_with_the_batch_score(project_run):
    "Milestone 9's check: `mlwb serve` of the champion takes raw transactions; features and scores match batch."
    from mlwb.checks import CheckContext, get_check
    from mlwb.config import load_settings
    ctx = CheckContext(load_settings(project_run.ws, environ={}), project_run.folder)
    found = get_check("raw_event_answers")(ctx, model="models:/fraud-detection@champion",
                                           events="data/clean.parquet", features="features.yml", n=30)
    assert "answered 30 raw transactions with the batch pipeline's features and scores" in found
