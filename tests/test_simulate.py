"""`mlwb simulate`: the fraud-detection scenario at reduced size, end to end on the real parts -- a `mlwb release
serve` process, HTTP traffic, the request log, a pipeline run that retrains, release moves in the registry --
then judged from what those parts recorded, not from what the simulation says about itself."""
import json

import numpy as np
import pandas as pd
import pytest
import yaml

from conftest import run_mlwb

# The default scenario, smaller: 5 weeks of 6 requests a day; the world moves in week 2, the retrained
# model is released in week 4 (after a week of labels since the drift), the faulty build in week 5.
SMALL = {"weeks": 5, "traffic": {"requests_per_day": 6}, "changes": [{"week": 2, "drift": 1.0}],
         "policy": {"shadow": {"requests": 6}, "canary": {"steps": [0.5], "requests": 6}},
         "faulty_release": {"week": 5}}


# The end-to-end tests share the session's fraud-detection workspace (conftest's `project_run`), whose pipeline
# has already run with the scenario's initial parameters: the first champion's run is reused, not redone.
ON_THE_PROJECT_RUN = pytest.mark.parametrize("project_run", ["fraud-detection"], indirect=True)


@pytest.fixture(scope="module")
def simulated(project_run):
    "The session's fraud-detection workspace after `mlwb simulate` of the small scenario: (workspace, output folder, process)."
    ws = project_run.ws
    project = ws / "projects" / "fraud-detection"
    scenario = yaml.safe_load((project / "production.yml").read_text())
    for key, value in SMALL.items():
        scenario[key] = {**scenario[key], **value} if isinstance(value, dict) else value
    (ws / "small.yml").write_text(yaml.safe_dump(scenario))
    out = ws / "runs" / "simulate" / "fraud-detection"  # the default folder, where the capstone checks look
    env = {"MLWB_WORKSPACE": str(ws), "MLFLOW_TRACKING_URI": "", "IN_TEST": "1"}
    done = run_mlwb("simulate", "fraud-detection", "--scenario", ws / "small.yml", cwd=ws, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    yield ws, out, done
    from mlwb.config import load_settings
    from mlwb.release import move_alias
    first = next(e["version"] for e in events(out) if e["kind"] == "champion")
    for alias in ("champion", "challenger"):  # the shared workspace's champion as the other tests know it
        move_alias("fraud-detection", alias, first, "after test_simulate", force=True, settings=load_settings(ws, environ={}))


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
