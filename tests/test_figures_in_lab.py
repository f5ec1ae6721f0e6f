"""The figures of an evaluate stage appear where a student reads them, and in MLflow too: the
executed copy of house-prices' evaluate notebook under runs/ holds its residual and importance plots
as `image/png` outputs and the stage's MLflow run holds them as artifacts; and in JupyterLab
(headless Chromium, as in test_lab.py), running the same notebook by hand shows them inline, as
images in its output areas."""
import base64
import re

import nbformat
import pytest

from conftest import REPO, new_workspace, run_mlwb, set_stage_parameters, stage_runs
from mlwb.config import load_settings
from mlwb.core import stop_process
from mlwb.learn import lab_url
from mlwb.tracking import mlflow_client
from conftest import ARTIFACTS
from test_lab import serve

PROJECT = "house-prices"
FIGURES = ["figures/residuals.png", "figures/importance.png"]


@pytest.fixture(scope="module")
def house_prices(tmp_path_factory):
    "A workspace where house-prices (1,500 houses) ran once: the evaluate stage's inputs exist."
    ws = new_workspace(tmp_path_factory.mktemp("figures"), PROJECT)
    set_stage_parameters(ws / "projects" / PROJECT, {"ingest": {"n_houses": 1500}})
    env = {"MLWB_WORKSPACE": str(ws), "MLFLOW_TRACKING_URI": ""}
    ran = run_mlwb("run", PROJECT, cwd=ws, env=env)
    assert ran.returncode == 0, ran.stdout + ran.stderr
    return ws, env


def png_outputs(notebook) -> list:
    "The decoded `image/png` outputs of a notebook's code cells, in order."
    return [base64.b64decode(o.data["image/png"]) for c in notebook.cells if c.cell_type == "code"
            for o in c.get("outputs", []) if "image/png" in o.get("data", {})]


def test_the_executed_evaluate_notebook_shows_its_figures_and_mlflow_holds_them(house_prices):
    ws, _ = house_prices
    executed = list((ws / "runs" / PROJECT).glob("*/05_evaluate.ipynb"))
    assert len(executed) == 1, executed
    images = png_outputs(nbformat.read(executed[0], as_version=4))  # residuals, importance
    assert len(images) == len(FIGURES) and all(i.startswith(b"\x89PNG") for i in images)
    evaluate = stage_runs(ws, PROJECT)["evaluate"]
    client = mlflow_client(load_settings(ws, environ={}))
    logged = {a.path for a in client.list_artifacts(evaluate.info.run_id, "figures")}
    assert logged == set(FIGURES)


def run_all_cells(page):
    "Run every cell of the notebook open in `page`, from JupyterLab's Run menu."
    page.locator(".lm-MenuBar-itemLabel", has_text="Run").first.click()
    page.locator(".lm-Menu-itemLabel", has_text="Run All Cells").first.click()


def test_jupyterlab_runs_the_evaluate_notebook_and_shows_its_figures_inline(browser, house_prices,
                                                                            tmp_path):
    ws, env = house_prices
    token, log = "mlwb-test-token", tmp_path / "lab.log"
    port, lab = serve(lambda port: ["lab", "--port", str(port), "--token", token, "--no-browser"], ws, env, log,
                      f"/api/status?token={token}")
    try:
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        notebook = f"projects/{PROJECT}/05_evaluate.ipynb"
        page.goto(lab_url(port, token, notebook), timeout=120_000)
        page.wait_for_selector(".jp-NotebookPanel .jp-Cell", timeout=120_000)
        kernel_idle = page.get_by_text(re.compile(r"^Python 3.*\| Idle$"))  # once the kernel is up
        kernel_idle.wait_for(timeout=120_000)
        run_all_cells(page)
        images = page.locator(".jp-NotebookPanel .jp-OutputArea-output img")
        images.nth(len(FIGURES) - 1).wait_for(timeout=180_000)  # residuals, then importance bars
        kernel_idle.wait_for(timeout=120_000)
        page.screenshot(path=str(ARTIFACTS / "jupyterlab-evaluate-figures.png"), full_page=True)
        outputs = page.locator(".jp-NotebookPanel .jp-OutputArea-output")
        assert outputs.filter(has_text="Traceback").count() == 0
        assert images.count() == len(FIGURES)
        sources = [images.nth(i).get_attribute("src") for i in range(images.count())]
        assert all(s.startswith(("data:image/png", "blob:")) for s in sources), sources
        prompts = page.locator(".jp-NotebookPanel .jp-CodeCell .jp-InputPrompt").all_inner_texts()
        assert all(p.strip() not in ("[ ]:", "[*]:") for p in prompts), prompts  # every cell ran
        page.close()
    finally:
        stop_process(lab)
