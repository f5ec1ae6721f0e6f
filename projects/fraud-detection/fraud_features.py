"""The fraud-detection project's velocity features, defined once.

The features stage (03_features.ipynb) computes them for training, the monitoring stage
(07_monitor.ipynb) for simulated production weeks, and the training stage names them as the model's
inputs. One definition that every stage imports keeps training and production computing the same
thing: two copies would drift apart, which is the training/serving skew the model card warns about.
The stages that compute them declare this file as an input in pipeline.yml, so a change reruns them.
"""
import pandas as pd

WINDOWS = {"1h": "1h", "24h": "24h", "7d": "7D"}  # feature suffix: pandas window
VELOCITY_FEATURES = [f"{kind}_{suffix}" for suffix in WINDOWS for kind in ("count", "amount_sum")]
VELOCITY_FEATURES += ["seconds_since_previous", "amount_to_week_mean"]  # what add_features adds


def past_activity(df, window):
    "Count and total amount of the same card's transactions in the `window` strictly before each."
    by_card = df.sort_values(["card_id", "timestamp"], kind="stable")
    windows = by_card.groupby("card_id", sort=True).rolling(window, on="timestamp", closed="left")
    past = windows.amount  # the rolling output is in by_card's order
    count = pd.Series(past.count().fillna(0).to_numpy(), index=by_card.index)
    total = pd.Series(past.sum().fillna(0).to_numpy(), index=by_card.index)
    return count.reindex(df.index), total.reindex(df.index)


def add_features(df):
    "`df` (sorted by time) with velocity features computed from each card's earlier transactions."
    df = df.reset_index(drop=True)
    features = {}
    for suffix, window in WINDOWS.items():
        features[f"count_{suffix}"], features[f"amount_sum_{suffix}"] = past_activity(df, window)
    features["seconds_since_previous"] = df.groupby("card_id").timestamp.diff().dt.total_seconds()
    week_mean = features["amount_sum_7d"] / features["count_7d"]  # 0/0 is NaN: a quiet week
    features["amount_to_week_mean"] = df.amount / week_mean
    return df.assign(**features)
