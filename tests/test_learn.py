"""The learner's path end to end with the real command line: the reference fraud-detection project passes
every milestone, a student's fresh copy fails the first one with its hint and passes once the solution is
back, progress is kept in the student's workspace, `mlwb check` never changes the student's notebooks, and
a project scaffolded by `mlwb new` runs."""
import hashlib
import shutil

import nbformat
import pytest

from conftest import NO_WARM_KERNELS, REPO, run_mlwb
from mlwb.config import load_settings
from mlwb.learn import BEGIN
from mlwb.milestones import load_milestones, load_progress
from mlwb.tracking import mlflow_client

FRAUD = REPO / "projects" / "fraud-detection"
STAGE_NOTEBOOKS = ["01_ingest.ipynb", "02_clean.ipynb", "03_features.ipynb", "04_train.ipynb", "05_evaluate.ipynb", "06_register.ipynb"]


def copy_project(name, workspace):
    "The repository's project `name` copied into `workspace`/projects, without run outputs."
    target = workspace / "projects" / name
    shutil.copytree(REPO / "projects" / name, target, ignore=shutil.ignore_patterns("data", "artifacts", ".ipynb_checkpoints"))
    return target


def fingerprints(folder):
    "SHA-256 of every notebook and YAML file directly in `folder`."
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.suffix in (".ipynb", ".yml")}


def in_workspace(ws):
    "The environment that makes `ws` the workspace of an `mlwb` command (IN_TEST keeps training short)."
    return {"MLWB_WORKSPACE": str(ws), "MLFLOW_TRACKING_URI": "", "IN_TEST": "1", **NO_WARM_KERNELS}


@pytest.fixture(scope="module")
def reference_check(tmp_path_factory):
    "`mlwb check` of the complete fraud-detection project in a fresh workspace: its one full pipeline run."
    ws = tmp_path_factory.mktemp("reference") / "ws"
    project = copy_project("fraud-detection", ws)
    shutil.copy(REPO / "settings.ini", ws / "settings.ini")
    before = fingerprints(project)
    result = run_mlwb("check", "fraud-detection", cwd=ws, env=in_workspace(ws))
    return ws, project, before, result


def test_the_reference_project_passes_every_milestone(reference_check):
    _, project, _, result = reference_check
    milestones = load_milestones(project)
    assert result.returncode == 0, result.stdout + result.stderr
    for m in milestones:
        assert f"✓ {m.id}. {m.title}" in result.stdout, result.stdout
    assert f"{len(milestones)} of {len(milestones)} milestones pass" in result.stdout
    assert "answered 20 rows with the model's own predictions" in result.stdout  # the API milestone really served
    assert "alarm on week-3, and on no other" in result.stdout  # the monitoring milestone read weekly.json
    assert "✗" not in result.stdout


def test_checks_run_as_development_runs_never_taken_for_reproducible_ones(reference_check):
    ws, _, _, _ = reference_check
    client = mlflow_client(load_settings(ws, environ={}))
    runs = client.search_runs([client.get_experiment_by_name("fraud-detection").experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert parents and {r.data.tags.get("mlwb.mode") for r in parents} == {"dev"}


def test_check_leaves_the_project_files_unchanged(reference_check):
    _, project, before, _ = reference_check
    assert fingerprints(project) == before
    assert all(BEGIN in (project / name).read_text() for name in STAGE_NOTEBOOKS)  # the solutions are still there


def test_progress_is_recorded_in_the_workspace_and_shown(reference_check):
    ws, project, _, _ = reference_check
    recorded = load_progress(load_settings(ws, environ={}))["fraud-detection"]
    assert {int(k) for k, v in recorded.items() if v["passed"]} == {m.id for m in load_milestones(project)}
    shown = run_mlwb("progress", cwd=ws, env=in_workspace(ws))
    n = len(load_milestones(project))
    assert shown.returncode == 0 and f"fraud-detection: {n} of {n} milestones done" in shown.stdout, shown.stdout + shown.stderr
    assert "every milestone is done" in shown.stdout


def test_a_fresh_student_copy_fails_milestone_1_with_its_hint_and_passes_with_the_solution(workspace, tmp_path):
    copy_project("fraud-detection", workspace)
    student = tmp_path / "student"
    started = run_mlwb("learn", "start", "fraud-detection", student, cwd=workspace)
    assert started.returncode == 0, started.stdout + started.stderr
    project = student / "projects" / "fraud-detection"
    for name in STAGE_NOTEBOOKS:
        source = "".join(c.source for c in nbformat.read(project / name, as_version=4).cells)
        assert BEGIN not in source and 'raise NotImplementedError("Exercise: ' in source.replace("'", '"'), name
        assert f"{name}: 1 exercise" in started.stdout
    assert load_settings(student, environ={}).default_project == "fraud-detection"
    before = fingerprints(project)

    failed = run_mlwb("check", "--milestone", "1", cwd=student, env=in_workspace(student))
    first = load_milestones(project)[0]
    assert failed.returncode == 1, failed.stdout + failed.stderr
    assert f"✗ 1. {first.title}" in failed.stdout and "exercise not done yet (in code cell" in failed.stdout
    assert "Exercise: generate the transactions with make_card_transactions" in failed.stdout
    assert f"hint: {first.hint}" in failed.stdout
    assert fingerprints(project) == before  # the check changed nothing of the student's

    shutil.copy(FRAUD / "01_ingest.ipynb", project / "01_ingest.ipynb")  # the solution put back
    passed = run_mlwb("check", "--milestone", "1", cwd=student, env=in_workspace(student))
    assert passed.returncode == 0, passed.stdout + passed.stderr
    assert f"✓ 1. {first.title}" in passed.stdout and "data/transactions.parquet is there" in passed.stdout

    assert load_progress(load_settings(student, environ={}))["fraud-detection"]["1"]["passed"] is True
    shown = run_mlwb("progress", cwd=student, env=in_workspace(student))
    assert f"fraud-detection: 1 of {len(load_milestones(project))} milestones done" in shown.stdout and "next: milestone 2" in shown.stdout, shown.stdout
    again = run_mlwb("learn", "start", "fraud-detection", student, cwd=workspace)
    assert again.returncode == 2 and "already exists and is not empty" in again.stderr


def test_a_scaffolded_project_runs_and_passes_its_checks(workspace):
    created = run_mlwb("new", "my-capstone", cwd=workspace)
    assert created.returncode == 0, created.stdout + created.stderr
    project = workspace / "projects" / "my-capstone"
    assert "my-capstone" in (project / "README.md").read_text() and "{{project}}" not in (project / "pipeline.yml").read_text()
    ran = run_mlwb("run", "my-capstone", cwd=workspace, env={"MLFLOW_TRACKING_URI": ""})
    assert ran.returncode == 0 and "✓ prepare" in ran.stdout and "✓ train" in ran.stdout, ran.stdout + ran.stderr
    checked = run_mlwb("check", "my-capstone", cwd=workspace, env={"MLFLOW_TRACKING_URI": "", **NO_WARM_KERNELS})
    assert checked.returncode == 0 and "2 of 2 milestones pass" in checked.stdout, checked.stdout + checked.stderr
    refused = run_mlwb("new", "my-capstone", cwd=workspace)
    assert refused.returncode == 2 and "already exists" in refused.stderr
    bad = run_mlwb("new", "My_Capstone", cwd=workspace)
    assert bad.returncode == 2 and "expected lower-case letters" in bad.stderr
