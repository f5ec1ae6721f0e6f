"""JupyterLab and the MLflow UI in a real headless Chromium (Debian's, installed by `.ci/chromium`; Playwright
never downloads a browser): `mlwb lab` opens a stage notebook that runs all its cells and shows their outputs,
and `mlwb ui` shows the project's pipeline runs. Screenshots go to test-artifacts/browser/. And `mlwb lab`,
stopped by any of the signals that stop a program, leaves neither JupyterLab nor a kernel behind."""
import json
import os
import re
import signal
import subprocess
import time
import urllib.request

import psutil
import pytest

from conftest import ARTIFACTS, MLWB, REPO, new_workspace, run_mlwb
from mlwb.config import load_settings
from mlwb.core import serve_on_free_port, stop_process
from mlwb.learn import lab_url
from mlwb.tracking import mlflow_client

def command_of(process) -> str:
    "A process's command line; empty for one that has just ended (a zombie) or gone."
    try: return " ".join(process.cmdline())
    except psutil.Error: return ""


@pytest.fixture(scope="module")
def project_workspace(tmp_path_factory):
    "A workspace with a project made by `mlwb new` and one pipeline run of it."
    ws = new_workspace(tmp_path_factory.mktemp("lab"))
    env = {"MLWB_WORKSPACE": str(ws), "MLFLOW_TRACKING_URI": ""}
    assert run_mlwb("new", "demo", cwd=ws, env=env).returncode == 0
    ran = run_mlwb("run", "demo", cwd=ws, env=env)
    assert ran.returncode == 0, ran.stdout + ran.stderr
    return ws, env


def start(args, ws, env, log):
    "Start `mlwb ARGS` in `ws`, its output going to the file `log`."
    with open(log, "w") as out:
        return subprocess.Popen([str(MLWB), *args], cwd=ws, env={**os.environ, **env}, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)


def serve(args, ws, env, log, ready_path: str):
    "Start `mlwb ARGS(port)` on a free port, output to `log`; `(port, process)` once `ready_path` answers."
    url, process = serve_on_free_port(lambda port: start(args(port), ws, env, log), ready_path, 180, log)
    return int(url.rsplit(":", 1)[1]), process


def test_jupyterlab_runs_a_stage_notebook_and_shows_its_outputs(browser, project_workspace, tmp_path):
    ws, env = project_workspace
    token, log = "mlwb-test-token", tmp_path / "lab.log"
    port, lab = serve(lambda port: ["lab", "--port", str(port), "--token", token, "--no-browser"], ws, env, log,
                      f"/api/status?token={token}")
    try:
        assert lab_url(port, token) in log.read_text()  # the URL it printed carries the token
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(lab_url(port, token, "projects/demo/01_prepare.ipynb"), timeout=120_000)
        page.wait_for_selector(".jp-NotebookPanel .jp-Cell", timeout=120_000)
        kernel_idle = page.get_by_text(re.compile(r"^Python 3.*\| Idle$"))  # the status bar, once the kernel is up
        kernel_idle.wait_for(timeout=120_000)
        page.locator(".lm-MenuBar-itemLabel", has_text="Run").first.click()
        page.locator(".lm-Menu-itemLabel", has_text="Run All Cells").first.click()
        outputs = page.locator(".jp-NotebookPanel .jp-OutputArea-output")
        outputs.filter(has_text="valid").first.wait_for(timeout=120_000)  # the split sizes, from the fifth cell
        kernel_idle.wait_for(timeout=120_000)
        page.screenshot(path=str(ARTIFACTS / "jupyterlab-notebook.png"), full_page=True)
        prompts = page.locator(".jp-NotebookPanel .jp-CodeCell .jp-InputPrompt").all_inner_texts()
        assert all(p.strip() not in ("[ ]:", "[*]:") for p in prompts), prompts  # every code cell ran
        assert outputs.filter(has_text="Traceback").count() == 0
        assert (ws / "projects" / "demo" / "data" / "prepared.parquet").is_file()  # it ran in the project folder
        page.close()
    finally:
        stop_process(lab)


def test_mlflow_ui_shows_the_projects_pipeline_runs(browser, project_workspace, tmp_path):
    ws, env = project_workspace
    client = mlflow_client(load_settings(ws, environ={}))
    experiment = client.get_experiment_by_name("demo")
    parent = next(r for r in client.search_runs([experiment.experiment_id]) if "mlflow.parentRunId" not in r.data.tags
                  and "mlwb.by_hand" not in r.data.tags)
    log = tmp_path / "ui.log"
    port, ui = serve(lambda port: ["ui", "--port", str(port)], ws, env, log, "/health")
    try:
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(f"http://127.0.0.1:{port}/#/experiments/{experiment.experiment_id}/runs", timeout=120_000)  # the "Training runs" tab
        page.get_by_text(parent.info.run_name).first.wait_for(timeout=120_000)
        page.screenshot(path=str(ARTIFACTS / "mlflow-ui-runs.png"), full_page=True)
        page.get_by_text("demo").first.wait_for(timeout=120_000)  # the experiment's name, once rendered
        page.goto(f"http://127.0.0.1:{port}/#/experiments/{experiment.experiment_id}/runs/{parent.info.run_id}", timeout=120_000)
        page.get_by_text(parent.info.run_name).first.wait_for(timeout=120_000)
        page.screenshot(path=str(ARTIFACTS / "mlflow-ui-pipeline-run.png"), full_page=True)
        page.close()
    finally:
        stop_process(ui)


def still_running(processes):
    "Those of the psutil `processes` that have not ended (a zombie has ended)."
    def running(p):
        try: return p.status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess: return False
    return [p for p in processes if running(p)]


def group_members(pgid):
    "The running processes of process group `pgid`."
    def member(p):
        try: return os.getpgid(p.pid) == pgid and p.status() != psutil.STATUS_ZOMBIE
        except (ProcessLookupError, psutil.NoSuchProcess): return False
    return [p for p in psutil.process_iter() if member(p)]


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP], ids=["SIGTERM", "SIGINT", "SIGHUP"])
def test_mlwb_lab_stopped_by_a_signal_leaves_no_process_behind(tmp_path, signum):
    ws = tmp_path / "ws"
    (ws / "projects").mkdir(parents=True)
    (ws / "settings.ini").write_text((REPO / "settings.ini").read_text())
    token, log = "mlwb-test-token", tmp_path / "lab.log"
    port, lab = serve(lambda port: ["lab", "--port", str(port), "--token", token, "--no-browser"], ws, {"MLWB_WORKSPACE": str(ws)}, log,
                      f"/api/status?token={token}")
    family = []
    try:
        request = urllib.request.Request(f"http://127.0.0.1:{port}/api/kernels?token={token}", method="POST",
                                         data=json.dumps({"name": "python3"}).encode(), headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as response: assert response.status == 201
        deadline = time.monotonic() + 120  # the kernel process, in a session of its own, started by JupyterLab
        while not [p for p in psutil.Process(lab.pid).children(recursive=True) if "ipykernel" in command_of(p)]:
            assert time.monotonic() < deadline, f"no kernel process within 120 s:\n{log.read_text()[-3000:]}"
            time.sleep(0.1)
        family = [psutil.Process(lab.pid)] + psutil.Process(lab.pid).children(recursive=True)
        groups = {os.getpgid(p.pid) for p in family}
        assert len(groups) >= 2  # the kernel runs in a session of its own
        os.kill(lab.pid, signum)  # to mlwb alone, as a process manager or a closed terminal sends it
        lab.wait(timeout=120)
        deadline = time.monotonic() + 60
        while still_running(family) or any(group_members(g) for g in groups):
            assert time.monotonic() < deadline, f"left running: {still_running(family)}\n{log.read_text()[-3000:]}"
            time.sleep(0.1)
    finally:
        if lab.poll() is None: stop_process(lab)
        for leftover in still_running(family): leftover.kill()  # not to outlive a failed test
