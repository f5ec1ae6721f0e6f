"""The monitoring report speaks to a person: seeded drifted, healthy and performance-drop data give reports
whose verdict box says what drifted, whether performance held and what to do, with the exit status in words,
the metric on an axis from 0, and the statistics folded away."""
import json
import re
from html import unescape

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from mlwb.monitor import monitor
from mlwb.monitor_figures import trend_figure
from mlwb.report import monitor_command, write_report


def transactions(seed: int, n: int = 3_000, shift: float = 0.0, flip: float = 0.0, start: str = "2026-03-01"):
    "Amounts, a channel, an hour, a label and a good model's score; `shift` moves the inputs, `flip` the labels."
    rng = np.random.default_rng(seed)
    label = rng.random(n) < 0.3
    score = 1 / (1 + np.exp(-(6 * (label - 0.5) + rng.normal(0, 2.5, n))))
    label = label ^ (rng.random(n) < flip)  # the world's answers changed, the inputs did not
    return pd.DataFrame({"amount": rng.gamma(2, 20, n) * (1 + shift),
                         "channel": rng.choice(["shop", "online"], n, p=[0.8 - shift / 2, 0.2 + shift / 2]),
                         "hour": rng.integers(0, 24, n), "is_fraud": label.astype(int), "score": score,
                         "ts": pd.Timestamp(start, tz="UTC") + pd.to_timedelta(rng.random(n) * 2, unit="D")})


REFERENCE = transactions(0)
CASES = {"drifted": transactions(1, shift=0.5), "healthy": transactions(3), "worse": transactions(2, flip=0.2)}


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
    "Each case's report page (as text), its summary.json and its exit status."
    out = {}
    for name, current in CASES.items():
        result = monitor(REFERENCE, current, target="is_fraud", prediction="score", ignore=["ts"])
        paths = write_report(result, tmp_path_factory.mktemp(name))
        out[name] = (paths["html"].read_text(), json.loads(paths["json"].read_text()), result.exit_code)
    return out


def box(page: str) -> str:
    "The text of the verdict box at the top of the page."
    html = re.search(r'<div class="box (\w+)">(.*?)</div>', page, re.S)
    return html.group(1), unescape(re.sub(r"<[^>]+>", " ", html.group(2)))


def test_a_drifted_window_names_its_columns_says_performance_held_and_advises(reports):
    page, summary, code = reports["drifted"]
    colour, text = box(page)
    assert code == 3 and colour == "warn"
    assert "The inputs changed: 2 of 4 columns drifted; the model's performance held." in text
    assert re.search(r"amount moved strongly: median 3\d\.\d before, 4\d\.\d now", text), text
    assert re.search(r"channel moved clearly: 'online' (19|20)% of rows before, 4\d% now", text), text
    assert "Performance held: roc_auc 0.9" in text and "the alarm is at 5% worse" in text
    assert "consider retraining on recent data" in text
    assert summary["in_words"]["status"] == ("exit 3: drift -- inputs changed; performance held; "
                                             "look at amount, channel, consider retraining on recent data")


def test_a_healthy_window_says_nothing_to_do(reports):
    page, summary, code = reports["healthy"]
    colour, text = box(page)
    assert code == 0 and colour == "good"
    assert text.strip().startswith("Healthy: the current data looks like the reference, and the model performs")
    assert "What changed" not in text and "Nothing to do" in text
    assert summary["in_words"]["status"].startswith("exit 0: healthy -- ")


def test_a_performance_drop_without_drift_says_the_model_got_worse(reports):
    page, summary, code = reports["worse"]
    colour, text = box(page)
    assert code == 5 and colour == "alarm"
    assert re.search(r"The model got worse: roc_auc fell from 0\.9\d\d to 0\.7\d\d\.", text), text
    assert "No input column drifted." in text and "Performance dropped" in text
    assert "Retrain on recent labelled data" in text and "roll back" in text
    assert summary["in_words"]["status"].startswith("exit 5: performance below reference -- the model got worse; "
                                                    "inputs unchanged")


def test_statistics_are_folded_under_the_plots(reports):
    page = reports["drifted"][0]
    assert page.index('alt="drift scores per feature"') < page.index("The drift tests of every column")
    assert all(page.rfind("<details>", 0, m.start()) > page.rfind("</details>", 0, m.start())
               for m in re.finditer("<table", page)), "a table outside a <details> element"


def test_the_metric_axis_starts_at_zero_and_shows_the_alarm_line():
    current = pd.concat([transactions(4, start="2026-03-01"), transactions(5, start="2026-03-03")])
    result = monitor(REFERENCE, current, target="is_fraud", prediction="score", every="2d", time_column="ts")
    assert [round(w.performance["current"], 2) > 0.9 for w in result.windows] == [True, True]
    metric_axis = trend_figure(result).axes[1]
    assert metric_axis.get_ylim()[0] == 0 and metric_axis.get_ylim()[1] <= 1.02  # 0.96 vs 0.95 is not a cliff
    labels = [line.get_label() for line in metric_axis.get_lines()]
    assert any(label.startswith("alarm at 0.9") for label in labels), labels


def test_the_command_prints_the_exit_status_in_words(tmp_path):
    REFERENCE.to_parquet(tmp_path / "reference.parquet")
    CASES["drifted"].to_parquet(tmp_path / "current.parquet")
    out = CliRunner().invoke(monitor_command, [
        "--reference", str(tmp_path / "reference.parquet"), "--current", str(tmp_path / "current.parquet"),
        "--target", "is_fraud", "--prediction", "score", "--ignore", "ts", "--out", str(tmp_path / "out")])
    assert out.exit_code == 3, out.output
    assert "exit 3: drift -- inputs changed; performance held; look at amount, channel" in out.output
