"""A running `mlwb serve` under load: it follows a moved alias, and stops on SIGTERM losing nothing.

Real servers (subprocesses on free loopback ports), real HTTP clients with kept-alive connections
(one httpx connection pool shared by several threads), a registry in a temporary workspace. The
tests wait on conditions, never on sleeps. `LOAD_TEST_REPEAT=10` runs each load test ten times.
"""
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path
from urllib.parse import urlparse

import httpx
import numpy as np
import pandas as pd
import pytest

from conftest import ServerProcess, new_workspace, wait_for

REPO = Path(__file__).resolve().parents[1]
MLWB = Path(sys.executable).parent / "mlwb"
NAME = "lifecycle"
REPEAT = range(int(os.environ.get("LOAD_TEST_REPEAT", "1")))
ROW = {"records": [{"amount": 80.0, "hour": 3}]}


def log_version(C: float):
    "Log a logistic regression (regularised by `C`) on two columns; returns its model info."
    import mlflow.sklearn
    from mlflow.models import infer_signature
    from sklearn.linear_model import LogisticRegression
    rng = np.random.default_rng(0)
    X = pd.DataFrame({"amount": rng.gamma(2, 30, 300).round(2), "hour": rng.integers(0, 24, 300)})
    model = LogisticRegression(C=C).fit(X, X.amount > 60)
    signature = infer_signature(X, model.predict(X))
    return mlflow.sklearn.log_model(model, name="model", signature=signature,
                                    input_example=X.head(3), serialization_format="cloudpickle",
                                    pip_requirements=[])


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    "A workspace whose registry holds versions 1-3 of `lifecycle`; version 3's files are gone."
    import mlflow
    from mlwb.config import load_settings
    from mlwb.tracking import ensure_experiment, mlflow_client, tracking_to
    ws = new_workspace(tmp_path_factory.mktemp("lifecycle"))
    settings = load_settings(ws, environ={})
    client = mlflow_client(settings)
    with tracking_to(settings):
        with mlflow.start_run(experiment_id=ensure_experiment(client, "lifecycle-tests", settings)):
            infos = [log_version(C) for C in (1.0, 0.01, 0.1)]
        for info in infos: mlflow.register_model(info.model_uri, NAME)
        broken = mlflow.get_logged_model(infos[2].model_id).artifact_location
    shutil.rmtree(urlparse(broken).path)  # loading version 3 fails
    return ws, settings


def champion_is(settings, version: str):
    from mlwb.tracking import mlflow_client
    mlflow_client(settings).set_registered_model_alias(NAME, "champion", version)


class Server(ServerProcess):
    "`mlwb serve models:/lifecycle@champion` in a subprocess."
    def __init__(self, ws: Path, *args):
        env = {**os.environ, "MLWB_WORKSPACE": str(ws)}
        env.pop("MLFLOW_TRACKING_URI", None)
        command = lambda port: [str(MLWB), "serve", f"models:/{NAME}@champion", "--port", str(port),
                                "--log-dir", str(ws / "requests"), *map(str, args)]
        super().__init__(command, tempfile.mkstemp(dir=ws, prefix="serve-", suffix=".log")[1], env)
        wait_for(self.ready, 120, "the server to be ready")

    @property
    def log(self) -> list: return self.output().splitlines()  # the lines of its output

    def ready(self) -> bool:
        if not self.running(): return False
        try: return httpx.get(f"{self.url}/health/ready", timeout=2).status_code == 200
        except httpx.HTTPError: return False

    def metadata(self) -> dict: return httpx.get(f"{self.url}/metadata", timeout=5).json()

    def metrics(self) -> str: return httpx.get(f"{self.url}/metrics", timeout=5).text

    def stop(self): super().stop(grace=30)


class Load:
    "Threads sending one-row requests over one shared keep-alive pool until stopped (or refused)."
    def __init__(self, url: str, threads: int = 6,
                 refusals: int = 0): # stop after this many 503s; 0: only when told
        limits = httpx.Limits(max_connections=threads, max_keepalive_connections=threads)
        self.http = httpx.Client(base_url=url, timeout=30, limits=limits)
        self.stop, self.refusals = threading.Event(), refusals
        self.answers = [[] for _ in range(threads)]  # per thread: (status, version, retry, when)
        self.errors = []  # (thread, exception) of requests that got no HTTP answer
        self.threads = [threading.Thread(target=self.run, args=(i,), daemon=True)
                        for i in range(threads)]
        for t in self.threads: t.start()

    def run(self, i: int):
        while not self.stop.is_set():
            try: answer = self.http.post("/predict", json=ROW)
            except httpx.HTTPError as e:
                self.errors.append((i, repr(e)))
                return
            version = answer.json().get("version") if answer.status_code == 200 else None
            retry = answer.headers.get("retry-after")
            self.answers[i].append((answer.status_code, version, retry, time.monotonic()))
            if self.refusals and sum(a[0] == 503 for a in self.answers[i]) >= self.refusals: return

    def count(self) -> int: return sum(map(len, self.answers))

    def finish(self, timeout: float = 60):
        self.stop.set()
        for t in self.threads: t.join(timeout)
        assert not any(t.is_alive() for t in self.threads), "a client thread hangs"
        self.http.close()

    def all(self) -> list: return [a for answers in self.answers for a in answers]


def seen_since(load: Load, since: float, version: str) -> bool:
    "Whether an answer that came after `since` (a `time.monotonic()`) was from `version`."
    return any(v == version and t > since for answers in load.answers for _, v, _, t in answers)


def metric(text: str, name: str) -> float:
    "The value of the sample `name` (with its labels) in a Prometheus text page; 0 when absent."
    values = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name)]
    return values[0] if values else 0.0


@pytest.mark.parametrize("run", REPEAT)
def test_an_alias_move_reaches_the_server_under_load(registry, run):
    from mlwb.release import move_alias, rollback
    ws, settings = registry
    champion_is(settings, "1")
    server = Server(ws, "--follow-every", 0.2)
    load = Load(server.url)
    try:
        wait_for(lambda: all(len(a) >= 5 for a in load.answers), 60, "every client to be answered")
        move_alias(NAME, "champion", "2", reason="lifecycle test", force=True, settings=settings)
        wait_for(lambda: server.metadata()["version"] == "2", 60, "/metadata to report version 2")
        mark = time.monotonic()
        wait_for(lambda: seen_since(load, mark, "2"), 60, "answers from version 2")
        rollback(NAME, "lifecycle test", settings=settings)
        wait_for(lambda: server.metadata()["version"] == "1", 60, "/metadata to report version 1 again")
        mark = time.monotonic()
        wait_for(lambda: seen_since(load, mark, "1"), 60, "answers from version 1 again")
    finally:
        load.finish()
        meta, metrics = server.metadata(), server.metrics()
        server.stop()
    assert load.errors == [] and {a[0] for a in load.all()} == {200}, load.errors
    for answers in load.answers:  # each client saw 1, then 2, then 1 again: no flapping
        versions = [a[1] for a in answers]
        changes = [b for a, b in zip(versions, versions[1:]) if a != b]
        assert changes in (["2", "1"], ["2"], []), changes
    assert meta["changed_at"] and meta["variants"]["champion"]["previous_version"] == "2"
    assert metric(metrics, 'mlwb_model_swaps_total{variant="champion"}') == 2
    info = [line for line in metrics.splitlines() if line.startswith("mlwb_model_info{")]
    assert len(info) == 1 and 'version="1"' in info[0] and info[0].endswith(" 1.0"), info
    assert any("lifecycle version 1 -> 2" in line for line in server.log), server.log
    assert any("lifecycle version 2 -> 1" in line for line in server.log), server.log


def test_a_failed_load_keeps_the_old_model_serving(registry):
    ws, settings = registry
    champion_is(settings, "1")
    server = Server(ws, "--follow-every", 0.2)
    try:
        champion_is(settings, "3")  # its files are gone: every load fails
        errors = 'mlwb_model_load_errors_total{variant="champion"}'
        failed = lambda: metric(server.metrics(), errors)
        wait_for(lambda: failed() >= 2, 60, "two failed loads (one per look at the registry)")
        answer = httpx.post(f"{server.url}/predict", json=ROW, timeout=10)
        assert answer.status_code == 200 and answer.json()["version"] == "1"
        assert server.metadata()["version"] == "1"
    finally:
        server.stop()
        champion_is(settings, "1")
    assert any("still serving version 1" in line for line in server.log), server.log


@pytest.mark.parametrize("run", REPEAT)
def test_sigterm_under_load_answers_or_refuses_every_request(registry, run):
    ws, settings = registry
    champion_is(settings, "1")
    server = Server(ws, "--follow-every", 0)
    load = Load(server.url, refusals=20)  # clients come back after a refusal: retries, stragglers
    try:
        wait_for(lambda: all(len(a) >= 5 for a in load.answers), 60, "every client to be answered")
        server.process.send_signal(signal.SIGTERM)
        wait_for(lambda: not any(t.is_alive() for t in load.threads), 60, "every client to be refused")
    finally: load.finish()
    assert server.process.wait(30) == 0
    assert load.errors == [], load.errors  # no reset, no connection refused, no read error
    answers = load.all()
    assert {a[0] for a in answers} == {200, 503}
    assert all(a[2] == "1" for a in answers if a[0] == 503)
    assert all(a[-1][0] == 503 for a in load.answers)  # each client ended refused, told to retry
