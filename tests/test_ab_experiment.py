"""The fraud-detection project's A/B experiment notebook runs top to bottom: its own asserts check each verdict."""
import shutil

import nbformat
import papermill

from conftest import REPO
from mlwb.config import load_settings

NOTEBOOK = REPO / "projects" / "fraud-detection" / "ab_experiment.ipynb"


def test_the_ab_experiment_reaches_each_verdict(workspace, tmp_path, monkeypatch):
    project = workspace / "projects" / "fraud-detection"
    project.mkdir(parents=True)
    shutil.copy(NOTEBOOK, project / NOTEBOOK.name)
    monkeypatch.setenv("TMPDIR", str(tmp_path))  # the notebook's scratch logs land here and go with the test
    executed = project / "ab_experiment.out.ipynb"
    papermill.execute_notebook(project / NOTEBOOK.name, executed, cwd=project, kernel_name=load_settings(workspace, environ={}).kernel_name, progress_bar=False)
    text = "".join(o.get("text", "") for c in nbformat.read(executed, as_version=4).cells if c.cell_type == "code" for o in c.get("outputs", []))
    for name, verdict in (("ship", "ship"), ("roll back", "roll back"), ("keep testing", "keep testing"), ("broken split", "keep testing")):
        assert f"{name} verdict: {verdict}" in text, text
