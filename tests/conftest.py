"""Shared fixtures: a temporary workspace with its own settings, runs folder and embedded MLflow store."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
MLWB = Path(sys.executable).parent / "mlwb"


MLFLOW_STATE = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "MLFLOW_RUN_ID")


@pytest.fixture(autouse=True)
def isolated_mlflow_state():
    "Undo whatever a test did to MLflow's process-wide URIs (mlflow.set_tracking_uri also sets the environment)."
    saved = {name: os.environ.get(name) for name in MLFLOW_STATE}
    yield
    if "mlflow" in sys.modules:
        import mlflow
        while mlflow.active_run(): mlflow.end_run()
        mlflow.set_tracking_uri(saved["MLFLOW_TRACKING_URI"])
        mlflow.set_registry_uri(saved["MLFLOW_REGISTRY_URI"])
    for name, value in saved.items():
        if value is None: os.environ.pop(name, None)
        else: os.environ[name] = value


@pytest.fixture
def workspace(tmp_path, monkeypatch):
    "A fresh workspace: the repo's settings.ini and an empty projects/ folder; MLWB_WORKSPACE points at it."
    ws = tmp_path / "ws"
    (ws / "projects").mkdir(parents=True)
    shutil.copy(REPO / "settings.ini", ws / "settings.ini")
    monkeypatch.setenv("MLWB_WORKSPACE", str(ws))
    for name in [n for n in os.environ if n.startswith("MLWB_") and n != "MLWB_WORKSPACE"] + ["MLFLOW_TRACKING_URI", "MLFLOW_RUN_ID"]:
        monkeypatch.delenv(name, raising=False)
    return ws


def run_mlwb(*args, cwd=None, env=None, timeout=600):
    "Run the `mlwb` command line; return the completed process (text output)."
    environment = {**os.environ, **(env or {})}
    return subprocess.run([str(MLWB), *map(str, args)], cwd=cwd, env=environment, capture_output=True, text=True, timeout=timeout)


def make_notebook(path, parameters="", *cells):
    "Write a notebook: a cell tagged `parameters` (if given), then one code cell per string in `cells`."
    nb_cells = []
    if parameters:
        cell = nbformat.v4.new_code_cell(parameters)
        cell.metadata["tags"] = ["parameters"]
        nb_cells.append(cell)
    nb_cells += [nbformat.v4.new_code_cell(c) for c in cells]
    nb = nbformat.v4.new_notebook(cells=nb_cells)
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, path)
    return path


def set_stage_parameters(project: Path, changes: dict):
    "Give stages of the project copy in `project` other parameters, `{stage: {name: value}}`, in its pipeline.yml (so `mlwb check` reuses the same runs)."
    path = project / "pipeline.yml"
    spec = yaml.safe_load(path.read_text())
    for stage in spec["stages"]: stage.setdefault("parameters", {}).update(changes.pop(stage["name"], {}))
    assert not changes, f"no such stages in {path}: {sorted(changes)}"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))


# `mlwb check` runs in development mode, which leaves a warm kernel template for the next check; a test's
# workspace is deleted after it, so the tests ask for none rather than leave processes behind for 15 minutes.
NO_WARM_KERNELS = {"WARM_KERNELS_IDLE_S": "0"}


def check_reference_project(ws: Path, project: str):
    "`mlwb check PROJECT` in `ws` after its pipeline ran there: every milestone passes (the completed process)."
    from mlwb.milestones import load_milestones
    env = {"MLWB_WORKSPACE": str(ws), "MLFLOW_TRACKING_URI": "", **NO_WARM_KERNELS}
    checked = run_mlwb("check", project, cwd=ws, env=env)
    n = len(load_milestones(ws / "projects" / project))
    assert checked.returncode == 0 and f"{n} of {n} milestones pass" in checked.stdout, checked.stdout + checked.stderr
    assert "✗" not in checked.stdout and "with the model's own predictions" in checked.stdout, checked.stdout  # the API milestone really served
    return checked
