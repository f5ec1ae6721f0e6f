"""mlwb.features and mlwb.feature_spec: leakage prevention, the estimator contract, round trips inside a Pipeline, and clear errors for bad specs."""
import pickle
import warnings

import cloudpickle
import numpy as np
import pandas as pd
import pytest
import skops.io
from sklearn.base import clone
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.pipeline import Pipeline
from sklearn.utils.estimator_checks import parametrize_with_checks

from mlwb.config import MlwbError
from mlwb.generate import make_card_transactions
from mlwb.feature_spec import (TRANSFORMERS, FeatureTransformer, OnlineFeatures, build_features,
                               register_transformer, skops_trusted_types)
from mlwb.features import (DateTimeFeatures, FeatureError, FrequencyEncoder, OutOfFoldTargetEncoder, TextTfidf,
                           WindowAggregates, check_point_in_time, expected_failed_checks)
from mlwb.online_features import offline_features, online_spec

SPEC = {"numeric": {"columns": ["amount", "distance_from_home_km"], "scaling": "standard", "imputation": "median"},
        "categorical": ["merchant_category"],
        "datetime": ["timestamp"],
        "text": "description",
        "frequency": ["merchant_id"],
        "target_encode": ["merchant_id"],
        "window": {"columns": ["card_id", "timestamp", "amount"], "windows": ["1h", "24h", "7D"]},
        "passthrough": ["card_present"]}


@pytest.fixture(scope="module")
def cards():
    "About 5,000 card transactions with a statement-like description."
    df = make_card_transactions(n_cards=200, n_days=30, seed=3)
    where = np.where(df.card_present, "in store", "card not present")
    return df.assign(description=df.merchant_category + " purchase " + where)


def noise_ids(n, seed, customers=None):
    "A label driven by `signal`, and a high-cardinality customer id unrelated to it."
    rng = np.random.default_rng(seed)
    signal = rng.normal(size=n)
    customer = rng.choice(customers, n) if customers is not None else np.char.add("U", rng.integers(0, n // 3, n).astype(str))
    return pd.DataFrame({"signal": signal, "customer": customer}), (rng.random(n) < 1 / (1 + np.exp(1 - signal))).astype(int)


# --- the estimator contract ------------------------------------------------------------------------------------

# WindowAggregates is checked on column positions with counts only: many checks use two-column numeric arrays.
# TextTfidf takes one column of text, which check_estimator cannot generate; it is checked by hand below.
@parametrize_with_checks([FrequencyEncoder(), OutOfFoldTargetEncoder(), DateTimeFeatures(cyclical=True),
                          WindowAggregates(key=0, time=1, value=None), OnlineFeatures({"entity": "card_id"})],
                         expected_failed_checks=expected_failed_checks, xfail_strict=True)
def test_sklearn_estimator_checks(estimator, check):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        check(estimator)


def test_expected_failures_are_only_the_out_of_fold_design():
    assert set(expected_failed_checks(OutOfFoldTargetEncoder())) == {"check_transformer_general", "check_transformer_data_not_an_array"}
    assert all("by design" in reason for reason in expected_failed_checks(OutOfFoldTargetEncoder()).values())
    assert expected_failed_checks(FrequencyEncoder()) == {} and expected_failed_checks(WindowAggregates()) == {}


def test_text_tfidf_contract(cards):
    tfidf = TextTfidf(max_features=20, ngram_range=(1, 2))
    assert clone(tfidf).get_params() == tfidf.get_params()
    assert clone(tfidf).set_params(min_df=3).get_params()["min_df"] == 3
    with pytest.raises(Exception, match="not fitted"):
        tfidf.transform(["online"])
    assert tfidf.fit(cards.description) is tfidf
    out = tfidf.transform(cards[["description"]])  # a one-column table works like the series
    assert out.shape == (len(cards), len(tfidf.get_feature_names_out())) <= (len(cards), 20)
    assert (pickle.loads(pickle.dumps(tfidf)).transform(cards.description) != out).nnz == 0
    assert tfidf.transform(pd.Series([None, np.nan])).nnz == 0  # missing text is empty text


def test_window_sums_are_checked_on_position_columns_too():
    X = np.array([[1, 0, 5.0], [1, 10, 7.0], [2, 20, 1.0], [1, 30, 2.0]])  # key, time in nanoseconds, value
    out = WindowAggregates(key=0, time=1, value=2, windows=["1h"]).fit(X).transform(X)
    assert out[:, 0].tolist() == [0, 1, 0, 2] and out[:, 1].tolist() == [0, 5, 0, 12]


# --- leakage: target encoding ----------------------------------------------------------------------------------

def test_a_rows_own_target_never_changes_its_out_of_fold_encoding():
    X, y = noise_ids(900, 0)
    base = OutOfFoldTargetEncoder().fit_transform(X[["customer"]], y)
    for i in np.random.default_rng(1).choice(len(y), 30, replace=False):
        flipped = y.copy()
        flipped[i] = 1 - flipped[i]
        again = OutOfFoldTargetEncoder().fit_transform(X[["customer"]], flipped)
        assert again[i, 0] == base[i, 0] and (again != base).any()


def test_in_sample_encoding_fakes_a_high_training_score_out_of_fold_does_not():
    X, y = noise_ids(6_000, 0)
    X_new, y_new = noise_ids(6_000, 1, customers=X.customer.unique())
    encoder = OutOfFoldTargetEncoder()
    leaky = roc_auc_score(y, encoder.fit(X[["customer"]], y).transform(X[["customer"]])[:, 0])
    honest = roc_auc_score(y, encoder.fit_transform(X[["customer"]], y)[:, 0])
    on_new_rows = roc_auc_score(y_new, encoder.transform(X_new[["customer"]])[:, 0])
    assert leaky > 0.75 and abs(honest - 0.5) < 0.04 and abs(on_new_rows - 0.5) < 0.04


def test_pipeline_fit_uses_out_of_fold_encodings():
    X, y = noise_ids(3_000, 2)
    features = build_features({"target_encode": ["customer"]})
    assert np.array_equal(features.fit_transform(X, y), OutOfFoldTargetEncoder().fit_transform(X[["customer"]], y))
    model = Pipeline([("features", build_features({"numeric": ["signal"], "target_encode": ["customer"]})),
                      ("model", LogisticRegression())]).fit(X, y)
    assert abs(model[-1].coef_[0, 1]) < 1.5  # the noise id earns no weight (in sample it gets a large one)


def test_unseen_categories_get_the_prior_and_zero():
    X = pd.DataFrame({"c": ["a", "a", "b", "b", "b", "c"] * 5})
    y = np.array([1, 0, 1, 1, 1, 0] * 5)
    target = OutOfFoldTargetEncoder(n_splits=3).fit(X, y)
    assert target.transform(pd.DataFrame({"c": ["zzz"]}))[0, 0] == pytest.approx(y.mean())
    assert FrequencyEncoder().fit(X).transform(pd.DataFrame({"c": ["zzz", "b"]}))[:, 0].tolist() == [0.0, 0.5]


# --- leakage: window aggregates never see the future ---------------------------------------------------------------

def test_window_aggregates_pass_the_point_in_time_check(cards):
    assert len(check_point_in_time(WindowAggregates(), cards, "timestamp", n_cutoffs=4)) == 4


def test_changing_the_future_changes_no_past_feature(cards):
    cutoff = cards.timestamp.quantile(0.6)
    later = cards.timestamp >= cutoff
    future = cards.assign(amount=np.where(later, cards.amount * 100, cards.amount),
                          card_id=np.where(later, cards.card_id.iloc[0], cards.card_id))  # all later events on one card
    window = WindowAggregates().fit(cards)
    assert np.array_equal(window.transform(cards)[~later.to_numpy()], window.transform(future)[~later.to_numpy()])


def test_window_counts_match_brute_force(cards):
    window = WindowAggregates(windows=["1h", "24h"]).fit(cards)
    out = pd.DataFrame(window.transform(cards), columns=window.get_feature_names_out())
    for i in np.random.default_rng(0).choice(len(cards), 25, replace=False):
        row = cards.iloc[i]
        earlier = cards[(cards.card_id == row.card_id) & (cards.timestamp < row.timestamp)]
        in_day = earlier[earlier.timestamp >= row.timestamp - pd.Timedelta("24h")]
        assert out.count_24h[i] == len(in_day) and out.amount_sum_24h[i] == pytest.approx(in_day.amount.sum())
        gap = (row.timestamp - earlier.timestamp.max()).total_seconds() if len(in_day) else 86_400.0
        assert out.seconds_since_previous[i] == pytest.approx(min(gap, 86_400.0))


def test_window_fit_stores_no_events(cards):
    small, full = WindowAggregates().fit(cards.head(5)), WindowAggregates().fit(cards)
    assert len(pickle.dumps(small)) == len(pickle.dumps(full))
    assert {k for k in vars(full) if k.endswith("_")} == {"n_features_in_", "feature_names_in_"}


def test_point_in_time_check_catches_a_leaky_feature(cards):
    from sklearn.preprocessing import FunctionTransformer
    whole_table_count = FunctionTransformer(lambda X: X.groupby("card_id").amount.transform("count").to_frame())
    with pytest.raises(FeatureError, match="depends on later events"):
        check_point_in_time(whole_table_count, cards, "timestamp")


# --- round trips inside a Pipeline ---------------------------------------------------------------------------------

ONLINE = {"entity": "card_id", "time": "timestamp", "value": "amount", "windows": {"1h": "1h"}, "since_previous": None}


@pytest.fixture(scope="module")
def fitted(cards):
    "A Pipeline of every kind of feature (online ones too) and a logistic regression, fitted on the cards."
    cards = offline_features(ONLINE, cards)
    X, y = cards.drop(columns=["is_fraud", "transaction_id"]), cards.is_fraud
    spec = {**SPEC, "online": online_spec(ONLINE)}
    return Pipeline([("features", build_features(spec)), ("model", LogisticRegression(max_iter=1_000))]).fit(X, y), X


@pytest.mark.parametrize("pickler", [pickle, cloudpickle], ids=["pickle", "cloudpickle"])
def test_pipeline_pickle_round_trip(fitted, pickler):
    model, X = fitted
    assert np.array_equal(pickler.loads(pickler.dumps(model)).predict_proba(X), model.predict_proba(X))


def test_pipeline_skops_round_trip_needs_exactly_our_trusted_types(fitted):
    model, X = fitted
    data = skops.io.dumps(model)
    assert sorted(skops.io.get_untrusted_types(data=data)) == sorted(skops_trusted_types())
    assert np.array_equal(skops.io.loads(data, trusted=skops_trusted_types()).predict_proba(X), model.predict_proba(X))
    assert all(name.startswith(("mlwb.features.", "mlwb.feature_spec.")) for name in skops_trusted_types()[:-1])


def test_clone_and_nested_params(fitted):
    model, _ = fitted
    copy = clone(model)
    copy.set_params(features__window__windowaggregates__windows=("1h",), features__numeric__standardscaler__with_mean=False)
    assert copy.get_params()["features__window__windowaggregates__windows"] == ("1h",)
    assert model.get_params()["features__window__windowaggregates__windows"] == ["1h", "24h", "7D"]


def test_mlflow_pyfunc_round_trip(fitted, tmp_path):
    import mlflow
    from mlflow.models import infer_signature

    from mlwb.config import load_settings
    from mlwb.tracking import ensure_experiment, mlflow_client, tracking_to
    model, X = fitted
    settings = load_settings(tmp_path, environ={})
    with tracking_to(settings):
        for fmt, options in [("cloudpickle", {}), ("skops", {"skops_trusted_types": skops_trusted_types()})]:
            with mlflow.start_run(experiment_id=ensure_experiment(mlflow_client(settings), "features", settings)):
                info = mlflow.sklearn.log_model(model, name="model", serialization_format=fmt, pyfunc_predict_fn="predict_proba",
                                                signature=infer_signature(X, model.predict_proba(X)), pip_requirements=["scikit-learn"], **options)
            assert np.array_equal(np.asarray(mlflow.pyfunc.load_model(info.model_uri).predict(X)), model.predict_proba(X)), fmt


# --- clear errors for bad specs and inputs ---------------------------------------------------------------------------

@pytest.mark.parametrize("spec, message", [
    ({"numerical": ["amount"]}, "unknown key 'numerical'; expected one of"),
    ({"numeric": {"columns": ["amount"], "scale": "robust"}}, r"unknown option\(s\) \['scale'\]"),
    ({"numeric": {"columns": ["amount"], "scaling": "zscore"}}, "'numeric': option 'scaling' must be one of"),
    ({"numeric": {"columns": ["amount"], "imputation": "zero"}}, "option 'imputation' must be one of"),
    ({"numeric": {"scaling": None}}, "'numeric': expected a column name or a list of them, got None"),
    ({"numeric": []}, "'numeric': expected a column name or a list of them"),
    ({"categorical": [1, 2]}, "'categorical': expected a column name or a list of them"),
    ({"window": ["card_id", "timestamp"]}, r"'window': columns must be \[key, time, value\]"),
    ({"window": {"columns": ["card_id", "timestamp", "amount"], "windows": ["1 fortnight"]}}, None),
    ({"text": ["description", "merchant_id"]}, "'text': takes one column"),
    ({}, "expected a non-empty dict"),
    (["amount"], "expected a non-empty dict"),
])
def test_bad_specs_are_named(spec, message, cards):
    if message is None:  # a bad window duration is found at fit
        with pytest.raises(FeatureError, match="windows must be one or more durations"):
            build_features(spec).fit(cards)
        return
    with pytest.raises(FeatureError, match=message):
        build_features(spec)


def test_missing_columns_are_named_at_fit_and_at_transform(cards):
    with pytest.raises(FeatureError, match=r"'numeric': column\(s\) \['amout'\] not in the data"):
        build_features({"numeric": ["amount", "amout"]}).fit(cards)
    features = build_features({"window": ["card_id", "timestamp", "amount"], "text": "description"}).fit(cards)
    with pytest.raises(FeatureError, match=r"'text': column\(s\) \['description'\] not in the data"):
        features.transform(cards.drop(columns="description"))
    with pytest.raises(FeatureError, match="expected a DataFrame"):
        features.transform(cards.to_numpy())


def test_feature_errors_are_mlwb_errors_and_value_errors(cards):
    for bad in (lambda: DateTimeFeatures(parts=["minute"]).fit(cards[["timestamp"]]),
                lambda: WindowAggregates(time="when").fit(cards),
                lambda: WindowAggregates().fit(cards.assign(amount=np.nan)),
                lambda: OutOfFoldTargetEncoder().fit(cards[["merchant_id"]], ["yes"] * len(cards)),
                lambda: OutOfFoldTargetEncoder(smoothing=-1).fit(cards[["merchant_id"]], cards.is_fraud),
                lambda: DateTimeFeatures().fit(cards[["merchant_id"]]).transform(cards[["merchant_id"]])):
        with pytest.raises(FeatureError) as caught:
            bad()
        assert isinstance(caught.value, MlwbError) and isinstance(caught.value, ValueError)


def test_registered_transformers_work_in_specs(cards):
    from sklearn.preprocessing import FunctionTransformer
    with pytest.MonkeyPatch.context() as patch:  # the registry as it was, once the block ends
        patch.setattr(TRANSFORMERS, "_items", dict(TRANSFORMERS._items))
        register_transformer("log_amount", lambda columns: FunctionTransformer(np.log1p, feature_names_out="one-to-one"))
        features = build_features({"log_amount": ["amount"]})
        assert isinstance(features, FeatureTransformer)
        assert np.allclose(features.fit_transform(cards)[:, 0], np.log1p(cards.amount))
        assert features.get_feature_names_out().tolist() == ["log_amount__amount"]
    with pytest.raises(FeatureError, match="unknown key 'log_amount'"):
        build_features({"log_amount": ["amount"]})
