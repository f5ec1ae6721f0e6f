"""Batch scoring (`mlwb predict`) and deployment files (`mlwb deploy`) against a real registered model in a temporary workspace."""
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from click.testing import CliRunner

from conftest import MLWB, REPO, new_workspace, run_mlwb
from mlwb.cli import main
from mlwb.config import MlwbError, load_settings
from mlwb.batch import load_batch_model, predict_file
from mlwb.container import deploy_files
from mlwb.tracking import ensure_experiment, mlflow_client, tracking_to

MODEL_URI = "models:/fraud@champion"
FEATURES = ["amount", "hour", "category"]
K8S_VERSION = "1.35.0"  # the Kubernetes API version the manifests are validated against (schemas shipped in kubernetes-validate)


def card_rows(n: int, seed: int = 0) -> pd.DataFrame:
    "Rows with an id the model does not use, two numbers and a category."
    rng = np.random.default_rng(seed)
    return pd.DataFrame({"row_id": np.arange(n), "amount": rng.gamma(2.0, 30.0, n).round(2),
                         "hour": rng.integers(0, 24, n), "category": rng.choice(["food", "travel", "online"], n)})


def fit_classifier(rows):
    from sklearn.compose import ColumnTransformer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import OneHotEncoder
    y = ((rows.amount > 60) & ((rows.category == "online") | (rows.hour < 6))).astype(int)
    encode = ColumnTransformer([("category", OneHotEncoder(handle_unknown="ignore"), ["category"])], remainder="passthrough")
    return make_pipeline(encode, LogisticRegression(max_iter=500)).fit(rows[FEATURES], y)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    "A workspace whose embedded MLflow store holds `fraud` (a skops-saved scikit-learn pipeline, alias champion) and a pyfunc-only model."
    import mlflow
    import skops.io as sio
    from mlflow.models import infer_signature
    ws = new_workspace(tmp_path_factory.mktemp("deploy"))
    settings = load_settings(ws, environ={})
    rows = card_rows(3_000)
    pipeline = fit_classifier(rows)
    client = mlflow_client(settings)
    with tracking_to(settings):
        with mlflow.start_run(experiment_id=ensure_experiment(client, "deploy-tests", settings)):
            X = rows[FEATURES]  # saved with skops, as mlwb.train does; explicit requirements skip MLflow's slow inference of them
            info = mlflow.sklearn.log_model(pipeline, name="model", signature=infer_signature(X, pipeline.predict(X)), input_example=X.head(3),
                                            serialization_format="skops", skops_trusted_types=sio.get_untrusted_types(data=sio.dumps(pipeline)),
                                            pip_requirements=["scikit-learn", "skops"])
            pyfunc_info = mlflow.pyfunc.log_model(name="doubler", python_model=double_amount, input_example=rows[["amount"]].head(3), pip_requirements=["pandas"])
        version = mlflow.register_model(info.model_uri, "fraud")
        client.set_registered_model_alias("fraud", "champion", version.version)
    return {"workspace": ws, "settings": settings, "pipeline": pipeline, "pyfunc_uri": pyfunc_info.model_uri, "native_uri": info.model_uri}


def double_amount(model_input: pd.DataFrame) -> list:
    "A function-based pyfunc model: twice the amount."
    return (model_input["amount"] * 2).tolist()


@pytest.fixture
def in_store(store, monkeypatch, tmp_path):
    "Point mlwb (in this process and in `mlwb` subprocesses) at the store's workspace; work in tmp_path."
    monkeypatch.setenv("MLWB_WORKSPACE", str(store["workspace"]))
    for name in [n for n in os.environ if n.startswith("MLWB_") and n != "MLWB_WORKSPACE"] + ["MLFLOW_TRACKING_URI", "MLFLOW_RUN_ID"]:
        monkeypatch.delenv(name, raising=False)
    return store


def read(path: Path) -> pd.DataFrame:
    return pd.read_parquet(path) if path.suffix == ".parquet" else pd.read_csv(path)


# --- batch scoring -----------------------------------------------------------------------------------

@pytest.mark.parametrize("source,target", [(".csv", ".parquet"), (".parquet", ".csv")])
def test_predictions_equal_the_models_own(in_store, tmp_path, source, target):
    rows = card_rows(2_500, seed=1)
    rows.to_csv(tmp_path / "in.csv", index=False); rows.to_parquet(tmp_path / "in.parquet", index=False)
    summary = predict_file(MODEL_URI, tmp_path / f"in{source}", tmp_path / f"out{target}", chunk_rows=600, progress=False)
    out, model = read(tmp_path / f"out{target}"), in_store["pipeline"]
    assert summary.rows == 2_500 and summary.chunks == 5 and summary.columns == [*rows.columns, "prediction", "probability"]
    assert out.row_id.tolist() == rows.row_id.tolist()
    assert (out.prediction.to_numpy() == model.predict(rows[FEATURES])).all()
    assert np.allclose(out.probability, model.predict_proba(rows[FEATURES])[:, 1], rtol=0, atol=1e-12)
    assert 0 < out.prediction.mean() < 1  # both classes appear, so equality above is not trivial


def test_chunked_equals_unchunked(in_store, tmp_path):
    card_rows(4_000, seed=2).to_parquet(tmp_path / "in.parquet", index=False)
    small = predict_file(MODEL_URI, tmp_path / "in.parquet", tmp_path / "small.parquet", chunk_rows=333, progress=False)
    whole = predict_file(MODEL_URI, tmp_path / "in.parquet", tmp_path / "whole.parquet", chunk_rows=10**6, progress=False)
    assert (small.chunks, whole.chunks) == (13, 1)
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "small.parquet"), pd.read_parquet(tmp_path / "whole.parquet"))


def test_runs_uri_pyfunc_fallback_and_selected_columns(in_store, tmp_path):
    rows = card_rows(500, seed=3)
    rows.to_csv(tmp_path / "in.csv", index=False)
    model = load_batch_model(in_store["pyfunc_uri"])
    assert model.flavor == "python_function"
    summary = predict_file(in_store["pyfunc_uri"], tmp_path / "in.csv", tmp_path / "out.csv", columns=["row_id"], progress=False)
    out = pd.read_csv(tmp_path / "out.csv")
    assert summary.columns == ["row_id", "prediction"] and np.allclose(out.prediction, rows.amount * 2)
    native = predict_file(in_store["native_uri"], tmp_path / "in.csv", tmp_path / "native.parquet", progress=False, probabilities=False)
    assert native.columns == [*rows.columns, "prediction"]


def test_bad_inputs_name_the_file_and_column(in_store, tmp_path):
    rows = card_rows(300, seed=4)
    rows.drop(columns=["hour"]).to_csv(tmp_path / "no-hour.csv", index=False)
    rows.assign(hour=rows.hour.astype(str).where(rows.index != 7, "noon")).to_parquet(tmp_path / "typed.parquet", index=False)
    rows.to_parquet(tmp_path / "parquet-inside.csv", index=False)
    rows.to_csv(tmp_path / "text-inside.parquet", index=False)
    rows.to_csv(tmp_path / "ok.csv", index=False)
    cases = [(MODEL_URI, "no-hour.csv", "out.csv", "no-hour.csv: missing column(s) 'hour'"),
             (MODEL_URI, "typed.parquet", "out.csv", "typed.parquet: column 'hour' has 1 value(s) that are not int64, e.g. 'noon' in row 7"),
             (MODEL_URI, "parquet-inside.csv", "out.csv", "parquet-inside.csv: binary data, not CSV text (it is a Parquet file)"),
             (MODEL_URI, "text-inside.parquet", "out.csv", "text-inside.parquet: not a Parquet file"),
             (MODEL_URI, "ok.csv", "out.json", "output file") ,
             (MODEL_URI, "missing.csv", "out.csv", "missing.csv: not found"),
             ("models:/no-such-model@champion", "ok.csv", "out.csv", "model 'models:/no-such-model@champion'")]
    for model, source, target, message in cases:
        with pytest.raises(MlwbError, match=None) as caught:
            predict_file(model, tmp_path / source, tmp_path / target, progress=False)
        assert message in str(caught.value), (source, str(caught.value))
    with pytest.raises(MlwbError, match="no column.*'nope'"):
        predict_file(MODEL_URI, tmp_path / "ok.csv", tmp_path / "out.csv", columns=["row_id", "nope"], progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["no-hour.csv", "typed.parquet", "parquet-inside.csv", "text-inside.parquet", "ok.csv"])


def test_command_line_predict(in_store, tmp_path):
    card_rows(1_000, seed=5).to_parquet(tmp_path / "in.parquet", index=False)
    done = run_mlwb("predict", MODEL_URI, tmp_path / "in.parquet", tmp_path / "out.csv", "--chunk-rows", "250", "--columns", "row_id", timeout=120)
    assert done.returncode == 0, done.stderr
    assert "scored 1,000 rows" in done.stdout and list(pd.read_csv(tmp_path / "out.csv").columns) == ["row_id", "prediction", "probability"]
    failed = CliRunner().invoke(main, ["predict", MODEL_URI, str(tmp_path / "in.parquet"), str(tmp_path / "out.csv"), "--columns", "account"])
    assert failed.exit_code == 2 and "error: input file" in failed.output and "'account'" in failed.output and "Traceback" not in failed.output


WAITS_FOR_GO = """
import os, select, signal, sys
import mlflow

class WaitsForGo(mlflow.pyfunc.PythonModel):
    "Says on stdout that it is scoring, then waits for stdin: the run cannot end before the test says go."
    def predict(self, context, model_input, params=None):
        wake, wake_up = os.pipe()  # a signal caught by any thread writes here, so the wait below ends at once
        os.set_blocking(wake_up, False)
        signal.set_wakeup_fd(wake_up)
        print("scoring", flush=True)
        select.select([sys.stdin, wake], [], [])  # Ctrl-C raises KeyboardInterrupt as soon as this returns
        sys.stdin.readline()
        return (model_input["amount"] * 2).tolist()

mlflow.models.set_model(WaitsForGo())
"""


@pytest.fixture(scope="module")
def waiting_model(tmp_path_factory):
    "A model folder whose predict blocks until its process reads a line from stdin."
    import mlflow.pyfunc
    folder = tmp_path_factory.mktemp("waiting")
    (folder / "waits_for_go.py").write_text(WAITS_FOR_GO)
    mlflow.pyfunc.save_model(folder / "model", python_model=str(folder / "waits_for_go.py"),
                             input_example=card_rows(3)[["amount"]], pip_requirements=[])
    return folder / "model"


def default_sigint():
    "In the child: Ctrl-C's default action, even if pytest was started with SIGINT ignored (`cmd &`)."
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.parametrize("signal_number", [signal.SIGINT, signal.SIGKILL])
def test_interrupted_run_leaves_no_output(in_store, waiting_model, tmp_path, signal_number):
    card_rows(1_000, seed=6).to_parquet(tmp_path / "big.parquet", index=False)
    output = tmp_path / "scores.parquet"
    with open(tmp_path / "stderr.txt", "w") as stderr:
        process = subprocess.Popen([str(MLWB), "predict", str(waiting_model), str(tmp_path / "big.parquet"), str(output),
                                    "--chunk-rows", "500", "--quiet"],
                                   stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr, text=True,
                                   preexec_fn=default_sigint)
    try:
        lines = iter(process.stdout.readline, "")  # blocks until a line comes, or the process ends
        assert "scoring" in (line.strip() for line in lines), (tmp_path / "stderr.txt").read_text()
        assert process.poll() is None and list(tmp_path.glob(".scores.parquet.*.partial"))  # mid-run, in the model
        process.send_signal(signal_number)
        process.wait(timeout=60)
    finally:
        if process.poll() is None: process.kill(); process.wait()
        process.stdin.close(); process.stdout.close()
    stderr = (tmp_path / "stderr.txt").read_text()
    assert process.returncode != 0 and not output.exists(), stderr
    if signal_number == signal.SIGINT:  # cleanup ran: not even the temporary file is left
        assert not list(tmp_path.glob(".scores.parquet*")), list(tmp_path.iterdir())
    else:  # nothing can clean up after SIGKILL; what is left is a hidden, clearly partial file, never OUTPUT
        assert all(p.name.endswith(".partial") for p in tmp_path.glob(".scores.parquet*"))


# --- deployment files ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def deployment(store, tmp_path_factory):
    "The deployment folder for the registered model."
    out = tmp_path_factory.mktemp("deploy-files") / "fraud"
    files = deploy_files(MODEL_URI, out, replicas=2, port=8080, settings=store["settings"])
    return out, files


def test_deploy_writes_every_file(deployment):
    out, files = deployment
    assert set(files) == {"Dockerfile", "settings.ini", "README.md", "k8s/deployment.yaml", "k8s/service.yaml", "k8s/hpa.yaml"}
    assert (out / "model" / "MLmodel").is_file() and (out / "app" / "constraints.txt").is_file() and (out / "app" / "mlwb" / "container.py").is_file()
    assert (out / "app" / "constraints.txt").read_text() == (REPO / "constraints.txt").read_text()
    assert not list(out.parent.glob(".fraud*"))  # no temporary folder left beside it


def test_dockerfile_passes_hadolint(deployment):
    out, _ = deployment
    lint = subprocess.run([str(Path(sys.executable).parent / "hadolint"), "--no-color", "--failure-threshold", "style", str(out / "Dockerfile")],
                          capture_output=True, text=True, timeout=60)
    assert lint.returncode == 0 and lint.stdout.strip() == "", lint.stdout + lint.stderr
    text = (out / "Dockerfile").read_text()
    assert "FROM python:3.11" in text and "-slim" in text and "\nUSER 10001\n" in text and "HEALTHCHECK" in text and "/health/live" in text
    assert "-c /opt/mlwb-src/constraints.txt" in text and "COPY model/" in text and '"--host", "0.0.0.0"' in text and '"--allowed-hosts"' in text


def test_hadolint_does_flag_a_bad_dockerfile(tmp_path):
    (tmp_path / "Dockerfile").write_text("FROM python:latest\nRUN pip install flask\nCMD python app.py\n")
    lint = subprocess.run([str(Path(sys.executable).parent / "hadolint"), "--no-color", str(tmp_path / "Dockerfile")], capture_output=True, text=True, timeout=60)
    assert lint.returncode != 0 and "DL3007" in lint.stdout  # the linter really runs: ':latest' is reported


@pytest.fixture
def no_network(monkeypatch):
    "Any attempt to open a network connection fails."
    def refuse(*args, **kwargs): raise OSError("network access attempted during an offline test")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def test_manifests_validate_offline(deployment, no_network):
    import kubernetes_validate
    schemas = Path(kubernetes_validate.__file__).parent / "kubernetes-json-schema" / f"v{K8S_VERSION}-local-strict"
    assert (schemas / "deployment-apps-v1.json").is_file() and (schemas / "horizontalpodautoscaler-autoscaling-v2.json").is_file()
    out, files = deployment
    kinds = {}
    for name in ("k8s/deployment.yaml", "k8s/service.yaml", "k8s/hpa.yaml"):
        for document in yaml.safe_load_all(files[name].read_text()):
            kubernetes_validate.validate(document, K8S_VERSION, strict=True)
            kinds[document["kind"]] = document
    assert set(kinds) == {"Deployment", "Service", "HorizontalPodAutoscaler"}
    pod = kinds["Deployment"]["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["livenessProbe"]["httpGet"]["path"] == "/health/live" and container["readinessProbe"]["httpGet"]["path"] == "/health/ready"
    assert set(container["resources"]) == {"requests", "limits"} and pod["securityContext"]["runAsNonRoot"] is True
    assert pod["terminationGracePeriodSeconds"] > 0 and kinds["HorizontalPodAutoscaler"]["apiVersion"] == "autoscaling/v2"
    assert kinds["HorizontalPodAutoscaler"]["spec"]["scaleTargetRef"]["name"] == kinds["Deployment"]["metadata"]["name"] == kinds["Service"]["metadata"]["name"]


def test_validator_rejects_a_broken_manifest(deployment, no_network):
    import kubernetes_validate
    out, files = deployment
    broken = yaml.safe_load(files["k8s/deployment.yaml"].read_text())
    broken["spec"]["replicas"] = "two"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSION, strict=True)
    unknown = yaml.safe_load(files["k8s/service.yaml"].read_text())
    unknown["spec"]["portz"] = []
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(unknown, K8S_VERSION, strict=True)


def test_deployment_runs_a_serve_command_line_that_parses(deployment):
    from mlwb.serve import serve_command
    out, files = deployment
    args = yaml.safe_load(files["k8s/deployment.yaml"].read_text())["spec"]["template"]["spec"]["containers"][0]["args"]
    context = serve_command.make_context("serve", list(args[2:]))
    assert args[:2] == ["mlwb", "serve"] and context.params["host"] == "0.0.0.0" and context.params["port"] == 8080
    assert "fraud" in context.params["allowed_hosts"].split(",") and context.params["grace"] < yaml.safe_load(files["k8s/deployment.yaml"].read_text())["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]


def test_command_line_deploy_and_its_errors(in_store, tmp_path):
    done = run_mlwb("deploy", MODEL_URI, "--out", tmp_path / "d", "--name", "fraud-api", "--replicas", "3", "--image", "registry.example.com/fraud:v1", timeout=120)
    assert done.returncode == 0, done.stderr
    hpa = yaml.safe_load((tmp_path / "d" / "k8s" / "hpa.yaml").read_text())
    assert hpa["metadata"]["name"] == "fraud-api" and hpa["spec"]["minReplicas"] == 3 and hpa["spec"]["maxReplicas"] == 12
    failed = CliRunner().invoke(main, ["deploy", MODEL_URI, "--out", str(tmp_path / "e"), "--name", "Fraud_API"])
    assert failed.exit_code == 2 and "error: --name 'Fraud_API': expected a DNS-1123 label" in failed.output and "Traceback" not in failed.output
    for options, message in [({"port": 99999}, "--port 99999"), ({"replicas": 0}, "--replicas 0"), ({"image": "fraud:latest"}, "--image 'fraud:latest'"),
                             ({"max_replicas": 1}, "--max-replicas 1: expected a whole number from 2"), ({"allowed_hosts": ["bad host"]}, "--allowed-host 'bad host'")]:
        with pytest.raises(MlwbError, match=None) as caught:
            deploy_files(MODEL_URI, tmp_path / "e", **options)
        assert message in str(caught.value), (options, str(caught.value))
    with pytest.raises(MlwbError, match="--force"):
        deploy_files(MODEL_URI, tmp_path / "d")
    with pytest.raises(MlwbError, match="models:/fraud@no-such-alias"):
        deploy_files("models:/fraud@no-such-alias", tmp_path / "e")
    assert not (tmp_path / "e").exists() and not list(tmp_path.glob(".*"))  # a failed request leaves no folder, not even a temporary one
