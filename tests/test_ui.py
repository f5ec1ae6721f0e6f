"""`mlwb ui` serves the real MLflow UI on the workspace's embedded store, on loopback only."""
import json
import os
import signal
import socket
import subprocess
import time
import urllib.request

from conftest import MLWB
from mlwb.config import load_settings
from mlwb.tracking import ensure_experiment, mlflow_client


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(url, seconds=240):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                return response.status, response.read()
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"nothing answered at {url} within {seconds} s")


def test_ui_serves_the_workspace_runs_on_loopback(workspace):
    settings = load_settings(workspace, environ={})
    client = mlflow_client(settings)
    experiment_id = ensure_experiment(client, "demo-project", settings)
    run = client.create_run(experiment_id, run_name="a-run")
    client.log_metric(run.info.run_id, "score", 0.9)
    port = free_port()
    server = subprocess.Popen([str(MLWB), "ui", "--port", str(port)], cwd=workspace, start_new_session=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env={**os.environ, "MLWB_WORKSPACE": str(workspace)})
    try:
        status, page = wait_for(f"http://127.0.0.1:{port}/")
        assert status == 200 and b"<html" in page.lower()
        request = urllib.request.Request(f"http://127.0.0.1:{port}/api/2.0/mlflow/runs/search", method="POST",
                                         data=json.dumps({"experiment_ids": [experiment_id]}).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=10) as response:
            runs = json.loads(response.read())["runs"]
        assert [r["info"]["run_name"] for r in runs] == ["a-run"]
        listening = subprocess.run(["ss", "-ltnH", f"sport = :{port}"], capture_output=True, text=True).stdout
        local_addresses = [line.split()[3] for line in listening.splitlines() if line.strip()]
        assert local_addresses and all(a.startswith("127.0.0.1:") for a in local_addresses), listening
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
