"""Releasing models: the gated champion alias and its history, traffic plans in a real `mlwb serve`, and the A/B analysis."""
import json
import os
import random
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import numpy as np
import pandas as pd
import pytest

from conftest import ServerProcess, new_workspace, wait_for

REPO = Path(__file__).resolve().parents[1]
MLWB = Path(sys.executable).parent / "mlwb"

MODEL_CODE = '''
import mlflow

class Threshold(mlflow.pyfunc.PythonModel):
    "Flags x above THRESHOLD; fails on x above 1000 when FAIL."
    def predict(self, context, model_input, params=None):
        if FAIL and (model_input["x"] > 1000).any(): raise ValueError("challenger broken")
        return (model_input["x"] > THRESHOLD).astype(int).tolist()

mlflow.models.set_model(Threshold())
'''


def settings_of(ws: Path):
    from mlwb.config import load_settings
    return load_settings(ws, environ={})


def add_version(ws: Path, name: str, ap: float, threshold: float = 0.5, fail: bool = False) -> str:
    "Register a tiny pyfunc model as a new version of `name`, its run logging average_precision `ap`."
    import mlflow.pyfunc
    from mlflow.models import infer_signature
    from mlwb.tracking import ensure_experiment, mlflow_client, tracking_to
    settings = settings_of(ws)
    client = mlflow_client(settings)
    code = ws / f"model_{name}_{ap}_{fail}.py"
    code.write_text(MODEL_CODE.replace("THRESHOLD", str(threshold)).replace("FAIL", str(fail)))
    example = pd.DataFrame({"x": [0.1, 0.9]})
    with tracking_to(settings), mlflow.start_run(experiment_id=ensure_experiment(client, "release-tests", settings)):
        mlflow.log_metric("average_precision", ap)
        info = mlflow.pyfunc.log_model(name="model", python_model=str(code), signature=infer_signature(example, np.array([0])),
                                       input_example=example, pip_requirements=[])
        return mlflow.register_model(info.model_uri, name).version


def bare_version(ws: Path, name: str, ap: float | None) -> str:
    "Register a version of `name` with no model files (a move needs only the registry), its run logging average_precision `ap` (none if None)."
    import mlflow
    from mlwb.tracking import ensure_experiment, mlflow_client, tracking_to
    settings = settings_of(ws)
    client = mlflow_client(settings)
    with tracking_to(settings), mlflow.start_run(experiment_id=ensure_experiment(client, "release-tests", settings)) as run:
        if ap is not None: mlflow.log_metric("average_precision", ap)
    if not client.search_registered_models(f"name='{name}'"): client.create_registered_model(name)
    return str(client.create_model_version(name, f"runs:/{run.info.run_id}/model", run.info.run_id).version)


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    "A workspace whose registry holds `gate` (v1 0.8, v2 0.7, v3 0.9), `fraud` (v1 champion, v2 challenger) and `canary` (v2 fails)."
    from mlwb.release import move_alias
    ws = new_workspace(tmp_path_factory.mktemp("release"))
    for ap in (0.8, 0.7, 0.9): add_version(ws, "gate", ap)
    move_alias("gate", "champion", "1", "first release", settings=settings_of(ws))
    for ap, t in ((0.8, 0.5), (0.9, 0.4)): add_version(ws, "fraud", ap, t)
    add_version(ws, "canary", 0.8), add_version(ws, "canary", 0.9, fail=True)
    for name in ("fraud", "canary"):
        move_alias(name, "champion", "1", settings=settings_of(ws))
        move_alias(name, "challenger", "2", settings=settings_of(ws))
    return ws


def mlwb(ws: Path, *args):
    env = {**os.environ, "MLWB_WORKSPACE": str(ws)}
    env.pop("MLFLOW_TRACKING_URI", None)
    return subprocess.run([str(MLWB), *map(str, args)], env=env, capture_output=True, text=True, timeout=120)


# --- the registry --------------------------------------------------------------------------------------------------

def test_promotion_refused_by_the_gate_and_allowed_by_force(ws):
    refused = mlwb(ws, "release", "promote", "gate", "2")
    assert refused.returncode == 2 and "refused by the gate" in refused.stderr, refused.stderr
    assert "refused by the gate" in mlwb(ws, "release", "challenger", "gate", "2").stderr  # a challenger is gated too
    forced = mlwb(ws, "release", "promote", "gate", "2", "--force", "--reason", "hotfix for a demo")
    assert forced.returncode == 0 and "1 -> 2 (forced)" in forced.stdout, forced.stderr
    status = json.loads(mlwb(ws, "release", "status", "gate", "--json").stdout)
    assert status["aliases"]["champion"] == "2"
    last = status["history"][-1]
    assert last["forced"] and last["from"] == "1" and last["to"] == "2" and "hotfix for a demo" in last["reason"] and last["who"]


def test_force_promotes_a_version_the_gate_cannot_judge(ws):
    from mlwb.release import ReleaseError, alias_version, move_alias
    from mlwb.tracking import mlflow_client
    settings = settings_of(ws)
    bare_version(ws, "unmeasured", 0.8), bare_version(ws, "unmeasured", None)  # v2 logged no average_precision
    move_alias("unmeasured", "champion", "1", settings=settings)
    with pytest.raises(ReleaseError, match="refused by the gate: no metric 'average_precision'"):
        move_alias("unmeasured", "champion", "2", settings=settings)
    forced = mlwb(ws, "release", "promote", "unmeasured", "2", "--force", "--reason", "metrics come later")
    assert forced.returncode == 0 and "1 -> 2 (forced)" in forced.stdout, forced.stderr
    assert alias_version(mlflow_client(settings), "unmeasured", "champion") == "2"
    last = json.loads(mlwb(ws, "release", "status", "unmeasured", "--json").stdout)["history"][-1]
    assert last["forced"] and "metrics come later" in last["reason"] and "no metric 'average_precision'" in last["reason"]


def test_rollback_restores_the_previous_champion(ws):
    from mlwb.release import ReleaseError, alias_version, history, move_alias, rollback
    from mlwb.tracking import mlflow_client
    settings = settings_of(ws)
    client = mlflow_client(settings)
    for ap in (0.7, 0.8, 0.9): move_alias("undo", "champion", bare_version(ws, "undo", ap), settings=settings)  # promote 1, 2, 3
    assert alias_version(client, "undo", "champion") == "3"
    first = rollback("undo", "v3 misbehaved", settings=settings)
    assert (first["from"], first["to"], alias_version(client, "undo", "champion")) == ("3", "2", "2")
    second = rollback("undo", "v2 misbehaved too", settings=settings)  # further back, not forward to 3 again
    assert (second["from"], second["to"], alias_version(client, "undo", "champion")) == ("2", "1", "1")
    with pytest.raises(ReleaseError, match="nothing to roll back to"): rollback("undo", settings=settings)
    assert alias_version(client, "undo", "champion") == "1"
    assert [m["action"] for m in history(client, "undo")] == ["promote"] * 3 + ["rollback"] * 2
    cli = mlwb(ws, "release", "rollback", "undo")
    assert cli.returncode == 2 and "nothing to roll back to" in cli.stderr, cli.stderr


# --- routing ---------------------------------------------------------------------------------------------------------

def test_routing_is_sticky_and_splits_within_tolerance():
    from mlwb.rollout import choose
    keys = [f"user-{i}" for i in range(50_000)]
    first = [choose(k, 0.1) for k in keys]
    assert first == [choose(k, 0.1) for k in keys]  # sticky: the same key, the same variant
    share = first.count("challenger") / len(keys)
    assert abs(share - 0.1) < 4 * (0.1 * 0.9 / len(keys)) ** 0.5, share
    rng = random.Random(1)
    keyless = [choose(None, 0.3, rng) for _ in range(20_000)]
    assert abs(keyless.count("challenger") / 20_000 - 0.3) < 4 * (0.3 * 0.7 / 20_000) ** 0.5


# --- a real server ---------------------------------------------------------------------------------------------------

class Server(ServerProcess):
    "`mlwb release serve models:/NAME --plan PLAN` in a subprocess on a free loopback port."
    def __init__(self, ws: Path, name: str, plan: dict):
        self.log_dir = ws / "requests" / name
        (ws / f"{name}-plan.json").write_text(json.dumps(plan))
        env = {**os.environ, "MLWB_WORKSPACE": str(ws)}
        env.pop("MLFLOW_TRACKING_URI", None)
        command = lambda port: [str(MLWB), "release", "serve", f"models:/{name}", "--plan", str(ws / f"{name}-plan.json"),
                                "--port", str(port), "--log-dir", str(self.log_dir)]
        super().__init__(command, ws / f"{name}-server.log", env)
        wait_for(self.both_variants_ready, 90, "the server to be ready with both variants")

    def both_variants_ready(self) -> bool:
        if not self.running(): return False
        try:
            return (httpx.get(f"{self.url}/health/ready", timeout=1).status_code == 200
                    and len(httpx.get(f"{self.url}/metadata").json()["variants"]) == 2)
        except httpx.HTTPError: return False

    def predict(self, x: float, key: str | None = None, http=httpx):
        return http.post(f"{self.url}/predict", json={"records": [{"x": x}]}, headers={"x-mlwb-key": key} if key else {}, timeout=10)

    def records(self) -> list:
        from mlwb.request_log import read_log_file
        return [record for f in self.log_dir.rglob("*.jsonl") for record in read_log_file(f)]


@pytest.fixture(scope="module")
def ab_server(ws):
    server = Server(ws, "fraud", {"mode": "ab", "share": 0.5, "poll_seconds": 0.2})
    yield server
    server.stop()


def test_a_real_server_routes_sticky_by_key(ab_server):
    from mlwb.rollout import choose
    with httpx.Client() as http:
        answers = {f"user-{i}": [ab_server.predict(0.45, f"user-{i}", http).json() for _ in range(2)] for i in range(40)}
    for key, (a, b) in answers.items():
        assert a["variant"] == b["variant"] == choose(key, 0.5), key
        assert a["predictions"] == ([1] if a["variant"] == "challenger" else [0])  # v2 flags 0.45, v1 does not
    assert {a["variant"] for a, _ in answers.values()} == {"champion", "challenger"}
    wanted = {a["request_id"] for a, _ in answers.values()}
    def all_logged():
        logged = {r["request_id"]: r["variant"] for r in ab_server.records()}
        return logged if wanted <= set(logged) else None
    logged = wait_for(all_logged, what="every answered request in the log")
    assert all(logged[a["request_id"]] == a["variant"] for a, _ in answers.values())


def test_an_alias_move_under_load_fails_no_request(ab_server, ws):
    from mlwb.release import move_alias
    results, failures, stop = [], [], threading.Event()
    def load():
        with httpx.Client() as http:
            while not stop.is_set():
                try:
                    r = ab_server.predict(0.45, None, http)
                    results.append((r.status_code, r.json().get("variant"), r.json().get("version")))
                except Exception as e: failures.append(f"{type(e).__name__}: {e}")  # a dropped connection or a bad body: a failed request
    threads = [threading.Thread(target=load) for _ in range(4)]
    for t in threads: t.start()
    wait_for(lambda: len(results) >= 50, what="50 answers before the move")
    move_alias("fraud", "champion", "2", "challenger won", settings=settings_of(ws))
    wait_for(lambda: any(v == "champion" and version == "2" for _, v, version in results[-50:]),
             what="the champion variant answering with version 2")
    moved_at = len(results)
    wait_for(lambda: len(results) >= moved_at + 50, what="50 answers after the move")
    stop.set()
    for t in threads: t.join()
    assert not failures, failures[:5]
    assert len(results) > 100 and all(status == 200 for status, _, _ in results), {s for s, _, _ in results}
    champion_versions = [version for _, v, version in results if v == "champion"]
    assert champion_versions[0] == "1" and champion_versions[-1] == "2"


def test_the_canary_rolls_back_when_the_challenger_fails(ws):
    from mlwb.release import history
    from mlwb.tracking import mlflow_client
    server = Server(ws, "canary", {"mode": "canary", "steps": [0.5], "step_seconds": 600, "min_requests": 5, "max_error_rate": 0.2})
    try:
        with httpx.Client() as http:
            first = [server.predict(5000.0, None, http) for _ in range(60)]
            after = [server.predict(5000.0, f"user-{i}", http) for i in range(40)]
    finally: server.stop()
    assert {r.status_code for r in first} == {200, 500}  # the challenger failed until the canary stopped sending it traffic
    assert {r.status_code for r in after} == {200} and {r.json()["variant"] for r in after} == {"champion"}
    moves = history(mlflow_client(settings_of(ws)), "canary")
    assert moves[-1]["action"] == "canary-rollback" and "error rate" in moves[-1]["reason"]


def test_shadow_scores_every_request_but_only_the_champion_answers(ws):
    server = Server(ws, "canary", {"mode": "shadow"})
    try:
        with httpx.Client() as http:
            answers = [server.predict(x, f"user-{i}", http) for i, x in enumerate([0.7, 5000.0] * 10)]
        wanted = {r.json()["request_id"] for r in answers}
        def all_shadowed():
            records = server.records()
            shadowed = {r["request_id"] for r in records if r["variant"] == "shadow:challenger"}
            return records if wanted <= shadowed else None
        records = wait_for(all_shadowed, what="every shadow score in the log")
    finally: server.stop()
    assert {r.status_code for r in answers} == {200} and {r.json()["variant"] for r in answers} == {"champion"}
    shadow = {r["request_id"]: r for r in records if r["variant"] == "shadow:challenger"}
    assert set(shadow) == {r.json()["request_id"] for r in answers}  # the challenger scored every request
    assert {r["status"] for r in shadow.values()} == {200, 500}  # and failed, unseen, on the large amounts
    assert all(r["prediction"] == 1 for r in shadow.values() if r["status"] == 200)


# --- the analysis ----------------------------------------------------------------------------------------------------

def write_log(folder: Path, n: int, share: float, seed: int = 0) -> pd.DataFrame:
    "A request log of `n` one-row requests, a `share` of them served by the challenger, and their outcomes."
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    variant = np.where(rng.random(n) < share, "challenger", "champion")
    outcome = rng.integers(0, 2, n)
    with open(folder / "requests-2026-11-23-1.jsonl", "w") as f:
        for i in range(n):
            f.write(json.dumps({"request_id": f"r{i}", "row": 0, "variant": variant[i], "status": 200, "prediction": int(outcome[i])}) + "\n")
        f.write('{"request_id": "cut sho')  # a crash mid-line
    return pd.DataFrame({"request_id": [f"r{i}" for i in range(n)], "row": 0, "outcome": outcome})


def test_the_srm_check_fires_on_a_skewed_split(tmp_path):
    from mlwb.ab_test import analyze_ab
    outcomes = write_log(tmp_path / "skewed", 4000, share=0.4)
    outcomes.to_csv(tmp_path / "outcomes.csv", index=False)
    report = analyze_ab(tmp_path / "skewed", tmp_path / "outcomes.csv", share=0.5)
    assert report["srm"]["mismatch"] and report["verdict"] == "keep testing" and "sample-ratio" in report["reason"]
    fair = write_log(tmp_path / "fair", 4000, share=0.5)
    fair.to_csv(tmp_path / "fair.csv", index=False)
    assert not analyze_ab(tmp_path / "fair", tmp_path / "fair.csv", share=0.5)["srm"]["mismatch"]
    cli = mlwb(tmp_path, "ab", "analyze", tmp_path / "skewed", tmp_path / "outcomes.csv", "--share", "0.5")
    assert cli.returncode == 0 and "MISMATCH" in cli.stdout and "verdict: keep testing" in cli.stdout, cli.stderr


def test_door_refusals_count_for_no_variant(tmp_path):
    from mlwb.ab_test import analyze_ab
    from mlwb.request_log import read_request_log
    outcomes = write_log(tmp_path / "log", 4000, share=0.5)
    log = read_request_log(tmp_path / "log")
    refused = pd.DataFrame({"request_id": [f"refused-{i}" for i in range(400)], "row": None, "variant": None, "status": 401, "prediction": None})
    report = analyze_ab(pd.concat([log, refused], ignore_index=True), outcomes, share=0.5)
    assert not report["srm"]["mismatch"] and sum(report["srm"]["counts"].values()) == 4000, report["srm"]
    as_champion = analyze_ab(pd.concat([log, refused.assign(variant="champion")], ignore_index=True), outcomes, share=0.5)
    assert as_champion["srm"]["mismatch"]  # what counting them as the champion's did to the split


# --- pipelines release through the same path -------------------------------------------------------------------------

HOUSE = "house-prices"


def run_house(ws: Path, *parameters: str):
    "`mlwb run house-prices -p ...` in `ws`: the completed process, and what register wrote."
    from conftest import run_mlwb
    env = {"MLWB_WORKSPACE": str(ws), "MLFLOW_TRACKING_URI": ""}
    done = run_mlwb("run", HOUSE, *[a for p in parameters for a in ("-p", p)], cwd=ws, env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    return done, json.loads((ws / "projects" / HOUSE / "artifacts" / "registered.json").read_text())


@pytest.fixture(scope="module")
def house(tmp_path_factory):
    "A workspace where house-prices ran twice: 30 boosting rounds, then a better model with 50."
    from conftest import set_stage_parameters
    ws = new_workspace(tmp_path_factory.mktemp("house-release"), HOUSE)
    set_stage_parameters(ws / "projects" / HOUSE, {"ingest": {"n_houses": 1500}})
    first, second = run_house(ws, "max_iter=30"), run_house(ws, "max_iter=50")
    return ws, first[1], second[1]


def champion_of(ws: Path, name: str = HOUSE) -> str | None:
    from mlwb.release import alias_version
    from mlwb.tracking import mlflow_client
    return alias_version(mlflow_client(settings_of(ws)), name, "champion")


def test_a_better_pipeline_model_is_promoted_on_the_record_and_rollback_returns_the_first(house):
    from mlwb.release import history, version_metrics
    from mlwb.tracking import mlflow_client
    ws, first, second = house
    assert first["promoted"] and first["version"] == first["champion"] == 1, first
    assert second["promoted"] and second["version"] == second["champion"] == 2, second
    assert "is the champion now; the champion was version 1" in second["decision"]
    client = mlflow_client(settings_of(ws))
    rmse = [version_metrics(client, HOUSE, v)["rmse"] for v in ("1", "2")]  # the gate's name
    assert rmse[1] < rmse[0]
    promotions = [(m["from"], m["to"]) for m in history(client, HOUSE) if m["action"] == "promote"]
    assert promotions[:2] == [(None, "1"), ("1", "2")]  # the pipeline's moves are in the history
    back = mlwb(ws, "release", "rollback", HOUSE, "--reason", "v2 misbehaved")
    assert back.returncode == 0 and "champion: 2 -> 1" in back.stdout, back.stdout + back.stderr
    assert champion_of(ws) == "1"
    # the gate judges a pipeline's version on its own metric, the right way round: no --force needed
    again = mlwb(ws, "release", "promote", HOUSE, "2", "--reason", "fixed")
    assert again.returncode == 0 and "champion: 1 -> 2" in again.stdout, again.stdout + again.stderr
    assert "forced" not in again.stdout
    refused = mlwb(ws, "release", "promote", HOUSE, "1")
    assert refused.returncode == 2 and "rmse" in refused.stderr, refused.stderr
    assert "does not beat the champion's" in refused.stderr


def test_a_register_stage_run_again_on_the_same_model_finishes_and_leaves_the_champion(house):
    ws, _, _ = house
    before = champion_of(ws)
    done, registered = run_house(ws, "max_iter=50", "register.n_examples=4")  # only register reruns
    assert "↷ train" in done.stdout and "✓ register" in done.stdout, done.stdout
    assert not registered["promoted"], registered
    assert str(registered["champion"]) == before == champion_of(ws)
    assert "stays: the new version holds the champion's own model" in registered["decision"]
    status = json.loads(mlwb(ws, "release", "status", HOUSE, "--json").stdout)
    assert str(registered["version"]) in status["versions"]
    assert status["history"][-1]["action"] == "candidate"


def test_promote_false_registers_a_candidate_and_moves_no_alias(house):
    ws, _, _ = house
    before = champion_of(ws)
    _, registered = run_house(ws, "max_iter=80", "promote=false")
    assert not registered["promoted"] and champion_of(ws) == before, registered
    assert "asked not to promote (promote=False)" in registered["decision"]


def test_a_sweep_registers_candidates_but_never_promotes(ws, monkeypatch):
    import mlflow
    from mlwb.release import SWEEP_VARIABLE, release_candidate
    from mlwb.tracking import ensure_experiment, mlflow_client, tracking_to
    settings = settings_of(ws)
    def candidate(ap: float):
        "An (empty) logged model of average precision `ap`, released as a register stage does."
        client = mlflow_client(settings)
        experiment = ensure_experiment(client, "sweeps", settings)
        with tracking_to(settings), mlflow.start_run(experiment_id=experiment):
            model = mlflow.initialize_logged_model(name="model", experiment_id=experiment)
        metrics = {"average_precision": ap}
        uri = f"models:/{model.model_id}"
        return release_candidate(uri, "swept", metrics, "average_precision", 0.1, settings=settings)
    assert candidate(0.6).promoted
    monkeypatch.setenv(SWEEP_VARIABLE, "1")
    swept = candidate(0.9)
    assert not swept.promoted and swept.champion == "1" and champion_of(ws, "swept") == "1"
    assert f"{SWEEP_VARIABLE} is set" in swept.decision
    monkeypatch.delenv(SWEEP_VARIABLE)
    by_hand = mlwb(ws, "release", "promote", "swept", swept.version)  # a person promotes the best
    assert by_hand.returncode == 0 and "champion: 1 -> 2" in by_hand.stdout, by_hand.stderr


def test_rollback_with_no_recorded_promotion_says_so(ws):
    from mlwb.tracking import mlflow_client
    version = bare_version(ws, "moved-by-hand", 0.8)
    client = mlflow_client(settings_of(ws))
    client.set_registered_model_alias("moved-by-hand", "champion", version)  # outside mlwb
    cli = mlwb(ws, "release", "rollback", "moved-by-hand")
    assert cli.returncode == 2, cli.stderr
    assert "no promotion of 'moved-by-hand' has been recorded" in cli.stderr
    assert "every recorded promotion has been rolled back" not in cli.stderr
