"""Pipeline speed benchmark (issue 7), one command:

    .venv/bin/python benchmarks/pipeline_speed/run.py [--repeat 2] [--skip-ploomber] [--skip-fraud] [--fraud-only]

A six-stage pipeline of small notebooks (each imports pandas and scikit-learn and does a few cells of light
work), run as:
  1. `mlwb run --force` (release mode: a fresh kernel per stage, forked ahead from a template that has the imports;
     independent stages together),
  2. `mlwb run --force --dev` (development mode: the template kept warm between runs),
  3. papermill's Python API, one notebook after the other (what a hand-written runner does),
  4. the same code as plain Python in one process (the limit: no kernels, imports paid once),
  5. Ploomber 0.23.3 (`ploomber build --force`), in its own virtual environment under benchmarks/.envs/ploomber;
and a no-change rerun of the fraud-detection project (`mlwb run fraud-detection`, whole command) with its runs
going to the embedded store, to a `sqlite:///` store named by `MLFLOW_TRACKING_URI`, and to an MLflow tracking server.
Every figure is the wall time of a whole command (a fresh process), the median of `--repeat` runs.
"""
import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import nbformat

REPO = Path(__file__).resolve().parents[2]
PYTHON = Path(sys.executable)
MLWB = PYTHON.parent / "mlwb"
PLOOMBER_ENV = REPO / "benchmarks" / ".envs" / "ploomber"

# --- the six stages ---------------------------------------------------------------------------------
HEAD = "import numpy as np\nimport pandas as pd\nimport sklearn\nfrom pathlib import Path\nPath('out').mkdir(exist_ok=True)"
STAGES = {  # name: (depends on, parameters source, cells)
    "make": ([], "seed = 0\nrows = 2000", [
        "rng = np.random.default_rng(seed)\ndf = pd.DataFrame(rng.normal(size=(rows, 4)), columns=list('abcd'))",
        "df['y'] = (df.a + 0.5 * df.b - df.c > 0).astype(int)\ndf.to_csv('out/make.csv', index=False)"]),
    "scale_a": (["make"], "", [
        "from sklearn.preprocessing import StandardScaler\ndf = pd.read_csv('out/make.csv')",
        "df[list('abcd')] = StandardScaler().fit_transform(df[list('abcd')])\ndf.to_csv('out/scale_a.csv', index=False)"]),
    "scale_b": (["make"], "", [
        "from sklearn.preprocessing import MinMaxScaler\ndf = pd.read_csv('out/make.csv')",
        "df[list('abcd')] = MinMaxScaler().fit_transform(df[list('abcd')])\ndf.to_csv('out/scale_b.csv', index=False)"]),
    "join": (["scale_a", "scale_b"], "", [
        "a, b = pd.read_csv('out/scale_a.csv'), pd.read_csv('out/scale_b.csv')",
        "joined = a.join(b.drop(columns='y'), rsuffix='_mm')\njoined.to_csv('out/join.csv', index=False)"]),
    "fit_linear": (["join"], "C = 1.0", [
        "from sklearn.linear_model import LogisticRegression\ndf = pd.read_csv('out/join.csv')\nX, y = df.drop(columns='y'), df.y",
        "model = LogisticRegression(C=C, max_iter=500).fit(X, y)\nPath('out/fit_linear.json').write_text(str(model.score(X, y)))"]),
    "fit_tree": (["join"], "depth = 4", [
        "from sklearn.tree import DecisionTreeClassifier\ndf = pd.read_csv('out/join.csv')\nX, y = df.drop(columns='y'), df.y",
        "model = DecisionTreeClassifier(max_depth=depth, random_state=0).fit(X, y)\nPath('out/fit_tree.json').write_text(str(model.score(X, y)))"]),
}


def make_notebook(path: Path, parameters: str, cells: list):
    "A notebook: a `parameters` cell, the common imports, then `cells`."
    nb_cells = []
    if parameters:
        cell = nbformat.v4.new_code_cell(parameters); cell.metadata["tags"] = ["parameters"]; nb_cells.append(cell)
    nb_cells += [nbformat.v4.new_code_cell(c) for c in [HEAD, *cells]]
    nb = nbformat.v4.new_notebook(cells=nb_cells)
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, path)


def make_workspace(root: Path) -> Path:
    "A workspace with the six-stage `bench` project; returns the project folder."
    folder = root / "projects" / "bench"; folder.mkdir(parents=True)
    shutil.copy(REPO / "settings.ini", root / "settings.ini")
    lines = ["stages:"]
    for name, (deps, parameters, cells) in STAGES.items():
        make_notebook(folder / f"{name}.ipynb", parameters, cells)
        out = f"out/{name}.json" if name.startswith("fit") else f"out/{name}.csv"
        lines.append(f"  - {{name: {name}, notebook: {name}.ipynb, depends_on: [{', '.join(deps)}], outputs: [{out}]}}")
    (folder / "pipeline.yml").write_text("\n".join(lines) + "\n")
    return folder


# --- the ways to run it -----------------------------------------------------------------------------
def timed(command, cwd, env=None, check=True) -> float:
    "Wall seconds of one command."
    started = time.perf_counter()
    done = subprocess.run(command, cwd=cwd, env={**os.environ, **(env or {})}, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if check and done.returncode != 0: raise RuntimeError(f"{command} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return seconds


PAPERMILL = """
import sys, papermill
from pathlib import Path
folder = Path(sys.argv[1])
for name in sys.argv[2:]:
    papermill.execute_notebook(str(folder / f"{name}.ipynb"), str(folder / f"out/{name}.out.ipynb"), cwd=str(folder),
                               kernel_name="python3", progress_bar=False)
"""
SCRIPTS = """
import json, os, sys
from pathlib import Path
folder = Path(sys.argv[1]); os.chdir(folder)
for name in sys.argv[2:]:
    cells = json.loads((folder / f"{name}.ipynb").read_text())["cells"]
    exec("\\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "code"), {"__name__": name})
"""


def median_of(repeat, run) -> float:
    return statistics.median(run() for _ in range(repeat))


def bench_mlwb(ws, folder, repeat) -> dict:
    env = {"MLWB_WORKSPACE": str(ws), "MLFLOW_TRACKING_URI": ""}
    timed([MLWB, "run", "bench"], ws, env)  # first run: creates the MLflow store and the experiment
    times = {"mlwb release": median_of(repeat, lambda: timed([MLWB, "run", "bench", "--force"], ws, env)),
             "mlwb no-change rerun (bench)": median_of(repeat, lambda: timed([MLWB, "run", "bench"], ws, env))}
    timed([MLWB, "run", "bench", "--force", "--dev"], ws, {**env, "WARM_KERNELS_IDLE_S": "120"})  # leaves a warm template, as a previous dev run would
    times["mlwb dev"] = median_of(repeat, lambda: timed([MLWB, "run", "bench", "--force", "--dev"], ws, {**env, "WARM_KERNELS_IDLE_S": "120"}))
    subprocess.run([PYTHON, "-c", f"from mlwb.template import stop_parked; stop_parked({str(ws / 'runs' / '.warm-kernels')!r})"], check=True)
    return times


def bench_plain(folder, repeat) -> dict:
    names = list(STAGES)
    return {"papermill API, sequential": median_of(repeat, lambda: timed([PYTHON, "-c", PAPERMILL, folder, *names], folder)),
            "plain scripts, one process": median_of(repeat, lambda: timed([PYTHON, "-c", SCRIPTS, folder, *names], folder))}


# --- Ploomber, in its own environment ----------------------------------------------------------------
def ploomber_python() -> Path:
    "The Python of the benchmark's Ploomber environment, created on first use (pip works offline from the local mirror)."
    python = PLOOMBER_ENV / "bin" / "python"
    if not (PLOOMBER_ENV / "bin" / "ploomber").exists():
        subprocess.run(["python3.11", "-m", "venv", str(PLOOMBER_ENV)], check=True)
        subprocess.run([python, "-m", "pip", "install", "-q", "ploomber==0.23.3", "pandas", "scikit-learn", "ipykernel", "papermill"], check=True)
    return python


def ploomber_project(folder: Path) -> Path:
    "The same six notebooks as a Ploomber pipeline (`upstream`/`product` in each parameters cell)."
    project = folder.parent / "bench-ploomber"; project.mkdir(exist_ok=True)
    tasks = []
    for name, (deps, parameters, cells) in STAGES.items():
        product = {"nb": f"out/{name}.out.ipynb"}
        make_notebook(project / f"{name}.ipynb", f"upstream = {deps or None!r}\nproduct = None\n{parameters}".strip(), cells)
        tasks.append({"source": f"{name}.ipynb", "name": name, "product": product})
    (project / "pipeline.yaml").write_text(json.dumps({"tasks": tasks}, indent=1))
    return project


def bench_ploomber(folder, repeat) -> dict:
    python = ploomber_python()
    project = ploomber_project(folder)
    env = {"PATH": f"{python.parent}:{os.environ['PATH']}", "VIRTUAL_ENV": str(PLOOMBER_ENV)}
    subprocess.run([python, "-m", "ipykernel", "install", "--sys-prefix", "--name", "python3"], check=True, capture_output=True)
    command = [python.parent / "ploomber", "build", "--force"]
    timed(command, project, env)  # warm-up
    return {"ploomber build (serial)": median_of(repeat, lambda: timed(command, project, env))}


# --- the fraud-detection project, on three tracking stores ---------------------------------------------
@contextlib.contextmanager
def tracking_store(kind: str, root: Path):
    "`MLFLOW_TRACKING_URI` for `kind`: embedded (unset), a `sqlite:///` file, or an MLflow server on a free port."
    if kind == "embedded": yield ""; return
    from mlwb.tracking import prepare_sqlite_store
    backend = f"sqlite:///{root / f'{kind}.db'}"
    prepare_sqlite_store(backend)
    if kind == "sqlite": yield backend; return
    from mlwb.core import free_port
    from mlwb.server import start_tracking_server, stop_tracking_server
    server = start_tracking_server(backend, root / "server-artifacts", port=free_port(), workers=1,
                                   log=root / "server.log")
    try: yield server.url
    finally: stop_tracking_server(server)


def bench_fraud(root: Path, repeat, kind: str = "embedded") -> dict:
    "The first run and the no-change reruns of fraud-detection, with the runs going to store `kind`."
    ws = root / f"fraud-{kind}"; (ws / "projects").mkdir(parents=True)
    shutil.copytree(REPO / "projects" / "fraud-detection", ws / "projects" / "fraud-detection",
                    ignore=shutil.ignore_patterns("data", "artifacts", ".ipynb_checkpoints"))
    shutil.copy(REPO / "settings.ini", ws / "settings.ini")
    command = [MLWB, "run", "fraud-detection", "-p", "n_cards=1000"]
    with tracking_store(kind, root) as uri:
        env = {"MLWB_WORKSPACE": str(ws), "MLFLOW_TRACKING_URI": uri}
        first = timed(command, ws, env)
        reruns = [timed(command, ws, env) for _ in range(max(3, repeat))]
    return {f"fraud-detection first run ({kind})": first, f"fraud-detection no-change rerun ({kind})": statistics.median(reruns),
            f"fraud-detection no-change rerun ({kind}, max)": max(reruns)}


FRAUD_GOALS = {"embedded": 1.0, "sqlite": 1.0, "server": 3.0}  # seconds, for the no-change rerun


def report(times: dict, stages: int):
    print("\nwall time of the whole command (median):")
    for name, seconds in times.items(): print(f"  {name:<48} {seconds:7.2f} s")
    for kind, goal in FRAUD_GOALS.items():
        if f"fraud-detection no-change rerun ({kind})" in times:
            print(f"  fraud-detection no-change rerun, {kind + ':':<10} {times[f'fraud-detection no-change rerun ({kind})']:.2f} s"
                  f"   (goal < {goal:.0f} s)")
    if "plain scripts, one process" not in times: return
    plain = times["plain scripts, one process"]
    print("\nratios:")
    print(f"  release mode above plain scripts, per stage:  {(times['mlwb release'] - plain) / stages:+.2f} s   (goal <= 0.5 s)")
    print(f"  development mode / plain scripts:            {times['mlwb dev'] / plain:.2f}x   (goal <= 1.3x)")
    print(f"  sequential papermill / release mode:         {times['papermill API, sequential'] / times['mlwb release']:.2f}x   (goal >= 2x)")
    print(f"  sequential papermill / development mode:     {times['papermill API, sequential'] / times['mlwb dev']:.2f}x")
    if "ploomber build (serial)" in times:
        print(f"  ploomber / release mode:                     {times['ploomber build (serial)'] / times['mlwb release']:.2f}x")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--skip-ploomber", action="store_true")
    parser.add_argument("--skip-fraud", action="store_true")
    parser.add_argument("--fraud-only", action="store_true", help="only the fraud-detection runs on the three stores")
    args = parser.parse_args()
    print(f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} at start")
    with tempfile.TemporaryDirectory() as d:
        root = Path(d); ws = root / "ws"
        folder = make_workspace(ws)
        times = {} if args.fraud_only else {**bench_mlwb(ws, folder, args.repeat), **bench_plain(folder, args.repeat)}
        if not args.skip_ploomber and not args.fraud_only:
            try: times.update(bench_ploomber(folder, args.repeat))
            except Exception as e: print(f"Ploomber skipped: {e}")
        for kind in () if args.skip_fraud else FRAUD_GOALS: times.update(bench_fraud(root, args.repeat, kind))
        report(times, len(STAGES))
    print(f"load average {os.getloadavg()[0]:.2f} at the end")


if __name__ == "__main__":
    main()
