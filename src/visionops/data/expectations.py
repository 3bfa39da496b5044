"""Great Expectations plumbing shared by every task's `validate`: run suites on pandas frames, collect the
failed expectations with their offending rows, and phrase them for the error message.

A task builds its frames (each with a `path` column naming the row) and its suites, keyed
`critical_<frame>` and `warning_<frame>`; `run_gx` validates them and renders the Data Docs site,
`failures` splits the failed expectations into critical ones and warnings.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd

from visionops.data.images import content_hash

CHUNK_IMAGES = 4096  # images per vectorised statistics chunk (fewer for large images)
CHUNK_BYTES = 64 << 20  # cap on the uint8 bytes of one chunk
SUMMARY_PATHS = 20  # offending paths kept per check in summary.json
MESSAGE_PATHS = 10  # offending paths named per check in the exception message



def image_stats(images: np.ndarray) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Per-image mean, std (float32 over H, W, C) and content hash, a chunk at a time."""
    n = len(images)
    means = np.empty(n, np.float64)
    stds = np.empty(n, np.float64)
    hashes: list[str] = []
    per_image = max(1, int(np.prod(images.shape[1:])))
    step = max(1, min(CHUNK_IMAGES, CHUNK_BYTES // per_image))
    for start in range(0, n, step):
        chunk = np.ascontiguousarray(images[start : start + step])
        flat = chunk.reshape(len(chunk), -1).astype(np.float32)
        means[start : start + len(chunk)] = flat.mean(axis=1)
        stds[start : start + len(chunk)] = flat.std(axis=1)
        hashes.extend(content_hash(img) for img in chunk)
    return means, stds, hashes


def import_gx():
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    return gx, ProgressBarsConfig


def run_gx(
    gx, ProgressBarsConfig, suites: dict[str, list], frames: dict[str, pd.DataFrame], docs_dir: Path
) -> list:
    """Validate each frame with its suites `critical_<name>` and `warning_<name>` (those present); return the
    validation results and write the Data Docs site to `docs_dir`."""
    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False, metric_calculations=False)
    site = "visionops"
    context.add_data_docs_site(
        site,
        site_config={
            "class_name": "SiteBuilder",
            "store_backend": {"class_name": "TupleFilesystemStoreBackend", "base_directory": str(docs_dir)},
            "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
        },
    )
    source = context.data_sources.add_pandas("visionops")
    results = []
    for frame_name, df in frames.items():
        batch = source.add_dataframe_asset(frame_name).add_batch_definition_whole_dataframe("all")
        definitions = []
        for suite_name in (f"critical_{frame_name}", f"warning_{frame_name}"):
            if suite_name not in suites:
                continue
            suite = context.suites.add(gx.ExpectationSuite(name=suite_name))
            for expectation in suites[suite_name]:
                suite.add_expectation(expectation)
            definitions.append(
                context.validation_definitions.add(gx.ValidationDefinition(name=suite_name, data=batch, suite=suite))
            )
        checkpoint = context.checkpoints.add(
            gx.Checkpoint(
                name=f"validate_{frame_name}",
                validation_definitions=definitions,
                # no UpdateDataDocsAction per checkpoint: one build_data_docs below renders every
                # result at once (each action rebuilds the whole site, ~0.5 s of Jinja apiece)
                actions=[],
                result_format={"result_format": "COMPLETE", "unexpected_index_column_names": ["path"]},
            )
        )
        run = checkpoint.run(batch_parameters={"dataframe": df})
        results.extend(run.run_results.values())
    context.build_data_docs(site_names=[site])
    return results


def leak_paths_paired(manifest: pd.DataFrame) -> list[str]:
    """The leaking rows' paths with the copies of one image adjacent (train copy, then test copy)."""
    leaks = manifest[manifest["leaks_across_splits"]]
    group = pd.factorize(leaks["content_hash"])[0]
    return leaks["path"].to_numpy()[np.argsort(group, kind="stable")].astype(str).tolist()


def failures(results: list, manifest: pd.DataFrame) -> tuple[list[dict], list[dict]]:
    """Split the failed expectations into (critical, warnings), each with its offending paths."""
    critical, warnings = [], []
    for vr in results:
        suite = vr.suite_name
        for er in vr.results:
            if er.success:
                continue
            cfg = er.expectation_config
            res = er.result or {}
            paths = [str(row.get("path")) for row in res.get("unexpected_index_list") or []]
            if cfg.kwargs.get("column") == "leaks_across_splits" and suite == "critical_images":
                paths = leak_paths_paired(manifest)  # same rows, each duplicate's copies side by side
            entry = {
                "expectation": cfg.type,
                "column": cfg.kwargs.get("column"),
                "check": (cfg.meta or {}).get("check", cfg.type),
                "suite": suite,
                "offending": paths[:SUMMARY_PATHS],
                "n_offending": int(res.get("unexpected_count", len(paths)) or 0),
                "_all_paths": paths,
            }
            exc = er.exception_info or {}
            if exc.get("raised_exception"):
                entry["error"] = str(exc.get("exception_message"))
            (critical if suite.startswith("critical_") else warnings).append(entry)
    return critical, warnings


def describe(entries: list[dict]) -> str:
    lines = []
    for e in entries:
        paths = e["_all_paths"]
        shown = ", ".join(paths[:MESSAGE_PATHS])
        more = len(paths) - MESSAGE_PATHS
        if more > 0:
            shown += f" and {more} more"
        detail = f"{e['n_offending']} offending: {shown}" if paths else e.get("error", "failed")
        lines.append(f"  - {e['check']} [{e['expectation']}({e['column']})]: {detail}")
    return "\n".join(lines)
