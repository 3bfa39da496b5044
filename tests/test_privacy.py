"""DP-SGD (`train.privacy`): the ε budget and where training stops, batch norm turned into group norm, the
refused combinations, (ε, δ) in the model file and the registry, the `max_epsilon` gate, resume, and
distillation's rule. Real Opacus and real training on the embedded digits (scatternet trains in seconds)."""

from __future__ import annotations

import math

import mlflow
import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from visionops.config import AugmentConfig, BalanceConfig, DataConfig, DistillConfig, EvaluateConfig, PromoteConfig, PrivacyConfig, TrainConfig, parse_params
from visionops.data import dataset
from visionops.data.download import run_download
from visionops.errors import VisionopsError
from visionops.models import create_model
from visionops.serving.privacy_record import DELTA_TAG, EPSILON_TAG
from visionops.serving.promotion import promote
from visionops.serving.pyfunc import log_classifier
from visionops.tasks.classification import classifier
from visionops.tasks.classification.distill import run_distill
from visionops.tasks.classification.frozen_front import frozen_front
from visionops.tasks.classification.losses import ClassificationLoss
from visionops.tasks.classification.prepare import run_prepare
from visionops.tasks.classification.train import load_train_data, run_train
from visionops.training.privacy import DPSGD, PrivacySettingsError, check_settings, default_delta
from visionops.training.trainer import fit

PRIVATE = {"enabled": True, "target_epsilon": 4.0}
SCATTER = dict(model="scatternet", epochs=4, batch_size=256, lr=1.0, momentum=0.9, nesterov=False, weight_decay=0.0,
               schedule="constant", device="cpu", privacy=PRIVATE)
NAME = "dp-classifier"


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    root = tmp_path_factory.mktemp("dp")
    run_download(DataConfig(image_size=16), root / "ds")
    run_prepare(root / "ds", BalanceConfig(), AugmentConfig(), root / "prepared", root / "rp")
    return root


@pytest.fixture(scope="module")
def private_model(digits):
    """scatternet trained with DP-SGD at ε = 4 on the digits: (its metrics, its model file)."""
    cfg = TrainConfig(**SCATTER)
    metrics = run_train(digits / "ds", digits / "prepared", cfg, AugmentConfig(), digits / "dp.pt", digits / "r", digits / "ck.pt")
    return metrics, digits / "dp.pt"


# --- settings --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "params, expect",
    [
        ({"train": {"amp": "always"}}, r"train\.amp: 'always' \(bf16 autocast\) cannot be used with train\.privacy"),
        ({"train": {"compile": True}}, r"train\.compile cannot be used with train\.privacy"),
        ({"augment": {"mixup_alpha": 0.2}}, r"augment\.mixup_alpha mixes images across the batch"),
        ({"balance": {"strategy": "oversample"}}, r"balance\.strategy 'oversample' .* use 'none'"),
        ({"task": "detection", "data": {"source": "canvases"}, "train": {"model": "centernet_tiny"},
          "distill": {"student": "centernet_tiny"}}, r"train\.privacy applies to classification only \(task is detection\)"),
    ],
    ids=["amp", "compile", "mixup", "balance", "detection"],
)
def test_params_refuse_what_dp_sgd_cannot_account_for(params, expect):
    train = {**params.get("train", {}), "privacy": PRIVATE}
    with pytest.raises(VisionopsError, match=expect):
        parse_params({**params, "train": train})
    parse_params({**params, "train": {**train, "privacy": {**PRIVATE, "enabled": False}}})  # fine without DP


def test_params_refuse_scatternet_where_it_cannot_go():
    with pytest.raises(VisionopsError, match="evaluate.gradcam_samples: scatternet has no convolution for Grad-CAM"):
        parse_params({"train": {"model": "scatternet"}})
    with pytest.raises(VisionopsError, match=r"distill\.student: scatternet cannot be exported to ONNX"):
        parse_params({"distill": {"student": "scatternet"}})
    parse_params({"train": {"model": "scatternet"}, "evaluate": {"gradcam_samples": 0}})


def test_the_stage_refuses_settings_it_meets_at_run_time():
    cfg = TrainConfig(privacy=PRIVATE)
    lenet = create_model("lenet", in_channels=1, num_classes=10, image_size=16)
    with pytest.raises(PrivacySettingsError, match="launch the stage without torchrun"):
        check_settings(cfg, lenet, torch.device("cpu"), world_size=2)
    with pytest.raises(PrivacySettingsError, match=r"train\.amp: bf16 autocast .* set train\.amp to false"):
        check_settings(cfg, lenet, torch.device("cuda"), world_size=1)
    fastnet = create_model("fastnet", in_channels=1, num_classes=10, image_size=16)
    with pytest.raises(PrivacySettingsError, match=r"train\.model: fastnet initialises layers from the training images'"):
        check_settings(cfg.model_copy(update={"model": "fastnet"}), fastnet, torch.device("cpu"), world_size=1)
    check_settings(cfg.model_copy(update={"amp": "off"}), lenet, torch.device("cuda"), world_size=1)


def test_default_delta_is_a_power_of_ten_at_most_one_over_n():
    for n, delta in ((1083, 1e-4), (1000, 1e-3), (40_000, 1e-5), (50_001, 1e-5)):
        assert default_delta(n) == pytest.approx(delta) and default_delta(n) <= 1 / n


# --- the budget ------------------------------------------------------------------------------------------


def _run_epochs(dp: DPSGD, most: int) -> int:
    """Account whole epochs as the trainer does, while the next one fits; returns how many ran."""
    epochs = 0
    while epochs < most and dp.next_epoch_fits():
        for _ in range(dp.steps_per_epoch):
            dp.accountant.step(noise_multiplier=dp.noise_multiplier, sample_rate=dp.sample_rate)
        epochs += 1
    return epochs


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_the_noise_spends_the_budget_in_the_planned_epochs_and_no_more(accountant, capsys):
    cfg = PrivacyConfig(enabled=True, target_epsilon=2.0, accountant=accountant)
    dp = DPSGD(cfg, n=1000, batch_size=100, epochs=3)
    assert _run_epochs(dp, most=10) == 3  # a fourth epoch would pass the target
    assert 1.9 < dp.epsilon() <= 2.0
    assert "another epoch would spend" in capsys.readouterr().err
    weak = DPSGD(cfg, n=1000, batch_size=100, epochs=3, noise_multiplier=dp.noise_multiplier / 2)
    ran = _run_epochs(weak, most=3)
    assert ran < 3 and weak.epsilon() <= 2.0  # less noise: the budget ends training early


def test_private_training_reports_and_records_epsilon_delta(private_model):
    metrics, path = private_model
    _, info = classifier.load(path)
    p = info["privacy"]
    assert 3.8 < metrics["dp_epsilon"] == p["epsilon"] <= 4.0
    assert metrics["dp_delta"] == p["delta"] == default_delta(metrics["train_images"]) == 1e-4
    assert p["steps"] == metrics["epochs_run"] * math.ceil(metrics["train_images"] / 256) and p["group_norm"] == []
    eps = [row["epsilon"] for row in info["history"]]  # the rows StageRun.log_epoch sends to MLflow
    assert eps == sorted(eps) and eps[-1] == pytest.approx(p["epsilon"]) and len(eps) == 4
    assert metrics["best_val_acc"] > 0.8  # the digits are easy even at ε = 4


def test_batch_norm_is_trained_as_group_norm_and_loads_back(digits, tmp_path):
    cfg = TrainConfig(model="slim_resnet", epochs=1, batch_size=128, device="cpu", privacy=PRIVATE)
    run_train(digits / "ds", digits / "prepared", cfg, AugmentConfig(hflip=True, crop_padding=2), tmp_path / "m.pt",
              tmp_path / "r", tmp_path / "ck.pt")
    model, info = classifier.load(tmp_path / "m.pt")
    assert "net.stem.1" in info["privacy"]["group_norm"]
    kinds = {type(m) for m in model.modules()}
    assert torch.nn.GroupNorm in kinds and not any(issubclass(k, torch.nn.modules.batchnorm._BatchNorm) for k in kinds)
    test = dataset.load(digits / "ds").splits["test"]
    assert classifier.predict_logits(model, test.images[:8], torch.device("cpu")).shape == (8, 10)


def test_the_frozen_front_is_computed_once_only_when_nothing_changes_the_images():
    model = classifier.build("scatternet", [str(i) for i in range(10)], (16, 16, 1), [0.5], [0.25])
    cfg = TrainConfig(model="scatternet")
    assert frozen_front(model, AugmentConfig(), cfg) is model.net.front
    assert frozen_front(model, AugmentConfig(hflip=True), cfg) is None
    assert frozen_front(model, AugmentConfig(), cfg.model_copy(update={"tta": "flip"})) is None
    lenet = classifier.build("lenet", [str(i) for i in range(10)], (16, 16, 1), [0.5], [0.25])
    assert frozen_front(lenet, AugmentConfig(), cfg) is None


def test_scatternet_serves_rgb_images():
    """NHWC uint8 images, permuted to NCHW as served: kymatio refuses a strided tensor unless made contiguous."""
    model = classifier.build("scatternet", [str(i) for i in range(10)], (32, 32, 3), [0.5] * 3, [0.25] * 3)
    images = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    assert classifier.predict_logits(model, images, torch.device("cpu")).shape == (4, 10)


def test_a_killed_private_run_resumes_to_the_same_weights_and_epsilon(digits, tmp_path):
    ds, images, labels, _ = load_train_data(digits / "ds", digits / "prepared")
    x, y = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(labels)
    cfg = TrainConfig(model="lenet", epochs=3, batch_size=128, device="cpu", privacy=PRIVATE)
    loss = ClassificationLoss()

    def run(checkpoint, on_epoch=None):
        torch.manual_seed(0)
        model = classifier.build("lenet", ds.class_names, ds.image_shape, [0.5], [0.25])
        return fit(model, (x, y), lambda m: {"loss": 0.0, "acc": 0.0}, cfg, lambda a, b, g: (a, b),
                   lambda logits, t, _x: loss(logits, t), torch.device("cpu"), checkpoint=checkpoint, fingerprint="f",
                   on_epoch=on_epoch)

    whole, whole_state = run(tmp_path / "whole.pt")

    def kill_after_two(_desc, row):
        if row["epoch"] == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "killed.pt", kill_after_two)
    resumed, resumed_state = run(tmp_path / "killed.pt")
    assert [r["epoch"] for r in resumed_state.history] == [1, 2, 3]
    assert resumed_state.privacy["epsilon"] == whole_state.privacy["epsilon"] <= 4.0
    for (k, a), b in zip(whole.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), k


# --- the registry and the gate ---------------------------------------------------------------------------


def _log(path) -> str:
    with mlflow.start_run():
        return str(log_classifier(path, NAME, tags={}).version)


def test_registry_holds_epsilon_delta_and_max_epsilon_gates_on_it(store, digits, private_model, tmp_path):
    metrics, path = private_model
    ds = dataset.load(digits / "ds")
    dataset.save(dataset.Dataset(ds.class_names, {"holdout": ds.splits["test"]}, "digits"), tmp_path / "holdout")
    loose = {"min_score": 0.0, "min_gain": -1.0, "significance": 1.0, "min_class_score": 0.0, "max_ece": 1.0,
             "max_latency_ratio": 1e6}
    evaluate = EvaluateConfig(latency_batch_size=8)

    v = _log(path)
    mv = MlflowClient().get_model_version(NAME, v)
    assert float(mv.tags[EPSILON_TAG]) == pytest.approx(metrics["dp_epsilon"], rel=1e-5)
    assert float(mv.tags[DELTA_TAG]) == 1e-4
    assert mv.description.startswith(f"DP-SGD: ({metrics['dp_epsilon']:.4g}, 0.0001)-differentially private")
    d = promote(NAME, tmp_path / "holdout", PromoteConfig(**loose, max_epsilon=1.0), evaluate, version=v)
    assert not d.promoted and d.reasons == [f"ε {metrics['dp_epsilon']:.4g} vs max_epsilon 1 (set promote.max_epsilon in "
                                            "params.yaml)"]
    d = promote(NAME, tmp_path / "holdout", PromoteConfig(**loose, max_epsilon=8.0), evaluate, version=v)
    assert d.promoted and f"PASS ε {metrics['dp_epsilon']:.4g} vs max_epsilon 8" in d.checks

    plain = classifier.build("lenet", ds.class_names, ds.image_shape, [0.5], [0.25])
    classifier.save(tmp_path / "plain.pt", plain, "lenet", ds.class_names, ds.image_shape)
    v2 = _log(tmp_path / "plain.pt")
    assert EPSILON_TAG not in MlflowClient().get_model_version(NAME, v2).tags
    d = promote(NAME, tmp_path / "holdout", PromoteConfig(**loose, max_epsilon=8.0), evaluate, version=v2)
    assert "ε inf (not trained with DP-SGD) vs max_epsilon 8 (set promote.max_epsilon in params.yaml)" in d.reasons
    assert not any("max_epsilon" in c for c in promote(NAME, tmp_path / "holdout", PromoteConfig(**loose), evaluate,
                                                         version=v2).checks)  # off by default


# --- distillation ----------------------------------------------------------------------------------------


def test_distill_refuses_a_non_private_teacher(digits, tmp_path):
    ds = dataset.load(digits / "ds")
    teacher = classifier.build("lenet", ds.class_names, ds.image_shape, [0.5], [0.25])
    classifier.save(tmp_path / "t.pt", teacher, "lenet", ds.class_names, ds.image_shape)
    with pytest.raises(PrivacySettingsError, match="needs a teacher trained with DP-SGD: a non-private teacher's soft"):
        run_distill(digits / "ds", digits / "prepared", tmp_path / "t.pt", DistillConfig(epochs=1, baseline=False),
                    TrainConfig(**SCATTER), AugmentConfig(), tmp_path / "s.pt", tmp_path / "r", tmp_path / "ck")
    assert not (tmp_path / "s.pt").exists()


@pytest.mark.slow
def test_a_private_student_of_a_private_teacher_adds_their_epsilons(digits, private_model, tmp_path):
    _, teacher = private_model
    cfg = DistillConfig(student="lenet", epochs=2, lr=0.5, baseline=False, quantize=False)
    metrics = run_distill(digits / "ds", digits / "prepared", teacher, cfg, TrainConfig(**SCATTER), AugmentConfig(),
                          tmp_path / "s.pt", tmp_path / "r", tmp_path / "ck")
    p = classifier.load(tmp_path / "s.pt")[1]["privacy"]
    t = classifier.load(teacher)[1]["privacy"]
    assert p["teacher_epsilon"] == t["epsilon"] and p["student_epsilon"] <= 4.0
    assert p["epsilon"] == pytest.approx(p["student_epsilon"] + t["epsilon"]) == metrics["dp_epsilon"]
    assert p["delta"] == pytest.approx(2e-4)
    assert np.isfinite(metrics["student_acc"])
