"""Metric-gated champion/challenger promotion, rollback and batch prediction over the MLflow registry.

Every decision is written onto the model versions themselves (tags and description), so the
registry UI shows why each version was or was not promoted, and when.
"""

from __future__ import annotations

import csv
import json
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import mlflow
import numpy as np
import torch
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.models import Model
from mlflow.tracking import MlflowClient
from tqdm import tqdm

from visionops import classifier, dataset
from visionops.atomic import atomic_path
from visionops.calibration import expected_calibration_error, probabilities
from visionops.config import EvaluateConfig, PromoteConfig
from visionops.fetch import file_md5
from visionops.images import IMAGE_SUFFIXES
from visionops.latency import measure_latency
from visionops.metrics import classification_metrics
from visionops.registry.pyfunc import (
    CHALLENGER,
    CHAMPION,
    MODEL_ARTIFACT,
    MODEL_MD5_TAG,
    PREVIOUS,
    ImageClassifierModel,
    RegistryError,
)

EVAL_BATCH = 1024
MAX_TAG_CHARS = 4900  # stay under the registry's tag value limit (5000 on some stores)


class NoChallengerError(RegistryError):
    """`promote` found no version carrying the `challenger` alias."""


class RollbackError(RegistryError):
    """`rollback` has no champion or no `previous` version to go back to."""


@dataclass
class Decision:
    """Outcome of one promotion attempt.

    `reasons` explains the decision: the failed gates when rejected, the passed gates when promoted.
    `checks` lists every gate with PASS/FAIL/SKIP.
    """

    promoted: bool
    challenger_version: str
    champion_version: str | None  # the champion before this decision (None: there was none)
    reasons: list[str]
    challenger_metrics: dict
    champion_metrics: dict | None
    checks: list[str] = field(default_factory=list)
    timestamp: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _alias(client: MlflowClient, name: str, alias: str) -> ModelVersion | None:
    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException as exc:
        if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"):
            return None
        raise


def has_champion(registered_name: str, client: MlflowClient | None = None) -> bool:
    """Whether `registered_name` has a version with the alias champion (False if the model is new)."""
    return _alias(client or MlflowClient(), registered_name, CHAMPION) is not None


def find_version_by_file(registered_name: str, model_path: Path, client: MlflowClient | None = None):
    """The newest registered version logged from a file with the same content as `model_path`, or None."""
    client = client or MlflowClient()
    md5 = file_md5(model_path)
    try:
        found = client.search_model_versions(f"name = '{registered_name}' and tags.`{MODEL_MD5_TAG}` = '{md5}'")
    except MlflowException:
        return None
    return max(found, key=lambda v: int(v.version), default=None)


def _append_description(client: MlflowClient, name: str, version: str, line: str) -> None:
    old = client.get_model_version(name, version).description or ""
    client.update_model_version(name, version, description=(old.rstrip() + "\n" if old.strip() else "") + line)


def _tag(client: MlflowClient, name: str, version: str, key: str, value) -> None:
    text = value if isinstance(value, str) else json.dumps(value)
    if len(text) > MAX_TAG_CHARS:
        text = text[: MAX_TAG_CHARS - 3] + "..."
    client.set_model_version_tag(name, version, key, text)


# ------------------------------------------------------------------------------------------
# evaluation


def load_version_classifier(model_uri: str) -> tuple[torch.nn.Module, dict]:
    """The visionops classifier inside a logged pyfunc model (any models:/, runs:/ or local URI)."""
    with tempfile.TemporaryDirectory(prefix="visionops-model-") as tmp:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=tmp))
        try:
            conf = Model.load(str(local)).flavors["python_function"]
            rel = conf["artifacts"][MODEL_ARTIFACT]["path"]
        except (KeyError, TypeError, OSError, MlflowException) as exc:
            raise RegistryError(f"{model_uri}: not a visionops pyfunc model ({exc})") from None
        return classifier.load(local / rel, device="cpu")


def evaluate_version(model_uri: str, dataset_dir: Path | str, cfg: EvaluateConfig) -> dict:
    """Accuracy, per-class recall, ECE and CPU latency (ms per batch of cfg.latency_batch_size)
    of a registered model on the test split of `dataset_dir`."""
    ds = dataset.load(dataset_dir)
    test = ds.splits.get("test")
    if test is None or len(test) == 0:
        raise RegistryError(f"{dataset_dir}: the dataset has no test images to evaluate on")
    model, info = load_version_classifier(model_uri)
    if list(info["class_names"]) != list(ds.class_names):
        raise RegistryError(
            f"{model_uri} predicts classes {info['class_names']} but {dataset_dir} has {ds.class_names}"
        )
    image_shape = tuple(int(s) for s in info["image_shape"])
    if image_shape != tuple(ds.image_shape):
        raise RegistryError(f"{model_uri} takes images of shape {image_shape} but {dataset_dir} has {ds.image_shape}")
    cpu = torch.device("cpu")
    logits = classifier.predict_logits(model, test.images, cpu, batch_size=EVAL_BATCH)
    labels = np.asarray(test.labels)
    m = classification_metrics(labels, logits, ds.class_names, top_k=cfg.top_k)
    ece = expected_calibration_error(probabilities(logits), labels, cfg.calibration_bins)
    latency = measure_latency(model, image_shape, cpu, batch_size=cfg.latency_batch_size)
    return {
        "model_uri": model_uri,
        "n": m["n"],
        "accuracy": m["accuracy"],
        "balanced_accuracy": m["balanced_accuracy"],
        "macro_f1": m["macro_f1"],
        # a class absent from the test split has no recall to gate on
        "per_class_recall": {c: v["recall"] for c, v in m["per_class"].items() if v["support"]},
        "ece": ece,
        "latency_ms": latency["batch_ms"],
        "latency_batch_size": cfg.latency_batch_size,
    }


def _metrics_record(ch: dict, champ: dict | None, gates: PromoteConfig) -> dict:
    """The metrics tag: full per-class recall unless that would overflow a tag value, then the 10 lowest."""

    def strip(m: dict | None, per_class: bool) -> dict | None:
        if m is None:
            return None
        out = {k: val for k, val in m.items() if k != "model_uri"}
        if not per_class:
            lowest = sorted(m["per_class_recall"].items(), key=lambda kv: kv[1])[:10]
            out["per_class_recall"] = dict(lowest)
            out["per_class_recall_truncated"] = True
        return out

    record = {"challenger": strip(ch, True), "champion": strip(champ, True), "gates": gates.model_dump()}
    if len(json.dumps(record)) > MAX_TAG_CHARS:
        record = {"challenger": strip(ch, False), "champion": strip(champ, False), "gates": gates.model_dump()}
    return record


def _gates(ch: dict, champ: dict | None, gates: PromoteConfig) -> tuple[list[str], list[str]]:
    """(failures, checks) of the challenger's metrics against the gates."""
    failures, checks = [], []

    def check(ok: bool, text: str) -> None:
        checks.append(("PASS " if ok else "FAIL ") + text)
        if not ok:
            failures.append(text)

    check(ch["accuracy"] >= gates.min_accuracy, f"accuracy {ch['accuracy']:.4f} vs min_accuracy {gates.min_accuracy:.4f}")
    if champ is None:
        checks.append("SKIP min_gain: there is no champion yet")
    else:
        gain = ch["accuracy"] - champ["accuracy"]
        check(
            gain >= gates.min_gain - 1e-12,
            f"accuracy gain {gain:+.4f} over champion ({champ['accuracy']:.4f}) vs min_gain {gates.min_gain:+.4f}",
        )
    low = {c: r for c, r in ch["per_class_recall"].items() if r < gates.min_class_recall}
    if low:
        listed = ", ".join(f"{c} ({r:.3f})" for c, r in sorted(low.items(), key=lambda kv: kv[1]))
        check(False, f"class recall below min_class_recall {gates.min_class_recall:.3f}: {listed}")
    else:
        worst = min(ch["per_class_recall"].values(), default=float("nan"))
        check(True, f"every class recall >= min_class_recall {gates.min_class_recall:.3f} (lowest {worst:.3f})")
    check(ch["ece"] <= gates.max_ece, f"ECE {ch['ece']:.4f} vs max_ece {gates.max_ece:.4f}")
    check(
        ch["latency_ms"] <= gates.max_latency_ms,
        f"latency {ch['latency_ms']:.2f} ms per batch of {ch['latency_batch_size']} vs max_latency_ms {gates.max_latency_ms:.2f}",
    )
    return failures, checks


def promote(
    registered_name: str,
    dataset_dir: Path | str,
    gates: PromoteConfig,
    eval_cfg: EvaluateConfig,
    client: MlflowClient | None = None,
    version: str | None = None,
) -> Decision:
    """Evaluate the `challenger` (and the current `champion`) on the same test split and, if every
    gate passes, make the challenger champion (old champion → `previous`, `challenger` removed).
    The decision is tagged on the challenger version either way. `version` judges that version
    instead of whichever holds `challenger` (the first promotion, right after registering it)."""
    client = client or MlflowClient()
    challenger = client.get_model_version(registered_name, version) if version else _alias(client, registered_name, CHALLENGER)
    if challenger is None:
        raise NoChallengerError(
            f"model {registered_name!r} has no version with alias {CHALLENGER!r}: log and register a model first"
        )
    champion = _alias(client, registered_name, CHAMPION)
    if champion is not None and str(champion.version) == str(challenger.version):
        champion = None  # re-checking the champion itself: nothing to compare against
    ch_metrics = evaluate_version(f"models:/{registered_name}/{challenger.version}", dataset_dir, eval_cfg)
    champ_metrics = (
        evaluate_version(f"models:/{registered_name}/{champion.version}", dataset_dir, eval_cfg) if champion else None
    )
    failures, checks = _gates(ch_metrics, champ_metrics, gates)
    promoted = not failures
    stamp = _now()
    decision = Decision(
        promoted=promoted,
        challenger_version=str(challenger.version),
        champion_version=str(champion.version) if champion else None,
        reasons=failures if failures else [c.removeprefix("PASS ") for c in checks if c.startswith("PASS ")],
        challenger_metrics=ch_metrics,
        champion_metrics=champ_metrics,
        checks=checks,
        timestamp=stamp,
    )
    v = decision.challenger_version
    old = decision.champion_version
    if promoted:
        if old is not None:
            client.set_registered_model_alias(registered_name, PREVIOUS, old)
        client.set_registered_model_alias(registered_name, CHAMPION, v)
        held = _alias(client, registered_name, CHALLENGER)
        if held is not None and str(held.version) == v:  # another pipeline's challenger keeps its alias
            client.delete_registered_model_alias(registered_name, CHALLENGER)
        if old is not None:
            _tag(client, registered_name, old, "promotion.replaced_by", v)
            _tag(client, registered_name, old, "promotion.replaced_at", stamp)
    _tag(client, registered_name, v, "promotion.decision", "promoted" if promoted else "rejected")
    _tag(client, registered_name, v, "promotion.reasons", decision.reasons)
    _tag(client, registered_name, v, "promotion.timestamp", stamp)
    _tag(client, registered_name, v, "promotion.previous_champion", old or "")
    _tag(
        client,
        registered_name,
        v,
        "promotion.metrics",
        _metrics_record(ch_metrics, champ_metrics, gates),
    )
    verdict = "PROMOTED to champion" if promoted else "REJECTED"
    against = f"champion v{old}" if old else "no champion"
    _append_description(client, registered_name, v, f"[{stamp}] promotion {verdict} (vs {against}): " + "; ".join(decision.reasons))
    return decision


def rollback(registered_name: str, client: MlflowClient | None = None) -> dict:
    """Point `champion` back at the `previous` version. The new `previous` is the version that the
    restored one replaced when it was promoted (if it still exists), so rollbacks can be repeated."""
    client = client or MlflowClient()
    champion = _alias(client, registered_name, CHAMPION)
    if champion is None:
        raise RollbackError(f"model {registered_name!r} has no {CHAMPION!r} version to roll back")
    previous = _alias(client, registered_name, PREVIOUS)
    if previous is None:
        raise RollbackError(
            f"model {registered_name!r} has no {PREVIOUS!r} version: champion v{champion.version} was never replaced"
        )
    stamp = _now()
    demoted, restored = str(champion.version), str(previous.version)
    client.set_registered_model_alias(registered_name, CHAMPION, restored)
    earlier = (previous.tags or {}).get("promotion.previous_champion") or None
    if earlier is not None and earlier not in (restored, demoted):
        try:
            client.get_model_version(registered_name, earlier)
        except MlflowException:
            earlier = None
    else:
        earlier = None
    if earlier is not None:
        client.set_registered_model_alias(registered_name, PREVIOUS, earlier)
    else:
        client.delete_registered_model_alias(registered_name, PREVIOUS)
    _tag(client, registered_name, demoted, "rollback.decision", "rolled_back")
    _tag(client, registered_name, demoted, "rollback.replaced_by", restored)
    _tag(client, registered_name, demoted, "rollback.timestamp", stamp)
    _tag(client, registered_name, restored, "rollback.decision", "restored")
    _tag(client, registered_name, restored, "rollback.restored_from", demoted)
    _tag(client, registered_name, restored, "rollback.timestamp", stamp)
    _append_description(client, registered_name, demoted, f"[{stamp}] rollback: champion moved back to v{restored}")
    _append_description(client, registered_name, restored, f"[{stamp}] rollback: restored as champion (replacing v{demoted})")
    return {
        "registered_name": registered_name,
        "champion_version": restored,
        "rolled_back_version": demoted,
        "previous_version": earlier,
        "timestamp": stamp,
    }


# ------------------------------------------------------------------------------------------
# batch prediction


def expand_paths(paths: list[Path]) -> list[Path]:
    """Files named explicitly (whatever their suffix) and PNG/JPEG files found recursively in folders."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            out.extend(sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES))
        elif p.is_file():
            out.append(p)
        else:
            raise FileNotFoundError(f"{p}: no such file or directory")
    return out


class PredictionFailed(RegistryError):
    """`predict_paths` wrote its CSV, but some files could not be classified."""

    def __init__(self, failed: int, total: int, out_csv: Path):
        super().__init__(f"{failed} of {total} files could not be classified; see the error column of {out_csv}")
        self.failed, self.total, self.out_csv = failed, total, out_csv


def predict_paths(model_uri: str, paths: list[Path], out_csv: Path, batch_size: int = 256) -> int:
    """Classify image files (folders searched recursively for PNG/JPEG) with the pyfunc model at
    `model_uri` and write `out_csv` (path,label,probability,error) atomically.

    Each file goes through the served model's own per-row path (`predict_values`: size limit,
    decoding, preprocessing, prediction), so labels, probabilities and errors equal what `mlflow
    models serve` returns. A file that cannot be read or decoded gets an empty label and its error
    (also on stderr); after writing every row, PredictionFailed is raised if any file failed.
    Returns the number of rows (files) written.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    files = expand_paths(paths)
    if not files:
        raise RegistryError(f"no PNG/JPEG files found in {', '.join(map(str, paths))}")
    pyfunc_model = mlflow.pyfunc.load_model(model_uri)
    model = pyfunc_model.unwrap_python_model()
    if not isinstance(model, ImageClassifierModel):
        raise RegistryError(f"{model_uri}: not a visionops image classifier ({type(model).__name__})")
    rows: list[list] = []
    failed = 0
    with tqdm(total=len(files), unit="img", desc="predict", file=sys.stderr) as bar:
        for start in range(0, len(files), batch_size):
            chunk = files[start : start + batch_size]
            values, read_errors = [], {}
            for i, f in enumerate(chunk):
                try:
                    values.append(f.read_bytes())
                except OSError as exc:
                    values.append(None)
                    read_errors[i] = f"cannot read file: {exc.strerror or type(exc).__name__}"
            preds = model.predict_values(values)
            for i, (f, pred) in enumerate(zip(chunk, preds[["label", "probability", "error"]].itertuples(index=False))):
                error = read_errors.get(i) or pred.error
                if error:
                    failed += 1
                    tqdm.write(f"warning: {f}: {error}", file=sys.stderr)
                    rows.append([str(f), "", "", error])
                else:
                    rows.append([str(f), pred.label, f"{pred.probability:.6f}", ""])
            bar.update(len(chunk))
    with atomic_path(out_csv) as tmp, tmp.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "label", "probability", "error"])
        writer.writerows(rows)
    if failed:
        raise PredictionFailed(failed, len(files), out_csv)
    return len(rows)
