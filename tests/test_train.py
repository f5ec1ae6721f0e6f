"""Training across modules: a PyTorch model logged by `train` loads through pyfunc in a fresh process,
seeded runs repeat exactly, per-epoch metrics reach MLflow, and a run records how to train its model again."""
import json
import subprocess
import sys

import mlflow
import numpy as np
import pandas as pd
import pytest

from mlwb.config import load_settings
from mlwb.generate import make_card_transactions
from mlwb.tracking import ensure_experiment, mlflow_client
from mlwb.train import TrainError, data_hash, train

SPEC = {"numeric": ["amount", "distance_from_home_km", "hour"], "categorical": ["merchant_category"]}
TORCH = {"hidden_sizes": [16], "max_epochs": 8, "batch_size": 128, "patience": 3}


@pytest.fixture(scope="module")
def cards():
    frame = make_card_transactions(n_cards=200, n_days=14, seed=3)
    return frame[["amount", "distance_from_home_km", "hour", "merchant_category", "is_fraud"]]


@pytest.fixture
def store(tmp_path):
    settings = load_settings(tmp_path, environ={})
    client = mlflow_client(settings)
    mlflow.set_tracking_uri(client.tracking_uri)
    yield client, ensure_experiment(client, "train-tests", settings)
    mlflow.set_tracking_uri(None)


def test_logged_pytorch_pipeline_loads_in_a_fresh_process_and_predicts_the_same(cards, store, tmp_path):
    client, experiment_id = store
    with mlflow.start_run(experiment_id=experiment_id) as run:
        result = train(cards, "is_fraud", "torch_mlp", features=SPEC, params=TORCH, folds=0, imbalance="weights")
    rows = cards.drop(columns=["is_fraud"]).head(25)
    rows.to_parquet(tmp_path / "rows.parquet")
    code = ("import sys, json, mlflow, numpy as np, pandas as pd\n"
            "mlflow.set_tracking_uri(sys.argv[1])\n"
            "model = mlflow.pyfunc.load_model(sys.argv[2])\n"
            "print(json.dumps(np.asarray(model.predict(pd.read_parquet(sys.argv[3]))).tolist()))")
    out = subprocess.run([sys.executable, "-c", code, client.tracking_uri, result.model_uri, str(tmp_path / "rows.parquet")],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert np.allclose(json.loads(out.stdout.strip().splitlines()[-1]), result.pipeline.predict_proba(rows), atol=1e-6)
    history = client.get_metric_history(run.info.run_id, "epoch_train_loss")
    assert len(history) == len(result.pipeline[-1].history_) >= 1


def test_two_seeded_runs_give_identical_metrics(cards):
    kwargs = dict(model="torch_mlp", features=SPEC, params=TORCH, folds=3, log=False, seed=11)
    first, second = train(cards, "is_fraud", **kwargs), train(cards, "is_fraud", **kwargs)
    assert first.metrics == second.metrics
    other = train(cards, "is_fraud", **{**kwargs, "seed": 12})
    assert other.metrics != first.metrics


def test_cross_validation_logs_one_step_per_fold_and_the_data_hash(cards, store):
    client, experiment_id = store
    with mlflow.start_run(experiment_id=experiment_id) as run:
        train(cards, "is_fraud", "logistic", features=SPEC, folds=4, seed=5)
    stored = client.get_run(run.info.run_id)
    assert [m.step for m in client.get_metric_history(run.info.run_id, "fold_roc_auc")] == [0, 1, 2, 3]
    assert len(stored.data.tags["mlwb.train_data_hash"]) == 64 and stored.data.tags["mlwb.seed"] == "5"
    assert stored.data.tags["mlwb.valid_data_hash"] == ""  # no validation frame: the folds validated
    assert stored.data.params["folds"] == "4" and "cv_roc_auc_mean" in stored.data.metrics


def test_a_run_records_how_to_train_its_model_again(cards, store):
    client, experiment_id = store
    train_rows, valid_rows = cards.iloc[:2000], cards.iloc[2000:]
    with mlflow.start_run(experiment_id=experiment_id) as run:
        result = train(train_rows, "is_fraud", "logistic", features=SPEC, params={"C": 0.5}, valid=valid_rows, seed=9, imbalance="weights")
    stored = client.get_run(run.info.run_id).data
    assert {k: stored.params[k] for k in ("model", "task", "target", "folds", "seed", "imbalance", "model__C")} == {
        "model": "LogisticRegression", "task": "classification", "target": "is_fraud", "folds": "0", "seed": "9",
        "imbalance": "weights", "model__C": "0.5"}
    assert mlflow.artifacts.load_dict(f"runs:/{run.info.run_id}/features.json") == SPEC
    assert stored.tags["mlwb.train_data_hash"] == data_hash(train_rows) and stored.tags["mlwb.valid_data_hash"] == data_hash(valid_rows)
    info = mlflow.models.get_model_info(result.model_uri)
    features = list(cards.columns.drop("is_fraud"))
    assert info.signature.inputs.input_names() == features and info.saved_input_example_info is not None
    probabilities = info.signature.outputs.inputs[0]  # predict_proba: one float column per class
    assert probabilities.type.name == "float64" and probabilities.shape == (-1, 2)


@pytest.mark.parametrize("kwargs, message", [
    ({"target": "nope"}, "target column 'nope'"),
    ({"target": "is_fraud", "task": "ranking"}, "task must be one of"),
    ({"target": "is_fraud", "imbalance": "smote"}, "imbalance must be one of"),
])
def test_bad_training_requests_name_what_is_wrong(cards, kwargs, message):
    with pytest.raises(TrainError, match=message):
        train(cards, log=False, **kwargs)


def test_missing_target_values_are_refused(cards):
    broken = cards.astype({"is_fraud": "float"})
    broken.loc[broken.index[:3], "is_fraud"] = np.nan
    with pytest.raises(TrainError, match="3 missing values"):
        train(broken, "is_fraud", log=False)
