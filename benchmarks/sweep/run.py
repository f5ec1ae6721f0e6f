"""Sweep benchmark (issue 6), one command:

    .venv/bin/python benchmarks/sweep/run.py [--engine local|dask]

Eight configurations (C x depth) of a two-stage project -- `data` (shared by every configuration, run once) and `fit`
(pandas + scikit-learn, logs `accuracy`) -- swept once with one worker and once with two, each in a fresh workspace.
Prints both wall times, the speed-up (goal >= 1.7 on two cores) and whether every configuration got the same metric.
"""
import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import nbformat

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
from mlwb.config import load_settings  # noqa: E402
from mlwb.sweep import parse_grid, run_sweep  # noqa: E402

DATA = ("import numpy as np, pandas as pd, pathlib\nrng = np.random.default_rng(seed)\nX = rng.normal(size=(rows, 6))\n"
        "df = pd.DataFrame(X, columns=[f'x{i}' for i in range(6)])\ndf['y'] = (df.x0 + 0.5 * df.x1 - df.x2 * df.x3 > 0).astype(int)\n"
        "pathlib.Path('out').mkdir(exist_ok=True)\ndf.to_csv('out/data.csv', index=False)")
FIT = ("import mlflow, pandas as pd, pathlib\nfrom sklearn.ensemble import RandomForestClassifier\nfrom sklearn.model_selection import cross_val_score\n"
       "from mlwb.tracking import stage_run\nstage_run('swept')\ndf = pd.read_csv('out/data.csv')\nX, y = df.drop(columns='y'), df.y\n"
       "model = RandomForestClassifier(n_estimators=trees, max_depth=depth, random_state=0, n_jobs=1)\n"
       "accuracy = cross_val_score(model, X, y, cv=3).mean()\nmlflow.log_metric('accuracy', accuracy)\n"
       "pathlib.Path('out/fit.txt').write_text(str(accuracy))")
GRID = ["fit.trees=20,60", "fit.depth=2,4,6,8"]


def make_notebook(path, parameters, code):
    cell = nbformat.v4.new_code_cell(parameters); cell.metadata["tags"] = ["parameters"]
    nb = nbformat.v4.new_notebook(cells=[cell, nbformat.v4.new_code_cell(code)])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, path)


def make_workspace(root: Path) -> Path:
    folder = root / "projects" / "swept"; folder.mkdir(parents=True)
    shutil.copy(REPO / "settings.ini", root / "settings.ini")
    make_notebook(folder / "data.ipynb", "seed = 0\nrows = 3000", DATA)
    make_notebook(folder / "fit.ipynb", "trees = 10\ndepth = 2", FIT)
    (folder / "pipeline.yml").write_text("stages:\n  - {name: data, notebook: data.ipynb, outputs: [out/data.csv]}\n"
                                         "  - {name: fit, notebook: fit.ipynb, depends_on: [data], outputs: [out/fit.txt]}\n")
    return root


def sweep(workers: int, engine: str) -> tuple:
    "Wall seconds and `{configuration: accuracy}` of one sweep in a fresh workspace."
    with tempfile.TemporaryDirectory() as d:
        ws = make_workspace(Path(d))
        settings = load_settings(ws, environ={})
        if engine == "dask": settings = type(settings)(**{**vars(settings), "sweep_engine": "dask"})
        started = time.perf_counter()
        result = run_sweep("swept", parse_grid(GRID), settings, metric="accuracy", workers=workers)
        seconds = time.perf_counter() - started
    failed = [o for o in result["ranked"] if o["status"] != "done"]
    if failed: raise RuntimeError(f"{len(failed)} configurations failed: {failed[0]['error']}")
    return seconds, {tuple(sorted(o["values"].items())): o["metric"] for o in result["ranked"]}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engine", choices=["local", "dask"], default="local")
    args = parser.parse_args()
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    print(f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} at start; 8 configurations, {args.engine} engine")
    serial, serial_metrics = sweep(1, args.engine)
    print(f"  1 worker:  {serial:6.1f} s   (load {os.getloadavg()[0]:.2f})")
    parallel, parallel_metrics = sweep(2, args.engine)
    print(f"  2 workers: {parallel:6.1f} s   (load {os.getloadavg()[0]:.2f})")
    print(f"speed-up: {serial / parallel:.2f}x (goal >= 1.7)")
    print(f"same metrics in both: {serial_metrics == parallel_metrics} ({len(serial_metrics)} configurations)")
    best = max(serial_metrics.items(), key=lambda kv: kv[1])
    print(f"best: {dict(best[0])} accuracy {best[1]:.4f}")


if __name__ == "__main__":
    main()
