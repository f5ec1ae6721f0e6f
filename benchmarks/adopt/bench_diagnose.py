"""Benchmark: `mlwb.diagnose.diagnose` on a 200-cell notebook, beside nbconvert's script export and papermill's
parameter inspection of the same file (each reads the notebook and parses it; only mlwb then checks it).

    .venv/bin/python benchmarks/adopt/bench_diagnose.py [--cells 200] [--repeat 20]
"""
import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nbformat

CELLS = [  # a working data scientist's cells, round-robin, each with a recorded output
    "%matplotlib inline\nimport numpy as np\nimport pandas as pd\nfrom sklearn.ensemble import RandomForestRegressor\n"
    "from sklearn.model_selection import train_test_split",
    "DATA_{i} = '/home/priya/data/part_{i}.csv'\ndf_{i} = pd.DataFrame(np.random.rand(100, 4), columns=list('abcd'))\n"
    "df_{i}.describe()",
    "def clean_{i}(frame, limit={i}):\n    out = frame.copy()\n    for column in out.columns:\n"
    "        out[column] = out[column].clip(upper=limit)\n    return out\ncleaned_{i} = clean_{i}(df_{i})",
    "X_train, X_test, y_train, y_test = train_test_split(cleaned_{i}[['a', 'b', 'c']], cleaned_{i}.d)\n"
    "model_{i} = RandomForestRegressor(n_estimators=20, max_depth=4)\nmodel_{i}.fit(X_train, y_train)",
    "score_{i} = model_{i}.score(X_test, y_test)\nprint(f'score {{score_{i}:.3f}}')\n"
    "token_{i} = 'sk-abcdefghijklmnopqrstuvwx{i:04d}'\nresults = [x ** 2 for x in range({i}) if x % 3]",
    "!ls -l /tmp\n%time total_{i} = sum(results)\nimport requests\nanswer_{i} = lambda: requests.get('https://example.com')",
]


def messy_notebook(path: Path, n: int) -> Path:
    "A notebook of `n` code cells, out of order in places, each with a few hundred characters of output."
    cells = []
    for i in range(n):
        cell = nbformat.v4.new_code_cell(CELLS[i % len(CELLS)].format(i=i))
        cell.execution_count = i + 1 if i % 17 else None
        cell.outputs = [nbformat.v4.new_output("stream", text=f"line {j} of cell {i}: {j * 0.125:.3f}\n" * 1)
                        for j in range(12)]
        cells.append(cell)
    cells[50].execution_count, cells[51].execution_count = 51, 50  # two cells run the other way round
    nb = nbformat.v4.new_notebook(cells=cells)
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, path)
    return path


def timed(fn, repeat: int) -> float:
    "The median seconds of `repeat` calls of `fn` (after one warm-up call)."
    fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter(); fn(); times.append(time.perf_counter() - start)
    return statistics.median(times)


def cold(code: str) -> float:
    "Seconds for a fresh Python process to run `code` (imports included)."
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
    return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--cells", type=int, default=200)
    parser.add_argument("--repeat", type=int, default=20)
    args = parser.parse_args()
    from mlwb.diagnose import diagnose
    from nbconvert import PythonExporter
    from papermill.inspection import inspect_notebook
    with tempfile.TemporaryDirectory() as folder:
        path = messy_notebook(Path(folder) / "messy.ipynb", args.cells)
        found = diagnose(path).findings
        warm = {"mlwb diagnose": timed(lambda: diagnose(path), args.repeat),
                "nbconvert script export": timed(lambda: PythonExporter().from_filename(str(path)), args.repeat),
                "papermill inspect_notebook": timed(lambda: inspect_notebook(str(path)), args.repeat)}
        fresh = {"mlwb diagnose": cold(f"from mlwb.diagnose import diagnose; diagnose({str(path)!r})"),
                 "nbconvert script export": cold("from nbconvert import PythonExporter; "
                                                 f"PythonExporter().from_filename({str(path)!r})"),
                 "papermill inspect_notebook": cold("from papermill.inspection import inspect_notebook; "
                                                    f"inspect_notebook({str(path)!r})")}
    size = path.stat().st_size if path.exists() else 0
    print(f"{args.cells} code cells, {len(found)} findings; median of {args.repeat} warm calls, then one fresh process")
    print(f"{'tool':<28}{'warm (ms)':>12}{'ratio':>8}{'fresh process (s)':>20}")
    for name in warm:
        print(f"{name:<28}{warm[name] * 1000:>12.1f}{warm[name] / warm['mlwb diagnose']:>8.2f}{fresh[name]:>20.2f}")


if __name__ == "__main__":
    main()
