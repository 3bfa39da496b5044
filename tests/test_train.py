"""Training: losses, determinism, imbalance options, checkpoint resume after SIGKILL, and DDP."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import mlflow
import pytest
import torch
import torch.nn.functional as F
from pipeline_project import Project

from visionops import measured
from visionops.config import AugmentConfig, BalanceConfig, DataConfig, TrainConfig
from visionops.data.download import run_download
from visionops.tasks.classification import classifier
from visionops.tasks.classification.losses import ClassificationLoss
from visionops.tasks.classification.prepare import run_prepare
from visionops.tasks.classification.train import run_train

FAST = dict(model="slim_resnet", epochs=2, batch_size=64, lr=0.05)


@pytest.fixture(scope="module")
def digits16(tmp_path_factory):
    out = tmp_path_factory.mktemp("digits16") / "ds"
    run_download(DataConfig(image_size=16), out)
    return out


def _train(digits16, tmp_path, balance=None, augment=None, **train):
    prepared = tmp_path / "prepared"
    run_prepare(digits16, balance or BalanceConfig(), augment or AugmentConfig(), prepared, tmp_path / "rp")
    cfg = TrainConfig(**{**FAST, **train})
    metrics = run_train(digits16, prepared, cfg, augment or AugmentConfig(), tmp_path / "m.pt", tmp_path / "r", tmp_path / "ck.pt")
    return metrics, tmp_path / "m.pt"


def test_loss_options_match_torch():
    logits, y = torch.randn(8, 3), torch.tensor([0, 1, 2, 0, 1, 2, 0, 0])
    w, priors = [0.5, 1.0, 2.0], [0.6, 0.3, 0.1]
    assert torch.allclose(ClassificationLoss()(logits, y), F.cross_entropy(logits, y))
    assert torch.allclose(ClassificationLoss(class_weights=w)(logits, y), F.cross_entropy(logits, y, weight=torch.tensor(w)))
    adjusted = logits + 2.0 * torch.log(torch.tensor(priors))
    assert torch.allclose(ClassificationLoss(class_priors=priors, tau=2.0)(logits, y), F.cross_entropy(adjusted, y))
    assert torch.allclose(
        ClassificationLoss(label_smoothing=0.1)(logits, y), F.cross_entropy(logits, y, label_smoothing=0.1)
    )
    soft = F.one_hot(y, 3).float()
    assert torch.allclose(ClassificationLoss()(logits, soft), F.cross_entropy(logits, y))


def test_training_learns_and_writes_outputs(digits16, tmp_path):
    metrics, model_path = _train(digits16, tmp_path, model="resnet20", epochs=3)
    assert metrics["best_val_acc"] > 0.8 and metrics["epochs_run"] == 3
    model, info = classifier.load(model_path)
    assert info["arch"] == "resnet20" and len(info["history"]) == 3
    rows = (tmp_path / "r" / "history.csv").read_text().splitlines()
    assert rows[0].startswith("epoch,train_loss,train_acc,val_loss,val_acc") and len(rows) == 4
    assert not (tmp_path / "r" / "history.png").exists() and not (tmp_path / "ck.pt").exists()  # dvc.yaml draws the csv
    # timings are in the result (MLflow) and measured.json, never in the files DVC hashes
    on_disk = json.loads((tmp_path / "r" / "details.json").read_text())
    assert json.loads((tmp_path / "r" / "metrics.json").read_text()) == {"best_val_acc": metrics["best_val_acc"]}
    assert "train_seconds" not in on_disk and "seconds" not in rows[0] and "epoch_seconds" not in info["history"][0]
    assert json.loads((tmp_path / "r" / "measured.json").read_text()) == pytest.approx(
        {k: metrics[k] for k in ("train_seconds", "train_images_per_second")})


def test_training_is_deterministic_on_cpu(digits16, tmp_path):
    aug = AugmentConfig(rotate_degrees=10, crop_padding=2, cutout_size=4)
    a, pa = _train(digits16, tmp_path / "a", augment=aug)
    b, pb = _train(digits16, tmp_path / "b", augment=aug)
    ma, mb = classifier.load(pa)[0], classifier.load(pb)[0]
    for (k, va), vb in zip(ma.state_dict().items(), mb.state_dict().values()):
        assert torch.equal(va, vb), k
    assert a["best_val_acc"] == b["best_val_acc"]


@pytest.mark.parametrize(
    "balance",
    [
        BalanceConfig(strategy="oversample", simulate_imbalance_factor=10),
        BalanceConfig(strategy="class_weights", simulate_imbalance_factor=10),
        BalanceConfig(strategy="logit_adjust", simulate_imbalance_factor=10),
        BalanceConfig(strategy="oversample", offline=True, simulate_imbalance_factor=10),
    ],
    ids=["oversample", "class_weights", "logit_adjust", "offline"],
)
def test_imbalance_options_train(digits16, tmp_path, balance):
    aug = AugmentConfig(rotate_degrees=10, crop_padding=2)
    metrics, _ = _train(digits16, tmp_path, balance=balance, augment=aug, epochs=6, batch_size=32)
    assert metrics["best_val_acc"] > 0.3  # chance is 0.1


def test_mixing_and_auto_augment_train(digits16, tmp_path):
    aug = AugmentConfig(auto="trivialaugment", mixup_alpha=0.2, cutmix_alpha=1.0)
    metrics, _ = _train(digits16, tmp_path, augment=aug, optimizer="adamw", lr=3e-3, schedule="cosine", label_smoothing=0.1)
    assert metrics["best_val_acc"] > 0.2


def test_early_stopping(digits16, tmp_path):
    metrics, _ = _train(digits16, tmp_path, epochs=30, lr=1e-6, schedule="constant", early_stopping_patience=2)
    assert metrics["epochs_run"] < 30


def _plain(value) -> bool:
    """Only tensors and plain values: what `torch.load(weights_only=True)` can read without code."""
    if isinstance(value, dict):
        return all(isinstance(k, str | int) and _plain(v) for k, v in value.items())
    if isinstance(value, list | tuple):
        return all(_plain(v) for v in value)
    return value is None or isinstance(value, torch.Tensor | str | int | float | bool)


@pytest.mark.parametrize("schedule,optimizer", [("triangle", "sgd"), ("onecycle", "adamw")])
def test_checkpoint_holds_plain_values_and_resumes_with_weights_only(tmp_path, schedule, optimizer):
    from visionops.tasks.classification.augment import BatchAugment
    from visionops.tasks.classification.objective import train_correct, val_scorer
    from visionops.training.trainer import fit

    gen = torch.Generator().manual_seed(0)
    x, y = torch.randint(0, 256, (64, 3, 8, 8), dtype=torch.uint8, generator=gen), torch.arange(64) % 4
    cfg = TrainConfig(epochs=2, batch_size=16, schedule=schedule, optimizer=optimizer, lookahead=True)
    augment = BatchAugment.from_config(AugmentConfig(), num_classes=4)

    def model():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten(), torch.nn.Linear(144, 4))

    def criterion(logits, targets, _x):
        return F.cross_entropy(logits, targets)

    ckpt, cpu = tmp_path / "ck.pt", torch.device("cpu")
    scorer = val_scorer((x, y), cfg, cpu)
    _, first = fit(model(), (x, y), scorer, cfg, augment, criterion, cpu, ckpt, "fp", train_correct=train_correct)
    payload = torch.load(ckpt, weights_only=True)
    assert _plain(payload) and payload["state"]["epoch"] == 2
    _, resumed = fit(model(), (x, y), scorer, cfg, augment, criterion, cpu, ckpt, "fp", train_correct=train_correct)
    assert resumed.epoch == 2 and resumed.history == first.history


def _fit_lenet(stem, data, scorer, cfg, augment, criterion, **kw):
    """A seeded lenet fitted on the CPU (checkpoint `stem`.ck) and saved to `stem`.pt: (state, the file's bytes)."""
    from visionops.tasks.classification.objective import train_correct
    from visionops.training.trainer import fit

    torch.manual_seed(0)
    model = classifier.build("lenet", list("0123456789"), (16, 16, 1), [0.5], [0.5])
    model, state = fit(model, data, scorer, cfg, augment, criterion, torch.device("cpu"), stem.with_suffix(".ck"),
                       "fp", train_correct=train_correct, **kw)
    history = [measured.pure(row) for row in state.history]
    classifier.save(stem.with_suffix(".pt"), model, "lenet", list("0123456789"), (16, 16, 1), history=history)
    return state, stem.with_suffix(".pt").read_bytes()


@pytest.fixture
def prepared_project(tmp_path):
    project = Project(tmp_path / "proj")
    project.set_params(data={"image_size": 16}, train={"model": "resnet20", "epochs": 8, "batch_size": 32})
    project.repro("prepare")
    return project


@pytest.mark.slow
def test_sigkill_mid_epoch_then_dvc_repro_resumes(prepared_project):
    project = prepared_project
    ckpt = project.path / "models" / "checkpoints" / "train.pt"
    proc = subprocess.Popen(
        ["dvc", "repro", "train"], cwd=project.path, env=project.env(), start_new_session=True,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 240
    while not ckpt.exists():
        assert proc.poll() is None, "train ended before its first checkpoint"
        assert time.time() < deadline, "no checkpoint after 240 s"
        time.sleep(0.05)
    saved_epoch = torch.load(ckpt, weights_only=True)["state"]["epoch"]
    time.sleep(0.3)  # mid-epoch
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (project.path / "models" / "teacher.pt").exists()
    resumed = project.repro("train")
    assert "resuming from models/checkpoints/train.pt after epoch" in resumed.stderr + resumed.stdout
    metrics = json.loads((project.path / "reports/train/details.json").read_text())
    assert metrics["epochs_run"] == 8 and saved_epoch < 8
    history = classifier.load(project.path / "models" / "teacher.pt")[1]["history"]
    assert [r["epoch"] for r in history] == list(range(1, 9))
    seconds = json.loads((project.path / "reports/train/measured.json").read_text())["train_seconds"]
    assert seconds > 0  # the whole run's time, the epochs before the kill included (issue 13)
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{project.path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("visionops").experiment_id], "tags.`visionops.stage` = 'train'")
    assert sorted(r.info.status for r in runs) == ["FINISHED", "KILLED"]  # the whole process group was killed
    killed, resumed = sorted(runs, key=lambda r: r.info.status, reverse=True)
    assert resumed.data.tags["visionops.resumed_from"] == killed.info.run_id


@pytest.mark.slow
def test_ddp_two_cpu_processes_train(prepared_project):
    project = prepared_project
    project.set_params(train={"model": "lenet", "epochs": 6, "batch_size": 32, "device": "cpu"})
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    out = project.run(torchrun, "--standalone", "--nproc_per_node", "2", "-m", "visionops", "train")
    metrics = json.loads((project.path / "reports/train/details.json").read_text())
    assert metrics["world_size"] == 2 and metrics["epochs_run"] == 6
    assert metrics["best_val_acc"] > 0.3, out.stderr


def test_saved_model_bytes_depend_only_on_the_model(tmp_path):
    """torch.save names its zip folder after the file; classifier.save must not leak its temp file's name."""
    model = classifier.build("lenet", list("0123456789"), (16, 16, 1), [0.5], [0.5])
    for name in ("a.pt", "b.pt"):
        classifier.save(tmp_path / name, model, "lenet", list("0123456789"), (16, 16, 1))
    assert (tmp_path / "a.pt").read_bytes() == (tmp_path / "b.pt").read_bytes()


def test_a_resumed_fit_saves_the_bytes_of_an_uninterrupted_one(tmp_path):
    """A history half read back from a checkpoint pickles like one made in a single run (issue 25)."""
    from visionops.tasks.classification.augment import BatchAugment
    from visionops.tasks.classification.objective import val_scorer

    gen = torch.Generator().manual_seed(0)
    x, y = torch.randint(0, 256, (64, 1, 16, 16), dtype=torch.uint8, generator=gen), torch.arange(64) % 10
    cfg = TrainConfig(model="lenet", epochs=3, batch_size=16)
    augment, cpu = BatchAugment.from_config(AugmentConfig(), num_classes=10), torch.device("cpu")
    scorer = val_scorer((x, y), cfg, cpu)

    class Killed(Exception):
        pass

    def killed_after_epoch_1(_desc, row):
        if row["epoch"] == 1:  # the checkpoint is written before on_epoch: as if killed -9 right after it
            raise Killed

    def criterion(logits, targets, _x):
        return F.cross_entropy(logits, targets)

    def run(name: str, **kw):
        return _fit_lenet(tmp_path / name, (x, y), scorer, cfg, augment, criterion, **kw)[1]

    whole = run("whole")
    with pytest.raises(Killed):
        run("resumed", on_epoch=killed_after_epoch_1)
    assert torch.load(tmp_path / "resumed.ck", weights_only=True)["state"]["epoch"] == 1
    assert run("resumed") == whole


def _wait_then_kill(proc: subprocess.Popen, checkpoint, deadline_s: float = 300) -> int:
    """SIGKILL `proc`'s process group once `checkpoint` exists; return the epoch it holds."""
    deadline = time.time() + deadline_s
    while not checkpoint.exists():
        assert proc.poll() is None, f"{checkpoint.name}: the run ended before its first checkpoint"
        assert time.time() < deadline, f"no {checkpoint.name} after {deadline_s} s"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    return torch.load(checkpoint, weights_only=True)["state"]["epoch"]


@pytest.mark.slow
def test_kill_9_in_train_and_distill_then_repro_writes_the_uninterrupted_bytes(tmp_path):
    """Two copies of the project: one runs the pipeline uninterrupted, the other is killed -9 in train and
    again in distill, then `dvc repro` resumes both: the model files and dvc.lock are byte for byte the same.
    Then in the first, committed, a train killed -9 and resumed leaves dvc.lock as committed, and no new version."""
    params = dict(data={"image_size": 16}, train={"model": "resnet20", "epochs": 4, "batch_size": 32},
                  distill={"student": "slim_resnet", "epochs": 3, "baseline": False, "quantize": False},
                  evaluate={"gradcam_samples": 2})
    whole, killed = Project(tmp_path / "whole"), Project(tmp_path / "killed")
    for project in (whole, killed):
        project.set_params(**params)
    whole.repro()

    def start(project, *args):
        return subprocess.Popen(["dvc", "repro", *args], cwd=project.path, env=project.env(), start_new_session=True,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    ckpts = killed.path / "models" / "checkpoints"
    assert _wait_then_kill(start(killed), ckpts / "train.pt") < 4  # whole runs: dvc.lock lists stages as they ran
    assert _wait_then_kill(start(killed), ckpts / "distill.pt") < 3  # train resumes first
    out = killed.repro()
    assert "resuming from models/checkpoints/distill.pt" in out.stderr + out.stdout
    for name in ("models/teacher.pt", "models/student.pt", "dvc.lock"):
        assert (killed.path / name).read_bytes() == (whole.path / name).read_bytes(), name

    whole.run("git", "add", "-A")
    whole.run("git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "run")
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{whole.path / 'mlflow.db'}")
    versions = sorted((v.name, v.version) for v in client.search_model_versions(""))
    shutil.rmtree(whole.path / ".dvc" / "cache")  # as in a fresh clone: DVC has no teacher.pt to restore, train must run
    assert _wait_then_kill(start(whole, "-f", "--single-item", "train"), whole.path / "models/checkpoints/train.pt") < 4
    out = whole.repro()
    assert "resuming from models/checkpoints/train.pt" in out.stderr + out.stdout
    # evaluate and distill rerun (their outputs left the emptied cache), to the committed bytes; register (always
    # run: the registry is state DVC cannot see) finds both files registered and adds no version
    assert "register: nothing to register" in out.stdout + out.stderr
    assert whole.run("git", "diff", "HEAD", "--quiet", "dvc.lock", check=False).returncode == 0
    assert sorted((v.name, v.version) for v in client.search_model_versions("")) == versions


def test_train_steps_runs_exactly_that_many_steps_and_resumes_to_the_same_bytes(tmp_path):
    """train.steps 10 at 4 steps an epoch: 3 epochs, the last of 2 steps; the lr schedule ends at the 10th
    step; killed after epoch 2 and resumed, the model file is the uninterrupted run's."""
    from visionops.tasks.classification.augment import BatchAugment
    from visionops.tasks.classification.objective import val_scorer
    from visionops.training.trainer import triangle

    gen = torch.Generator().manual_seed(0)
    x, y = torch.randint(0, 256, (64, 1, 16, 16), dtype=torch.uint8, generator=gen), torch.arange(64) % 10
    cfg = TrainConfig(model="lenet", epochs=50, steps=10, batch_size=16, schedule="triangle", lr=0.05)
    augment, cpu = BatchAugment.from_config(AugmentConfig(), num_classes=10), torch.device("cpu")
    scorer = val_scorer((x, y), cfg, cpu)
    calls = []

    class Killed(Exception):
        pass

    def killed_after_epoch_2(_desc, row):
        if row["epoch"] == 2:
            raise Killed

    def criterion(logits, targets, _x):
        calls.append(len(targets))
        return F.cross_entropy(logits, targets)

    def run(name: str, **kw):
        return _fit_lenet(tmp_path / name, (x, y), scorer, cfg, augment, criterion, **kw)

    state, whole = run("whole")
    assert len(calls) == 10 and state.steps == 10 and state.epoch == 3 and len(state.history) == 3
    assert state.history[-1]["lr"] == pytest.approx(0.05 * triangle(10, 10)) and triangle(10, 10) == pytest.approx(0.07)
    assert state.history[-2]["lr"] == pytest.approx(0.05 * triangle(8, 10))  # 8 steps after 2 whole epochs
    calls.clear()
    with pytest.raises(Killed):
        run("resumed", on_epoch=killed_after_epoch_2)
    assert len(calls) == 8 and torch.load(tmp_path / "resumed.ck", weights_only=True)["state"]["steps"] == 8
    calls.clear()
    resumed, resumed_bytes = run("resumed")
    assert len(calls) == 2 and resumed.steps == 10 and resumed_bytes == whole


def test_train_and_baseline_report_steps_and_epochs_run(digits16, tmp_path):
    from visionops.config import DistillConfig
    from visionops.tasks.classification.baseline import run_baseline

    metrics, _ = _train(digits16, tmp_path, steps=25)
    per_epoch = metrics["train_images"] // 64 + bool(metrics["train_images"] % 64)
    assert 25 < 2 * per_epoch and per_epoch < 25  # the second epoch is partial
    on_disk = json.loads((tmp_path / "r" / "details.json").read_text())
    assert (on_disk["steps_run"], on_disk["epochs_run"]) == (metrics["steps_run"], metrics["epochs_run"]) == (25, 2)
    cfg = DistillConfig(student="lenet", epochs=9, steps=7)
    base = run_baseline(digits16, tmp_path / "prepared", cfg, TrainConfig(**FAST), AugmentConfig(), tmp_path / "b",
                        tmp_path / "bck")
    assert (base["steps_run"], base["epochs_run"]) == (7, 1)


def test_steps_with_dp_sgd_is_refused():
    from visionops.config import ParamsError, parse_params

    with pytest.raises(ParamsError, match="train.steps cannot be used with train.privacy.enabled"):
        parse_params({"train": {"steps": 100, "privacy": {"enabled": True}, "amp": False}})
    with pytest.raises(ParamsError, match="distill.steps cannot be used with train.privacy.enabled"):
        parse_params({"train": {"privacy": {"enabled": True}, "amp": False}, "distill": {"steps": 100}})
