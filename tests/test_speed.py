"""Pipeline speed without cutting corners: warm kernels that stay isolated, a killed kernel that fails only its stage,
the same results in release and development mode, independent stages that overlap, and a no-change rerun that starts
no kernel, imports neither papermill nor MLflow, and records nothing."""
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from conftest import make_notebook
from mlwb.config import load_settings
from mlwb.runner import stop_warm_kernels, why_stage
from mlwb.runs import run_pipeline, up_to_date_message
from mlwb.tracking import mlflow_client


def write_project(ws, name, pipeline, notebooks):
    "A project folder with `pipeline.yml` and notebooks `{file: (parameters source, *cell sources)}`."
    folder = ws / "projects" / name
    folder.mkdir(parents=True)
    (folder / "pipeline.yml").write_text(textwrap.dedent(pipeline))
    for nb_name, (parameters, *cells) in notebooks.items(): make_notebook(folder / nb_name, parameters, *cells)
    return folder


def writes(path, expression):
    "A cell that writes `str(expression)` to `path` (relative to the project folder)."
    return f"import pathlib\npathlib.Path({path!r}).parent.mkdir(parents=True, exist_ok=True)\npathlib.Path({path!r}).write_text(str({expression}))"


def statuses(run) -> dict:
    return {r.stage: r.status for r in run.results}


def parent_run(ws, run):
    return mlflow_client(load_settings(ws, environ={})).get_run(run.mlflow_run_id)


@pytest.fixture
def dev_workspace(workspace):
    "The workspace, with the warm kernels that development runs leave behind stopped at the end."
    yield workspace
    stop_warm_kernels(load_settings(workspace))


# --- development mode: warm, yet isolated -----------------------------------------------------------

ISOLATION = """
    stages:
      - {name: first, notebook: first.ipynb, outputs: [out/first.txt]}
      - {name: second, notebook: second.ipynb, depends_on: [first], outputs: [out/second.json]}
"""
LOOK = ("import json, sys, os\nseen = {'secret': 'secret' in globals(), 'json_preloaded': 'json' in sys.modules,\n"
        "        'pid': os.getpid(), 'run_id': os.environ['MLFLOW_RUN_ID'], 'cwd': os.getcwd()}\n")


def test_warm_kernels_keep_imports_but_not_variables_and_the_run_is_tagged_development(dev_workspace):
    workspace = dev_workspace
    folder = write_project(workspace, "iso", ISOLATION, {
        "first.ipynb": ("n = 1", "import json, os\nsecret = 42\nPID = os.getpid()", writes("out/first.txt", "PID")),
        "second.ipynb": ("", "import sys\npreloaded = sorted(m for m in ('json', 'csv') if m in sys.modules)",
                         LOOK + "seen['preloaded'] = preloaded\n" + writes("out/second.json", "json.dumps(seen)"))})
    run = run_pipeline("iso", load_settings(workspace), dev=True)
    assert statuses(run) == {"first": "done", "second": "done"}, run.failure and run.failure.error
    seen = json.loads((folder / "out/second.json").read_text())
    assert seen["secret"] is False  # the first stage's variable is not visible
    assert seen["pid"] != int((folder / "out/first.txt").read_text())  # a kernel is never reused
    assert "json" in seen["preloaded"]  # warmed: the pipeline's notebooks import json
    assert seen["run_id"] == run.results[1].run_id and Path(seen["cwd"]) == folder
    parent = parent_run(workspace, run)
    assert parent.data.tags["mlwb.mode"] == "dev" and "not a reproducible" in parent.data.tags["mlwb.note"]
    assert "(dev)" in parent.data.tags["mlflow.runName"]
    client = mlflow_client(load_settings(workspace, environ={}))
    child = client.get_run(run.results[1].run_id)
    assert child.info.status == "FINISHED" and child.data.tags["mlflow.parentRunId"] == run.mlflow_run_id and child.data.metrics["duration_s"] > 0
    assert {a.path for a in client.list_artifacts(child.info.run_id, "notebook")} == {
        "notebook/02_second.ipynb", "notebook/02_second.html"}
    # a release run does not reuse what a development run produced
    [why] = why_stage("iso", "first", load_settings(workspace))
    assert why.startswith("last run was in development mode") and "warm kernels" in why  # says why
    assert "run `mlwb run` first" in why  # how to avoid it
    again = run_pipeline("iso", load_settings(workspace))
    assert statuses(again) == {"first": "done", "second": "done"}
    assert again.results[0].reasons == [why]  # the run's progress line says the same
    later = run_pipeline("iso", load_settings(workspace), dev=True)  # a check after a release run
    assert statuses(later) == {"first": "cached", "second": "cached"}  # reuses its outputs
    assert parent_run(workspace, again).data.tags["mlwb.mode"] == "release"


WARM = "stages:\n  - {name: only, notebook: only.ipynb, outputs: [out/only.json]}\n"


def test_development_runs_leave_warm_kernels_for_the_next_one(dev_workspace):
    workspace = dev_workspace
    folder = write_project(workspace, "warm", WARM, {"only.ipynb": (
        "n = 1", "import sys, os\nstate = {'pid': os.getpid(), 'parent': os.getppid(), 'csv_preloaded': 'csv' in sys.modules}",
        "import csv, json, pathlib\npathlib.Path('out').mkdir(exist_ok=True)\npathlib.Path('out/only.json').write_text(json.dumps(state))")})
    settings = load_settings(workspace)
    assert statuses(run_pipeline("warm", settings, dev=True)) == {"only": "done"}
    first = json.loads((folder / "out/only.json").read_text())
    parked = {json.loads(p.read_text())["pid"] for p in (workspace / "runs/.warm-kernels").glob("template-*.json")}
    assert parked == {first["parent"]}  # the template that forked the first run's kernel waits for the next run
    assert statuses(run_pipeline("warm", settings, force=True, dev=True)) == {"only": "done"}
    state = json.loads((folder / "out/only.json").read_text())
    assert state["parent"] in parked and state["pid"] != first["pid"] and state["csv_preloaded"]  # a new kernel from the same warm template
    assert stop_warm_kernels(settings) == 1 and not list((workspace / "runs/.warm-kernels").glob("template-*.json"))
    assert not alive(state["parent"])



def wait_until(condition, deadline_s: float) -> bool:
    "Whether `condition()` became true before `deadline_s` passed (checked every 0.1 s)."
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        if condition(): return True
        time.sleep(0.1)
    return condition()


def test_a_parked_template_exits_by_itself_after_its_idle_time(dev_workspace, monkeypatch):
    from mlwb.template import IDLE_SECONDS
    assert IDLE_SECONDS <= 120  # not a quarter of an hour of 190-480 MB after each `mlwb check`
    workspace = dev_workspace
    write_project(workspace, "idle", WARM, {"only.ipynb": ("n = 1", writes("out/only.json", "n"))})
    monkeypatch.setenv("WARM_KERNELS_IDLE_S", "0.5")
    assert statuses(run_pipeline("idle", load_settings(workspace), dev=True)) == {"only": "done"}
    records = list((workspace / "runs/.warm-kernels").glob("template-*.json"))
    assert len(records) == 1
    pid = json.loads(records[0].read_text())["pid"]
    assert wait_until(lambda: not alive(pid), deadline_s=60), "the parked template is still running"


def test_stop_kernels_command_stops_a_parked_template(dev_workspace):
    from click.testing import CliRunner
    from mlwb.runs import stop_kernels_command
    workspace = dev_workspace
    write_project(workspace, "stop", WARM, {"only.ipynb": ("n = 1", writes("out/only.json", "n"))})
    assert statuses(run_pipeline("stop", load_settings(workspace), dev=True)) == {"only": "done"}
    pid = json.loads(next((workspace / "runs/.warm-kernels").glob("template-*.json")).read_text())["pid"]
    result = CliRunner().invoke(stop_kernels_command, env={"MLWB_WORKSPACE": str(workspace)})
    assert result.exit_code == 0 and result.output == "stopped 1 warm kernel template\n", result.output
    assert not alive(pid)


# --- a kernel killed from outside -----------------------------------------------------------------------

VICTIM = """
    stages:
      - {name: victim, notebook: victim.ipynb, outputs: [out/victim.txt]}
      - {name: after, notebook: after.ipynb, depends_on: [victim], outputs: [out/after.txt]}
"""


def kill_when_started(pid_file: Path, killed: list):
    "Kill the kernel whose pid appears in `pid_file` (wait up to 60 s for it)."
    for _ in range(600):
        if pid_file.exists() and pid_file.read_text().strip():
            pid = int(pid_file.read_text()); os.kill(pid, signal.SIGKILL); killed.append(pid); return
        time.sleep(0.1)


def alive(pid: int) -> bool:
    try: os.kill(pid, 0)
    except ProcessLookupError: return False
    try: return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except FileNotFoundError: return False


def test_kernel_killed_mid_stage_fails_that_stage_cleanly_and_the_next_run_works(dev_workspace):
    workspace = dev_workspace
    folder = write_project(workspace, "victim", VICTIM, {
        "victim.ipynb": ("hang = True", "import os, pathlib, time\npathlib.Path('pid.txt').write_text(str(os.getpid()))\nif hang: time.sleep(120)",
                         writes("out/victim.txt", "'ok'")),
        "after.ipynb": ("", writes("out/after.txt", "'after'"))})
    killed = []
    killer = threading.Thread(target=kill_when_started, args=(folder / "pid.txt", killed)); killer.start()
    started = time.monotonic()
    run = run_pipeline("victim", load_settings(workspace), dev=True)
    killer.join()
    assert killed and time.monotonic() - started < 100  # not a hang until the cell's sleep ends
    assert statuses(run) == {"victim": "failed", "after": "not run"}
    assert "kernel died" in run.failure.error and "victim" in run.failure.error
    records = json.loads((workspace / "runs/victim/cache.json").read_text()) if (workspace / "runs/victim/cache.json").exists() else {}
    assert "victim" not in records
    child = mlflow_client(load_settings(workspace, environ={})).get_run(run.results[0].run_id)
    assert child.info.status == "FAILED" and parent_run(workspace, run).info.status == "FAILED"

    (folder / "pid.txt").unlink()
    fixed = run_pipeline("victim", load_settings(workspace), parameters=["hang=false"], dev=True)
    assert statuses(fixed) == {"victim": "done", "after": "done"}


def test_pool_replaces_a_kernel_that_died_while_waiting(tmp_path):
    from mlwb.kernels import kernel_pid, stop_kernel
    from mlwb.template import KernelPool
    pool = KernelPool("python3", tmp_path, dict(os.environ), size=1, limit=2)
    try:
        deadline = time.monotonic() + 120
        while pool.ready.empty() and time.monotonic() < deadline: time.sleep(0.1)
        waiting = pool.ready.queue[0]
        pid = kernel_pid(waiting)
        os.kill(pid, signal.SIGKILL)
        while alive(pid): time.sleep(0.05)
        km = pool.take()
        assert km is not waiting and km.is_alive()
        stop_kernel(km)
    finally: pool.close()


# --- release and development mode give the same results --------------------------------------------------

SAME = """
    stages:
      - {name: data, notebook: data.ipynb, parameters: {rows: 200}, outputs: [out/data.csv]}
      - {name: fit, notebook: fit.ipynb, depends_on: [data], outputs: [out/fit.json]}
"""
DATA = ("import numpy as np, pandas as pd, pathlib\nrng = np.random.default_rng(seed)\nX = rng.normal(size=(rows, 3))\n"
        "df = pd.DataFrame(X, columns=list('abc'))\ndf['y'] = (df.a + 0.5 * df.b > 0).astype(int)\n"
        "pathlib.Path('out').mkdir(exist_ok=True)\ndf.to_csv('out/data.csv', index=False)")
FIT = ("import json, pandas as pd\nfrom sklearn.linear_model import LogisticRegression\ndf = pd.read_csv('out/data.csv')\n"
       "model = LogisticRegression().fit(df[list('abc')], df.y)\n"
       "json.dump({'coef': [round(c, 10) for c in model.coef_[0]], 'score': model.score(df[list('abc')], df.y)}, open('out/fit.json', 'w'))")


def test_release_and_development_mode_write_identical_outputs(dev_workspace):
    workspace = dev_workspace
    folder = write_project(workspace, "same", SAME, {"data.ipynb": ("seed = 0\nrows = 10", DATA), "fit.ipynb": ("", FIT)})
    release = run_pipeline("same", load_settings(workspace))
    assert statuses(release) == {"data": "done", "fit": "done"}, release.failure and release.failure.error
    first = {p: (folder / p).read_bytes() for p in ("out/data.csv", "out/fit.json")}
    dev = run_pipeline("same", load_settings(workspace), force=True, dev=True)
    assert statuses(dev) == {"data": "done", "fit": "done"}, dev.failure and dev.failure.error
    assert {p: (folder / p).read_bytes() for p in first} == first


# --- independent stages run at the same time ------------------------------------------------------------

DIAMOND = """
    stages:
      - {name: start, notebook: start.ipynb, outputs: [out/start.txt]}
      - {name: left, notebook: side.ipynb, depends_on: [start], parameters: {side: left, other: right}, outputs: [out/left.json]}
      - {name: right, notebook: side.ipynb, depends_on: [start], parameters: {side: right, other: left}, outputs: [out/right.json]}
      - {name: join, notebook: join.ipynb, depends_on: [left, right], outputs: [out/join.txt]}
"""
SIDE = ("import json, time, pathlib\nbegan = time.time()\npathlib.Path(f'out/{side}.began').write_text('')\n"
        "while not pathlib.Path(f'out/{other}.began').exists() and time.time() - began < patience: time.sleep(0.05)\n"
        "json.dump({'began': began, 'ended': time.time()}, open(f'out/{side}.json', 'w'))")


def diamond_project(workspace):
    "Two side stages after `start`, each waiting up to `patience` seconds for the other to begin, then `join`."
    return write_project(workspace, "diamond", DIAMOND, {
        "start.ipynb": ("", writes("out/start.txt", "1")),
        "side.ipynb": ("side = 'left'\nother = 'right'\npatience = 30", SIDE),
        "join.ipynb": ("", writes("out/join.txt", "2"))})


def test_stages_whose_dependencies_allow_it_overlap_in_time(workspace):
    "Each side waits (up to 30 s) for the other to have begun: run one after the other, their intervals could not overlap."
    folder = diamond_project(workspace)
    run = run_pipeline("diamond", load_settings(workspace))
    assert statuses(run) == dict.fromkeys(["start", "left", "right", "join"], "done"), run.failure and run.failure.error
    left, right = (json.loads((folder / f"out/{s}.json").read_text()) for s in ("left", "right"))
    assert left["began"] < right["ended"] and right["began"] < left["ended"]  # the two intervals overlap
    assert max(left["ended"], right["ended"]) - min(left["began"], right["began"]) < 25  # neither waited out its 30 s
    assert load_settings(workspace).workers == 2


def test_the_workers_setting_limits_how_many_stages_run_at_once(workspace, monkeypatch):
    "With one worker the sides run one after the other: each gives up waiting for the other after 2 s."
    folder = diamond_project(workspace)
    monkeypatch.setenv("MLWB_WORKERS", "1")
    run = run_pipeline("diamond", load_settings(workspace), ["patience=2"])
    assert statuses(run) == dict.fromkeys(["start", "left", "right", "join"], "done"), run.failure and run.failure.error
    left, right = (json.loads((folder / f"out/{s}.json").read_text()) for s in ("left", "right"))
    assert left["ended"] <= right["began"] or right["ended"] <= left["began"]  # never at the same time


# --- a rerun with nothing changed -------------------------------------------------------------------

QUICK = """
    stages:
      - {name: make, notebook: make.ipynb, parameters: {n: 4}, outputs: [out/numbers.txt]}
      - {name: total, notebook: total.ipynb, depends_on: [make], outputs: [out/total.txt]}
"""
PROBE = """
import json, sys
from mlwb.cli import main
try: main(["run", "quick"], standalone_mode=False)
finally:
    heavy = sorted(m for m in ("papermill", "nbformat", "nbclient", "jupyter_client", "mlflow", "pandas", "sklearn") if m in sys.modules)
    print("HEAVY " + json.dumps(heavy))
"""


def test_no_change_rerun_starts_no_kernel_imports_nothing_heavy_and_records_nothing(workspace):
    "Like make: nothing to do, so no MLflow run and no run folder; it says so and points at the last run."
    folder = write_project(workspace, "quick", QUICK, {
        "make.ipynb": ("n = 1", writes("out/numbers.txt", "' '.join(map(str, range(n)))")),
        "total.ipynb": ("", "import pathlib\ntotal = sum(map(int, pathlib.Path('out/numbers.txt').read_text().split()))",
                        writes("out/total.txt", "total"))})
    first = run_pipeline("quick", load_settings(workspace))
    assert statuses(first) == {"make": "done", "total": "done"}
    folders = set((workspace / "runs/quick").iterdir())
    probe = subprocess.run([sys.executable, "-c", PROBE], cwd=workspace, capture_output=True, text=True, timeout=120)
    assert probe.returncode == 0, probe.stderr
    assert json.loads(probe.stdout.split("HEAVY ")[-1]) == [], probe.stdout  # decided without them
    for result in first.results: assert f"cached (outputs of MLflow run {result.run_id})" in probe.stdout
    assert set((workspace / "runs/quick").iterdir()) == folders  # no new run folder

    again = run_pipeline("quick", load_settings(workspace))
    assert again.up_to_date and statuses(again) == {"make": "cached", "total": "cached"}
    assert (again.folder, again.mlflow_run_id, again.experiment_id) == (first.folder, first.mlflow_run_id, first.experiment_id)
    assert up_to_date_message(again) == f"nothing to do: every stage is up to date (last run {first.folder.name})"
    client = mlflow_client(load_settings(workspace, environ={}))
    runs = client.search_runs([first.experiment_id])
    assert len([r for r in runs if "mlflow.parentRunId" not in r.data.tags]) == 1  # the first run only
    assert all(r.info.status == "FINISHED" for r in runs)


def test_no_change_rerun_never_asks_for_a_kernel(workspace, monkeypatch):
    write_project(workspace, "quick", QUICK, {
        "make.ipynb": ("n = 1", writes("out/numbers.txt", "n")), "total.ipynb": ("", writes("out/total.txt", "1"))})
    assert statuses(run_pipeline("quick", load_settings(workspace))) == {"make": "done", "total": "done"}
    import mlwb.kernels, mlwb.template
    def refuse(*args, **kwargs): raise AssertionError("a kernel was started")
    monkeypatch.setattr(mlwb.kernels, "start_kernel", refuse)
    monkeypatch.setattr(mlwb.template, "start_kernel", refuse)
    monkeypatch.setattr(mlwb.template.KernelPool, "__init__", refuse)
    assert statuses(run_pipeline("quick", load_settings(workspace))) == {"make": "cached", "total": "cached"}


def test_cli_development_run_ends_when_mlwb_ends_although_it_leaves_warm_kernels(dev_workspace):
    "Parked kernels must not hold the command's output pipes open (a caller reading them would wait 15 minutes)."
    write_project(dev_workspace, "warm", WARM, {"only.ipynb": ("n = 1", "import json, pathlib\npathlib.Path('out').mkdir(exist_ok=True)",
                                                               "pathlib.Path('out/only.json').write_text('{}')")})
    result = subprocess.run([str(Path(sys.executable).parent / "mlwb"), "run", "warm", "--dev"], cwd=dev_workspace,
                            capture_output=True, text=True, timeout=240)  # a held pipe would outlast this
    assert result.returncode == 0, result.stdout + result.stderr
    assert "development mode" in result.stdout and list((dev_workspace / "runs/.warm-kernels").glob("template-*.json"))


# --- kernels: the fallback for kernels that cannot be forked, and a cheap papermill import -----------------

def test_a_kernel_spec_that_cannot_be_forked_gets_kernels_started_the_usual_way(tmp_path, monkeypatch):
    "A kernel spec that is not `python -m ipykernel_launcher` has no template: the pool starts kernels through jupyter_client."
    from mlwb.kernels import ForkedKernel, execute_stage_notebook, stop_kernel
    from mlwb.template import KernelPool
    spec = tmp_path / "kernels" / "plain-start"; spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({"display_name": "plain start", "language": "python", "argv": [
        sys.executable, "-c", "from ipykernel import kernelapp; kernelapp.launch_new_instance()", "-f", "{connection_file}"]}))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path))
    make_notebook(tmp_path / "nb.ipynb", "n = 1", "import sys\nprint(n, 'csv' in sys.modules)")
    pool = KernelPool("plain-start", tmp_path, dict(os.environ), size=1, limit=1, modules=["csv"])
    try:
        assert pool.template is None
        km = pool.take()
        assert not isinstance(km, ForkedKernel) and km.is_alive()
        execute_stage_notebook(tmp_path / "nb.ipynb", tmp_path / "out.ipynb", {"n": 7}, "plain-start", {}, tmp_path, km=km)
        stop_kernel(km)
    finally: pool.close()
    import nbformat
    assert nbformat.read(tmp_path / "out.ipynb", as_version=4).cells[-1].outputs[0]["text"] == "7 True\n"  # warmed there too


def test_importing_the_kernels_module_skips_jsonschemas_slow_iri_grammars_and_leaves_them_importable():
    probe = ("import sys, mlwb.kernels\nskipped = 'rfc3987_syntax' not in sys.modules\n"
             "import rfc3987_syntax\nprint(skipped, rfc3987_syntax.is_valid_syntax('iri', 'http://example.com/a'))")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.split() == ["True", "True"], done.stderr
