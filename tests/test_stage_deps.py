"""dvc.yaml lists, for every stage, exactly the code its import closure holds (visionops.stage_deps)."""

from pipeline_project import ROOT
from visionops.stage_deps import differences, stage_code


def test_dvc_yaml_matches_every_stages_import_closure():
    assert differences(ROOT / "dvc.yaml") == [], "run `make deps`"


def _names(stage: str) -> set[str]:
    return {p.relative_to(ROOT / "src/visionops").as_posix() for p in stage_code(stage)}


def test_closure_follows_imports_inside_functions_and_by_computed_name():
    train, distill, download, evaluate = (_names(s) for s in ("train", "distill", "download", "evaluate"))
    assert {"training/lookahead.py", "training/device.py", "tasks/classification/tta.py", "data/dataset.py", "tasks/classification/train.py", "cli.py"} <= train
    assert {"tasks/classification/augment.py", "tasks/classification/train.py", "training/trainer.py"} <= distill
    assert {"data/sources/digits.py", "data/sources/cifar10.py", "data/sources/folder.py"} <= download  # importlib.import_module
    assert "training/trainer.py" not in evaluate and "training" not in evaluate and "tasks/classification/train.py" not in download
