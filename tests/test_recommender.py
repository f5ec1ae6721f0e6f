"""The recommender project end to end: six stages, matrix factorisation that beats the popularity baseline on
nDCG@10, a registered champion that loads in a fresh process and answers top-k requests, and a rerun that
reuses every stage."""
import json
import os
import shutil
import subprocess
import sys

import nbformat
import pytest
import yaml

from conftest import REPO, check_reference_project, run_mlwb
from mlwb.config import load_settings
from mlwb.tracking import mlflow_client

PROJECT = REPO / "projects" / "recommender"
STAGES = ["ingest", "clean", "split", "train", "evaluate", "register"]
CHECKS = {"no_missing", "file_exists", "metric_at_least", "metric_at_most", "model_registered", "api_answers", "drift_alarm"}


@pytest.fixture(scope="module")
def recommender_run(tmp_path_factory):
    "The recommender pipeline run twice in a fresh workspace, with its default parameters."
    ws = tmp_path_factory.mktemp("recommender") / "ws"
    shutil.copytree(PROJECT, ws / "projects" / "recommender",
                    ignore=shutil.ignore_patterns("data", "artifacts", ".ipynb_checkpoints", "__pycache__"))
    shutil.copy(REPO / "settings.ini", ws / "settings.ini")
    env = {"MLWB_WORKSPACE": str(ws), "MLFLOW_TRACKING_URI": ""}
    first = run_mlwb("run", "recommender", cwd=ws, env=env)
    second = run_mlwb("run", "recommender", cwd=ws, env=env)
    return ws, first, second


def stage_runs(ws) -> dict:
    "The first pipeline run's child runs, by stage name."
    client = mlflow_client(load_settings(ws, environ={}))
    experiment = client.get_experiment_by_name("recommender")
    runs = client.search_runs([experiment.experiment_id], order_by=["attributes.start_time ASC"])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    return {c.data.tags["mlwb.stage"]: c for c in children}


def test_every_stage_runs(recommender_run):
    ws, first, _ = recommender_run
    assert first.returncode == 0, first.stdout + first.stderr
    assert all(f"✓ {stage}" in first.stdout for stage in STAGES), first.stdout
    executed = sorted(p.name for f in (ws / "runs" / "recommender").iterdir() if f.is_dir() for p in f.glob("*.ipynb"))
    assert executed == [f"{i:02d}_{s}.ipynb" for i, s in enumerate(STAGES, 1)]


def test_rerun_with_nothing_changed_reuses_every_stage(recommender_run):
    _, _, second = recommender_run
    assert second.returncode == 0, second.stdout + second.stderr
    assert all(f"↷ {stage}" in second.stdout for stage in STAGES), second.stdout


def test_metrics_are_logged_and_the_recommender_beats_popularity(recommender_run):
    ws, _, _ = recommender_run
    by_stage = stage_runs(ws)
    assert sorted(by_stage) == sorted(STAGES)
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


def test_milestones_name_real_stages_checks_and_metrics_that_pass(recommender_run):
    ws, _, _ = recommender_run
    milestones = yaml.safe_load((PROJECT / "milestones.yml").read_text())["milestones"]
    assert [m["id"] for m in milestones] == list(range(1, len(milestones) + 1))
    by_stage = stage_runs(ws)
    for m in milestones:
        assert m["stage"] in STAGES and m["check"] in CHECKS and m["hint"] and m["minutes"] > 0, m
        if m["check"] == "metric_at_least":
            assert by_stage[m["with"]["stage"]].data.metrics[m["with"]["metric"]] >= m["with"]["value"], m
        if "path" in m["with"] or "rows" in m["with"]:
            assert (ws / "projects" / "recommender" / m["with"].get("path", m["with"].get("rows"))).is_file(), m
    assert {m["check"] for m in milestones} >= {"metric_at_least", "model_registered", "api_answers"}


def test_every_stage_notebook_has_an_exercise_with_a_hint():
    for number, stage in enumerate(STAGES, 1):
        nb = nbformat.read(PROJECT / f"{number:02d}_{stage}.ipynb", as_version=4)
        blocks = [c.source.splitlines() for c in nb.cells if c.cell_type == "code" and "### BEGIN SOLUTION" in c.source]
        assert blocks, f"{stage}: no exercise"
        for lines in blocks:
            begin = [line.strip() for line in lines].index("### BEGIN SOLUTION")
            assert lines[begin + 1].strip().startswith("# hint:") and any(l.strip() == "### END SOLUTION" for l in lines[begin:]), stage
        assert sum("parameters" in c.metadata.get("tags", []) for c in nb.cells) == 1, stage


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


def test_champion_loads_in_a_fresh_process_and_answers_top_k(recommender_run):
    ws, _, _ = recommender_run
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


def test_the_reference_project_passes_all_its_checks(recommender_run):
    ws, _, _ = recommender_run
    checked = check_reference_project(ws, "recommender")
    assert all(f"↷ {stage}" in checked.stdout for stage in STAGES), checked.stdout  # the check reused the pipeline's runs
