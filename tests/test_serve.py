"""`mlwb serve` as a real server: a subprocess on a free loopback port, a registered model in a temporary workspace, real HTTP."""
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pandas as pd
import pytest

from conftest import ServerProcess, new_workspace

REPO = Path(__file__).resolve().parents[1]
MLWB = Path(sys.executable).parent / "mlwb"
COLUMNS = ["amount", "hour", "distance", "category"]


def card_rows(n: int, seed: int) -> pd.DataFrame:
    "Transactions with cents-rounded amounts, a missing distance now and then, and a text category."
    rng = np.random.default_rng(seed)
    frame = pd.DataFrame({"amount": rng.gamma(2, 30, n).round(2), "hour": rng.integers(0, 24, n),
                          "distance": rng.exponential(10, n).round(3), "category": rng.choice(["food", "travel", "online"], n)})
    frame.loc[frame.index % 9 == 0, "distance"] = np.nan
    return frame


def register(ws: Path, name: str, log) -> str:
    "Log a model with `log()` inside a run of `ws`'s embedded store, register it as `name` with alias champion."
    import mlflow
    from mlwb.config import load_settings
    from mlwb.tracking import ensure_experiment, mlflow_client, tracking_to
    settings = load_settings(ws, environ={})
    client = mlflow_client(settings)
    with tracking_to(settings):
        with mlflow.start_run(experiment_id=ensure_experiment(client, "serve-tests", settings)):
            info = log()
        version = mlflow.register_model(info.model_uri, name)
        client.set_registered_model_alias(name, "champion", version.version)
    return f"models:/{name}@champion"


def fraud_model():
    "A histogram-gradient-boosting pipeline on the card rows."
    from sklearn.compose import ColumnTransformer
    from sklearn.ensemble import HistGradientBoostingClassifier
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import OneHotEncoder
    X = card_rows(600, seed=1)
    y = ((X.amount > 70) ^ (X.hour < 6)).astype(int)
    features = ColumnTransformer([("cat", OneHotEncoder(handle_unknown="ignore"), ["category"]), ("num", "passthrough", ["amount", "hour", "distance"])])
    return Pipeline([("features", features), ("model", HistGradientBoostingClassifier(max_iter=30, random_state=0))]).fit(X, y), X


def log_sklearn(pipeline, X):
    import mlflow.sklearn
    from mlflow.models import infer_signature
    return lambda: mlflow.sklearn.log_model(pipeline, name="model", signature=infer_signature(X, pipeline.predict_proba(X)), input_example=X.head(5),
                                            serialization_format="cloudpickle", pip_requirements=[])


SLOW_MODEL = '''
import time
import mlflow
import pandas as pd

class Slow(mlflow.pyfunc.PythonModel):
    "Sleeps for the largest `x` (seconds), fails on a negative one, and answers 2x."
    def predict(self, context, model_input, params=None):
        if (model_input["x"] < 0).any(): raise ValueError("secret internal detail")
        time.sleep(min(float(model_input["x"].max()), 3.0))
        return (model_input["x"] * 2).tolist()

mlflow.models.set_model(Slow())
'''


def log_slow(folder: Path):
    import mlflow.pyfunc
    from mlflow.models import infer_signature
    code = folder / "slow_model.py"
    code.write_text(SLOW_MODEL)
    example = pd.DataFrame({"x": [0.0]})
    return lambda: mlflow.pyfunc.log_model(name="model", python_model=str(code), signature=infer_signature(example, np.array([0.0])),
                                           input_example=example, pip_requirements=[])


class Server(ServerProcess):
    "`mlwb serve` in a subprocess; records the readiness answers it saw while starting."
    def __init__(self, ws: Path, uri: str, *args, env=None):
        self.log_dir, self.ready_seen = ws / "requests", []
        environment = {**os.environ, "MLWB_WORKSPACE": str(ws), **(env or {})}
        environment.pop("MLFLOW_TRACKING_URI", None)
        command = lambda port: [str(MLWB), "serve", uri, "--port", str(port), "--log-dir", str(self.log_dir), *map(str, args)]
        super().__init__(command, tempfile.mkstemp(dir=ws, prefix="serve-", suffix=".log")[1], environment)

    def wait_ready(self, timeout: float = 180.0):  # a loaded 2-core machine takes minutes to import and warm up
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.running(): continue
            try: status = httpx.get(f"{self.url}/health/ready", timeout=1).status_code
            except httpx.HTTPError: time.sleep(0.01); continue
            self.ready_seen.append(status)
            if status == 200: return self
            time.sleep(0.005)
        raise RuntimeError("server not ready in time")

    def log_records(self) -> list:
        from mlwb.request_log import read_log_file
        return [record for f in sorted(self.log_dir.rglob("*.jsonl")) for record in read_log_file(f)]


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    "One workspace whose registry holds both models: (workspace, fraud model URI, its pipeline, slow model URI)."
    ws = new_workspace(tmp_path_factory.mktemp("serve"))
    pipeline, X = fraud_model()
    return ws, register(ws, "fraud detection", log_sklearn(pipeline, X)), pipeline, register(ws, "slow", log_slow(ws))


@pytest.fixture(scope="module")
def served(registry):
    "A server for the fraud-like model; yields (server, pipeline)."
    ws, uri, pipeline, _ = registry
    server = Server(ws, uri, "--max-rows", 50, "--max-body-bytes", 20_000).wait_ready()
    yield server, pipeline
    server.stop()


def post(server, body, **kwargs):
    return httpx.post(f"{server.url}/predict", json=body, timeout=10, **kwargs)


def test_readiness_turns_on_after_load(served):
    server, _ = served
    assert 503 in server.ready_seen and server.ready_seen[-1] == 200, server.ready_seen
    assert httpx.get(f"{server.url}/health/live").json() == {"status": "live"}


def test_predictions_equal_the_models_own(served):
    server, pipeline = served
    rows = card_rows(40, seed=7)
    for body in ({"records": json.loads(rows.to_json(orient="records"))},
                 {"columns": {c: json.loads(rows[c].to_json(orient="values")) for c in COLUMNS}},
                 {"dataframe_split": json.loads(rows.to_json(orient="split", index=False))}):
        answer = post(server, body)
        assert answer.status_code == 200, answer.text
        result = answer.json()
        assert result["predictions"] == pipeline.predict(rows).tolist()
        assert np.allclose(result["probabilities"], pipeline.predict_proba(rows)[:, 1], atol=1e-5)
        assert result["model"] == "fraud detection" and result["version"] == "1" and result["variant"] == "champion" and result["request_id"]


def test_metadata_shows_the_onnx_and_torchscript_fast_path(tmp_path):
    import mlflow.sklearn
    from mlflow.models import infer_signature
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from mlwb.torch_models import TorchMLPClassifier
    X = card_rows(300, seed=4)[["amount", "hour"]]
    mlp = TorchMLPClassifier(hidden_sizes=(8,), max_epochs=5, random_state=0, device="cpu")
    pipeline = make_pipeline(StandardScaler(), mlp).fit(X, (X.amount > 60).astype(int))
    mlflow.sklearn.save_model(pipeline, tmp_path / "mlp", signature=infer_signature(X, pipeline.predict_proba(X)), input_example=X.head(5),
                              serialization_format="cloudpickle", pip_requirements=[])
    server = Server(new_workspace(tmp_path), tmp_path / "mlp").wait_ready()
    rows = card_rows(30, seed=8)[["amount", "hour"]]
    try: meta, answer = httpx.get(f"{server.url}/metadata").json(), post(server, {"records": json.loads(rows.to_json(orient="records"))})
    finally: server.stop()
    fast = meta["fast_path"]
    assert fast["used"] == "onnx+torchscript" and fast["max_difference"] <= fast["tolerance"], fast
    assert "could not build" in fast["tried"]["onnx"], fast  # the whole pipeline does not convert; its scaler does
    assert answer.status_code == 200 and answer.json()["predictions"] == pipeline.predict(rows).tolist()
    assert np.allclose(answer.json()["probabilities"], pipeline.predict_proba(rows)[:, 1], atol=1e-5)


def test_metadata_shows_the_onnx_fast_path(served):
    server, _ = served
    meta = httpx.get(f"{server.url}/metadata").json()
    assert meta["model"] == "fraud detection" and meta["version"] == "1" and meta["variant"] == "champion"
    assert meta["fast_path"]["used"] == "onnx" and meta["fast_path"]["max_difference"] <= meta["fast_path"]["tolerance"]
    assert [c["name"] for c in meta["variants"]["champion"]["columns"]] == COLUMNS
    assert "inputs" in meta["signature"]


ONE = {"amount": 12.5, "hour": 3, "distance": 1.5, "category": "food"}
BAD_INPUTS = [  # (content, headers, status, words the message must hold)
    (b'{"records": [', {}, 400, ["not valid JSON"]),
    (b"", {}, 400, ["empty"]),
    (json.dumps({"records": [ONE]}).encode(), {"content-type": "text/plain"}, 415, ["Content-Type"]),
    (json.dumps({"records": [{**ONE, "extra": 1}]}).encode(), {}, 422, ["extra"]),
    (json.dumps({"records": [{k: v for k, v in ONE.items() if k != "hour"}]}).encode(), {}, 422, ["missing column 'hour'"]),
    (json.dumps({"records": [{**ONE, "hour": "three o'clock"}]}).encode(), {}, 422, ["'hour'", "integer"]),
    (json.dumps({"records": [{**ONE, "amount": "a lot"}]}).encode(), {}, 422, ["'amount'", "number"]),
    (b'{"records": [{"amount": NaN, "hour": 3, "distance": 1.5, "category": "food"}]}', {}, 422, ["'amount'", "NaN"]),
    (b'{"records": [{"amount": 1.0, "hour": 3, "distance": Infinity, "category": "food"}]}', {}, 422, ["'distance'", "infinity"]),
    (json.dumps({"records": [{**ONE, "amount": None}]}).encode(), {}, 422, ["'amount'", "required"]),
    (json.dumps({"records": [ONE] * 51}).encode(), {}, 413, ["at most 50"]),
    (json.dumps({"records": []}).encode(), {}, 422, ["no rows"]),
    (json.dumps([ONE]).encode(), {}, 422, ["'records' or 'columns'"]),
    (json.dumps({"columns": {"amount": [1.0, 2.0], "hour": [1], "distance": [1.0], "category": ["a"]}}).encode(), {}, 422, ["'hour'", "one per row"]),
]


@pytest.mark.parametrize("content,headers,status,words", BAD_INPUTS)
def test_bad_input_gets_a_4xx_naming_the_field(served, content, headers, status, words):
    server, _ = served
    answer = httpx.post(f"{server.url}/predict", content=content, headers={"content-type": "application/json", **headers}, timeout=10)
    assert answer.status_code == status, answer.text
    message = answer.json()["error"]
    assert all(w.lower() in message.lower() for w in words), message
    for secret in ("three o'clock", "a lot", "Traceback"): assert secret not in answer.text


HOUR_MODEL = '''
import mlflow

class Hour(mlflow.pyfunc.PythonModel):
    "The hour of each `when`."
    def predict(self, context, model_input, params=None):
        return model_input["when"].dt.hour.tolist()

mlflow.models.set_model(Hour())
'''


def test_a_datetime_column_refuses_a_string_that_is_no_date(tmp_path):
    import mlflow.pyfunc
    from fastapi.testclient import TestClient
    from mlflow.models import infer_signature
    from mlwb.config import load_settings
    from mlwb.model_store import ModelStore
    from mlwb.serve import ServeOptions, ServerState, create_app
    (tmp_path / "hour_model.py").write_text(HOUR_MODEL)
    example = pd.DataFrame({"when": pd.to_datetime(["2024-05-01T10:30:00"])})
    mlflow.pyfunc.save_model(tmp_path / "hour", python_model=str(tmp_path / "hour_model.py"), signature=infer_signature(example, np.array([10])),
                             input_example=example, pip_requirements=[])
    state = ServerState(ModelStore(load_settings(new_workspace(tmp_path), environ={})), ServeOptions())
    with TestClient(create_app(state, lambda: state.store.load("champion", str(tmp_path / "hour"))), base_url="http://127.0.0.1") as client:
        deadline = time.monotonic() + 60
        while client.get("/health/ready").status_code != 200 and time.monotonic() < deadline: time.sleep(0.05)
        assert state.store.get().model.columns[0].kind == "datetime"
        ok = client.post("/predict", json={"records": [{"when": "2024-05-01T10:30:00"}, {"when": "2024-05-01 17:05"}]})
        assert ok.status_code == 200 and ok.json()["predictions"] == [10, 17], ok.text
        for bad in ("next Tuesday", "2024-13-01", "9999-01-01", 1714559400):
            answer = client.post("/predict", json={"records": [{"when": bad}]})
            assert answer.status_code == 422 and "column 'when' row 0: expected an ISO date-time" in answer.json()["error"], answer.text
            assert str(bad) not in answer.text


def test_body_over_the_limit_is_refused_before_parsing(served):
    server, _ = served
    big = b'{"records": [' + b"x" * 30_000  # not even JSON: the size is checked first
    answer = httpx.post(f"{server.url}/predict", content=big, headers={"content-type": "application/json"})
    assert answer.status_code == 413 and "at most 20000 bytes" in answer.json()["error"]
    chunked = httpx.post(f"{server.url}/predict", content=iter([b"x" * 10_000] * 3), headers={"content-type": "application/json"})
    assert chunked.status_code == 413  # no declared length: refused while reading
    assert httpx.get(f"{server.url}/health/live").status_code == 200


def test_concurrent_clients_lose_no_log_record(served):
    server, _ = served
    rows = card_rows(5, seed=3)
    records = json.loads(rows.to_json(orient="records"))
    def client(i):
        with httpx.Client(base_url=server.url, timeout=10) as http:
            return [http.post("/predict", json={"records": records[: 1 + (i + j) % 5]}).json()["request_id"] for j in range(20)]
    with ThreadPoolExecutor(12) as pool: ids = [r for batch in pool.map(client, range(12)) for r in batch]
    expected = {rid: 1 + (i + j) % 5 for i in range(12) for j, rid in enumerate(ids[i * 20:(i + 1) * 20])}
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        logged = [r for r in server.log_records() if r["request_id"] in expected]
        if len(logged) >= sum(expected.values()): break
        time.sleep(0.1)
    assert len(logged) == sum(expected.values())
    per_request = {}
    for r in logged: per_request.setdefault(r["request_id"], []).append(r["row"])
    assert all(sorted(per_request[rid]) == list(range(n)) for rid, n in expected.items())
    first = next(r for r in logged if r["row"] == 0)
    assert set(first) == {"ts", "request_id", "row", "model", "version", "variant", "status", "latency_ms", "inputs", "prediction", "probability"}
    assert first["model"] == "fraud detection" and first["variant"] == "champion" and set(first["inputs"]) == set(COLUMNS)
    assert 0 <= first["probability"] <= 1 and first["ts"].endswith("+00:00")
    assert server.log_dir.joinpath().exists() and all(f.name.startswith("requests-") for f in server.log_dir.glob("*.jsonl"))


def test_a_category_holding_a_unicode_line_separator_is_logged_whole(served):
    "JSON leaves U+2028 and U+0085 unescaped; `str.splitlines` would cut the record in two, the log reader must not."
    server, _ = served
    odd = "on\u2028line\x85"
    answer = post(server, {"records": [{**ONE, "category": odd}]})
    assert answer.status_code == 200, answer.text
    deadline = time.monotonic() + 5
    while not (logged := [r for r in server.log_records() if r["request_id"] == answer.json()["request_id"]]) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert [r["inputs"]["category"] for r in logged] == [odd]


def test_metrics_count_requests_and_batches(served):
    server, _ = served
    post(server, {"records": [ONE]})
    text = httpx.get(f"{server.url}/metrics").text
    assert 'mlwb_requests_total{status="200",variant="champion"}' in text
    assert "mlwb_request_latency_seconds_bucket" in text and "mlwb_batch_rows_count" in text and 'mlwb_request_errors_total' in text


def test_client_predicts_and_reports(served):
    from mlwb.client import Client, ClientError
    server, pipeline = served
    rows = card_rows(3, seed=5)
    with Client(server.url) as client:
        assert client.predict(rows)["predictions"] == pipeline.predict(rows).tolist()
        assert client.health() == {"live": True, "ready": True}
        assert client.metadata()["model"] == "fraud detection"
        with pytest.raises(ClientError, match="422"): client.predict([{"amount": 1.0}])


def test_fuzzing_from_the_openapi_schema_finds_no_5xx(served):
    import schemathesis
    from hypothesis import HealthCheck, given, settings
    from schemathesis.generation.modes import GenerationMode
    server, _ = served
    schema = schemathesis.openapi.from_url(f"{server.url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert any(op.path == "/predict" for op in operations)
    for op in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE) if op.path == "/predict" else (GenerationMode.POSITIVE,):
            @settings(max_examples=12 if op.path == "/predict" else 2, deadline=None, database=None, suppress_health_check=list(HealthCheck))
            @given(case=op.as_strategy(generation_mode=mode))
            def fuzz(case):
                response = case.call(base_url=server.url, timeout=10)
                assert response.status_code < 500, (op.path, response.status_code, response.text[:200])
            fuzz()
    assert httpx.get(f"{server.url}/health/live").status_code == 200


@pytest.fixture(scope="module")
def slow(registry):
    "A server for a slow pyfunc model with a token and a short time limit."
    ws, _, _, uri = registry
    server = Server(ws, uri, "--timeout", 1.0, "--grace", 6, env={"MLWB_SERVE_TOKEN": "s3cret"}).wait_ready()
    yield server
    server.stop()


AUTH = {"authorization": "Bearer s3cret"}


def in_flight(url: str) -> float:
    "The server's `mlwb_requests_in_flight` gauge."
    text = httpx.get(f"{url}/metrics", headers=AUTH).text
    return float(next(line.split()[1] for line in text.splitlines() if line.startswith("mlwb_requests_in_flight ")))


def test_token_host_timeout_and_model_failure(slow):
    url = slow.url
    assert httpx.post(f"{url}/predict", json={"records": [{"x": 0.0}]}).status_code == 401
    assert httpx.get(f"{url}/health/ready").status_code == 200  # probes need no token
    assert httpx.get(f"{url}/metadata", headers=AUTH).json()["fast_path"]["used"] == "native"
    assert httpx.post(f"{url}/predict", json={"records": [{"x": 0.0}]}, headers={**AUTH, "host": "evil.example.com"}).status_code == 400
    ok = httpx.post(f"{url}/predict", json={"records": [{"x": 0.1}]}, headers=AUTH)
    assert ok.status_code == 200 and ok.json()["predictions"] == [0.2]
    with ThreadPoolExecutor(1) as pool:
        busy = pool.submit(httpx.post, f"{url}/predict", json={"records": [{"x": 0.6}]}, headers=AUTH, timeout=10)
        time.sleep(0.3)
        assert in_flight(url) == 1  # the gauge sees the slow request
        assert busy.result().status_code == 200
    assert in_flight(url) == 0
    started = time.monotonic()
    late = httpx.post(f"{url}/predict", json={"records": [{"x": 2.0}]}, headers=AUTH, timeout=10)
    assert late.status_code == 504 and time.monotonic() - started < 1.9
    assert in_flight(url) == 0  # a request past its time limit stops counting, though the model still runs
    failed = httpx.post(f"{url}/predict", json={"records": [{"x": -1.0}]}, headers=AUTH, timeout=10)
    assert failed.status_code == 500 and failed.json()["request_id"] and "secret" not in failed.text
    assert in_flight(url) == 0
    metrics = httpx.get(f"{url}/metrics", headers=AUTH).text
    assert 'mlwb_requests_total{status="401",variant=""}' in metrics and 'mlwb_requests_total{status="401",variant="champion"}' not in metrics
    deadline = time.monotonic() + 5
    while not (refused := [r for r in slow.log_records() if r["status"] == 401]) and time.monotonic() < deadline: time.sleep(0.05)
    assert refused and all(r["variant"] is None for r in refused)  # refused at the door: no variant saw it


def test_sigterm_drains_in_flight_requests(slow):
    url = slow.url
    with ThreadPoolExecutor(1) as pool:
        in_flight = pool.submit(httpx.post, f"{url}/predict", json={"records": [{"x": 0.8}]}, headers=AUTH, timeout=30)
        deadline = time.monotonic() + 30  # wait until the server holds the request, however loaded the machine
        while "mlwb_requests_in_flight 1.0" not in httpx.get(f"{url}/metrics", headers=AUTH).text:
            assert time.monotonic() < deadline and not in_flight.done(), "the request never reached the server"
        slow.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 30
        while httpx.get(f"{url}/health/ready").status_code != 503:  # readiness turns off once the signal is seen
            assert time.monotonic() < deadline, "readiness never turned off"
        assert in_flight.result().status_code == 200
    assert slow.process.wait(30) == 0
    assert any(r["status"] == 200 and r["inputs"] == {"x": 0.8} for r in slow.log_records())


def test_an_overloaded_server_refuses_at_once_with_retry_after(registry):
    "With --max-queue-ms, a request that would queue behind a full batch gets a 503 and Retry-After."
    ws, _, _, uri = registry
    server = Server(ws, uri, "--max-queue-ms", 100, "--max-batch-size", 1).wait_ready()
    try:
        with ThreadPoolExecutor(1) as pool:
            busy = pool.submit(httpx.post, f"{server.url}/predict", json={"records": [{"x": 1.5}]}, timeout=30)
            deadline = time.monotonic() + 30  # the slow request fills the one-row batch
            while "mlwb_requests_in_flight 1.0" not in httpx.get(f"{server.url}/metrics").text:
                assert time.monotonic() < deadline and not busy.done(), "the request never reached the server"
            refused = httpx.post(f"{server.url}/predict", json={"records": [{"x": 0.0}]}, timeout=30)
            assert refused.status_code == 503 and int(refused.headers["retry-after"]) >= 1
            assert "overloaded" in refused.json()["error"]
            assert busy.result().status_code == 200
        assert httpx.post(f"{server.url}/predict", json={"records": [{"x": 0.0}]}, timeout=30).status_code == 200
    finally: server.stop()


def test_binding_beyond_loopback_needs_allowed_hosts(tmp_path, monkeypatch):
    from click.testing import CliRunner
    from mlwb.cli import main
    monkeypatch.setenv("MLWB_WORKSPACE", str(new_workspace(tmp_path)))
    done = CliRunner().invoke(main, ["serve", "models:/nothing@champion", "--host", "0.0.0.0"])
    assert done.exit_code == 2 and "--allowed-hosts" in done.output


def test_parity_check_refuses_a_model_onnx_cannot_convert(tmp_path):
    from sklearn.ensemble import HistGradientBoostingClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import FunctionTransformer
    from mlwb.config import load_settings
    from mlwb.model_store import load_model
    import mlflow.sklearn
    from mlflow.models import infer_signature
    X = card_rows(200, seed=2).drop(columns="category")
    pipeline = make_pipeline(FunctionTransformer(lambda f: f.fillna(0) * 2), HistGradientBoostingClassifier(max_iter=5)).fit(X, X.hour > 11)
    mlflow.sklearn.save_model(pipeline, tmp_path / "odd", signature=infer_signature(X), input_example=X.head(5), serialization_format="cloudpickle", pip_requirements=[])
    loaded = load_model(str(tmp_path / "odd"), load_settings(new_workspace(tmp_path), environ={}))
    assert loaded.predictor.name == "native" and "could not build" in loaded.fast_path["tried"]["onnx"]
    rows = {c: X[c].head(3).replace({np.nan: None}).tolist() for c in X}
    assert loaded.predictor.predict(rows).predictions == pipeline.predict(X.head(3)).tolist()
