"""The embedded SQLite store under concurrent writers: several processes and several `mlwb run`s at once lose no run or metric and show no "database is locked"."""
import subprocess
import sys
import textwrap

from conftest import MLWB, make_notebook
from mlwb.config import load_settings
from mlwb.tracking import embedded_tracking_uri, mlflow_client, sqlite_journal_mode

PROCESSES, RUNS, METRICS = 4, 3, 5

WRITER = textwrap.dedent("""
    import sys
    import mlflow.store.tracking.sqlalchemy_store
    from mlwb.config import load_settings
    from mlwb.tracking import ensure_experiment, mlflow_client
    workspace, writer, runs, metrics = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    settings = load_settings(workspace, environ={})
    print("ready", flush=True)
    sys.stdin.readline()  # start together, one every 0.3 s: later ones open the store while it is being created
    import time; time.sleep(0.3 * int(writer))
    client = mlflow_client(settings)
    experiment_id = ensure_experiment(client, "concurrent", settings)
    for r in range(runs):
        run = client.create_run(experiment_id, run_name=f"writer{writer}-run{r}", tags={"writer": writer})
        for step in range(metrics): client.log_metric(run.info.run_id, "loss", 1.0 / (step + 1), step=step)
        client.set_terminated(run.info.run_id)
""")

FAILURES = ("database is locked", "Traceback", "already exists", "OperationalError")


def start_writer(workspace, writer):
    return subprocess.Popen([sys.executable, "-c", WRITER, str(workspace), str(writer), str(RUNS), str(METRICS)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=workspace)


def test_processes_writing_to_a_new_embedded_store_lose_nothing(tmp_path):
    writers = [start_writer(tmp_path, k) for k in range(PROCESSES)]
    for w in writers: assert w.stdout.readline().strip() == "ready"
    outputs = [w.communicate("go\n", timeout=240)[0] for w in writers]
    for w, output in zip(writers, outputs):
        assert w.returncode == 0 and not any(f in output for f in FAILURES), output[-3000:]
    client = mlflow_client(load_settings(tmp_path, environ={}))
    experiment = client.get_experiment_by_name("concurrent")
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    assert sorted(r.info.run_name for r in runs) == sorted(f"writer{k}-run{r}" for k in range(PROCESSES) for r in range(RUNS))
    assert all(r.info.status == "FINISHED" for r in runs)
    for run in runs:
        history = client.get_metric_history(run.info.run_id, "loss")
        assert sorted(m.step for m in history) == list(range(METRICS)), run.info.run_name
    db = embedded_tracking_uri(tmp_path)[len("sqlite:///"):]
    assert sqlite_journal_mode(db) == "wal"


STAGE = textwrap.dedent("""
    import mlflow, pathlib
    from mlwb.tracking import stage_run
    run = stage_run({project!r})
    for step in range(5): mlflow.log_metric("score", step / 10, step=step)
    pathlib.Path("out").mkdir(exist_ok=True)
    pathlib.Path("out/{stage}.txt").write_text("done")
""")


def write_small_project(workspace, name):
    "A two-stage project whose stages log a metric history."
    folder = workspace / "projects" / name
    folder.mkdir(parents=True)
    (folder / "pipeline.yml").write_text(textwrap.dedent("""
        stages:
          - name: first
            notebook: first.ipynb
            outputs: [out/first.txt]
          - name: second
            notebook: second.ipynb
            depends_on: [first]
            outputs: [out/second.txt]
    """))
    for stage in ("first", "second"): make_notebook(folder / f"{stage}.ipynb", "", STAGE.format(project=name, stage=stage))
    return folder


def test_concurrent_pipeline_runs_in_one_workspace_lose_nothing(workspace):
    projects = [f"project-{k}" for k in range(3)]
    for name in projects: write_small_project(workspace, name)
    runs = [subprocess.Popen([str(MLWB), "run", name], cwd=workspace, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for name in projects]
    outputs = [r.communicate(timeout=300)[0] for r in runs]
    for r, output in zip(runs, outputs):
        assert r.returncode == 0 and "database is locked" not in output, output[-3000:]
    client = mlflow_client(load_settings(workspace, environ={}))
    for name in projects:
        experiment = client.get_experiment_by_name(name)
        found = client.search_runs([experiment.experiment_id])
        parents = [r for r in found if "mlflow.parentRunId" not in r.data.tags]
        children = {r.data.tags["mlwb.stage"]: r for r in found if r.data.tags.get("mlflow.parentRunId")}
        assert len(parents) == 1 and parents[0].info.status == "FINISHED", name
        assert set(children) == {"first", "second"} and all(c.info.status == "FINISHED" for c in children.values())
        for child in children.values():
            assert [m.step for m in client.get_metric_history(child.info.run_id, "score")] == list(range(5))
            assert "duration_s" in child.data.metrics
