"""`mlwb sweep` end to end: a grid on a real Dask LocalCluster (scheduler and worker processes on loopback), the shared
stage run once, one MLflow sweep run with a child per configuration, a ranked table, and a failed configuration that does
not stop the others."""
import json
import os
import textwrap

import pytest

from conftest import make_notebook, run_mlwb
from mlwb.config import load_settings
from mlwb.sweep import local_dask_cluster, parse_grid, run_sweep
from mlwb.tracking import mlflow_client

PIPELINE = """
    stages:
      - {name: make, notebook: make.ipynb, parameters: {n: 4}, outputs: [out/numbers.txt]}
      - {name: score, notebook: score.ipynb, depends_on: [make], outputs: [out/score.txt]}
"""
MAKE = "import pathlib\npathlib.Path('out').mkdir(exist_ok=True)\npathlib.Path('out/numbers.txt').write_text(' '.join(map(str, range(n))))"
SCORE = ("import mlflow, pathlib\nfrom mlwb.tracking import stage_run\nstage_run('grid')\n"
         "assert depth != 3, 'depth 3 is not allowed'\n"
         "score = sum(map(int, pathlib.Path('out/numbers.txt').read_text().split())) * depth + (1 if kind == 'b' else 0)\n"
         "mlflow.log_metric('score', score)\npathlib.Path('out/score.txt').write_text(str(score))")


@pytest.fixture
def grid_project(workspace):
    folder = workspace / "projects" / "grid"
    folder.mkdir()
    (folder / "pipeline.yml").write_text(textwrap.dedent(PIPELINE))
    make_notebook(folder / "make.ipynb", "n = 1", MAKE)
    make_notebook(folder / "score.ipynb", "depth = 1\nkind = 'a'", SCORE)
    return folder


def children_of(client, experiment_id, run_id):
    return client.search_runs([experiment_id], filter_string=f"tags.mlflow.parentRunId = '{run_id}'")


def test_sweep_on_a_dask_local_cluster_runs_shared_stage_once_and_ranks(workspace, grid_project):
    settings = load_settings(workspace)
    with local_dask_cluster(2) as cluster:
        assert cluster.scheduler_address.startswith("tcp://127.0.0.1:")
        result = run_sweep("grid", parse_grid(["depth=2,3", "kind=a,b"]), settings, metric="score", scheduler=cluster.scheduler_address)
    assert result["engine"] == "dask"
    ranked = result["ranked"]
    done = [o for o in ranked if o["status"] == "done"]
    assert len(ranked) == 4 and len(done) == 2
    assert [(o["values"]["depth"], o["values"]["kind"], o["metric"]) for o in done] == [(2, "b", 13), (2, "a", 12)]
    assert all(o["status"] == "failed" and "depth 3 is not allowed" in o["error"] for o in ranked[2:])

    client = mlflow_client(load_settings(workspace, environ={}))
    children = children_of(client, result["experiment_id"], result["run_id"])
    roles = sorted(c.data.tags["mlwb.sweep_role"] for c in children)
    assert roles == ["configuration"] * 4 + ["shared stages"]
    shared = next(c for c in children if c.data.tags["mlwb.sweep_role"] == "shared stages")
    assert [c.data.tags["mlwb.stage"] for c in children_of(client, result["experiment_id"], shared.info.run_id)] == ["make"]
    for o in ranked:  # every configuration reused `make` and ran `score` itself
        stages = {c.data.tags["mlwb.stage"]: c for c in children_of(client, result["experiment_id"], o["run_id"])}
        assert stages["make"].data.tags["mlwb.cached"] == "true" and "mlwb.cached" not in stages["score"].data.tags
    best = client.get_run(ranked[0]["run_id"])
    assert best.data.metrics["score"] == 13 and best.data.params["sweep.depth"] == "2"
    sweep = client.get_run(result["run_id"])
    assert sweep.data.tags["mlwb.kind"] == "sweep" and sweep.data.tags["mlwb.best_run"] == ranked[0]["run_id"]
    assert sweep.data.metrics["best_score"] == 13 and sweep.info.status == "FINISHED"
    assert not (grid_project / "out/score.txt").exists()  # configurations ran in their sandboxes, not in the project


def test_sweep_command_with_local_processes_prints_a_ranked_table(workspace, grid_project):
    result = run_mlwb("sweep", "grid", "-g", "depth=2,3", "--metric", "score", "--lower-is-better", "--workers", "2")
    assert result.returncode == 1, result.stdout + result.stderr  # one configuration failed
    lines = result.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("rank"))
    assert lines[header].split() == ["rank", "depth", "score", "status", "seconds"]
    assert lines[header + 1].split()[:4] == ["1", "2", "12", "done"] and lines[header + 1].endswith("<- best")
    assert lines[header + 2].split()[:3] == ["2", "3", "failed"]
    assert "configuration 1 failed" in result.stdout and "depth 3 is not allowed" in result.stdout
    assert "local engine" in result.stdout


def test_sweep_refuses_a_parameter_no_stage_declares(workspace, grid_project):
    result = run_mlwb("sweep", "grid", "-g", "width=1,2")
    assert result.returncode == 2 and "declares a parameter 'width'" in result.stderr
    assert not (workspace / "runs").exists()


def test_the_local_dask_cluster_opens_no_dashboard_and_listens_on_loopback_only():
    "Left to its default, Dask serves a dashboard on port 8787; the sweep's own cluster must not."
    import psutil
    me = psutil.Process()
    with local_dask_cluster(1) as cluster:
        listening = [c.laddr for c in me.net_connections() if c.status == psutil.CONN_LISTEN]
        http = [s.getsockname()[:2] for s in cluster.scheduler.http_server._sockets.values()]
    assert listening and all(a.ip == "127.0.0.1" for a in listening), listening
    assert 8787 not in {a.port for a in listening}, listening
    assert http and all(host == "127.0.0.1" and port != 8787 for host, port in http), http  # health and metrics only


HELD = ("import mlflow, os\nfrom mlwb.release import promotion_held\nfrom mlwb.tracking import stage_run\n"
        "stage_run('held')\nmlflow.set_tag('held', str(promotion_held(True)))\nmlflow.log_metric('depth', depth)")


def test_every_configuration_of_a_sweep_runs_with_promotion_held(workspace):
    "What keeps a sweep's register stages from moving `champion`: each stage kernel sees MLWB_SWEEP."
    folder = workspace / "projects" / "held"
    folder.mkdir()
    (folder / "pipeline.yml").write_text("stages:\n  - {name: register, notebook: register.ipynb}\n")
    make_notebook(folder / "register.ipynb", "depth = 1", HELD)
    result = run_mlwb("sweep", "held", "-g", "depth=1,2", "--metric", "depth", "--workers", "1")
    assert result.returncode == 0, result.stdout + result.stderr
    client = mlflow_client(load_settings(workspace, environ={}))
    experiment = client.get_experiment_by_name("held")
    stages = [r for r in client.search_runs([experiment.experiment_id]) if "held" in r.data.tags]
    assert len(stages) == 2 and all("sweep" in r.data.tags["held"] for r in stages), stages
    assert "MLWB_SWEEP" not in os.environ  # the sweep put the variable back
