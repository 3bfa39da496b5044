"""Promotion on the frozen holdout: a gain tested by the task's paired test (McNemar for classification,
Wilcoxon signed-rank on per-image F1 for detection), latency judged against the champion, explicit
versions, rollback, and `visionops promote` refusing a gain too small to be significant.

Real tiny classifiers are trained here and registered in a real MLflow SQLite store under tmp_path.
The holdouts are built so that the discordant images are known: `no_bottom` (a trained model that never
predicts `bottom`) misses exactly the `bottom` images a well-trained model gets right.
"""

from __future__ import annotations

import json
import re
import shutil
import time
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
import yaml
from conftest import corner_images, train_quickly
from mlflow.tracking import MlflowClient

from visionops import cli
from visionops.config import EvaluateConfig, PromoteConfig
from visionops.data import dataset
from visionops.errors import VisionopsError
from visionops.evaluation.latency import paired_latency
from visionops.serving.promotion import (
    AlreadyChampionError,
    NoChallengerError,
    RollbackError,
    evaluate_version,
    mcnemar,
    promote,
    record_audit,
    rollback,
    wilcoxon,
)
from visionops.serving.pyfunc import RegistryError, log_classifier
from visionops.tasks.classification import classifier

CLASSES = ["top_left", "top_right", "bottom"]
SHAPE = (16, 16, 1)
NAME = "promo-classifier"
EVAL = EvaluateConfig(latency_batch_size=8)
# gates that anything passes; each test tightens what it is about
LOOSE = {"min_score": 0.0, "min_gain": -1.0, "significance": 1.0, "min_class_score": 0.0, "max_ece": 1.0,
         "max_latency_ratio": 1e6}


def gates(**tight) -> PromoteConfig:
    return PromoteConfig(**{**LOOSE, **tight})


# ------------------------------------------------------------------------------------------
# data and models


def _split(labels, rng, prefix: str) -> dataset.Split:
    labels = np.asarray(labels, dtype=np.int64)
    return dataset.Split(corner_images(labels, rng), labels, [f"{prefix}/{i}.png" for i in range(len(labels))])


def _holdout(root: Path, bottoms: int, n: int = 300, seed: int = 1) -> Path:
    """A frozen-holdout dataset (one split, "holdout") of n images, `bottoms` of them of class bottom."""
    rng = np.random.default_rng(seed)
    labels = [i % 2 for i in range(n - bottoms)] + [2] * bottoms
    dataset.save(dataset.Dataset(CLASSES, {"holdout": _split(labels, rng, "holdout")}, "synthetic"), root)
    return root


@pytest.fixture(scope="session")
def holdouts(tmp_path_factory) -> dict[str, Path]:
    """close: 3 bottom images in 300 (a 1% gain: not significant); clear: 40 in 300; balanced: 100 per class."""
    base = tmp_path_factory.mktemp("holdouts")
    return {
        "close": _holdout(base / "close", bottoms=3),
        "clear": _holdout(base / "clear", bottoms=40),
        "balanced": _holdout(base / "balanced", bottoms=100),
    }


def _train(arch: str, train: dataset.Split, seed: int, steps: int) -> classifier.Classifier:
    return train_quickly(arch, CLASSES, train, seed, steps)


@pytest.fixture(scope="session")
def models(tmp_path_factory) -> dict[str, Path]:
    """good: ~100% accurate LeNet; no_bottom: good with `bottom` never predicted; underconfident: good
    with logits / 100 (same predictions, large ECE); slow: an untrained ResNet-18 (far slower than LeNet)."""
    train = _split(np.arange(300) % 3, np.random.default_rng(0), "train")
    out = tmp_path_factory.mktemp("models")
    good = _train("lenet", train, seed=0, steps=120)
    no_bottom = _train("lenet", train, seed=0, steps=120)
    under = _train("lenet", train, seed=0, steps=120)
    with torch.no_grad():
        no_bottom.net.classifier[-1].bias[2] = -1e4
        under.net.classifier[-1].weight.mul_(0.01)
        under.net.classifier[-1].bias.mul_(0.01)
    torch.manual_seed(0)
    mean, std = classifier.channel_stats(train.images)
    slow = classifier.build("resnet18", CLASSES, SHAPE, mean, std).eval()
    paths = {}
    for name, (model, arch) in {"good": (good, "lenet"), "no_bottom": (no_bottom, "lenet"),
                                "underconfident": (under, "lenet"), "slow": (slow, "resnet18")}.items():
        paths[name] = out / f"{name}.pt"
        classifier.save(paths[name], model, arch, CLASSES, SHAPE)
    return paths


def _correct(path: Path, holdout: Path) -> np.ndarray:
    """Which holdout images the model file gets right, computed without the registry."""
    model, _ = classifier.load(path)
    split = dataset.load(holdout).splits["holdout"]
    return classifier.predict_logits(model, split.images, torch.device("cpu")).argmax(1).numpy() == split.labels


# ------------------------------------------------------------------------------------------
# a real MLflow store per test


def _project(tmp_path: Path, store: str, holdout: Path, **promote_gates) -> Path:
    """A project directory for the CLI: params.yaml on this store and the holdout at data/holdout."""
    project = tmp_path / "project"
    (project / "data").mkdir(parents=True)
    shutil.copytree(holdout, project / "data" / "holdout")
    params = {"mlflow": {"teacher_model_name": NAME, "tracking_uri": store},
              "promote": {**LOOSE, **promote_gates}, "evaluate": {"latency_batch_size": 8}}
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    return project


def _log(path: Path) -> str:
    with mlflow.start_run():
        return str(log_classifier(path, NAME, tags={"source": path.stem}).version)


def _aliases() -> dict[str, str]:
    return {alias: str(v) for alias, v in MlflowClient().get_registered_model(NAME).aliases.items()}


# ------------------------------------------------------------------------------------------
# the statistics


def test_mcnemar_counts_only_discordant_images():
    ch = np.array([1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 1, 0], bool)
    champ = np.array([0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 0], bool)
    r = mcnemar(ch, champ)
    assert (r["test"], r["n"], r["challenger_better"], r["champion_better"]) == ("McNemar exact", 12, 8, 2)
    assert r["p_value"] == pytest.approx(56 / 1024)  # P(X >= 8), X ~ Binomial(10, 1/2): (45 + 10 + 1) / 2^10
    assert r["gain"] == pytest.approx(6 / 12)
    assert mcnemar(np.ones(5, bool), np.ones(5, bool))["p_value"] == 1.0  # no discordant pair: no evidence
    assert mcnemar(np.zeros(3, bool), np.ones(3, bool))["p_value"] == 1.0  # worse is never significant


def test_wilcoxon_ranks_per_image_score_differences():
    ch = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.4])
    champ = np.array([0.1, 0.2, 0.3, 0.4, 0.45, 0.4, 0.4])  # 5 images better, 2 tied (dropped)
    r = wilcoxon(ch, champ)
    assert (r["test"], r["n"], r["challenger_better"], r["champion_better"]) == ("Wilcoxon signed-rank", 7, 5, 0)
    assert r["p_value"] == pytest.approx(1 / 32)  # every one of the 2^5 sign patterns equally likely: all positive
    assert r["gain"] == pytest.approx(np.mean(ch - champ)) and r["champion_mean"] == pytest.approx(np.mean(champ))
    assert wilcoxon(champ, ch)["p_value"] == pytest.approx(1.0)  # worse is never significant
    assert wilcoxon(np.full(4, 0.5), np.full(4, 0.5))["p_value"] == 1.0  # no difference: no evidence
    assert wilcoxon(np.array([np.nan, 0.9]), np.array([np.nan, 0.1]))["challenger_better"] == 1  # NaN: a tie


def test_image_f1_counts_boxes_found_with_their_class():
    from visionops.tasks.detection.metrics import image_f1

    true = {"boxes": np.array([[0, 0, 10, 10], [20, 20, 30, 30]], np.float32), "labels": np.array([1, 2])}
    pred = {"boxes": np.array([[0, 0, 10, 11], [40, 40, 50, 50], [20, 20, 30, 30]], np.float32),
            "scores": np.array([0.9, 0.8, 0.7]), "labels": np.array([1, 0, 3])}
    assert image_f1(pred, true) == pytest.approx(2 * 1 / (2 + 3))  # one box found with its class, of 2 true and 3 served
    assert image_f1({k: v[[0, 2]] for k, v in pred.items()} | {"labels": np.array([1, 2])}, true) == 1.0
    assert image_f1({k: v[:0] for k, v in pred.items()}, true) == 0.0
    nothing = {"boxes": np.zeros((0, 4), np.float32), "labels": np.zeros(0, np.int64)}
    assert image_f1({**nothing, "scores": np.zeros(0)}, nothing) == 1.0  # nothing there, nothing claimed


def test_paired_latency_is_a_ratio_of_turns():
    r = paired_latency(lambda: time.sleep(0.004), lambda: time.sleep(0.002), rounds=7, warmup=1)
    assert r["rounds"] == 7 and r["challenger_ms"] > r["champion_ms"] >= 2.0
    assert 1.4 < r["ratio"] < 3.0


# ------------------------------------------------------------------------------------------
# promotion


def test_first_version_faces_only_the_absolute_gates(store, models, holdouts):
    client = MlflowClient()
    _log(models["good"])
    strict = PromoteConfig(min_score=0.9, min_gain=0.05, significance=0.01, min_class_score=0.8, max_ece=0.2,
                           max_latency_ratio=0.001)
    d = promote(NAME, holdouts["balanced"], strict, EVAL)
    assert d.promoted, d.reasons
    assert (d.challenger_version, d.champion_version, d.holdout_n) == ("1", None, 300)
    assert d.comparison is None and d.latency is None and d.champion_metrics is None
    skipped = [c.split(":")[0] for c in d.checks if c.startswith("SKIP")]
    assert skipped == ["SKIP min_gain", "SKIP significance", "SKIP max_membership_auc", "SKIP max_latency_ratio"]
    assert "no champion to time against" in d.checks[-1]
    assert d.challenger_metrics["n"] == 300 and d.challenger_metrics["accuracy"] >= 0.95
    assert _aliases() == {"champion": "1"}
    mv = client.get_model_version(NAME, "1")
    assert mv.tags["promotion.decision"] == "promoted" and mv.tags["promotion.holdout_n"] == "300"
    assert mv.tags["promotion.p_value"].startswith("n/a")
    assert "PROMOTED" in mv.description and "300 holdout images" in mv.description
    with pytest.raises(NoChallengerError, match="no version with alias 'challenger'"):
        promote(NAME, holdouts["balanced"], strict, EVAL)


def _audit(auc: float) -> dict:
    return {"mia_members": 300, "mia_nonmembers": 300, "mia_loss_auc": auc, "mia_loss_tpr_at_1pct_fpr": 0.02,
            "mia_lira_auc": auc - 0.01, "mia_lira_tpr_at_1pct_fpr": 0.03, "mia_auc": auc, "mia_tpr_at_1pct_fpr": 0.03}


def test_membership_gate_reads_the_audit_recorded_at_registration(store, models, holdouts):
    """The audit's figures reach the version's tags and description; the gate refuses a leaky version, passes a
    tight one, and skips (says so) a version that carries none."""
    client = MlflowClient()
    leaky = _log(models["good"])
    record_audit(NAME, leaky, _audit(0.81))
    mv = client.get_model_version(NAME, leaky)
    assert mv.tags["visionops.mia_auc"] == "0.81" and mv.tags["visionops.mia_members"] == "300"
    assert "membership-inference audit (300 train images against 300 holdout images): AUC 0.8100" in mv.description
    d = promote(NAME, holdouts["balanced"], gates(max_membership_auc=0.6), EVAL)
    assert not d.promoted
    assert d.reasons == ["membership-inference AUC 0.8100 vs max_membership_auc 0.6000 (set promote.max_membership_auc in "
                         "params.yaml)"]
    assert d.challenger_metrics["mia_auc"] == 0.81

    record_audit(NAME, leaky, {**_audit(0.5), "mia_auc": None})  # no audit figures: nothing recorded
    assert client.get_model_version(NAME, leaky).tags["visionops.mia_auc"] == "0.81"
    tight = _log(models["no_bottom"])
    record_audit(NAME, tight, _audit(0.52))
    d = promote(NAME, holdouts["balanced"], gates(max_membership_auc=0.6), EVAL, version=tight)
    assert d.promoted and "PASS membership-inference AUC 0.5200 vs max_membership_auc 0.6000" in d.checks
    _log(models["good"])
    d = promote(NAME, holdouts["balanced"], gates(max_membership_auc=0.6), EVAL)
    assert any(c.startswith("SKIP max_membership_auc: the version carries no membership-inference audit") for c in d.checks)


def test_small_gain_is_refused_as_not_significant(store, models, holdouts, tmp_path, monkeypatch, capsys):
    client = MlflowClient()
    holdout = holdouts["close"]
    _log(models["no_bottom"])
    assert promote(NAME, holdout, gates(), EVAL).promoted
    _log(models["good"])
    ch, champ = _correct(models["good"], holdout), _correct(models["no_bottom"], holdout)
    b, c = int(np.sum(ch & ~champ)), int(np.sum(~ch & champ))
    assert b - c >= 1 and b <= 4  # better, by about 1% of 300 images

    d = promote(NAME, holdout, gates(min_gain=0.0, significance=0.05), EVAL)

    assert not d.promoted
    assert (d.comparison["challenger_better"], d.comparison["champion_better"], d.comparison["n"]) == (b, c, 300)
    assert d.comparison["p_value"] > 0.05
    (reason,) = d.reasons  # the gain itself passed min_gain 0: only its significance failed
    assert re.search(rf"McNemar exact p={d.comparison['p_value']:.4g} on accuracy vs significance 0.05 \(n=300 holdout images: "
                     rf"{b} right only by the challenger, {c} only by the champion\)", reason)
    assert any(c.startswith("PASS accuracy gain +0.0") for c in d.checks)
    assert _aliases() == {"champion": "1", "challenger": "2"}  # nothing moved
    mv = client.get_model_version(NAME, "2")
    assert mv.tags["promotion.decision"] == "rejected"
    assert float(mv.tags["promotion.p_value"]) == pytest.approx(d.comparison["p_value"], rel=1e-5)
    assert json.loads(mv.tags["promotion.discordant"]) == {"challenger_better": b, "champion_better": c}
    assert mv.tags["promotion.test"] == "McNemar exact on accuracy"
    assert mv.tags["promotion.holdout_n"] == "300"
    assert "REJECTED" in mv.description and "300 holdout images" in mv.description
    assert "paired test McNemar exact on accuracy: p=" in mv.description

    # `visionops promote` refuses too, and says why: the p-value and the sample size
    monkeypatch.chdir(_project(tmp_path, store, holdout, min_gain=0.0, significance=0.05))
    capsys.readouterr()
    assert cli.main(["promote"]) == 1
    err = capsys.readouterr().err
    assert f"{NAME} version 2 rejected" in err and "McNemar exact p=" in err and "n=300 holdout images" in err
    assert _aliases() == {"champion": "1", "challenger": "2"}


def test_clearly_better_challenger_is_promoted(store, models, holdouts, tmp_path, monkeypatch, capsys):
    client = MlflowClient()
    holdout = holdouts["clear"]
    _log(models["no_bottom"])
    assert promote(NAME, holdout, gates(), EVAL).promoted
    _log(models["good"])
    _log(models["no_bottom"])  # v3 holds the challenger alias: `--version 2` picks v2 all the same
    monkeypatch.chdir(_project(tmp_path, store, holdout, min_gain=0.1, significance=0.01, min_score=0.9))
    capsys.readouterr()

    assert cli.main(["promote", "--version", "2", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)

    assert d["promoted"], d["reasons"]
    assert (d["challenger_version"], d["champion_version"], d["holdout_n"]) == ("2", "1", 300)
    assert d["comparison"]["challenger_better"] >= 35 and d["comparison"]["p_value"] < 1e-9
    gain = d["challenger_metrics"]["accuracy"] - d["champion_metrics"]["accuracy"]
    assert d["comparison"]["gain"] == pytest.approx(gain) and gain >= 0.1
    assert _aliases() == {"champion": "2", "previous": "1", "challenger": "3"}
    mv = client.get_model_version(NAME, "2")
    assert mv.tags["promotion.decision"] == "promoted" and float(mv.tags["promotion.p_value"]) < 1e-9
    assert client.get_model_version(NAME, "1").tags["promotion.replaced_by"] == "2"


def test_latency_is_judged_against_the_champion(store, models, holdouts):
    holdout = holdouts["balanced"]
    _log(models["good"])
    assert promote(NAME, holdout, gates(), EVAL).promoted
    _log(models["slow"])  # a ResNet-18 against the LeNet champion, timed in turns
    d = promote(NAME, holdout, gates(max_latency_ratio=1.5), EVAL)
    assert not d.promoted
    (reason,) = d.reasons
    assert re.match(r"latency ratio \d+\.\d\d \(challenger .* ms vs champion .* ms per batch of 8, median of 15 alternating", reason)
    assert d.latency["ratio"] > 1.5 and d.latency["ratio"] == pytest.approx(float(
        MlflowClient().get_model_version(NAME, "2").tags["promotion.latency_ratio"]), rel=1e-3)
    # the other way round, the LeNet is faster than the ResNet champion
    MlflowClient().set_registered_model_alias(NAME, "champion", "2")
    _log(models["good"])
    d = promote(NAME, holdout, gates(max_latency_ratio=1.0), EVAL)
    assert d.promoted and d.latency["ratio"] < 1.0


@pytest.mark.parametrize(
    "model, tight, expect",
    [
        ("no_bottom", {"min_score": 0.9}, r"accuracy 0\.\d+ vs min_score 0\.9"),
        ("no_bottom", {"min_class_score": 0.5}, r"class recall below min_class_score 0\.500: bottom \(0\.000\) \("),
        ("underconfident", {"max_ece": 0.1}, r"ECE 0\.\d+ vs max_ece 0\.1"),
        ("good", {"min_gain": 0.01}, r"accuracy gain \+0\.0000 over champion .* vs min_gain \+0\.0100 on the same 300"),
    ],
    ids=["min_score", "min_class_score", "max_ece", "min_gain"],
)
def test_each_gate_rejects_alone(store, models, holdouts, model, tight, expect):
    if "min_gain" in tight:  # the same model again: no gain over the champion
        _log(models["good"])
        assert promote(NAME, holdouts["balanced"], gates(), EVAL).promoted
    v = _log(models[model])
    d = promote(NAME, holdouts["balanced"], gates(**tight), EVAL)
    assert not d.promoted
    assert len(d.reasons) == 1 and re.search(expect, d.reasons[0]), d.reasons
    assert d.reasons[0].endswith(f" (set promote.{next(iter(tight))} in params.yaml)")  # the key that changes it
    assert json.loads(MlflowClient().get_model_version(NAME, v).tags["promotion.reasons"]) == d.reasons



def _noisy_holdout(root: Path, wrong: int, n: int = 300, seed: int = 2) -> Path:
    """Balanced 3-class holdout where `wrong` images (every third from the start, so each class loses
    wrong / 3) are labelled as the next class: a model that reads the images perfectly scores 1 - wrong / n."""
    rng = np.random.default_rng(seed)
    drawn = np.arange(n) % 3
    labels = drawn.copy()
    labels[:wrong] = (drawn[:wrong] + 1) % 3
    split = dataset.Split(corner_images(drawn, rng), labels.astype(np.int64), [f"holdout/{i}.png" for i in range(n)])
    dataset.save(dataset.Dataset(CLASSES, {"holdout": split}, "synthetic"), root)
    return root


AUTO = {**LOOSE, "min_score": "auto", "min_class_score": "auto"}


def test_auto_gates_make_a_first_champion_of_a_model_that_beats_the_trivial_one(store, models, tmp_path):
    """A model at 0.80 on a balanced holdout (the most frequent class: 1/3) is refused by min_score 0.9, and made
    champion by the auto floors: 1/3 + 0.25 x 2/3 = 0.5 on accuracy and on each class's recall (1/3 by chance)."""
    holdout = _noisy_holdout(tmp_path / "noisy", wrong=60)
    right = _correct(models["good"], holdout).mean()
    assert right == pytest.approx(0.8)  # the good model reads every image; 60 of 300 labels disagree
    _log(models["good"])
    d = promote(NAME, holdout, PromoteConfig(**{**LOOSE, "min_score": 0.9}), EVAL, version="1")
    assert not d.promoted and d.reasons == [
        "accuracy 0.8000 vs min_score 0.9000 (set promote.min_score in params.yaml)"]
    _log(models["good"])
    d = promote(NAME, holdout, PromoteConfig(**AUTO), EVAL)
    assert d.promoted, d.reasons
    assert d.trivial == {"predictor": "the most frequent class", "score": pytest.approx(1 / 3)}
    assert ("PASS accuracy 0.8000 vs min_score auto 0.5000 (the most frequent class scores 0.3333 on this holdout, "
            "+ auto_margin 0.25 of the gap to 1)") in d.checks
    assert any(c.startswith("PASS every class recall >= min_class_score auto (each class's recall under a uniform "
                            "guess, + auto_margin 0.25 of the gap to 1) (lowest 0.8") for c in d.checks), d.checks
    assert json.loads(MlflowClient().get_model_version(NAME, "2").tags["promotion.trivial"])["score"] == pytest.approx(1 / 3)
    assert _aliases() == {"champion": "2"}


def test_auto_gates_refuse_a_model_that_does_not_beat_the_trivial_one(store, models, holdouts, tmp_path):
    """Where `bottom` is 200 of 300 images, always answering it scores 0.667: a model that never predicts it
    (0.333) is refused by both auto floors, each failure naming its keys; auto_margin moves the floor."""
    holdout = _holdout(tmp_path / "bottom_heavy", bottoms=200)
    _log(models["no_bottom"])
    d = promote(NAME, holdout, PromoteConfig(**AUTO), EVAL)
    assert not d.promoted
    score, cls = d.reasons
    assert score == ("accuracy 0.3333 vs min_score auto 0.7500 (the most frequent class scores 0.6667 on this holdout, "
                     "+ auto_margin 0.25 of the gap to 1) (set promote.min_score, or promote.auto_margin, in params.yaml)")
    assert cls.startswith("class recall below min_class_score auto (each class's recall under a uniform guess, "
                          "+ auto_margin 0.25 of the gap to 1): bottom (0.000 < 0.500)")
    assert cls.endswith("(set promote.min_class_score, or promote.auto_margin, in params.yaml)")
    d = promote(NAME, holdouts["balanced"], PromoteConfig(**{**AUTO, "auto_margin": 0.0}), EVAL, version="1")
    assert d.reasons == ["class recall below min_class_score auto (each class's recall under a uniform guess, + "
                         "auto_margin 0 of the gap to 1): bottom (0.000 < 0.333) (set promote.min_class_score, or "
                         "promote.auto_margin, in params.yaml)"]


def test_an_explicit_version_is_judged_not_the_alias(store, models, holdouts):
    holdout = holdouts["balanced"]
    _log(models["good"])
    _log(models["good"])
    _log(models["no_bottom"])  # v3 holds the challenger alias now
    d = promote(NAME, holdout, gates(), EVAL, version="1")
    assert d.promoted and d.challenger_version == "1"
    assert _aliases() == {"champion": "1", "challenger": "3"}  # v3 keeps its alias: it was not judged
    MlflowClient().set_registered_model_alias(NAME, "candidate", "2")
    d = promote(NAME, holdout, gates(min_gain=0.01), EVAL, alias="candidate")
    assert not d.promoted and d.challenger_version == "2" and d.champion_version == "1"
    with pytest.raises(RegistryError, match=f"model '{NAME}' has no version 9"):
        promote(NAME, holdout, gates(), EVAL, version="9")
    with pytest.raises(NoChallengerError, match="no version with alias 'nightly'"):
        promote(NAME, holdout, gates(), EVAL, alias="nightly")


def test_the_champion_is_not_judged_again(store, models, holdouts, tmp_path, monkeypatch, capsys):
    """`promote --version 1` on champion v1 used to print "PROMOTED ... champion before: none"."""
    _log(models["good"])
    assert promote(NAME, holdouts["balanced"], gates(), EVAL).promoted
    description = MlflowClient().get_model_version(NAME, "1").description
    with pytest.raises(AlreadyChampionError, match=f"{NAME} v1 is champion already: nothing to promote"):
        promote(NAME, holdouts["balanced"], gates(), EVAL, version="1")
    monkeypatch.chdir(_project(tmp_path, store, holdouts["balanced"]))
    capsys.readouterr()
    assert cli.main(["promote", "--version", "1"]) == 1
    out, err = capsys.readouterr()
    assert "PROMOTED" not in out and err.startswith(f"visionops promote: error: {NAME} v1 is champion already: nothing")
    assert len(err.strip().splitlines()) == 1
    assert MlflowClient().get_model_version(NAME, "1").description == description  # no decision recorded
    assert _aliases() == {"champion": "1"}


def test_holdout_must_exist_and_have_its_split(store, models, holdouts, tmp_path):
    _log(models["no_bottom"])
    with pytest.raises(RegistryError, match="no frozen holdout dataset here") as err:
        promote(NAME, tmp_path / "missing", gates(), EVAL)
    assert isinstance(err.value, VisionopsError)
    rng = np.random.default_rng(0)
    dataset.save(dataset.Dataset(CLASSES, {"test": _split([0, 1, 2], rng, "test")}, "synthetic"), tmp_path / "nohold")
    with pytest.raises(RegistryError, match=r"no 'holdout' images to evaluate on \(splits: test\)"):
        evaluate_version(f"models:/{NAME}@challenger", tmp_path / "nohold", EVAL)
    m = evaluate_version(f"models:/{NAME}@challenger", holdouts["balanced"], EVAL)
    assert m["n"] == 300 and m["per_class_recall"]["bottom"] == 0.0
    assert m["accuracy"] == pytest.approx(np.mean(list(m["per_class_recall"].values())))
    assert 0.0 <= m["ece"] <= 1.0 and m["latency_ms"] > 0 and m["latency_batch_size"] == 8


# ------------------------------------------------------------------------------------------
# rollback


def test_rollback_moves_champion_back(store, models, holdouts):
    holdout = holdouts["balanced"]
    client = MlflowClient()
    with pytest.raises(RollbackError, match="no 'champion'"):
        rollback(NAME)
    _log(models["no_bottom"])
    promote(NAME, holdout, gates(), EVAL)
    with pytest.raises(RollbackError, match="no 'previous' version") as err:
        rollback(NAME)
    assert isinstance(err.value, VisionopsError)
    for _ in range(2):
        _log(models["good"])
        promote(NAME, holdout, gates(), EVAL)
    assert _aliases() == {"champion": "3", "previous": "2"}

    r = rollback(NAME)
    assert (r["champion_version"], r["rolled_back_version"], r["previous_version"]) == ("2", "3", "1")
    assert _aliases() == {"champion": "2", "previous": "1"}  # previous follows the promotion chain
    assert client.get_model_version(NAME, "3").tags["rollback.replaced_by"] == "2"
    assert client.get_model_version(NAME, "2").tags["rollback.restored_from"] == "3"

    r = rollback(NAME)
    assert (r["champion_version"], r["previous_version"]) == ("1", None)
    with pytest.raises(RollbackError, match=r"no 'previous' version: champion v1 was restored by a rollback from v2, and no "
                                            r"version was champion before v1; `visionops promote --version 2` judges v2"):
        rollback(NAME)


def test_a_second_rollback_says_what_is_true(store, models, holdouts):
    """After one rollback, a second used to say "champion v1 was never replaced"."""
    holdout = holdouts["balanced"]
    _log(models["no_bottom"])
    promote(NAME, holdout, gates(), EVAL)
    with pytest.raises(RollbackError, match=r"no 'previous' version: champion v1 is the first champion \(no version is recorded"):
        rollback(NAME)
    _log(models["good"])
    promote(NAME, holdout, gates(), EVAL)
    assert rollback(NAME)["champion_version"] == "1"
    with pytest.raises(RollbackError) as err:
        rollback(NAME)
    assert "never replaced" not in str(err.value)
    assert str(err.value) == (f"model '{NAME}' has no 'previous' version: champion v1 was restored by a rollback from v2, "
                              "and no version was champion before v1; `visionops promote --version 2` judges v2 again")


# ------------------------------------------------------------------------------------------
# detection: dense images, where "fully detected" never happens


DET_CLASSES = [str(d) for d in range(10)]
DET_SHAPE = (96, 96, 1)
DET_NAME = "promo-detector"
SUPPRESSED = (5, 6, 7, 8, 9)  # the champion never detects these digits


@pytest.fixture(scope="module")
def detectors(tmp_path_factory) -> dict[str, Path]:
    """A real CenterNet trained briefly on canvases of 10-16 digits (`full`), the same network blind to
    the digits 5-9 (`blind`: their heatmap biases at -1e4), and a holdout of 60 such canvases."""
    from detection_data import dominant

    from visionops.config import DetectionConfig
    from visionops.data.canvases import make_canvases
    from visionops.tasks.detection import detector

    out = tmp_path_factory.mktemp("detectors")
    c = make_canvases(300, DET_SHAPE[0], seed=0, digits=(10, 16), scale=(10, 14))
    torch.manual_seed(0)
    model = detector.build("centernet_tiny", DET_CLASSES, DET_SHAPE, [0.2], [0.3],
                           DetectionConfig(score_threshold=0.3, max_detections=30))
    x = torch.from_numpy(c.images[:240]).permute(0, 3, 1, 2).float() / 255
    boxes, labels = torch.from_numpy(c.boxes[:240]), torch.from_numpy(c.labels[:240])
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(150):
        idx = torch.randint(0, 240, (32,), generator=g)
        loss = model.loss(model(x[idx]), (boxes[idx], labels[idx]), x[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    paths = {"full": out / "full.pt", "blind": out / "blind.pt"}
    detector.save(paths["full"], model.eval(), "centernet_tiny", DET_CLASSES, DET_SHAPE)
    with torch.no_grad():  # the head's first K output channels are the class heatmaps' logits
        model.net.head[-1].bias[list(SUPPRESSED)] = -1e4
    detector.save(paths["blind"], model, "centernet_tiny", DET_CLASSES, DET_SHAPE)
    held = dataset.Split(c.images[240:], dominant(c.labels[240:]), [f"holdout/{i}.png" for i in range(60)],
                         targets={"boxes": c.boxes[240:], "box_labels": c.labels[240:]})
    paths["holdout"] = out / "holdout"
    dataset.save(dataset.Dataset(DET_CLASSES, {"holdout": held}, "canvases", task="detection"), paths["holdout"])
    return paths


def _log_detector(path: Path) -> str:
    from visionops.tasks.detection.task import TASK

    with mlflow.start_run():
        return str(TASK.log_model(path, DET_NAME, tags={"source": path.stem}, alias="challenger").version)


@pytest.mark.slow
def test_a_better_detector_on_dense_images_is_promoted_by_a_per_image_test(store, detectors):
    """On canvases of 10-16 digits no image is ever fully detected, so McNemar saw no discordant image (p=1)
    and no detector could be promoted; the Wilcoxon signed-rank test on per-image F1 promotes the better
    one, and rejects the worse. The class gate judges AP@.5, as documented."""
    from torchmetrics.detection import MeanAveragePrecision

    from visionops.tasks.detection import detector
    from visionops.tasks.detection.metrics import image_correct, truths

    holdout = detectors["holdout"]
    split = dataset.load(holdout).splits["holdout"]
    true = truths(split.targets["boxes"], split.targets["box_labels"])
    assert min(len(t["labels"]) for t in true) >= 10
    preds = {k: detector.predict(detector.load(detectors[k])[0], split.images) for k in ("full", "blind")}
    correct = {k: np.array([image_correct(p, t) for p, t in zip(preds[k], true)]) for k in preds}
    assert not correct["full"].any() and mcnemar(correct["full"], correct["blind"])["p_value"] == 1.0  # the old test

    _log_detector(detectors["blind"])
    assert promote(DET_NAME, holdout, gates(), EVAL).promoted  # the first champion: absolute gates only
    _log_detector(detectors["full"])
    d = promote(DET_NAME, holdout, gates(min_score=0.2, min_gain=0.05, significance=0.001), EVAL)

    assert d.promoted, d.reasons
    c = d.comparison
    assert (c["test"], c["measure"], c["n"]) == ("Wilcoxon signed-rank", "per-image F1 (IoU 0.5, class matched)", 60)
    assert c["p_value"] < 1e-6 and c["challenger_better"] > 40 and c["gain"] > 0.05
    assert d.challenger_metrics["map_50"] > d.champion_metrics["map_50"]
    assert any(re.match(r"Wilcoxon signed-rank p=\S+ on per-image F1 \(IoU 0\.5, class matched\) vs significance "
                        r"0\.001 \(n=60 holdout images: \d+ scored higher by the challenger, \d+ by the champion", r)
               for r in d.reasons)
    # the class gate is AP@.5 per class, as documented (COCO AP at IoU 0.5 alone, computed here independently)
    metric = MeanAveragePrecision(iou_thresholds=[0.5], class_metrics=True, backend="faster_coco_eval")
    metric.update([{k: torch.as_tensor(p[k]) for k in ("boxes", "scores", "labels")} for p in preds["full"]],
                  [{k: torch.as_tensor(t[k]) for k in ("boxes", "labels")} for t in true])
    r = metric.compute()
    ap50 = {DET_CLASSES[int(k)]: float(v) for k, v in zip(r["classes"], r["map_per_class"])}
    assert d.challenger_metrics["per_class_ap50"] == pytest.approx(ap50, abs=1e-3)  # served JSON rounds boxes, scores
    strict = d.challenger_metrics["per_class_ap"]  # AP@[.5:.95], reported beside it: lower, not what the gate reads
    assert np.mean(list(strict.values())) < np.mean(list(ap50.values())) - 0.05
    lowest = min(ap50.values())
    assert f"PASS every class AP@.5 >= min_class_score 0.000 (lowest {lowest:.3f})" in d.checks
    mv = MlflowClient().get_model_version(DET_NAME, "2")
    assert mv.tags["promotion.test"] == "Wilcoxon signed-rank on per-image F1 (IoU 0.5, class matched)"
    assert "paired test Wilcoxon signed-rank on per-image F1 (IoU 0.5, class matched): p=" in mv.description

    _log_detector(detectors["blind"])  # the worse detector as challenger: rejected by the same test
    d = promote(DET_NAME, holdout, gates(significance=0.05, min_class_score=0.05), EVAL)
    assert not d.promoted and d.comparison["champion_better"] > 40
    assert any(re.match(r"Wilcoxon signed-rank p=(1|0\.9\d*) on per-image F1", r) for r in d.reasons), d.reasons
    assert any(r.startswith("class AP@.5 below min_class_score 0.050:") and all(f"{k} (0.000)" in r for k in SUPPRESSED)
               for r in d.reasons), d.reasons


def test_trivial_scores_are_what_a_predictor_that_learnt_nothing_scores():
    """Segmentation: every pixel the most frequent class (IGNORE pixels uncounted); detection: no box (0)."""
    from visionops.tasks import get_task
    from visionops.tasks.segmentation.segmenter import IGNORE

    masks = np.zeros((2, 4, 4), np.uint8)
    masks[0, :, :1] = 1  # 4 of 32 pixels cell, 4 IGNORE, 24 background
    masks[1, :1, :] = IGNORE
    split = dataset.Split(np.zeros((2, 4, 4, 1), np.uint8), np.zeros(2, np.int64), ["a", "b"], targets={"masks": masks})
    seg = get_task("segmentation").trivial_scores(split, dataset.Dataset(["background", "cell"], {}, "x", task="segmentation"))
    assert seg["predictor"] == seg["per_class_predictor"] == "every pixel background"
    assert seg["per_class"] == pytest.approx({"background": 24 / 28, "cell": 0.0})
    assert seg["score"] == pytest.approx(24 / 28 / 2)
    det = get_task("detection").trivial_scores(split, dataset.Dataset(["a", "b"], {}, "x", task="detection"))
    assert det == {"predictor": "no box", "score": 0.0, "per_class_predictor": "no box", "per_class": {"a": 0.0, "b": 0.0}}
