"""mlwb monitor at scale: 3,000,000 rows x 1,000 columns streamed from Parquet, Evidently at the largest size it
finishes in 15 minutes, and 10,000,000 rows through the Dask path.

    .venv/bin/python benchmarks/monitor/bench_scale.py                     # the full benchmark (hours of Evidently)
    .venv/bin/python benchmarks/monitor/bench_scale.py --rows 200000 --dask-rows 400000 --evidently-rows 5000 20000

The data is generated deterministically, chunk by chunk, and written once as Parquet (float32 numbers, pandas
categoricals; row groups of --row-group rows): 900 numeric columns (normal, log-normal, gamma, uniform, Poisson
counts) and 100 categorical ones (3 to 12 levels); in the current data 10 of them are shifted (SHIFTED). The
reference is what training would profile once: its profile is fitted column group by column group (so the
reference never has to fit in memory whole) and saved as the JSON file that mlwb stores with a model.

Then, each in its own measurement (wall and CPU seconds, peak rise of resident memory sampled every 5 ms):
1. mlwb: `monitor_stream` of the current Parquet file against the stored profile, in this process;
2. Evidently 0.7 (`DataDriftPreset`, its own virtual environment, see bench_monitor.py) on the first N rows of
   both frames, for each N of --evidently-rows in turn, each under a 15-minute limit, and mlwb on the same rows;
   the largest N that Evidently finishes gives the ratio;
3. the Dask path: --dask-rows rows through `monitor_stream` on a local cluster of --workers processes and
   through the local path, checking that both flag the same columns and hold identical profiles.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_monitor import EVIDENTLY_SCRIPT, PeakMemory, ensure_evidently  # noqa: E402

N_NUMERIC, N_CATEGORICAL = 900, 100
SHIFTED = {"num_000": "normal mean +0.5 sd", "num_001": "normal scale x1.5", "num_002": "log-normal median x1.5",
           "num_003": "gamma shape 2 -> 3", "num_004": "uniform range moved by a fifth",
           "num_005": "Poisson rate +30%", "num_006": "normal mean +0.3 sd",
           "cat_000": "first level 0.20 -> 0.45", "cat_001": "levels reversed", "cat_002": "a quarter of rows moved"}
EVIDENTLY_LIMIT_S = 15 * 60


def numeric_column(rng, i: int, n: int, shifted: bool) -> np.ndarray:
    "Numeric column `i` (float32); the current data moves it when `shifted` and it is in SHIFTED."
    move = shifted and f"num_{i:03d}" in SHIFTED
    kind, scale = i % 5, 1 + (i % 17) / 10
    if i == 0 or i == 6: return (rng.normal(10, scale, n) + (0.5 if i == 0 else 0.3) * scale * move).astype("float32")
    if i == 1: return rng.normal(0, scale * (1.5 if move else 1.0), n).astype("float32")
    if i == 2: return np.exp(rng.normal(3 + np.log(1.5) * move, 0.8, n)).astype("float32")
    if i == 3: return rng.gamma(3.0 if move else 2.0, scale, n).astype("float32")
    if i == 4: return rng.uniform(0.2 * move, 1 + 0.2 * move, n).astype("float32")
    if i == 5: return rng.poisson(5 * (1.3 if move else 1.0), n).astype("float32")
    if kind == 0: return rng.normal(i, scale, n).astype("float32")
    if kind == 1: return np.exp(rng.normal(1, 0.5 + (i % 7) / 10, n)).astype("float32")
    if kind == 2: return rng.gamma(1 + i % 4, scale, n).astype("float32")
    if kind == 3: return rng.uniform(-scale, scale, n).astype("float32")
    return rng.poisson(1 + i % 9, n).astype("float32")


def category_mix(i: int, shifted: bool) -> np.ndarray:
    "The shares of the levels of categorical column `i`."
    levels = 3 + i % 10
    p = np.arange(levels, 0, -1, dtype=float); p /= p.sum()
    if i == 0: p = np.r_[0.45 if shifted else 0.20, np.full(levels - 1, (0.55 if shifted else 0.80) / (levels - 1))]
    if i == 1 and shifted: p = p[::-1]
    if i == 2 and shifted: p = np.r_[p[0] - 0.25, p[1:-1], p[-1] + 0.25]
    return p


def categorical_column(rng, i: int, n: int, shifted: bool) -> pd.Categorical:
    p = category_mix(i, shifted)
    return pd.Categorical.from_codes(rng.choice(len(p), n, p=p), categories=[f"level_{j}" for j in range(len(p))])


def make_chunk(n: int, seed: int, chunk: int, shifted: bool, width: tuple = (N_NUMERIC, N_CATEGORICAL)) -> pd.DataFrame:
    "Rows of chunk `chunk` of a frame (`width`: numeric and categorical columns): its own seed, so any chunk can be made alone."
    rng = np.random.default_rng([seed, chunk])
    columns = {f"num_{i:03d}": numeric_column(rng, i, n, shifted) for i in range(width[0])}
    columns |= {f"cat_{i:03d}": categorical_column(rng, i, n, shifted) for i in range(width[1])}
    return pd.DataFrame(columns)


def write_frame(path: Path, rows: int, seed: int, shifted: bool, row_group: int,
                width: tuple = (N_NUMERIC, N_CATEGORICAL)) -> Path:
    "Write `rows` rows to Parquet at `path`, one row group at a time (memory: one row group); kept if already there."
    import pyarrow as pa
    import pyarrow.parquet as pq
    if path.exists() and pq.ParquetFile(path).metadata.num_rows == rows: return path
    writer = None
    for chunk, start in enumerate(range(0, rows, row_group)):
        frame = make_chunk(min(row_group, rows - start), seed, chunk, shifted, width)
        table = pa.Table.from_pandas(frame, preserve_index=False)
        writer = writer or pq.ParquetWriter(path, table.schema)
        writer.write_table(table, row_group_size=row_group)
    writer.close()
    return path


def fit_reference_profile(path: Path, out: Path, group: int = 100):
    "The reference profile of the Parquet file at `path`, fitted `group` columns at a time, saved to `out`."
    import pyarrow.parquet as pq
    from mlwb.monitor import ReferenceProfile, fit_reference
    from mlwb.profile_store import save_reference
    names = pq.read_schema(path).names
    kinds, columns, rows = {}, {}, 0
    for start in range(0, len(names), group):
        part = fit_reference(pd.read_parquet(path, columns=names[start:start + group]))
        kinds |= part.kinds; columns |= part.columns; rows = part.rows
    profile = ReferenceProfile(kinds, columns, rows)
    save_reference(profile, out)
    return profile


def measure(function):
    "`(result, seconds, CPU seconds, peak MiB)` of calling `function`."
    with PeakMemory() as memory:
        started, cpu = time.perf_counter(), time.process_time()
        result = function()
        seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
    return result, seconds, cpu, memory.mib


def run_mlwb_stream(profile, path: Path, client=None) -> dict:
    from mlwb.stream import monitor_stream
    result, seconds, cpu, mib = measure(lambda: monitor_stream(profile, path, client=client, progress=sys.stderr.isatty()))
    return {"result": result, "seconds": seconds, "cpu_seconds": cpu, "peak_mib": mib,
            "flagged": sorted(result.windows[0].drifted_features)}


def head_parquet(path: Path, rows: int, out: Path) -> Path:
    "The first `rows` rows of the Parquet file at `path`, as a file of their own."
    import pyarrow as pa
    import pyarrow.parquet as pq
    batches, have = [], 0
    for batch in pq.ParquetFile(path).iter_batches(batch_size=min(rows, 20_000)):  # never the whole file
        batches.append(batch.slice(0, rows - have)); have += len(batches[-1])
        if have >= rows: break
    pq.write_table(pa.Table.from_batches(batches), out)
    return out


def run_evidently(python: Path, reference: Path, current: Path) -> dict | None:
    "Evidently's DataDriftPreset on the two files, or None when it does not finish within the limit."
    try:
        out = subprocess.run([str(python), "-c", EVIDENTLY_SCRIPT, str(reference), str(current), str(HERE)],
                             capture_output=True, text=True, timeout=EVIDENTLY_LIMIT_S)
    except subprocess.TimeoutExpired:
        return None
    if out.returncode != 0: raise SystemExit(f"Evidently failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def compare_with_evidently(sizes: list, reference: Path, current: Path, tmp: Path) -> list:
    "For each size in turn: Evidently and mlwb (in memory) on the first rows; stops at Evidently's first time-out."
    from mlwb.monitor import monitor
    python, rows = ensure_evidently(), []
    for n in sorted(sizes):
        ref_n, cur_n = head_parquet(reference, n, tmp / f"ref-{n}.parquet"), head_parquet(current, n, tmp / f"cur-{n}.parquet")
        evidently = run_evidently(python, ref_n, cur_n)
        frames = pd.read_parquet(ref_n), pd.read_parquet(cur_n)
        result, seconds, cpu, mib = measure(lambda: monitor(*frames))
        rows.append({"rows": n, "evidently": evidently, "mlwb": {"seconds": seconds, "cpu_seconds": cpu, "peak_mib": mib,
                                                                 "flagged": sorted(result.windows[0].drifted_features)}})
        print_evidently_row(rows[-1])
        if evidently is None: break
    return rows


def print_evidently_row(row: dict):
    e, m = row["evidently"], row["mlwb"]
    if e is None:
        print(f"  {row['rows']:>10,} rows: Evidently did not finish within {EVIDENTLY_LIMIT_S / 60:.0f} minutes; mlwb {m['seconds']:.2f} s", flush=True)
        return
    print(f"  {row['rows']:>10,} rows: Evidently {e['seconds']:.1f} s, {e['peak_mib']:.0f} MiB, flags {len(e['flagged'])} "
          f"(exactly the shifted: {e['flagged'] == sorted(SHIFTED)}); mlwb {m['seconds']:.2f} s, {m['peak_mib']:.0f} MiB, "
          f"flags {len(m['flagged'])}; ratio {e['seconds'] / m['seconds']:.0f}x wall, {e['cpu_seconds'] / m['cpu_seconds']:.0f}x CPU",
          flush=True)


def narrower(profile, names: list):
    "The reference profile of the columns `names` only (a narrower table's reference)."
    from mlwb.monitor import ReferenceProfile
    return ReferenceProfile({n: profile.kinds[n] for n in names}, {n: profile.columns[n] for n in names}, profile.rows)


def dask_path(profile, path: Path, workers: int) -> dict:
    "The local and the Dask path on the same file: time, flags, identical profiles."
    import pyarrow.parquet as pq
    from mlwb.stream import dask_client, identical_profiles
    profile = narrower(profile, pq.read_schema(path).names)
    local = run_mlwb_stream(profile, path)
    with dask_client(workers=workers) as client:
        try: remote = run_mlwb_stream(profile, path, client)
        finally: client.cluster.close()
    return {"local": local, "dask": remote, "identical": identical_profiles(local["result"], remote["result"])}


def report(label: str, run: dict):
    print(f"{label}: {run['seconds']:.1f} s wall, {run['cpu_seconds']:.1f} CPU s, peak rise {run['peak_mib']:.0f} MiB; "
          f"flags {', '.join(run['flagged'])}; exactly the shifted columns: {run['flagged'] == sorted(SHIFTED)}", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=3_000_000, help="current rows for the main measurement")
    parser.add_argument("--reference-rows", type=int, default=500_000, help="rows of the reference (profiled once)")
    parser.add_argument("--row-group", type=int, default=20_000, help="rows per Parquet row group (memory grows with it)")
    parser.add_argument("--evidently-rows", type=int, nargs="*", default=[10_000, 30_000, 100_000, 300_000, 1_000_000])
    parser.add_argument("--dask-rows", type=int, default=10_000_000, help="current rows through the Dask path (0: skip)")
    parser.add_argument("--workers", type=int, default=2, help="Dask worker processes")
    parser.add_argument("--dask-columns", type=int, nargs=2, default=[N_NUMERIC, N_CATEGORICAL],
                        metavar=("NUMERIC", "CATEGORICAL"), help="the Dask run's columns (the first ones of each kind)")
    parser.add_argument("--skip-stream", action="store_true", help="skip step 1 (the --rows measurement)")
    parser.add_argument("--data", type=Path, help="folder to keep the generated Parquet files in (default: a temporary one)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        tmp = args.data or Path(scratch)
        tmp.mkdir(parents=True, exist_ok=True)
        print(f"data: {N_NUMERIC + N_CATEGORICAL} columns ({N_NUMERIC} numeric, {N_CATEGORICAL} categorical), shifted: "
              f"{', '.join(SHIFTED)}; cores: {os.cpu_count()}, load average {os.getloadavg()[0]:.1f}", flush=True)
        started = time.perf_counter()
        reference = write_frame(tmp / "reference.parquet", args.reference_rows, 1, False, args.row_group)
        current = write_frame(tmp / "current.parquet", args.rows, 2, True, args.row_group)
        print(f"written: {args.reference_rows:,} reference and {args.rows:,} current rows in {time.perf_counter() - started:.0f} s "
              f"({current.stat().st_size / 2**30:.2f} GiB current)", flush=True)
        profile, seconds, cpu, mib = measure(lambda: fit_reference_profile(reference, tmp / "reference_profile.json"))
        size = (tmp / "reference_profile.json").stat().st_size
        print(f"reference profile (once, at training): {seconds:.1f} s, peak rise {mib:.0f} MiB, {size / 2**20:.1f} MiB of JSON", flush=True)
        if not args.skip_stream: report(f"mlwb, {args.rows:,} rows streamed", run_mlwb_stream(profile, current))
        if args.evidently_rows:
            print("Evidently against mlwb (in memory), growing sizes:", flush=True)
            compare_with_evidently(args.evidently_rows, reference, current, tmp)
        if args.dask_rows:
            width = tuple(args.dask_columns)
            big = write_frame(tmp / f"current-dask-{width[0]}-{width[1]}.parquet", args.dask_rows, 3, True,
                              args.row_group, width)
            runs = dask_path(profile, big, args.workers)
            report(f"local path, {args.dask_rows:,} rows", runs["local"])
            report(f"Dask path ({args.workers} workers), {args.dask_rows:,} rows", runs["dask"])
            print(f"same flags: {runs['local']['flagged'] == runs['dask']['flagged']}; identical profiles: {runs['identical']}")
    print(f"load average at the end: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
