"""Tuning with MLflow and worker processes: every trial counted and logged once, as a nested run under the study's
run, whether the trials run here or in spawned workers; the configured pruner and seeded samplers reach every worker;
pruned and failed trials say so in their run's status and tag; a seed repeats the search."""
import mlflow
import numpy as np
import optuna
import pandas as pd
import pytest

from mlwb.config import load_settings
from mlwb.tracking import ensure_experiment, mlflow_client, tracking_to
from mlwb.tune import tune

N_TRIALS = 6
QUICK = dict(model="logistic", metric="roc_auc", folds=3, n_trials=N_TRIALS, seed=3)  # fits in milliseconds
RUN_STATUS = {"COMPLETE": "FINISHED", "PRUNED": "KILLED", "FAIL": "FAILED"}


def table(n=150, seed=0) -> pd.DataFrame:
    "A small binary classification table: two informative columns, one of noise, and the target y."
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, 3))
    return pd.DataFrame({"x1": X[:, 0], "x2": X[:, 1], "noise": X[:, 2], "y": (X[:, 0] - X[:, 1] + rng.normal(0, 1, n) > 0).astype(int)})


DATA = table()


class PruneOddTrials(optuna.pruners.BasePruner):  # at module level: a spawned worker imports it (pytest puts tests/ on sys.path)
    "Prune every odd-numbered trial at its first report: pruning that does not depend on the scores."
    def prune(self, study, trial) -> bool: return trial.number % 2 == 1


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    "An embedded MLflow store shared by this module's tests: (settings, client, experiment id)."
    settings = load_settings(tmp_path_factory.mktemp("tune-ws"), environ={})
    client = mlflow_client(settings)
    return settings, client, ensure_experiment(client, "tune-tests", settings)


def tune_logged(store, **options) -> tuple:
    "Tune `DATA` under a fresh parent run: (the result, or the error raised; the parent run; its nested runs by trial number)."
    settings, client, experiment_id = store
    with tracking_to(settings), mlflow.start_run(experiment_id=experiment_id) as parent:
        try: outcome = tune(DATA, "y", **{**QUICK, **options})
        except Exception as error: outcome = error
    children = client.search_runs([experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    runs = {int(run.info.run_name.removeprefix("trial ")): run for run in children}
    assert len(runs) == len(children), "two nested runs for one trial"
    return outcome, client.get_run(parent.info.run_id), runs


@pytest.fixture(scope="module")
def studies(store):
    "Logged studies with one seed, by (where the trials ran, pruner): (result, parent run, nested runs by trial number)."
    return {("serial", "median"): tune_logged(store, n_workers=1),  # the default pruner
            ("serial", "odd"): tune_logged(store, n_workers=1, pruner=PruneOddTrials()),
            ("parallel", "odd"): tune_logged(store, n_workers=2, pruner=PruneOddTrials())}  # one pool: spawning costs seconds


@pytest.mark.parametrize("key", [("serial", "median"), ("serial", "odd"), ("parallel", "odd")], ids="-".join)
def test_every_trial_is_counted_and_logged_once_under_the_study_run(studies, key):
    result, parent, runs = studies[key]
    assert result.n_complete + result.n_pruned == N_TRIALS == len(result.study.trials)
    assert sorted(runs) == list(range(N_TRIALS))
    for trial in result.study.trials:
        run = runs[trial.number]
        assert run.data.tags["mlwb.trial_state"] == trial.state.name and run.info.status == RUN_STATUS[trial.state.name]
    assert parent.data.metrics["best_roc_auc"] == result.best_value and parent.data.metrics["trials_complete"] == result.n_complete


@pytest.mark.parametrize("where", ["serial", "parallel"])
def test_the_configured_pruner_prunes_in_every_worker(studies, store, where):
    result, _, runs = studies[(where, "odd")]
    client = store[1]
    assert result.n_pruned == N_TRIALS // 2 and result.n_complete == N_TRIALS - N_TRIALS // 2
    for number, run in runs.items():
        state = "PRUNED" if number % 2 else "COMPLETE"
        assert run.data.tags["mlwb.trial_state"] == state and run.info.status == RUN_STATUS[state]
        assert len(client.get_metric_history(run.info.run_id, "fold_roc_auc")) == (1 if number % 2 else 3)  # pruned after its first fold


def test_each_worker_samples_with_the_seed_plus_its_number(studies):
    # With fewer trials than TPE's 10 random start-up trials, a sampler's points depend on its seed alone, so worker 0
    # (seed 3) proposes what a serial study with seed 3 proposes first, and worker 1 what one with seed 4 does.
    first_points = lambda result, n: [t.params["C"] for t in result.study.trials[:n]]
    share = N_TRIALS // 2
    seed_4 = tune(DATA, "y", **{**QUICK, "seed": 4, "n_trials": share}, log=False)
    expected = first_points(studies[("serial", "median")][0], share) + first_points(seed_4, share)
    assert sorted(first_points(studies[("parallel", "odd")][0], N_TRIALS)) == sorted(expected)
    assert len(set(expected)) == N_TRIALS


def test_a_failing_trial_is_recorded_as_failed_and_its_error_raised(store):
    error, _, runs = tune_logged(store, n_workers=1, params={"max_iter": -1})  # LogisticRegression refuses it in the first fold
    assert isinstance(error, ValueError) and "max_iter" in str(error)
    assert list(runs) == [0]  # the study stopped at the failure
    assert runs[0].data.tags["mlwb.trial_state"] == "FAIL" and runs[0].info.status == "FAILED"


def test_the_same_seed_gives_the_same_search():
    first, second = tune(DATA, "y", **QUICK, log=False), tune(DATA, "y", **QUICK, log=False)
    assert first.best_params == second.best_params and first.best_value == second.best_value
    assert [t.params for t in first.study.trials] == [t.params for t in second.study.trials]
    other = tune(DATA, "y", **{**QUICK, "seed": 4}, log=False)
    assert [t.params for t in other.study.trials] != [t.params for t in first.study.trials]
