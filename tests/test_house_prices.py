"""The house-prices project end to end: six stages, metrics that beat the rule-of-thumb baseline, a registered
champion that prices raw rows in a fresh process, and a rerun that reuses every stage."""
import json
import shutil
import subprocess
import sys

import pytest

from conftest import REPO, check_reference_project, run_mlwb, set_stage_parameters
from mlwb.config import load_settings
from mlwb.milestones import load_milestones
from mlwb.tracking import mlflow_client

PROJECT = "house-prices"
STAGES = ["ingest", "clean", "split", "train", "evaluate", "register"]
SMALLER = {"ingest": {"n_houses": 1500}}  # a little less data than the default, set in the workspace copy


@pytest.fixture(scope="module")
def pipeline_run(tmp_path_factory):
    "The pipeline run twice in a fresh workspace; the workspace and both completed processes."
    ws = tmp_path_factory.mktemp("house") / "ws"
    shutil.copytree(REPO / "projects" / PROJECT, ws / "projects" / PROJECT, ignore=shutil.ignore_patterns("data", "artifacts", ".ipynb_checkpoints"))
    shutil.copy(REPO / "settings.ini", ws / "settings.ini")
    set_stage_parameters(ws / "projects" / PROJECT, dict(SMALLER))
    env = {"MLWB_WORKSPACE": str(ws), "MLFLOW_TRACKING_URI": ""}
    first = run_mlwb("run", PROJECT, cwd=ws, env=env)
    second = run_mlwb("run", PROJECT, cwd=ws, env=env)
    return ws, first, second


def stage_runs(ws) -> dict:
    "The child runs of the first pipeline run, by stage name."
    client = mlflow_client(load_settings(ws, environ={}))
    experiment = client.get_experiment_by_name(PROJECT)
    runs = client.search_runs([experiment.experiment_id], order_by=["attributes.start_time ASC"])
    parent = next(r for r in runs if "mlflow.parentRunId" not in r.data.tags)
    return {r.data.tags["mlwb.stage"]: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}


def test_every_stage_runs(pipeline_run):
    ws, first, _ = pipeline_run
    assert first.returncode == 0, first.stdout + first.stderr
    assert all(f"✓ {stage}" in first.stdout for stage in STAGES), first.stdout
    assert (ws / "projects" / PROJECT / "artifacts" / "example_rows.parquet").is_file()


def test_rerun_with_nothing_changed_reuses_every_stage(pipeline_run):
    _, _, second = pipeline_run
    assert second.returncode == 0, second.stdout + second.stderr
    assert all(f"↷ {stage}" in second.stdout for stage in STAGES), second.stdout


def test_cleaning_leaves_no_gaps_and_the_model_beats_the_baseline(pipeline_run):
    ws, _, _ = pipeline_run
    by_stage = stage_runs(ws)
    assert sorted(by_stage) == sorted(STAGES)
    clean, train, evaluate = (by_stage[s].data.metrics for s in ("clean", "train", "evaluate"))
    assert clean["missing_values_left"] == 0 and clean["drop_duplicates_rows"] > 0 and clean["square_feet_to_metres_living_area_m2"] > 0
    assert train["valid_rmse"] < train["baseline_rmse"] < train["mean_baseline_rmse"] and train["valid_r2"] > 0.85
    assert evaluate["test_rmse"] < evaluate["baseline_rmse"] and evaluate["test_within_tolerance"] > evaluate["baseline_within_tolerance"]
    assert by_stage["ingest"].data.params["n_houses"] == "1500"


def test_milestones_name_known_stages_and_metrics_that_were_logged(pipeline_run):
    ws, _, _ = pipeline_run
    by_stage = stage_runs(ws)
    for milestone in load_milestones(REPO / "projects" / PROJECT):
        assert milestone.stage in STAGES, milestone
        if milestone.check.startswith("metric_"):
            value = by_stage[milestone.args["stage"]].data.metrics[milestone.args["metric"]]
            passes = value >= milestone.args["value"] if milestone.check == "metric_at_least" else value <= milestone.args["value"]
            assert passes, (milestone, value)
        if "path" in milestone.args or "rows" in milestone.args:
            assert (ws / "projects" / PROJECT / milestone.args.get("path", milestone.args.get("rows"))).is_file(), milestone


def test_champion_prices_raw_rows_in_a_fresh_process(pipeline_run):
    ws, _, _ = pipeline_run
    champion = mlflow_client(load_settings(ws, environ={})).get_model_version_by_alias(PROJECT, "champion")
    assert str(champion.version) == "1" and float(champion.tags["test_rmse"]) < float(champion.tags["baseline_rmse"])
    code = """
import json, sys, mlflow, numpy as np, pandas as pd
mlflow.set_tracking_uri(sys.argv[1]); mlflow.set_registry_uri(sys.argv[1])
model = mlflow.pyfunc.load_model("models:/house-prices@champion")
names = model.metadata.get_input_schema().input_names()
rows = pd.read_parquet("projects/house-prices/data/sales.parquet").head(40)  # raw rows, as they came, gaps included
rows = rows[rows.neighborhood.isin(["old_town", "suburbs", "riverside"])].astype({c: "float64" for c in ("lot_area_m2", "year_built")})
prices = model.predict(rows[names])
examples = pd.read_parquet("projects/house-prices/artifacts/example_rows.parquet")
print(json.dumps({"names": names, "n": len(rows), "prices": np.asarray(prices).tolist(), "gaps": int(rows[names].isna().sum().sum()),
                  "examples": np.asarray(model.predict(examples)).tolist()}))
"""
    uri = f"sqlite:///{ws / 'mlruns' / 'mlflow.db'}"
    out = subprocess.run([sys.executable, "-c", code, uri], cwd=ws, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert "sale_date" not in result["names"] and "price" not in result["names"] and "living_area_m2" in result["names"]
    assert len(result["prices"]) == result["n"] > 0 and all(20_000 < p < 5_000_000 for p in result["prices"])
    assert len(result["examples"]) == 5


def test_the_reference_project_passes_all_its_checks(pipeline_run):
    ws, _, _ = pipeline_run
    checked = check_reference_project(ws, PROJECT)
    assert all(f"↷ {stage}" in checked.stdout for stage in STAGES), checked.stdout  # the check reused the pipeline's runs
