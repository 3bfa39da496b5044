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


def test_no_champion_and_no_challenger_are_one_true_line(tmp_path, monkeypatch, capsys):
    """A real MLflow store: what `predict` and `promote` say at each step of a new model's life."""
    from mlflow import MlflowClient

    from visionops import cli

    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    (tmp_path / "params.yaml").write_text(f"mlflow:\n  tracking_uri: {store}\n  student_model_name: student\n")
    (tmp_path / "a.png").write_bytes(b"not read: the model is looked up first")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)

    def error(*argv) -> str:
        capsys.readouterr()
        assert cli.main(list(argv)) == 1
        err = capsys.readouterr().err
        ours = [line for line in err.splitlines() if "mlflow.store.db.utils" not in line]  # MLflow's "creating tables"
        assert len(ours) == 1 and ours[0].startswith(f"visionops {argv[0]}: error: ") and "Exception" not in err, err
        return ours[0]

    assert "no model named 'visionops-classifier' is registered yet: run `dvc repro`" in error("predict", "a.png")
    assert "no version of 'student' is registered yet" in error("promote", "--student")

    client = MlflowClient(store)
    client.create_registered_model("student")
    client.create_model_version("student", source=str(tmp_path), run_id=None)
    err = error("promote", "--student")
    assert err.endswith("student has no 'challenger' and no champion: version 1 is registered but none was judged yet "
                        "(a DVC experiment's versions move no alias): judge one with `visionops promote --version N`")
    client.set_registered_model_alias("student", "champion", "1")
    assert "student v1 is already champion and no version holds the alias 'challenger'; nothing to promote" in error(
        "promote", "--student")
    client.create_registered_model("visionops-classifier")
    client.create_model_version("visionops-classifier", source=str(tmp_path), run_id=None)
    err = error("predict", "a.png")
    assert "model 'visionops-classifier' has no champion: version 1 is registered but none was judged yet" in err


def test_commands_print_a_summary_and_json_on_request(tmp_path, capsys):
    import json

    from visionops import cli

    (tmp_path / "params.yaml").write_text("train:\n  epochs: 3\n")
    assert cli.main(["check", "--params", str(tmp_path / "params.yaml")]) == 0
    assert capsys.readouterr().out.strip() == f"{tmp_path / 'params.yaml'} is valid"
    assert cli.main(["check", "--params", str(tmp_path / "params.yaml"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["train"]["epochs"] == 3
    text = cli._summary("evaluate", {"accuracy": 0.9812, "ece": 0.0104, "per_class": {"a": 1.0}})
    assert text.splitlines()[:3] == ["evaluate: done", "  accuracy                 0.9812", "  ece                      0.0104"]
    assert "reports in reports/evaluate/" in text and "per_class" not in text


def test_the_evaluate_summary_shows_every_tasks_headline_metrics():
    """Each task's metrics.json headline (accuracy..., mAP, mIoU...) is in evaluate's printed summary."""
    from visionops import cli
    from visionops.tasks.classification.evaluate import HEADLINE as CLASSIFICATION
    from visionops.tasks.detection.evaluate import HEADLINE as DETECTION
    from visionops.tasks.segmentation.evaluate import HEADLINE as SEGMENTATION

    assert set(CLASSIFICATION + DETECTION + SEGMENTATION) <= set(cli.HEADLINES["evaluate"])
    text = cli._summary("evaluate", {"model": "centernet", "map_50": 0.8123, "map": 0.5012, "image_accuracy": 0.4,
                                     "latency_batch_ms": 3.25, "per_class_ap50": {"a": 1.0}})
    assert text.splitlines()[:5] == ["evaluate: done", "  map_50                   0.8123", "  map                      0.5012",
                                     "  image_accuracy           0.4", "  latency_batch_ms         3.25"]
