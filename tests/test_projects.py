"""What every guided project must do, tested on each of them (`project_run` in conftest.py runs each
pipeline twice in a fresh workspace): every stage runs and says where its results are, a rerun with nothing
changed reuses every stage, MLflow holds both pipeline runs with a child run per stage, the champion is
registered, the milestones name real stages and metrics that the reference solution reaches, every stage
notebook has an exercise, the README lists the milestones of milestones.yml, and the reference project passes
its own checks. What is particular to one project is in tests/test_<project>.py."""
import nbformat
import pytest

from conftest import PROJECTS, REPO, check_reference_project, stage_runs
from mlwb.config import load_settings
from mlwb.milestones import load_milestones
from mlwb.tracking import mlflow_client

REPRODUCE = {"reproduce/environment.txt", "reproduce/hashes.json", "reproduce/parameters.json", "reproduce/pipeline.yml"}


def test_every_stage_runs_and_the_summary_says_where_results_are(project_run):
    first = project_run.first
    assert first.returncode == 0, first.stdout + first.stderr
    assert all(f"✓ {stage}" in first.stdout for stage in project_run.stages), first.stdout
    assert "executed notebooks:" in first.stdout and "MLflow run:" in first.stdout and "mlwb ui" in first.stdout
    run_folders = (project_run.ws / "runs" / project_run.name).iterdir()
    executed = sorted(p.name for f in run_folders if f.is_dir() for p in f.glob("*.ipynb"))
    assert executed == [f"{i:02d}_{s}.ipynb" for i, s in enumerate(project_run.stages, 1)]


def test_rerun_with_nothing_changed_reuses_every_stage(project_run):
    second = project_run.second
    assert second.returncode == 0, second.stdout + second.stderr
    assert all(f"↷ {stage}" in second.stdout for stage in project_run.stages), second.stdout


def test_mlflow_holds_the_pipeline_run_with_a_child_run_per_stage_and_a_no_change_rerun_records_nothing(project_run):
    client = mlflow_client(load_settings(project_run.ws, environ={}))
    experiment = client.get_experiment_by_name(project_run.name)
    runs = client.search_runs([experiment.experiment_id], order_by=["attributes.start_time ASC"])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1 and all(p.info.status == "FINISHED" for p in parents)
    assert "nothing to do: every stage is up to date" in project_run.second.stdout
    assert sorted(stage_runs(project_run.ws, project_run.name)) == sorted(project_run.stages)
    artifacts = {a.path for a in client.list_artifacts(parents[0].info.run_id, "reproduce")}
    assert REPRODUCE <= artifacts


def test_the_champion_is_registered_as_version_1(project_run):
    client = mlflow_client(load_settings(project_run.ws, environ={}))
    assert str(client.get_model_version_by_alias(project_run.name, "champion").version) == "1"


def test_milestones_name_real_stages_and_metrics_the_solution_reaches(project_run):
    milestones = load_milestones(REPO / "projects" / project_run.name)  # known checks, fitting arguments
    assert [m.id for m in milestones] == list(range(1, len(milestones) + 1))
    assert {m.check for m in milestones} >= {"metric_at_least", "model_registered", "api_answers"}
    by_stage = stage_runs(project_run.ws, project_run.name)
    for m in milestones:
        assert m.stage in project_run.stages and m.hint and m.minutes > 0, m
        if m.check.startswith("metric_"):
            value = by_stage[m.args["stage"]].data.metrics[m.args["metric"]]
            passes = value >= m.args["value"] if m.check == "metric_at_least" else value <= m.args["value"]
            assert passes, (m, value)
        if "path" in m.args or "rows" in m.args:
            assert (project_run.folder / m.args.get("path", m.args.get("rows"))).is_file(), m


@pytest.mark.parametrize("project", sorted(PROJECTS))
def test_every_stage_notebook_has_an_exercise_with_a_hint(project):
    for number, stage in enumerate(PROJECTS[project]["stages"], 1):
        nb = nbformat.read(REPO / "projects" / project / f"{number:02d}_{stage}.ipynb", as_version=4)
        blocks = [c.source.splitlines() for c in nb.cells if c.cell_type == "code" and "### BEGIN SOLUTION" in c.source]
        assert blocks, f"{stage}: no exercise"
        for lines in blocks:
            begin = [line.strip() for line in lines].index("### BEGIN SOLUTION")
            assert lines[begin + 1].strip().startswith("# hint:"), stage
            assert any(l.strip() == "### END SOLUTION" for l in lines[begin:]), stage
        assert sum("parameters" in c.metadata.get("tags", []) for c in nb.cells) == 1, stage


# fraud-detection's checks are tests/test_learn.py's: there `mlwb check` makes the project's one pipeline run
@pytest.mark.parametrize("project_run", ["house-prices", "recommender", "support-intent"], indirect=True)
def test_the_reference_project_passes_all_its_checks(project_run):
    checked = check_reference_project(project_run.ws, project_run.name)
    reused = all(f"↷ {stage}" in checked.stdout for stage in project_run.stages)
    assert reused, checked.stdout  # the check reused the pipeline's runs


def readme_milestones(readme):
    "The milestones table of a project's README (under '## Milestones'): one dict per row, by column name."
    section = readme.read_text(encoding="utf-8").split("\n## Milestones\n", 1)[1].split("\n## ", 1)[0]
    rows = [[cell.strip() for cell in line.strip().strip("|").split("|")] for line in section.splitlines() if line.startswith("|")]
    return [dict(zip(rows[0], row)) for row in rows[2:]]  # rows[1] is the |---| line


@pytest.mark.parametrize("project", sorted(PROJECTS) + ["_template"])
def test_the_readme_lists_the_milestones_of_milestones_yml(project):
    folder = REPO / "projects" / project
    listed = readme_milestones(folder / "README.md")
    milestones = load_milestones(folder)
    assert [row["#"] for row in listed] == [str(m.id) for m in milestones]
    for row, m in zip(listed, milestones):
        assert row["milestone"] == m.title, (project, m.id)
        assert row.get("stage", m.stage) == m.stage, (project, m.id)
        assert row.get("about", row.get("minutes")) in (f"{m.minutes} min", str(m.minutes)), (project, m.id)
