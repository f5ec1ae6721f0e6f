"""`mlwb ui` serves the real MLflow UI on the workspace's embedded store, on loopback only."""
import json
import subprocess
import urllib.request

from mlwb.config import load_settings
from mlwb.core import stop_process
from mlwb.tracking import ensure_experiment, mlflow_client
from test_lab import serve


def test_ui_serves_the_workspace_runs_on_loopback(workspace):
    settings = load_settings(workspace, environ={})
    client = mlflow_client(settings)
    experiment_id = ensure_experiment(client, "demo-project", settings)
    run = client.create_run(experiment_id, run_name="a-run")
    client.log_metric(run.info.run_id, "score", 0.9)
    log = workspace / "ui.log"
    port, server = serve(lambda port: ["ui", "--port", str(port)], workspace, {"MLWB_WORKSPACE": str(workspace)}, log, "/")
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10) as response:
            status, page = response.status, response.read()
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
        stop_process(server)
