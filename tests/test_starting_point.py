"""train.init: every starting point loads what it should, fine-tuning controls act, and the start is recorded."""

from __future__ import annotations

import json
import os
import socket

import mlflow
import numpy as np
import pytest
import torch
import yaml
from pipeline_project import Project

from visionops.config import AugmentConfig, BalanceConfig, DataConfig, MlflowConfig, TrainConfig, parse_params
from visionops.data.download import run_download
from visionops.errors import InvalidInputError
from visionops.models import create_model, model_file
from visionops.models.encoders import to_canonical
from visionops.tasks.classification import classifier
from visionops.tasks.classification.prepare import run_prepare
from visionops.tasks.classification.train import run_train
from visionops.tracking.stage_run import INIT_TAG, StageRun
from visionops.training import resolve_init, starting_point
from visionops.training.trainer import _optimizer

SHAPE = (32, 32, 1)


def _bare(model) -> dict:
    return {k.removeprefix("net."): v for k, v in model.state_dict().items() if k.startswith("net.")}


def _classifier_file(path, arch: str, classes: list[str], seed: int = 1, shape=SHAPE):
    torch.manual_seed(seed)
    model = classifier.build(arch, classes, shape, [0.5] * shape[2], [0.25] * shape[2])
    classifier.save(path, model, arch, classes, shape)
    return model


def _start(tmp_path, monkeypatch, init: str, arch: str, classes: list[str], task: str = "classification", shape=SHAPE):
    """A freshly seeded `arch` network started from `init` (run from tmp_path, the project); (fresh, started, record)."""
    monkeypatch.chdir(tmp_path)
    cfg = TrainConfig(model=arch, init=init)
    torch.manual_seed(0)
    fresh = create_model(arch, in_channels=shape[2], num_classes=len(classes), image_size=shape[0])
    torch.manual_seed(0)
    net = create_model(arch, in_channels=shape[2], num_classes=len(classes), image_size=shape[0])
    start = starting_point.load(cfg, MlflowConfig())
    record = starting_point.start_network(net, arch, task, classes, shape, start)
    return fresh.state_dict(), net.state_dict(), record


# ------------------------------------------------------------------------------------------
# what each starting point loads


def test_a_model_file_of_the_same_architecture_loads_whole_and_a_head_for_other_classes_is_new(tmp_path, monkeypatch, capsys):
    source = _bare(_classifier_file(tmp_path / "old.pt", "resnet20", ["a", "b", "c"]))
    fresh, net, record = _start(tmp_path, monkeypatch, "old.pt", "resnet20", ["x", "y", "z"])  # same count, other classes
    head = {"head.2.weight", "head.2.bias"}
    assert all(torch.equal(net[k], source[k]) for k in net if k not in head)
    assert all(torch.equal(net[k], fresh[k]) and not torch.equal(net[k], source[k]) for k in head)  # re-initialised
    assert record["loaded_from"] == "the whole network" and record["head_reinitialised"] == ["head.2"]
    assert record["new"] == ["head.2"] and record["skipped"] == {} and "stages.0.0.conv1" in record["loaded"]
    assert len(record["md5"]) == 32
    assert "train: started from old.pt (the whole network of a classification resnet20)" in capsys.readouterr().err

    _, net, record = _start(tmp_path, monkeypatch, "old.pt", "resnet20", ["a", "b", "c"])  # the same classes: all of it
    assert all(torch.equal(net[k], source[k]) for k in net) and record["new"] == []


def test_a_classifiers_encoder_starts_a_detector_and_a_segmenter(tmp_path, monkeypatch):
    for backbone, arch, task in (("centernet_backbone", "centernet", "detection"), ("unet_backbone", "unet", "segmentation")):
        source = _bare(_classifier_file(tmp_path / f"{backbone}.pt", backbone, [str(i) for i in range(10)], shape=(32, 32, 3)))
        fresh, net, record = _start(tmp_path, monkeypatch, f"{backbone}.pt", arch, ["cell", "membrane"], task)
        encoder = [k for k in net if k.startswith(("stem.", "down4.", "down8."))]
        rest = [k for k in net if k not in encoder and not k.endswith("num_batches_tracked")]
        convs = [k for k in encoder if net[k].ndim == 4]
        first = convs[0]
        assert torch.equal(net[first], source[first].sum(1, keepdim=True))  # RGB classifier, greyscale target
        assert record["rgb_summed"] == [first]
        assert all(torch.equal(net[k], source[k]) for k in encoder if k != first)
        assert all(torch.equal(net[k], fresh[k]) for k in rest) and rest
        assert record["loaded_from"] == "the encoder (canonical names)" and record["task"] == "classification"


def test_a_mobilenet_classifier_starts_the_detectors_and_segmenters_backbone(tmp_path, monkeypatch):
    source = _bare(_classifier_file(tmp_path / "mn.pt", "mobilenet_v3_large", ["a", "b"], shape=(64, 64, 3)))
    _, net, record = _start(tmp_path, monkeypatch, "mn.pt", "lraspp_mobilenet_v3_large", ["bg", "fg"], "segmentation",
                            shape=(64, 64, 3))
    moved = [k for k in source if k.startswith("features.")]
    assert all(torch.equal(net["net.backbone." + k[len("features."):]], source[k]) for k in moved)
    assert record["tensors_loaded"] == len(moved) and record["skipped"] == {}


def test_pretrain_loads_the_encoder_of_models_backbone_pt(tmp_path, monkeypatch):
    torch.manual_seed(3)
    pretrained = create_model("unet_backbone", in_channels=1, num_classes=1, image_size=32)
    (tmp_path / "models").mkdir()
    model_file.save(tmp_path / "models" / "backbone.pt", {  # the pretrain stage's file, as agreed
        "task": "backbone", "arch": "unet_backbone", "encoder": to_canonical(pretrained.state_dict(), "unet_backbone")})
    _, net, record = _start(tmp_path, monkeypatch, "pretrain", "unet", ["cell", "membrane"], "segmentation")
    own = pretrained.state_dict()
    assert all(torch.equal(net[k], own[k]) for k in own if k.startswith(("stem.", "down4.", "down8.")))
    assert record["init"] == "pretrain" and record["arch"] == "unet_backbone" and len(record["md5"]) == 32


def test_a_file_outside_the_project_and_a_file_with_code_are_refused(tmp_path, monkeypatch):
    project = tmp_path / "project"
    project.mkdir()
    _classifier_file(tmp_path / "outside.pt", "lenet", ["a", "b"])
    with pytest.raises(InvalidInputError, match="outside the project and data.root"):
        _start(project, monkeypatch, "../outside.pt", "lenet", ["a", "b"])
    (project / "models").mkdir()
    _classifier_file(project / "models" / "teacher.pt", "lenet", ["a", "b"])
    with pytest.raises(InvalidInputError, match="an output of this pipeline"):
        _start(project, monkeypatch, "models/teacher.pt", "lenet", ["a", "b"])
    torch.save({"arch": "lenet", "state_dict": {}, "f": print}, project / "code.pt")
    with pytest.raises(InvalidInputError, match="holds code"):
        _start(project, monkeypatch, "code.pt", "lenet", ["a", "b"])


# ------------------------------------------------------------------------------------------
# ImageNet weights: torchvision's cache, never a download in a test


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """An empty TORCH_HOME under tmp_path, and no network: any connection attempt fails."""
    def refuse(*_args, **_kwargs):
        raise OSError("network blocked by the test")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    return tmp_path / "torch-home" / "hub" / "checkpoints"


def test_imagenet_weights_come_from_the_torch_home_cache(offline, tmp_path, monkeypatch):
    from torchvision.models import MobileNet_V3_Large_Weights, ResNet18_Weights, mobilenet_v3_large, resnet18

    offline.mkdir(parents=True)
    torch.manual_seed(7)
    cached = resnet18(weights=None).state_dict()  # ImageNet's layout: 1,000 classes
    torch.save(cached, offline / "resnet18-f37072fd.pth")  # the file name torchvision expects
    assert ResNet18_Weights.IMAGENET1K_V1.url.endswith("/resnet18-f37072fd.pth")
    fresh, net, record = _start(tmp_path, monkeypatch, "imagenet", "resnet18_tv", ["a", "b", "c"], shape=(32, 32, 3))
    assert all(torch.equal(net[k], cached[k]) for k in net if not k.startswith("fc."))
    assert all(torch.equal(net[k], fresh[k]) for k in ("fc.weight", "fc.bias"))  # a new head for 3 classes
    assert record["weights"] == "ResNet18_Weights.IMAGENET1K_V1" and record["file"] == "resnet18-f37072fd.pth"
    assert record["head_reinitialised"] == ["fc"] and record["sha256"] == _sha256(offline / "resnet18-f37072fd.pth")

    name = os.path.basename(MobileNet_V3_Large_Weights.IMAGENET1K_V1.url)
    features = mobilenet_v3_large(weights=None).state_dict()
    torch.save(features, offline / name)
    _, net, record = _start(tmp_path, monkeypatch, "imagenet", "fasterrcnn_mobilenet_v3_large_320_fpn", ["raccoon"],
                            "detection", shape=(64, 64, 3))
    moved = [k for k in features if k.startswith("features.")]
    assert all(torch.equal(net["net.backbone.body." + k[len("features."):]], features[k]) for k in moved)
    assert record["weights"] == "MobileNet_V3_Large_Weights.IMAGENET1K_V1" and record["tensors_loaded"] == len(moved)


def test_imagenet_offline_names_the_file_and_where_to_put_it(offline, tmp_path, monkeypatch):
    with pytest.raises(InvalidInputError) as err:
        _start(tmp_path, monkeypatch, "imagenet", "resnet18_tv", ["a", "b"], shape=(32, 32, 3))
    assert "resnet18-f37072fd.pth" in str(err.value) and "$TORCH_HOME/hub/checkpoints/resnet18-f37072fd.pth" in str(err.value)
    assert str(offline) in str(err.value)


def test_imagenet_normalises_with_imagenets_statistics_and_only_where_torchvision_has_weights():
    assert starting_point.normalisation(None, 3) is None
    with pytest.raises(Exception, match="torchvision has no ImageNet weights for lenet"):
        parse_params({"train": {"init": "imagenet", "model": "lenet"}})


def _sha256(path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


# ------------------------------------------------------------------------------------------
# fine-tuning controls, end to end on the embedded digits


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    out = tmp_path_factory.mktemp("digits") / "ds"
    run_download(DataConfig(image_size=16), out)
    prepared = out.parent / "prepared"
    run_prepare(out, BalanceConfig(), AugmentConfig(), prepared, out.parent / "rp")
    return out, prepared


def test_a_frozen_warm_up_leaves_the_loaded_layers_and_trains_the_head(digits, tmp_path, monkeypatch):
    dataset_dir, prepared = digits
    monkeypatch.chdir(tmp_path)
    source = _classifier_file(tmp_path / "start.pt", "resnet8", [str(i) for i in range(7)], shape=(16, 16, 1))
    cfg = TrainConfig(model="resnet8", epochs=1, batch_size=64, init="start.pt", freeze_epochs=1, backbone_lr_scale=0.1)
    metrics = run_train(dataset_dir, prepared, cfg, AugmentConfig(), tmp_path / "m.pt", tmp_path / "r", tmp_path / "ck.pt")
    trained = _bare(classifier.load(tmp_path / "m.pt")[0])
    before = _bare(source)
    params = {n.removeprefix("net.") for n, _ in source.named_parameters()}
    encoder = [k for k in params if not k.startswith("head.")]
    assert all(torch.equal(trained[k], before[k]) for k in encoder)  # frozen through the whole (one) epoch
    torch.manual_seed(cfg.seed)  # the head run_train built for the 10 digits, before training
    new_head = classifier.build("resnet8", [str(i) for i in range(10)], (16, 16, 1), [0.5], [0.25]).net.head[2].weight
    assert trained["head.2.weight"].shape == new_head.shape and not torch.equal(trained["head.2.weight"], new_head)
    details = json.loads((tmp_path / "r" / "details.json").read_text())
    assert details["init"]["init"] == "start.pt" and details["init"]["head_reinitialised"] == ["head.2"]
    assert metrics["init"]["tensors_loaded"] == len(details["init"]["tensors"]) > 0


def _frozen_run(task_name: str, ds_dir, tmp_path, raw: dict) -> dict:
    """prepare + train of `task_name` with a one-epoch frozen warm-up (the whole run): the trained model's bare state."""
    from visionops.tasks import get_task

    task, p = get_task(task_name), parse_params(raw)
    task.prepare(p, ds_dir, tmp_path / "prep", tmp_path / "rp")
    task.train(p, ds_dir, tmp_path / "prep", tmp_path / "teacher.pt", tmp_path / "r", tmp_path / "ck.pt")
    return model_file.read(tmp_path / "teacher.pt", task_name)["state_dict"]


def test_the_detection_and_segmentation_train_stages_honour_init(tmp_path, monkeypatch):
    from detection_data import write_detection_dataset

    monkeypatch.chdir(tmp_path)
    torch.set_num_threads(1)
    train = {"epochs": 1, "batch_size": 32, "optimizer": "adamw", "lr": 0.01, "device": "cpu", "freeze_epochs": 1}
    source = _bare(_classifier_file(tmp_path / "enc.pt", "centernet_backbone", ["x", "y"], shape=(64, 64, 1)))
    ds_dir = write_detection_dataset(tmp_path / "det", (("train", 48), ("val", 16), ("test", 16)))
    raw = {"task": "detection", "data": {"source": "canvases", "image_size": 64},
           "train": {**train, "model": "centernet", "init": "enc.pt"}, "distill": {"student": "centernet_tiny"}}
    state = _frozen_run("detection", ds_dir, tmp_path / "d", raw)
    encoder = [k for k, p in create_model("centernet_backbone", in_channels=1, num_classes=2, image_size=64).named_parameters()
               if not k.startswith("head.")]
    assert all(torch.equal(state["net." + k], source[k]) for k in encoder)
    assert json.loads((tmp_path / "d" / "r" / "details.json").read_text())["init"]["loaded_from"].startswith("the encoder")

    torch.manual_seed(3)
    pretrained = create_model("unet_backbone", in_channels=1, num_classes=1, image_size=64)
    (tmp_path / "models").mkdir()
    model_file.save(tmp_path / "models" / "backbone.pt", {
        "task": "backbone", "arch": "unet_backbone", "encoder": to_canonical(pretrained.state_dict(), "unet_backbone")})
    raw = {"task": "segmentation", "data": {"source": "canvases", "image_size": 64}, "balance": {"strategy": "class_weights"},
           "train": {**train, "model": "unet", "init": "pretrain"}, "distill": {"student": "unet_small"}}
    seg = tmp_path / "seg"
    state = _frozen_run("segmentation", _segmentation_canvases(seg / "ds"), seg, raw)
    own = pretrained.state_dict()
    encoder = [k for k, _ in pretrained.named_parameters() if not k.startswith("head.")]
    assert encoder and all(torch.equal(state["net." + k], own[k]) for k in encoder)
    assert json.loads((seg / "r" / "details.json").read_text())["init"]["init"] == "pretrain"


def _segmentation_canvases(root, n: int = 60):
    """Digit canvases with their masks (classes background and 0-9), 70/10/20 % train/val/test."""
    from visionops.data import dataset
    from visionops.data.canvases import make_canvases

    c = make_canvases(n, 64, seed=0)
    cuts = {"train": slice(0, 42), "val": slice(42, 48), "test": slice(48, n)}
    splits = {k: dataset.Split(c.images[s], np.zeros(s.stop - s.start, np.int64), [f"{k}/{i}.png" for i in range(s.stop - s.start)],
                               targets={"masks": c.masks[s]}) for k, s in cuts.items()}
    dataset.save(dataset.Dataset(["background", *map(str, range(10))], splits, "canvases", task="segmentation"), root)
    return root


def test_backbone_lr_scale_gives_the_loaded_layers_their_own_rate():
    torch.manual_seed(0)
    model = classifier.build("resnet8", ["a", "b"], (16, 16, 1), [0.5], [0.25])
    moved = frozenset(n for n, _ in model.named_parameters() if not n.startswith("net.head."))
    cfg = TrainConfig(model="resnet8", lr=0.1, init="x.pt", backbone_lr_scale=0.01)
    opt = _optimizer(model, cfg, moved)
    by_param = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    for name, p in model.named_parameters():
        assert by_param[id(p)] == pytest.approx(0.001 if name in moved else 0.1), name
    plain = _optimizer(model, TrainConfig(model="resnet8", lr=0.1))  # no start: the three groups of before
    assert len(plain.param_groups) == 3 and {g["lr"] for g in plain.param_groups} == {0.1}
    assert sum(len(g["params"]) for g in plain.param_groups) == len(list(model.parameters()))


def test_fine_tuning_controls_need_a_start():
    with pytest.raises(Exception, match="train.freeze_epochs applies to the layers a starting point gives"):
        parse_params({"train": {"freeze_epochs": 1}})
    with pytest.raises(Exception, match="models:/<name>@<alias>"):
        parse_params({"train": {"init": "models:/just-a-name"}})


# ------------------------------------------------------------------------------------------
# a registered starting point: resolved to a version, loaded, recorded


def _register(path, name: str) -> str:
    from visionops.serving.pyfunc import log_classifier

    with mlflow.start_run():
        return str(log_classifier(path, name, tags={}, alias=None).version)


def test_a_registered_alias_resolves_to_its_version_and_moves_models_init_json(store, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    one = _classifier_file(tmp_path / "v1.pt", "lenet", ["a", "b"], seed=1)
    two = _classifier_file(tmp_path / "v2.pt", "lenet", ["a", "b"], seed=2)
    v1, v2 = _register(tmp_path / "v1.pt", "clf"), _register(tmp_path / "v2.pt", "clf")
    client = mlflow.MlflowClient()
    client.set_registered_model_alias("clf", "champion", v1)
    init, cfg = "models:/clf@champion", MlflowConfig()
    path = tmp_path / resolve_init.INIT_FILE

    first = resolve_init.write_resolved(init, cfg)
    assert first["version"] == v1 and first["run_id"] == client.get_model_version("clf", v1).run_id
    stamp = path.stat().st_mtime_ns
    assert resolve_init.write_resolved(init, cfg) == first and path.stat().st_mtime_ns == stamp  # the same: untouched
    client.set_registered_model_alias("clf", "champion", v2)
    assert resolve_init.write_resolved(init, cfg)["version"] == v2 and json.loads(path.read_text())["version"] == v2

    _, net, record = _start(tmp_path, monkeypatch, init, "lenet", ["a", "b"])
    assert all(torch.equal(net[k], v) for k, v in _bare(two).items())  # the version init.json names: v2
    assert not torch.equal(net["features.0.weight"], _bare(one)["features.0.weight"])
    assert record["version"] == v2 and record["name"] == "clf"

    with mlflow.start_run() as run:  # the train run's lineage
        StageRun(run.info.run_id, "train", {}).log_init(record)
    tags = client.get_run(run.info.run_id).data.tags
    source = json.loads(tags[INIT_TAG + ".source"])
    assert tags[INIT_TAG] == init and source["version"] == v2 and source["run_id"] == record["run_id"]

    from visionops.serving.promotion import record_init

    record_init("clf", v1, record)
    described = client.get_model_version("clf", v1)
    assert f"started from {init}: version {v2} of clf" in described.description
    assert described.tags["visionops.init"] == init


def test_dvc_status_says_train_changed_when_the_champion_moves(store, tmp_path):
    """A real DVC project with dvc.yaml's own resolve_init stage and a train stand-in that depends on
    models/init.json as train does; the registry is the project's own mlflow.db."""
    project = Project(tmp_path / "proj")
    stages = yaml.safe_load((project.path / "dvc.yaml").read_text())["stages"]
    train = {"cmd": "cp models/init.json started.json", "deps": ["models/init.json"], "outs": ["started.json"]}
    (project.path / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"resolve_init": stages["resolve_init"], "train": train}}))
    project.set_params(train={"init": "models:/clf@champion"})
    db = project.path / "mlflow.db"
    db.write_bytes((tmp_path / "mlflow.db").read_bytes())
    mlflow.set_tracking_uri(f"sqlite:///{db}")
    client = mlflow.MlflowClient()
    for seed in (1, 2):
        _classifier_file(tmp_path / f"v{seed}.pt", "lenet", ["a", "b"], seed=seed)
    v1, v2 = _register(tmp_path / "v1.pt", "clf"), _register(tmp_path / "v2.pt", "clf")
    client.set_registered_model_alias("clf", "champion", v1)

    def status() -> dict:
        out = json.loads(project.run("dvc", "status", "--json").stdout)
        return {k.rsplit(":", 1)[-1]: v for k, v in out.items()}

    project.repro()
    assert status() == {"resolve_init": ["always changed"]}
    assert "Running stage 'train'" not in project.repro().stdout  # the same version: train is up to date
    client.set_registered_model_alias("clf", "champion", v2)
    assert status() == {"resolve_init": ["always changed"]}  # DVC cannot see the registry...
    project.repro("resolve_init")
    changed = status()
    assert changed["train"] == [{"changed deps": {"models/init.json": "modified"}}], changed  # ...until resolve_init ran
    out = project.repro().stdout
    assert "Running stage 'train'" in out and json.loads((project.path / "started.json").read_text())["version"] == v2
    assert status() == {"resolve_init": ["always changed"]}
