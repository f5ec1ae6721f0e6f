"""`mlwb run` end to end: parameters, refusals before anything runs, MLflow records, incremental reruns, failures and killed runs."""
import contextlib
import hashlib
import json
import os
import re
import signal
import subprocess
import textwrap
import time
from pathlib import Path

import nbformat
import pytest

from conftest import MLWB, make_notebook, run_mlwb
from mlwb.config import load_settings
from mlwb.runner import store_id, why_stage
from mlwb.runs import UNFINISHED, run_pipeline
from mlwb.tracking import mlflow_client

# --- helpers -------------------------------------------------------------------------------------

STATUS = {"✓": "done", "↷": "cached", "✗": "failed", "·": "not run"}


def write_project(ws, name, pipeline, notebooks, files=None):
    "A project folder: `pipeline.yml`, notebooks `{file: (parameters source, *cell sources)}` and other files."
    folder = ws / "projects" / name
    folder.mkdir(parents=True)
    (folder / "pipeline.yml").write_text(textwrap.dedent(pipeline))
    for nb_name, (parameters, *cells) in notebooks.items(): make_notebook(folder / nb_name, parameters, *cells)
    for path, text in (files or {}).items():
        (folder / path).parent.mkdir(parents=True, exist_ok=True)
        (folder / path).write_text(text)
    return folder


def writes(path, expression):
    "A cell that writes `str(expression)` to `path` (relative to the project folder)."
    return f"import pathlib\npathlib.Path({path!r}).parent.mkdir(parents=True, exist_ok=True)\npathlib.Path({path!r}).write_text(str({expression}))"


def cli_statuses(stdout) -> dict:
    "`{stage: final status}` from the progress lines of `mlwb run`."
    found = {}
    for line in stdout.splitlines():
        m = re.match(r"\s+(\S)\s+(\S+)\s", line)
        if m and m[1] in STATUS: found[m[2]] = STATUS[m[1]]
    return found


def run_folder(stdout):
    "The run folder that `mlwb run` reported."
    return Path(re.search(r"^executed notebooks: (.+)$", stdout, re.M)[1].strip())


def run_api(ws, project, parameters=(), force=False, from_stage=None):
    "Run `project` through the Python API; return `(run, {stage: status})`."
    run = run_pipeline(project, load_settings(ws), parameters, force, from_stage)
    return run, {r.stage: r.status for r in run.results}


def client_of(ws):
    "An MlflowClient on the workspace's tracking store."
    return mlflow_client(load_settings(ws, environ={}))


def pipeline_runs(ws, project) -> list:
    "`[(parent run, {stage: child run})]` of `project`, oldest first."
    client = client_of(ws)
    experiment = client.get_experiment_by_name(project)
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    parents = sorted((r for r in runs if "mlflow.parentRunId" not in r.data.tags), key=lambda r: r.info.start_time)
    return [(p, {r.data.tags["mlwb.stage"]: r for r in runs if r.data.tags.get("mlflow.parentRunId") == p.info.run_id})
            for p in parents]


def printed(notebook) -> str:
    "Everything an executed notebook's cells printed."
    nb = nbformat.read(notebook, as_version=4)
    return "".join(o.get("text", "") for c in nb.cells for o in c.get("outputs", []) if o.output_type == "stream")


def cache_records(ws, project) -> dict:
    "The cache index of `project`: `{stage: record}`."
    path = ws / "runs" / project / "cache.json"
    return json.loads(path.read_text()) if path.exists() else {}


def edit_notebook(path, change):
    "Apply `change(nb)` to the notebook at `path`."
    nb = nbformat.read(path, as_version=4)
    change(nb)
    nbformat.write(nb, path)


def nothing_ran(ws, folder):
    "No run folder, no MLflow store, no stage output."
    return not (ws / "runs").exists() and not (ws / "mlruns").exists() and not (folder / "out").exists()


# --- 1. parameters -----------------------------------------------------------------------------------

PARAMS_PIPELINE = """
    stages:
      - name: a
        notebook: a.ipynb
        parameters: {alpha: 0.5, beta: 3}
        outputs: [out/a.json]
      - name: b
        notebook: b.ipynb
        parameters: {seed: 3}
        outputs: [out/b.json]
"""
SHOW = "import json, pathlib\nvalues = dict({names})\npathlib.Path('out').mkdir(exist_ok=True)\npathlib.Path('out/{stage}.json').write_text(json.dumps(values))\nprint(json.dumps(values))"


@pytest.fixture
def params_project(workspace):
    settings = workspace / "settings.ini"
    settings.write_text(re.sub(r"(?m)^seed = 42$", "seed = 11", settings.read_text()))
    return write_project(workspace, "params", PARAMS_PIPELINE, {
        "a.ipynb": ('seed = 0\nalpha = 1.0\nbeta = 2\nlabel = "default"', SHOW.format(names="seed=seed, alpha=alpha, beta=beta, label=label", stage="a")),
        "b.ipynb": ('seed = 0\nlabel = "default"', SHOW.format(names="seed=seed, label=label", stage="b"))})


def test_parameters_override_notebook_then_pipeline_then_command_line_and_seed_setting(workspace, params_project):
    result = run_mlwb("run", "params", "-p", "beta=4", "-p", "b.label=only-b", env={"MLWB_SEED": "7"})
    assert result.returncode == 0, result.stderr
    expected = {"a": {"seed": 7, "alpha": 0.5, "beta": 4, "label": "default"},  # env seed, yml, -p over yml, notebook default
                "b": {"seed": 3, "label": "only-b"}}  # yml over the seed setting; the stage-prefixed -p
    for number, stage in enumerate("ab", 1):
        assert json.loads((params_project / f"out/{stage}.json").read_text()) == expected[stage]
        assert json.loads(printed(run_folder(result.stdout) / f"0{number}_{stage}.ipynb")) == expected[stage]
    parent, children = pipeline_runs(workspace, "params")[0]
    assert children["a"].data.params.items() >= {"seed": "7", "alpha": "0.5", "beta": "4"}.items()
    assert children["a"].data.params.get("label", "default") == "default"
    assert children["b"].data.params.items() >= {"seed": "3", "label": "only-b"}.items()
    assert parent.data.params["seed"] == "7"

    again = run_mlwb("run", "params", "-p", "beta=4", "-p", "b.label=only-b")  # no MLWB_SEED: settings.ini's seed
    assert again.returncode == 0, again.stderr
    assert cli_statuses(again.stdout) == {"a": "done", "b": "cached"}
    assert json.loads((params_project / "out/a.json").read_text())["seed"] == 11
    assert pipeline_runs(workspace, "params")[1][1]["a"].data.params["seed"] == "11"


# --- 2. bad -p values ------------------------------------------------------------------------------

@pytest.mark.parametrize("parameter, named", [
    ("nope=1", "nope"),  # no stage declares it
    ("x;import os=1", "x;import os"),  # not an identifier: papermill would paste it as code
    ("n=abc", "'n'"),  # wrong kind for `n = 1`
    ("nosuch.n=1", "nosuch"),  # unknown stage prefix
    ("b.n=1", "'n'"),  # a stage that does not declare it
], ids=["unknown-name", "not-an-identifier", "wrong-kind", "unknown-stage", "not-declared-by-that-stage"])
def test_bad_command_line_parameter_is_refused_before_anything_runs(workspace, parameter, named):
    folder = write_project(workspace, "p", """
        stages:
          - {name: a, notebook: a.ipynb, outputs: [out/a.txt]}
          - {name: b, notebook: b.ipynb, outputs: [out/b.txt]}
    """, {"a.ipynb": ("n = 1", writes("out/a.txt", "n")), "b.ipynb": ('label = "x"', writes("out/b.txt", "label"))})
    result = run_mlwb("run", "p", "-p", parameter)
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr.startswith("error: ") and named in result.stderr
    assert "Traceback" not in result.stderr
    assert nothing_ran(workspace, folder)


@pytest.mark.parametrize("parameter, says", [
    ("trian.max_iter=3", "no stage 'trian' (did you mean 'train'?)"),
    ("n_card=3", "(did you mean 'n_cards'?); parameters: prepare: n_cards; train: max_iter, rate"),
    ("train.n_cards=3", "(stage 'train'); parameters: train: max_iter, rate"),
    ('rate="0.3"', 'got the text "0.3" (a JSON string); a number is written without quotes'),
], ids=["stage-typo", "name-typo", "other-stage", "quoted-number"])
def test_bad_parameter_message_says_what_to_do(workspace, parameter, says):
    write_project(workspace, "p", """
        stages:
          - {name: prepare, notebook: a.ipynb, outputs: [out/a.txt]}
          - {name: train, notebook: b.ipynb, outputs: [out/b.txt]}
    """, {"a.ipynb": ("n_cards = 1", writes("out/a.txt", "n_cards")),
          "b.ipynb": ("max_iter = 5\nrate = 0.5", writes("out/b.txt", "rate"))})
    result = run_mlwb("run", "p", "-p", parameter)
    assert result.returncode == 2, result.stdout + result.stderr
    assert says in result.stderr


# --- 3. bad pipeline.yml -----------------------------------------------------------------------------

GOOD_STAGES = """
  - {name: a, notebook: a.ipynb, outputs: [out/a.txt]}
  - {name: b, notebook: b.ipynb, depends_on: [a], outputs: [out/b.txt]}
"""


@pytest.mark.parametrize("pipeline, named", [
    ("version: 2\nstages:" + GOOD_STAGES, "'version'"),
    ("stages:\n  - {name: a, notebook: a.ipynb, outputs: [out/a.txt]}\n  - {name: b, notebook: b.ipynb, dependson: [a]}\n", "'dependson'"),
    ("stages:\n  - {name: a, notebook: a.ipynb}\n  - {name: b, notebook: b.ipynb, depends_on: [nosuch]}\n", "'nosuch'"),
    ("stages:\n  - {name: a, notebook: a.ipynb, depends_on: [b]}\n  - {name: b, notebook: b.ipynb, depends_on: [a]}\n", "cycle: a -> b -> a"),
    ("stages:\n  - {name: a, notebook: a.ipynb}\n  - {name: b, notebook: missing.ipynb}\n", "missing.ipynb"),
    ("stages:\n  - {name: a, notebook: a.ipynb\n  - name: b\n", "YAML"),
    ("stages:\n  - {name: a, notebook: a.ipynb, parameters: {n: 2026-01-01}}\n", "parameters.n"),
    ("stages:\n  - {name: a, notebook: a.ipynb, parameters: {n: abc}}\n", "'n'"),
], ids=["unknown-top-key", "unknown-stage-key", "unknown-dependency", "cycle", "missing-notebook", "invalid-yaml",
        "date-value", "wrong-kind"])
def test_bad_pipeline_file_is_refused_naming_file_and_key(workspace, pipeline, named):
    folder = write_project(workspace, "p", pipeline, {"a.ipynb": ("n = 1", writes("out/a.txt", "n")),
                                                      "b.ipynb": ("", writes("out/b.txt", "1"))})
    result = run_mlwb("run", "p")
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr.startswith("error: ") and "pipeline.yml" in result.stderr and named in result.stderr
    assert "Traceback" not in result.stderr
    assert nothing_ran(workspace, folder)


def test_a_cycle_is_reported_as_the_stages_on_it_only(workspace):
    "A stage that merely depends on a cycle, listed first, is not on it and is not named."
    pipeline = ("stages:\n  - {name: report, notebook: a.ipynb, depends_on: [fit]}\n  - {name: start, notebook: a.ipynb}\n"
                "  - {name: fit, notebook: a.ipynb, depends_on: [start, tune]}\n  - {name: tune, notebook: b.ipynb, depends_on: [fit]}\n")
    write_project(workspace, "p", pipeline, {"a.ipynb": ("n = 1", writes("out/a.txt", "n")), "b.ipynb": ("", writes("out/b.txt", "1"))})
    result = run_mlwb("run", "p")
    assert result.returncode == 2 and "the dependencies form a cycle: fit -> tune -> fit\n" in result.stderr, result.stderr
    named = result.stderr.split("form a cycle")[1]
    assert "report" not in named and "start" not in named


# --- 4. MLflow records ---------------------------------------------------------------------------------

GIT = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false"]


def git(ws, *args) -> str:
    "Run git in the workspace; return its output."
    return subprocess.run([*GIT, *args], cwd=ws, check=True, capture_output=True, text=True).stdout.strip()


def test_mlflow_records_parent_and_child_runs_with_reproduction_record(workspace, tmp_path):
    folder = write_project(workspace, "tracked", """
        stages:
          - {name: prep, notebook: prep.ipynb, parameters: {rows: 4}, outputs: [out/rows.txt]}
          - {name: score, notebook: score.ipynb, parameters: {scale: 2.0}, depends_on: [prep], outputs: [out/score.txt]}
    """, {"prep.ipynb": ("rows = 1", writes("out/rows.txt", "rows"), 'print(f"prepared {rows} rows")'),
          "score.ipynb": ("scale = 1.0", 'import mlflow\nfrom mlwb.tracking import stage_run\nstage_run("tracked")\nmlflow.log_metric("score", 2.5 * scale)',
                          writes("out/score.txt", "2.5 * scale"))},
        {"notes.md": "tracked\n"})
    (workspace / ".gitignore").write_text("out/\nruns/\nmlruns/\n")
    git(workspace, "init", "-q"); git(workspace, "add", "-A"); git(workspace, "commit", "-qm", "base")

    result = run_mlwb("run", "tracked")
    assert result.returncode == 0, result.stderr
    client = client_of(workspace)
    assert [e.name for e in client.search_experiments()].count("tracked") == 1
    [(parent, children)] = pipeline_runs(workspace, "tracked")
    assert set(children) == {"prep", "score"}
    assert parent.info.status == "FINISHED" and all(c.info.status == "FINISHED" for c in children.values())
    assert all(c.data.tags["mlflow.parentRunId"] == parent.info.run_id for c in children.values())
    assert children["prep"].data.params["rows"] == "4" and children["score"].data.params["scale"] == "2.0"
    assert children["score"].data.metrics["score"] == 5.0
    for number, stage in enumerate(["prep", "score"], 1):
        child = children[stage]
        assert child.data.metrics["duration_s"] > 0
        assert {a.path for a in client.list_artifacts(child.info.run_id, "notebook")} == {
            f"notebook/0{number}_{stage}.{ext}" for ext in ("ipynb", "html")}  # executed, and rendered to read
    page = Path(client.download_artifacts(children["prep"].info.run_id, "notebook/01_prep.html", str(tmp_path)))
    assert "prepared 4 rows" in page.read_text()  # the stage's output, as it ran

    assert {a.path for a in client.list_artifacts(parent.info.run_id, "reproduce")} >= {
        f"reproduce/{n}" for n in ("environment.txt", "pipeline.yml", "parameters.json", "hashes.json")}
    got = tmp_path / "got"; got.mkdir()
    reproduce = Path(client.download_artifacts(parent.info.run_id, "reproduce", str(got)))
    assert json.loads((reproduce / "parameters.json").read_text()) == {"prep": {"rows": 4}, "score": {"scale": 2.0}}
    assert (reproduce / "pipeline.yml").read_text() == (folder / "pipeline.yml").read_text()
    assert re.search(r"(?m)^mlflow==", (reproduce / "environment.txt").read_text())
    hashes = json.loads((reproduce / "hashes.json").read_text())
    assert hashes["score"]["outputs"]["out/score.txt"] == hashlib.sha256((folder / "out/score.txt").read_bytes()).hexdigest()
    assert parent.data.tags["mlflow.source.git.commit"] == git(workspace, "rev-parse", "HEAD")
    assert parent.data.tags["mlwb.git.dirty"] == "False"

    (folder / "notes.md").write_text("tracked, and edited\n")
    assert run_mlwb("run", "tracked").returncode == 0
    assert len(pipeline_runs(workspace, "tracked")) == 1  # notes.md is no stage's input: nothing to do
    assert run_mlwb("run", "tracked", "--from", "score").returncode == 0
    runs = pipeline_runs(workspace, "tracked")
    assert len(runs) == 2 and [e.name for e in client.search_experiments()].count("tracked") == 1
    assert runs[1][0].data.tags["mlwb.git.dirty"] == "True"
    assert runs[1][0].data.tags["mlflow.source.git.commit"] == git(workspace, "rev-parse", "HEAD")
    assert client.list_artifacts(runs[1][1]["prep"].info.run_id, "notebook") == []  # reused: not rendered again


# --- 5. incremental reruns --------------------------------------------------------------------------

COUNTING_PIPELINE = """
    stages:
      - {name: make, notebook: make.ipynb, outputs: [out/numbers.txt]}
      - {name: total, notebook: total.ipynb, depends_on: [make], inputs: [data/offset.txt], outputs: [out/total.txt]}
      - {name: report, notebook: report.ipynb, depends_on: [total], outputs: [out/report.txt]}
"""
TOTAL = ("from helper import add_up\nimport pathlib\nnumbers = [int(x) for x in pathlib.Path('out/numbers.txt').read_text().split()]\n"
         "offset = int(pathlib.Path('data/offset.txt').read_text())\npathlib.Path('out/total.txt').write_text(str(add_up(numbers) + offset))")
ALL_DONE = {"make": "done", "total": "done", "report": "done"}


@pytest.fixture
def counting(workspace):
    "The three-stage `counting` project, run once; returns its folder and the first run."
    folder = write_project(workspace, "counting", COUNTING_PIPELINE, {
        "make.ipynb": ("n = 3", writes("out/numbers.txt", "' '.join(str(i) for i in range(n))")),
        "total.ipynb": ("", TOTAL),
        "report.ipynb": ("", writes("out/report.txt", "'total = ' + pathlib.Path('out/total.txt').read_text()"))},
        {"helper.py": "def add_up(values):\n    return sum(values)\n", "data/offset.txt": "10"})
    first, statuses = run_api(workspace, "counting")
    assert statuses == ALL_DONE
    assert (folder / "out/report.txt").read_text() == "total = 13"
    return folder, first


def test_rerun_with_nothing_changed_reuses_every_stage_and_says_where_from(workspace, counting):
    folder, first = counting
    produced_by = {r.stage: r.run_id for r in first.results}
    for path in ("data/offset.txt", "helper.py", "make.ipynb", "out/numbers.txt"): os.utime(folder / path)  # touched, same bytes
    result = run_mlwb("run", "counting")
    assert result.returncode == 0, result.stderr
    assert cli_statuses(result.stdout) == {"make": "cached", "total": "cached", "report": "cached"}
    for stage, run_id in produced_by.items(): assert re.search(rf"{stage}\s+cached \(outputs of MLflow run {run_id}\)", result.stdout)
    assert f"nothing to do: every stage is up to date (last run {first.folder.name})" in result.stdout
    assert len(pipeline_runs(workspace, "counting")) == 1  # nothing ran, so nothing new in MLflow
    assert {p.name for p in (workspace / "runs/counting").iterdir() if p.is_dir()} == {first.folder.name}

    edit_notebook(folder / "make.ipynb", lambda nb: nb.cells.insert(0, nbformat.v4.new_markdown_cell("# Making numbers\nProse only.")))
    assert why_stage("counting", "make", load_settings(workspace)) == []
    assert run_api(workspace, "counting")[1] == {"make": "cached", "total": "cached", "report": "cached"}


def test_code_edit_reruns_its_stage_and_downstream_only_when_the_output_changes(workspace, counting):
    folder, _ = counting
    edit_notebook(folder / "make.ipynb", lambda nb: setattr(nb.cells[-1], "source", nb.cells[-1].source + "\n# same output"))
    assert "notebook code changed" in why_stage("counting", "make", load_settings(workspace))
    assert run_api(workspace, "counting")[1] == {"make": "done", "total": "cached", "report": "cached"}
    parent, children = pipeline_runs(workspace, "counting")[-1]  # a run that ran something records every stage
    assert children["total"].data.tags["mlwb.cached"] == "true" and "mlwb.cached" not in children["make"].data.tags
    assert all(c.info.status == "FINISHED" for c in children.values()) and parent.info.status == "FINISHED"

    edit_notebook(folder / "make.ipynb", lambda nb: setattr(nb.cells[-1], "source", nb.cells[-1].source.replace("range(n)", "range(1, n + 1)")))
    assert run_api(workspace, "counting")[1] == ALL_DONE
    assert (folder / "out/report.txt").read_text() == "total = 16"


def test_edited_helper_module_reruns_the_stage_that_imports_it(workspace, counting):
    folder, _ = counting
    (folder / "helper.py").write_text("def add_up(values):\n    total = 0\n    for v in values: total += v\n    return total\n")
    why = run_mlwb("why", "counting", "total")
    assert why.returncode == 0, why.stderr
    assert re.search(r"total: imported file \S*helper\.py changed", why.stdout)
    assert "up to date" in run_mlwb("why", "counting", "make").stdout
    assert run_api(workspace, "counting")[1] == {"make": "cached", "total": "done", "report": "cached"}


def test_edited_input_file_reruns_the_stage_that_reads_it(workspace, counting):
    folder, _ = counting
    (folder / "data/offset.txt").write_text("20")
    assert why_stage("counting", "total", load_settings(workspace)) == ["input data/offset.txt changed"]
    assert run_api(workspace, "counting")[1] == {"make": "cached", "total": "done", "report": "done"}
    assert (folder / "out/report.txt").read_text() == "total = 23"


def test_output_edited_or_deleted_by_hand_reruns_the_stage_that_produces_it(workspace, counting):
    folder, _ = counting
    (folder / "out/numbers.txt").write_text("9 9 9")
    (folder / "out/report.txt").unlink()
    settings = load_settings(workspace)
    assert why_stage("counting", "make", settings) == ["output out/numbers.txt changed"]
    assert why_stage("counting", "report", settings) == ["output out/report.txt is missing"]
    assert run_api(workspace, "counting")[1] == {"make": "done", "total": "cached", "report": "done"}
    assert (folder / "out/numbers.txt").read_text() == "0 1 2" and (folder / "out/report.txt").read_text() == "total = 13"


def test_force_runs_every_stage_and_from_runs_that_stage_and_later_ones(workspace, counting):
    forced = run_mlwb("run", "counting", "--force")
    assert forced.returncode == 0, forced.stderr
    assert cli_statuses(forced.stdout) == ALL_DONE
    from_total = run_mlwb("run", "counting", "--from", "total")
    assert from_total.returncode == 0, from_total.stderr
    assert cli_statuses(from_total.stdout) == {"make": "cached", "total": "done", "report": "done"}
    unknown = run_mlwb("run", "counting", "--from", "nosuch")
    assert unknown.returncode == 2 and "nosuch" in unknown.stderr


# --- 6. failure and resume ------------------------------------------------------------------------

FRAGILE_PIPELINE = """
    stages:
      - {name: prep, notebook: prep.ipynb, outputs: [out/prep.txt]}
      - {name: fit, notebook: fit.ipynb, depends_on: [prep], outputs: [out/fit.txt]}
      - {name: after, notebook: after.ipynb, depends_on: [fit], outputs: [out/after.txt]}
"""


def test_failed_stage_stops_the_run_and_the_next_run_resumes_from_it(workspace):
    folder = write_project(workspace, "fragile", FRAGILE_PIPELINE, {
        "prep.ipynb": ("", writes("out/prep.txt", "1")),
        "fit.ipynb": ("fail = True", 'import mlflow\nfrom mlwb.tracking import stage_run\nstage_run("fragile")\nmlflow.log_metric("progress", 1)',
                      'if fail:\n    raise ValueError("boom")', writes("out/fit.txt", "2")),
        "after.ipynb": ("", writes("out/after.txt", "3"))})
    result = run_mlwb("run", "fragile")
    assert result.returncode == 1, result.stdout + result.stderr
    assert cli_statuses(result.stdout) == {"prep": "done", "fit": "failed", "after": "not run"}
    assert "'fit'" in result.stderr and "ValueError: boom" in result.stderr and re.search(r"\bcell \d+", result.stderr)
    executed = run_folder(result.stdout) / "02_fit.ipynb"
    assert str(executed) in result.stderr
    errors = [o for c in nbformat.read(executed, as_version=4).cells for o in c.get("outputs", []) if o.output_type == "error"]
    assert [(e.ename, e.evalue) for e in errors] == [("ValueError", "boom")] and errors[0].traceback
    parent, children = pipeline_runs(workspace, "fragile")[0]
    assert parent.info.status == "FAILED"
    assert set(children) == {"prep", "fit"}  # `after` never started
    assert children["fit"].info.status == "FAILED" and children["prep"].info.status == "FINISHED"
    assert children["fit"].data.metrics["progress"] == 1
    assert not (folder / "out/fit.txt").exists() and not (folder / "out/after.txt").exists()
    assert set(cache_records(workspace, "fragile")) == {"prep"}

    resumed = run_mlwb("run", "fragile", "-p", "fail=false")
    assert resumed.returncode == 0, resumed.stderr
    assert cli_statuses(resumed.stdout) == {"prep": "cached", "fit": "done", "after": "done"}
    assert (folder / "out/after.txt").read_text() == "3"
    parent, children = pipeline_runs(workspace, "fragile")[1]
    assert parent.info.status == "FINISHED" and all(c.info.status == "FINISHED" for c in children.values())


def test_failure_message_names_the_failing_cell_of_the_stage_notebook(workspace):
    folder = write_project(workspace, "boom", "stages:\n  - {name: boom, notebook: boom.ipynb}\n",
                           {"boom.ipynb": ("fail = False", "x = 1", 'if fail:\n    raise ValueError("boom")')})
    nb = nbformat.read(folder / "boom.ipynb", as_version=4)  # prose between the cells, as in a lesson
    nb.cells.insert(1, nbformat.v4.new_markdown_cell("# Boom")); nb.cells.insert(3, nbformat.v4.new_markdown_cell("why"))
    nbformat.write(nb, folder / "boom.ipynb")
    result = run_mlwb("run", "boom", "-p", "fail=true")
    assert result.returncode == 1
    # JupyterLab's prompts: [1] parameters, [2] x = 1, [3] the raise; prose and the injected cell are not counted
    assert "failed in code cell 3 of boom.ipynb: ValueError: boom" in result.stderr, result.stderr


# --- 7 and 8. killed runs and concurrent runs ---------------------------------------------------------

SLOW_PIPELINE = """
    stages:
      - {name: first, notebook: first.ipynb, outputs: [out/first.txt]}
      - {name: slow, notebook: slow.ipynb, depends_on: [first], outputs: [out/big.txt]}
"""
SLOW = ("import os, pathlib, time\npathlib.Path('out').mkdir(exist_ok=True)\npathlib.Path('kernel.pid').write_text(str(os.getpid()))\n"
        "f = open('out/big.txt', 'w'); f.write('first half\\n'); f.flush()\ntime.sleep(nap)\nf.write('second half\\n'); f.close()")
HALF, WHOLE = "first half\n", "first half\nsecond half\n"


@pytest.fixture
def slow_project(workspace):
    return write_project(workspace, "slowproj", SLOW_PIPELINE, {"first.ipynb": ("", writes("out/first.txt", "1")),
                                                                "slow.ipynb": ("nap = 0", SLOW)})


def wait_until(condition, proc, log, seconds=60):
    "Poll `condition` while `proc` is still running."
    deadline = time.monotonic() + seconds
    while not condition():
        assert proc.poll() is None, f"mlwb run ended early:\n{log.read_text()}"
        assert time.monotonic() < deadline, f"timed out:\n{log.read_text()}"
        time.sleep(0.05)


def kill_pid(pid):
    "SIGKILL one process by id, and wait (a little) until it is gone."
    with contextlib.suppress(ProcessLookupError): os.kill(pid, signal.SIGKILL)
    for _ in range(100):
        try: state = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError: return
        if state == "Z": return
        time.sleep(0.05)


@contextlib.contextmanager
def sleeping_run(folder, log):
    "`mlwb run` in its own session, its `slow` stage half-way through writing its output; SIGKILLed on the way out."
    with open(log, "w") as out:
        proc = subprocess.Popen([str(MLWB), "run", "slowproj", "-p", "nap=60"], stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_until(lambda: (folder / "out/big.txt").exists() and (folder / "out/big.txt").read_text() == HALF, proc, log)
        yield proc
    finally:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError): os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        if (folder / "kernel.pid").exists(): kill_pid(int((folder / "kernel.pid").read_text()))  # the kernel has its own session


def test_killed_run_leaves_no_record_and_no_notebook_for_the_interrupted_stage(workspace, slow_project, tmp_path):
    assert run_mlwb("run", "slowproj").returncode == 0
    assert set(cache_records(workspace, "slowproj")) == {"first", "slow"}
    before = set((workspace / "runs/slowproj").iterdir())
    with sleeping_run(slow_project, tmp_path / "killed.log") as proc:
        os.killpg(proc.pid, signal.SIGKILL)
    assert (slow_project / "out/big.txt").read_text() == HALF
    assert set(cache_records(workspace, "slowproj")) == {"first"}
    [killed] = set((workspace / "runs/slowproj").iterdir()) - before
    assert not (killed / "02_slow.ipynb").exists()
    assert all(not p.name.endswith("_slow.ipynb") or p.name.startswith(".") for p in killed.iterdir())

    result = run_mlwb("run", "slowproj")
    assert result.returncode == 0, result.stderr
    assert cli_statuses(result.stdout) == {"first": "cached", "slow": "done"}
    assert (slow_project / "out/big.txt").read_text() == WHOLE
    assert (run_folder(result.stdout) / "02_slow.ipynb").exists()
    [(parent, children)] = [(p, c) for p, c in pipeline_runs(workspace, "slowproj") if p.data.tags["mlwb.run_id"] == killed.name]
    assert parent.info.status == "KILLED" and children["slow"].info.status == "KILLED" and parent.info.end_time  # not RUNNING for ever
    assert children["first"].info.status == "FINISHED"


def test_a_no_change_rerun_closes_runs_left_running_by_a_killed_run_of_this_runs_folder_only(workspace):
    "A rerun with nothing to do does it too; a sweep sandbox's run (another runs folder, same store) is left alone."
    write_project(workspace, "tiny", "stages:\n  - {name: one, notebook: one.ipynb, outputs: [out/one.txt]}\n",
                  {"one.ipynb": ("", writes("out/one.txt", "1"))})
    assert run_mlwb("run", "tiny").returncode == 0
    client = client_of(workspace)
    experiment = client.get_experiment_by_name("tiny").experiment_id
    def running(folder, parent=None):
        tags = {"mlwb.run_folder": str(folder)} if folder else {"mlflow.parentRunId": parent}
        return client.create_run(experiment, tags=tags).info.run_id
    killed = workspace / "runs" / "tiny" / "20260101-000000-dead"
    killed.mkdir()
    (killed / UNFINISHED).write_text(store_id(load_settings(workspace)))  # what a run killed outright leaves
    dead = running(killed)
    dead_stage = running(None, dead)
    dead_trial = running(None, dead_stage)
    sandbox = running(workspace / "sweeps" / "s1" / "runs" / "tiny" / "20260101-000000-live")
    rerun = run_mlwb("run", "tiny")
    assert rerun.returncode == 0 and cli_statuses(rerun.stdout) == {"one": "cached"}, rerun.stdout + rerun.stderr
    status = lambda run_id: client.get_run(run_id).info.status
    assert [status(r) for r in (dead, dead_stage, dead_trial)] == ["KILLED"] * 3 and status(sandbox) == "RUNNING"
    assert not (killed / UNFINISHED).exists()


def test_second_concurrent_run_of_a_project_is_refused(workspace, slow_project, tmp_path):
    with sleeping_run(slow_project, tmp_path / "first.log"):
        second = run_mlwb("run", "slowproj")
        assert second.returncode == 2, second.stdout + second.stderr
        assert second.stderr.startswith("error: ") and "in progress" in second.stderr
        assert len(pipeline_runs(workspace, "slowproj")) == 1  # only the running one
        assert (slow_project / "out/big.txt").read_text() == HALF


# --- 9. declared outputs --------------------------------------------------------------------------

def test_stage_that_does_not_write_a_declared_output_fails_naming_it(workspace):
    folder = write_project(workspace, "lazy", "stages:\n  - {name: lazy, notebook: lazy.ipynb, outputs: [out/result.txt, out/other.txt]}\n",
                           {"lazy.ipynb": ("", writes("out/result.txt", "1"))})
    result = run_mlwb("run", "lazy")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "'lazy'" in result.stderr and "out/other.txt" in result.stderr and "out/result.txt" not in result.stderr
    assert cli_statuses(result.stdout) == {"lazy": "failed"}
    assert cache_records(workspace, "lazy") == {}
    [(parent, children)] = pipeline_runs(workspace, "lazy")
    assert parent.info.status == "FAILED" and children["lazy"].info.status == "FAILED"


def test_stage_that_does_not_write_its_output_fails_even_if_an_old_one_is_left(workspace):
    write_project(workspace, "stale", "stages:\n  - {name: maybe, notebook: maybe.ipynb, outputs: [out/result.txt]}\n",
                           {"maybe.ipynb": ("write = True", "if write:\n" + textwrap.indent(writes("out/result.txt", "1"), "    "))})
    assert run_mlwb("run", "stale").returncode == 0
    result = run_mlwb("run", "stale", "-p", "write=false")
    assert result.returncode == 1 and "out/result.txt" in result.stderr, result.stdout + result.stderr
    assert cache_records(workspace, "stale") == {}  # the old file is not recorded as this run's result


def test_switching_the_tracking_store_reruns_every_stage(workspace, counting, tmp_path, monkeypatch):
    "Runs and models recorded in one store are not in another: a stage is reused only within the store that recorded it."
    monkeypatch.chdir(tmp_path)  # where a bare SQLite store keeps its artifacts
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'team.db'}")
    assert why_stage("counting", "make", load_settings(workspace)) == ["tracking store changed (its runs and models are not in this one)"]
    assert run_api(workspace, "counting")[1] == ALL_DONE
    assert run_api(workspace, "counting")[1] == {"make": "cached", "total": "cached", "report": "cached"}
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert run_api(workspace, "counting")[1] == ALL_DONE
