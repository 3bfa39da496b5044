"""Knowledge distillation: the KD loss, the combined criterion, ONNX export/parity/int8, and the stage end to end."""

import csv
import json
import math

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F

from visionops.config import (
    AugmentConfig,
    BalanceConfig,
    DataConfig,
    DistillConfig,
    TrainConfig,
)
from visionops.data import dataset
from visionops.data.download import run_download
from visionops.errors import VisionopsError
from visionops.evaluation.calibration import fit_temperature
from visionops.models import count_parameters
from visionops.serving.export import (
    OnnxParityError,
    export_onnx,
    onnx_parity,
    ort_logits,
    ort_session,
)
from visionops.tasks.classification import classifier
from visionops.tasks.classification.baseline import run_baseline
from visionops.training.baseline_record import BaselineMismatchError
from visionops.tasks.classification.distill import DistillationLoss, run_distill
from visionops.tasks.classification.losses import ClassificationLoss, kd_loss
from visionops.tasks.classification.prepare import run_prepare
from visionops.tasks.classification.train import run_train

# --- kd_loss ---------------------------------------------------------------------------------


def test_kd_loss_is_zero_when_student_equals_teacher():
    logits = torch.randn(8, 10, generator=torch.Generator().manual_seed(0)) * 5
    for t in (1.0, 4.0, 20.0):
        assert kd_loss(logits, logits.clone(), t).item() == pytest.approx(0.0, abs=1e-6)


def test_kd_loss_known_value_and_t_squared_scaling():
    # teacher probabilities (0.75, 0.25) at temperature T, student uniform:
    # KL = 0.75 ln(0.75/0.5) + 0.25 ln(0.25/0.5), then scaled by T^2
    kl = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)
    student = torch.zeros(1, 2)
    for t in (1.0, 2.0, 4.0):
        teacher = torch.tensor([[t * math.log(3.0), 0.0]])
        assert kd_loss(student, teacher, t).item() == pytest.approx(kl * t * t, rel=1e-5)


def test_kd_loss_matches_torch_kl_divergence():
    g = torch.Generator().manual_seed(1)
    s, t, temp = torch.randn(16, 7, generator=g) * 3, torch.randn(16, 7, generator=g) * 3, 3.0
    p_t, p_s = F.softmax(t / temp, 1), F.softmax(s / temp, 1)
    kl = torch.distributions.kl_divergence(torch.distributions.Categorical(probs=p_t), torch.distributions.Categorical(probs=p_s))
    assert kd_loss(s, t, temp).item() == pytest.approx(kl.mean().item() * temp**2, rel=1e-5)
    manual = (p_t * (p_t.log() - p_s.log())).sum(1).mean() * temp**2
    assert kd_loss(s, t, temp).item() == pytest.approx(manual.item(), rel=1e-5)


def test_kd_loss_gradient_is_t_times_probability_gap_and_t_invariant_at_high_t():
    g = torch.Generator().manual_seed(2)
    s0, t = torch.randn(4, 10, generator=g), torch.randn(4, 10, generator=g)
    grads = {}
    for temp in (2.0, 20.0, 40.0):
        s = s0.clone().requires_grad_(True)
        kd_loss(s, t, temp).backward()
        expected = temp * (F.softmax(s0 / temp, 1) - F.softmax(t / temp, 1)) / len(s0)  # Hinton eq. 2, batch mean
        torch.testing.assert_close(s.grad, expected, rtol=1e-4, atol=1e-7)
        grads[temp] = s.grad.norm().item()
    # thanks to T^2 the gradient magnitude does not vanish as T grows (it tends to a constant)
    assert grads[40.0] == pytest.approx(grads[20.0], rel=0.05)


# --- combined criterion ----------------------------------------------------------------------


class _Teacher(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(12, 5)

    def forward(self, x):
        return self.lin(x.flatten(1))


def _batch():
    g = torch.Generator().manual_seed(3)
    inputs, logits = torch.rand(6, 3, 2, 2, generator=g), torch.randn(6, 5, generator=g, requires_grad=True)
    return inputs, logits, torch.randint(0, 5, (6,), generator=g)


def test_criterion_alpha_zero_is_plain_ce_and_never_runs_the_teacher():
    inputs, logits, labels = _batch()
    hard = ClassificationLoss(label_smoothing=0.1)
    expected = F.cross_entropy(logits, labels, label_smoothing=0.1)
    torch.testing.assert_close(DistillationLoss(hard)(logits, labels, inputs), expected)
    exploding = _Teacher()
    exploding.forward = lambda x: (_ for _ in ()).throw(AssertionError("teacher ran at alpha 0"))
    torch.testing.assert_close(DistillationLoss(hard, exploding, 0.0, 4.0)(logits, labels, inputs), expected)
    soft = F.one_hot(labels, 5).float() * 0.6 + 0.08  # MixUp-style soft targets, rows sum to 1
    torch.testing.assert_close(DistillationLoss(hard)(logits, soft, inputs), F.cross_entropy(logits, soft, label_smoothing=0.1))


def test_criterion_alpha_one_is_kd_and_mixes_linearly():
    inputs, logits, labels = _batch()
    teacher, hard = _Teacher(), ClassificationLoss()
    with torch.no_grad():
        t_logits = teacher(inputs)
    kd, ce = kd_loss(logits, t_logits, 4.0), F.cross_entropy(logits, labels)
    torch.testing.assert_close(DistillationLoss(hard, teacher, 1.0, 4.0)(logits, labels, inputs), kd)
    mixed = DistillationLoss(hard, teacher, 0.3, 4.0)(logits, labels, inputs)
    torch.testing.assert_close(mixed, 0.3 * kd + 0.7 * ce)
    mixed.backward()
    assert logits.grad is not None
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())  # frozen
    assert not teacher.training
    with pytest.raises(ValueError):
        DistillationLoss(hard, None, 0.5)


# --- the digits data, a teacher, ONNX ------------------------------------------------------------


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    """Real digits at 16x16: the dataset, the prepared split and a 3-epoch lenet teacher (selected,
    and so served, with mirrored test-time augmentation)."""
    root = tmp_path_factory.mktemp("distill")
    run_download(DataConfig(image_size=16), root / "dataset", root / "holdout")
    run_prepare(root / "dataset", BalanceConfig(), AugmentConfig(), root / "prepared", root / "reports_prepare")
    train_cfg = TrainConfig(model="lenet", epochs=3, batch_size=32, device="cpu", tta="flip")
    run_train(root / "dataset", root / "prepared", train_cfg, AugmentConfig(), root / "teacher.pt", root / "reports_train", root / "ck.pt")
    return root, train_cfg


@pytest.mark.parametrize("arch", ["slim_resnet", "mobilenet_tiny", "lenet"])
def test_onnx_export_parity_and_perturbation(arch, digits, tmp_path):
    root, _ = digits
    ds = dataset.load(root / "dataset")
    test = ds.splits["test"]
    mean, std = classifier.channel_stats(ds.splits["train"].images)
    torch.manual_seed(0)
    model = classifier.build(arch, ds.class_names, ds.image_shape, mean, std).eval()
    path = tmp_path / f"{arch}.onnx"
    info = export_onnx(model, ds.image_shape, path)
    assert path.exists() and info["opset"] and not list(tmp_path.glob(".*.tmp"))
    graph = onnx.load(str(path)).graph
    assert [i.name for i in graph.input] == ["images"] and [o.name for o in graph.output] == ["logits"]
    assert graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert not graph.input[0].type.tensor_type.shape.dim[0].HasField("dim_value")  # dynamic batch
    one = ort_logits(ort_session(path), test.images[:1])
    assert one.shape == (1, len(ds.class_names))

    result = onnx_parity(model, path, test.images, atol=1e-4)
    assert result["passed"] and result["max_abs_diff"] <= 1e-4 and result["argmax_agreement"] == 1.0
    assert result["images"] == len(test)

    with torch.no_grad():
        last = [p for p in model.parameters()][-1]  # the classifier's bias
        last += 0.5 * torch.arange(len(last), dtype=last.dtype)
    with pytest.raises(OnnxParityError, match="differ") as err:
        onnx_parity(model, path, test.images, atol=1e-4)
    assert isinstance(err.value, VisionopsError)


# --- the stage ----------------------------------------------------------------------------------


def test_run_distill_end_to_end(digits, tmp_path):
    root, train_cfg = digits
    cfg = DistillConfig(student="slim_resnet", epochs=2)
    student_path, reports, ckpts = tmp_path / "student.pt", tmp_path / "reports", tmp_path / "ck"
    base = run_baseline(root / "dataset", root / "prepared", cfg, train_cfg, AugmentConfig(), tmp_path / "baseline", ckpts)
    assert not base["skipped"] and base["epochs_run"] == 2 and not list(ckpts.glob("*.pt"))
    on_file = json.loads((tmp_path / "baseline" / "baseline.json").read_text())
    assert on_file["test_acc"] == base["test_acc"] and len(on_file["history"]) == 2 and "train_seconds" not in on_file
    logged = []
    m = run_distill(root / "dataset", root / "prepared", root / "teacher.pt", cfg, train_cfg, AugmentConfig(), student_path, reports, ckpts,
                    on_epoch=lambda desc, row: logged.append(row) if desc == "distill" else None,
                    baseline_path=tmp_path / "baseline" / "baseline.json", holdout_dir=root / "holdout")

    for name in ("metrics.json", "details.json", "history.csv", "student.onnx", "student.int8.onnx", "report.md", "report.html"):
        assert (reports / name).exists(), name
    assert not (reports / "history.png").exists()  # dvc.yaml's charts draw history.csv
    # the files DVC hashes hold no timings or speeds; those are in measured.json and speed.md
    on_disk, speeds = json.loads((reports / "details.json").read_text()), json.loads((reports / "measured.json").read_text())
    assert on_disk == pytest.approx({k: v for k, v in m.items() if k not in speeds})
    headline = json.loads((reports / "metrics.json").read_text())  # the DVC metrics: a few numbers
    assert headline == pytest.approx({k: m[k] for k in ("student_acc", "kd_gain", "student_gap", "int8_acc", "mia_auc",
                                                        "mia_tpr_at_1pct_fpr")})
    assert m["mia_members"] == m["mia_nonmembers"] > 100 and 0 <= m["mia_auc"] <= 1  # the student's audit
    assert "## Membership-inference audit" in (reports / "report.md").read_text()
    assert m["baseline_acc"] == base["test_acc"] and m["baseline_best_val_acc"] == base["best_val_acc"]
    assert m["student_gap"] == pytest.approx(m["teacher_acc"] - m["student_acc"])
    assert {"train_seconds", "cpu_speedup", "int8_speedup", "student_cpu_images_per_second"} <= set(speeds)
    assert speeds == pytest.approx({k: m[k] for k in speeds})
    assert m["train_seconds"] == pytest.approx(sum(r["epoch_seconds"] for r in logged))
    assert not list(ckpts.glob("*.pt"))  # checkpoints are removed once the stage is done

    ds = dataset.load(root / "dataset")
    test = ds.splits["test"]
    teacher, _ = classifier.load(root / "teacher.pt")
    student, info = classifier.load(student_path)
    assert info["arch"] == "slim_resnet" and info["teacher"]["arch"] == "lenet" and len(info["history"]) == 2
    torch.testing.assert_close(student.mean, teacher.mean)
    torch.testing.assert_close(student.std, teacher.std)
    # both files carry their served rule: the selection's TTA and the temperature fitted on val
    val = ds.splits["val"]
    for model, saved in ((teacher, classifier.load(root / "teacher.pt")[1]), (student, info)):
        raw = classifier.predict_logits(model, np.array(val.images), torch.device("cpu"), calibrated=False)
        assert saved["tta"] == "flip" and saved["temperature"] == pytest.approx(fit_temperature(raw, val.labels), rel=1e-6)
        assert saved["temperature"] != 1.0
    assert m["student_tta"] == "flip" and m["student_temperature"] == info["temperature"]

    def acc(model):
        return float((classifier.predict_logits(model, np.array(test.images), torch.device("cpu")).argmax(1).numpy() == test.labels).mean())

    assert m["teacher_acc"] == pytest.approx(acc(teacher)) and m["student_acc"] == pytest.approx(acc(student))
    assert m["teacher_acc"] > 0.5  # a real teacher, even after 3 epochs
    assert m["kd_gain"] == pytest.approx(m["student_acc"] - m["baseline_acc"])
    assert m["student_parameters"] == count_parameters(student) and m["teacher_parameters"] == count_parameters(teacher)
    assert m["param_ratio"] == pytest.approx(count_parameters(student) / count_parameters(teacher))
    assert m["size_ratio"] == pytest.approx(m["student_size_bytes"] / m["teacher_size_bytes"])
    assert m["cpu_speedup"] == pytest.approx(m["student_cpu_images_per_second"] / m["teacher_cpu_images_per_second"])
    assert m["onnx_parity"] is True and m["onnx_max_abs_diff"] < 1e-3

    int8_pred = ort_logits(ort_session(reports / "student.int8.onnx"), test.images).argmax(1)
    assert m["int8_acc"] == pytest.approx(float((int8_pred == test.labels).mean()))
    assert m["int8_method"] == "static_qdq_per_channel"
    assert m["int8_bytes"] == (reports / "student.int8.onnx").stat().st_size < (reports / "student.onnx").stat().st_size
    assert m["int8_acc"] > m["student_acc"] - 0.1  # int8 costs little accuracy
    assert m["int8_speedup"] > 0

    with (reports / "history.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert [int(r["epoch"]) for r in rows] == [1, 2] and {"train_loss", "val_acc"} <= set(rows[0])
    report = (reports / "report.md").read_text()
    assert "| teacher | lenet" in report and "student alone" in report and "parity passed" in report
    assert "images/s" not in report and "images/s" in (reports / "speed.md").read_text()
    page = (reports / "report.html").read_text()  # what MLflow's artifact viewer renders
    assert "<table>" in page and "Per-epoch loss and accuracy: history.csv" in page and "<img" not in page  # DVC's charts
    assert all(not k.endswith("seconds") for row in info["history"] for k in row)
    print({k: v for k, v in m.items() if isinstance(v, (int, float)) and not isinstance(v, bool)})


def test_run_distill_rejects_a_teacher_for_other_data(digits, tmp_path):
    root, train_cfg = digits
    ds = dataset.load(root / "dataset")
    other = classifier.build("lenet", ds.class_names[:5], ds.image_shape, [0.5], [0.5])
    classifier.save(tmp_path / "other.pt", other, "lenet", ds.class_names[:5], ds.image_shape)
    with pytest.raises(VisionopsError, match="retrain"):
        run_distill(root / "dataset", root / "prepared", tmp_path / "other.pt", DistillConfig(epochs=1, baseline=False), train_cfg,
                    AugmentConfig(), tmp_path / "s.pt", tmp_path / "r", tmp_path / "ck")
    assert not (tmp_path / "s.pt").exists()


def test_run_distill_resumes_from_its_checkpoints(digits, tmp_path, monkeypatch, capsys):
    root, train_cfg = digits
    cfg = DistillConfig(student="slim_resnet", epochs=1, quantize=False, baseline=False)
    args = (root / "dataset", root / "prepared", root / "teacher.pt", cfg, train_cfg, AugmentConfig(), tmp_path / "s.pt", tmp_path / "r", tmp_path / "ck")

    def crash(*_a, **_k):
        raise RuntimeError("killed after training")

    monkeypatch.setattr("visionops.serving.export.export_onnx", crash)
    with pytest.raises(RuntimeError, match="killed"):
        run_distill(*args)
    assert {p.name for p in (tmp_path / "ck").glob("*.pt")} == {"distill.pt"}
    assert not (tmp_path / "s.pt").exists()
    monkeypatch.undo()
    capsys.readouterr()
    m = run_distill(*args)
    err = capsys.readouterr().err
    assert "resuming from" in err and "distill.pt" in err
    assert "epoch 1/1" not in err  # nothing retrained
    assert m["int8_acc"] is None and not (tmp_path / "r" / "student.int8.onnx").exists()
    student, _ = classifier.load(tmp_path / "s.pt")
    test = dataset.load(root / "dataset").splits["test"]
    pred = classifier.predict_logits(student, np.array(test.images), torch.device("cpu")).argmax(1).numpy()
    assert m["student_acc"] == pytest.approx(float((pred == test.labels).mean()))


def test_baseline_skipped_and_a_mismatched_baseline(digits, tmp_path):
    """distill.baseline false: the baseline stage trains nothing and says so, and distill reports no KD gain;
    distill refuses a baseline made for another student, naming the file."""
    root, train_cfg = digits
    skip = DistillConfig(student="slim_resnet", epochs=1, quantize=False, baseline=False)
    result = run_baseline(root / "dataset", root / "prepared", skip, train_cfg, AugmentConfig(), tmp_path / "b", tmp_path / "ck")
    assert json.loads((tmp_path / "b" / "baseline.json").read_text()) == result and result["skipped"] is True
    m = run_distill(root / "dataset", root / "prepared", root / "teacher.pt", skip, train_cfg, AugmentConfig(),
                    tmp_path / "s.pt", tmp_path / "r", tmp_path / "ck", baseline_path=tmp_path / "b" / "baseline.json")
    assert m["baseline_acc"] is None and m["kd_gain"] is None and "student alone" not in (tmp_path / "r" / "report.md").read_text()
    other = DistillConfig(student="slim_resnet", epochs=1, quantize=False, baseline=True)
    with pytest.raises(BaselineMismatchError, match=r"b/baseline.json: the baseline is for student 'slim_resnet' \(skipped: True\)"):
        run_distill(root / "dataset", root / "prepared", root / "teacher.pt", other, train_cfg, AugmentConfig(),
                    tmp_path / "s.pt", tmp_path / "r", tmp_path / "ck", baseline_path=tmp_path / "b" / "baseline.json")
