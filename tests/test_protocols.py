"""`mlwb serve` spoken to by clients nobody here wrote: MLflow's own scoring client and its scoring server (the
reference for every answer and error of `/invocations`), and Triton's published Open Inference Protocol client
(`tritonclient.http`) against `/v2`, with good and bad requests, on a real server over the network."""
import io
import json
import os
import time

import httpx
import numpy as np
import pandas as pd
import pytest

from conftest import new_workspace
from test_serve import COLUMNS, Server, card_rows, fraud_model, log_sklearn, register

NAME = "fraud detection"  # a registered name with a space: clients must quote it in /v2 paths


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    "A server for the fraud-like model (at most 50 rows a request); yields (server, pipeline, workspace, URI)."
    ws = new_workspace(tmp_path_factory.mktemp("protocols"))
    pipeline, X = fraud_model()
    uri = register(ws, NAME, log_sklearn(pipeline, X))
    server = Server(ws, uri, "--max-rows", 50).wait_ready()
    yield server, pipeline, ws, uri
    server.stop()


# --- MLflow's scoring protocol ----------------------------------------------------------------------

def test_mlflows_scoring_client_scores_and_checks_health(served):
    from mlflow.pyfunc.scoring_server.client import ScoringServerClient
    import mlflow
    server, pipeline, _, _ = served
    client = ScoringServerClient("127.0.0.1", server.port)
    client.wait_server_ready(timeout=30)  # GET /ping
    assert client.get_version() == mlflow.__version__
    rows = card_rows(20, seed=11)  # every ninth distance missing: NaN in MLflow's JSON
    for data in (rows, json.loads(rows.to_json(orient="records"))):  # dataframe_split, then inputs as rows
        answer = client.invoke(data)
        assert answer.get_predictions(predictions_format="ndarray").tolist() == pipeline.predict(rows).tolist()
    with pytest.raises(Exception, match="error code 400") as refused:
        client.invoke(rows.assign(hour="three o'clock"))
    assert '"error_code":"INVALID_PARAMETER_VALUE"' in str(refused.value) and "'hour'" in str(refused.value)


@pytest.fixture(scope="module")
def mlflow_reference(served):
    "MLflow's own scoring server app (`mlflow models serve`'s) for the same registered model, in process."
    from fastapi.testclient import TestClient
    import mlflow.pyfunc
    from mlflow.environment_variables import _MLFLOW_IS_IN_SERVING_ENVIRONMENT
    from mlflow.pyfunc import scoring_server
    from mlwb.config import load_settings
    from mlwb.tracking import tracking_to
    _, _, ws, uri = served
    with tracking_to(load_settings(ws, environ={})): model = mlflow.pyfunc.load_model(uri)
    before = os.environ.get(_MLFLOW_IS_IN_SERVING_ENVIRONMENT.name)
    app = scoring_server.init(model)  # sets that variable for the process: put back below
    with TestClient(app) as client: yield client
    if before is None: os.environ.pop(_MLFLOW_IS_IN_SERVING_ENVIRONMENT.name, None)
    else: os.environ[_MLFLOW_IS_IN_SERVING_ENVIRONMENT.name] = before


ROWS = card_rows(6, seed=12)
RECORDS = json.loads(ROWS.to_json(orient="records"))
JSON = "application/json"
INVOCATIONS = [  # (name, body, content type): sent to MLflow's server and to ours
    ("dataframe_split", json.dumps({"dataframe_split": ROWS.to_dict(orient="split")}), JSON),
    ("dataframe_records", json.dumps({"dataframe_records": RECORDS}), JSON),
    ("instances", json.dumps({"instances": RECORDS}), JSON),
    ("inputs as columns", json.dumps({"inputs": ROWS.to_dict(orient="list")}), JSON),
    ("params ignored", json.dumps({"dataframe_records": RECORDS, "params": {}}), JSON),
    ("csv", ROWS.to_csv(index=False), "text/csv"),
    ("csv with charset", ROWS.to_csv(index=False), "text/csv; charset=utf-8"),
    ("a text in a number column", json.dumps({"dataframe_records": [{**RECORDS[0], "amount": "a lot"}]}), JSON),
    ("a missing column", json.dumps({"dataframe_records": [{k: v for k, v in RECORDS[0].items() if k != "hour"}]}), JSON),
    ("our own form", json.dumps({"records": RECORDS}), JSON),
    ("two forms", json.dumps({"dataframe_records": RECORDS, "instances": RECORDS}), JSON),
    ("a list", json.dumps(RECORDS), JSON),
    ("not JSON", '{"dataframe_records": [', JSON),
    ("plain text", json.dumps({"dataframe_records": RECORDS}), "text/plain"),
    ("latin-1", json.dumps({"dataframe_records": RECORDS}), "application/json; charset=latin-1"),
    ("an unknown parameter", json.dumps({"dataframe_records": RECORDS}), "application/json; format=pandas-split"),
]


def media(response) -> str:
    return response.headers.get("content-type", "").split(";")[0]


@pytest.mark.parametrize("name,body,content_type", INVOCATIONS, ids=[c[0] for c in INVOCATIONS])
def test_invocations_answer_as_mlflows_own_scoring_server(served, mlflow_reference, name, body, content_type):
    from mlflow.exceptions import ERROR_CODE_TO_HTTP_STATUS
    server = served[0]
    theirs = mlflow_reference.post("/invocations", content=body, headers={"content-type": content_type})
    ours = httpx.post(f"{server.url}/invocations", content=body, headers={"content-type": content_type}, timeout=10)
    assert (ours.status_code, media(ours)) == (theirs.status_code, media(theirs)), (ours.text, theirs.text[:300])
    if theirs.status_code == 200: assert ours.json() == theirs.json()
    elif media(theirs) == "application/json":  # MLflow says BAD_REQUEST or INVALID_PARAMETER_VALUE for a bad input
        assert ERROR_CODE_TO_HTTP_STATUS[ours.json()["error_code"]] == theirs.status_code and ours.json()["message"], ours.text
    for secret in ("a lot", "Traceback"): assert secret not in ours.text


def test_ping_and_health_answer_as_mlflows(served, mlflow_reference):
    server = served[0]
    for path in ("/ping", "/health"):
        ours, theirs = httpx.get(f"{server.url}{path}"), mlflow_reference.get(path)
        assert (ours.status_code, ours.text, media(ours)) == (theirs.status_code, theirs.text, media(theirs))
    assert httpx.get(f"{server.url}/version").text == mlflow_reference.get("/version").text


# --- the Open Inference Protocol ----------------------------------------------------------------------

def triton(server):
    import tritonclient.http as http
    return http.InferenceServerClient(url=f"127.0.0.1:{server.port}", connection_timeout=10, network_timeout=10)


DATATYPES = {"amount": "FP64", "hour": "INT64", "distance": "FP64", "category": "BYTES"}


def tensors(rows: pd.DataFrame, binary: bool, datatypes=DATATYPES) -> list:
    "One `InferInput` per column, its data as binary tensor data or JSON."
    import tritonclient.http as http
    inputs = []
    for column, datatype in datatypes.items():
        values = rows[column].to_numpy(dtype=object if datatype == "BYTES" else None)
        tensor = http.InferInput(column, [len(rows)], datatype)
        tensor.set_data_from_numpy(values.astype({"FP64": np.float64, "INT64": np.int64}.get(datatype, object)), binary_data=binary)
        inputs.append(tensor)
    return inputs


def test_triton_client_sees_health_and_typed_metadata(served):
    server = served[0]
    client = triton(server)
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready(NAME)
    assert client.is_model_ready(NAME, "1") and client.is_model_ready("champion")
    assert client.get_server_metadata()["name"] == "mlwb"
    meta = client.get_model_metadata(NAME)
    assert meta["name"] == NAME and meta["versions"] == ["1"]
    assert [(t["name"], t["datatype"], t["shape"]) for t in meta["inputs"]] == [(c, DATATYPES[c], [-1]) for c in COLUMNS]
    assert [(t["name"], t["datatype"], t["shape"]) for t in meta["outputs"]] == [("predictions", "INT64", [-1]), ("probabilities", "FP64", [-1, 2])]
    from tritonclient.utils import InferenceServerException
    with pytest.raises(InferenceServerException, match="not served here"): client.get_model_metadata("nothing")


@pytest.mark.parametrize("binary", [True, False], ids=["binary tensor data", "JSON data"])
def test_triton_client_infers_the_models_own_predictions(served, binary):
    import tritonclient.http as http
    server, pipeline, _, _ = served
    rows = card_rows(12, seed=13)
    if not binary: rows = rows.fillna(1.0)  # JSON has no NaN: a missing value there is for binary data
    result = triton(server).infer(NAME, tensors(rows, binary), request_id="q-7")
    assert result.get_response()["id"] == "q-7" and result.get_response()["model_version"] == "1"
    assert result.as_numpy("predictions").tolist() == pipeline.predict(rows).tolist()
    assert np.allclose(result.as_numpy("probabilities").reshape(-1, 2), pipeline.predict_proba(rows), atol=1e-5)
    only = triton(server).infer("champion", tensors(rows, binary), outputs=[http.InferRequestedOutput("probabilities", binary_data=False)])
    assert [o["name"] for o in only.get_response()["outputs"]] == ["probabilities"]


BAD_TENSORS = [  # (what is wrong, change to the good request, status, words of the message)
    ("a datatype that is not the column's", {"datatypes": {**DATATYPES, "hour": "FP64"}}, "400", ["'hour'", "expected INT64"]),
    ("a missing column", {"datatypes": {k: v for k, v in DATATYPES.items() if k != "hour"}}, "400", ["missing column 'hour'"]),
    ("an extra column", {"datatypes": {**DATATYPES, "extra": "FP64"}}, "400", ["unexpected column 'extra'"]),
    ("too many rows", {"rows": 51}, "413", ["at most 50"]),
    ("an unknown model", {"model": "nothing"}, "404", ["not served here"]),
    ("a version not served", {"version": "7"}, "404", ["version '7'"]),
    ("an unknown output", {"outputs": ["secret"]}, "400", ["output 'secret'"]),
]


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
@pytest.mark.parametrize("wrong,change,status,words", BAD_TENSORS, ids=[b[0] for b in BAD_TENSORS])
def test_triton_client_gets_the_oip_error_naming_the_field(served, binary, wrong, change, status, words):
    import tritonclient.http as http
    from tritonclient.utils import InferenceServerException
    server = served[0]
    rows = card_rows(change.get("rows", 3), seed=14).fillna(1.0).assign(extra=1.0)
    outputs = [http.InferRequestedOutput(name) for name in change.get("outputs", [])] or None
    with pytest.raises(InferenceServerException) as refused:
        triton(server).infer(change.get("model", NAME), tensors(rows, binary, change.get("datatypes", DATATYPES)),
                             model_version=change.get("version", ""), outputs=outputs)
    assert refused.value.status() == status, refused.value
    assert all(w in refused.value.message() for w in words), refused.value.message()


def test_malformed_infer_bodies_get_a_400_in_the_oip_shape(served):
    server = served[0]
    url = f"{server.url}/v2/models/{NAME}/infer"
    tensor = {"name": "amount", "datatype": "FP64", "shape": [1], "data": [1.0]}
    for body, words in ((b'{"inputs": [', "not valid JSON"), (b'{"inputs": 3}', "'inputs' list"), (b"", "empty"),
                        (json.dumps({"inputs": [{**tensor, "shape": [1, 2]}]}).encode(), "'shape' must be"),
                        (json.dumps({"inputs": [{**tensor, "data": [1.0, 2.0]}]}).encode(), "2 values for 1 rows"),
                        (json.dumps({"inputs": [{**tensor, "parameters": {"binary_data_size": 8}}]}).encode(), "past the end")):
        answer = httpx.post(url, content=body, timeout=10)
        assert answer.status_code == 400 and set(answer.json()) == {"error"} and words in answer.json()["error"], answer.text


# --- one server: the same log, metrics and documentation -------------------------------------------------

def test_every_protocol_is_logged_and_counted_as_predict_is(served):
    server = served[0]
    rows = card_rows(3, seed=15).fillna(1.0)
    ids = [httpx.post(f"{server.url}/invocations", json={"dataframe_records": json.loads(rows.to_json(orient="records"))}).headers["x-request-id"],
           httpx.post(f"{server.url}/v2/models/{NAME}/infer", json={"inputs": [
               {"name": c, "datatype": DATATYPES[c], "shape": [3], "data": rows[c].tolist()} for c in COLUMNS]}).headers["x-request-id"]]
    deadline = time.monotonic() + 10
    while len(logged := [r for r in server.log_records() if r["request_id"] in ids]) < 6 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert sorted((r["request_id"], r["row"]) for r in logged) == sorted((i, row) for i in ids for row in range(3))
    assert all(r["status"] == 200 and r["variant"] == "champion" and set(r["inputs"]) == set(COLUMNS) for r in logged)
    metrics = httpx.get(f"{server.url}/metrics").text
    count = next(float(line.split()[-1]) for line in metrics.splitlines() if line.startswith('mlwb_requests_total{status="200",variant="champion"}'))
    assert count >= 2


def test_the_openapi_page_documents_all_three_protocols(served):
    server = served[0]
    doc = httpx.get(f"{server.url}/openapi.json").json()
    assert {"/predict", "/invocations", "/ping", "/v2/health/ready", "/v2/models/{name}/infer"} <= set(doc["paths"])
    schemas = doc["components"]["schemas"]
    assert schemas["MlflowSplit"]["properties"]["dataframe_split"]["properties"]["columns"]["items"]["enum"] == COLUMNS
    names = schemas["InferRequest"]["properties"]["inputs"]["items"]["properties"]["name"]["enum"]
    assert names == COLUMNS and "text/csv" in doc["paths"]["/invocations"]["post"]["requestBody"]["content"]
