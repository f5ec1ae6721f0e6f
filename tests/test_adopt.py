"""`mlwb adopt`: messy notebooks (tests/notebooks/adopt, written by make_notebooks.py there) diagnosed, run afresh,
written into a project as stages and verified with `mlwb run`; bad input refused with a clear message and the
project left as it was."""
import hashlib
import json
import shutil
from pathlib import Path

import pytest
import yaml

from conftest import new_workspace, run_mlwb
from mlwb.adopt import adopt
from mlwb.diagnose import AdoptError, diagnose
from mlwb.pipeline import PipelineError
from mlwb.config import load_settings

NOTEBOOKS = Path(__file__).resolve().parent / "notebooks" / "adopt"
PREPARE = {"cells": [{"cell_type": "code", "execution_count": None, "id": "a1", "metadata": {"tags": ["parameters"]},
                      "outputs": [], "source": "n = 3"},
                     {"cell_type": "code", "execution_count": None, "id": "a2", "metadata": {}, "outputs": [],
                      "source": "import os\nos.makedirs('data', exist_ok=True)\nopen('data/n.txt', 'w').write(str(n))"}],
           "metadata": {"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}},
           "nbformat": 4, "nbformat_minor": 5}


@pytest.fixture(scope="module")
def place(tmp_path_factory):
    "A workspace with a one-stage project 'demo', and a copy of the messy notebooks with __HERE__ filled in."
    root = tmp_path_factory.mktemp("adopt")
    ws = new_workspace(root)
    project = ws / "projects" / "demo"
    project.mkdir()
    (project / "pipeline.yml").write_text("# a project to adopt notebooks into\ndescription: Adoption tests.\n"
                                          "stages:\n  - name: prepare\n    notebook: 01_prepare.ipynb\n"
                                          "    outputs: [data/n.txt]\n")
    (project / "01_prepare.ipynb").write_text(json.dumps(PREPARE))
    notebooks = shutil.copytree(NOTEBOOKS, root / "notebooks", ignore=shutil.ignore_patterns("*.py"))
    for path in notebooks.glob("*.ipynb"):
        path.write_text(path.read_text().replace("__HERE__", str(notebooks)))
    return {"settings": load_settings(ws), "project": project, "notebooks": notebooks, "adopted": {}}


def adopted(place, name: str, **options):
    "The adoption of notebook `name` into 'demo' (adopted once per module)."
    if name not in place["adopted"]:
        place["adopted"][name] = adopt(place["notebooks"] / f"{name}.ipynb", "demo", settings=place["settings"],
                                       **options)
    return place["adopted"][name]


def snapshot(folder: Path) -> dict:
    "{file: digest} of everything under `folder`."
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def stage_source(place, adoption) -> str:
    "The code of the stage notebook that `adoption` wrote."
    entry = next(s for s in yaml.safe_load((place["project"] / "pipeline.yml").read_text())["stages"]
                 if s["name"] == adoption.stage)
    cells = json.loads((place["project"] / entry["notebook"]).read_text())["cells"]
    return "\n".join(c["source"] for c in cells if c["cell_type"] == "code")


def kinds(folder: Path, name: str) -> dict:
    "{finding kind: [(cell, line)]} of the diagnosis of notebook `name` in `folder`."
    found = {}
    for f in diagnose(folder / f"{name}.ipynb").findings:
        found.setdefault(f.kind, []).append((f.cell.number, f.line))
    return {kind: sorted(where, key=str) for kind, where in found.items()}


def test_the_messy_notebooks_hold_every_kind_of_finding(place):
    tidy, unseeded, disorder, hidden = (kinds(place["notebooks"], n) for n in ("tidy", "unseeded", "out_of_order", "hidden_state"))
    assert tidy["magic"] == [(1, 1), (1, 2), (3, 1)] and tidy["path"] == [(2, 1), (6, 1), (6, 2)]
    assert unseeded["randomness"] == [(2, 1), (2, 2), (2, 4), (2, 5), (3, 1), (3, 2), (3, 4)]
    assert disorder["order"] == [(3, None), (4, None), (5, None)] and disorder["network"] == [(2, 2)]
    assert disorder["secret"] == [(1, 3), (1, 4)] and disorder["output"] == [(4, None)]
    assert hidden["hidden state"] == [(1, 1), (1, 1)]  # price and quantity, each defined only in cell 2
    assert "randomness" not in tidy and "order" not in tidy


def test_a_seeded_notebook_reproduces_and_its_stage_gives_the_same_results(place):
    original = snapshot(place["notebooks"])
    adoption = adopted(place, "tidy")
    assert adoption.error is None, adoption.error
    rep = adoption.reproduction
    assert (rep.verdict, rep.compared) == ("reproduces", 7)  # text, numbers, a figure by size, a table
    assert [p.name for p in rep.observed.reads] == ["sales.csv"] and rep.observed.numbers == pytest.approx(
        {"accuracy": 0.95})
    assert [str(p.relative_to(rep.home)) for p in rep.observed.writes] == ["results/preds.csv"]
    entry = yaml.safe_load((place["project"] / "pipeline.yml").read_text())["stages"][-1]
    assert entry == {"name": "tidy", "notebook": "02_tidy.ipynb", "description": "Adopted by mlwb adopt from tidy.ipynb.",
                     "parameters": {"seed": 0}, "inputs": ["data/tidy/sales.csv"],
                     "outputs": ["artifacts/tidy/preds.csv"]}
    assert (place["project"] / "pipeline.yml").read_text().startswith("# a project")  # its comments kept
    source = stage_source(place, adoption)
    assert "DATA = 'data/tidy/sales.csv'" in source and "random_state=seed" in source and "\n%" not in source
    assert adoption.verification.same and adoption.verification.numbers == {"accuracy": None}
    assert adoption.verification.outputs == {"artifacts/tidy/preds.csv": None}
    assert snapshot(place["notebooks"]) == original  # the original and its folder untouched


def test_the_stage_logs_metrics_and_a_model_with_a_signature_then_caches(place):
    import mlflow
    from mlwb.runs import run_pipeline
    from mlwb.tracking import mlflow_client, tracking_to
    adoption = adopted(place, "tidy")
    run_id = adoption.verification.run_id
    run = mlflow_client(place["settings"]).get_run(run_id)
    assert run.data.metrics["accuracy"] == pytest.approx(0.95)
    with tracking_to(place["settings"]):
        info = mlflow.models.get_model_info(f"runs:/{run_id}/model")
    assert [c.name for c in info.signature.inputs.inputs] == ["a", "b", "c"]
    report = mlflow_client(place["settings"]).download_artifacts(run_id, "adopt/report.md")
    assert "- reproduction: reproduces" in Path(report).read_text()
    again = run_pipeline("demo", place["settings"], targets=["tidy"])
    assert [r.status for r in again.results if r.stage == "tidy"] == ["cached"]


def test_an_unseeded_notebook_differs_and_its_stage_is_seeded(place):
    adoption = adopted(place, "unseeded")
    assert adoption.error is None, adoption.error
    assert adoption.reproduction.verdict == "differs" and list(adoption.reproduction.differences) == [3]
    assert "differs: first at cell 3: number" in adoption.verdict
    source = stage_source(place, adoption)
    for seeded in ("numpy.random.seed(seed)", "random.seed(seed)", "torch.manual_seed(seed)",
                   "train_test_split(X[rows], y[rows], random_state=seed)", "n_estimators=n_estimators, random_state=seed",
                   "KFold(3, shuffle=True, random_state=seed)"):
        assert seeded in source, seeded
    assert adoption.verification.status == "done" and set(adoption.verification.numbers) == {"r2"}
    report = adoption.report.read_text()
    assert "### high (7)" in report and "## Verification with `mlwb run`" in report


def test_out_of_order_cells_reproduce_and_secrets_leave_the_code(place):
    adoption = adopted(place, "out_of_order")
    assert adoption.error is None, adoption.error
    assert (adoption.reproduction.verdict, adoption.reproduction.compared) == ("reproduces", 2)  # cells 3 and 4
    source = stage_source(place, adoption)
    assert "ghp_" not in source and "correct-horse" not in source
    assert "API_TOKEN = os.environ.get('API_TOKEN', '')" in source and "os.environ.get('PASSWORD', '')" in source
    assert adoption.verification.same and adoption.verification.numbers == {"total": None}


@pytest.mark.parametrize("name, timeout, message", [
    ("hidden_state", 60, "hidden_state.ipynb: cell 1 (In [3]) raised NameError: name 'price' is not defined"),
    ("dies", 60, "dies.ipynb: cell 2 (In [2]): the kernel died"),
    ("never_ends", 3, "never_ends.ipynb: cell 1 (In [1]) did not finish within 3 s"),
    ("needs_network", 60, "needs_network.ipynb: cell 2 (In [2]) needs the network (example.com)"),
])
def test_a_notebook_that_fails_afresh_is_reported_by_cell_and_nothing_is_written(place, name, timeout, message):
    before = snapshot(place["project"])
    adoption = adopt(place["notebooks"] / f"{name}.ipynb", "demo", settings=place["settings"], timeout=timeout)
    assert message in adoption.error, adoption.error
    assert adoption.plan is None and snapshot(place["project"]) == before
    assert message in adoption.report.read_text()


def test_a_stage_that_fails_under_mlwb_run_is_taken_back_out(place):
    before = snapshot(place["project"])
    adoption = adopt(place["notebooks"] / "folder_bound.ipynb", "demo", settings=place["settings"])
    assert adoption.reproduction.verdict == "nothing to compare"
    assert "the adopted stage failed under mlwb run" in adoption.error and "run me from my own folder" in adoption.error
    assert snapshot(place["project"]) == before
    assert list(adoption.report.parent.glob("*_folder_bound.ipynb"))  # kept for a look, beside the report


@pytest.mark.parametrize("name, message", [
    ("not_json", "not_json.ipynb: not JSON (Expecting value at line 1, column 1)"),
    ("not_notebook", "not_notebook.ipynb: not a Jupyter notebook"),
    ("old_format", "old_format.ipynb: nbformat 3 notebook; version 4 expected"),
    ("empty", "empty.ipynb: no code to adopt"),
])
def test_bad_input_is_refused_with_the_file_named(place, name, message):
    before = snapshot(place["project"])
    with pytest.raises(AdoptError, match=message.replace("(", r"\(").replace(")", r"\)")):
        adopt(NOTEBOOKS / "bad" / f"{name}.ipynb", "demo", settings=place["settings"])
    assert snapshot(place["project"]) == before


def test_a_missing_project_file_or_taken_stage_name_is_refused(place):
    with pytest.raises(PipelineError, match="no project 'nowhere'"):
        adopt(NOTEBOOKS / "tidy.ipynb", "nowhere", settings=place["settings"])
    with pytest.raises(AdoptError, match="missing.ipynb: file not found"):
        adopt(NOTEBOOKS / "missing.ipynb", "demo", settings=place["settings"])
    with pytest.raises(AdoptError, match="there is a stage 'prepare' already"):
        adopt(NOTEBOOKS / "tidy.ipynb", "demo", stage="prepare", settings=place["settings"])


def test_the_command_prints_a_summary_and_fails_with_the_cell(place):
    env = {"MLWB_WORKSPACE": str(place["settings"].workspace), "MLFLOW_TRACKING_URI": ""}
    bad = run_mlwb("adopt", NOTEBOOKS / "bad" / "not_json.ipynb", "--project", "demo", env=env)
    assert bad.returncode == 2 and "error:" in bad.stderr and "not JSON" in bad.stderr
    slow = run_mlwb("adopt", place["notebooks"] / "never_ends.ipynb", "--project", "demo", "--timeout", "2", env=env)
    assert slow.returncode == 2 and "cell 1 (In [1]) did not finish within 2 s" in slow.stderr
    assert "findings: 0 high, 0 medium, 0 low" in slow.stdout and "report: " in slow.stdout


def test_the_house_prices_exercise_is_adopted_and_passes_its_milestones(tmp_path):
    from mlwb.milestones import check_project
    ws = new_workspace(tmp_path, "house-prices")
    settings, project = load_settings(ws), ws / "projects" / "house-prices"
    adoption = adopt(project / "_exercise" / "colleague_notebook.ipynb", "house-prices", stage="colleague",
                     settings=settings)
    assert adoption.error is None, adoption.error
    assert adoption.reproduction.verdict == "differs"  # she never seeded it: no run gives her RMSE again
    assert {"secret", "order", "randomness", "path", "magic"} <= {f.kind for f in adoption.diagnosis.findings}
    entry = yaml.safe_load((project / "pipeline.yml").read_text())["stages"][-1]
    assert entry["inputs"] == ["_exercise/houses.csv"]
    assert entry["outputs"] == ["artifacts/colleague/model.pkl", "artifacts/colleague/predictions.csv"]
    exercise = yaml.safe_load((project / "_exercise" / "milestones.yml").read_text())["milestones"]
    milestones = yaml.safe_load((project / "milestones.yml").read_text())
    (project / "milestones.yml").write_text(yaml.safe_dump({"milestones": milestones["milestones"] + exercise}))
    for milestone in (8, 9, 10, 11):
        [result] = check_project("house-prices", milestone, settings)
        assert result.passed, result
