"""The support-intent project, beyond what every project does (tests/test_projects.py): a TF-IDF baseline and
a PyTorch model that both reach a useful macro-F1, and a registered champion that classifies raw messages in a
fresh process."""
import json
import subprocess
import sys

import pytest

from conftest import stage_runs
from mlwb.config import load_settings
from mlwb.tracking import mlflow_client

PROJECT = "support-intent"
pytestmark = pytest.mark.parametrize("project_run", [PROJECT], indirect=True)


def test_the_register_stage_writes_example_requests_of_raw_text(project_run):
    assert json.loads((project_run.folder / "artifacts" / "example_rows.json").read_text())[0].keys() == {"text"}


def test_both_models_are_useful_and_the_choice_beats_the_trivial_bot(project_run):
    ws = project_run.ws
    by_stage = stage_runs(ws, PROJECT)
    baseline, train, evaluate = (by_stage[s].data.metrics for s in ("baseline", "train", "evaluate"))
    assert baseline["valid_macro_f1"] > 0.85 and train["valid_macro_f1"] > 0.85
    assert "epoch_train_loss" in train  # the network's learning curve was logged
    chosen = by_stage["evaluate"].data.tags["chosen_model"]
    assert chosen == ("pytorch" if train["valid_macro_f1"] > baseline["valid_macro_f1"] else "tfidf")
    assert evaluate["test_macro_f1"] > 0.85 > 0.2 > evaluate["baseline_macro_f1"]
    assert evaluate["test_answered_accuracy"] >= evaluate["test_accuracy"] and 0.5 < evaluate["test_coverage"] <= 1
    assert by_stage["split"].data.metrics["naive_shared_texts"] > 0  # the lesson's premise: a random split leaks


def test_champion_classifies_raw_messages_in_a_fresh_process(project_run):
    ws = project_run.ws
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
