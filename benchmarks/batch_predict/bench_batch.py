"""Batch scoring: `mlwb.batch.predict_file` (chunked) against `mlflow.pyfunc.load_model(...).predict` on the whole file.

One command:  .venv/bin/python benchmarks/batch_predict/bench_batch.py [--rows 1000000] [--chunk-rows 100000] [--repeats 2]

It fits a one-hot + histogram-gradient-boosting pipeline, saves it as an MLflow model (skops, as mlwb.train does),
writes a Parquet file of --rows rows, then scores that file in a fresh Python process per variant and attempt:
  pyfunc         read the whole file (pandas.read_parquet), mlflow.pyfunc predict, add the column, write Parquet
  mlwb           predict_file(..., probabilities=False): prediction only, like for like with pyfunc
  mlwb+proba     predict_file(...) as `mlwb predict` runs it: prediction and probability
Each process reports the scoring time (read + predict + write; model loading timed apart) and its peak resident
memory (getrusage ru_maxrss) and its resident memory just before scoring, so "extra" (peak - before) is about the memory
that scoring itself took. Wall time on a shared machine varies with its load; CPU time (user + system, all threads) less so.
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

FEATURES = ["amount", "hour", "distance_km", "category", "card_present"]


def peak_rss_mb() -> float:
    "This process's peak resident memory so far, in MiB (Linux reports kilobytes)."
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rss_now_mb() -> float:
    "This process's resident memory now, in MiB (Linux)."
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"): return int(line.split()[1]) / 1024
    return float("nan")


def cpu_seconds() -> float:
    "User + system CPU time of this process so far (every thread)."
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def make_rows(n: int, seed: int):
    "Card-transaction-like rows: an id, three numbers, a category and a flag."
    import numpy as np
    import pandas as pd
    rng = np.random.default_rng(seed)
    categories = np.array(["food", "travel", "online", "fuel", "grocery", "electronics", "pharmacy", "other"])
    return pd.DataFrame({"transaction_id": np.arange(n), "amount": rng.gamma(2.0, 30.0, n).round(2), "hour": rng.integers(0, 24, n),
                         "distance_km": rng.exponential(20.0, n).round(1), "category": categories[rng.integers(0, len(categories), n)],
                         "card_present": rng.random(n) < 0.6})


def build(folder: Path, rows: int, seed: int = 0) -> tuple:
    "Fit and save the model, write the input file; return (model folder, input file)."
    import mlflow.sklearn
    import skops.io as sio
    from mlflow.models import infer_signature
    from sklearn.compose import ColumnTransformer
    from sklearn.ensemble import HistGradientBoostingClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import OneHotEncoder
    train = make_rows(50_000, seed)
    y = ((train.amount > 80) & (~train.card_present | (train.hour < 6)) | (train.distance_km > 90)).astype(int)
    encode = ColumnTransformer([("category", OneHotEncoder(handle_unknown="ignore", sparse_output=False), ["category"])], remainder="passthrough")
    model = make_pipeline(encode, HistGradientBoostingClassifier(max_iter=100, random_state=seed)).fit(train[FEATURES], y)
    model_folder = folder / "model"
    mlflow.sklearn.save_model(model, model_folder, signature=infer_signature(train[FEATURES], model.predict(train[FEATURES])),
                              serialization_format="skops", skops_trusted_types=sio.get_untrusted_types(data=sio.dumps(model)),
                              pip_requirements=["scikit-learn", "skops"])
    data = folder / "transactions.parquet"
    make_rows(rows, seed + 1).to_parquet(data, index=False, row_group_size=100_000)
    return model_folder, data


def run_variant(variant: str, model: str, data: str, output: str, chunk_rows: int) -> dict:
    "Score `data` one way in this process; return times and memory."
    import logging
    import mlflow.pyfunc
    import pandas as pd
    from mlwb.batch import load_batch_model, predict_file
    logging.getLogger("mlflow").setLevel(logging.ERROR)
    started = time.perf_counter()
    loaded = mlflow.pyfunc.load_model(model) if variant == "pyfunc" else load_batch_model(model)
    loaded_at, before, cpu_before = time.perf_counter(), rss_now_mb(), cpu_seconds()
    if variant == "pyfunc":
        frame = pd.read_parquet(data)
        frame["prediction"] = loaded.predict(frame)
        frame.to_parquet(output, index=False)
        rows = len(frame)
    else:
        rows = predict_file(loaded, data, output, chunk_rows=chunk_rows, probabilities=variant == "mlwb+proba", progress=False).rows
    return {"variant": variant, "rows": rows, "load_s": loaded_at - started, "score_s": time.perf_counter() - loaded_at, "cpu_s": cpu_seconds() - cpu_before,
            "rss_before_mb": before, "rss_peak_mb": peak_rss_mb()}


def measure(variant: str, model: Path, data: Path, output: Path, chunk_rows: int) -> dict:
    "Run one variant in a fresh interpreter (so peak memory is its own)."
    command = [sys.executable, __file__, "--variant", variant, "--model", str(model), "--input", str(data), "--output", str(output), "--chunk-rows", str(chunk_rows)]
    done = subprocess.run(command, capture_output=True, text=True, check=False, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    if done.returncode != 0: raise SystemExit(f"{variant} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def check_same(folder: Path):
    "The three outputs hold the same predictions."
    import pyarrow.parquet as pq
    columns = {v: pq.read_table(folder / f"{v}.parquet", columns=["prediction"]).column(0).to_numpy() for v in ("pyfunc", "mlwb", "mlwb+proba")}
    assert (columns["pyfunc"] == columns["mlwb"]).all() and (columns["mlwb"] == columns["mlwb+proba"]).all(), "predictions differ"


def report(best: dict, rows: int, chunk_rows: int):
    "Print a table and the ratios against pyfunc."
    base = best["pyfunc"]
    print(f"\n{rows:,} rows, chunk_rows={chunk_rows:,}, best of the attempts per variant (scoring = read + predict + write)")
    print(f"{'variant':<12} {'load s':>7} {'score s':>8} {'CPU s':>7} {'rows/s':>11} {'peak RSS MiB':>13} {'extra MiB':>10} {'speed vs pyfunc':>16} {'extra mem vs pyfunc':>20}")
    for name, r in best.items():
        extra, base_extra = r["rss_peak_mb"] - r["rss_before_mb"], base["rss_peak_mb"] - base["rss_before_mb"]
        print(f"{name:<12} {r['load_s']:>7.2f} {r['score_s']:>8.2f} {r['cpu_s']:>7.2f} {r['rows'] / r['score_s']:>11,.0f} {r['rss_peak_mb']:>13,.0f} {extra:>10,.0f}"
              f" {base['score_s'] / r['score_s']:>15.2f}x {extra / base_extra if base_extra > 0 else float('nan'):>19.2f}x")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--chunk-rows", type=int, default=100_000)
    parser.add_argument("--repeats", type=int, default=2, help="attempts per variant, interleaved; the fastest is reported")
    parser.add_argument("--variant"); parser.add_argument("--model"); parser.add_argument("--input"); parser.add_argument("--output")
    args = parser.parse_args()
    if args.variant:  # a child process: measure one variant
        print(json.dumps(run_variant(args.variant, args.model, args.input, args.output, args.chunk_rows))); return
    with tempfile.TemporaryDirectory(prefix="mlwb-bench-batch-") as tmp:
        folder = Path(tmp)
        model, data = build(folder, args.rows)
        print(f"input: {data.stat().st_size / 2**20:.0f} MiB Parquet, {args.rows:,} rows; CPUs: {os.cpu_count()}, load average {os.getloadavg()[0]:.1f}, "
              f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}")
        best = {}
        for attempt in range(args.repeats):
            for variant in ("pyfunc", "mlwb", "mlwb+proba"):
                r = measure(variant, model, data, folder / f"{variant}.parquet", args.chunk_rows)
                print(f"  attempt {attempt + 1} {variant:<11} score {r['score_s']:.2f} s (CPU {r['cpu_s']:.2f} s), peak RSS {r['rss_peak_mb']:,.0f} MiB", flush=True)
                if variant not in best or r["score_s"] < best[variant]["score_s"]: best[variant] = r
        check_same(folder)
        report(best, args.rows, args.chunk_rows)


if __name__ == "__main__":
    main()
