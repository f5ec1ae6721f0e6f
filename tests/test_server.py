"""`mlwb server`: a real PostgreSQL (installed by .ci/postgres, as CI does), the MLflow tracking server on it, four pipelines at once."""
import os
import re
import shutil
import signal
import subprocess
import tempfile
import textwrap
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

from conftest import MLWB, REPO, make_notebook, run_mlwb
from mlwb.core import free_port
from mlwb.server import start_postgres, stop_postgres, wait_until_ready

PROJECT, PIPELINES = "team-demo", 4


@pytest.fixture(scope="session")
def postgres():
    "A private PostgreSQL cluster on a free loopback port: `(dsn, folder)`; stopped and removed afterwards."
    installed = subprocess.run([str(REPO / ".ci" / "postgres"), "install"], capture_output=True, text=True, timeout=900)
    assert installed.returncode == 0, installed.stdout + installed.stderr
    folder = Path(tempfile.mkdtemp(prefix="mlwb-pg-"))  # under /tmp: the postgres user must reach it when we are root
    try:
        yield start_postgres(folder, free_port()), folder
    finally:
        stop_postgres(folder)
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def server(postgres, tmp_path):
    "`mlwb server` on the PostgreSQL cluster: `(tracking URI it printed, artifacts folder)`; stopped afterwards."
    dsn, _ = postgres
    artifacts, port = tmp_path / "artifacts", free_port()
    process = subprocess.Popen([str(MLWB), "server", "--backend-store-uri", dsn, "--artifacts-destination", str(artifacts),
                                "--port", str(port), "--workers", "2"], cwd=tmp_path, start_new_session=True,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        uri = printed_tracking_uri(process)
        yield wait_until_ready(uri, timeout=60), artifacts
    finally:
        process.send_signal(signal.SIGTERM)  # mlwb server stops the MLflow server it started
        try: process.wait(timeout=60)
        except subprocess.TimeoutExpired: os.killpg(process.pid, signal.SIGKILL); process.wait()


def printed_tracking_uri(process, seconds=180) -> str:
    "The URI in the `export MLFLOW_TRACKING_URI=…` line that `mlwb server` prints."
    deadline, seen = time.monotonic() + seconds, []
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line and process.poll() is not None: break
        seen.append(line)
        if m := re.match(r"export MLFLOW_TRACKING_URI=(\S+)", line): return m[1]
    raise AssertionError("mlwb server printed no MLFLOW_TRACKING_URI:\n" + "".join(seen))


STAGE = textwrap.dedent("""
    import mlflow
    from mlwb.tracking import stage_run
    run = stage_run({project!r})
    for step in range(3): mlflow.log_metric("score", value + step / 10, step=step)
    mlflow.log_text(f"{stage} of pipeline {{value}}", "notes/{stage}.txt")
    import pathlib; pathlib.Path("out").mkdir(exist_ok=True); pathlib.Path("out/{stage}.txt").write_text("done")
""")


def team_workspace(root: Path, k: int) -> Path:
    "A workspace of its own (a project folder admits one run at a time) holding the two-stage project."
    folder = root / f"ws{k}" / "projects" / PROJECT
    folder.mkdir(parents=True)
    shutil.copy(REPO / "settings.ini", root / f"ws{k}" / "settings.ini")
    (folder / "pipeline.yml").write_text(textwrap.dedent("""
        stages:
          - {name: first, notebook: first.ipynb, parameters: {value: 0}, outputs: [out/first.txt]}
          - {name: second, notebook: second.ipynb, parameters: {value: 0}, depends_on: [first], outputs: [out/second.txt]}
    """))
    for stage in ("first", "second"): make_notebook(folder / f"{stage}.ipynb", "value = 0", STAGE.format(project=PROJECT, stage=stage))
    return root / f"ws{k}"


def test_mlwb_server_refuses_bad_options():
    neither = run_mlwb("server", timeout=120)
    assert neither.returncode == 2 and "--postgres" in neither.stderr
    exposed = run_mlwb("server", "--postgres", "/tmp/unused-mlwb-pg", "--host", "0.0.0.0", timeout=120)
    assert exposed.returncode == 2 and "--allowed-hosts" in exposed.stderr
    not_a_database = run_mlwb("server", "--backend-store-uri", "/tmp/mlruns", timeout=120)
    assert not_a_database.returncode == 2 and "--backend-store-uri" in not_a_database.stderr


def test_four_pipelines_at_once_reach_the_team_server(server, tmp_path):
    uri, artifacts = server
    environment = {k: v for k, v in os.environ.items() if not k.startswith(("MLWB_", "MLFLOW_"))}
    runs = []
    for k in range(PIPELINES):
        ws = team_workspace(tmp_path, k)
        runs.append(subprocess.Popen([str(MLWB), "run", PROJECT, "-p", f"value={k}"], cwd=ws, text=True,
                                     env={**environment, "MLWB_WORKSPACE": str(ws), "MLFLOW_TRACKING_URI": uri},
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
    outputs = [r.communicate(timeout=400)[0] for r in runs]
    for r, output in zip(runs, outputs): assert r.returncode == 0, output[-3000:]
    assert not any((tmp_path / f"ws{k}" / "mlruns").exists() for k in range(PIPELINES))  # nothing went to an embedded store

    client = MlflowClient(tracking_uri=uri)
    found = client.search_runs([client.get_experiment_by_name(PROJECT).experiment_id], max_results=100)
    parents = [r for r in found if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == PIPELINES and all(p.info.status == "FINISHED" for p in parents)
    values = set()
    for parent in parents:
        children = {r.data.tags["mlwb.stage"]: r for r in found if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
        assert set(children) == {"first", "second"} and all(c.info.status == "FINISHED" for c in children.values())
        assert "reproduce" in {a.path for a in client.list_artifacts(parent.info.run_id)}
        value = int(children["first"].data.params["value"]); values.add(value)
        for stage, child in children.items():
            assert [(m.step, m.value) for m in client.get_metric_history(child.info.run_id, "score")] == [(s, value + s / 10) for s in range(3)]
            assert child.info.artifact_uri.startswith("mlflow-artifacts:/")  # proxied through the server
            note = Path(client.download_artifacts(child.info.run_id, f"notes/{stage}.txt", str(tmp_path)))
            assert note.read_text() == f"{stage} of pipeline {value}"
            assert [a.path for a in client.list_artifacts(child.info.run_id, "notebook")]  # the executed notebook
    assert values == set(range(PIPELINES))
    assert len(list(artifacts.rglob("notes/*.txt"))) == 2 * PIPELINES  # stored by the server, in its destination
