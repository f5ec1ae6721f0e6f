"""mlwb.profiles, mlwb.monitor and mlwb.report: known shifts are caught, identical data and no-drift
windows stay quiet, the report renders offline, the command's exit codes, the serving request log, and bad
input without a traceback."""
import base64
import json
import math
import re

import numpy as np
import pandas as pd
import pytest

from conftest import run_mlwb
from mlwb.config import load_settings
from mlwb.monitor import (
    EXIT_DATA_QUALITY,
    EXIT_DRIFT,
    EXIT_HEALTHY,
    check_thresholds,
    compare,
    fit_reference,
    join_late_labels,
    monitor,
)
from mlwb.request_log import read_request_log, request_rows
from mlwb.profiles import MonitorError
from mlwb.report import report_html
from mlwb.tracking import mlflow_client


def frame(seed: int, n: int = 4_000, mean: float = 0.0, scale: float = 1.0, mix=(0.5, 0.3, 0.2)) -> pd.DataFrame:
    "Three numeric and two categorical columns; `mean`/`scale` move x0/x1, `mix` moves c0."
    rng = np.random.default_rng(seed)
    return pd.DataFrame({"x0": rng.normal(mean, 1.0, n), "x1": rng.normal(0.0, scale, n), "x2": rng.gamma(2.0, 1.0, n),
                         "c0": rng.choice(["a", "b", "c"], n, p=list(mix)), "c1": rng.choice(["u", "v"], n, p=[0.7, 0.3])})


def drifted(reference, current, **thresholds) -> list:
    return monitor(reference, current, thresholds=check_thresholds(thresholds)).windows[0].drifted_features


def test_numeric_mean_and_scale_shifts_are_caught():
    reference = frame(0)
    assert drifted(reference, frame(1, mean=0.5)) == ["x0"]
    assert drifted(reference, frame(2, scale=1.6)) == ["x1"]


def test_category_prior_shift_is_caught():
    assert drifted(frame(0), frame(1, mix=(0.3, 0.3, 0.4))) == ["c0"]


def test_identical_data_raises_nothing():
    reference = frame(0)
    window = monitor(reference, reference.copy()).windows[0]
    assert not window.drift and not window.findings and window.exit_code == EXIT_HEALTHY
    assert (window.features.p_adjusted == 1.0).all() and (window.features.psi.abs() < 1e-9).all()


def test_false_alarm_rate_over_no_drift_windows_stays_within_alpha():
    "Only the p-values decide here (effect floors at 0): Benjamini-Hochberg keeps a window's false-alarm chance below alpha."
    alpha, n = 0.05, 120
    t = check_thresholds({"alpha": alpha, "psi": 0, "wasserstein": 0, "jensen_shannon": 0, "bins": 256})
    profile = fit_reference(frame(0, n=5_000), thresholds=t)
    alarms = sum(compare(profile, frame(100 + seed, n=500), t).drift for seed in range(n))
    assert alarms <= alpha * n + 3 * math.sqrt(alpha * n), alarms
    defaults = fit_reference(frame(0, n=5_000))
    assert sum(compare(defaults, frame(100 + seed, n=500)).drift for seed in range(n)) <= 2  # with the effect floors: quieter still


def test_a_tiny_shift_on_a_huge_sample_is_significant_but_not_an_alarm():
    rng = np.random.default_rng(3)
    reference, current = pd.DataFrame({"x": rng.normal(0, 1, 1_000_000)}), pd.DataFrame({"x": rng.normal(0.01, 1, 1_000_000)})
    window = monitor(reference, current).windows[0]
    assert window.features.p_adjusted["x"] < 1e-4 and not window.drift


def test_report_renders_with_embedded_plots_and_no_external_urls():
    result = monitor(frame(0), frame(1, mean=0.5, mix=(0.3, 0.3, 0.4)))
    page = report_html(result)
    images = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert len(images) >= 3 and all(base64.b64decode(i)[:8] == b"\x89PNG\r\n\x1a\n" for i in images)
    assert not re.search(r"https?://|<script|<link|@import|url\(", page)
    assert "x0" in page and "c0" in page and "exit status 3" in page


@pytest.fixture
def files(tmp_path):
    "Reference and current files for the command line."
    paths = {}
    reference = frame(0).assign(y=lambda f: (f.x0 + f.x2 > 2).astype(int))
    reference["score"] = 1 / (1 + np.exp(-(reference.x0 + reference.x2 - 2) * 3))
    for name, data in {"labelled": reference, "reference": frame(0), "quiet": reference.sample(frac=1, random_state=1).head(2_000),
                       "drifted": frame(1, mean=0.8), "missing_column": frame(2).drop(columns="x2"),
                       "empty": frame(3).head(0)}.items():
        paths[name] = tmp_path / f"{name}.parquet"
        data.to_parquet(paths[name])
    bad = reference.head(2_000).copy()
    bad["score"] = 1 - bad.score  # a model that now ranks backwards: labels show it
    bad.to_parquet(tmp_path / "worse.parquet"); paths["worse"] = tmp_path / "worse.parquet"
    return paths


def test_exit_codes_of_the_command(files, tmp_path, workspace):
    run = lambda *args: run_mlwb("monitor", "--reference", files["reference"], "--out", tmp_path / "out", *args, cwd=tmp_path)
    labelled = lambda *args: run_mlwb("monitor", "--reference", files["labelled"], "--out", tmp_path / "out", *args, cwd=tmp_path)
    quiet = labelled("--current", files["quiet"], "--target", "y", "--prediction", "score")
    assert quiet.returncode == 0, quiet.stdout + quiet.stderr
    drift = run("--current", files["drifted"])
    assert drift.returncode == 3 and "drifted: x0" in drift.stdout, drift.stdout + drift.stderr
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["exit_code"] == 3 and summary["windows"][0]["drifted_features"] == ["x0"]
    quality = run("--current", files["missing_column"])
    assert quality.returncode == 4 and "column 'x2' is missing" in quality.stdout, quality.stdout
    worse = labelled("--current", files["worse"], "--target", "y", "--prediction", "score")
    assert worse.returncode == 5 and "roc_auc" in worse.stdout, worse.stdout + worse.stderr


def test_bad_input_is_a_clear_error_without_a_traceback(files, tmp_path, workspace):
    run = lambda *args: run_mlwb("monitor", "--reference", files["reference"], "--out", tmp_path / "out", *args, cwd=tmp_path)
    for args, message in [(["--current", files["empty"]], "has no rows"),
                          (["--current", tmp_path / "nope.parquet"], "nope.parquet"),
                          (["--current", files["quiet"], "--prediction", "proba"], "no prediction column 'proba'"),
                          (["--current", files["quiet"], "--every", "1d"], "--every needs --time-column")]:
        out = run(*map(str, args))
        assert out.returncode == 2 and message in out.stderr and "Traceback" not in out.stderr, (args, out.stderr)
    (tmp_path / "monitoring.yml").write_text("alpah: 0.05\n")  # picked up from the working folder
    out = run("--current", str(files["quiet"]))
    assert out.returncode == 2 and "unknown threshold 'alpah'" in out.stderr


def test_mismatched_types_are_a_data_quality_finding_naming_the_column():
    reference, current = frame(0), frame(1).assign(x1="n/a")
    window = monitor(reference, current).windows[0]
    failed = [f for f in window.findings if f["failed"]]
    assert window.exit_code == EXIT_DATA_QUALITY and failed[0]["column"] == "x1" and "expected numbers" in failed[0]["message"]


def write_log(folder, rows: pd.DataFrame, day: str, truncated: bool = False, failures: int = 0, scores=None):
    "One request-log file for `day` as mlwb serve writes it, optionally cut short at the end; `scores` are the probabilities."
    lines = []
    for i, row in enumerate(rows.to_dict("records")):
        ts = pd.Timestamp(day, tz="UTC") + pd.Timedelta(seconds=20 * i)
        lines.append({"ts": ts.isoformat(), "request_id": f"{day}-{i}", "row": 0, "model": "m", "version": "1", "variant": "champion",
                      "status": 200, "latency_ms": 1.2, "inputs": row, "prediction": int(row["x0"] > 0),
                      "probability": 0.5 if scores is None else float(scores[i])})
    lines += [{"ts": f"{day}T12:00:00+00:00", "request_id": f"bad-{i}", "row": None, "model": "m", "version": "1", "variant": "champion",
               "status": 500, "latency_ms": 0.3, "inputs": None, "prediction": None, "probability": None} for i in range(failures)]
    text = "".join(json.dumps(line) + "\n" for line in lines) + ('{"ts": "2026-11-2' if truncated else "")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"requests-{day}-1234.jsonl").write_text(text)


def test_request_log_windows_by_day_with_a_truncated_last_line(tmp_path, workspace):
    log = tmp_path / "requests" / "m"
    write_log(log, frame(1, n=1_500), "2026-11-20")
    write_log(log / "shard", frame(2, n=1_500, mix=(0.2, 0.2, 0.6)), "2026-11-21", truncated=True)
    table = read_request_log(log)
    assert len(table) == 3_000 and {"x0", "c0", "prediction", "probability", "status"} <= set(table.columns)
    assert len(read_request_log(log, since="2026-11-21")) == 1_500
    frame(0).to_parquet(tmp_path / "reference.parquet")
    out = run_mlwb("monitor", "--reference", tmp_path / "reference.parquet", "--request-log", log, "--every", "1d",
                   "--out", tmp_path / "out", cwd=tmp_path)
    assert out.returncode == 3, out.stdout + out.stderr
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert [(w["window"], w["drift"], w["drifted_features"]) for w in summary["windows"]] == [
        ("2026-11-20", False, []), ("2026-11-21", True, ["c0"])]
    page = (tmp_path / "out" / "report.html").read_text()
    assert 'alt="drift and performance over time"' in page


def test_failed_requests_are_a_data_quality_failure(tmp_path, workspace):
    log = tmp_path / "requests" / "m"
    write_log(log, frame(1, n=500), "2026-11-20", failures=100)
    assert len(request_rows(read_request_log(log))) == 500
    frame(0).to_parquet(tmp_path / "reference.parquet")
    out = run_mlwb("monitor", "--reference", tmp_path / "reference.parquet", "--request-log", log, "--out", tmp_path / "out", cwd=tmp_path)
    assert out.returncode == 4 and "of requests failed" in out.stdout, out.stdout + out.stderr


def test_mlflow_logging_from_the_command(files, tmp_path, workspace):
    out = run_mlwb("monitor", "--reference", files["reference"], "--current", files["drifted"], "--out", tmp_path / "out", "--mlflow",
                   cwd=tmp_path, env={"MLFLOW_TRACKING_URI": ""})
    assert out.returncode == 3 and "MLflow run:" in out.stdout, out.stdout + out.stderr
    client = mlflow_client(load_settings(workspace, environ={}))
    run_id = out.stdout.split("MLflow run:")[1].split()[0]
    assert {a.path for a in client.list_artifacts(run_id, "monitoring")} == {"monitoring/report.html", "monitoring/summary.json"}
    assert client.get_run(run_id).data.tags["mlwb.exit_code"] == "3"


def test_empty_window_and_missing_target_raise_monitor_error():
    with pytest.raises(MonitorError, match="has no rows"): monitor(frame(0), frame(1).head(0))
    with pytest.raises(MonitorError, match="no target column 'label'"): monitor(frame(0), frame(1), target="label")


def test_infinite_reference_values_do_not_switch_drift_detection_off():
    "5% inf in the reference once made every bin infinitely wide: a 3-sd shift then went unseen (KS 0.005, PSI 0)."
    reference, current = frame(0), frame(1)
    reference.loc[reference.index % 20 == 0, "x0"] = np.inf
    current["x0"] += 3.0
    window = monitor(reference, current).windows[0]
    assert "x0" in window.drifted_features and window.features.ks["x0"] > 0.5 and window.features.psi["x0"] > 1
    [infinite] = [f for f in window.findings if f["check"] == "infinite"]
    assert infinite["column"] == "x0" and not infinite["failed"] and "(reference 5.0%)" in infinite["message"]


def test_infinite_values_in_the_current_window_fail_data_quality_naming_the_column():
    current = frame(1)
    current.loc[current.index % 10 == 0, "x2"] = -np.inf
    window = monitor(frame(0), current).windows[0]
    failed = [f for f in window.findings if f["failed"]]
    assert window.exit_code == EXIT_DATA_QUALITY and [(f["check"], f["column"]) for f in failed] == [("infinite", "x2")]
    assert "column 'x2': 10.0% of values are infinite" in failed[0]["message"]
    assert np.isfinite(window.features.loc["x2", ["ks", "wasserstein", "psi"]].astype(float)).all()


def test_repeated_column_names_raise_monitor_error_naming_them():
    reference = frame(0)
    repeated = pd.concat([reference, reference[["x1", "c0"]]], axis=1)
    with pytest.raises(MonitorError, match="reference: column names repeat: 'x1', 'c0'"): fit_reference(repeated)
    with pytest.raises(MonitorError, match="column names repeat: 'x1', 'c0'"): monitor(reference, repeated)
    with pytest.raises(MonitorError, match="window 'current': column names repeat: 'x1'"): compare(fit_reference(reference), repeated)


def test_prediction_drift_is_caught_and_kept_apart_from_the_features():
    rng = np.random.default_rng(5)
    reference, current = frame(0).assign(score=rng.beta(2, 5, 4_000)), frame(1).assign(score=rng.beta(3, 4, 4_000))
    window = monitor(reference, current, prediction="score").windows[0]
    assert window.prediction_drift and window.drifted_features == [] and window.exit_code == EXIT_DRIFT
    quiet = monitor(reference, frame(1).assign(score=rng.beta(2, 5, 4_000)), prediction="score").windows[0]
    assert not quiet.prediction_drift and quiet.exit_code == EXIT_HEALTHY


def test_new_category_and_out_of_range_findings_name_their_column():
    current = frame(1)
    current.loc[current.index % 10 == 0, "c1"] = "w"  # a category the reference never had
    current.loc[current.index % 10 == 1, "x2"] += 100.0  # far above the reference's largest value
    failed = {f["check"]: f for f in monitor(frame(0), current).windows[0].findings if f["failed"]}
    assert failed["new_categories"]["column"] == "c1" and "column 'c1': 10.0% of values in new categories: w" in failed["new_categories"]["message"]
    assert failed["out_of_range"]["column"] == "x2" and "column 'x2': 10.1% of values outside the reference range" in failed["out_of_range"]["message"]


def test_join_late_labels_by_request_id_and_by_two_columns():
    rows = pd.DataFrame({"request_id": ["a", "a", "b", "c"], "row": [0, 1, 0, 0], "score": [0.9, 0.2, 0.4, 0.7]})
    labels = pd.DataFrame({"request_id": ["c", "b"], "y": [1, 0]})  # in the order they came; "a" not yet
    joined = join_late_labels(rows, labels)
    assert joined.request_id.tolist() == ["a", "a", "b", "c"] and joined.y.fillna(-1).tolist() == [-1, -1, 0, 1]
    batch = pd.DataFrame({"request_id": ["a", "a"], "row": [1, 0], "y": [1, 0]})
    assert join_late_labels(rows, batch, key=["request_id", "row"]).y.fillna(-1).tolist() == [0, 1, -1, -1]
    with pytest.raises(MonitorError, match="current data: no key column 'transaction_id'"): join_late_labels(rows, labels, key="transaction_id")
    with pytest.raises(MonitorError, match="labels: no key column 'request_id'"): join_late_labels(rows, labels.rename(columns={"request_id": "id"}))
    with pytest.raises(MonitorError, match=r"labels: the key request_id repeats, first for \['a'\]"): join_late_labels(rows, batch, key="request_id")
    with pytest.raises(MonitorError, match="cannot join on request_id"): join_late_labels(rows, labels.assign(request_id=[3, 2]))


def test_late_labels_on_the_command_line_give_performance_per_window(tmp_path, workspace):
    score = lambda f: 1 / (1 + np.exp(-(f.x0 + f.x2 - 2) * 3))
    reference = frame(0).assign(y=lambda f: (f.x0 + f.x2 > 2).astype(int), probability=score)
    reference.to_parquet(tmp_path / "reference.parquet")
    rows, log = frame(1, n=1_000), tmp_path / "requests" / "m"
    write_log(log, rows, "2026-11-20", scores=score(rows).to_numpy())
    labels = pd.DataFrame({"request_id": [f"2026-11-20-{i}" for i in range(800)], "y": (rows.x0 + rows.x2 > 2).astype(int).head(800)})
    labels.to_parquet(tmp_path / "labels.parquet")
    labels.assign(y=1 - labels.y).to_parquet(tmp_path / "wrong.parquet")  # the model now ranks backwards
    run = lambda *args: run_mlwb("monitor", "--reference", tmp_path / "reference.parquet", "--request-log", log, "--target", "y",
                                 "--out", tmp_path / "out", *args, cwd=tmp_path)
    good = run("--labels", tmp_path / "labels.parquet")
    assert good.returncode == 0 and "labels: 800 of 1,000 rows labelled" in good.stdout, good.stdout + good.stderr
    performance = json.loads((tmp_path / "out" / "summary.json").read_text())["windows"][0]["performance"]
    assert performance["metric"] == "roc_auc" and performance["current"] > 0.99
    worse = run("--labels", tmp_path / "wrong.parquet")
    assert worse.returncode == 5 and "roc_auc" in worse.stdout, worse.stdout + worse.stderr
    labels.rename(columns={"request_id": "id"}).to_parquet(tmp_path / "no_key.parquet")
    for args, message in [(["--labels", tmp_path / "no_key.parquet"], "no_key.parquet: no key column 'request_id'"),
                          (["--labels", tmp_path / "labels.parquet", "--label-key", "transaction_id"], "no key column 'transaction_id'")]:
        out = run(*args)
        assert out.returncode == 2 and message in out.stderr and "Traceback" not in out.stderr, (args, out.stderr)
    no_target = run_mlwb("monitor", "--reference", tmp_path / "reference.parquet", "--request-log", log, "--labels", tmp_path / "labels.parquet",
                         "--out", tmp_path / "out", cwd=tmp_path)
    assert no_target.returncode == 2 and "--labels needs --target" in no_target.stderr


def test_binned_ks_is_within_its_stated_bound_and_flags_what_exact_scipy_flags():
    "200 seeded columns (normal, log-normal, Poisson; shifts from none to large) in windows of 25, against scipy's ks_2samp."
    from scipy.stats import ks_2samp
    from mlwb.profiles import adjust_p_values, ks_error, ks_test, numeric_profile
    rng = np.random.default_rng(18)
    draws = [lambda n, s: rng.normal(s, 1, n), lambda n, s: rng.lognormal(s, 0.7, n),
             lambda n, s: rng.poisson(4 * (1 + s), n).astype(float)]
    flags = []
    for window in range(8):
        binned, exact = [], []
        for column in range(25):
            draw, (n, m) = draws[column % 3], rng.integers(2_000, 20_000, 2)
            x, y = pd.Series(draw(n, 0.0)), pd.Series(draw(m, rng.choice([0, 0, 0, 0.02, 0.04, 0.06, 0.1, 0.3])))
            reference = numeric_profile(x)
            current = numeric_profile(y, reference)
            (d, p), scipy = ks_test(reference, current), ks_2samp(x, y)
            assert d <= scipy.statistic + 1e-12 <= d + ks_error(reference, current) + 2e-12, (d, scipy.statistic)  # the bound
            binned.append(p); exact.append(scipy.pvalue)
        flags += list(zip(adjust_p_values(binned), adjust_p_values(exact)))
    flagged = [(b < 0.01, e < 0.01) for b, e in flags]
    assert 40 < sum(e for _, e in flagged) < 160  # both quiet and drifted columns were tested
    assert sum(b == e for b, e in flagged) >= 0.98 * len(flags)
    assert all(0.005 < b < 0.02 and 0.005 < e < 0.02 for (b, e), (fb, fe) in zip(flags, flagged) if fb != fe)  # only at the margin


def test_the_command_streams_a_folder_here_and_on_dask_with_identical_results(files, tmp_path, workspace):
    folder = tmp_path / "current"
    folder.mkdir()
    drifted = pd.read_parquet(files["drifted"])
    for i in range(4): drifted.iloc[i * 1_000:(i + 1) * 1_000].to_parquet(folder / f"part-{i}.parquet", row_group_size=300)
    summaries = []
    for extra in ([], ["--dask", "local"]):
        out = run_mlwb("monitor", "--reference", files["reference"], "--current", folder, "--chunk-rows", "200",
                       "--out", tmp_path / "out", *extra, cwd=tmp_path)
        assert out.returncode == 3 and "drifted: x0" in out.stdout, out.stdout + out.stderr
        summaries.append(json.loads((tmp_path / "out" / "summary.json").read_text())["windows"])
    assert summaries[0] == summaries[1] and summaries[0][0]["rows"] == 4_000


def test_the_command_monitors_against_the_profile_stored_with_the_served_model(tmp_path, workspace):
    import mlflow
    from mlwb.profile_store import PROFILE_FILE, log_reference_profile
    from mlwb.tracking import tracking_to
    from mlwb.train import train
    settings = load_settings(workspace, environ={})
    rows = frame(0).assign(y=lambda f: (f.x0 > 0).astype(int))
    with tracking_to(settings), mlflow.start_run():
        trained = train(rows[["x0", "x1", "x2", "y"]], target="y", model="logistic")
        log_reference_profile(trained.model_uri, rows, target="y")
        version = mlflow.register_model(trained.model_uri, "toy").version
    client = mlflow_client(settings)
    client.set_registered_model_alias("toy", "champion", version)
    assert PROFILE_FILE in {a.path for a in client.list_logged_model_artifacts(trained.model_uri.split("/")[-1])}
    log = tmp_path / "requests" / "toy"
    write_log(log, frame(1, n=800), "2026-11-20")
    write_log(log, frame(2, n=800, mix=(0.2, 0.2, 0.6)), "2026-11-21")
    out = run_mlwb("monitor", "--model", "models:/toy@champion", "--request-log", log, "--every", "1d",
                   "--out", tmp_path / "out", cwd=tmp_path, env={"MLFLOW_TRACKING_URI": ""})
    assert out.returncode == 3 and f"version {version}" in out.stdout, out.stdout + out.stderr
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert [(w["window"], w["drifted_features"]) for w in summary["windows"]] == [("2026-11-20", []), ("2026-11-21", ["c0"])]
    both = run_mlwb("monitor", "--model", "models:/toy@champion", "--reference", tmp_path, "--current", tmp_path,
                    "--out", tmp_path / "out", cwd=tmp_path)
    assert both.returncode == 2 and "exactly one of --reference DATA or --model" in both.stderr
