"""Champion/challenger promotion on the frozen holdout, rollback and batch prediction over the MLflow registry.

A challenger must beat the champion on the same holdout images by a gain that is significant under the
task's paired test (classification: exact McNemar on the images each gets right; detection and
segmentation: Wilcoxon signed-rank on per-image scores, since "fully right" almost never happens on
images with many objects), and machine-dependent figures (latency) are judged only against the
champion, timed in the same run.

Every decision is written onto the model versions themselves (tags and description), so the
registry UI shows why each version was or was not promoted, and when.
"""

from __future__ import annotations

import csv
import json
import sys
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import mlflow
import numpy as np
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from tqdm import tqdm

from visionops.atomic import atomic_path
from visionops.config import EvaluateConfig, PromoteConfig
from visionops.data import dataset
from visionops.data.fetch import file_md5
from visionops.data.images import IMAGE_SUFFIXES
from visionops.errors import InvalidInputError, MissingInputError
from visionops.evaluation.latency import call_latency_ms, paired_latency
from visionops.serving import privacy_record
from visionops.serving.pyfunc import (
    CHALLENGER,
    CHAMPION,
    MODEL_MD5_TAG,
    PREVIOUS,
    RegistryError,
)
from visionops.tasks import get_task

HOLDOUT_SPLIT = "holdout"  # the one split of the frozen holdout dataset (layout.HOLDOUT)
AUDIT_TAG_PREFIX = "visionops."  # + each mia_* figure of the stage that measured the model (evaluate, distill)
MAX_TAG_CHARS = 4900  # stay under the registry's tag value limit (5000 on some stores)


class NoChallengerError(RegistryError):
    """`promote` found no version carrying the `challenger` alias (or the alias it was given)."""


class RollbackError(RegistryError):
    """`rollback` has no champion or no `previous` version to go back to."""


class AlreadyChampionError(RegistryError):
    """`promote` was asked to judge the version that is champion already."""


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
    holdout_n: int = 0  # images in the frozen holdout both models were scored on
    comparison: dict | None = None  # the paired test: test, measure, n, challenger_better, champion_better, gain,
    # champion_mean, p_value (None: no champion)
    latency: dict | None = None  # challenger_ms, champion_ms, ratio, rounds (None: no champion)
    trivial: dict | None = None  # predictor, score: what a predictor that learnt nothing scores on the same holdout

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


def record_audit(name: str, version: str, audit: dict, client: MlflowClient | None = None) -> None:
    """A version's membership-inference audit (the `mia_*` figures of the stage that measured its file) as
    tags `visionops.mia_*` and a line of its description, where `promote.max_membership_auc` reads it."""
    if audit.get("mia_auc") is None:
        return
    figures = {k: v for k, v in audit.items() if k.startswith("mia_")}
    client = client or MlflowClient()
    for key, value in figures.items():
        _tag(client, name, version, AUDIT_TAG_PREFIX + key, str(value))
    _append_description(
        client, name, version,
        f"membership-inference audit ({figures['mia_members']} train images against {figures['mia_nonmembers']} holdout "
        f"images): AUC {figures['mia_auc']:.4f} (loss threshold {figures['mia_loss_auc']:.4f}, calibrated "
        f"{figures['mia_lira_auc']:.4f}), TPR at 1% FPR {figures['mia_tpr_at_1pct_fpr']:.4f}",
    )  # fmt: skip


def record_init(name: str, version: str, init: dict | None, client: MlflowClient | None = None) -> None:
    """A version's starting point (train's `init` record) as tags `visionops.init*` and a line of its description."""
    if not init or init.get("init", "scratch") == "scratch":
        return
    client = client or MlflowClient()
    _tag(client, name, version, "visionops.init", init["init"])
    if "version" in init:
        what = f"version {init['version']} of {init['name']} (run {init.get('run_id')}, file MD5 {init.get('md5')})"
    elif "weights" in init:
        what = f"torchvision {init['weights']} ({init['file']}, SHA-256 {init['sha256']})"
    else:
        what = f"{init.get('file', init['init'])} (MD5 {init.get('md5')})"
    _tag(client, name, version, "visionops.init.source", what)
    _append_description(
        client, name, version,
        f"started from {init['init']}: {what}; {init.get('loaded_from', '')}: {len(init.get('loaded', []))} layers loaded, "
        f"{len(init.get('new', []))} new, {len(init.get('skipped', {}))} skipped for their shapes",
    )  # fmt: skip


def recorded_audit(version: ModelVersion) -> dict:
    """The `mia_*` figures `record_audit` put on `version` (none for a version registered without them)."""
    tags = version.tags or {}
    return {k.removeprefix(AUDIT_TAG_PREFIX): float(v) for k, v in tags.items()
            if k.startswith(AUDIT_TAG_PREFIX + "mia_")}


# ------------------------------------------------------------------------------------------
# evaluation on the frozen holdout


def load_holdout(holdout_dir: Path | str) -> tuple[dataset.Dataset, dataset.Split]:
    """The frozen holdout dataset and its one split, `holdout` (never trained on or used for selection)."""
    holdout_dir = Path(holdout_dir)
    if not (holdout_dir / "meta.json").exists():
        raise RegistryError(f"{holdout_dir}: no frozen holdout dataset here (no meta.json); run `dvc repro download`")
    ds = dataset.load(holdout_dir)
    split = ds.splits.get(HOLDOUT_SPLIT)
    if split is None or len(split) == 0:
        raise RegistryError(
            f"{holdout_dir}: no {HOLDOUT_SPLIT!r} images to evaluate on (splits: {', '.join(ds.splits) or 'none'})"
        )
    return ds, split


def load_served(model_uri: str, ds: dataset.Dataset, data_dir: Path | str):
    """The predictor that serving runs (the pyfunc's Python model), checked against the dataset's task, classes
    and shape."""
    model = mlflow.pyfunc.load_model(model_uri).unwrap_python_model()
    if not hasattr(model, "predict_canonical"):
        raise RegistryError(f"{model_uri}: not a visionops model ({type(model).__name__})")
    task = getattr(model, "task", "classification")
    if task != ds.task:
        raise RegistryError(f"{model_uri} is a {task} model but {data_dir} holds {ds.task} data")
    if list(model.class_names) != list(ds.class_names):
        raise RegistryError(f"{model_uri} predicts classes {model.class_names} but {data_dir} has {ds.class_names}")
    if tuple(model.image_shape) != tuple(ds.image_shape):
        raise RegistryError(f"{model_uri} takes images of shape {model.image_shape} but {data_dir} has {ds.image_shape}")
    return model


def _score(model, split: dataset.Split, ds: dataset.Dataset, cfg: EvaluateConfig) -> tuple[dict, np.ndarray]:
    """(metrics, per-image scores) of the served predictions, as the holdout's task scores them."""
    metrics, per_image = get_task(ds.task).score_served(model, split, ds, cfg)
    task = get_task(ds.task)
    return {**metrics, "headline": task.headline, "per_class_metric": task.per_class, "paired": task.paired,
            "paired_test": task.paired_test}, per_image


def _batch_call(model, batch_size: int):
    """One served prediction of a random uint8 batch, as a zero-argument call to time."""
    x = np.random.default_rng(0).integers(0, 256, (batch_size, *model.image_shape), dtype=np.uint8)
    return lambda: model.predict_canonical(x)


def evaluate_version(model_uri: str, holdout_dir: Path | str, cfg: EvaluateConfig) -> dict:
    """The task's scores (its headline metric, per-class metric, ...) of a registered model's served
    predictions on the frozen holdout in `holdout_dir`, and its latency (ms per batch of
    cfg.latency_batch_size, on this machine)."""
    ds, split = load_holdout(holdout_dir)
    model = load_served(model_uri, ds, holdout_dir)
    metrics, _ = _score(model, split, ds, cfg)
    latency = call_latency_ms(_batch_call(model, cfg.latency_batch_size))
    return {"model_uri": model_uri, **metrics, "latency_ms": latency}


def mcnemar(challenger_correct: np.ndarray, champion_correct: np.ndarray) -> dict:
    """One-sided exact McNemar test that the challenger is the more accurate on the same images.

    Only discordant images (one model right, the other wrong) carry information; if both models were
    equally accurate each would favour either with probability 1/2, so the p-value is a binomial tail.
    """
    from scipy.stats import binomtest

    ch, champ = np.asarray(challenger_correct, bool), np.asarray(champion_correct, bool)
    b, c = int(np.sum(ch & ~champ)), int(np.sum(~ch & champ))
    p = binomtest(b, b + c, 0.5, alternative="greater").pvalue if b + c else 1.0
    return {"test": "McNemar exact", "n": int(ch.size), "challenger_better": b, "champion_better": c,
            "gain": (b - c) / max(ch.size, 1), "champion_mean": float(np.mean(champ)) if champ.size else 0.0,
            "p_value": float(p)}


def wilcoxon(challenger_scores: np.ndarray, champion_scores: np.ndarray) -> dict:
    """One-sided Wilcoxon signed-rank test that the challenger scores higher on the same images.

    For per-image scores in [0, 1] (a detector's F1, a segmenter's mIoU): the differences are ranked by
    size and the ranks of the positive ones summed; images both score equally carry no information
    and are dropped (zero_method "wilcox"). Exact for up to 50 differing images, normal beyond.
    """
    from scipy.stats import wilcoxon as signed_rank

    ch, champ = np.asarray(challenger_scores, float), np.asarray(champion_scores, float)
    diff = np.nan_to_num(ch - champ)  # an image neither model can be scored on (NaN) counts as a tie
    b, c = int(np.sum(diff > 0)), int(np.sum(diff < 0))
    p = signed_rank(diff, zero_method="wilcox", alternative="greater").pvalue if b + c else 1.0
    return {"test": "Wilcoxon signed-rank", "n": int(ch.size), "challenger_better": b, "champion_better": c,
            "gain": float(np.mean(diff)) if diff.size else 0.0,
            "champion_mean": float(np.nanmean(champ)) if np.isfinite(champ).any() else 0.0, "p_value": float(p)}


PAIRED_TESTS = {"mcnemar": mcnemar, "wilcoxon": wilcoxon}


def _metrics_record(ch: dict, champ: dict | None, gates: PromoteConfig) -> dict:
    """The metrics tag: full per-class recall unless that would overflow a tag value, then the 10 lowest."""

    def strip(m: dict | None, per_class: bool) -> dict | None:
        if m is None:
            return None
        out = {k: val for k, val in m.items() if k != "model_uri"}
        if not per_class:
            key = m["per_class_metric"]
            out[key] = dict(sorted(m[key].items(), key=lambda kv: kv[1])[:10])
            out[f"{key}_truncated"] = True
        return out

    record = {"challenger": strip(ch, True), "champion": strip(champ, True), "gates": gates.model_dump()}
    if len(json.dumps(record)) > MAX_TAG_CHARS:
        record = {"challenger": strip(ch, False), "champion": strip(champ, False), "gates": gates.model_dump()}
    return record


def auto_floor(trivial: float, margin: float) -> float:
    """An `auto` gate's floor: the trivial predictor's score plus `margin` of the gap from it to 1."""
    return trivial + margin * (1 - trivial)


def _gates(
    ch: dict, champ: dict | None, gates: PromoteConfig, paired: dict | None = None, latency: dict | None = None,
    trivial: dict | None = None,
) -> tuple[list[str], list[str]]:
    """(failures, checks) of the challenger against the gates; `paired` (the task's paired test) and
    `latency` (challenger vs champion in turns) exist when there is a champion; `trivial` (the task's
    `trivial_scores` on the same holdout) sets the `auto` floors. Each failure names the params.yaml key
    that changes it."""
    failures, checks = [], []
    margin = f"auto_margin {gates.auto_margin:g} of the gap to 1"

    def check(ok: bool, text: str, gate: str) -> None:
        keys = f"promote.{gate}, or promote.auto_margin," if getattr(gates, gate) == "auto" else f"promote.{gate}"
        checks.append("PASS " + text if ok else f"FAIL {text} (set {keys} in params.yaml)")
        if not ok:
            failures.append(checks[-1].removeprefix("FAIL "))

    key, per_class, paired_name = ch["headline"], ch["per_class_metric"], ch["paired"]
    if gates.min_score == "auto":
        floor = auto_floor(trivial["score"], gates.auto_margin)
        shown = f"auto {floor:.4f} ({trivial['predictor']} scores {trivial['score']:.4f} on this holdout, + {margin})"
    else:
        floor, shown = gates.min_score, f"{gates.min_score:.4f}"
    check(ch[key] >= floor, f"{key} {ch[key]:.4f} vs min_score {shown}", "min_score")
    if champ is None or paired is None:
        checks.append("SKIP min_gain: there is no champion yet")
        checks.append("SKIP significance: there is no champion to compare with")
    else:
        n = paired["n"]
        check(
            paired["gain"] >= gates.min_gain - 1e-12,
            f"{paired_name} gain {paired['gain']:+.4f} over champion ({paired['champion_mean']:.4f}) vs min_gain "
            f"{gates.min_gain:+.4f} on the same {n} holdout images", "min_gain",
        )
        b, c = paired["challenger_better"], paired["champion_better"]
        counts = (f"{b} right only by the challenger, {c} only by the champion" if paired["test"] == "McNemar exact"
                  else f"{b} scored higher by the challenger, {c} by the champion, {n - b - c} tied")
        check(
            paired["p_value"] <= gates.significance,
            f"{paired['test']} p={paired['p_value']:.4g} on {paired_name} vs significance {gates.significance:g} "
            f"(n={n} holdout images: {counts})", "significance",
        )
    what = {"per_class_recall": "recall", "per_class_ap50": "AP@.5", "per_class_iou": "IoU"}.get(per_class, per_class)
    auto = gates.min_class_score == "auto"
    if auto:
        floors = {c: auto_floor(trivial["per_class"].get(c, 0.0), gates.auto_margin) for c in ch[per_class]}
        shown = f"auto (each class's {what} under {trivial['per_class_predictor']}, + {margin})"
    else:
        floors, shown = dict.fromkeys(ch[per_class], gates.min_class_score), f"{gates.min_class_score:.3f}"
    listed = ", ".join(f"{c} ({r:.3f}{f' < {floors[c]:.3f}' if auto else ''})"
                       for c, r in sorted(ch[per_class].items(), key=lambda kv: kv[1]) if r < floors[c])
    if listed:
        check(False, f"class {what} below min_class_score {shown}: {listed}", "min_class_score")
    else:
        worst = min(ch[per_class].values(), default=float("nan"))
        check(True, f"every class {what} >= min_class_score {shown} (lowest {worst:.3f})", "min_class_score")
    if "ece" in ch:
        check(ch["ece"] <= gates.max_ece, f"ECE {ch['ece']:.4f} vs max_ece {gates.max_ece:.4f}", "max_ece")
    else:
        checks.append(f"SKIP max_ece: a {key} model serves no class probabilities to calibrate")
    if gates.max_membership_auc is None:
        checks.append("SKIP max_membership_auc: off (null)")
    elif "mia_auc" not in ch:
        checks.append("SKIP max_membership_auc: the version carries no membership-inference audit (registered "
                      "without evaluate's or distill's figures)")
    else:
        check(ch["mia_auc"] <= gates.max_membership_auc,
              f"membership-inference AUC {ch['mia_auc']:.4f} vs max_membership_auc {gates.max_membership_auc:.4f}",
              "max_membership_auc")
    if gates.max_epsilon is not None:
        eps = ch.get("epsilon")
        spent = f"ε {eps:.4g}" if eps is not None else "ε inf (not trained with DP-SGD)"
        check(eps is not None and eps <= gates.max_epsilon, f"{spent} vs max_epsilon {gates.max_epsilon:g}", "max_epsilon")
    if latency is None:
        checks.append(
            "SKIP max_latency_ratio: there is no champion to time against (latency depends on the machine and "
            f"its load, so it is judged only against the champion in the same run; measured {ch['latency_ms']:.2f} ms "
            f"per batch of {ch['latency_batch_size']})"
        )
    else:
        check(
            latency["ratio"] <= gates.max_latency_ratio,
            f"latency ratio {latency['ratio']:.2f} (challenger {latency['challenger_ms']:.2f} ms vs champion "
            f"{latency['champion_ms']:.2f} ms per batch of {ch['latency_batch_size']}, median of {latency['rounds']} "
            f"alternating rounds) vs max_latency_ratio {gates.max_latency_ratio:.2f}", "max_latency_ratio",
        )
    return failures, checks


def _candidate(client: MlflowClient, name: str, version: str | None, alias: str) -> ModelVersion:
    """The version to decide on: `version` when given, else the one holding `alias`."""
    if version is not None:
        try:
            return client.get_model_version(name, str(version))
        except MlflowException as exc:
            if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"):
                raise RegistryError(f"model {name!r} has no version {version}") from None
            raise
    found = _alias(client, name, alias)
    if found is None:
        raise NoChallengerError(f"model {name!r} has no version with alias {alias!r}: log and register a model first")
    return found


def promote(
    registered_name: str,
    holdout_dir: Path | str,
    gates: PromoteConfig,
    eval_cfg: EvaluateConfig,
    version: str | None = None,
    client: MlflowClient | None = None,
    alias: str = CHALLENGER,
) -> Decision:
    """Judge a version (`version`, else the one with `alias`) against the gates on the frozen holdout
    and, if every gate passes, make it champion (old champion → `previous`; its `challenger` alias removed).

    With a champion, both are scored on the same holdout images: the gain in the task's paired measure
    must reach min_gain and be significant at `significance` under the task's one-sided paired test
    (McNemar, or Wilcoxon signed-rank on per-image scores), and the latency ratio is timed in turns in
    this run. Without one, only the absolute gates apply. The decision, the test that judged, its
    p-value and counts and the sample size are tagged on the version, and appended to its description,
    either way. The champion itself is not judged again (AlreadyChampionError).
    """
    client = client or MlflowClient()
    challenger = _candidate(client, registered_name, version, alias)
    champion = _alias(client, registered_name, CHAMPION)
    if champion is not None and str(champion.version) == str(challenger.version):
        raise AlreadyChampionError(
            f"{registered_name} v{challenger.version} is champion already: nothing to promote (judge another version "
            "with `--version N`; `visionops rollback` goes back to the previous champion)"
        )
    ds, split = load_holdout(holdout_dir)
    ch_uri = f"models:/{registered_name}/{challenger.version}"
    ch_model = load_served(ch_uri, ds, holdout_dir)
    ch_metrics, ch_scores = _score(ch_model, split, ds, eval_cfg)
    ch_metrics.update(recorded_audit(challenger))
    champ_metrics = paired = latency = None
    if champion is None:
        ch_metrics["latency_ms"] = call_latency_ms(_batch_call(ch_model, eval_cfg.latency_batch_size))
    else:
        champ_uri = f"models:/{registered_name}/{champion.version}"
        champ_model = load_served(champ_uri, ds, holdout_dir)
        champ_metrics, champ_scores = _score(champ_model, split, ds, eval_cfg)
        paired = {**PAIRED_TESTS[ch_metrics["paired_test"]](ch_scores, champ_scores), "measure": ch_metrics["paired"]}
        latency = paired_latency(
            _batch_call(ch_model, eval_cfg.latency_batch_size), _batch_call(champ_model, eval_cfg.latency_batch_size)
        )
        ch_metrics["latency_ms"], champ_metrics["latency_ms"] = latency["challenger_ms"], latency["champion_ms"]
        champ_metrics["model_uri"] = champ_uri
    ch_metrics["model_uri"] = ch_uri
    ch_metrics["epsilon"] = privacy_record.recorded_epsilon(challenger.tags or {})
    trivial = get_task(ds.task).trivial_scores(split, ds)
    failures, checks = _gates(ch_metrics, champ_metrics, gates, paired, latency, trivial)
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
        holdout_n=len(split),
        comparison=paired,
        latency=latency,
        trivial={k: trivial[k] for k in ("predictor", "score")},
    )
    v = decision.challenger_version
    old = decision.champion_version
    if promoted:
        if old is not None:
            client.set_registered_model_alias(registered_name, PREVIOUS, old)
        client.set_registered_model_alias(registered_name, CHAMPION, v)
        for held in {alias, CHALLENGER} - {CHAMPION, PREVIOUS}:
            holder = _alias(client, registered_name, held)  # asked now: another pipeline may have moved it
            if holder is not None and str(holder.version) == v:
                client.delete_registered_model_alias(registered_name, held)
        if old is not None:
            _tag(client, registered_name, old, "promotion.replaced_by", v)
            _tag(client, registered_name, old, "promotion.replaced_at", stamp)
    _record(client, registered_name, decision, gates)
    return decision


def _record(client: MlflowClient, name: str, d: Decision, gates: PromoteConfig) -> None:
    """The decision, with its statistics, on the challenger version's tags and description."""
    v, old, paired = d.challenger_version, d.champion_version, d.comparison
    tags = {
        "promotion.decision": "promoted" if d.promoted else "rejected",
        "promotion.reasons": d.reasons,
        "promotion.timestamp": d.timestamp,
        "promotion.previous_champion": old or "",
        "promotion.holdout_n": str(d.holdout_n),
        "promotion.test": f"{paired['test']} on {paired['measure']}" if paired else "n/a (no champion)",
        "promotion.p_value": f"{paired['p_value']:.6g}" if paired else "n/a (no champion)",
        "promotion.discordant": (
            {"challenger_better": paired["challenger_better"], "champion_better": paired["champion_better"]}
            if paired else "n/a (no champion)"
        ),
        "promotion.latency_ratio": f"{d.latency['ratio']:.4f}" if d.latency else "n/a (no champion)",
        "promotion.trivial": d.trivial,
        "promotion.metrics": _metrics_record(d.challenger_metrics, d.champion_metrics, gates),
    }
    for key, value in tags.items():
        _tag(client, name, v, key, value)
    verdict = "PROMOTED to champion" if d.promoted else "REJECTED"
    against = f"champion v{old}" if old else "no champion"
    stats = f"{d.holdout_n} holdout images"
    if paired:
        stats += (
            f", paired test {paired['test']} on {paired['measure']}: p={paired['p_value']:.4g} "
            f"({paired['challenger_better']} images better vs {paired['champion_better']} worse)"
        )
    _append_description(client, name, v, f"[{d.timestamp}] promotion {verdict} (vs {against}; {stats}): " + "; ".join(d.reasons))


def rollback(registered_name: str, client: MlflowClient | None = None) -> dict:
    """Point `champion` back at the `previous` version. The new `previous` is the version that the
    restored one replaced when it was promoted (if it still exists), so rollbacks can be repeated."""
    client = client or MlflowClient()
    champion = _alias(client, registered_name, CHAMPION)
    if champion is None:
        raise RollbackError(f"model {registered_name!r} has no {CHAMPION!r} version to roll back")
    previous = _alias(client, registered_name, PREVIOUS)
    if previous is None:
        raise RollbackError(f"model {registered_name!r} has no {PREVIOUS!r} version: {_earliest(champion)}")
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


def _earliest(champion: ModelVersion) -> str:
    """Why nothing precedes `champion`, from its tags: how it became champion (the newer event wins)."""
    tags, v = champion.tags or {}, champion.version
    before = tags.get("promotion.previous_champion") or None
    if tags.get("rollback.decision") == "restored" and tags.get("rollback.timestamp", "") >= tags.get("promotion.timestamp", ""):
        demoted = tags["rollback.restored_from"]
        how = f"champion v{v} was restored by a rollback from v{demoted}"
        hint = f"; `visionops promote --version {demoted}` judges v{demoted} again"
    else:
        how, hint = f"champion v{v}", ""
    if before is None:
        return (f"{how}, and no version was champion before v{v}{hint}" if hint
                else f"champion v{v} is the first champion (no version is recorded as champion before it)")
    return f"{how}; v{before}, the champion v{v} replaced, holds no {PREVIOUS!r} alias (deleted, or rolled back from){hint}"


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
            raise MissingInputError(f"{p}: no such file or directory")
    return out


class PredictionFailed(RegistryError):
    """`predict_paths` wrote its CSV, but some files could not be predicted."""

    def __init__(self, failed: int, total: int, out_csv: Path):
        super().__init__(f"{failed} of {total} files could not be predicted; see the error column of {out_csv}")
        self.failed, self.total, self.out_csv = failed, total, out_csv


def predict_paths(model_uri: str, paths: list[Path], out_csv: Path, batch_size: int = 256) -> int:
    """Predict image files (folders searched recursively for PNG/JPEG) with the pyfunc model at
    `model_uri` and write `out_csv` atomically: path, the model's `predict_columns` (a classifier's
    label and probability, a detector's detections, a segmenter's mask and classes) and error.

    Each file goes through the served model's own per-row path (`predict_values`: size limit,
    decoding, preprocessing, prediction), so the answers and errors equal what `mlflow models
    serve` returns. A file that cannot be read or decoded gets empty answers and its error
    (also on stderr); after writing every row, PredictionFailed is raised if any file failed.
    Each image is also a row of the model's inference log, when on (`monitoring.served_log`); rows the log
    lost are counted on stderr. Returns the number of rows (files) written.
    """
    if batch_size < 1:
        raise InvalidInputError(f"batch_size must be >= 1, got {batch_size}")
    files = expand_paths(paths)
    if not files:
        raise RegistryError(f"no PNG/JPEG files found in {', '.join(map(str, paths))}")
    pyfunc_model = mlflow.pyfunc.load_model(model_uri)
    model = pyfunc_model.unwrap_python_model()
    if not hasattr(model, "predict_columns"):
        raise RegistryError(f"{model_uri}: not a visionops model ({type(model).__name__})")
    columns = list(model.predict_columns)
    rows: list[list] = []
    failed = 0
    with tqdm(total=len(files), unit="img", desc="predict", file=sys.stderr, disable=None) as bar:  # a terminal only
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
            for i, (f, pred) in enumerate(zip(chunk, preds[[*columns, "error"]].itertuples(index=False))):
                error = read_errors.get(i) or pred[-1]
                if error:
                    failed += 1
                    tqdm.write(f"warning: {f}: {error}", file=sys.stderr)
                    rows.append([str(f), *[""] * len(columns), error])
                else:
                    rows.append([str(f), *(f"{v:.6f}" if isinstance(v, float) else v for v in pred[:-1]), ""])
            bar.update(len(chunk))
    log = getattr(model, "served_log", None)  # the inference log: on when the model carries `monitor` or $VISIONOPS_LOG_URI is set
    if log is not None:
        log.close()
        lost = log.stats["rows_dropped"] + log.stats["failed_rows"]
        if lost:
            print(f"warning: inference log {log.uri}: {lost} of {len(files)} rows not written "
                  f"({log.stats['last_error'] or log.stats['last_build_error']}); the answers are unaffected", file=sys.stderr)
    with atomic_path(out_csv) as tmp, tmp.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", *columns, "error"])
        writer.writerows(rows)
    if failed:
        raise PredictionFailed(failed, len(files), out_csv)
    return len(rows)
