"""Model behaviour: scikit-learn's estimator checks on the PyTorch estimators, seeding, early stopping, planted
structure found by matrix factorisation, a text classifier that learns, pickles and MLflow models loaded in a
fresh process."""
import os
import pickle
import subprocess
import sys
import textwrap

import cloudpickle
import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.base import clone
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.exceptions import NotFittedError
from sklearn.utils.estimator_checks import (check_do_not_raise_errors_in_init_or_set_params, check_estimator_cloneable,
                                            check_estimator_repr, check_estimator_tags_renamed, check_get_params_invariance,
                                            check_mixin_order, check_no_attributes_set_in_init,
                                            check_parameters_default_constructible, check_set_params, check_valid_tag_types,
                                            parametrize_with_checks)

from mlwb.config import load_settings
from mlwb.models import ModelError, get_model, list_models, seed_from, split_validation
from mlwb.torch_models import (MatrixFactorization, TorchMLPClassifier, TorchMLPRegressor, TorchTextClassifier,
                               skops_trusted_types)
from mlwb.tracking import ensure_experiment, mlflow_client, tracking_uri

# Small and quick: the checks fit each estimator dozens of times on 2 CPU cores. TorchTextClassifier is not in this
# list on purpose: its tags say X is one text per row (one_d_array, string), and scikit-learn skips *every* check for
# an estimator that does not take a 2-D table, because its checks can only make numeric tables. The checks that need
# no data run on it below, and the fit contract is tested on texts.
CHECKED = [TorchMLPClassifier(hidden_sizes=(32,), lr=0.01, max_epochs=30, random_state=0),
           TorchMLPRegressor(hidden_sizes=(32,), lr=0.01, max_epochs=30, random_state=0),
           MatrixFactorization(n_factors=4, max_epochs=5, random_state=0)]

# MatrixFactorization's X is (user id, item id) pairs: exactly two columns, taken by name from a DataFrame. Many checks
# feed a numeric table of another width, so they fail by design; each is listed with the reason. The rest of its
# checks (cloning, parameters, repr, tags, unfitted errors, fit on 1-D X, ...) must pass.
WIDTH = "the check fits on a numeric table of 3 or more columns; X must be two id columns (user, item), so it is refused"
WRONG_ERROR = ("the check's X is not two columns wide, so the error names the width rather than what the check looks "
               "for (NaN, sparse input, complex numbers, one sample or one feature, no rows)")
RECOMMENDER_FAILURES = {
    **dict.fromkeys(["check_fit_score_takes_y", "check_dont_overwrite_parameters", "check_n_features_in_after_fitting",
                     "check_positive_only_tag_during_fit", "check_estimators_dtypes", "check_dtype_object",
                     "check_pipeline_consistency", "check_estimators_pickle", "check_f_contiguous_array_estimator",
                     "check_regressors_train", "check_regressor_data_not_an_array", "check_regressors_no_decision_function",
                     "check_supervised_y_2d", "check_regressors_int", "check_methods_sample_order_invariance",
                     "check_methods_subset_invariance", "check_dict_unchanged", "check_fit2d_predict1d"], WIDTH),
    **dict.fromkeys(["check_estimators_nan_inf", "check_estimator_sparse_tag", "check_estimator_sparse_array",
                     "check_estimator_sparse_matrix", "check_complex_data", "check_estimators_empty_data_messages",
                     "check_fit2d_1sample", "check_fit2d_1feature"], WRONG_ERROR),
    "check_n_features_in": "it reads its two id columns by name from a DataFrame of any width, so it keeps no n_features_in_",
}


def expected_failures(estimator) -> dict:
    "Checks that do not apply to `estimator`, each with the reason (strict: one that starts passing fails the test)."
    return RECOMMENDER_FAILURES if isinstance(estimator, MatrixFactorization) else {}


@parametrize_with_checks(CHECKED, expected_failed_checks=expected_failures, xfail_strict=True)
def test_sklearn_estimator_checks(estimator, check):
    check(estimator)


DATA_FREE_CHECKS = [check_estimator_cloneable, check_estimator_tags_renamed, check_valid_tag_types, check_estimator_repr,
                    check_no_attributes_set_in_init, check_do_not_raise_errors_in_init_or_set_params, check_mixin_order,
                    check_parameters_default_constructible, check_get_params_invariance, check_set_params]


@pytest.mark.parametrize("check", DATA_FREE_CHECKS, ids=lambda check: check.__name__)
def test_text_classifier_passes_the_checks_that_need_no_table(check):
    check("TorchTextClassifier", TorchTextClassifier(max_epochs=2, random_state=0))


# --- data with a known answer --------------------------------------------------------------------------

def blobs(n=400, seed=0):
    "Two noisy clouds of points in 5 dimensions, labelled 'a' and 'b'."
    rng = np.random.default_rng(seed)
    X = np.concatenate([rng.normal(-1, 1, (n // 2, 5)), rng.normal(1, 1, (n // 2, 5))])
    return X, np.repeat(np.array(["a", "b"]), n // 2)


def latent_ratings(n_users=150, n_items=80, n_factors=3, density=0.3, noise=0.3, seed=0):
    "Ratings generated from hidden user and item factors plus noise: (table, true rating matrix)."
    rng = np.random.default_rng(seed)
    users, items = rng.normal(0, 1, (n_users, n_factors)), rng.normal(0, 1, (n_items, n_factors))
    truth = 3 + rng.normal(0, 0.3, (n_users, 1)) + rng.normal(0, 0.3, (1, n_items)) + users @ items.T / np.sqrt(n_factors)
    user, item = np.nonzero(rng.random((n_users, n_items)) < density)
    ratings = pd.DataFrame({"user_id": [f"u{u}" for u in user], "item_id": item, "rating": truth[user, item] + rng.normal(0, noise, len(user))})
    return ratings, truth


INTENTS = {"balance": ["balance", "much", "money", "left"], "lost_card": ["lost", "stolen", "card", "block"],
           "transfer": ["send", "transfer", "pay", "wire"]}
FILLER = ["please", "hi", "i", "need", "help", "can", "you", "my", "the", "thanks"]


def intents(n=300, seed=0):
    "Support messages: two words of their intent among filler words; the intents are imbalanced."
    rng = np.random.default_rng(seed)
    labels = rng.choice(list(INTENTS), size=n, p=[0.5, 0.2, 0.3])
    texts = [" ".join(rng.permutation(list(rng.choice(INTENTS[y], 2)) + list(rng.choice(FILLER, rng.integers(3, 7))))) for y in labels]
    return texts, labels


def training_data():
    "Small training data of each PyTorch kind: {kind: (X, y)}."
    X, y = blobs(200)
    ratings, _ = latent_ratings(n_users=30, n_items=20)
    return {"classifier": (X, y), "regressor": (X, X[:, 0] * 3),
            "recommender": (ratings[["user_id", "item_id"]], ratings.rating), "text": intents(120)}


def fitted_models(random_state=0):
    "One small fitted model of each PyTorch kind, with the data it was fitted on: {kind: (model, X)}."
    models = {"classifier": TorchMLPClassifier(hidden_sizes=(8,), max_epochs=5), "regressor": TorchMLPRegressor(hidden_sizes=(8,), max_epochs=5),
              "recommender": MatrixFactorization(n_factors=4, max_epochs=5), "text": TorchTextClassifier(max_epochs=5)}
    data = training_data()
    return {kind: (model.set_params(random_state=random_state).fit(*data[kind]), data[kind][0]) for kind, model in models.items()}


def outputs(model, X):
    "What a model says about X: probabilities for a classifier, predictions otherwise."
    return model.predict_proba(X) if hasattr(model, "predict_proba") else model.predict(X)


@pytest.mark.parametrize("kind", ["recommender", "text"])
def test_the_fit_contract_holds_on_the_data_each_model_takes(kind):
    "What scikit-learn's checks cannot test with a numeric table: unfitted errors, fit returning self, parameters left alone."
    X, y = training_data()[kind]
    model = {"recommender": MatrixFactorization(n_factors=4), "text": TorchTextClassifier(embedding_dim=8)}[kind]
    model.set_params(max_epochs=3, random_state=0)
    before = model.get_params()
    with pytest.raises(NotFittedError):
        model.predict(X)
    assert model.fit(X, y) is model and model.get_params() == before
    first = outputs(model, X)
    assert np.array_equal(outputs(model.fit(X, y), X), first) and np.array_equal(outputs(clone(model).fit(X, y), X), first)


# --- reproducibility -------------------------------------------------------------------------------------

def test_same_random_state_gives_identical_predictions():
    first, second, other = fitted_models(0), fitted_models(0), fitted_models(1)
    for kind, (model, X) in first.items():
        assert np.array_equal(outputs(second[kind][0], X), outputs(model, X)), kind
        assert second[kind][0].history_ == model.history_, kind
        assert not np.array_equal(outputs(other[kind][0], X), outputs(model, X)), kind


def test_fitting_leaves_the_callers_random_state_alone():
    X, y = blobs(100)
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    TorchMLPClassifier(max_epochs=2, random_state=0).fit(X, y)
    assert torch.equal(torch.rand(3), expected)


def test_random_state_none_gives_different_models():
    X, y = blobs(100)
    first = TorchMLPClassifier(max_epochs=2).fit(X, y).predict_proba(X)
    second = TorchMLPClassifier(max_epochs=2).fit(X, y).predict_proba(X)
    assert not np.array_equal(first, second)


# --- early stopping --------------------------------------------------------------------------------------

def test_early_stopping_stops_on_a_plateau_and_restores_the_best_weights():
    X, _ = blobs(400)
    y = np.random.default_rng(3).integers(0, 2, 400)  # nothing to learn: validation loss cannot keep falling
    model = TorchMLPClassifier(hidden_sizes=(64, 64), dropout=0.0, lr=0.01, max_epochs=300, patience=4, random_state=0).fit(X, y)
    losses = [h["valid_loss"] for h in model.history_]
    assert len(model.history_) < 300 and len(model.history_) == model.best_epoch_ + 4
    assert min(losses) == losses[model.best_epoch_ - 1] < losses[-1]
    _, valid_rows = split_validation(400, 0.1, torch.Generator().manual_seed(seed_from(0)))  # the rows fit held out
    rows = valid_rows.numpy()
    valid = (torch.tensor(X[rows], dtype=torch.float32), torch.as_tensor(y[rows]))
    assert np.isclose(model._validate(valid, model._loss_fn())["valid_loss"], min(losses), rtol=1e-5)


def test_without_a_validation_split_training_runs_every_epoch():
    X, y = blobs(100)
    model = TorchMLPClassifier(max_epochs=7, validation_fraction=0.0, random_state=0).fit(X, y)
    assert [h["epoch"] for h in model.history_] == list(range(1, 8)) and set(model.history_[0]) == {"epoch", "train_loss"}
    assert model.best_epoch_ == 7


def test_history_has_a_metric_per_epoch_for_each_kind():
    keys = {kind: set(model.history_[0]) for kind, (model, _) in fitted_models().items()}
    assert keys["classifier"] == keys["text"] == {"epoch", "train_loss", "valid_loss", "valid_accuracy"}
    assert keys["regressor"] == keys["recommender"] == {"epoch", "train_loss", "valid_loss", "valid_rmse"}


# --- behaviour of each model -----------------------------------------------------------------------------

def test_class_weight_balanced_finds_the_rare_class():
    rng = np.random.default_rng(0)
    X = np.concatenate([rng.normal(0, 1, (950, 4)), rng.normal(1.2, 1, (50, 4))])
    y = np.r_[np.zeros(950, int), np.ones(50, int)]
    params = dict(hidden_sizes=(16,), lr=0.01, max_epochs=20, validation_fraction=0.0, random_state=0)
    plain = TorchMLPClassifier(**params).fit(X, y)
    balanced = TorchMLPClassifier(class_weight="balanced", **params).fit(X, y)
    recall = lambda m: (m.predict(X[y == 1]) == 1).mean()
    assert recall(balanced) > 0.6 > recall(plain)
    assert np.allclose(balanced.class_weight_, [1000 / (2 * 950), 1000 / (2 * 50)])


def test_matrix_factorization_recovers_planted_latent_structure():
    ratings, truth = latent_ratings()
    held_out = np.random.default_rng(1).random(len(ratings)) < 0.2
    train, test = ratings[~held_out], ratings[held_out]
    model = MatrixFactorization(n_factors=4, lr=0.03, weight_decay=0.05, max_epochs=60, random_state=0)
    model.fit(train[["user_id", "item_id"]], train.rating)
    rmse = lambda predicted: np.sqrt(np.mean((predicted - test.rating.to_numpy()) ** 2))
    assert rmse(model.predict(test[["user_id", "item_id"]])) < 0.5 * rmse(train.rating.mean())
    # recommendations: unseen items, best first, and items the user truly likes
    top = model.recommend(["u0", "u1"], k=5)
    assert len(top) == 10 and not set(zip(top.user_id, top.item_id)) & set(zip(train.user_id, train.item_id))
    assert (top.groupby("user_id").score.diff().dropna() <= 0).all()
    assert truth[0, top.item_id[top.user_id == "u0"].to_numpy()].mean() > np.quantile(truth[0], 0.7)


def test_matrix_factorization_falls_back_for_unknown_users_and_items():
    ratings, _ = latent_ratings(n_users=30, n_items=20)
    model = MatrixFactorization(n_factors=4, max_epochs=10, random_state=0).fit(ratings[["user_id", "item_id"]].to_numpy(), ratings.rating)
    item_means = model.predict(np.array([["nobody", 3], ["nobody", 5]], dtype=object))
    rows = [list(model.item_ids_).index(item) + 1 for item in (3, 5)]  # embedding rows start at 1
    bias = model.module_.item_bias.weight[rows, 0].detach().numpy()
    assert np.allclose(item_means, model.global_mean_ + bias, atol=1e-5)
    assert np.isclose(model.predict(np.array([["nobody", 999]], dtype=object))[0], model.global_mean_)
    cold = model.recommend(["nobody"], k=3)
    best_items = np.argsort(-model.module_.item_bias.weight[1:, 0].detach().numpy(), kind="stable")[:3]
    assert cold.item_id.tolist() == model.item_ids_[best_items].tolist()
    with pytest.raises(ModelError, match="no column"):
        model.predict(pd.DataFrame({"user": ["u1"], "item_id": [1]}))


def test_text_classifier_beats_the_majority_baseline():
    texts, labels = intents(400, seed=0)
    test_texts, test_labels = intents(200, seed=1)
    model = TorchTextClassifier(embedding_dim=16, max_epochs=30, random_state=0).fit(texts, labels)
    majority = pd.Series(test_labels).value_counts(normalize=True).iloc[0]
    assert model.score(test_texts, test_labels) > max(0.85, majority + 0.3)
    assert model.predict(["someone STOLE my card!!"])[0] == "lost_card"
    assert "stolen" in model.vocabulary_ and "someone" not in model.vocabulary_
    with pytest.raises(ModelError, match=r"X\[1\] is not a string"):
        model.predict(["fine", float("nan")])


def test_every_registered_tabular_model_fits_and_predicts():
    X, y = blobs(100)
    for task, target in [("classification", y), ("regression", X[:, 0])]:
        for name in list_models(task):
            params = {"max_epochs": 3} if name.startswith("torch") else {}
            model = get_model(name, task=task, **params).fit(X, target)
            assert model.predict(X).shape == (100,), (name, task)


def test_progress_bar_shows_only_when_verbose_and_not_under_test(monkeypatch, capsys):
    X, y = blobs(100)
    monkeypatch.delenv("IN_TEST", raising=False)
    TorchMLPClassifier(max_epochs=3, verbose=True, random_state=0).fit(X, y)
    assert "TorchMLPClassifier" in capsys.readouterr().err
    TorchMLPClassifier(max_epochs=3, verbose=False, random_state=0).fit(X, y)
    monkeypatch.setenv("IN_TEST", "1")
    TorchMLPClassifier(max_epochs=3, verbose=True, random_state=0).fit(X, y)
    assert "TorchMLPClassifier" not in capsys.readouterr().err


# --- saving and loading ----------------------------------------------------------------------------------

LOAD_AND_PREDICT = textwrap.dedent("""
    import pickle, sys, numpy as np
    with open(sys.argv[1], "rb") as f: models = pickle.load(f)
    said = {}
    for kind, (model, X) in models.items():
        assert model.device_ == "cpu" and model.module_.training is False
        said[kind] = model.predict_proba(X) if hasattr(model, "predict_proba") else model.predict(X)
    np.savez(sys.argv[2], **said)
""")


@pytest.mark.parametrize("dumps", [pickle.dumps, cloudpickle.dumps], ids=["pickle", "cloudpickle"])
def test_pickled_models_predict_the_same_in_a_fresh_process(tmp_path, dumps):
    models = fitted_models()
    (tmp_path / "models.pkl").write_bytes(dumps(models))
    done = subprocess.run([sys.executable, "-c", LOAD_AND_PREDICT, tmp_path / "models.pkl", tmp_path / "said.npz"],
                          capture_output=True, text=True, timeout=120, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert done.returncode == 0, done.stderr
    said = np.load(tmp_path / "said.npz", allow_pickle=True)
    for kind, (model, X) in models.items():
        assert np.array_equal(said[kind], outputs(model, X)), kind


def test_a_pickle_holds_numpy_weights_not_a_network():
    model, _ = fitted_models()["classifier"]
    state = model.__getstate__()
    assert all(isinstance(w, np.ndarray) for w in state["module_"].values())
    assert isinstance(model.module_, torch.nn.Module)  # the model itself is unchanged


@pytest.fixture
def mlflow_store(tmp_path, monkeypatch):
    "An embedded MLflow store in a temporary workspace, set as MLflow's tracking URI for the test only."
    settings = load_settings(tmp_path, environ={})
    uri = tracking_uri(settings, environ={})
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    experiment_id = ensure_experiment(mlflow_client(settings), "models", settings)
    yield uri, experiment_id
    mlflow.set_tracking_uri(None)


PYFUNC_PREDICT = textwrap.dedent("""
    import sys, mlflow, numpy as np, pandas as pd
    model = mlflow.pyfunc.load_model(sys.argv[1])
    np.save(sys.argv[3], np.asarray(model.predict(pd.read_parquet(sys.argv[2]))))
""")


@pytest.mark.parametrize("serialization_format", ["skops", "cloudpickle"])
def test_pytorch_pipeline_logged_to_mlflow_predicts_the_same_in_a_fresh_process(mlflow_store, tmp_path, serialization_format):
    uri, experiment_id = mlflow_store
    X, y = blobs(200)
    X = pd.DataFrame(X * 10 + 3, columns=[f"x{i}" for i in range(5)])
    pipe = make_pipeline(StandardScaler(), TorchMLPClassifier(hidden_sizes=(8,), max_epochs=5, random_state=0)).fit(X, y)
    extra = {"skops_trusted_types": skops_trusted_types()} if serialization_format == "skops" else {}
    with mlflow.start_run(experiment_id=experiment_id):
        info = mlflow.sklearn.log_model(pipe, name="model", serialization_format=serialization_format, input_example=X.head(3),
                                        pip_requirements=["mlwb", "torch", "scikit-learn"], **extra)  # skip MLflow's slow inference
    X.to_parquet(tmp_path / "X.parquet")
    done = subprocess.run([sys.executable, "-c", PYFUNC_PREDICT, info.model_uri, tmp_path / "X.parquet", tmp_path / "y.npy"],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "MLFLOW_TRACKING_URI": uri})
    assert done.returncode == 0, done.stderr[-3000:]
    assert np.array_equal(np.load(tmp_path / "y.npy", allow_pickle=True), pipe.predict(X))
