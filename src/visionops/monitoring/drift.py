"""Drift judgement of one window of the inference log against the model version's reference profile.

Tests (each with a p-value; the window drifts when any p-value < monitor.alpha / number of tests, Bonferroni,
or when its error rate is over monitor.max_error_rate):
- input drift: MMD two-sample test on the embeddings (Gaussian kernel, bandwidth by the median heuristic on
  the reference), p-value by permutations of one kernel matrix;
- prediction drift: two-sample chi-square of the reference's and the window's answer_class counts (classes
  expected fewer than 5 times merged), and Kolmogorov-Smirnov on the confidence; PSI of the class shares is
  reported beside them, not tested;
- data quality: Kolmogorov-Smirnov on brightness, contrast and blur; the share of rows outside the
  reference's 0.5-99.5 % range of each is reported.
Only answered rows (error "") are tested; refused rows count towards the error rate.

The tests are scipy.stats and numpy, not a drift library: alibi-detect is under the Business Source License
1.1 (its wheel's METADATA) and Evidently 0.7 (Apache-2.0) pulls ~26 packages (litestar, nltk, statsmodels,
uvicorn, plotly, telemetry) for the few tests used here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from scipy import stats

from visionops.config import MonitorConfig
from visionops.errors import InvalidInputError
from visionops.monitoring.estimate import estimate

SUMMARIES = ("brightness", "contrast", "blur")  # the image summaries tested for data quality
MAX_REFERENCE = 2000  # reference rows the MMD test uses at most (a fixed-seed subsample)
MIN_PERMUTATIONS = 200  # the MMD test's permutations: at least this, and enough to go below its threshold twice over
MIN_EXPECTED = 5.0  # chi-square: classes expected fewer times than this in the window are merged
SEED = 0
NO_CLASS = "(none)"  # answer_class of a row that has none (no box found)


@dataclass
class WindowVerdict:
    """One window's judgement: `tests` {name: {statistic, p_value, drifted}}, `quality` (error rate and
    out-of-range shares), `estimate` (the label-free estimate of the headline metric and the reference's own)."""

    drifted: bool
    threshold: float  # the Bonferroni-corrected level each p-value is compared with
    tests: dict[str, dict]
    quality: dict
    estimate: dict
    psi: float  # population stability index of the answer_class shares (reported, not tested)
    n_reference: int
    n_window: int
    class_shares: dict = field(default_factory=dict)  # {class: (reference share, window share)}

    def metrics(self) -> dict[str, float]:
        """Flat, MLflow-safe metrics: `<test>.p_value`, `<test>.statistic`, the quality numbers, the estimate."""
        out = {"drifted": float(self.drifted), "threshold": self.threshold, "psi": self.psi,
               "n_reference": float(self.n_reference), "n_window": float(self.n_window)}
        for name, t in self.tests.items():
            out[f"{name}.p_value"], out[f"{name}.statistic"] = t["p_value"], t["statistic"]
        out.update({f"quality.{k}": float(v) for k, v in self.quality.items()})
        out["estimate"], out["reference_score"] = self.estimate["estimate"], self.estimate["reference"]
        return out


def answered(frame: pd.DataFrame) -> pd.DataFrame:
    """The rows the model answered (error empty or null)."""
    return frame[frame["error"].fillna("") == ""]


def embeddings(frame: pd.DataFrame) -> np.ndarray:
    return np.stack([np.asarray(e, dtype=np.float64) for e in frame["embedding"]])


def mmd_test(reference: np.ndarray, window: np.ndarray, permutations: int, seed: int = SEED) -> dict:
    """Biased MMD² between the two samples with a Gaussian kernel (bandwidth: the median squared distance
    within the reference) and its permutation p-value, (1 + #{permuted ≥ observed}) / (1 + permutations)."""
    rng = np.random.default_rng(seed)
    if len(reference) > MAX_REFERENCE:
        reference = reference[rng.choice(len(reference), MAX_REFERENCE, replace=False)]
    x = np.concatenate([reference, window])
    sq = np.sum(x * x, axis=1)
    d2 = np.maximum(sq[:, None] + sq[None, :] - 2.0 * x @ x.T, 0.0)
    n, m = len(reference), len(window)
    within = d2[:n, :n][np.triu_indices(n, 1)]
    bandwidth = float(np.median(within[within > 0])) if np.any(within > 0) else 1.0
    kernel = np.exp(-d2 / bandwidth)
    # each column is a labelling's weights (1/n for "reference", -1/m for "window"): MMD² = wᵀ K w
    labels = np.stack([np.arange(n + m)] + [rng.permutation(n + m) for _ in range(permutations)], axis=1)
    weights = np.where(labels < n, 1.0 / n, -1.0 / m)
    mmd2 = np.einsum("ij,ij->j", weights, kernel @ weights)
    observed = float(mmd2[0])
    p_value = (1.0 + float(np.sum(mmd2[1:] >= observed))) / (1.0 + permutations)
    return {"statistic": observed, "p_value": p_value, "bandwidth": bandwidth, "permutations": permutations}


def class_counts(frame: pd.DataFrame, classes: list[str]) -> pd.Series:
    return frame["answer_class"].fillna(NO_CLASS).value_counts().reindex(classes, fill_value=0).astype(float)


def chi_square_test(ref_counts: pd.Series, counts: pd.Series) -> dict:
    """Two-sample chi-square test of homogeneity of the reference's and the window's class counts (a 2 x K table:
    the reference is a sample too, so testing the window against its shares as if they were exact would flag
    unshifted windows too often); classes expected fewer than MIN_EXPECTED times in either row are merged into
    one, which joins the smallest other class if still under."""
    table = np.vstack([ref_counts.to_numpy(float), counts.to_numpy(float)])
    table = table[:, table.sum(0) > 0]
    expected = np.outer(table.sum(1), table.sum(0)) / max(table.sum(), 1.0)
    rare = (expected < MIN_EXPECTED).any(0)
    cols = [table[:, ~rare]]
    if rare.any():
        merged = table[:, rare].sum(1, keepdims=True)
        cols.append(merged)
    table = np.hstack(cols)
    if table.shape[1] > 1 and (np.outer(table.sum(1), table[:, -1]) / table.sum() < MIN_EXPECTED).any():
        i = int(np.argmin(table[:, :-1].sum(0)))
        table[:, i] += table[:, -1]
        table = table[:, :-1]
    if table.shape[1] < 2:
        return {"statistic": 0.0, "p_value": 1.0, "bins": int(table.shape[1])}
    statistic, p_value, _, _ = stats.chi2_contingency(table, correction=False)
    return {"statistic": float(statistic), "p_value": float(p_value), "bins": int(table.shape[1])}


def psi(ref_counts: pd.Series, counts: pd.Series, eps: float = 1e-4) -> float:
    """Population stability index Σ (w - r) ln(w / r) of the class shares (each share at least eps)."""
    r = np.maximum(ref_counts / max(ref_counts.sum(), 1.0), eps)
    w = np.maximum(counts / max(counts.sum(), 1.0), eps)
    return float(np.sum((w - r) * np.log(w / r)))


def ks_test(reference: pd.Series, window: pd.Series) -> dict:
    statistic, p_value = stats.ks_2samp(reference.dropna().to_numpy(float), window.dropna().to_numpy(float))
    return {"statistic": float(statistic), "p_value": float(p_value)}


def judge_window(reference: pd.DataFrame, window: pd.DataFrame, *, task: str, class_names: list[str],
                 settings: MonitorConfig) -> WindowVerdict:
    """Judge `window` (log rows) against `reference` (the version's reference profile, with `score`)."""
    if len(window) < settings.min_window_rows:
        raise InvalidInputError(f"drift window: {len(window)} rows, fewer than monitor.min_window_rows "
                                f"{settings.min_window_rows}")
    ref = answered(reference).dropna(subset=["confidence", "score"])
    if len(ref) < 2:
        raise InvalidInputError(f"drift reference: {len(ref)} answered rows with a score; it needs at least 2")
    rows = answered(window)
    error_rate = 1.0 - len(rows) / len(window)
    classes = list(dict.fromkeys([*class_names, *ref["answer_class"].fillna(NO_CLASS),
                                  *rows["answer_class"].fillna(NO_CLASS)]))
    ref_counts, counts = class_counts(ref, classes), class_counts(rows, classes)
    names = ["embedding_mmd", "answer_class_chi2", "confidence_ks", *(f"{s}_ks" for s in SUMMARIES)]
    threshold = settings.alpha / len(names)
    tests: dict[str, dict] = {}
    quality = {"error_rate": error_rate, "max_error_rate": settings.max_error_rate}
    if len(rows) >= 2:
        permutations = max(MIN_PERMUTATIONS, math.ceil(2.0 / threshold))
        tests["embedding_mmd"] = mmd_test(embeddings(ref), embeddings(rows), permutations)
        tests["answer_class_chi2"] = chi_square_test(ref_counts, counts)
        tests["confidence_ks"] = ks_test(ref["confidence"], rows["confidence"])
        for s in SUMMARIES:
            tests[f"{s}_ks"] = ks_test(ref[s], rows[s])
            lo, hi = np.nanquantile(ref[s].to_numpy(float), [0.005, 0.995])
            values = rows[s].dropna().to_numpy(float)
            quality[f"{s}_out_of_range"] = float(np.mean((values < lo) | (values > hi))) if len(values) else 0.0
        for t in tests.values():
            t["drifted"] = t["p_value"] < threshold
    quality["error_rate_drifted"] = error_rate > settings.max_error_rate
    found = estimate(task, ref["confidence"].to_numpy(float), ref["score"].to_numpy(float),
                     rows["confidence"].dropna().to_numpy(float)) if len(rows) else \
        {"metric": "", "method": "", "estimate": float("nan"), "reference": float(ref["score"].mean())}
    total_ref, total = max(ref_counts.sum(), 1.0), max(counts.sum(), 1.0)
    return WindowVerdict(
        drifted=quality["error_rate_drifted"] or any(t["drifted"] for t in tests.values()),
        threshold=threshold, tests=tests, quality=quality, estimate=found, psi=psi(ref_counts, counts),
        n_reference=len(ref), n_window=len(window),
        class_shares={c: (ref_counts[c] / total_ref, counts[c] / total) for c in classes},
    )
