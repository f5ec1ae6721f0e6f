"""Shared fixtures: a temporary workspace with its own settings, runs folder and embedded MLflow store, and
each guided project run twice in a workspace of its own."""
import copy
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import nbformat
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
MLWB = Path(sys.executable).parent / "mlwb"


COPY_SKIP = shutil.ignore_patterns("data", "artifacts", ".ipynb_checkpoints", "__pycache__")


def new_workspace(root, project: str | None = None) -> Path:
    "A workspace `root/ws`: the repo's settings.ini and a projects/ folder, with a copy of guided `project` if named."
    ws = Path(root) / "ws"
    (ws / "projects").mkdir(parents=True)
    shutil.copy(REPO / "settings.ini", ws / "settings.ini")
    if project: shutil.copytree(REPO / "projects" / project, ws / "projects" / project, ignore=COPY_SKIP)
    return ws


def wait_for(condition, timeout: float = 30, what: str = "the condition"):
    "Poll `condition()` until it returns something truthy and return that; fail the test after `timeout` s."
    import time
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        if time.monotonic() > deadline: pytest.fail(f"{what} did not happen within {timeout:.0f} s")
        time.sleep(0.05)  # polling a condition
    return value


class ServerProcess:
    """A server command in a subprocess on a free loopback port, its output in `log`. A free port is free only
    when asked: if another process binds it before the server does, the server exits with "address already in
    use" and `running()` starts it again on another port (see `mlwb.core.serve_on_free_port`)."""
    def __init__(self, command, log: Path, env: dict | None = None, tries: int = 3):
        "`command(port)` is the server's command line, told to listen on `port`."
        self.command, self.log_path, self.env, self.tries_left = command, Path(log), env, tries
        self.start()

    def start(self):
        from mlwb.core import free_port
        self.port, self.tries_left = free_port(), self.tries_left - 1
        self.url = f"http://127.0.0.1:{self.port}"
        with open(self.log_path, "w") as out:
            self.process = subprocess.Popen(self.command(self.port), env=self.env, stdout=out, stderr=subprocess.STDOUT,
                                            text=True)

    def output(self) -> str: return self.log_path.read_text(errors="replace")

    def running(self) -> bool:
        "True while the server runs; False once it was restarted on another port; an error if it exited otherwise."
        if self.process.poll() is None: return True
        if "already in use" in self.output().lower() and self.tries_left > 0: self.start(); return False
        raise RuntimeError(f"server exited with status {self.process.returncode}: {self.output()}")

    def stop(self, grace: float = 15):
        from mlwb.core import stop_process
        stop_process(self.process, grace)


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
    ws = new_workspace(tmp_path)
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
# workspace is deleted after it, so the tests ask for none rather than leave processes behind for minutes.
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


# The guided projects: their stages in order, and what makes a test run of them smaller than the default --
# parameters set in the workspace copy's pipeline.yml (so `mlwb check` reuses the same runs), or given on
# the command line of `mlwb run`.
PROJECTS = {
    "fraud-detection": {"stages": ["ingest", "clean", "features", "train", "evaluate", "register", "monitor"],
                        "args": ["-p", "n_cards=1000"]},
    "house-prices": {"stages": ["ingest", "clean", "split", "train", "evaluate", "register"],
                     "smaller": {"ingest": {"n_houses": 1500}}},
    "recommender": {"stages": ["ingest", "clean", "split", "train", "evaluate", "register"]},
    "support-intent": {"stages": ["ingest", "clean", "split", "baseline", "train", "evaluate", "register"],
                       "smaller": {"ingest": {"n_messages": 2000}, "train": {"max_epochs": 12}}},
}


@dataclass
class ProjectRun:
    "A guided project's pipeline run twice in a fresh workspace: the workspace and both completed processes."
    name: str
    stages: list
    ws: Path
    first: subprocess.CompletedProcess
    second: subprocess.CompletedProcess

    @property
    def folder(self) -> Path: return self.ws / "projects" / self.name


@pytest.fixture(scope="session", params=sorted(PROJECTS))
def project_run(request, tmp_path_factory) -> ProjectRun:
    """Each guided project run twice in a workspace of its own, once per test session: the tests of every
    project (tests/test_projects.py) and those of one (tests/test_<project>.py) share the runs."""
    name, spec = request.param, PROJECTS[request.param]
    ws = new_workspace(tmp_path_factory.mktemp(name), name)
    if spec.get("smaller"): set_stage_parameters(ws / "projects" / name, copy.deepcopy(spec["smaller"]))
    env = {"MLWB_WORKSPACE": str(ws), "MLFLOW_TRACKING_URI": ""}
    first = run_mlwb("run", name, *spec.get("args", []), cwd=ws, env=env)
    second = run_mlwb("run", name, *spec.get("args", []), cwd=ws, env=env)
    return ProjectRun(name, spec["stages"], ws, first, second)


def stage_runs(ws: Path, project: str) -> dict:
    "The child runs of the first pipeline run of `project` in `ws`, by stage name."
    from mlwb.config import load_settings
    from mlwb.tracking import mlflow_client
    client = mlflow_client(load_settings(ws, environ={}))
    experiment = client.get_experiment_by_name(project)
    runs = client.search_runs([experiment.experiment_id], order_by=["attributes.start_time ASC"])
    parent = next(r for r in runs if "mlflow.parentRunId" not in r.data.tags)
    return {r.data.tags["mlwb.stage"]: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}


# One browser for the whole session: Playwright's sync API allows one at a time in a process.
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
ARTIFACTS = REPO / "test-artifacts" / "browser"


@pytest.fixture(scope="session")
def browser():
    "Debian's Chromium, made sure of by .ci/chromium, driven by Playwright."
    subprocess.run([str(REPO / ".ci" / "chromium")], check=True, timeout=900)
    from playwright.sync_api import sync_playwright
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


# `make test` runs pytest in processes of pytest-xdist (`-n logical --dist loadscope`). A module's tests
# stay in one process, so its module fixtures are built once; tests on a guided project's session run go
# wherever that project's run is (one process per project, not one per test file); the longest groups
# start first. (xdist's own `xdist_group` marks do nothing under pytest 9, which no longer reads the node
# id xdist rewrites, so the grouping is a scheduler of ours, through xdist's documented hook.)
LONGEST_FIRST = ["project-fraud-detection", "test_learner_path", "test_learn", "test_release",
                 "project-support-intent", "project-recommender", "project-house-prices", "test_tracking",
                 "test_server", "test_lab", "test_sweep", "test_figures_in_lab"]


ON_PROJECT_RUNS = {"test_projects", "test_fraud_detection", "test_house_prices", "test_recommender",
                   "test_support_intent", "test_simulate"}  # the modules whose tests take `project_run`


def xdist_group(nodeid: str) -> str:
    "The group of the test `nodeid`: its guided project's run if it takes one, else its module."
    path, _, rest = nodeid.partition("::")
    module, params = Path(path).stem, rest.partition("[")[2].rstrip("]")
    project = next((p for p in PROJECTS if params == p or params.startswith(p + "-")), None)
    return f"project-{project}" if project and module in ON_PROJECT_RUNS else module


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    "The longest groups first (a stable sort: within a group, the order pytest chose)."
    rank = {name: k for k, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(xdist_group(item.nodeid), len(rank)))


def pytest_xdist_make_scheduler(config, log):
    "xdist's scope scheduling, with our groups as its scopes."
    from xdist.scheduler import LoadScopeScheduling

    class ByGroup(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str: return xdist_group(nodeid)
    return ByGroup(config, log)
