"""The membership-inference audit: the attacks on arrays with known answers, a real overfitted model, the gate."""

from __future__ import annotations

import numpy as np
import pytest

from visionops.evaluation import membership


def test_separable_scores_give_auc_one_and_full_tpr():
    a = membership.attack([5.0, 6.0, 7.0], [1.0, 2.0, 3.0])
    assert a["auc"] == 1.0 and a["tpr_at_1pct_fpr"] == 1.0


def test_reversed_scores_give_auc_zero():
    assert membership.attack([1.0, 2.0], [5.0, 6.0])["auc"] == 0.0


def test_identical_distributions_give_chance():
    rng = np.random.default_rng(1)
    loss = membership.loss_attack(rng.normal(size=4000), rng.normal(size=4000))
    assert loss["auc"] == pytest.approx(0.5, abs=0.02)
    assert loss["tpr_at_1pct_fpr"] == pytest.approx(0.01, abs=0.01)
    phi = rng.normal(size=(2, 4000))
    lira = membership.calibrated_attack(phi[0], phi[1], rng.integers(0, 10, 4000), rng.integers(0, 10, 4000))
    assert lira["auc"] == pytest.approx(0.5, abs=0.02)


def test_all_ties_give_chance():
    a = membership.attack(np.zeros(50), np.zeros(50))
    assert a["auc"] == 0.5 and a["tpr_at_1pct_fpr"] == pytest.approx(0.01)


def test_tpr_at_fpr_interpolates_the_roc_envelope():
    # points (0, 0.2), (0.02, 0.6): 1% FPR lies halfway, and a vertical step keeps its top
    fpr, tpr = np.array([0.0, 0.0, 0.02, 0.02, 1.0]), np.array([0.0, 0.2, 0.4, 0.6, 1.0])
    assert membership.tpr_at_fpr(fpr, tpr) == pytest.approx(0.4)
    # 10 non-members: one member above every non-member, then the first step reaches FPR 0.1
    a = membership.attack([10.0, 0.5, 0.4, 0.3], [0.9, 0.8, 0.7, 0.6, 0.2, 0.1, 0.05, 0.04, 0.03, 0.02])
    assert a["tpr_at_1pct_fpr"] == pytest.approx(0.25)  # TPR 0.25 already at FPR 0


def test_loss_attack_scores_low_loss_as_member():
    assert membership.loss_attack([0.01, 0.02], [2.0, 3.0])["auc"] == 1.0


def test_calibration_per_class_finds_what_a_global_threshold_misses():
    # class 0 is easy (phi ~ 8), class 1 hard (phi ~ 0); members sit 1 above their class's non-members:
    # a global threshold mostly separates classes, the per-class z-score separates members
    rng = np.random.default_rng(0)
    groups = np.repeat([0, 1], 200)
    base = np.where(groups == 0, 8.0, 0.0)
    nonmember = base + rng.normal(0, 0.3, 400)
    member = base + 1.0 + rng.normal(0, 0.3, 400)
    lira = membership.calibrated_attack(member, nonmember, groups, groups)
    plain = membership.attack(member, nonmember)
    assert lira["auc"] > 0.95 > plain["auc"]


def test_small_classes_fall_back_to_the_pooled_gaussian():
    # every class holds fewer than MIN_GROUP non-members: the pooled fit scores them, no error, no NaN
    groups = np.arange(20)
    a = membership.calibrated_attack(np.full(20, 3.0), np.linspace(-1, 1, 20), groups, groups)
    assert a["auc"] == 1.0


def test_audit_reports_the_stronger_attack_and_balanced_sizes():
    rng = np.random.default_rng(0)
    n = 300
    members = (rng.normal(0.5, 0.3, n), rng.normal(1, 1, n), rng.integers(0, 3, n))
    nonmembers = (rng.normal(1.0, 0.3, n), rng.normal(0, 1, n), rng.integers(0, 3, n))
    result, curves = membership.audit(members, nonmembers)
    assert result["mia_members"] == result["mia_nonmembers"] == n
    assert result["mia_auc"] == max(result["mia_loss_auc"], result["mia_lira_auc"])
    assert result["mia_loss_auc"] > 0.8 and 0.5 < result["mia_lira_auc"] < result["mia_loss_auc"]
    assert set(curves) == set(membership.ATTACKS)


def test_member_sample_is_fixed_and_balanced():
    a, b = membership.member_sample(1000, 37, seed=3), membership.member_sample(1000, 37, seed=3)
    assert np.array_equal(a, b) and len(a) == 37 and len(set(a.tolist())) == 37 and np.all(np.diff(a) > 0)
    assert len(membership.member_sample(10, 37)) == 10


def test_no_holdout_gives_no_figures():
    result, curves = membership.audit_splits(lambda split, i: (None, None), object(), None)
    assert result["mia_auc"] is None and curves == {}
    assert "Not run" in "\n".join(membership.report_section(result, None))


def test_found_confidence_matches_true_boxes_by_class_and_iou():
    from visionops.tasks.detection.membership import found_confidence

    true = {"boxes": np.array([[0, 0, 10, 10], [20, 20, 30, 30]], np.float32), "labels": np.array([1, 2])}
    pred = {"boxes": np.array([[0, 0, 10, 11], [0, 0, 10, 10], [20, 20, 30, 30]], np.float32),
            "scores": np.array([0.9, 0.6, 0.4]), "labels": np.array([1, 1, 3])}
    assert found_confidence(pred, true) == pytest.approx((0.9 + 0.0) / 2)  # box 2's only overlap is of class 3
    empty = {"boxes": np.zeros((0, 4), np.float32), "labels": np.zeros(0, np.int64)}
    assert found_confidence(pred, empty) == pytest.approx(0.1)  # nothing there: 1 - the best score
    assert found_confidence({**empty, "scores": np.zeros(0)}, true) == 0.0


def test_classifier_signals_are_its_cross_entropy_and_stable_logit_confidence():
    import torch

    from visionops.data.dataset import Split
    from visionops.tasks.classification import classifier
    from visionops.tasks.classification.membership import signals

    torch.manual_seed(0)
    model = classifier.build("lenet", ["a", "b", "c"], (16, 16, 1), [0.5], [0.25])
    images = np.random.default_rng(0).integers(0, 256, (6, 16, 16, 1), dtype=np.uint8)
    split = Split(images, np.array([0, 1, 2, 0, 1, 2]), [str(i) for i in range(6)])
    index = np.array([1, 4, 5])
    loss, phi = signals(model, torch.device("cpu"), 2)(split, index)
    logits = classifier.predict_logits(model, images[index], torch.device("cpu"))
    y = torch.tensor([1, 1, 2])
    ce = torch.nn.functional.cross_entropy(logits.double(), y, reduction="none").numpy()
    p = np.exp(-ce)
    assert loss == pytest.approx(ce) and phi == pytest.approx(np.log(p / (1 - p)))
    assert membership.logit(np.array([1.0]))[0] == pytest.approx(np.log(1e12), rel=1e-3)  # clipped, finite
