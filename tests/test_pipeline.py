"""The real `dvc repro` on the embedded digits data and on real CIFAR-10 JPEGs with injected faults."""

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from pipeline_project import ROOT, Project
from visionops.stage_deps import as_deps, stage_code

pytestmark = pytest.mark.slow


FAST = dict(train={"epochs": 2}, distill={"epochs": 1, "baseline": False}, evaluate={"gradcam_samples": 2})


@pytest.fixture
def project(tmp_path):
    return Project(tmp_path / "proj")


@pytest.fixture(scope="module")
def ran_project(tmp_path_factory):
    """The whole digits pipeline, run once with few epochs; tests below change it step by step."""
    project = Project(tmp_path_factory.mktemp("ran") / "proj")
    project.set_params(**FAST)
    project.first_run = project.repro()
    return project


def test_full_pipeline_runs_every_stage_then_is_up_to_date(ran_project):
    project = ran_project
    for stage in ("download", "validate", "label_issues", "prepare", "pretrain", "resolve_init", "train", "evaluate",
                  "baseline", "distill", "register"):
        assert f"Running stage '{stage}'" in project.first_run.stdout
    assert json.loads((project.path / "reports/validate/summary.json").read_text())["success"] is True
    for out in ("reports/validate/data_docs/index.html", "reports/prepare/class_distribution.csv",
                "models/teacher.pt", "reports/evaluate/report.md", "models/student.pt", "reports/distill/student.onnx"):
        assert (project.path / out).exists(), out
    assert (project.path / "reports/evaluate/figures/membership_roc.png").exists()
    _membership_audit_reached_the_registry(project)
    second = project.repro()  # every stage's data is up to date; register and resolve_init (always_changed) ask the registry
    assert [line for line in second.stdout.splitlines() if line.startswith("Running stage")] == [
        "Running stage 'resolve_init':", "Running stage 'register':"]
    assert "Running stage 'train'" not in second.stdout  # models/init.json kept its bytes
    assert "register: nothing to register" in second.stdout and "didn't change, skipping" in second.stdout


def _membership_audit_reached_the_registry(project) -> None:
    """Each model's audit (evaluate's for the teacher, distill's for the student) is in its DVC metrics, tagged and
    described on its registry version, and among the figures its promotion judged."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{project.path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("visionops").experiment_id
    for name, stage in (("visionops-classifier", "evaluate"), ("visionops-student", "distill")):
        metrics = json.loads((project.path / f"reports/{stage}/metrics.json").read_text())
        details = json.loads((project.path / f"reports/{stage}/details.json").read_text())
        assert metrics["mia_auc"] == details["mia_auc"] == max(details["mia_loss_auc"], details["mia_lira_auc"])
        (run,) = client.search_runs([experiment], f"tags.`visionops.stage` = '{stage}'")
        assert run.data.metrics["mia_lira_tpr_at_1pct_fpr"] == pytest.approx(details["mia_lira_tpr_at_1pct_fpr"])
        assert details["mia_members"] == details["mia_nonmembers"] > 100 and 0 <= metrics["mia_tpr_at_1pct_fpr"] <= 1
        (version,) = client.search_model_versions(f"name = '{name}'")
        assert float(version.tags["visionops.mia_auc"]) == pytest.approx(details["mia_auc"]), name
        assert f"AUC {details['mia_auc']:.4f}" in version.description
        judged = json.loads(version.tags["promotion.metrics"])["challenger"]
        assert judged["mia_auc"] == pytest.approx(details["mia_auc"])


def _changed_code(status: dict) -> dict[str, set[str]]:
    """stage -> the src/ deps `dvc status --json` reports as changed."""
    return {
        stage: {p for entry in entries if isinstance(entry, dict) for p in entry.get("changed deps", {}) if p.startswith("src/")}
        for stage, entries in status.items()
    }


def test_editing_any_module_a_stage_imports_marks_that_stage_changed(ran_project):
    """Every module is edited at once: each stage must report exactly the code its import closure holds."""
    project = ran_project
    stages = list(yaml.safe_load((project.path / "dvc.yaml").read_text())["stages"])
    before = _changed_code(json.loads(project.run("dvc", "status", "--json").stdout))
    assert not any(before.values()), before
    modules = sorted((project.path / "src").rglob("*.py"))
    originals = {p: p.read_text() for p in modules}
    try:
        for path in modules:
            path.write_text(originals[path] + "\n# edited\n")
        after = _changed_code(json.loads(project.run("dvc", "status", "--json").stdout))
    finally:
        for path, text in originals.items():
            path.write_text(text)
    for stage in stages:
        assert after.get(stage, set()) == set(as_deps(stage_code(stage), ROOT)), stage
    assert not any(_changed_code(json.loads(project.run("dvc", "status", "--json").stdout)).values())


_LOADED = """
import json, sys
from visionops.cli import main
code = main([sys.argv[1], "--params", "untracked-params.yaml"])
loaded = sorted(m.__file__ for m in list(sys.modules.values()) if (m.__name__ or "").startswith("visionops") and m.__file__)
print(json.dumps(loaded), file=open(sys.argv[2], "w"))
sys.exit(code)
"""


def test_each_stage_runs_only_code_its_closure_lists(ran_project, tmp_path):
    """The static closure is checked against what really runs (lazy imports, import_module included)."""
    copy = tmp_path / "copy"
    shutil.copytree(ran_project.path, copy)  # the stages rewrite their outputs; keep the shared project as it was
    params = yaml.safe_load((copy / "params.yaml").read_text())
    params["mlflow"]["enabled"] = False
    (copy / "untracked-params.yaml").write_text(yaml.safe_dump(params))
    src = copy / "src"
    env = {**ran_project.env(), "PYTHONPATH": str(src)}
    for stage in yaml.safe_load((copy / "dvc.yaml").read_text())["stages"]:
        out = tmp_path / f"{stage}.json"
        proc = subprocess.run(["python", "-c", _LOADED, stage, str(out)], cwd=copy, env=env, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr[-3000:]
        loaded = {Path(f).resolve().relative_to(src).as_posix() for f in json.loads(out.read_text())}
        listed = {p.relative_to(ROOT / "src").as_posix() for p in stage_code(stage)}
        assert loaded <= listed, f"{stage} ran modules dvc.yaml does not list: {sorted(loaded - listed)}"


def test_forced_rerun_writes_identical_outputs_and_registers_no_new_version(ran_project):
    """Outputs are pure functions of deps and params: `dvc repro -f register` retrains every stage, and
    dvc.lock (every output's hash) stays byte for byte; the register stage finds each model's file already
    registered."""
    import mlflow

    project = ran_project
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{project.path / 'mlflow.db'}")

    def versions():
        return sorted((v.name, v.version) for v in client.search_model_versions(""))

    lock, before = (project.path / "dvc.lock").read_text(), versions()
    assert {name for name, _ in before} == {"visionops-classifier", "visionops-student"}
    out = project.repro("-f", "register").stdout
    assert "Running stage 'train'" in out and "Running stage 'register'" in out
    assert (project.path / "dvc.lock").read_text() == lock
    assert versions() == before


def _commit(project, message: str) -> None:
    project.run("git", "add", "-A")
    project.run("git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", message, check=False)


def _uncached_outs() -> set[str]:
    """The `cache: false` outs, metrics and plots of dvc.yaml: what git keeps."""
    found = set()
    for stage in yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"].values():
        for entry in stage.get("outs", []) + stage.get("metrics", []) + stage.get("plots", []):
            if isinstance(entry, dict):
                ((path, opts),) = entry.items()
                if opts.get("cache") is False:
                    found.add(path)
    return found


def _files(project, paths) -> set[str]:
    """`paths` with each directory (the evaluate stage's figures/) replaced by the files in it."""
    out = set()
    for path in paths:
        d = project.path / path
        out |= {f.relative_to(project.path).as_posix() for f in d.iterdir()} if d.is_dir() else {path}
    return out


def test_dvc_metrics_and_plots_in_a_fresh_clone(ran_project, tmp_path):
    """Metrics and plot data are committed (`cache: false`), so a clone with no DVC cache or remote diffs
    them against any commit; `dvc metrics show` fits a 250-column terminal; `dvc plots show` draws
    exactly the declared plots, each once."""
    project = ran_project
    _commit(project, "run")
    committed = set(project.run("git", "ls-files", "reports").stdout.split())
    assert committed == _files(project, _uncached_outs())
    before = json.loads((project.path / "reports/distill/metrics.json").read_text())
    project.set_params(distill={"temperature": 2.0})
    out = project.repro().stdout
    assert "Running stage 'distill'" in out
    for stage in ("download", "validate", "label_issues", "prepare", "pretrain", "train", "evaluate", "baseline"):
        assert f"Running stage '{stage}'" not in out, stage
    _commit(project, "distill at T=2")

    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(project.path), str(clone)], check=True)

    def run(*cmd):
        return subprocess.run(cmd, cwd=clone, env=project.env(), capture_output=True, text=True, check=True)

    diff = run("dvc", "metrics", "diff", "HEAD~1", "--all", "--json")
    assert "failed to load" not in diff.stderr
    student = json.loads(diff.stdout)["reports/distill/metrics.json"]["student_acc"]
    assert student["old"] == before["student_acc"] and isinstance(student["new"], float)
    shown = run("dvc", "metrics", "show")
    assert "failed to load" not in shown.stderr
    assert max(len(line) for line in shown.stdout.splitlines()) <= 250, shown.stdout  # 243 with label_issues and the membership audit (mia_auc, mia_tpr_at_1pct_fpr)
    plots = json.loads(run("dvc", "plots", "show", "--json").stdout)
    assert "errors" not in plots
    dvc = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    declared = [next(iter(p)) for p in dvc["plots"]]
    declared += [next(iter(p)) for stage in dvc["stages"].values() for p in stage.get("plots", [])]
    assert sorted(plots["data"]) == sorted(_files(project, declared)) and all(len(v) == 1 for v in plots["data"].values())


def test_dvc_exp_run_moves_no_alias_and_reruns_the_baseline_on_the_new_teacher(ran_project):
    """`dvc exp run -S train.epochs=1`: the teacher changes, so the student-alone baseline reruns (it depends on
    models/teacher.pt, which distill.init: teacher starts it from); the new versions carry the experiment's
    name, and challenger/champion stay where they were."""
    import mlflow

    project = ran_project
    _commit(project, "before exp")
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{project.path / 'mlflow.db'}")
    names = ("visionops-classifier", "visionops-student")
    aliases = {name: client.get_registered_model(name).aliases for name in names}
    assert all(aliases.values())  # the main line set challenger (or champion) on both
    versions = {name: {v.version for v in client.search_model_versions(f"name = '{name}'")} for name in names}

    out = project.run("dvc", "exp", "run", "-S", "train.epochs=1").stdout
    assert "Running stage 'train'" in out and "Running stage 'register'" in out
    assert "Running stage 'baseline'" in out
    assert json.loads((project.path / "reports/train/details.json").read_text())["epochs_run"] == 1
    (exp_name,) = re.findall(r"Ran experiment\(s\): (\S+)", out)

    for name in names:
        assert client.get_registered_model(name).aliases == aliases[name], name
        new = [v for v in client.search_model_versions(f"name = '{name}'") if v.version not in versions[name]]
        assert len(new) == 1 and new[0].tags["visionops.experiment"] == exp_name, name
    runs = client.search_runs([client.get_experiment_by_name("visionops").experiment_id], f"tags.`visionops.experiment` = '{exp_name}'")
    by_stage = {r.data.tags.get("visionops.stage"): r for r in runs}
    assert by_stage["train"].info.run_name == f"train · {exp_name} train.epochs=1"  # the name says what it changed
    assert {r.info.run_name for r in runs if r.data.tags["visionops.role"] == "pipeline"} == {f"dvc exp {exp_name} train.epochs=1"}

    terminal = {**project.env(), "COLUMNS": "120"}  # `make exps` in a 120-column terminal: what differs, readable
    shown = subprocess.run(["make", "-f", str(ROOT / "Makefile"), "exps"], cwd=project.path, env=terminal,
                           capture_output=True, text=True, check=True).stdout
    assert exp_name in shown and "train.epochs" in shown and "best_val_acc" in shown and "…" not in shown, shown
    assert "src/" not in shown and max(len(line) for line in shown.splitlines()) <= 120, shown


def test_changing_balance_reruns_from_prepare(project):
    project.repro("prepare")
    project.set_params(balance={"strategy": "undersample", "simulate_imbalance_factor": 5.0})
    out = project.repro("prepare").stdout
    assert "Running stage 'prepare'" in out
    assert "Running stage 'download'" not in out and "Running stage 'validate'" not in out


def test_bad_params_stop_before_any_stage_works(project):
    project.set_params(data={"image_size": -3})
    out = project.repro(check=False)
    assert out.returncode != 0
    assert "data.image_size" in out.stderr + out.stdout
    assert not (project.path / "data" / "dataset").exists()
    check = project.run("visionops", "check", check=False)
    assert check.returncode == 1 and "data.image_size" in check.stderr


def _folder_project(project, tree):
    root = project.path.parent / "images"
    shutil.copytree(tree, root)
    project.set_params(
        data={"source": "folder", "root": str(root), "channels": 3},
        validate={"max_imbalance_ratio": 2.0},
        augment={"hflip": True},
    )
    return project, root


@pytest.fixture
def cifar_project(project, cifar_subset):
    return _folder_project(project, cifar_subset)


@pytest.fixture
def folder_project(project, image_folder):
    """The same faults on JPEG/PNG files made by the tests: these run on a lone clone too."""
    return _folder_project(project, image_folder)


@pytest.mark.shared_data
def test_cifar_folder_runs_the_data_stages(cifar_project):
    project, _ = cifar_project
    project.repro("prepare")
    summary = json.loads((project.path / "reports/validate/summary.json").read_text())
    assert summary["success"] is True and summary["n_classes"] == 10
    holdout = json.loads((project.path / "data/holdout/meta.json").read_text())["splits"]["holdout"]
    assert sum(summary["n_images"].values()) + holdout == 300 and holdout > 0


def _fails_naming(project, *names):
    out = project.repro("prepare", check=False)
    assert out.returncode != 0, out.stdout
    text = out.stdout + out.stderr
    for name in names:
        assert name in text, text[-3000:]
    assert "Running stage 'prepare'" not in out.stdout


def test_truncated_jpeg_fails_validation(folder_project):
    project, root = folder_project
    victim = sorted((root / "train" / "bird").glob("*.jpg"))[3]
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    _fails_naming(project, victim.relative_to(root).as_posix())  # named relative to data.root


def test_image_in_train_and_test_fails_validation(folder_project):
    project, root = folder_project
    (root / "test" / "frog").mkdir(parents=True)
    for cls in ("frog",):
        for f in sorted((root / "train" / cls).iterdir())[:5]:
            shutil.move(f, root / "test" / cls / f.name)
    leaked = sorted((root / "train" / "frog").iterdir())[0]
    shutil.copy(leaked, root / "test" / "frog" / "copy.jpg")
    _fails_naming(project, leaked.relative_to(root).as_posix(), "test/frog/copy.jpg")


def test_empty_class_folder_fails_validation(folder_project):
    project, root = folder_project
    for f in (root / "train" / "ship").iterdir():
        f.unlink()
    _fails_naming(project, "ship")
