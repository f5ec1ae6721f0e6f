"""Evaluation and review (mlwb.evaluate, mlwb.review): metrics against scikit-learn and hand-computed values,
ranking edge cases, thresholds under asymmetric costs, the release gate, evidence landing in an MLflow run, and a clear error for each bad input."""
import json
import math

import matplotlib.pyplot as plt
import mlflow
import numpy as np
import pandas as pd
import pytest
from matplotlib.figure import Figure
from sklearn import metrics as skm
from sklearn.ensemble import RandomForestClassifier
from sklearn.linear_model import LogisticRegression

from mlwb.config import MlwbError, load_settings
from mlwb.evaluate import (EvaluationError, average_precision_at_k, calibration_table, choose_threshold,
                           classification_figures, classification_metrics, cost_curve, cost_curve_figure, expected_cost,
                           map_at_k, ndcg_at_k, precision_at_k, ranking_metrics, recall_at_k, regression_metrics,
                           residuals_figure, roc_figure, show_figure)
from mlwb.review import (GateVerdict, feature_importance, importance_figure, log_figures, log_model_card, log_verdict,
                         metrics_by_slice, model_card, validation_gate)
from mlwb.tracking import ensure_experiment, mlflow_client, tracking_to


@pytest.fixture(scope="module")
def imbalanced():
    "Labels drawn from known probabilities (about 5% positive) and those probabilities as scores."
    rng = np.random.default_rng(0)
    logit = -3.5 + 1.5 * rng.normal(size=5_000)
    p = 1 / (1 + np.exp(-logit))
    return (rng.random(5_000) < p).astype(int), p


@pytest.fixture
def store(tmp_path):
    "A client on a temporary embedded store, and a run created through it."
    settings = load_settings(tmp_path, environ={})
    client = mlflow_client(settings)
    run = client.create_run(ensure_experiment(client, "evaluate-tests", settings))
    yield settings, client, run.info.run_id
    client.set_terminated(run.info.run_id)


# --- metrics -------------------------------------------------------------------------------------------

def test_classification_metrics_match_scikit_learn(imbalanced):
    y, p = imbalanced
    m = classification_metrics(y, p, threshold=0.2)
    flagged = (p >= 0.2).astype(int)
    assert m["roc_auc"] == pytest.approx(skm.roc_auc_score(y, p))
    assert m["average_precision"] == pytest.approx(skm.average_precision_score(y, p))
    assert m["log_loss"] == pytest.approx(skm.log_loss(y, p))
    assert m["brier"] == pytest.approx(np.mean((p - y) ** 2))
    assert m["precision"] == pytest.approx(skm.precision_score(y, flagged))
    assert m["recall"] == pytest.approx(skm.recall_score(y, flagged))
    assert m["f1"] == pytest.approx(skm.f1_score(y, flagged))
    assert m["base_rate"] == pytest.approx(y.mean()) and 0.02 < m["base_rate"] < 0.1


def test_classification_metrics_by_hand_and_with_nothing_flagged():
    m = classification_metrics([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8])
    assert m["roc_auc"] == 0.75 and m["average_precision"] == pytest.approx(5 / 6)
    nothing = classification_metrics([0, 1], [0.1, 0.2])  # no score reaches 0.5: precision is 0, not an error
    assert nothing["precision"] == nothing["recall"] == nothing["f1"] == 0.0


def test_classification_metrics_accept_pandas_and_booleans():
    frame = pd.DataFrame({"y": [False, True, True, False], "p": [0.2, 0.9, 0.6, 0.4]})
    assert classification_metrics(frame["y"], frame["p"])["roc_auc"] == 1.0


def test_regression_metrics_match_scikit_learn_and_handle_zeros():
    rng = np.random.default_rng(1)
    y = rng.normal(100, 20, 300)
    prediction = y + rng.normal(0, 5, 300)
    m = regression_metrics(y, prediction)
    assert m["mae"] == pytest.approx(skm.mean_absolute_error(y, prediction))
    assert m["rmse"] == pytest.approx(skm.root_mean_squared_error(y, prediction))
    assert m["r2"] == pytest.approx(skm.r2_score(y, prediction))
    assert m["mape"] == pytest.approx(skm.mean_absolute_percentage_error(y, prediction)) and m["mape_excluded"] == 0
    zeros = regression_metrics([0, 0, 10], [1, -1, 12])
    assert zeros["mape"] == pytest.approx(0.2) and zeros["mape_excluded"] == 2 and zeros["mae"] == pytest.approx(4 / 3)
    assert math.isnan(regression_metrics([0, 0], [1, 2])["mape"])


# --- ranking -------------------------------------------------------------------------------------------

RANKED = {"a": [1, 2, 3, 4, 5], "b": [7, 8, 9], "c": [1, 2]}
RELEVANT = {"a": {1, 3, 6}, "b": {7}, "c": set()}


def test_ranking_metrics_by_hand():
    assert precision_at_k(RANKED, RELEVANT, 3) == pytest.approx((2 / 3 + 1 / 3) / 2)
    assert recall_at_k(RANKED, RELEVANT, 3) == pytest.approx((2 / 3 + 1) / 2)
    assert map_at_k(RANKED, RELEVANT, 3) == pytest.approx((5 / 9 + 1) / 2)
    ideal = 1 + 1 / np.log2(3) + 1 / np.log2(4)
    assert ndcg_at_k(RANKED, RELEVANT, 3) == pytest.approx(((1 + 1 / np.log2(4)) / ideal + 1) / 2)
    assert average_precision_at_k([5, 1, 9, 3], {1, 3}, 4) == pytest.approx((1 / 2 + 2 / 4) / 2)


def test_ranking_edge_cases():
    # k beyond the list: the empty slots count as misses for precision, not for recall
    assert precision_at_k({"u": [1]}, {"u": {1}}, 5) == pytest.approx(0.2)
    assert recall_at_k({"u": [1]}, {"u": {1}}, 5) == 1.0 and ndcg_at_k({"u": [1]}, {"u": {1}}, 5) == 1.0
    # a user with relevant items but no recommendations scores zero; a user with none is left out
    assert precision_at_k({"u": [1]}, {"u": {1}, "v": {2}, "w": set()}, 1) == 0.5
    # k = 1 and a perfect ranking
    assert ranking_metrics({"u": [2, 1]}, {"u": {2}}, 1) == {"precision_at_1": 1.0, "recall_at_1": 1.0, "ndcg_at_1": 1.0, "map_at_1": 1.0}
    # a hit below the cutoff does not count
    assert ranking_metrics({"u": [3, 4, 1]}, {"u": {1}}, 2) == {"precision_at_2": 0.0, "recall_at_2": 0.0, "ndcg_at_2": 0.0, "map_at_2": 0.0}
    # lists with one entry per user give the same as dicts; numpy arrays work as ranked lists
    as_lists = ranking_metrics([np.array(RANKED[u]) for u in "abc"], [RELEVANT[u] for u in "abc"], 3)
    assert as_lists == pytest.approx(ranking_metrics(RANKED, RELEVANT, 3))


def test_ndcg_matches_scikit_learn_when_the_whole_catalogue_is_ranked():
    rng = np.random.default_rng(4)
    relevance = (rng.random((80, 30)) < 0.15).astype(int)
    relevance = relevance[relevance.sum(axis=1) > 0]
    scores = rng.random(relevance.shape)
    ranked = [list(np.argsort(-row)) for row in scores]
    relevant = [set(np.flatnonzero(row)) for row in relevance]
    for k in (1, 3, 10, 30):
        assert ndcg_at_k(ranked, relevant, k) == pytest.approx(skm.ndcg_score(relevance, scores, k=k))


# --- thresholds ----------------------------------------------------------------------------------------

def test_threshold_is_the_brute_force_minimum_and_far_from_half_under_asymmetric_costs(imbalanced):
    y, p = imbalanced
    choice = choose_threshold(y, p, cost_fn=100, cost_fp=1)
    brute = min(np.unique(p), key=lambda t: expected_cost(y, p, t, 100, 1))
    assert choice.expected_cost == pytest.approx(expected_cost(y, p, brute, 100, 1))
    assert choice.threshold < 0.1 and choice.expected_cost < 0.5 * choice.cost_at_half
    assert choice.cost_at_half == pytest.approx(expected_cost(y, p, 0.5, 100, 1))
    assert choice.curve["threshold"].is_monotonic_increasing and len(choice.curve) == len(np.unique(p)) + 1


def test_dearer_misses_never_raise_the_threshold(imbalanced):
    y, p = imbalanced
    thresholds = [choose_threshold(y, p, cost_fn=c, cost_fp=1).threshold for c in (0.5, 1, 5, 20, 100)]
    assert thresholds == sorted(thresholds, reverse=True) and thresholds[0] > thresholds[-1]


def test_cost_curve_ends_flag_everything_and_nothing():
    curve = cost_curve([1, 0, 0, 1], [0.8, 0.8, 0.3, 0.1], cost_fn=3, cost_fp=1)
    assert list(curve["flagged"]) == [4, 3, 2, 0]  # the tie at 0.8 is one threshold
    assert curve["expected_cost"].iloc[0] == pytest.approx(2 / 4) and curve["expected_cost"].iloc[-1] == pytest.approx(6 / 4)
    assert curve["threshold"].iloc[-1] > 0.8


# --- slices --------------------------------------------------------------------------------------------

def test_metrics_by_slice_counts_and_flags(imbalanced):
    y, p = imbalanced
    frame = pd.DataFrame({"y": y, "p": p, "country": np.where(np.arange(len(y)) < 60, "LU", "DE"),
                          "device": np.where(np.arange(len(y)) % 2 == 0, "ios", "web")})
    slices = metrics_by_slice(frame, ["country", "device"], "y", "p")
    assert list(slices.columns[:4]) == ["country", "device", "n", "positives"] and slices["n"].sum() == len(frame)
    small = slices[slices["country"] == "LU"]
    assert small["too_small"].all() and not slices[slices["country"] == "DE"]["too_small"].any()
    one = slices[(slices["country"] == "DE") & (slices["device"] == "ios")].iloc[0]
    mask = (frame["country"] == "DE") & (frame["device"] == "ios")
    assert one["roc_auc"] == pytest.approx(skm.roc_auc_score(y[mask], p[mask]))


def test_metrics_by_slice_with_arrays_and_a_regression_metric():
    frame = pd.DataFrame({"shop": ["a", "a", "b"]})
    slices = metrics_by_slice(frame, "shop", np.array([1.0, 2.0, 3.0]), np.array([1.5, 2.5, 2.0]), regression_metrics, min_count=2)
    assert "positives" not in slices and slices["mae"].tolist() == [0.5, 1.0] and slices["too_small"].tolist() == [False, True]


# --- gate ----------------------------------------------------------------------------------------------

def test_gate_passes_fails_and_respects_the_margin():
    passed = validation_gate({"average_precision": 0.50}, {"average_precision": 0.05}, {"average_precision": 0.45}, margin=0.02)
    assert isinstance(passed, GateVerdict) and passed.passed and (passed.candidate, passed.baseline, passed.champion) == (0.5, 0.05, 0.45)
    assert len(passed.reasons) == 2 and "champion's (0.4500)" in passed.reasons[1]
    short = validation_gate({"average_precision": 0.50}, {"average_precision": 0.05}, {"average_precision": 0.49}, margin=0.02)
    assert not short.passed and "baseline's" in short.reasons[0] and "does not beat the champion's" in short.reasons[1]
    assert validation_gate({"average_precision": 0.06}, {"average_precision": 0.05}).passed
    assert not validation_gate({"average_precision": 0.05}, {"average_precision": 0.05}).passed  # a tie is not a win
    assert not validation_gate({"average_precision": 0.04}, {"average_precision": 0.05}, {"average_precision": 0.01}).passed


def test_gate_for_a_metric_where_lower_is_better():
    kwargs = dict(metric="rmse", higher_is_better=False, margin=1.0)
    assert validation_gate({"rmse": 8.0}, {"rmse": 20.0}, {"rmse": 9.0}, **kwargs).passed
    assert not validation_gate({"rmse": 8.5}, {"rmse": 20.0}, {"rmse": 9.0}, **kwargs).passed
    assert "lower is better" in validation_gate({"rmse": 8.0}, {"rmse": 20.0}, **kwargs).reasons[0]


# --- MLflow --------------------------------------------------------------------------------------------

def artifact_paths(client, run_id, folder=None) -> set:
    "Every artifact path of the run, folders opened."
    paths = set()
    for item in client.list_artifacts(run_id, folder):
        paths |= artifact_paths(client, run_id, item.path) if item.is_dir else {item.path}
    return paths


def test_figures_verdict_and_card_land_in_the_run(imbalanced, store, tmp_path):
    _, client, run_id = store
    y, p = imbalanced
    model = LogisticRegression().fit(p.reshape(-1, 1), y)
    figures = classification_figures(y, p, 0.1) | {"cost_curve": cost_curve_figure(choose_threshold(y, p, 50, 1)),
                                                   "residuals": residuals_figure(p, p + 0.01),
                                                   "importance": importance_figure(feature_importance(model, ["p"]))}
    assert not plt.get_fignums()  # none of them registered with pyplot
    logged = log_figures(figures, run_id, client)
    verdict = validation_gate(classification_metrics(y, p), {"average_precision": float(y.mean())})
    log_verdict(verdict, run_id, client)
    card = model_card("m", "1", "demo", {"roc_auc": 0.9}, "synthetic", "tests", ["none known"], verdict)
    assert log_model_card(card, run_id, client) == "model_card.md"
    paths = artifact_paths(client, run_id)
    assert set(logged) == {f"figures/{name}.png" for name in figures} and set(logged) <= paths
    assert {"gate_verdict.json", "model_card.md"} <= paths
    run = client.get_run(run_id)
    assert run.data.tags["mlwb.gate.passed"] == "true" and run.data.tags["mlwb.gate.metric"] == "average_precision"
    assert run.data.metrics["gate_candidate_average_precision"] == pytest.approx(verdict.candidate)
    assert json.loads(open(client.download_artifacts(run_id, "gate_verdict.json", str(tmp_path))).read())["passed"] is True
    assert open(client.download_artifacts(run_id, "model_card.md", str(tmp_path))).read() == card
    assert open(client.download_artifacts(run_id, "figures/roc.png", str(tmp_path)), "rb").read(4) == b"\x89PNG"


def test_loggers_use_the_active_run_when_no_run_id_is_given(store):
    settings, client, _ = store
    with tracking_to(settings), mlflow.start_run(experiment_id=ensure_experiment(client, "evaluate-tests", settings)) as run:
        log_figures({"roc": classification_figures([0, 1, 1, 0], [0.1, 0.8, 0.6, 0.3])["roc"]})
        log_verdict(validation_gate({"ap": 0.5}, {"ap": 0.1}, metric="ap"))
    assert {"figures/roc.png", "gate_verdict.json"} <= artifact_paths(client, run.info.run_id)
    assert client.get_run(run.info.run_id).data.tags["mlwb.gate.passed"] == "true"


def test_log_figures_closes_the_pyplot_figures_it_logs(store):
    _, client, run_id = store
    figure, ax = plt.subplots()  # pyplot keeps it, and its memory, until it is closed
    ax.plot([0, 1], [1, 0])
    assert log_figures({"drawn": figure}, run_id, client, show=False) == ["figures/drawn.png"]
    assert not plt.get_fignums()
    assert "figures/drawn.png" in artifact_paths(client, run_id)


def test_show_figure_displays_a_png_in_a_kernel_and_nothing_outside_one():
    from jupyter_client.manager import start_new_kernel
    assert show_figure(roc_figure([0, 1, 1, 0], [0.1, 0.8, 0.6, 0.3])) is False  # pytest: no kernel
    manager, kernel = start_new_kernel(kernel_name="python3")
    outputs = []
    try:
        code = ("from mlwb.evaluate import roc_figure, show_figure\n"
                "shown = show_figure(roc_figure([0, 1, 1, 0], [0.1, 0.8, 0.6, 0.3]))\nshown")
        reply = kernel.execute_interactive(code, timeout=120, output_hook=outputs.append)
    finally:
        kernel.stop_channels()
        manager.shutdown_kernel(now=True)
    assert reply["content"]["status"] == "ok", reply["content"]
    data = [m["content"]["data"] for m in outputs
            if m["msg_type"] in ("display_data", "execute_result")]
    assert "image/png" in data[0] and data[1]["text/plain"] == "True", data


# --- bad inputs ----------------------------------------------------------------------------------------

VERDICT = GateVerdict(True, ["ok"], "ap", 0.5, 0.1)


@pytest.mark.parametrize("call, message", [
    (lambda: classification_metrics([0, 1, 1], [0.1, 0.9]), "y_true and scores: expected the same length, got 3 and 2"),
    (lambda: classification_metrics([0, 1], [0.1, np.nan]), "scores: expected finite numbers"),
    (lambda: classification_metrics([0, np.nan], [0.1, 0.2]), "y_true: expected finite numbers"),
    (lambda: classification_metrics([1, 1, 1], [0.1, 0.5, 0.9]), "y_true: expected both classes"),
    (lambda: classification_metrics([0, 1, 2], [0.1, 0.5, 0.9]), "y_true: expected binary labels"),
    (lambda: classification_metrics([0, 1], [0.1, 1.5]), "scores: expected probabilities in [0, 1]"),
    (lambda: classification_metrics([0, 1], [0.1, 0.5], threshold=None), "threshold: expected a finite number"),
    (lambda: classification_metrics([], []), "y_true: expected at least one value"),
    (lambda: classification_metrics([[0, 1]], [[0.1, 0.5]]), "y_true: expected a 1-D array"),
    (lambda: regression_metrics([1, 2], ["a", "b"]), "y_pred: expected numbers"),
    (lambda: regression_metrics([1, 2, 3], [1, 2]), "y_true and y_pred: expected the same length"),
    (lambda: precision_at_k(RANKED, RELEVANT, 0), "k: expected a whole number >= 1, got 0"),
    (lambda: recall_at_k(RANKED, RELEVANT, 1.5), "k: expected a whole number >= 1, got 1.5"),
    (lambda: ndcg_at_k(RANKED, RELEVANT, True), "k: expected a whole number >= 1, got True"),
    (lambda: map_at_k([[1]], [{1}, {2}], 1), "ranked and relevant: expected one entry per user"),
    (lambda: map_at_k({"u": [1, 2, 1]}, {"u": {1}}, 2), "ranked: user 'u' lists an item more than once"),
    (lambda: map_at_k({}, {"u": set()}, 2), "relevant: expected at least one user with a relevant item"),
    (lambda: precision_at_k(RANKED, 42, 2), "relevant: expected a dict of user -> items"),
    (lambda: average_precision_at_k([1, 2], set(), 2), "relevant_items: expected at least one relevant item"),
    (lambda: choose_threshold([0, 1], [0.2, 0.7], cost_fn=-5, cost_fp=1), "cost_fn: expected a finite number >= 0"),
    (lambda: choose_threshold([0, 1], [0.2, 0.7], cost_fn=1, cost_fp="1"), "cost_fp: expected a finite number >= 0"),
    (lambda: choose_threshold([0, 1], [0.2, 0.7], cost_fn=0, cost_fp=0), "cost_fn and cost_fp"),
    (lambda: calibration_table([0, 1], [0.2, 0.7], n_bins=0), "n_bins: expected a whole number >= 1"),
    (lambda: metrics_by_slice(pd.DataFrame({"a": [1]}), "b", [0], [0.1]), "by: expected one or more columns of df"),
    (lambda: metrics_by_slice(pd.DataFrame({"a": [1]}), "a", "y", [0.1]), "y_true: no column 'y' in df"),
    (lambda: metrics_by_slice(pd.DataFrame({"a": [1]}), "a", [0], [0.1, 0.2]), "scores: expected 1 values, one per row of df"),
    (lambda: validation_gate({"ap": 0.5}, {"roc_auc": 0.5}, metric="ap"), "baseline_metrics: expected a dict holding the gate metric 'ap'"),
    (lambda: validation_gate([0.5], {"ap": 0.1}, metric="ap"), "candidate_metrics: expected a dict holding the gate metric 'ap'"),
    (lambda: validation_gate({"ap": 0.5}, {"ap": 0.1}, {"ap": None}, metric="ap"), "champion_metrics['ap']: expected a number"),
    (lambda: validation_gate({"ap": 0.5}, {"ap": 0.1}, metric="ap", margin=float("nan")), "margin: expected a finite number >= 0"),
    (lambda: feature_importance(RandomForestClassifier(), method="gain"), "method: expected 'auto' or 'permutation'"),
    (lambda: feature_importance(LogisticRegression().fit([[0, 1], [1, 0]], [0, 1]), ["x"]), "feature_names: expected 2 names"),
    (lambda: feature_importance(object()), "X and y: expected held-out rows and labels"),
    (lambda: model_card("m", "1", "t", {"a": 1}, "d", "", ["x"], VERDICT), "model_card: 'intended_use' is required"),
    (lambda: model_card("m", "1", "", {"a": 1}, "d", "u", ["x"], VERDICT), "model_card: 'task' is required"),
    (lambda: model_card("m", "1", "t", {}, "d", "u", ["x"], VERDICT), "model_card: 'metrics' is required"),
    (lambda: model_card("m", "1", "t", {"a": 1}, "d", "u", ["x"], None), "gate_verdict: expected a GateVerdict"),
    (lambda: log_figures({"roc": "not a figure"}, "run"), "figures['roc']: expected a matplotlib Figure"),
    (lambda: log_figures({"roc": Figure()}), "run_id: expected a run id or an active MLflow run"),
    (lambda: log_verdict({"passed": True}, "run"), "verdict: expected a GateVerdict"),
    (lambda: log_model_card("  ", "run"), "text: expected the model card's Markdown text"),
])
def test_bad_inputs_raise_an_error_naming_the_argument(call, message):
    with pytest.raises(EvaluationError) as caught:
        call()
    assert message in str(caught.value) and isinstance(caught.value, MlwbError)


def test_model_card_sections_and_slices():
    slices = pd.DataFrame({"region": ["n|e", "s"], "n": [500, 20], "roc_auc": [0.91234, float("nan")], "too_small": [False, True]})
    verdict = validation_gate({"ap": 0.2}, {"ap": 0.3}, metric="ap")
    card = model_card("churn", 2, "Predict churn within 30 days.", {"ap": 0.2, "rows": 1000}, {"rows": 1000, "period": "2026-01"},
                      "Retention offers.", "Not tested on business customers.", verdict, slices)
    headings = [line for line in card.splitlines() if line.startswith("#")]
    assert headings == ["# Model card: churn, version 2", "## Intended use", "## Data", "## Metrics", "## Release gate",
                        "## Metrics by slice", "## Limitations"]
    assert "**Failed** on `ap`" in card and "does not beat the baseline's" in card
    assert "| n\\|e | 500 | 0.9123 | no |" in card and "| s | 20 | n/a | yes |" in card and "- **period:** 2026-01" in card
    assert card.rstrip().endswith("Not tested on business customers.")
