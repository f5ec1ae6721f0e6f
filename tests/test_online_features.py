"""Online features through a real `mlwb serve`: a model trained with online feature definitions answers a
raw transaction, its state survives a restart, the edge cases get their defined answers, the skew check
replays a period and matches the offline pipeline -- and catches a skewed definition -- and two replicas
share one PostgreSQL store."""
import json
import os
import subprocess
import sys
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor

import httpx
import pandas as pd
import pytest
import yaml

from conftest import new_workspace, wait_for
from test_serve import Server, log_sklearn, register
from test_server import installed_postgres, postgres  # noqa: F401 (fixtures)

from mlwb.online_features import PostgresStore, feature_names, definitions_from, offline_features, online_spec
from mlwb.skew import check_skew, first_skew

MLWB = os.path.join(os.path.dirname(sys.executable), "mlwb")
CARD = dict(entity="card_id", time="timestamp", value="amount",
            windows={"1h": "1h", "24h": "24h", "7d": "7D"},
            transforms={"amount_to_week_mean": {"kind": "ratio_to_mean", "window": "7d"}})
SKEWED = {**CARD, "windows": {**CARD["windows"], "1h": "24h"}}  # a copy-paste slip on the serving side
INPUTS = ["merchant_category", "amount", "hour", "distance_from_home_km"]
RAW = ["card_id", "timestamp"] + INPUTS


def card_model(definitions, offline: pd.DataFrame):
    "A small gradient-boosted fraud pipeline whose velocity features come from `definitions`."
    from sklearn.ensemble import HistGradientBoostingClassifier
    from sklearn.pipeline import Pipeline
    from mlwb.feature_spec import build_features
    spec = {"categorical": ["merchant_category"], "passthrough": INPUTS[1:],
            "online": online_spec(definitions)}
    X = offline[INPUTS + feature_names(definitions_from(CARD))]
    model = HistGradientBoostingClassifier(max_iter=20, class_weight="balanced", random_state=0)
    return Pipeline([("features", build_features(spec)), ("model", model)]).fit(X, offline.is_fraud), X


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    "A workspace with two registered models (same training rows; one serves a skewed definition)."
    from mlwb.generate import make_card_transactions
    ws = new_workspace(tmp_path_factory.mktemp("online"))
    events = make_card_transactions(n_cards=80, n_days=12, seed=11)
    offline = offline_features(CARD, events)
    uris = {}
    for name, definitions in (("card-fraud", CARD), ("card-fraud-skewed", SKEWED)):
        pipeline, X = card_model(definitions, offline)
        uris[name] = register(ws, name, log_sklearn(pipeline, X))
    (ws / "card.yml").write_text(yaml.safe_dump(CARD))
    events.to_parquet(ws / "events.parquet")
    return ws, uris, events, offline


@pytest.fixture(scope="module")
def served(models, tmp_path_factory):
    "One server of `card-fraud` for the tests that need no fresh one: (server, its store URL)."
    ws, uris, _, _ = models
    store = f"sqlite:///{tmp_path_factory.mktemp('served')}/state.sqlite"
    server = serve(ws, uris["card-fraud"], store)
    yield server, store
    server.stop()


def serve(ws, uri, store: str, ready: bool = True) -> Server:
    "`mlwb serve uri` with its online states in `store`, ready (or starting, unless `ready`)."
    server = Server(ws, uri, env={"MLWB_ONLINE_STORE": store})
    return server.wait_ready(timeout=300) if ready else server  # a generous limit on a busy machine


def event(card="Z", when="2026-03-01T10:00:00", amount=20.0) -> dict:
    return {"card_id": card, "timestamp": when, "merchant_category": "grocery", "amount": amount,
            "hour": 10, "distance_from_home_km": 3.0}


def predict(server, *records) -> httpx.Response:
    return httpx.post(f"{server.url}/predict", json={"records": list(records)}, timeout=30)


def test_the_online_path_equals_the_offline_one_on_a_month_of_events():
    "Every event of a month, one at a time in time order (simultaneous ones included): counts exact, sums to 1e-9."
    from mlwb.generate import make_card_transactions
    from mlwb.online_features import online_features
    events = make_card_transactions(n_cards=300, n_days=30, seed=4)
    events = pd.concat([events, events.iloc[::50].assign(amount=1.0)])  # a second event at the same moment
    events = events.sort_values("timestamp", kind="stable").reset_index(drop=True)
    d, states = definitions_from(CARD), {}
    online = [online_features(d, {c: [v] for c, v in row.items()}, states)
              for row in events[["card_id", "timestamp", "amount"]].to_dict("records")]
    online = pd.DataFrame({k: [r[k][0] for r in online] for k in feature_names(d)})
    assert first_skew(offline_features(d, events), online, feature_names(d)) is None


def test_a_raw_transaction_is_scored_and_openapi_shows_the_raw_schema(models, served):
    offline, (server, _) = models[3], served
    answer = predict(server, event()).json()  # a card never seen: no past
    features = answer["features"]
    assert features["count_7d"] == [0.0] and features["seconds_since_previous"] == [None]
    assert 0 <= answer["probabilities"][0] <= 1
    shown = str(httpx.get(f"{server.url}/openapi.json").json()["components"]["schemas"])
    assert "card_id" in shown and "timestamp" in shown and "count_1h" not in shown
    vector = offline[INPUTS + feature_names(definitions_from(CARD))].head(3)
    body = {"records": json.loads(vector.to_json(orient="records"))}  # NaN as null
    records = httpx.post(f"{server.url}/predict", json=body, timeout=30)
    assert records.status_code == 200 and "features" not in records.json()  # the vector path stays
    later = predict(server, event(when="2026-03-01T10:30:00")).json()
    assert later["features"]["count_1h"] == [1.0]  # the vector request left the state alone
    meta = httpx.get(f"{server.url}/metadata").json()
    assert meta["variants"]["champion"]["online_features"]["entity"] == "card_id"


def test_edge_cases_have_their_defined_answers(served):
    server, _ = served
    predict(server, event("X", when="2026-03-01T10:00:00"))
    predict(server, event("X", when="2026-03-01T12:00:00"))
    out_of_order = predict(server, event("X", when="2026-03-01T10:40:00")).json()["features"]
    assert out_of_order["count_1h"] == [1.0] and out_of_order["seconds_since_previous"] == [2400.0]
    late = predict(server, event("X", when="2026-02-20T10:00:00"))  # older than the week's lateness
    assert late.status_code == 422 and "timestamp" in late.json()["error"]
    after = predict(server, event("X", when="2026-03-01T12:30:00")).json()["features"]
    assert after["count_24h"] == [3.0]  # the refused event left no trace
    with ThreadPoolExecutor(16) as pool:  # 32 requests for one card at once
        answers = list(pool.map(lambda m: predict(server, event("Y", f"2026-03-02T10:{m:02d}:00")),
                                range(32)))
    assert all(a.status_code == 200 for a in answers)
    counts = sorted(a.json()["features"]["count_1h"][0] for a in answers)
    assert counts[-1] <= 31 and counts[0] == 0  # each saw only events that came before it
    next_one = predict(server, event("Y", "2026-03-02T10:59:00")).json()["features"]
    assert next_one["count_1h"] == [32.0]  # none was lost


def test_state_survives_a_restart(models, tmp_path):
    ws, uris, _, _ = models
    store = f"sqlite:///{tmp_path}/state.sqlite"
    first = serve(ws, uris["card-fraud"], store)
    try: predict(first, event(when="2026-03-01T10:00:00"), event(when="2026-03-01T10:05:00"))
    finally: first.stop()
    second = serve(ws, uris["card-fraud"], store)
    try:
        features = predict(second, event(when="2026-03-01T10:10:00")).json()["features"]
        assert features["count_1h"] == [2.0] and features["seconds_since_previous"] == [300.0]
    finally: second.stop()


def test_skew_check_replays_a_period_and_matches_offline_and_batch(models, served):
    from mlwb.config import load_settings
    (ws, _, events, _), (server, store) = models, served
    start = events.timestamp.quantile(0.7)
    report = check_skew(server.url, events, ws / "card.yml", start=start, store=store,
                        settings=load_settings(ws, environ={}))
    assert report.rows == (events.timestamp >= start).sum() > 100
    assert report.largest["count_7d"] == 0 and report.largest["amount_sum_7d"] <= 1e-9
    assert report.largest["score"] <= 1e-5


def test_skew_check_catches_a_skewed_definition_naming_feature_and_row(models, tmp_path):
    ws, uris, events, offline = models
    store = f"sqlite:///{tmp_path}/state.sqlite"
    server = serve(ws, uris["card-fraud-skewed"], store)
    try:
        checked = subprocess.run([MLWB, "features", "check-skew", str(ws / "events.parquet"), "--url", server.url,
                                  "--definitions", str(ws / "card.yml"), "--store", store],
                                 capture_output=True, text=True, timeout=600, cwd=ws,
                                 env={**os.environ, "MLWB_WORKSPACE": str(ws)})
    finally: server.stop()
    ordered = events.sort_values("timestamp", kind="stable").reset_index(drop=True)
    row, feature = first_skew(offline_features(CARD, ordered), offline_features(SKEWED, ordered),
                              feature_names(definitions_from(CARD)))
    assert checked.returncode == 2, checked.stdout + checked.stderr
    assert f"feature '{feature}' differs first at row {row} " in checked.stderr, checked.stderr
    assert feature == "count_1h"


def test_two_replicas_share_one_postgres_store(models, postgres):  # noqa: F811
    ws, uris, _, _ = models
    dsn, _ = postgres
    replicas = [serve(ws, uris["card-fraud"], dsn, ready=False) for _ in range(2)]
    try:
        for replica in replicas: replica.wait_ready(timeout=300)
        when = lambda m: f"2026-04-01T09:{m:02d}:00"
        with ThreadPoolExecutor(16) as pool:
            answers = list(pool.map(lambda m: predict(replicas[m % 2], event("P", when(m))), range(24)))
        assert all(a.status_code == 200 for a in answers), [a.text for a in answers if a.status_code != 200]
        last = predict(replicas[0], event("P", when(59))).json()["features"]
        assert last["count_1h"] == [24.0]  # both replicas' events, none lost
    finally:
        for replica in replicas: replica.stop()


def test_replicas_that_start_together_each_open_a_new_postgres_store(postgres):  # noqa: F811
    "Eight stores opened at once on a schema with no table yet: each opens (the table is created in turn)."
    import psycopg
    dsn, _ = postgres
    schema = f"new_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(dsn, autocommit=True) as db: db.execute(f"CREATE SCHEMA {schema}")
    together = threading.Barrier(8)
    def open_at_once(_):
        together.wait(timeout=60)
        return PostgresStore(f"{dsn}?options=-csearch_path%3D{schema}")
    with ThreadPoolExecutor(8) as pool: stores = list(pool.map(open_at_once, range(8)))
    for store in stores: store.close()
    with psycopg.connect(dsn) as db:
        tables = db.execute("SELECT count(*) FROM pg_tables WHERE schemaname = %s", [schema]).fetchone()
    assert tables == (1,)


def test_a_shadow_scores_the_answer_features_and_adds_no_event_twice(models, tmp_path, monkeypatch):
    "In shadow, the challenger scores the features the champion's answer computed; the store counts each event once."
    from test_release import Server as ReleaseServer
    from mlwb.config import load_settings
    from mlwb.tracking import mlflow_client
    ws, _, _, offline = models
    pipeline, X = card_model(CARD, offline)
    for _ in range(2): register(ws, "card-shadow", log_sklearn(pipeline, X))  # the same pipeline, twice
    client = mlflow_client(load_settings(ws, environ={}))
    client.set_registered_model_alias("card-shadow", "champion", "1")
    client.set_registered_model_alias("card-shadow", "challenger", "2")
    monkeypatch.setenv("MLWB_ONLINE_STORE", f"sqlite:///{tmp_path}/state.sqlite")
    server = ReleaseServer(ws, "card-shadow", {"mode": "shadow"})
    try:
        answers = [predict(server, event("S", f"2026-03-03T10:{m:02d}:00")).json() for m in range(0, 50, 10)]
        wanted = {a["request_id"] for a in answers}
        def shadowed():
            found = {r["request_id"]: r for r in server.records() if r["variant"] == "shadow:challenger"}
            return found if wanted <= set(found) else None
        shadow = wait_for(shadowed, what="every shadow score in the log")
    finally: server.stop()
    assert [a["features"]["count_1h"] for a in answers] == [[float(k)] for k in range(5)]  # each event once
    for a in answers:  # the same model on the same features: the same score
        assert shadow[a["request_id"]]["status"] == 200
        assert abs(shadow[a["request_id"]]["probability"] - a["probabilities"][0]) < 1e-9
