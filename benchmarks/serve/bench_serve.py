"""`mlwb serve` against `mlflow models serve` on the same registered model, the same single-row requests, one client.

Run from the repository root:  .venv/bin/python benchmarks/serve/bench_serve.py [--seconds 8] [--concurrency 1 8 64]

It trains a histogram-gradient-boosting model in a temporary workspace, registers it as `bench@champion`, starts
`mlwb serve` and `mlflow models serve` (default: 1 worker; tuned: 2 workers with OMP_NUM_THREADS=1) on free loopback
ports, and drives each with wrk (installed with apt-get when missing) at each concurrency, one connection per
concurrent client, keep-alive, all sending the same one-row JSON body. It prints requests/s, p50 and p99 and the ratios.

Why wrk: on a 2-core machine the load generator competes with the server for CPU. A Python asyncio client spends
~100 µs of interpreter time per request -- as much as the server it measures -- so it caps and distorts the numbers;
wrk is a C event loop that costs a few µs per request and reports latency percentiles itself.
"""
import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PYTHON = Path(sys.executable)
BIN = PYTHON.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ensure_wrk() -> str:
    "The path of wrk, installed with apt-get if missing (we run as root)."
    if shutil.which("wrk"): return shutil.which("wrk")
    print("installing wrk with apt-get ...", flush=True)
    subprocess.run(["apt-get", "install", "-y", "wrk"], check=True, capture_output=True)
    return shutil.which("wrk")


def train_and_register(ws: Path) -> tuple:
    "A HistGradientBoosting pipeline on card-like rows, registered as bench@champion; returns (tracking URI, one row)."
    import numpy as np
    import pandas as pd
    import mlflow
    import mlflow.sklearn
    from mlflow.models import infer_signature
    from sklearn.compose import ColumnTransformer
    from sklearn.ensemble import HistGradientBoostingClassifier
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import OneHotEncoder
    rng = np.random.default_rng(0)
    n = 5_000
    X = pd.DataFrame({"amount": rng.gamma(2, 30, n).round(2), "hour": rng.integers(0, 24, n), "distance_km": rng.exponential(10, n).round(3),
                      "category": rng.choice(["food", "travel", "online", "fuel", "other"], n)})
    y = ((X.amount > 90) & (X.hour < 6) | (rng.random(n) < 0.02)).astype(int)
    features = ColumnTransformer([("cat", OneHotEncoder(handle_unknown="ignore"), ["category"]), ("num", "passthrough", ["amount", "hour", "distance_km"])])
    model = Pipeline([("features", features), ("model", HistGradientBoostingClassifier(max_iter=100, random_state=0))]).fit(X, y)
    uri = f"sqlite:///{ws / 'mlruns' / 'mlflow.db'}"
    (ws / "mlruns").mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(uri); mlflow.set_registry_uri(uri)
    experiment = mlflow.create_experiment("bench", artifact_location=(ws / "mlruns" / "artifacts").as_uri())
    with mlflow.start_run(experiment_id=experiment):
        info = mlflow.sklearn.log_model(model, name="model", signature=infer_signature(X, model.predict(X)), input_example=X.head(5),
                                        serialization_format="cloudpickle", pip_requirements=[])
    version = mlflow.register_model(info.model_uri, "bench")
    mlflow.register_model(info.model_uri, "bench")  # version 2, for the alias-swap measurement
    mlflow.MlflowClient().set_registered_model_alias("bench", "champion", version.version)
    return uri, json.loads(X.head(1).to_json(orient="records"))[0]


def wait_for(url: str, process, timeout: float = 180.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None: raise RuntimeError(f"{url}: server exited ({process.returncode})")
        try:
            with urllib.request.urlopen(url, timeout=1) as r:
                if r.status == 200: return
        except OSError: pass
        time.sleep(0.1)
    raise RuntimeError(f"{url}: not ready within {timeout} s")


def start(name: str, command: list, env: dict, ready_url: str):
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try: wait_for(ready_url, process)
    except Exception: stop(process); raise
    print(f"  {name}: ready", flush=True)
    return process


def stop(process):
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try: process.wait(20)
        except subprocess.TimeoutExpired: os.killpg(process.pid, signal.SIGKILL); process.wait()


LUA = """wrk.method = "POST"
wrk.body = [[%s]]
wrk.headers["Content-Type"] = "application/json"
"""

UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3}


def parse_wrk(text: str) -> dict:
    "req/s, p50 and p99 (ms) and the count of failed requests from wrk's --latency output."
    def latency(p):
        m = re.search(rf"^\s+{p}%\s+([\d.]+)(us|ms|s|m)\s*$", text, re.M)
        return float(m.group(1)) * UNITS[m.group(2)] if m else float("nan")
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", text).group(1))
    errors = sum(int(x) for x in re.findall(r"Non-2xx or 3xx responses: (\d+)", text))
    socket_errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    errors += sum(int(x) for x in socket_errors.groups()) if socket_errors else 0
    return {"rps": rps, "p50": latency(50), "p99": latency(99), "errors": errors}


def cpu_seconds(group: int) -> float:
    "User + system CPU seconds used so far by every process of process group `group` (a server and its workers)."
    total = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try: fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError: continue
        if int(fields[2]) == group: total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def drive(wrk: str, url: str, script: Path, concurrency: int, seconds: float, group: int | None = None) -> dict:
    "Load `url` with wrk; add the server's CPU time per request (robust to other load on the machine)."
    command = [wrk, "-t", "1", "-c", str(concurrency), "-d", f"{max(1, round(seconds))}s", "--timeout", "10s", "--latency", "-s", str(script), url]
    before = cpu_seconds(group) if group else 0.0
    done = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    result = parse_wrk(done)
    requests = int(re.search(r"(\d+) requests in", done).group(1))
    result["cpu_ms"] = (cpu_seconds(group) - before) * 1000 / max(requests, 1) if group else float("nan")
    return result


REFUSING_LUA = LUA + """
refused = 0
response = function(status, headers, body)
  if status == 503 then
    refused = refused + 1
    if refused >= 20 then wrk.thread:stop() end  -- a client that was refused 20 times goes elsewhere
  end
end
"""


def lost(text: str) -> dict:
    "Requests wrk sent and got no answer for (read/write errors, timeouts), refusals, and answers."
    socket = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    connect, read, write, timeout = map(int, socket.groups()) if socket else (0, 0, 0, 0)
    refused = sum(int(x) for x in re.findall(r"Non-2xx or 3xx responses: (\d+)", text))
    answered = int(re.search(r"(\d+) requests in", text).group(1))
    return {"lost": read + write + timeout, "connect_errors": connect, "refused": refused, "answered": answered}


def metadata_version(base: str) -> str:
    with urllib.request.urlopen(f"{base}/metadata", timeout=5) as r: return json.load(r)["version"]


def lifecycle(wrk: str, make, d: Path, uri: str, seconds: float) -> dict:
    "Requests lost while `mlwb serve` swaps a moved alias under wrk load, and while it shuts down under load."
    import mlflow
    command, env, ready, url = make(free_port())
    base = url.rsplit("/", 1)[0]
    process = start("mlwb serve (following)", command + ["--follow-every", "0.5"], env, ready)
    lua = Path(d) / "refusing.lua"
    lua.write_text(REFUSING_LUA % json.dumps({"dataframe_records": [ROW[0]]}))
    load = lambda duration: subprocess.Popen([wrk, "-t", "16", "-c", "16", "-d", f"{duration}s", "--timeout", "10s",
                                              "-s", str(lua), url], stdout=subprocess.PIPE, text=True)
    try:
        running = load(max(20, round(seconds)))  # long enough to cover loading version 2 beside 1
        client = mlflow.MlflowClient(uri, uri)
        client.set_registered_model_alias("bench", "champion", "2")
        deadline = time.monotonic() + 120
        while metadata_version(base) != "2":
            if time.monotonic() > deadline: raise RuntimeError("the server did not follow the alias to version 2")
            time.sleep(0.05)
        if running.poll() is not None: raise RuntimeError("wrk ended before the swap: no load to measure")
        swap = lost(running.communicate()[0])
        client.set_registered_model_alias("bench", "champion", "1")
        running = load(max(4, round(seconds)))
        time.sleep(1.0)  # a second of load before the signal
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(60)
        shutdown = lost(running.communicate()[0])
    finally: stop(process)
    return {"swap": swap, "shutdown": {**shutdown, "exit_code": process.returncode}}


ROW = []


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=8.0, help="seconds of load per server and concurrency")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 64])
    parser.add_argument("--lifecycle-only", action="store_true",
                        help="only measure the requests lost during an alias swap and a shutdown")
    args = parser.parse_args()
    wrk = ensure_wrk()
    results = {}
    with tempfile.TemporaryDirectory() as d:
        ws = Path(d) / "ws"
        ws.mkdir()
        shutil.copy(REPO / "settings.ini", ws / "settings.ini")
        print("training and registering bench@champion ...", flush=True)
        uri, row = train_and_register(ws)
        script = Path(d) / "post.lua"
        script.write_text(LUA % json.dumps({"dataframe_records": [row]}))  # a body both servers accept
        ROW.append(row)
        base_env = {k: v for k, v in os.environ.items() if not k.startswith("MLWB_")}
        base_env.update(MLFLOW_TRACKING_URI=uri, MLFLOW_REGISTRY_URI=uri, MLWB_WORKSPACE=str(ws), PATH=f"{BIN}:{os.environ.get('PATH', '')}")  # mlflow runs `uvicorn` from PATH
        servers = {
            "mlwb serve": lambda p: ([str(BIN / "mlwb"), "serve", "models:/bench@champion", "--port", str(p), "--log-dir", str(Path(d) / "requests")],
                                     base_env, f"http://127.0.0.1:{p}/health/ready", f"http://127.0.0.1:{p}/predict"),
            "mlflow default": lambda p: ([str(BIN / "mlflow"), "models", "serve", "-m", "models:/bench@champion", "-p", str(p), "--env-manager", "local"],
                                         base_env, f"http://127.0.0.1:{p}/ping", f"http://127.0.0.1:{p}/invocations"),
            "mlflow tuned": lambda p: ([str(BIN / "mlflow"), "models", "serve", "-m", "models:/bench@champion", "-p", str(p), "--env-manager", "local", "-w", "2"],
                                       {**base_env, "OMP_NUM_THREADS": "1"}, f"http://127.0.0.1:{p}/ping", f"http://127.0.0.1:{p}/invocations"),
        }
        for name, make in ({} if args.lifecycle_only else servers).items():
            command, env, ready, url = make(free_port())
            process = start(name, command, env, ready)
            try:
                drive(wrk, url, script, 8, 2)  # warm-up
                for c in args.concurrency:
                    results[(name, c)] = r = drive(wrk, url, script, c, args.seconds, process.pid)
                    print(f"  {name:<15} c={c:<3} {r['rps']:>9.1f} req/s  p50 {r['p50']:>8.2f} ms  p99 {r['p99']:>8.2f} ms  "
                          f"server CPU {r['cpu_ms']:.3f} ms/req  errors {r['errors']}", flush=True)
            finally: stop(process)
        print("mlwb serve: an alias swap and a SIGTERM under wrk load (16 connections) ...", flush=True)
        events = lifecycle(wrk, servers["mlwb serve"], Path(d), uri, args.seconds)
    if results: report(results, args.concurrency)
    print(f"\n| event under load (wrk, 16 connections) | responses | of them 503 | lost | connect errors |"
          f"\n|---|---|---|---|---|")
    for name, e in events.items():
        print(f"| {name} | {e['answered']} | {e['refused']} | {e['lost']} | {e['connect_errors']} |")
    print(f"\nrequests lost during the alias swap: {events['swap']['lost']}; during shutdown: "
          f"{events['shutdown']['lost']} (server exit code {events['shutdown']['exit_code']})")


def report(results: dict, concurrencies: list):
    print(f"\nload average: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs\n")
    print(f"| server | concurrency | req/s | p50 ms | p99 ms | server CPU ms/req | errors |\n|---|---|---|---|---|---|---|")
    for (name, c), r in results.items(): print(f"| {name} | {c} | {r['rps']:.0f} | {r['p50']:.2f} | {r['p99']:.2f} | {r['cpu_ms']:.3f} | {r['errors']} |")
    print("\n| concurrency | mlwb / mlflow default (req/s) | mlwb / mlflow tuned (req/s) | CPU per request: mlflow default / mlwb | mlflow tuned / mlwb |\n|---|---|---|---|---|")
    for c in concurrencies:
        ours, default, tuned = results[("mlwb serve", c)], results[("mlflow default", c)], results[("mlflow tuned", c)]
        print(f"| {c} | {ours['rps'] / default['rps']:.1f}x | {ours['rps'] / tuned['rps']:.1f}x | {default['cpu_ms'] / ours['cpu_ms']:.1f}x | {tuned['cpu_ms'] / ours['cpu_ms']:.1f}x |")
    best_tuned = max(results[("mlflow tuned", c)]["rps"] for c in concurrencies)
    top = max(concurrencies)
    print(f"\nat concurrency {top}: mlwb {results[('mlwb serve', top)]['rps']:.0f} req/s = "
          f"{results[('mlwb serve', top)]['rps'] / results[('mlflow default', top)]['rps']:.1f}x mlflow default; "
          f"{results[('mlwb serve', top)]['rps'] / best_tuned:.1f}x the best tuned mlflow ({best_tuned:.0f} req/s); "
          f"mlwb p99 {results[('mlwb serve', top)]['p99']:.1f} ms; mlwb p50 at concurrency {min(concurrencies)}: {results[('mlwb serve', min(concurrencies))]['p50']:.2f} ms")


if __name__ == "__main__":
    main()
