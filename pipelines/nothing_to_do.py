"""Whether a `training` flow run would do anything, decided without importing Prefect.

With no Prefect server configured (PREFECT_API_URL unset), a flow run goes to a temporary server that
is started for it and thrown away afterwards: 15-20 s of start-up and shutdown to record a run that no
UI ever shows. So when `dvc status` reports every stage up to date, the registry holds every model file
already (the `register` stage is `always_changed`: `dvc status` lists it every time, because only the
registry can say whether it has work), and, with promotion on, every challenger (teacher and student)
was already judged against the champion it would face now, under the same gates (params.yaml `promote`,
recorded in the version's `promotion.metrics` tag), there is nothing to do. The `resolve_init` stage is
`always_changed` too: it has work only when `train.init` resolves to something else than models/init.json
holds (a registered alias moved).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from pipelines import dvc_stages

ALWAYS = "always changed"  # what `dvc status` says of an always_changed stage whose deps and outs are unchanged
REGISTER = "register"
RESOLVE_INIT = "resolve_init"  # always_changed too: it would rewrite models/init.json only if train.init moved


def _same_start(root: Path) -> bool:
    """Whether train.init resolves now to what models/init.json holds (e.g. @champion has not moved)."""
    from visionops.config import load_params
    from visionops.training.resolve_init import INIT_FILE, resolve

    params = load_params(root / "params.yaml")
    path = root / INIT_FILE
    try:
        record = resolve(params.train.init, params.mlflow, params.data.root, root)
    except (OSError, ValueError):
        return False  # the stage itself says what is wrong
    return path.is_file() and json.loads(path.read_text()) == record


def _registered(root: Path) -> list[str] | None:
    """One line per model file the registry holds already, or None when the register stage has work."""
    from visionops import layout
    from visionops.config import load_params
    from visionops.serving.registered import reader, registered_already

    params = load_params(root / "params.yaml")
    if not params.mlflow.enabled:
        return ["mlflow.enabled is false: nothing to register"]
    files = {params.mlflow.teacher_model_name: root / layout.TEACHER, params.mlflow.student_model_name: root / layout.STUDENT}
    found = registered_already(reader(params.mlflow, root), files, None)
    if found is None:
        return None
    return [f"{r['name']}: {files[r['name']].relative_to(root)} is registered already as v{r['version']}" for r in found]


def _judged(project_dir: Path) -> list[str] | None:
    """One line per model whose challenger was already judged against today's champion, or None when
    some challenger is still to be judged."""
    from visionops.config import load_params
    from visionops.serving.registered import reader

    params = load_params(project_dir / "params.yaml")
    if not params.mlflow.enabled:
        return []
    read = reader(params.mlflow, project_dir)
    if read is None:
        return ["no MLflow store yet: nothing registered"]
    return _lines(params, read.alias, read.tags)


def _same_gates(t: dict, params) -> bool:
    try:
        return json.loads(t.get("promotion.metrics", "{}")).get("gates") == json.loads(params.promote.model_dump_json())
    except (ValueError, AttributeError):
        return False


def _lines(params, alias, tags) -> list[str] | None:
    lines = []
    for name in (params.mlflow.teacher_model_name, params.mlflow.student_model_name):
        challenger, champion = alias(name, "challenger"), alias(name, "champion")
        if challenger is None:
            lines.append(f"{name}: no challenger" + (f" (champion v{champion})" if champion else ""))
            continue
        t = tags(name, challenger)
        if ("promotion.decision" not in t or t.get("promotion.previous_champion", "") != (champion or "")
                or not _same_gates(t, params)):
            return None
        lines.append(f"{name}: challenger v{challenger} already {t['promotion.decision']} ({t.get('promotion.timestamp', '?')}) "
                     "against " + (f"champion v{champion}" if champion else "no champion"))
    return lines


def nothing_to_do(project_dir: str | Path, promote: bool, env: dict | None = None) -> str | None:
    """A message saying why no flow run is needed, or None when the flow should run."""
    env = os.environ if env is None else env
    if env.get("PREFECT_API_URL"):
        return None  # a server is configured: run, so the run is visible in its UI
    root = Path(project_dir).resolve()
    status = dvc_stages.stage_status(root)
    if status is None or any(entries != [ALWAYS] or name not in (REGISTER, RESOLVE_INIT) for name, entries in status.items()):
        return None  # a stage has work for the data (or an always-changed stage of ours would run)
    if RESOLVE_INIT in status and not _same_start(root):
        return None  # train.init moved (e.g. @champion): train has work
    status.pop(RESOLVE_INIT, None)
    lines = ["nothing to do: `dvc status` says every stage is up to date"]
    if status:  # register: DVC reruns it every time; the registry says whether it has work
        registered = _registered(root)
        if registered is None:
            return None
        lines[0] += " (register, which DVC always reruns, would find every model file registered)"
        lines += [f"  {line}" for line in registered]
    if promote:
        judged = _judged(root)
        if judged is None:
            return None
        lines += [f"  {line}" for line in judged]
    lines.append("no flow run started (no Prefect server is configured: `make prefect-ui` records every run; "
                 "--always-run runs it anyway; `python -m pipelines promotion` judges the challengers again)")
    return "\n".join(lines)
