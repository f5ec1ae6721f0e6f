"""Online features in `mlwb serve`: the raw-transaction path (features from the online store) beside the feature-vector path.

Run from the repository root:  .venv/bin/python benchmarks/serve/bench_online.py [--seconds 5] [--concurrency 1 64]

It generates two weeks of card transactions, computes their velocity features offline with the declared
definitions (mlwb.online_features), and trains one histogram-gradient-boosting pipeline twice: once taking the
feature vector (`card-vector`), once carrying the definitions in an `online` feature-spec entry (`card-online`),
so that `mlwb serve` takes a raw transaction and computes the features from its online store. The store (SQLite,
the default) is loaded with the history first, as a real deployment would be. Each server is driven with wrk
(as bench_serve.py does) at each concurrency, both with a body made per request by the same kind of Lua
function, so that the client costs both the same: the vector path one feature row with a new amount each time,
the online path a new raw transaction -- 2,000 cards in turn, each a second after the last -- so that every
request reads and writes a real card state. It prints requests/s, p50, p99 and server CPU per request for both, and what
the online features add.

Two kinds of load, because they answer two questions. Closed loop (wrk's default: each connection sends its next
request the moment the last is answered) saturates the server, so latency there is mostly queueing: at concurrency c,
p50 is about c times the time per request, and the online features' extra CPU per request shows up multiplied by c.
Paced (`--rate`, default 1,000 requests/s across the same c connections, each pausing an exponentially distributed
time between requests, as independent callers do) leaves the server headroom, so the difference between the two
paths is the time the online features add to each request.
"""
import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_serve import BIN, REPO, drive, ensure_wrk, free_port, start, stop  # noqa: E402

CARD = dict(entity="card_id", time="timestamp", value="amount",
            windows={"1h": "1h", "24h": "24h", "7d": "7D"},
            transforms={"amount_to_week_mean": {"kind": "ratio_to_mean", "window": "7d"}})
INPUTS = ["merchant_category", "amount", "hour", "distance_from_home_km"]
N_CARDS = 2000

VECTOR_LUA = """counter = 0
request = function()
  counter = counter + 1
  local body = string.format('{"records": [{"amount": %%.2f, %s}]}', 10 + counter %% 90)
  return wrk.format("POST", nil, {["Content-Type"] = "application/json"}, body)
end
"""

PACED_LUA = """
pause_ms = %f
delay = function() return math.floor(-math.log(1 - math.random()) * pause_ms) end
"""

RAW_LUA = """counter = 0
base = %d
request = function()
  counter = counter + 1
  local body = string.format('{"records": [{"card_id": "C%%06d", "timestamp": "%%s", '
    .. '"merchant_category": "grocery", "amount": %%.2f, "hour": 12, "distance_from_home_km": 3.5}]}',
    counter %% %d, os.date("!%%Y-%%m-%%dT%%H:%%M:%%S", base + counter), 10 + counter %% 90)
  return wrk.format("POST", nil, {["Content-Type"] = "application/json"}, body)
end
"""


def train_and_register(ws: Path) -> tuple:
    "Both models registered in `ws`; (tracking URI, the events, one feature-vector row)."
    import mlflow
    import mlflow.sklearn
    from mlflow.models import infer_signature
    from sklearn.ensemble import HistGradientBoostingClassifier
    from sklearn.pipeline import Pipeline
    from mlwb.feature_spec import build_features
    from mlwb.generate import make_card_transactions
    from mlwb.online_features import definitions_from, feature_names, offline_features, online_spec
    events = make_card_transactions(n_cards=N_CARDS, n_days=14, seed=0)
    offline = offline_features(CARD, events)
    velocity = feature_names(definitions_from(CARD))
    X = offline[INPUTS + velocity]
    uri = f"sqlite:///{ws / 'mlruns' / 'mlflow.db'}"
    (ws / "mlruns").mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(uri); mlflow.set_registry_uri(uri)
    experiment = mlflow.create_experiment("bench", artifact_location=(ws / "mlruns" / "artifacts").as_uri())
    specs = {"card-vector": {"passthrough": velocity}, "card-online": {"online": online_spec(CARD)}}
    for name, velocity_entry in specs.items():
        spec = {"categorical": ["merchant_category"], "passthrough": INPUTS[1:], **velocity_entry}
        if name == "card-vector": spec["passthrough"] = INPUTS[1:] + velocity
        model = HistGradientBoostingClassifier(max_iter=100, class_weight="balanced", random_state=0)
        pipeline = Pipeline([("features", build_features(spec)), ("model", model)]).fit(X, offline.is_fraud)
        with mlflow.start_run(experiment_id=experiment):
            info = mlflow.sklearn.log_model(pipeline, name="model", signature=infer_signature(X, pipeline.predict(X)),
                                            input_example=X.head(5), serialization_format="cloudpickle",
                                            pip_requirements=[])
        mlflow.register_model(info.model_uri, name)
    return uri, events, json.loads(X.tail(1).to_json(orient="records"))[0]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="seconds of load per path and concurrency")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--rate", type=float, default=1000.0,
                        help="the paced load's requests/s, across the largest concurrency's connections")
    args = parser.parse_args()
    wrk, results = ensure_wrk(), {}
    with tempfile.TemporaryDirectory() as d:
        ws = Path(d) / "ws"
        ws.mkdir()
        shutil.copy(REPO / "settings.ini", ws / "settings.ini")
        print("training and registering card-vector and card-online ...", flush=True)
        uri, events, row = train_and_register(ws)
        from mlwb.online_features import materialize, open_store
        store = f"sqlite:///{d}/online.sqlite"
        print(f"  {materialize(open_store(store), CARD, events)} cards' states loaded into the store", flush=True)
        scripts = {"card-vector": Path(d) / "vector.lua", "card-online": Path(d) / "raw.lua"}
        rest = json.dumps({k: v for k, v in row.items() if k != "amount"})[1:-1].replace("%", "%%")
        scripts["card-vector"].write_text(VECTOR_LUA % rest)
        after = int(events.timestamp.max().timestamp()) + 60
        scripts["card-online"].write_text(RAW_LUA % (after, N_CARDS))
        paced = max(args.concurrency)
        for name in list(scripts):  # the same bodies, each connection pausing between requests
            scripts[(name, "paced")] = Path(d) / f"{name}-paced.lua"
            pause_ms = paced / args.rate * 1000
            scripts[(name, "paced")].write_text(scripts[name].read_text() + PACED_LUA % pause_ms)
        env = {k: v for k, v in os.environ.items() if not k.startswith("MLWB_")}
        env.update(MLFLOW_TRACKING_URI=uri, MLFLOW_REGISTRY_URI=uri, MLWB_WORKSPACE=str(ws), MLWB_ONLINE_STORE=store)
        for name in ("card-vector", "card-online"):
            port = free_port()
            command = [str(BIN / "mlwb"), "serve", f"models:/{name}/1", "--port", str(port),
                       "--log-dir", str(Path(d) / "requests")]
            process = start(name, command, env, f"http://127.0.0.1:{port}/health/ready")
            url = f"http://127.0.0.1:{port}/predict"
            try:
                drive(wrk, url, scripts[name], 8, 2)  # warm-up
                for c in args.concurrency:
                    results[(name, c)] = r = drive(wrk, url, scripts[name], c, args.seconds, process.pid)
                    print(f"  {name:<12} c={c:<3} {r['rps']:>8.1f} req/s  p50 {r['p50']:>7.2f} ms  p99 {r['p99']:>7.2f} ms"
                          f"  server CPU {r['cpu_ms']:.3f} ms/req  errors {r['errors']}", flush=True)
                results[(name, "paced")] = r = drive(wrk, url, scripts[(name, "paced")], paced,
                                                     max(args.seconds, 10), process.pid)
                print(f"  {name:<12} paced c={paced} {r['rps']:>6.1f} req/s  p50 {r['p50']:>7.2f} ms  "
                      f"p99 {r['p99']:>7.2f} ms  errors {r['errors']}", flush=True)
            finally: stop(process)
    report(results, args.concurrency + ["paced"], paced)


def report(results: dict, loads: list, paced: int):
    print(f"\nload average: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs\n")
    print("| path | concurrency | req/s | p50 ms | p99 ms | server CPU ms/req | errors |\n|---|---|---|---|---|---|---|")
    for (name, c), r in results.items():
        c = f"{paced}, paced" if c == "paced" else c
        print(f"| {name} | {c} | {r['rps']:.0f} | {r['p50']:.2f} | {r['p99']:.2f} | {r['cpu_ms']:.3f} | {r['errors']} |")
    print("\n| concurrency | p50 added (ms) | p99 added (ms) | CPU added per request (ms) | req/s online / vector |"
          "\n|---|---|---|---|---|")
    for c in loads:
        vector, online = results[("card-vector", c)], results[("card-online", c)]
        print(f"| {f'{paced}, paced' if c == 'paced' else c} | {online['p50'] - vector['p50']:.2f} | {online['p99'] - vector['p99']:.2f} | "
              f"{online['cpu_ms'] - vector['cpu_ms']:.3f} | {online['rps'] / vector['rps']:.2f}x |")


if __name__ == "__main__":
    main()
