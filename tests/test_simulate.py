"""`mlwb simulate`: the fraud-detection and house-prices scenarios at reduced size, end to end on the real parts --
a `mlwb release serve` process, HTTP traffic, the request log, a pipeline run that retrains, release moves in the
registry -- then judged from what those parts recorded, not from what the simulation says about itself."""
import json
import shutil

import numpy as np
import pandas as pd
import pytest
import yaml

from conftest import REPO, run_mlwb

# The default scenario, smaller: 5 weeks of 6 requests a day; the world moves in week 2, the retrained
# model is released in week 4 (after a week of labels since the drift), the faulty build in week 5.
SMALL = {"weeks": 5, "traffic": {"requests_per_day": 6}, "changes": [{"week": 2, "drift": 1.0}],
         "policy": {"shadow": {"requests": 6}, "canary": {"steps": [0.5], "requests": 6}},
         "faulty_release": {"week": 5}}


# The end-to-end tests share the session's fraud-detection workspace (conftest's `project_run`), whose pipeline
# has already run with the scenario's initial parameters: the first champion's run is reused, not redone.
ON_THE_PROJECT_RUN = pytest.mark.parametrize("project_run", ["fraud-detection"], indirect=True)


def play_small(project_run, project: str, small: dict):
    "Play `project`'s scenario with `small`'s keys in the session's workspace: (workspace, output folder, process)."
    ws = project_run.ws
    scenario = yaml.safe_load((ws / "projects" / project / "production.yml").read_text())
    for key, value in small.items():
        scenario[key] = {**scenario[key], **value} if isinstance(value, dict) else value
    (ws / f"small-{project}.yml").write_text(yaml.safe_dump(scenario))
    out = ws / "runs" / "simulate" / project  # the default folder, where the capstone checks look
    env = {"MLWB_WORKSPACE": str(ws), "MLFLOW_TRACKING_URI": "", "IN_TEST": "1"}
    done = run_mlwb("simulate", project, "--scenario", ws / f"small-{project}.yml", cwd=ws, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return ws, out, done


def restore_champion(ws, project: str, out):
    "Point both aliases back at the first champion: the shared workspace's champion as the other tests know it."
    from mlwb.config import load_settings
    from mlwb.release import move_alias
    first = next(e["version"] for e in events(out) if e["kind"] == "champion")
    for alias in ("champion", "challenger"):
        move_alias(project, alias, first, "after test_simulate", force=True, settings=load_settings(ws, environ={}))


@pytest.fixture(scope="module")
def simulated(project_run):
    "The session's fraud-detection workspace after `mlwb simulate` of the small scenario: (workspace, output folder, process)."
    ws, out, done = play_small(project_run, "fraud-detection", SMALL)
    yield ws, out, done
    restore_champion(ws, "fraud-detection", out)


def events(out):
    return json.loads((out / "events.json").read_text())


def request_log(out):
    from mlwb.request_log import read_request_log
    return read_request_log(out / "requests")


@ON_THE_PROJECT_RUN
def test_the_loop_happens_in_order(simulated):
    ws, out, _ = simulated
    kinds = [e["kind"] for e in events(out)]
    assert [e["seq"] for e in events(out)] == list(range(1, len(kinds) + 1))
    alarms = [e["week"] for e in events(out) if e["kind"] == "alarm"]
    assert alarms and alarms[0] == 2, alarms  # the week the world moved, not before
    loop = ["champion", "alarm", "retrain", "registered", "shadow", "canary", "promote", "registered", "shadow", "rollback"]
    at = 0
    for kind in kinds:  # the loop's steps appear in this order (monitor events in between)
        if at < len(loop) and kind == loop[at]: at += 1
    assert at == len(loop), kinds


@ON_THE_PROJECT_RUN
def test_no_user_request_failed_while_the_faulty_build_failed_in_shadow(simulated):
    ws, out, _ = simulated
    outcome = json.loads((out / "outcome.json").read_text())
    log = request_log(out)
    users = log[~log.variant.astype(str).str.startswith("shadow:")]
    assert outcome["failed_requests"] == 0 and (users.status == 200).all()
    assert outcome["requests"] == users.request_id.nunique()  # every request the client sent is in the log
    shadow = log[log.variant == "shadow:challenger"]
    assert (shadow.status >= 500).any()  # the broken build really failed ... unseen by users
    assert "0 failed" in simulated[2].stdout


@ON_THE_PROJECT_RUN
def test_the_faulty_build_is_rolled_back_and_never_champion(simulated):
    from mlwb.config import load_settings
    from mlwb.release import release_status
    ws, out, _ = simulated
    status = release_status("fraud-detection", load_settings(ws, environ={}))
    faulty = json.loads((out / "outcome.json").read_text())["faulty_versions"]
    assert len(faulty) == 1 and faulty == json.loads((out / "outcome.json").read_text())["rolled_back"]
    assert status["aliases"]["challenger"] == status["aliases"]["champion"] != faulty[0]
    moves = status["history"]
    assert not any(m["alias"] == "champion" and m["to"] == faulty[0] for m in moves)
    back = [m for m in moves if m["alias"] == "challenger" and m["from"] == faulty[0]]
    assert back and back[-1]["reason"].startswith("rolled back:") and "shadow requests failed" in back[-1]["reason"]
    promoted = [m for m in moves if m["alias"] == "champion" and m["action"] == "promote"]
    assert promoted and "canary passed" in promoted[-1]["reason"]


@ON_THE_PROJECT_RUN
def test_counterfactual_cost_is_the_first_champion_on_the_same_traffic(simulated):
    "Recomputed here from the request log, the labels and the first champion loaded by MLflow."
    import mlflow
    from mlwb.config import load_settings
    from mlwb.tracking import mlflow_client, tracking_uri
    ws, out, _ = simulated
    settings = load_settings(ws, environ={})
    first = next(e["version"] for e in events(out) if e["kind"] == "champion")
    log = request_log(out)
    served = log[log.row.notna() & ~log.variant.astype(str).str.startswith("shadow:")].astype({"row": "int64"})
    rows = served.merge(pd.read_parquet(out / "keys.parquet"), on=["request_id", "row"])
    rows = rows.merge(pd.read_parquet(out / "labels.parquet").rename(columns={"transaction_id": "key", "week": "w"}), on="key")
    mlflow.set_tracking_uri(tracking_uri(settings)); mlflow.set_registry_uri(tracking_uri(settings))
    model = mlflow.sklearn.load_model(f"models:/fraud-detection/{first}")
    threshold = float(mlflow_client(settings).get_model_version("fraud-detection", first).tags["threshold"])
    alarm = model.predict_proba(rows[list(model.feature_names_in_)])[:, 1] >= threshold
    fraud = rows.is_fraud.astype(bool).to_numpy()
    cost = pd.Series(250 * (fraud & ~alarm) + 5 * (~fraud & alarm)).groupby(rows.week.to_numpy()).mean() * 1000
    outcome = json.loads((out / "outcome.json").read_text())
    reported = pd.Series({int(w): v["first_champion_cost_per_1000"] for w, v in outcome["weeks"].items()})
    np.testing.assert_allclose(reported.sort_index().to_numpy(), cost.sort_index().to_numpy(), rtol=0.02)
    assert outcome["counterfactual"] == pytest.approx(reported.sum())


@ON_THE_PROJECT_RUN
def test_everything_is_under_one_mlflow_run_and_training_data_is_a_dataset_input(simulated):
    from mlwb.config import load_settings
    from mlwb.tracking import mlflow_client
    ws, out, _ = simulated
    client = mlflow_client(load_settings(ws, environ={}))
    experiment = client.get_experiment_by_name("fraud-detection").experiment_id
    parent = client.search_runs([experiment], "tags.`mlwb.simulation` = 'production'")[0]
    assert parent.info.status == "FINISHED" and parent.data.metrics["failed_requests"] == 0
    assert {"events.json", "timeline.html", "outcome.json"} <= {a.path for a in client.list_artifacts(parent.info.run_id)}
    children = client.search_runs([experiment], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert {c.data.tags.get("mlwb.simulation") for c in children} >= {"first champion", "retrain", "faulty build"}
    retrain = next(c for c in children if c.data.tags.get("mlwb.simulation") == "retrain")
    stages = client.search_runs([experiment], f"tags.mlflow.parentRunId = '{retrain.info.run_id}'")
    train = next(s for s in stages if s.data.tags.get("mlwb.stage") == "train")
    inputs = {d.dataset.name: d.dataset for d in train.inputs.dataset_inputs}
    assert {"fraud-detection training", "fraud-detection validation"} <= set(inputs)
    assert inputs["fraud-detection training"].digest and "features.parquet" in inputs["fraud-detection training"].source
    html = (out / "timeline.html").read_text()
    assert html.count("data:image/png;base64,") == 3 and "rollback" in html


@pytest.mark.parametrize("change, named", [
    ({"weeks": 0}, "'weeks' must be a whole number"),
    ({"policy": {"canary": {"steps": [0.9, 0.1]}}}, "'policy.canary.steps'"),
    ({"changes": [{"week": 2, "drfit": 1.0}]}, "changes[0].drfit: not a knob"),
    ({"traffic": {"request_per_day": 5}}, "unknown key 'traffic.request_per_day'"),
])
def test_a_bad_scenario_file_is_refused_naming_the_key(workspace, change, named):
    project = workspace / "projects" / "p"
    project.mkdir()
    (project / "pipeline.yml").write_text("stages: []\n")
    (project / "production.yml").write_text(yaml.safe_dump(change))
    done = run_mlwb("simulate", "p", cwd=workspace, env={"MLWB_WORKSPACE": str(workspace)})
    assert done.returncode == 2 and named in done.stderr and "production.yml" in done.stderr, done.stderr


@ON_THE_PROJECT_RUN
def test_the_operating_lesson_runs_on_the_simulation(simulated, tmp_path, monkeypatch):
    "The project's lesson on operating the model reads the simulation's folder; its own asserts check the story."
    import papermill
    from mlwb.config import load_settings
    ws, out, _ = simulated
    monkeypatch.setenv("MLWB_WORKSPACE", str(ws))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "")
    project = ws / "projects" / "fraud-detection"
    papermill.execute_notebook(project / "operating.ipynb", tmp_path / "operating.ipynb", parameters={"simulation": str(out)},
                               cwd=project, kernel_name=load_settings(ws, environ={}).kernel_name, progress_bar=False)


@ON_THE_PROJECT_RUN
def test_the_capstone_milestones_judge_the_simulation(simulated):
    from conftest import NO_WARM_KERNELS
    ws, out, _ = simulated
    env = {"MLWB_WORKSPACE": str(ws), "MLFLOW_TRACKING_URI": "", **NO_WARM_KERNELS}
    checked = run_mlwb("check", "fraud-detection", "--capstone", cwd=ws, env=env)
    assert "✓ ingest" not in checked.stdout  # the capstone judges the simulation: no pipeline run
    outcome = json.loads((out / "outcome.json").read_text())
    recovered = outcome["cost_after_promotion"] < outcome["counterfactual_after_promotion"]
    assert "✓ 10. Capstone: the drift alarm fired" in checked.stdout, checked.stdout + checked.stderr
    assert "✓ 12. Capstone: the faulty release was rolled back" in checked.stdout, checked.stdout
    assert ("✓ 11." if recovered else "✗ 11.") in checked.stdout, checked.stdout
    assert checked.returncode == (0 if recovered else 1)


# The house-prices scenario, smaller: 5 weeks of 6 requests a day; prices rise 15% in week 2, whose sale prices
# arrive in week 3 -- the alarm -- so the model retrained on week 2 is released in week 3 and 4, the faulty build in week 5.
HOUSES_SMALL = {"weeks": 5, "traffic": {"requests_per_day": 6}, "changes": [{"week": 2, "inflation": 0.15}],
                "policy": {"shadow": {"requests": 6}, "canary": {"steps": [0.5], "requests": 6}},
                "faulty_release": {"week": 5}}
ON_THE_HOUSE_PRICES_RUN = pytest.mark.parametrize("project_run", ["house-prices"], indirect=True)


@pytest.fixture(scope="module")
def simulated_houses(project_run):
    """The session's house-prices workspace after `mlwb simulate` of the small scenario; its data and artifacts,
    which the retraining run rewrote, are put back afterwards with the champion, for the project's other tests."""
    folder, backup = project_run.folder, project_run.ws / "before-simulate"
    for part in ("data", "artifacts"): shutil.copytree(folder / part, backup / part)
    ws, out, done = play_small(project_run, "house-prices", HOUSES_SMALL)
    yield ws, out, done
    restore_champion(ws, "house-prices", out)
    for part in ("data", "artifacts"):
        shutil.rmtree(folder / part)
        shutil.copytree(backup / part, folder / part)


def served_with_labels(out, key: str) -> pd.DataFrame:
    "The rows users got answers for, from the request log, with the world's labels joined by the simulation's keys."
    log = request_log(out)
    served = log[log.row.notna() & ~log.variant.astype(str).str.startswith("shadow:")].astype({"row": "int64"})
    rows = served.merge(pd.read_parquet(out / "keys.parquet"), on=["request_id", "row"])
    return rows.merge(pd.read_parquet(out / "labels.parquet").rename(columns={key: "key", "week": "w"}), on="key")


@ON_THE_HOUSE_PRICES_RUN
def test_house_prices_inflation_is_caught_by_late_prices_retrained_released_and_the_faulty_build_rolled_back(simulated_houses):
    ws, out, done = simulated_houses
    happened = events(out)
    alarms = [e for e in happened if e["kind"] == "alarm"]
    assert alarms and alarms[0]["week"] == 3, alarms  # a week after prices rose: their sale prices came a week late
    assert alarms[0]["drifted"] == []  # the inputs did not move: only the labelled week showed it
    loop = ["champion", "alarm", "retrain", "registered", "shadow", "canary", "promote", "registered", "shadow", "rollback"]
    kinds, at = [e["kind"] for e in happened], 0
    for kind in kinds:
        if at < len(loop) and kind == loop[at]: at += 1
    assert at == len(loop), kinds
    outcome = json.loads((out / "outcome.json").read_text())
    log = request_log(out)
    users = log[~log.variant.astype(str).str.startswith("shadow:")]
    assert outcome["failed_requests"] == 0 and (users.status == 200).all() and "0 failed" in done.stdout
    assert (log[log.variant == "shadow:challenger"].status >= 500).any()  # the broken build failed, unseen by agents
    assert outcome["faulty_versions"] == outcome["rolled_back"] and len(outcome["rolled_back"]) == 1
    from mlwb.config import load_settings
    from mlwb.release import release_status
    status = release_status("house-prices", load_settings(ws, environ={}))
    promoted = [m for m in status["history"] if m["alias"] == "champion" and m["action"] == "promote"]
    assert promoted and "canary passed" in promoted[-1]["reason"] and promoted[-1]["to"] not in outcome["rolled_back"]
    assert not any(m["alias"] == "champion" and m["to"] == outcome["rolled_back"][0] for m in status["history"])
    html = (out / "timeline.html").read_text()
    assert html.count("data:image/png;base64,") == 3 and "rollback" in html and "rmse" in html


@ON_THE_HOUSE_PRICES_RUN
def test_house_prices_costs_are_the_pricing_errors_of_the_served_and_the_first_champion(simulated_houses):
    "Recomputed from the request log's prices, the sale prices and the first champion loaded by MLflow."
    import mlflow
    from mlwb.config import load_settings
    from mlwb.tracking import tracking_uri
    ws, out, _ = simulated_houses
    rows = served_with_labels(out, "house_id")
    first = next(e["version"] for e in events(out) if e["kind"] == "champion")
    uri = tracking_uri(load_settings(ws, environ={}))
    mlflow.set_tracking_uri(uri); mlflow.set_registry_uri(uri)
    model = mlflow.sklearn.load_model(f"models:/house-prices/{first}")
    cost = lambda price: 0.02 * (price - rows.price).abs() + 1000 * ((price - rows.price).abs() > 0.1 * rows.price)
    weekly = lambda values: (values.groupby(rows.week.to_numpy()).mean() * 1000).sort_index().to_numpy()
    outcome = json.loads((out / "outcome.json").read_text())
    weeks = pd.DataFrame(outcome["weeks"]).T.sort_index(key=lambda w: w.astype(int))
    served = rows.prediction.astype(float)
    np.testing.assert_allclose(weeks.cost_per_1000.astype(float), weekly(cost(served)), rtol=1e-6)
    counterfactual = pd.Series(model.predict(rows[list(model.feature_names_in_)]), index=rows.index)
    np.testing.assert_allclose(weeks.first_champion_cost_per_1000.astype(float), weekly(cost(counterfactual)), rtol=0.02)
    rmse = np.sqrt(((served - rows.price) ** 2).groupby(rows.week.to_numpy()).mean()).sort_index().to_numpy()
    np.testing.assert_allclose(weeks.rmse.astype(float), rmse, rtol=1e-6)
    assert outcome["counterfactual"] == pytest.approx(weeks.first_champion_cost_per_1000.astype(float).sum())
    assert weeks.rmse.astype(float).iloc[1] > 1.2 * weeks.rmse.astype(float).iloc[0]  # the inflation's week priced badly


@pytest.mark.parametrize("change, named", [
    ({"costs": {"missed_fraud": 250.0}}, "unknown key 'costs.missed_fraud'"),  # a classifier's cost, in a regressor's scenario
    ({"changes": [{"week": 3, "inflation": 1.5}]}, "changes[0]: make_house_sales: 'inflation' must be a number in [0, 1]"),
    ({"task": "ranking"}, "'task' must be one of ['classification', 'regression']"),
])
def test_a_bad_house_prices_scenario_is_refused_naming_the_key(workspace, change, named):
    shutil.copytree(REPO / "projects" / "house-prices", workspace / "projects" / "house-prices",
                    ignore=shutil.ignore_patterns("data", "artifacts", "_exercise"))
    scenario = yaml.safe_load((REPO / "projects" / "house-prices" / "production.yml").read_text())
    (workspace / "bad.yml").write_text(yaml.safe_dump({**scenario, **change}))
    done = run_mlwb("simulate", "house-prices", "--scenario", workspace / "bad.yml", cwd=workspace,
                    env={"MLWB_WORKSPACE": str(workspace)})
    assert done.returncode == 2 and named in done.stderr and "bad.yml" in done.stderr, done.stderr
