"""The recommender as it is served: the top-k items for each user, from a rating model and the items' popularity.

MLflow logs this file itself with the model ("models from code"), so loading the model runs this code instead of
unpickling an object: `mlflow.pyfunc.log_model(python_model="top_k_model.py", artifacts=..., model_config=...)`.
"""
import json

import mlflow
import numpy as np
import pandas as pd


def log_popularity(counts: dict) -> pd.Series:
    "log(1 + number of ratings) of each item, from `{item_id: count}`."
    return np.log1p(pd.Series(counts, dtype="float64"))


def blend(recommendations: pd.DataFrame, # rows of (user_id, item_id, score), as `MatrixFactorization.recommend` returns them
          popularity: pd.Series, # log popularity by item id (`log_popularity`)
          weight: float, # how much popularity counts: 0 ranks by predicted rating alone
         ) -> pd.DataFrame:
    "The rows re-scored as predicted rating + `weight` x log popularity, each user's best first."
    score = recommendations.score.to_numpy() + weight * popularity.reindex(recommendations.item_id).fillna(0).to_numpy()
    order = np.lexsort((-score, pd.factorize(recommendations.user_id)[0]))  # by user (in order of appearance), best score first
    return recommendations.assign(score=score).iloc[order]


def unrated_items(model, # a fitted `mlwb.torch_models.MatrixFactorization`
                  users, # user ids; unknown ones get every item, scored by the item's bias
                 ) -> pd.DataFrame:
    "Every item each user has not rated, with its predicted rating: rows of (user_id, rank, item_id, score)."
    return model.recommend(pd.unique(np.asarray(users)), k=len(model.item_ids_))


def top_k_lists(unrated: pd.DataFrame, popularity: pd.Series, weight: float, k: int) -> dict:
    "`{user_id: [item ids, best first]}`: the `k` best of each user's `unrated` items by the blended score."
    ranked = blend(unrated, popularity, weight).groupby("user_id", sort=False).item_id.agg(list)
    return {user: [str(item) for item in items[:k]] for user, items in ranked.items()}


def top_k(model, users, popularity: pd.Series, weight: float, k: int) -> dict:
    "`{user_id: [item ids, best first]}`: the `k` best items per user that the user has not rated yet."
    return top_k_lists(unrated_items(model, users), popularity, weight, k)


class TopKRecommender(mlflow.pyfunc.PythonModel):
    "Rows with a `user_id` (and optionally `k`) in; for each row, the user's top `k` item ids, best first."

    def load_context(self, context):
        self.rating_model = mlflow.sklearn.load_model(context.artifacts["rating_model"])[-1]
        with open(context.artifacts["popularity"]) as f: self.popularity = log_popularity(json.load(f))
        self.weight, self.default_k = float(context.model_config["popularity_weight"]), int(context.model_config["k"])

    def list_lengths(self, model_input: pd.DataFrame) -> list:
        "The `k` of each row: its own (a whole number >= 1), or the default where it has none."
        if "k" not in model_input.columns: return [self.default_k] * len(model_input)
        ks = pd.to_numeric(model_input["k"]).fillna(self.default_k)  # a missing k (only possible when the signature is not enforced)
        if not ((ks >= 1) & (ks == ks.round())).all(): raise ValueError(f"column 'k': expected whole numbers >= 1, got {ks.tolist()}")
        return ks.astype(int).tolist()

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.Series:
        users, ks = model_input["user_id"].astype(str).tolist(), self.list_lengths(model_input)
        ranked = top_k(self.rating_model, users, self.popularity, self.weight, max(ks, default=0))
        return pd.Series([ranked[user][:k] for user, k in zip(users, ks)], name="items", dtype=object)


mlflow.models.set_model(TopKRecommender())
