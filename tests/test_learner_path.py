"""The learner's path of the README, walked as a student walks it, with the real command line and no
environment variable pointing anywhere: from a folder outside the clone, `mlwb learn start house-prices` by
name; `mlwb check` there says to cd into the workspace; in the workspace, milestone 1 fails with its hint;
the exercises are solved by copying in the code of the reference solution (the project's notebooks in the
repository); every milestone then passes, `mlwb run` twice, and `mlwb check` still passes them all. A later
run whose model does not beat the champion leaves the champion's milestones done."""
import os
import subprocess

import nbformat
import pytest
import yaml

from conftest import MLWB, NO_WARM_KERNELS, REPO
from mlwb.config import load_settings
from mlwb.learn import BEGIN, END
from mlwb.milestones import load_milestones
from mlwb.tracking import mlflow_client

PROJECT = "house-prices"  # the quickest guided project
SOLUTION = REPO / "projects" / PROJECT


def student(*args, cwd):
    "`mlwb ARGS` run in `cwd` as a student runs it: no MLWB_* variable, the embedded MLflow store."
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLWB_", "MLFLOW_"))} | NO_WARM_KERNELS
    return subprocess.run([str(MLWB), *map(str, args)], cwd=cwd, env=env, capture_output=True, text=True, timeout=1200)


def solve(notebook, solution):
    "Put the reference solution's code into each exercise cell of the student's `notebook`, markers left out."
    mine, reference = (nbformat.read(path, as_version=4) for path in (notebook, solution))
    assert len(mine.cells) == len(reference.cells), notebook.name
    solved = 0
    for cell, answer in zip(mine.cells, reference.cells):
        if cell.cell_type == "code" and "raise NotImplementedError" in cell.source and BEGIN in answer.source:
            cell.source = "\n".join(line for line in answer.source.splitlines() if line.strip() not in (BEGIN, END))
            solved += 1
    nbformat.write(mine, notebook)
    return solved


def shown(result):
    return result.stdout + result.stderr


@pytest.fixture(scope="module")
def path(tmp_path_factory):
    "A student's home folder outside the clone, and the workspace `mlwb learn start` made in it."
    home = tmp_path_factory.mktemp("home")
    assert not (REPO in home.parents or home == REPO)
    started = student("learn", "start", PROJECT, cwd=home)
    assert started.returncode == 0, shown(started)
    return home, home / "learn" / PROJECT


def test_learn_start_by_name_from_outside_the_clone(path):
    home, ws = path
    assert (ws / "settings.ini").is_file() and (ws / "projects" / PROJECT / "milestones.yml").is_file()
    assert load_settings(ws, environ={}).default_project == PROJECT
    listed = student("learn", "list", cwd=home)
    assert listed.returncode == 0 and PROJECT in listed.stdout, shown(listed)
    unknown = student("learn", "start", "house-price", cwd=home)
    assert unknown.returncode == 2 and "guided projects: fraud-detection, house-prices" in unknown.stderr, shown(unknown)


def test_check_outside_the_workspace_says_where_to_go(path):
    home, _ = path
    checked = student("check", cwd=home)
    assert checked.returncode == 2 and "not a workspace" in checked.stderr and "cd into learn/<project>" in checked.stderr, shown(checked)


def test_the_whole_path(path):
    _, ws = path
    project = ws / "projects" / PROJECT
    milestones = load_milestones(project)
    first = student("check", "--milestone", "1", cwd=ws)
    assert first.returncode == 1, shown(first)
    assert f"✗ 1. {milestones[0].title}" in first.stdout and f"hint: {milestones[0].hint}" in first.stdout
    assert "exercise not done yet (in code cell" in first.stdout, first.stdout  # the ingest stage's, which ran first

    solved = {nb.name: solve(nb, SOLUTION / nb.name) for nb in sorted(project.glob("*.ipynb"))}
    assert all(solved.values()), solved  # every stage notebook had an exercise to solve
    n = len(milestones)
    checked = student("check", cwd=ws)
    assert checked.returncode == 0 and f"{n} of {n} milestones pass" in checked.stdout, shown(checked)
    progress = student("progress", cwd=ws)
    assert f"{PROJECT}: {n} of {n} milestones done" in progress.stdout and "every milestone is done" in progress.stdout, shown(progress)

    runs = [student("run", cwd=ws) for _ in range(2)]
    assert all(r.returncode == 0 for r in runs), "\n".join(map(shown, runs))
    again = student("check", cwd=ws)
    assert again.returncode == 0 and f"{n} of {n} milestones pass" in again.stdout and "✗" not in again.stdout, shown(again)


def test_a_run_that_does_not_beat_the_champion_leaves_its_milestones_done(path):
    _, ws = path
    project = ws / "projects" / PROJECT
    client = mlflow_client(load_settings(ws, environ={}))
    champion = client.get_model_version_by_alias(PROJECT, "champion").version
    spec = yaml.safe_load((project / "pipeline.yml").read_text())
    for stage in spec["stages"]:  # another model, which must beat the champion by more than it can
        if stage["name"] == "train": stage["parameters"]["max_iter"] = 120
        if stage["name"] == "register": stage["parameters"]["champion_margin"] = 1e9
    (project / "pipeline.yml").write_text(yaml.safe_dump(spec, sort_keys=False))
    registered = [m for m in load_milestones(project) if m.check in ("model_registered", "api_answers")]
    checked = student("check", cwd=ws)
    for m in registered: assert f"✓ {m.id}. {m.title}" in checked.stdout, shown(checked)
    if "✗ register" in checked.stdout:  # the gate refused the model: the verdict says so
        assert "this run did not replace it: stage 'register' failed" in checked.stdout, checked.stdout
    assert client.get_model_version_by_alias(PROJECT, "champion").version == champion  # the champion stayed
