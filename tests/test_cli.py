"""The `visionops` command: fast help, clear errors, one subcommand per stage."""

import subprocess
import sys

from visionops.cli import COMMANDS, build_parser

HEAVY = ("torch", "mlflow", "prefect", "great_expectations", "sklearn", "dvc", "pandas", "matplotlib")


def test_help_path_imports_no_heavy_library():
    code = "import sys; from visionops.cli import build_parser; build_parser().format_help(); print(sorted(sys.modules))"
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    for name in HEAVY:
        assert f"'{name}'" not in loaded, f"{name} is imported on the --help path"


def test_every_dvc_stage_has_a_documented_subcommand():
    import yaml

    from conftest import ROOT

    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    for name, stage in stages.items():
        assert stage["cmd"] == f"visionops {name}"
        assert name in COMMANDS and len(COMMANDS[name].description) > 80
    help_text = build_parser().format_help()
    for name in list(stages) + ["promote", "rollback", "predict", "check"]:
        assert name in help_text


def test_bad_params_file_is_one_clear_line(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text("train:\n  epochs: zero\n")
    out = subprocess.run(
        [sys.executable, "-m", "visionops", "check", "--params", str(params)], capture_output=True, text=True
    )
    assert out.returncode == 1
    assert "train.epochs" in out.stderr and "Traceback" not in out.stderr
