"""Write the messy notebooks that tests/test_adopt.py adopts, and the house-prices exercise, with outputs recorded
by a real run.

Run from the repository root: `python tests/notebooks/adopt/make_notebooks.py` (`--exercise` to rewrite the
exercise too). `__HERE__` in a notebook stands for this folder's absolute path; the tests copy the folder and
fill it in."""
import os
import shutil
import sys
import tempfile
from pathlib import Path

import nbformat
import numpy as np
import pandas as pd
from nbclient import NotebookClient

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[2]

NOTEBOOKS = {  # name: ([cell sources], execution counts as the author left them (None: never run))
    # magics, an absolute path read, a home-folder path written, a figure, a table; seeded: it reproduces
    "tidy": ([
        "%matplotlib inline\n!echo starting\nimport os\nimport pandas as pd\nimport matplotlib.pyplot as plt\n"
        "from sklearn.linear_model import LogisticRegression\nfrom sklearn.model_selection import train_test_split",
        "DATA = '__HERE__/data/sales.csv'\ndf = pd.read_csv(DATA)\nprint(df.shape)",
        "%time X_train, X_test, y_train, y_test = train_test_split(df[['a', 'b', 'c']], df.label, test_size=0.25, random_state=0)",
        "model = LogisticRegression(C=1.0, max_iter=200, random_state=0)\nmodel.fit(X_train, y_train)\n"
        "accuracy = model.score(X_test, y_test)\nprint(f'accuracy {accuracy:.4f}')",
        "fig, ax = plt.subplots(figsize=(4, 3))\nax.scatter(df.a, df.b, c=df.label)\nplt.show()",
        "os.makedirs(os.path.expanduser('~/results'), exist_ok=True)\n"
        "pd.DataFrame({'p': model.predict(X_test)}).to_csv(os.path.expanduser('~/results/preds.csv'), index=False)\n"
        "accuracy",
        "df.groupby('label').mean().round(4)",
    ], [1, 2, 3, 4, 5, 6, 7]),
    # every kind of unseeded randomness: numpy, random, torch, scikit-learn estimators and splitters
    "unseeded": ([
        "import random\nimport numpy as np\nimport torch\nfrom sklearn.ensemble import RandomForestRegressor\n"
        "from sklearn.model_selection import KFold, train_test_split",
        "X = np.random.rand(60, 3)\ny = X @ np.array([1.0, 2.0, 3.0]) + np.random.normal(0, 0.1, 60)\n"
        "rows = list(range(60))\nrandom.shuffle(rows)\nnoise = torch.randn(3)",
        "X_train, X_test, y_train, y_test = train_test_split(X[rows], y[rows])\n"
        "forest = RandomForestRegressor(n_estimators=10)\nforest.fit(X_train, y_train)\n"
        "folds = KFold(3, shuffle=True)\nr2 = forest.score(X_test, y_test)\nprint(f'r2 {r2:.6f}')",
    ], [1, 2, 3]),
    # cells run out of order and one never run, secrets, network code (never called), a huge output
    "out_of_order": ([
        "import json\nimport urllib.request\nAPI_TOKEN = 'ghp_0123456789abcdefghijklmnopqrstuvwxyz'\n"
        "password = 'correct-horse-battery'\nURL = 'https://example.com/prices.json'",
        "def download(url=URL):\n    with urllib.request.urlopen(url) as answer:\n        return json.load(answer)",
        "prices = [100.0, 250.5, 75.25]\ntotal = sum(prices)\nprint(total)",
        "print('x' * 120000)",
        "summary = {'total': total}",
    ], [1, 4, 2, 3, None]),
    # a name used before the cell that defines it: a fresh kernel stops at cell 1
    "hidden_state": (["total = price * quantity\nprint(total)", "price = 2.5\nquantity = 4"], [3, 1]),
    # runs only in a folder named 'work' (the scratch copy a fresh run uses): its stage fails under mlwb run
    "folder_bound": (["import os", "assert os.path.basename(os.getcwd()) == 'work', 'run me from my own folder'"],
                     [1, 2]),
    "dies": (["import os", "os._exit(1)"], [1, 2]),
    "never_ends": (["import time\nwhile True:\n    time.sleep(0.05)"], [1]),
    "needs_network": (["import urllib.request",
                       "data = urllib.request.urlopen('http://example.com/data.csv').read()"], [1, 2]),
}
RECORD = ("tidy", "unseeded", "out_of_order")  # the notebooks whose outputs come from a real run


def write_data():
    "The table the notebooks read: 80 rows, three features and a label."
    rng = np.random.default_rng(7)
    X = rng.normal(size=(80, 3)).round(4)
    frame = pd.DataFrame(X, columns=["a", "b", "c"]).assign(label=(X[:, 0] + X[:, 1] > 0).astype(int))
    frame.to_csv(HERE / "data" / "sales.csv", index=False)


def recorded(name: str, sources: list) -> list:
    "The cells of notebook `name` after one real run (in a scratch copy of this folder)."
    cells = [nbformat.v4.new_code_cell(s) for s in sources]
    if name not in RECORD: return cells
    with tempfile.TemporaryDirectory() as scratch:
        copy = Path(scratch) / "adopt"
        shutil.copytree(HERE, copy)
        nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(s.replace("__HERE__", str(copy)))
                                             for s in sources])
        NotebookClient(nb, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(copy)}},
                       env={**os.environ, "HOME": scratch}).execute()
    for cell, ran in zip(cells, nb.cells): cell.outputs = ran.outputs
    return cells


EXERCISE = REPO / "projects" / "house-prices" / "_exercise"
COLLEAGUE = ([  # the exercise: Priya's notebook, as she left it (cell 4 re-run last, cell 9 never run)
    "%matplotlib inline\n%load_ext autoreload\n%autoreload 2\nimport os\nimport pandas as pd\nimport matplotlib.pyplot as plt\n"
    "from sklearn.ensemble import RandomForestRegressor\nfrom sklearn.model_selection import train_test_split\n"
    "from sklearn.metrics import mean_squared_error, r2_score",
    "!head -3 houses.csv",
    "df = pd.read_csv('houses.csv')\nAPI_KEY = 'sk-live-0123456789abcdefghijklmnop'  # the pricing service, for later\n"
    "df.shape",
    "features = ['living_area_m2', 'lot_area_m2', 'bedrooms', 'bathrooms', 'year_built', 'garage_spaces',\n"
    "            'distance_to_center_km']\nX, y = df[features], df.price",
    "X_train, X_test, y_train, y_test = train_test_split(X, y, test_size=0.2)\n"
    "model = RandomForestRegressor(n_estimators=50, max_depth=12)\nmodel.fit(X_train, y_train)",
    "pred = model.predict(X_test)\nrmse = mean_squared_error(y_test, pred) ** 0.5\nr2 = r2_score(y_test, pred)\n"
    "print(f'rmse {rmse:,.0f}  r2 {r2:.3f}')",
    "plt.scatter(y_test, pred, s=5)\nplt.xlabel('price')\nplt.ylabel('predicted')\nplt.show()",
    "pd.DataFrame({'price': y_test, 'predicted': pred}).to_csv(os.path.expanduser('~/predictions.csv'))",
    "import pickle\npickle.dump(model, open('model.pkl', 'wb'))",
], [1, 2, 3, 9, 4, 5, 6, 7, None])


def write_exercise():
    "The colleague's notebook in projects/house-prices/_exercise, its data, outputs from a real run."
    from mlwb.generate_messy import make_house_sales
    houses = make_house_sales(n_houses=500, seed=11, missing_rate=0.0, messiness=0.0)
    houses.drop(columns=["sale_date"]).to_csv(EXERCISE / "houses.csv", index=False)
    with tempfile.TemporaryDirectory() as scratch:
        copy = Path(scratch) / "exercise"
        shutil.copytree(EXERCISE, copy)
        nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(s) for s in COLLEAGUE[0]])
        NotebookClient(nb, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(copy)}},
                       env={**os.environ, "HOME": scratch}).execute()
    write_notebook(nb.cells, COLLEAGUE[1], EXERCISE / "colleague_notebook.ipynb")


def write_notebook(cells: list, counts: list, path: Path):
    "Write `cells` with the execution counts `counts` (None: never run, no outputs)."
    for cell, count in zip(cells, counts):
        cell.execution_count = count
        if count is None: cell.outputs = []
        for out in cell.outputs:
            if "execution_count" in out: out["execution_count"] = count
    nb = nbformat.v4.new_notebook(cells=cells)
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, path)


def main():
    write_data()
    for name, (sources, counts) in NOTEBOOKS.items():
        write_notebook(recorded(name, sources), counts, HERE / f"{name}.ipynb")
    (HERE / "bad").mkdir(exist_ok=True)
    (HERE / "bad" / "not_json.ipynb").write_text("this is not JSON\n")
    (HERE / "bad" / "not_notebook.ipynb").write_text('{"name": "a table", "rows": [1, 2]}\n')
    (HERE / "bad" / "old_format.ipynb").write_text(
        '{"nbformat": 3, "nbformat_minor": 0, "metadata": {}, "worksheets": [{"cells": []}]}\n')
    nbformat.write(nbformat.v4.new_notebook(), HERE / "bad" / "empty.ipynb")
    if "--exercise" in sys.argv: write_exercise()  # its recorded RMSE is quoted in its README


if __name__ == "__main__":
    main()
