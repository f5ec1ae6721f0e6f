"""The house-prices project, beyond what every project does (tests/test_projects.py): cleaning leaves no gaps,
the metrics beat the rule-of-thumb baseline, and the registered champion prices raw rows in a fresh process."""
import json
import subprocess
import sys

import pytest

from conftest import stage_runs
from mlwb.config import load_settings
from mlwb.tracking import mlflow_client

PROJECT = "house-prices"
pytestmark = pytest.mark.parametrize("project_run", [PROJECT], indirect=True)


def test_the_register_stage_writes_example_rows(project_run):
    assert (project_run.folder / "artifacts" / "example_rows.parquet").is_file()


def test_cleaning_leaves_no_gaps_and_the_model_beats_the_baseline(project_run):
    ws = project_run.ws
    by_stage = stage_runs(ws, PROJECT)
    clean, train, evaluate = (by_stage[s].data.metrics for s in ("clean", "train", "evaluate"))
    assert clean["missing_values_left"] == 0 and clean["drop_duplicates_rows"] > 0 and clean["square_feet_to_metres_living_area_m2"] > 0
    assert train["valid_rmse"] < train["baseline_rmse"] < train["mean_baseline_rmse"] and train["valid_r2"] > 0.85
    assert evaluate["test_rmse"] < evaluate["baseline_rmse"] and evaluate["test_within_tolerance"] > evaluate["baseline_within_tolerance"]
    assert by_stage["ingest"].data.params["n_houses"] == "1500"


def test_champion_prices_raw_rows_in_a_fresh_process(project_run):
    ws = project_run.ws
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
