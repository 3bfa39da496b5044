"""Membership-inference audit: how well an attacker tells the training images from unseen ones.

Members are a fixed-seed sample of the train split, as many as the non-members, the frozen holdout
(data/holdout, never trained on), so the attack is judged on a balanced set. Each image gives two
signals of the model's fit to its true target (the task supplies them): its loss, and phi, the
logit-scaled true-target confidence log(p / (1 - p)).

- Loss threshold (Yeom et al. 2018, "Privacy risk in machine learning"): score = -loss.
- Calibrated (the offline LiRA test of Carlini et al. 2022, "Membership inference attacks from first
  principles", without shadow models): a Gaussian is fitted to phi of non-members per class (pooled
  over classes with fewer than `MIN_GROUP` of them), and an image scores its z-score against its
  class's Gaussian (one-sided: members fit better). Two folds: each half of the non-members (and of
  the members) is scored against the Gaussians of the other half, so no image scores against a fit
  that saw it. Without shadow models it calibrates per class, not per image (LiRA's strength), so it
  finds less than the full attack; neither attack bounds what a stronger one could find.

Each attack gives its ROC AUC and its TPR at 1% FPR (`tpr_at_fpr`), from sklearn's ROC.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from visionops.evaluation.plots import _pyplot, save_figure

LOW_FPR = 0.01
MIN_GROUP = 5  # non-members of a class needed for its own Gaussian; fewer: the pooled one
MIN_SIGMA = 1e-6
SEED = 0
ATTACKS = {"loss": "loss threshold (Yeom et al. 2018)", "lira": "calibrated, offline LiRA per class (Carlini et al. 2022)"}
HEADLINE = ("mia_auc", "mia_tpr_at_1pct_fpr")  # the strongest attack's: what promote.max_membership_auc judges
FIGURE = "membership_roc.png"

# (split, indices) -> (loss, phi) per image: the task's signals of a model on those images of a split
Signals = Callable[[object, np.ndarray], tuple[np.ndarray, np.ndarray]]


def logit(p: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """log(p / (1 - p)), with p clipped to [eps, 1 - eps]."""
    p = np.clip(np.asarray(p, np.float64), eps, 1 - eps)
    return np.log(p) - np.log1p(-p)


def tpr_at_fpr(fpr: np.ndarray, tpr: np.ndarray, at: float = LOW_FPR) -> float:
    """The TPR at FPR `at` on the ROC's upper envelope, linear between its points (a randomised mix of two
    thresholds reaches any point between them). With fewer than 1 / `at` non-members the first step above
    FPR 0 lies beyond `at`, so the value interpolates between FPR 0 and that step."""
    xs = np.unique(fpr)
    best = np.array([tpr[fpr == x].max() for x in xs])
    return float(np.interp(at, xs, best))


def attack(member_scores, nonmember_scores) -> dict:
    """AUC, TPR at 1% FPR and the ROC of scores where higher means 'member'."""
    from sklearn.metrics import roc_auc_score, roc_curve

    m, n = np.asarray(member_scores, np.float64), np.asarray(nonmember_scores, np.float64)
    y = np.r_[np.ones(len(m)), np.zeros(len(n))]
    s = np.r_[m, n]
    fpr, tpr, _ = roc_curve(y, s, drop_intermediate=False)
    return {"auc": float(roc_auc_score(y, s)), "tpr_at_1pct_fpr": tpr_at_fpr(fpr, tpr), "fpr": fpr, "tpr": tpr}


def loss_attack(member_loss, nonmember_loss) -> dict:
    """Yeom et al.'s attack: the lower the loss, the likelier a member."""
    return attack(-np.asarray(member_loss, np.float64), -np.asarray(nonmember_loss, np.float64))


def _gaussians(phi: np.ndarray, groups: np.ndarray) -> tuple[dict, tuple[float, float]]:
    pooled = (float(phi.mean()), max(float(phi.std(ddof=1)) if len(phi) > 1 else 0.0, MIN_SIGMA))
    fits = {}
    for g in np.unique(groups):
        x = phi[groups == g]
        if len(x) >= MIN_GROUP:
            fits[g] = (float(x.mean()), max(float(x.std(ddof=1)), MIN_SIGMA))
    return fits, pooled


def _z(phi: np.ndarray, groups: np.ndarray, fits: dict, pooled: tuple[float, float]) -> np.ndarray:
    mu, sigma = np.array([fits.get(g, pooled) for g in groups]).reshape(-1, 2).T
    return (phi - mu) / sigma


def calibrated_attack(member_phi, nonmember_phi, member_groups, nonmember_groups, seed: int = SEED) -> dict:
    """Offline LiRA per class: z-scores of phi against Gaussians fitted on the other half of the non-members."""
    mp, npf = np.asarray(member_phi, np.float64), np.asarray(nonmember_phi, np.float64)
    mg, ng = np.asarray(member_groups), np.asarray(nonmember_groups)
    rng = np.random.default_rng(seed)
    n_half, m_half = rng.permutation(len(npf)) % 2, rng.permutation(len(mp)) % 2
    m_scores, n_scores = np.empty(len(mp)), np.empty(len(npf))
    for fold in (0, 1):
        ref = n_half != fold
        fits, pooled = _gaussians(npf[ref], ng[ref])
        n_scores[~ref] = _z(npf[~ref], ng[~ref], fits, pooled)
        m_scores[m_half == fold] = _z(mp[m_half == fold], mg[m_half == fold], fits, pooled)
    return attack(m_scores, n_scores)


def member_sample(n_members: int, n_nonmembers: int, seed: int = SEED) -> np.ndarray:
    """Sorted indices of a fixed-seed sample of min(n_members, n_nonmembers) of the members."""
    return np.sort(np.random.default_rng(seed).choice(n_members, size=min(n_members, n_nonmembers), replace=False))


def audit(members: tuple[np.ndarray, np.ndarray, np.ndarray], nonmembers: tuple[np.ndarray, np.ndarray, np.ndarray],
          seed: int = SEED) -> tuple[dict, dict]:
    """Both attacks on (loss, phi, class) per image of the members and of the non-members: (the figures,
    flat `mia_*` keys, the strongest attack's in `HEADLINE`; the ROC curves per attack)."""
    (m_loss, m_phi, m_group), (n_loss, n_phi, n_group) = members, nonmembers
    found = {"loss": loss_attack(m_loss, n_loss), "lira": calibrated_attack(m_phi, n_phi, m_group, n_group, seed)}
    result = {"mia_members": len(m_loss), "mia_nonmembers": len(n_loss)}
    for name, a in found.items():
        result[f"mia_{name}_auc"], result[f"mia_{name}_tpr_at_1pct_fpr"] = a["auc"], a["tpr_at_1pct_fpr"]
    result["mia_auc"] = max(a["auc"] for a in found.values())
    result["mia_tpr_at_1pct_fpr"] = max(a["tpr_at_1pct_fpr"] for a in found.values())
    return result, {name: (a["fpr"], a["tpr"]) for name, a in found.items()}


def audit_splits(signals: Signals, train, holdout, seed: int = SEED) -> tuple[dict, dict]:
    """`audit` of a model whose `signals` are read on a sample of `train` (members) and all of `holdout`
    (non-members). With fewer than 2 non-members (no holdout) every figure is None and there are no curves."""
    if holdout is None or len(holdout) < 2:
        return {"mia_members": 0, "mia_nonmembers": 0 if holdout is None else len(holdout),
                **{k: None for k in _keys()}}, {}
    pick = member_sample(len(train), len(holdout), seed)
    every = np.arange(len(holdout))
    members = (*signals(train, pick), np.asarray(train.labels)[pick])
    nonmembers = (*signals(holdout, every), np.asarray(holdout.labels))
    return audit(members, nonmembers, seed)


def _keys() -> list[str]:
    return [f"mia_{a}_{m}" for a in ATTACKS for m in ("auc", "tpr_at_1pct_fpr")] + list(HEADLINE)


def roc_figure(curves: dict, result: dict, path: Path, title: str) -> None:
    """Both attacks' ROC curves on log-log axes (the low-FPR region is what matters), chance as a diagonal."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(4.2, 4))
    floor = 1 / max(result["mia_nonmembers"], 1) / 2
    for name, (fpr, tpr) in curves.items():
        ax.plot(np.maximum(fpr, floor), np.maximum(tpr, floor), label=f"{name}: AUC {result[f'mia_{name}_auc']:.3f}")
    ax.plot([floor, 1], [floor, 1], "k--", lw=0.8, label="chance")
    ax.axvline(LOW_FPR, color="grey", lw=0.6, ls=":")
    ax.set(xscale="log", yscale="log", xlabel="false-positive rate", ylabel="true-positive rate", title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save_figure(fig, path)


def report_section(result: dict, figure: str | None) -> list[str]:
    """The audit as Markdown lines: what was attacked, both attacks' figures, the ROC figure (if drawn)."""
    lines = ["## Membership-inference audit", ""]
    if result["mia_auc"] is None:
        return lines + [f"Not run: the frozen holdout has {result['mia_nonmembers']} images (at least 2 are needed).", ""]
    lines += [
        (f"Can an attacker tell the training images from unseen ones? {result['mia_members']} train images "
         f"(members, a fixed-seed sample) against the {result['mia_nonmembers']} frozen holdout images (non-members). "
         "AUC 0.5 is chance; TPR at 1% FPR is the share of members caught while wrongly accusing 1% of non-members "
         "(interpolated on the ROC)."),
        "",
        "| attack | AUC | TPR at 1% FPR |",
        "|---|---|---|",
        *(f"| {what} | {result[f'mia_{a}_auc']:.4f} | {result[f'mia_{a}_tpr_at_1pct_fpr']:.4f} |" for a, what in ATTACKS.items()),
        "",
        ("`promote.max_membership_auc` judges the larger AUC. Passing it shows these two attacks find little, "
         "not that a stronger attack would find nothing."),
        "",
    ]
    return lines + ([f"![Membership-inference ROC](figures/{figure})", ""] if figure else [])


def load_nonmembers(holdout_dir: Path | str | None, class_names: list[str], image_shape):
    """The frozen holdout's split, or None when there is none (no folder, or no `holdout` split). The
    holdout is another download's cut of the same source, so a different class list or shape is an error."""
    from visionops.data import dataset
    from visionops.errors import InvalidInputError

    if holdout_dir is None or not (Path(holdout_dir) / "meta.json").exists():
        return None
    ds = dataset.load(holdout_dir)
    if list(ds.class_names) != list(class_names) or tuple(ds.image_shape) != tuple(image_shape):
        raise InvalidInputError(
            f"{holdout_dir}: the holdout has classes {ds.class_names} / shape {list(ds.image_shape)}, the model "
            f"{list(class_names)} / {list(image_shape)}; run `dvc repro download`"
        )
    return ds.splits.get("holdout")
