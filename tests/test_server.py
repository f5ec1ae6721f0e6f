"""`mlwb server`: a real PostgreSQL (installed by .ci/postgres, as CI does), the MLflow tracking
server on it, four pipelines at once; a cluster in a private folder, its password on no command line
and in no log."""
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
from mlwb.server import (data_folder, remove_postgres, start_postgres, wait_until_ready,
                         without_password)

PROJECT, PIPELINES = "team-demo", 4


@pytest.fixture(scope="session")
def installed_postgres():
    "PostgreSQL's programs, installed by .ci/postgres as CI does."
    installed = subprocess.run([str(REPO / ".ci" / "postgres"), "install"], capture_output=True, text=True, timeout=900)
    assert installed.returncode == 0, installed.stdout + installed.stderr


@pytest.fixture(scope="session")
def postgres(installed_postgres):
    "A private PostgreSQL cluster on a free loopback port: `(dsn, folder)`; removed afterwards."
    folder = Path(tempfile.mkdtemp(prefix="mlwb-pg-"))  # in /tmp, which the postgres user can enter
    try:
        yield start_postgres(folder, free_port()), folder
    finally:
        remove_postgres(folder)


@pytest.fixture
def server(postgres, tmp_path):
    "`mlwb server` on the PostgreSQL cluster: `(tracking URI it printed, artifacts folder)`; stopped afterwards."
    dsn, folder = postgres
    artifacts, port = tmp_path / "artifacts", free_port()
    password = {"PGPASSWORD": (folder / "password").read_text().strip()}  # libpq reads it
    process = subprocess.Popen([str(MLWB), "server", "--backend-store-uri", without_password(dsn),
                                "--artifacts-destination", str(artifacts), "--port", str(port),
                                "--workers", "2"], cwd=tmp_path, start_new_session=True,
                               env={**os.environ, **password},
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        uri = printed_tracking_uri(process)
        yield wait_until_ready(uri, timeout=60), artifacts
    finally:
        process.send_signal(signal.SIGTERM)  # mlwb server stops the MLflow server it started
        try: process.wait(timeout=60)
        except subprocess.TimeoutExpired: os.killpg(process.pid, signal.SIGKILL); process.wait()


def printed_tracking_uri(process, seconds=180, seen=None) -> str:
    "The URI in the `export MLFLOW_TRACKING_URI=…` line `mlwb server` prints; lines go to `seen`."
    deadline, seen = time.monotonic() + seconds, [] if seen is None else seen
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


def command_lines() -> list:
    "The arguments of every process on this machine, as /proc shows them to anyone."
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try: found.append(cmdline.read_bytes().replace(b"\0", b" "))
        except OSError: pass  # the process has ended
    return found


def files_under(*folders) -> list:
    "Every file under `folders` (links not followed)."
    found = [p for folder in folders for p in Path(folder).rglob("*")]
    return [p for p in found if p.is_file() and not p.is_symlink()]


def test_team_server_in_a_private_folder_keeps_its_password_secret(installed_postgres):
    private = Path(tempfile.mkdtemp(prefix="mlwb-private-"))  # mode 0700, like /root
    folder, seen = private / "proj" / "pg", []
    process = subprocess.Popen([str(MLWB), "server", "--postgres", str(folder),
                                "--postgres-port", str(free_port()), "--port", str(free_port()),
                                "--workers", "1"], cwd=private, start_new_session=True,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        uri = wait_until_ready(printed_tracking_uri(process, seen=seen), timeout=60)
        data, password = data_folder(folder), (folder / "password").read_text().strip()
        assert f"its data in {data}" in "".join(seen)
        if os.geteuid() == 0: assert not data.is_relative_to(private)  # postgres can't enter it
        assert oct((folder / "password").stat().st_mode & 0o777) == "0o600"

        everywhere = command_lines()
        assert any(str(data).encode() in c for c in everywhere)  # PostgreSQL's processes are there
        assert any(b"mlflow server" in c for c in everywhere)  # and MLflow's
        assert not [c for c in everywhere if password.encode() in c]

        client = MlflowClient(tracking_uri=uri)
        run = client.create_run(client.create_experiment("private"), run_name="first")
        client.log_metric(run.info.run_id, "auc", 0.91, step=0)
        client.log_text(run.info.run_id, "from a private folder", "notes/hello.txt")
        client.set_terminated(run.info.run_id)
        again = MlflowClient(tracking_uri=uri)  # read back by another client, through the server
        history = again.get_metric_history(run.info.run_id, "auc")
        assert [(m.step, m.value) for m in history] == [(0, 0.91)]
        note = Path(again.download_artifacts(run.info.run_id, "notes/hello.txt", str(private)))
        assert note.read_text() == "from a private folder"
        assert again.get_run(run.info.run_id).info.status == "FINISHED"

        process.send_signal(signal.SIGTERM)
        output = "".join(seen) + process.communicate(timeout=120)[0]
        assert process.returncode == 0, output[-3000:]
        assert password not in output
        written = [p for p in files_under(folder, data) if p != folder / "password"]
        assert folder / "mlflow-server.log" in written and data / "postgres.log" in written
        assert not [p for p in written if password.encode() in p.read_bytes()]
    finally:
        if process.poll() is None: os.killpg(process.pid, signal.SIGKILL); process.wait()
        remove_postgres(folder); shutil.rmtree(private, ignore_errors=True)
    assert not data.exists()
