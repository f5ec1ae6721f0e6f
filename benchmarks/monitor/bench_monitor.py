"""mlwb monitor against Evidently's data-drift report: the same 1,000,000 x 50 reference and current frames, one command.

    .venv/bin/python benchmarks/monitor/bench_monitor.py            # the full benchmark (1,000,000 rows)
    .venv/bin/python benchmarks/monitor/bench_monitor.py --rows 100000

The data is generated deterministically (40 numeric and 10 categorical columns; the current frame has a
known shift in 5 of them), written to Parquet once, then checked by mlwb.monitor in this process and by
Evidently 0.7 in a subprocess of its own virtual environment (benchmarks/.envs/evidently, created on
first use with `python3.11 -m venv` + pip; Evidently does not import under pandas 3 and is never a
dependency of mlwb). Both are timed on frames already in memory, in wall-clock seconds and in CPU seconds
of the process (all its threads; a fairer number on a busy machine); peak memory is the largest rise of
the process's resident memory over its size before the check, sampled every 5 ms.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd

HERE = Path(__file__).resolve().parent
ENV = HERE.parent / ".envs" / "evidently"
EVIDENTLY = ["evidently==0.7.23", "pandas<3", "pyarrow"]
N_NUMERIC, N_CATEGORICAL = 40, 10
SHIFTED = {"num_00": "mean +0.5 sd", "num_01": "scale x1.5", "num_02": "log-normal median x1.5",
           "cat_00": "prior: first level 0.20 -> 0.45", "cat_01": "prior: levels reversed"}


def rss_bytes() -> int:
    "This process's resident memory."
    with open("/proc/self/statm") as f: return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakMemory:
    "Largest rise of resident memory above its level at entry, sampled every 5 ms in a thread."
    def __enter__(self):
        self.base = self.peak = rss_bytes(); self.running = True
        self.thread = threading.Thread(target=self._poll, daemon=True); self.thread.start()
        return self
    def _poll(self):
        while self.running: self.peak = max(self.peak, rss_bytes()); time.sleep(0.005)
    def __exit__(self, *exc):
        self.running = False; self.thread.join(); self.peak = max(self.peak, rss_bytes())
    @property
    def mib(self) -> float: return (self.peak - self.base) / 2**20


def _numeric(rng, i: int, n: int, shifted: bool) -> np.ndarray:
    "Numeric column `i`: a mix of normal, log-normal, gamma, uniform and count columns."
    kind = i % 5
    if kind == 0: return rng.normal(10 + i, 1 + i / 10, n) + (0.5 * (1 + i / 10) if shifted and i == 0 else 0)
    if kind == 1: return rng.normal(0, 1.5 if shifted and i == 1 else 1.0, n) * (1 + i / 20)
    if kind == 2: return np.exp(rng.normal(3 + np.log(1.5) * (shifted and i == 2), 0.8, n))
    if kind == 3: return rng.gamma(2.0, 1 + i / 10, n)
    return rng.poisson(3 + i / 10, n).astype("float64")


def _categorical(rng, i: int, n: int, shifted: bool) -> pd.Categorical:
    "Categorical column `i` with 3 to 12 levels and a skewed mix; two of them shifted in the current frame."
    levels = [f"level_{j}" for j in range(3 + i)]
    p = np.arange(len(levels), 0, -1, dtype=float); p /= p.sum()
    if i == 0: p = np.r_[0.20, np.full(len(levels) - 1, 0.80 / (len(levels) - 1))] if not shifted else np.r_[0.45, np.full(len(levels) - 1, 0.55 / (len(levels) - 1))]
    if shifted and i == 1: p = p[::-1]
    return pd.Categorical.from_codes(rng.choice(len(levels), n, p=p), categories=levels)


def make_frame(n: int, seed: int, shifted: bool) -> pd.DataFrame:
    "A deterministic frame of `n` rows; `shifted` moves the columns named in SHIFTED."
    rng = np.random.default_rng(seed)
    columns = {f"num_{i:02d}": _numeric(rng, i, n, shifted) for i in range(N_NUMERIC)}
    return pd.DataFrame(columns | {f"cat_{i:02d}": _categorical(rng, i, n, shifted) for i in range(N_CATEGORICAL)})


EVIDENTLY_SCRIPT = r"""
import json, sys, time, warnings
warnings.filterwarnings("ignore")
sys.path.insert(0, sys.argv[3])
from bench_monitor import PeakMemory
import pandas as pd
from evidently import DataDefinition, Dataset, Report
from evidently.presets import DataDriftPreset
reference, current = pd.read_parquet(sys.argv[1]), pd.read_parquet(sys.argv[2])
definition = DataDefinition(numerical_columns=[c for c in reference if c.startswith("num_")],
                            categorical_columns=[c for c in reference if c.startswith("cat_")])
with PeakMemory() as memory:
    started, cpu = time.perf_counter(), time.process_time()
    snapshot = Report([DataDriftPreset()]).run(Dataset.from_pandas(current, data_definition=definition),
                                               Dataset.from_pandas(reference, data_definition=definition))
    seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
flagged = []
for metric in snapshot.dict()["metrics"]:
    config = metric["config"]
    if config.get("type", "").endswith("ValueDrift"):
        p_value_method = "p_value" in config["method"]
        drifted = metric["value"] < config["threshold"] if p_value_method else metric["value"] >= config["threshold"]
        if drifted: flagged.append(config["column"])
methods = sorted({m["config"]["method"] for m in snapshot.dict()["metrics"] if m["config"].get("type", "").endswith("ValueDrift")})
print(json.dumps({"seconds": seconds, "cpu_seconds": cpu, "peak_mib": memory.mib, "flagged": sorted(flagged), "methods": methods}))
"""


def ensure_evidently() -> Path:
    "The Evidently environment's python, created on first use."
    python = ENV / "bin" / "python"
    if not python.exists():
        print(f"creating {ENV} (once) ...", flush=True)
        subprocess.run(["python3.11", "-m", "venv", str(ENV)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", *EVIDENTLY], check=True)
    return python


def run_mlwb(reference: pd.DataFrame, current: pd.DataFrame, out: Path) -> dict:
    "mlwb.monitor on the frames in memory: time, peak memory, flagged columns; then the report's time."
    from mlwb.monitor import monitor
    from mlwb.report import write_report
    monitor(reference.head(1000), current.head(1000))  # warm-up: imports (scipy) and first-call costs
    with PeakMemory() as memory:
        started, cpu = time.perf_counter(), time.process_time()
        result = monitor(reference, current)
        seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
    started = time.perf_counter()
    write_report(result, out)
    return {"seconds": seconds, "cpu_seconds": cpu, "peak_mib": memory.mib, "flagged": sorted(result.windows[0].drifted_features),
            "report_seconds": time.perf_counter() - started, "exit_code": result.exit_code}


def run_evidently(python: Path, reference: Path, current: Path) -> dict:
    "Evidently's DataDriftPreset in its own environment, on the same Parquet files."
    out = subprocess.run([str(python), "-c", EVIDENTLY_SCRIPT, str(reference), str(current), str(HERE)],
                         capture_output=True, text=True, timeout=3600)
    if out.returncode != 0: raise SystemExit(f"Evidently failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--skip-evidently", action="store_true", help="time mlwb only")
    args = parser.parse_args()
    python = None if args.skip_evidently else ensure_evidently()
    print(f"data: {args.rows:,} rows x {N_NUMERIC + N_CATEGORICAL} columns ({N_NUMERIC} numeric, {N_CATEGORICAL} categorical); "
          f"shifted: {', '.join(f'{c} ({how})' for c, how in SHIFTED.items())}", flush=True)
    reference, current = make_frame(args.rows, 1, False), make_frame(args.rows, 2, True)
    with tempfile.TemporaryDirectory() as tmp:
        paths = Path(tmp, "reference.parquet"), Path(tmp, "current.parquet")
        reference.to_parquet(paths[0]); current.to_parquet(paths[1])
        reference, current = pd.read_parquet(paths[0]), pd.read_parquet(paths[1])  # both tools get what Parquet gives back
        mlwb = run_mlwb(reference, current, Path(tmp, "report"))
        evidently = None if python is None else run_evidently(python, *paths)
    expected = sorted(SHIFTED)
    print(f"cores: {os.cpu_count()}; load average now: {os.getloadavg()[0]:.1f} (other processes slow both tools alike)")
    print(f"{'tool':<10} {'seconds':>8} {'CPU s':>7} {'peak MiB':>9}  flagged")
    print(f"{'mlwb':<10} {mlwb['seconds']:>8.2f} {mlwb['cpu_seconds']:>7.2f} {mlwb['peak_mib']:>9.0f}  {', '.join(mlwb['flagged'])}")
    print(f"  (mlwb's HTML report with its plots, written after: {mlwb['report_seconds']:.2f} s; exit code {mlwb['exit_code']})")
    if evidently:
        print(f"{'evidently':<10} {evidently['seconds']:>8.2f} {evidently['cpu_seconds']:>7.2f} {evidently['peak_mib']:>9.0f}  {', '.join(evidently['flagged'])}")
        print(f"  (Evidently's methods: {', '.join(evidently['methods'])})")
        print(f"speed-up: mlwb is {evidently['seconds'] / mlwb['seconds']:.1f}x faster in wall time, "
              f"{evidently['cpu_seconds'] / mlwb['cpu_seconds']:.1f}x in CPU time")
    print(f"mlwb flags exactly the shifted columns: {mlwb['flagged'] == expected}")
    if evidently: print(f"Evidently flags exactly the shifted columns: {evidently['flagged'] == expected}")


if __name__ == "__main__":
    main()
