"""mlwb.tracking against real stores: one shared SQLite store used by two workspaces keeps every run's
artifacts beside it, the embedded store keeps its own folder, and the address `mlwb ui` prints opens the
project's runs list in the MLflow UI's model-training view (not its GenAI traces)."""
import re
from pathlib import Path

from conftest import REPO
from mlwb.core import stop_process
from mlwb.config import load_settings
from mlwb.tracking import embedded_artifact_root, ensure_experiment, mlflow_client, project_ui_url, run_url
from test_lab import serve

ARTIFACTS = REPO / "test-artifacts" / "browser"


def log_run_with_artifact(settings, project: str, note: Path) -> str:
    "Log one run with the file `note` as an artifact to `project`; return its artifact URI."
    client = mlflow_client(settings)
    run = client.create_run(ensure_experiment(client, project, settings), run_name=note.stem)
    client.log_artifact(run.info.run_id, str(note))
    client.set_terminated(run.info.run_id)
    return client.get_run(run.info.run_id).info.artifact_uri


def two_workspaces(tmp_path: Path) -> list:
    "Two workspaces with their own settings.ini, as two people's checkouts would be."
    spaces = []
    for name in ("alice", "bob"):
        ws = tmp_path / name
        ws.mkdir()
        (ws / "settings.ini").write_text((REPO / "settings.ini").read_text())
        spaces.append(ws)
    return spaces


def test_a_shared_sqlite_store_keeps_every_workspaces_artifacts_beside_it(tmp_path, monkeypatch, workspace):
    store = tmp_path / "team" / "shared.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{store}")
    uris = []
    for ws in two_workspaces(tmp_path):
        monkeypatch.chdir(ws)  # MLflow's own default would be ./mlruns of the first one here
        note = ws / f"{ws.name}.txt"
        note.write_text(f"written from {ws.name}\n")
        uris.append(log_run_with_artifact(load_settings(ws, environ={}), "fraud-detection", note))
    root = (store.parent / "artifacts" / "fraud-detection").resolve()
    for uri, name in zip(uris, ("alice", "bob")):
        assert uri.startswith(root.as_uri() + "/"), uri
        assert (Path(uri.removeprefix("file://")) / f"{name}.txt").read_text() == f"written from {name}\n"
    assert not any((tmp_path / name / "mlruns").exists() for name in ("alice", "bob"))


def test_the_embedded_store_keeps_artifacts_in_its_own_workspace(workspace, tmp_path):
    note = tmp_path / "note.txt"
    note.write_text("mine\n")
    uri = log_run_with_artifact(load_settings(workspace, environ={}), "demo", note)
    assert uri.startswith((embedded_artifact_root(workspace) / "demo").as_uri() + "/"), uri


def test_mlwb_ui_opens_the_projects_runs_list_in_the_model_training_view(browser, workspace, tmp_path):
    log, settings = tmp_path / "ui.log", load_settings(workspace, environ={})
    client = mlflow_client(settings)
    experiment_id = ensure_experiment(client, settings.default_project, settings)
    run = client.create_run(experiment_id, run_name="a-training-run")
    client.log_metric(run.info.run_id, "auc", 0.97)
    client.set_terminated(run.info.run_id)
    port, ui = serve(lambda port: ["ui", "--port", str(port)], workspace, {}, log, "/health")
    settings = load_settings(workspace, environ={"MLWB_UI_PORT": str(port)})  # the port it serves on
    try:
        printed = re.search(r"MLflow UI on (\S+)", log.read_text()).group(1)
        assert printed == project_ui_url(settings, port), f"`mlwb ui` printed {printed}"
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        page.goto(printed, timeout=120_000)
        page.get_by_text("a-training-run").first.wait_for(timeout=120_000)  # the runs list
        page.get_by_role("heading", name="Runs").first.wait_for(timeout=120_000)  # may render later
        page.screenshot(path=str(ARTIFACTS / "mlflow-ui-model-training-runs.png"))
        assert page.get_by_role("heading", name="Runs").count() == 1
        assert page.get_by_text("Judges").count() == 0  # a GenAI-only entry of the side bar
        page.goto(run_url(settings, experiment_id, run.info.run_id), timeout=120_000)
        page.get_by_text("Model metrics").first.wait_for(timeout=120_000)  # the run page's tabs
        assert page.get_by_text("Judges").count() == 0
        page.close()
    finally:
        stop_process(ui)
