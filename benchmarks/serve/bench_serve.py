"""`mlwb serve` against `mlflow models serve` and MLServer on the same registered models, the same requests, one client.

Run from the repository root:  .venv/bin/python benchmarks/serve/bench_serve.py [--seconds 8] [--parts ...]

Parts (all by default; see README.md):
  classic    mlwb serve against mlflow models serve (default and tuned) on a 4-column model, one-row bodies
  lifecycle  requests lost while mlwb serve swaps a moved alias and while it shuts down, under load
  protocols  mlwb serve on a 30-column model (50,000 training rows) through /predict, MLflow's /invocations
             and the Open Inference Protocol's /v2/models/{name}/infer, and MLServer 1.7.1 (adaptive batching,
             in its own virtual environment, benchmarks/serve/.mlserver-venv) on the same model and OIP body
  torch      a PyTorch MLP pipeline served by mlwb serve (TorchScript fast path) and by mlflow models serve
  overload   mlwb serve on one CPU (the load generators on the others) at twice the rate it answers at concurrency
             64 (hey, rate-limited clients): accepted p99, 503 + Retry-After counts, with and without its refusal

Why wrk: on a 2-core machine the load generator competes with the server for CPU. A Python asyncio client spends
~100 µs of interpreter time per request -- as much as the server it measures -- so it caps and distorts the numbers;
wrk is a C event loop that costs a few µs per request and reports latency percentiles itself. The overload part needs
what wrk cannot give -- a fixed offered rate whatever the answers, and the latency of the accepted requests alone --
so it uses hey (also compiled, Go): 500 clients each rate-limited, every request's status and time in its CSV
(500: hey keeps at most 500 idle connections, so more clients would keep dialing new ones).
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
import urllib.error
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
wrk.body = [==[%s]==]
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
MLSERVER_VENV = Path(__file__).resolve().parent / ".mlserver-venv"  # gitignored; never a dependency of mlwb
OIP_TYPES = {"f": "FP64", "i": "INT64", "O": "BYTES"}


def ensure_tool(name: str, package: str) -> str:
    "The path of `name`, installed with apt-get from Debian's `package` if missing (we run as root)."
    if not shutil.which(name):
        print(f"installing {package} with apt-get ...", flush=True)
        subprocess.run(["apt-get", "install", "-y", package], check=True, capture_output=True)
    return shutil.which(name)


def ensure_mlserver() -> Path:
    "MLServer 1.7.1 and its scikit-learn runtime in a virtual environment of their own, made on first use."
    mlserver = MLSERVER_VENV / "bin" / "mlserver"
    if mlserver.exists(): return mlserver
    import joblib
    import sklearn
    print(f"creating {MLSERVER_VENV} with MLServer 1.7.1 ...", flush=True)
    subprocess.run([str(PYTHON), "-m", "venv", str(MLSERVER_VENV)], check=True)
    subprocess.run([str(MLSERVER_VENV / "bin" / "pip"), "install", "-q", "mlserver==1.7.1", "mlserver-sklearn==1.7.1",
                    f"scikit-learn=={sklearn.__version__}", f"joblib=={joblib.__version__}",  # the pickle's versions
                    "uvloop==0.21.0"], check=True)  # MLServer 1.7.1's inference workers die on uvloop 0.22's get_event_loop
    return mlserver


def register(name: str, model, X, **log_options) -> str:
    "Log `model` (scikit-learn interface) in the current tracking store and register it as `name`@champion."
    import mlflow
    import mlflow.sklearn
    from mlflow.models import infer_signature
    with mlflow.start_run(experiment_id=mlflow.get_experiment_by_name("bench").experiment_id):
        info = mlflow.sklearn.log_model(model, name="model", signature=infer_signature(X, model.predict(X)), input_example=X.head(5),
                                        serialization_format="cloudpickle", pip_requirements=[], **log_options)
    version = mlflow.register_model(info.model_uri, name)
    mlflow.MlflowClient().set_registered_model_alias(name, "champion", version.version)
    return f"models:/{name}@champion"


def wide_rows(n: int, seed: int = 0):
    "Card-like rows with 30 columns: 27 numbers, an amount, an hour and a category; and a fraud-like label."
    import numpy as np
    import pandas as pd
    rng = np.random.default_rng(seed)
    X = pd.DataFrame({f"x{i}": rng.normal(0, 1 + i % 5, n).round(4) for i in range(27)})
    X["amount"], X["hour"] = rng.gamma(2, 30, n).round(2), rng.integers(0, 24, n)
    X["category"] = rng.choice(["food", "travel", "online", "fuel", "other"], n)
    y = ((X.amount > 90) & (X.hour < 6) | (X.x0 + X.x1 > 3) | (rng.random(n) < 0.02)).astype(int)
    return X, y


def train_wide(folder: Path) -> dict:
    "A histogram-gradient-boosting pipeline on 50,000 x 30 rows, registered as bench30@champion and saved for MLServer."
    import joblib
    from sklearn.compose import ColumnTransformer
    from sklearn.ensemble import HistGradientBoostingClassifier
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import OneHotEncoder
    X, y = wide_rows(50_000)
    features = ColumnTransformer([("cat", OneHotEncoder(handle_unknown="ignore"), ["category"])], remainder="passthrough")
    model = Pipeline([("features", features), ("model", HistGradientBoostingClassifier(max_iter=100, random_state=0))]).fit(X, y)
    register("bench30", model, X)
    (folder / "bench30").mkdir(parents=True)
    joblib.dump(model, folder / "bench30" / "model.joblib")
    return json.loads(X.head(1).to_json(orient="records"))[0]


def train_torch() -> dict:
    "A scaler + PyTorch MLP pipeline (mlwb's TorchMLPClassifier) on four numbers, registered as benchtorch@champion."
    import numpy as np
    import pandas as pd
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from mlwb.torch_models import TorchMLPClassifier
    rng = np.random.default_rng(1)
    X = pd.DataFrame({"amount": rng.gamma(2, 30, 5000).round(2), "hour": rng.integers(0, 24, 5000).astype(float),
                      "distance_km": rng.exponential(10, 5000).round(3), "age_days": rng.integers(1, 3000, 5000).astype(float)})
    y = ((X.amount > 90) & (X.hour < 6)).astype(int)
    model = make_pipeline(StandardScaler(), TorchMLPClassifier(hidden_sizes=(64, 32), max_epochs=5, random_state=0, device="cpu")).fit(X, y)
    register("benchtorch", model, X)
    return json.loads(X.head(1).to_json(orient="records"))[0]


def bodies(row: dict, d: Path, name: str) -> dict:
    "wrk scripts of one row in three protocols: mlwb's records, MLflow's dataframe_split and an OIP infer request."
    import numpy as np
    tensor = lambda k, v: {"name": k, "datatype": OIP_TYPES[np.asarray(v).dtype.kind if not isinstance(v, str) else "O"], "shape": [1],
                           "data": [v], **({"parameters": {"content_type": "str"}} if isinstance(v, str) else {})}
    oip = {"parameters": {"content_type": "pd"}, "inputs": [tensor(k, v) for k, v in row.items()]}  # MLServer decodes "pd" to a frame
    forms = {"records": {"records": [row]}, "split": {"dataframe_split": {"columns": list(row), "data": [list(row.values())]}}, "oip": oip}
    scripts = {}
    for form, body in forms.items():
        (d / f"{name}-{form}.json").write_text(json.dumps(body))
        scripts[form] = d / f"{name}-{form}.lua"
        scripts[form].write_text(LUA % json.dumps(body))
    return scripts


def measure(wrk: str, results: dict, label: str, command: list, env: dict, ready: str, targets: dict, concurrencies: list,
            seconds: float):
    "Start one server and drive each of its `targets` ({row label: (url, wrk script)}) at each concurrency."
    process = start(label, command, env, ready)
    try:
        for name, (url, script) in targets.items():
            drive(wrk, url, script, 8, 2)  # warm-up
            for c in concurrencies:
                results[(name, c)] = r = drive(wrk, url, script, c, seconds, process.pid)
                print(f"  {name:<28} c={c:<3} {r['rps']:>8.1f} req/s  p50 {r['p50']:>8.2f} ms  p99 {r['p99']:>8.2f} ms  "
                      f"server CPU {r['cpu_ms']:.3f} ms/req  errors {r['errors']}", flush=True)
    finally: stop(process)


def mlserver_folder(d: Path) -> tuple:
    "MLServer's settings: its ports, and the bench30 model with adaptive batching (64 rows or 2 ms)."
    http, grpc, metrics = free_port(), free_port(), free_port()
    root = d / "mlserver"
    (root / "settings.json").write_text(json.dumps({"debug": False, "http_port": http, "grpc_port": grpc, "metrics_port": metrics}))
    (root / "bench30" / "model-settings.json").write_text(json.dumps({
        "name": "bench30", "implementation": "mlserver_sklearn.SKLearnModel", "parameters": {"uri": "./model.joblib", "version": "1"},
        "max_batch_size": 64, "max_batch_time": 0.002}))
    return root, http


def protocols_part(wrk: str, d: Path, env: dict, mlwb_serve, concurrencies: list, seconds: float) -> dict:
    "mlwb serve through its three protocols and MLServer through the OIP, on the 30-column model."
    row = train_wide(d / "mlserver")
    scripts, results, port = bodies(row, d, "bench30"), {}, free_port()
    base = f"http://127.0.0.1:{port}"
    targets = {"mlwb /predict": (f"{base}/predict", scripts["records"]),
               "mlwb /invocations (MLflow)": (f"{base}/invocations", scripts["split"]),
               "mlwb /v2 infer (OIP)": (f"{base}/v2/models/bench30/infer", scripts["oip"])}
    unrefusing = ["--max-queue-ms", "0"]  # throughput as MLServer measures it: no 503s mixed into the answers
    measure(wrk, results, "mlwb serve", mlwb_serve("models:/bench30@champion", port) + unrefusing, env, f"{base}/health/ready", targets,
            concurrencies, seconds)
    mlserver, (root, http) = ensure_mlserver(), mlserver_folder(d)
    ms = f"http://127.0.0.1:{http}"
    tuned = {**env, "PATH": f"{MLSERVER_VENV / 'bin'}:{env['PATH']}", "OMP_NUM_THREADS": "1"}  # as mlwb's scoring thread
    measure(wrk, results, "MLServer", [str(mlserver), "start", str(root)], tuned,
            f"{ms}/v2/models/bench30/ready", {"MLServer /v2 infer (OIP)": (f"{ms}/v2/models/bench30/infer", scripts["oip"])},
            concurrencies, seconds)
    return results, row


def torch_part(wrk: str, d: Path, env: dict, mlwb_serve, concurrencies: list, seconds: float) -> dict:
    "A PyTorch pipeline served by mlwb serve and by mlflow models serve, the same MLflow body to both."
    script, results = bodies(train_torch(), d, "torch")["split"], {}
    port, other = free_port(), free_port()
    measure(wrk, results, "mlwb serve (torch)", mlwb_serve("models:/benchtorch@champion", port) + ["--max-queue-ms", "0"], env,
            f"http://127.0.0.1:{port}/health/ready", {"torch: mlwb": (f"http://127.0.0.1:{port}/invocations", script)},
            concurrencies, seconds)
    mlflow = [str(BIN / "mlflow"), "models", "serve", "-m", "models:/benchtorch@champion", "-p", str(other), "--env-manager", "local"]
    measure(wrk, results, "mlflow models serve (torch)", mlflow, {**env, "PYTHONPATH": str(REPO)}, f"http://127.0.0.1:{other}/ping",
            {"torch: mlflow": (f"http://127.0.0.1:{other}/invocations", script)}, concurrencies, seconds)
    return results


def offered_load(url: str, body: Path, rate: float, seconds: float, workers: int = 500) -> dict:
    """Offer `rate` requests/s for `seconds` with hey (a Go load generator, a few µs a request): `workers`
    clients each sending rate/workers a second, so the offered rate holds while an answer takes under
    workers/rate seconds (85 ms at 6,000 req/s); its CSV gives every request's status and latency.
    `steady_p99` leaves out the first second, while hey dials its 500 connections at once."""
    import csv
    import numpy as np
    hey = ensure_tool("hey", "hey")
    command = [hey, "-z", f"{seconds}s", "-c", str(workers), "-q", f"{rate / workers:.3f}", "-m", "POST",
               "-T", "application/json", "-D", str(body), "-t", "10", "-o", "csv", url]
    out = subprocess.run(command, capture_output=True, text=True, timeout=seconds + 60)
    rows = list(csv.DictReader(out.stdout.splitlines()))
    statuses = {}
    for row in rows: statuses[row["status-code"]] = statuses.get(row["status-code"], 0) + 1
    times = lambda status, after=0.0: np.array([float(r["response-time"]) * 1000 for r in rows
                                                if r["status-code"] == status and float(r["offset"]) >= after])
    pct = lambda a, q: float(np.percentile(a, q)) if len(a) else float("nan")
    ok = times("200")
    return {"offered": rate, "seconds": seconds, "sent": len(rows), "statuses": statuses, "p50": pct(ok, 50), "p99": pct(ok, 99),
            "steady_p99": pct(times("200", 1.0), 99), "refusal_p50": pct(times("503"), 50),
            "answered_per_s": len(ok) / seconds, "refused": statuses.get("503", 0)}


def retry_after_while_overloaded(url: str, body: Path, rate: float, seconds: float = 3.0) -> dict:
    "Under the same offered load, probe with urllib: how many 503s carried a Retry-After header."
    import threading
    load = threading.Thread(target=offered_load, args=(url, body, rate, seconds))
    load.start()
    refused = hinted = 0
    while load.is_alive():
        request = urllib.request.Request(url, data=body.read_bytes(), headers={"content-type": "application/json"})
        try: urllib.request.urlopen(request, timeout=10).read()
        except urllib.error.HTTPError as e:
            if e.code == 503: refused, hinted = refused + 1, hinted + ("Retry-After" in e.headers)
    load.join()
    return {"probed_503": refused, "with_retry_after": hinted}


def overload_part(wrk: str, d: Path, env: dict, mlwb_serve, seconds: float) -> dict:
    """mlwb serve offered twice the rate it answers at concurrency 64, with its overload refusal and without.
    The server runs on CPU 0 and the load generators on the others (taskset), so that the generator's own
    CPU neither slows the server nor delays its own clocks; its rate is measured the same way first."""
    others = set(range(1, os.cpu_count())) or {0}
    pin = ["taskset", "-c", "0"] if len(others) and shutil.which("taskset") and os.cpu_count() > 1 else []
    mine = os.sched_getaffinity(0)
    os.sched_setaffinity(0, others if pin else mine)  # wrk and hey inherit it
    results = {}
    try:
        for limit in ("0", "100", "50", "0"):
            port = free_port()
            measuring = not results
            label = ("rate at concurrency 64" if measuring else f"refusing (--max-queue-ms {limit})" if limit != "0"
                     else "not refusing (--max-queue-ms 0)")
            process = start(f"mlwb serve, {label}", pin + mlwb_serve("models:/bench30@champion", port) + ["--max-queue-ms", limit],
                            env, f"http://127.0.0.1:{port}/health/ready")
            try:
                url, body = f"http://127.0.0.1:{port}/predict", d / "bench30-records.json"
                drive(wrk, url, d / "bench30-records.lua", 8, 2)  # warm-up
                if measuring:
                    rate = results["rate"] = drive(wrk, url, d / "bench30-records.lua", 64, seconds, process.pid)["rps"]
                    print(f"  mlwb serve on one CPU answers {rate:.0f} req/s at concurrency 64; offering {2 * rate:.0f}", flush=True)
                    continue
                results[label] = r = offered_load(url, body, 2 * rate, seconds)
                r.update(retry_after_while_overloaded(url, body, 2 * rate))
                print(f"  {label}: {r}", flush=True)
            finally: stop(process)
    finally: os.sched_setaffinity(0, mine)
    results["pinned"] = bool(pin)
    return results


PARTS = ("classic", "lifecycle", "protocols", "torch", "overload")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=8.0, help="seconds of load per server and concurrency")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 64])
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS), help="what to measure (default: all)")
    parser.add_argument("--lifecycle-only", action="store_true", help="the same as --parts lifecycle")
    args = parser.parse_args()
    parts = ["lifecycle"] if args.lifecycle_only else args.parts
    wrk = ensure_wrk()
    results, events, extra = {}, {}, {}
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        ws = d / "ws"
        ws.mkdir()
        shutil.copy(REPO / "settings.ini", ws / "settings.ini")
        print("training and registering bench@champion ...", flush=True)
        uri, row = train_and_register(ws)
        script = d / "post.lua"
        script.write_text(LUA % json.dumps({"dataframe_records": [row]}))  # a body both servers accept
        ROW.append(row)
        base_env = {k: v for k, v in os.environ.items() if not k.startswith("MLWB_")}
        base_env.update(MLFLOW_TRACKING_URI=uri, MLFLOW_REGISTRY_URI=uri, MLWB_WORKSPACE=str(ws), PATH=f"{BIN}:{os.environ.get('PATH', '')}")  # mlflow runs `uvicorn` from PATH
        mlwb_serve = lambda model, p: [str(BIN / "mlwb"), "serve", model, "--port", str(p), "--log-dir", str(d / "requests")]
        servers = {
            "mlwb serve": lambda p: (mlwb_serve("models:/bench@champion", p), base_env, f"http://127.0.0.1:{p}/health/ready", f"http://127.0.0.1:{p}/predict"),
            "mlflow default": lambda p: ([str(BIN / "mlflow"), "models", "serve", "-m", "models:/bench@champion", "-p", str(p), "--env-manager", "local"],
                                         base_env, f"http://127.0.0.1:{p}/ping", f"http://127.0.0.1:{p}/invocations"),
            "mlflow tuned": lambda p: ([str(BIN / "mlflow"), "models", "serve", "-m", "models:/bench@champion", "-p", str(p), "--env-manager", "local", "-w", "2"],
                                       {**base_env, "OMP_NUM_THREADS": "1"}, f"http://127.0.0.1:{p}/ping", f"http://127.0.0.1:{p}/invocations"),
        }
        for name, make in (servers if "classic" in parts else {}).items():
            command, env, ready, url = make(free_port())
            measure(wrk, results, name, command, env, ready, {name: (url, script)}, args.concurrency, args.seconds)
        if "lifecycle" in parts:
            print("mlwb serve: an alias swap and a SIGTERM under wrk load (16 connections) ...", flush=True)
            events = lifecycle(wrk, servers["mlwb serve"], d, uri, args.seconds)
        if "protocols" in parts or "overload" in parts:
            print("the 30-column model: mlwb serve's three protocols, then MLServer ...", flush=True)
            extra, wide = protocols_part(wrk, d, base_env, mlwb_serve, args.concurrency, args.seconds)
        if "torch" in parts:
            print("a PyTorch pipeline: mlwb serve and mlflow models serve ...", flush=True)
            extra.update(torch_part(wrk, d, base_env, mlwb_serve, args.concurrency, args.seconds))
        if "overload" in parts:
            print("overload: mlwb serve on one CPU offered twice the rate it answers ...", flush=True)
            overloads = overload_part(wrk, d, base_env, mlwb_serve, args.seconds)
    print(f"\nload average: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs (read the figures as ratios)")
    if results: report(results, args.concurrency)
    if events: report_lifecycle(events)
    if extra: report_extra(extra, args.concurrency)
    if "overload" in parts: report_overload(overloads)


def report_lifecycle(events: dict):
    print(f"\n| event under load (wrk, 16 connections) | responses | of them 503 | lost | connect errors |"
          f"\n|---|---|---|---|---|")
    for name, e in events.items():
        print(f"| {name} | {e['answered']} | {e['refused']} | {e['lost']} | {e['connect_errors']} |")
    print(f"\nrequests lost during the alias swap: {events['swap']['lost']}; during shutdown: "
          f"{events['shutdown']['lost']} (server exit code {events['shutdown']['exit_code']})")


def report_extra(results: dict, concurrencies: list):
    print("\n| server and route | concurrency | req/s | p50 ms | p99 ms | server CPU ms/req | errors |\n|---|---|---|---|---|---|---|")
    for (name, c), r in results.items(): print(f"| {name} | {c} | {r['rps']:.0f} | {r['p50']:.2f} | {r['p99']:.2f} | {r['cpu_ms']:.3f} | {r['errors']} |")
    top, low = max(concurrencies), min(concurrencies)
    ratio = lambda a, b, key="rps": results[(a, top)][key] / results[(b, top)][key] if (a, top) in results and (b, top) in results else float("nan")
    print(f"\nat concurrency {top}: mlwb OIP / MLServer OIP = {ratio('mlwb /v2 infer (OIP)', 'MLServer /v2 infer (OIP)'):.1f}x req/s, "
          f"p99 {ratio('mlwb /v2 infer (OIP)', 'MLServer /v2 infer (OIP)', 'p99'):.2f}x; "
          f"torch: mlwb / mlflow = {ratio('torch: mlwb', 'torch: mlflow'):.1f}x req/s")
    for name in ("mlwb /predict", "mlwb /invocations (MLflow)", "mlwb /v2 infer (OIP)", "MLServer /v2 infer (OIP)", "torch: mlwb"):
        if (name, low) in results: print(f"  p50 at concurrency {low}, {name}: {results[(name, low)]['p50']:.2f} ms")


def report_overload(overloads: dict):
    overloads = dict(overloads)
    rate, pinned = overloads.pop("rate"), overloads.pop("pinned")
    print(f"\noverload: mlwb serve {'on CPU 0, the load generators on the others' if pinned else 'unpinned'}; "
          f"it answered {rate:.0f} req/s at concurrency 64 (wrk), so twice that was offered (hey, 500 clients)")
    print("\n| mlwb serve at twice its rate | offered req/s | sent req/s | answered 200/s | 200 | 503 | other | accepted p50 ms | "
          "accepted p99 ms | after the first second | 503 p50 ms | 503 with Retry-After |\n|---|---|---|---|---|---|---|---|---|---|---|---|")
    for label, r in overloads.items():
        s = r["statuses"]
        other = sum(v for k, v in s.items() if k not in ("200", "503"))
        print(f"| {label} | {r['offered']:.0f} | {r['sent'] / r['seconds']:.0f} | {r['answered_per_s']:.0f} | {s.get('200', 0)} | "
              f"{s.get('503', 0)} | {other} | {r['p50']:.1f} | {r['p99']:.1f} | {r['steady_p99']:.1f} | {r['refusal_p50']:.1f} | "
              f"{r['with_retry_after']} of {r['probed_503']} probed |")


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
