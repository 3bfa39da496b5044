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


def _run_failing_command(tmp_path, raise_line: str) -> subprocess.CompletedProcess:
    """Run `visionops boom`, a command whose body is `raise_line`, through the real `main()`."""
    (tmp_path / "params.yaml").write_text("")
    script = tmp_path / "boom.py"
    script.write_text(
        "import sys\n"
        "from visionops import cli\n"
        "from visionops.errors import MissingInputError\n"
        "def boom(params, args, run):\n"
        f"    {raise_line}\n"
        "cli.COMMANDS['boom'] = cli.Command(boom, 'fails', 'fails on purpose')\n"
        "sys.exit(cli.main(['boom', '--params', sys.argv[1]]))\n"
    )
    return subprocess.run([sys.executable, str(script), str(tmp_path / "params.yaml")], capture_output=True, text=True)


def test_a_user_error_is_one_line_and_exit_1(tmp_path):
    out = _run_failing_command(tmp_path, "raise MissingInputError('models/teacher.pt: no trained model')")
    assert out.returncode == 1
    assert out.stderr.strip() == "visionops boom: error: models/teacher.pt: no trained model"


def test_an_unexpected_error_keeps_its_traceback(tmp_path):
    for bug in ("raise ValueError('a bug')", "open('/nonexistent/file')", "{}['key']"):
        out = _run_failing_command(tmp_path, bug)
        assert out.returncode != 0
        assert "Traceback (most recent call last)" in out.stderr and "boom.py" in out.stderr, bug
