"""Two fresh clones, two pipeline runs: their dvc.lock files must be identical, and equal to the committed one.

    python bench/check_reproducible.py [--keep]

Clones the committed HEAD twice into a temporary folder, runs what `make run` runs after its set-up
(`visionops check && dvc repro`, with this checkout's virtualenv and the clone's own src/ first on
PYTHONPATH, so no second install), and compares every hash in the two dvc.lock files with
each other and with HEAD's. Prints the entries that differ and exits 1 if any does. Commit first:
uncommitted changes are not in the clones. Takes a few minutes on 2 cores (two full pipelines).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
VENV = Path(sys.prefix)


def lock_hashes(text: str) -> dict[str, str]:
    """stage:kind:path -> md5 for every dep and out of a dvc.lock."""
    out = {}
    for stage, entry in (yaml.safe_load(text) or {}).get("stages", {}).items():
        for kind in ("deps", "outs"):
            for item in entry.get(kind, []):
                out[f"{stage}:{kind}:{item['path']}"] = item.get("md5", "")
    return out


def make_run(clone: Path) -> tuple[str, float]:
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "VIRTUAL_ENV")}
    env.update(PATH=f"{VENV / 'bin'}{os.pathsep}{env['PATH']}", PYTHONPATH=str(clone / "src"), DVC_NO_ANALYTICS="1",
               GX_ANALYTICS_ENABLED="false")
    start = time.perf_counter()
    proc = subprocess.run(["bash", "-c", "visionops check >/dev/null && dvc repro"], cwd=clone, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"the pipeline failed in {clone}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return (clone / "dvc.lock").read_text(), time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--keep", action="store_true", help="keep the clones (their paths are printed)")
    args = parser.parse_args()
    committed = subprocess.run(["git", "show", "HEAD:dvc.lock"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    tmp = Path(tempfile.mkdtemp(prefix="visionops-repro-"))
    locks = {"committed": lock_hashes(committed)}
    for name in ("clone-a", "clone-b"):
        clone = tmp / name / "visionops"  # no ../shared beside it, as for a user who clones the repository alone
        subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
        text, seconds = make_run(clone)
        locks[name] = lock_hashes(text)
        print(f"{name}: the pipeline took {seconds:.1f} s ({clone})")
    differ = 0
    for key in sorted(set().union(*locks.values())):
        values = {name: lock.get(key) for name, lock in locks.items()}
        if len(set(values.values())) > 1:
            differ += 1
            print(f"DIFFERS {key}: " + ", ".join(f"{n}={(v or 'missing')[:10]}" for n, v in values.items()))
    print(f"{len(locks['committed'])} hashes compared; {differ} differ")
    if not args.keep:
        subprocess.run(["rm", "-rf", str(tmp)], check=False)
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
