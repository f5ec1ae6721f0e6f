"""The first guided project end to end, as `make run` runs it: six stages, a registered champion that
loads in a fresh process, and a rerun that reuses every stage."""
import json
import shutil
import subprocess
import sys

import pytest

from conftest import REPO, run_mlwb
from mlwb.config import load_settings
from mlwb.tracking import mlflow_client

STAGES = ["ingest", "clean", "features", "train", "evaluate", "register", "monitor"]


@pytest.fixture(scope="module")
def fraud_run(tmp_path_factory):
    "The fraud-detection pipeline run twice in a fresh workspace (smaller data than the default)."
    ws = tmp_path_factory.mktemp("fraud") / "ws"
    shutil.copytree(REPO / "projects" / "fraud-detection", ws / "projects" / "fraud-detection",
                    ignore=shutil.ignore_patterns("data", "artifacts", ".ipynb_checkpoints"))
    shutil.copy(REPO / "settings.ini", ws / "settings.ini")
    env = {"MLWB_WORKSPACE": str(ws), "MLFLOW_TRACKING_URI": ""}
    first = run_mlwb("run", "fraud-detection", "-p", "n_cards=1000", cwd=ws, env=env)
    second = run_mlwb("run", "fraud-detection", "-p", "n_cards=1000", cwd=ws, env=env)
    return ws, first, second


def test_every_stage_runs_and_the_summary_says_where_results_are(fraud_run):
    ws, first, _ = fraud_run
    assert first.returncode == 0, first.stdout + first.stderr
    for stage in STAGES:
        assert f"✓ {stage}" in first.stdout
    assert "executed notebooks:" in first.stdout and "MLflow run:" in first.stdout and "mlwb ui" in first.stdout
    run_folders = list((ws / "runs" / "fraud-detection").iterdir())
    executed = sorted(p.name for f in run_folders if f.is_dir() for p in f.glob("*.ipynb"))
    assert executed == [f"{i:02d}_{s}.ipynb" for i, s in enumerate(STAGES, 1)]


def test_rerun_with_nothing_changed_reuses_every_stage(fraud_run):
    _, _, second = fraud_run
    assert second.returncode == 0, second.stdout + second.stderr
    assert all(f"↷ {stage}" in second.stdout for stage in STAGES), second.stdout


def test_mlflow_holds_the_pipeline_run_its_stages_and_their_metrics(fraud_run):
    ws, _, _ = fraud_run
    client = mlflow_client(load_settings(ws, environ={}))
    experiment = client.get_experiment_by_name("fraud-detection")
    runs = client.search_runs([experiment.experiment_id], order_by=["attributes.start_time ASC"])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 2 and all(p.info.status == "FINISHED" for p in parents)
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert sorted(c.data.tags["mlwb.stage"] for c in children) == sorted(STAGES)
    by_stage = {c.data.tags["mlwb.stage"]: c for c in children}
    assert by_stage["train"].data.metrics["valid_average_precision"] > 0.3
    assert by_stage["evaluate"].data.metrics["test_roc_auc"] > 0.8
    assert by_stage["ingest"].data.params["n_cards"] == "1000"
    artifacts = {a.path for a in client.list_artifacts(parents[0].info.run_id, "reproduce")}
    assert {"reproduce/environment.txt", "reproduce/hashes.json", "reproduce/parameters.json", "reproduce/pipeline.yml"} <= artifacts


def test_champion_is_registered_and_loads_in_a_fresh_process(fraud_run):
    ws, _, _ = fraud_run
    client = mlflow_client(load_settings(ws, environ={}))
    champion = client.get_model_version_by_alias("fraud-detection", "champion")
    assert str(champion.version) == "1"
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


def test_monitoring_alarms_on_the_drifted_week_only(fraud_run):
    ws, _, _ = fraud_run
    folder = ws / "projects" / "fraud-detection" / "artifacts" / "monitoring"
    weekly = json.loads((folder / "weekly.json").read_text())
    assert [w["window"] for w in weekly if w["exit_code"] != 0] == ["week-3"] and weekly[2]["drift"]
    assert all(set(w) == {"window", "drift", "data_quality_failed", "drifted_features", "exit_code"} for w in weekly)
    assert (folder / "report.html").is_file()
