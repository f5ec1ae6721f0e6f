"""The support-intent project end to end: seven stages, a TF-IDF baseline and a PyTorch model that both reach a
useful macro-F1, a registered champion that classifies raw messages in a fresh process, and a cached rerun."""
import json
import shutil
import subprocess
import sys

import pytest

from conftest import REPO, check_reference_project, run_mlwb, set_stage_parameters
from mlwb.config import load_settings
from mlwb.milestones import load_milestones
from mlwb.tracking import mlflow_client

PROJECT = "support-intent"
STAGES = ["ingest", "clean", "split", "baseline", "train", "evaluate", "register"]
SMALLER = {"ingest": {"n_messages": 2000}, "train": {"max_epochs": 12}}  # a little less work than the defaults, set in the workspace copy


@pytest.fixture(scope="module")
def pipeline_run(tmp_path_factory):
    "The pipeline run twice in a fresh workspace; the workspace and both completed processes."
    ws = tmp_path_factory.mktemp("intent") / "ws"
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
    assert json.loads((ws / "projects" / PROJECT / "artifacts" / "example_rows.json").read_text())[0].keys() == {"text"}


def test_rerun_with_nothing_changed_reuses_every_stage(pipeline_run):
    _, _, second = pipeline_run
    assert second.returncode == 0, second.stdout + second.stderr
    assert all(f"↷ {stage}" in second.stdout for stage in STAGES), second.stdout


def test_both_models_are_useful_and_the_choice_beats_the_trivial_bot(pipeline_run):
    ws, _, _ = pipeline_run
    by_stage = stage_runs(ws)
    assert sorted(by_stage) == sorted(STAGES)
    baseline, train, evaluate = (by_stage[s].data.metrics for s in ("baseline", "train", "evaluate"))
    assert baseline["valid_macro_f1"] > 0.85 and train["valid_macro_f1"] > 0.85
    assert "epoch_train_loss" in train  # the network's learning curve was logged
    chosen = by_stage["evaluate"].data.tags["chosen_model"]
    assert chosen == ("pytorch" if train["valid_macro_f1"] > baseline["valid_macro_f1"] else "tfidf")
    assert evaluate["test_macro_f1"] > 0.85 > 0.2 > evaluate["baseline_macro_f1"]
    assert evaluate["test_answered_accuracy"] >= evaluate["test_accuracy"] and 0.5 < evaluate["test_coverage"] <= 1
    assert by_stage["split"].data.metrics["naive_shared_texts"] > 0  # the lesson's premise: a random split leaks


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


def test_champion_classifies_raw_messages_in_a_fresh_process(pipeline_run):
    ws, _, _ = pipeline_run
    champion = mlflow_client(load_settings(ws, environ={})).get_model_version_by_alias(PROJECT, "champion")
    assert str(champion.version) == "1" and champion.tags["model_kind"] in ("pytorch", "tfidf")
    code = """
import json, sys, mlflow, numpy as np, pandas as pd
mlflow.set_tracking_uri(sys.argv[1]); mlflow.set_registry_uri(sys.argv[1])
uri = "models:/support-intent@champion"
model = mlflow.pyfunc.load_model(uri)
messages = pd.DataFrame({"text": ["I FORGOT MY PASSWORD", "where is my order #48213", "hi", "my app keeps crashing on my iphone", "plz refund the broken headphones"]})
proba = np.asarray(model.predict(messages))
sklearn_model = mlflow.sklearn.load_model(uri)
print(json.dumps({"inputs": model.metadata.get_input_schema().input_names(), "shape": list(proba.shape),
                  "sums": proba.sum(axis=1).tolist(), "intents": sklearn_model.predict(messages).tolist()}))
"""
    uri = f"sqlite:///{ws / 'mlruns' / 'mlflow.db'}"
    out = subprocess.run([sys.executable, "-c", code, uri], cwd=ws, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["inputs"] == ["text"] and result["shape"] == [5, 7] and all(abs(s - 1) < 1e-6 for s in result["sums"])
    assert result["intents"][:4] == ["password_reset", "shipping", "greeting", "technical_issue"], result["intents"]


def test_the_reference_project_passes_all_its_checks(pipeline_run):
    ws, _, _ = pipeline_run
    checked = check_reference_project(ws, PROJECT)
    assert all(f"↷ {stage}" in checked.stdout for stage in STAGES), checked.stdout  # the check reused the pipeline's runs
