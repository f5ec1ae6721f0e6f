"""The recommender project, beyond what every project does (tests/test_projects.py): matrix factorisation that
beats the popularity baseline on nDCG@10, and a registered champion that loads in a fresh process and answers
top-k requests."""
import json
import os
import subprocess
import sys

import pytest

from conftest import stage_runs
from mlwb.config import load_settings
from mlwb.tracking import mlflow_client

pytestmark = pytest.mark.parametrize("project_run", ["recommender"], indirect=True)


def test_metrics_are_logged_and_the_recommender_beats_popularity(project_run):
    ws = project_run.ws
    by_stage = stage_runs(ws, "recommender")
    train, evaluate = by_stage["train"].data.metrics, by_stage["evaluate"].data.metrics
    assert train["valid_rmse"] < train["valid_rmse_of_the_mean"]  # the star model learned tastes
    assert train["valid_ndcg_at_10"] > train["valid_baseline_ndcg_at_10"] > train["valid_taste_only_ndcg_at_10"]
    assert evaluate["test_ndcg_at_10"] > evaluate["baseline_test_ndcg_at_10"] and evaluate["test_ndcg_at_10_gain"] > 0
    assert evaluate["test_rmse"] < evaluate["baseline_test_rmse"]
    assert {"test_precision_at_10", "test_recall_at_10", "test_map_at_10", "test_coverage"} <= set(evaluate)
    assert "epoch_train_loss" in train and by_stage["train"].data.params["model__n_factors"] == "8"
    client = mlflow_client(load_settings(ws, environ={}))
    figures = {a.path for a in client.list_artifacts(by_stage["evaluate"].info.run_id, "figures")}
    assert figures == {"figures/ranking_at_n.png", "figures/exposure.png"}
    assert by_stage["register"].data.tags["mlwb.gate.passed"] == "true"


CHAMPION = """
import json, os, sys, mlflow, pandas as pd
mlflow.set_tracking_uri(sys.argv[1]); mlflow.set_registry_uri(sys.argv[1])
assert not os.environ.get("MLFLOW_ALLOW_PICKLE_DESERIALIZATION")  # models from code: nothing is unpickled
uri = "models:/recommender@champion"
info = mlflow.models.get_model_info(uri)
model = mlflow.pyfunc.load_model(uri)
rows = pd.read_json("projects/recommender/artifacts/example_rows.json", orient="records")
split = pd.read_parquet("projects/recommender/data/split.parquet")
answer = model.predict(rows)
default = model.predict(pd.DataFrame({"user_id": rows.user_id.head(2)}))  # without k: the default length
print(json.dumps({"inputs": info.signature.inputs.input_names(), "outputs": info.signature.outputs.input_names(),
                  "example": info.saved_input_example_info is not None, "rows": rows.to_dict("records"),
                  "answer": answer.tolist(), "default_lengths": default.map(len).tolist(),
                  "items": sorted(split.item_id.unique()),
                  "rated": {u: sorted(g.item_id) for u, g in split[split.split != "test"].groupby("user_id")}}))
"""


def test_champion_loads_in_a_fresh_process_and_answers_top_k(project_run):
    ws = project_run.ws
    client = mlflow_client(load_settings(ws, environ={}))
    champion = client.get_model_version_by_alias("recommender", "champion")
    assert str(champion.version) == "1" and float(champion.tags["test_ndcg_at_10"]) > float(champion.tags["baseline_test_ndcg_at_10"])
    uri = f"sqlite:///{ws / 'mlruns' / 'mlflow.db'}"
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_ALLOW_PICKLE_DESERIALIZATION"}
    out = subprocess.run([sys.executable, "-c", CHAMPION, uri], cwd=ws, capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["inputs"] == ["user_id", "k"] and result["outputs"] == ["items"] and result["example"]
    assert len(result["answer"]) == len(result["rows"])
    known, rated = set(result["items"]), result["rated"]
    for row, items in zip(result["rows"], result["answer"]):
        assert len(items) == row["k"] == len(set(items)) and set(items) <= known, items  # k distinct, known items
        assert not set(items) & set(rated.get(row["user_id"], [])), items  # nothing the user already rated
    assert any(r["user_id"] not in rated for r in result["rows"])  # a newcomer is asked too, and answered
    assert result["default_lengths"] == [10, 10]  # k defaults to the trained k
