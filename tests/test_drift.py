"""Drift judgement of a window against a reference (synthetic log rows), the label-free estimates, the report."""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pytest

from visionops.config import MonitorConfig
from visionops.errors import InvalidInputError
from visionops.monitoring.drift import judge_window
from visionops.monitoring.estimate import atc, doc
from visionops.monitoring.inference_log import read_log, to_table, write_file
from visionops.monitoring.log_schema import COLUMNS
from visionops.monitoring.report import write_report

CLASSES = ["cat", "dog", "frog", "ship"]
SETTINGS = MonitorConfig()


def log_rows(n: int, rng: np.random.Generator, *, shift: float = 0.0, prior=None, brightness: float = 0.5,
             errors: float = 0.0, confidence=(8.0, 2.0), classes=CLASSES) -> pd.DataFrame:
    """Log rows of a calibrated classifier (each answer right with probability its confidence), with a
    `score`: embeddings clustered by class, moved by `shift` along every axis; `prior`: the class shares
    (default equal)."""
    y = rng.choice(len(classes), n, p=prior)
    emb = rng.normal(size=(n, 16)) + 2.0 * np.eye(len(classes), 16)[y] + shift
    conf = rng.beta(*confidence, n)
    frame = pd.DataFrame({
        "embedding": list(emb.astype(np.float32)), "answer_class": [classes[k] for k in y], "confidence": conf,
        "brightness": rng.normal(brightness, 0.1, n), "contrast": rng.normal(0.2, 0.05, n),
        "blur": rng.gamma(2.0, 100.0, n), "error": "", "score": (rng.random(n) < conf).astype(float),
    })
    refused = rng.random(n) < errors
    frame.loc[refused, "error"] = "InvalidInputError: undecodable image"
    frame.loc[refused, ["answer_class", "confidence", "brightness", "contrast", "blur"]] = None
    frame.loc[refused, "embedding"] = pd.Series([None] * int(refused.sum()), index=frame.index[refused], dtype=object)
    return frame


@pytest.fixture(scope="module")
def reference() -> pd.DataFrame:
    return log_rows(1000, np.random.default_rng(0))


def judge(reference, window, settings=SETTINGS, task="classification"):
    return judge_window(reference, window, task=task, class_names=CLASSES, settings=settings)


def test_windows_from_the_reference_distribution_raise_false_alarms_at_about_alpha(reference):
    """60 windows at alpha 0.1: the share flagged stays near alpha (Bonferroni over the tests keeps it below)."""
    settings = MonitorConfig(alpha=0.1)
    rng = np.random.default_rng(1)
    verdicts = [judge(reference, log_rows(200, rng), settings) for _ in range(60)]
    flagged = sum(v.drifted for v in verdicts)
    assert 1 <= flagged <= 12, flagged  # Binomial(60, 0.1): outside [1, 12] with probability < 1 %
    mmd = [v.tests["embedding_mmd"]["p_value"] for v in verdicts]
    assert 0.3 < np.mean(mmd) < 0.7  # permutation p-values are uniform under no drift


@pytest.mark.parametrize("shifted, test", [
    ({"shift": 0.3}, "embedding_mmd"),
    ({"prior": (0.55, 0.15, 0.15, 0.15)}, "answer_class_chi2"),
    ({"brightness": 0.4}, "brightness_ks"),
    ({"confidence": (4.0, 2.0)}, "confidence_ks"),
])
def test_each_kind_of_shift_is_flagged_by_its_test(reference, shifted, test):
    verdict = judge(reference, log_rows(300, np.random.default_rng(2), **shifted))
    assert verdict.drifted
    assert verdict.tests[test]["drifted"] and verdict.tests[test]["p_value"] < verdict.threshold
    assert verdict.threshold == pytest.approx(SETTINGS.alpha / len(verdict.tests))
    same = judge(reference, log_rows(300, np.random.default_rng(2)))
    assert not same.tests[test]["drifted"]


def test_darker_images_fall_outside_the_references_range(reference):
    verdict = judge(reference, log_rows(300, np.random.default_rng(3), brightness=0.2))
    assert verdict.quality["brightness_out_of_range"] > 0.5
    assert verdict.quality["contrast_out_of_range"] < 0.05


def test_many_errors_drift_the_window_even_when_the_answers_do_not(reference):
    verdict = judge(reference, log_rows(300, np.random.default_rng(4), errors=0.2))
    assert verdict.drifted and verdict.quality["error_rate_drifted"]
    assert 0.15 < verdict.quality["error_rate"] < 0.25
    assert not any(t["drifted"] for t in verdict.tests.values())
    assert verdict.n_window == 300


def test_too_few_rows_is_an_error_naming_the_setting(reference):
    with pytest.raises(InvalidInputError, match=r"99 rows.*monitor.min_window_rows 100"):
        judge(reference, log_rows(99, np.random.default_rng(5)))


def test_prediction_drift_reports_psi_and_class_shares(reference):
    same = judge(reference, log_rows(400, np.random.default_rng(6)))
    moved = judge(reference, log_rows(400, np.random.default_rng(6), prior=(0.7, 0.1, 0.1, 0.1)))
    assert same.psi < 0.05 < 0.2 < moved.psi
    assert moved.class_shares["cat"][1] == pytest.approx(0.7, abs=0.06)


def test_metrics_are_flat_mlflow_names(reference):
    metrics = judge(reference, log_rows(200, np.random.default_rng(7))).metrics()
    assert all(re.fullmatch(r"[\w\-. /]+", k) and isinstance(v, float) for k, v in metrics.items())
    assert {"drifted", "estimate", "reference_score", "quality.error_rate", "embedding_mmd.p_value"} <= set(metrics)


def softmax_model(rng: np.random.Generator, n: int, signal: float) -> tuple[np.ndarray, np.ndarray]:
    """(confidence, correct) of the Bayes-optimal softmax classifier of 4 Gaussian classes in 8 dimensions,
    on images whose class signal is scaled by `signal` (1.0: the reference; less: a harder domain, where the
    classifier is overconfident)."""
    mu = np.random.default_rng(0).normal(size=(4, 8)) * 1.2
    y = rng.integers(0, 4, n)
    logits = (signal * mu[y] + rng.normal(size=(n, 8))) @ mu.T - 0.5 * (mu**2).sum(1)
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    return p.max(1), (p.argmax(1) == y).astype(float)


@pytest.mark.parametrize("signal", [1.0, 0.9, 0.8])
def test_atc_tracks_the_accuracy_of_a_classifier_under_shift(signal):
    """ATC within 3 points of the true accuracy (~92 % down to ~84 %); under shift closer than the mean confidence."""
    rng = np.random.default_rng(8)
    ref_conf, ref_correct = softmax_model(rng, 5000, 1.0)
    conf, correct = softmax_model(rng, 5000, signal)
    found = atc(ref_conf, ref_correct, conf)
    assert found["estimate"] == pytest.approx(correct.mean(), abs=0.03)
    if signal < 1.0:  # under shift the classifier is overconfident: its mean confidence is further off
        assert abs(found["estimate"] - correct.mean()) < abs(conf.mean() - correct.mean())
    assert found["reference"] == pytest.approx(ref_correct.mean())


def test_doc_estimate_follows_the_drop_in_confidence():
    rng = np.random.default_rng(9)
    ref_conf = rng.beta(8.0, 2.0, 5000)
    ref_score = np.clip(ref_conf + rng.normal(0, 0.05, 5000), 0, 1)  # per-image scores that match confidence
    conf = rng.beta(4.0, 2.0, 5000)
    truth = float(np.mean(np.clip(conf + rng.normal(0, 0.05, 5000), 0, 1)))
    found = doc(ref_conf, ref_score, conf)
    assert found["estimate"] == pytest.approx(truth, abs=0.03)
    assert found["confidence_drop"] > 0.1


def test_detection_windows_are_estimated_by_doc(reference):
    verdict = judge(reference, log_rows(200, np.random.default_rng(10)), task="detection")
    assert verdict.estimate["method"] == "DoC" and verdict.estimate["metric"] == "f1@0.5"


def test_the_report_is_one_html_file_with_its_tables_and_charts(reference, tmp_path):
    window = log_rows(300, np.random.default_rng(11), shift=0.3, errors=0.02)
    verdict = judge(reference, window)
    path = write_report(verdict, reference, window, tmp_path / "windows" / "w.html", title="cnn v3 window 2")
    html = path.read_text()
    assert html.startswith("<!DOCTYPE html>") and "cnn v3 window 2: DRIFTED" in html
    assert html.count("<table>") == 3 and html.count('src="data:image/png;base64,') == 3
    for name in verdict.tests:
        assert f"<td>{name}</td>" in html
    assert f"{verdict.estimate['estimate']:.3g}" in html and "ATC" in html
    assert [p.name for p in path.parent.iterdir()] == ["w.html"]  # no temporary file left beside it


def test_rows_read_back_from_the_log_files_are_judged_alike(reference, tmp_path):
    """Rows written to and read back from the Parquet log (float32, list columns) give the same verdict."""
    window = log_rows(200, np.random.default_rng(12), errors=0.05).drop(columns="score")
    window["time"] = pd.Timestamp("2026-01-01", tz="UTC") + pd.to_timedelta(np.arange(200), unit="s")
    window["request_id"], window["row"] = "r", np.arange(200)
    write_file(str(tmp_path), to_table(window))
    back = read_log(str(tmp_path))
    assert list(back.columns) == COLUMNS
    direct, logged = judge(reference, window), judge(reference, back)
    assert logged.quality["error_rate"] == direct.quality["error_rate"] == pytest.approx(0.05, abs=0.03)
    assert {k: round(t["p_value"], 4) for k, t in logged.tests.items()} == \
        {k: round(t["p_value"], 4) for k, t in direct.tests.items()}
