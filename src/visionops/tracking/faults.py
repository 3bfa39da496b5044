"""Runs that tell the truth after a crash: who runs them, orphans ended, resumes linked, parents' status.

- Every run records the process that owns it (host, pid, start time). When a stage run starts, the
  RUNNING runs of the experiment whose owner is gone from this host are ended KILLED, with the reason.
- A pipeline's parent run takes the status of its worst stage (FAILED > KILLED > RUNNING > FINISHED).
- A stage that resumes from a checkpoint links its run to the run that wrote the checkpoint. The link
  lives in a sidecar beside the checkpoints (`<stage>.mlflow.json`): the run that owns the checkpoint
  progress and its last epoch per training loop. The trainer knows nothing of it.
- A run that ends other than FINISHED says why (`visionops.end_reason`): the exception, SIGTERM (a Prefect
  task timeout or a stop), or its process vanishing. SIGTERM ends the run KILLED at once, not when the next
  stage finds the orphan.
- A stage run again within one pipeline run (a retried Prefect task) is linked to the run before it
  (`visionops.retry_of` / `visionops.retried_by`), which thereby says it did not count.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

from visionops import atomic, layout

HOST_TAG, PID_TAG, STARTED_TAG = "visionops.host", "visionops.pid", "visionops.process_started"
END_REASON_TAG = "visionops.end_reason"
RESUMED_FROM_TAG, RESUMED_BY_TAG = "visionops.resumed_from", "visionops.resumed_by"
RETRY_OF_TAG, RETRIED_BY_TAG = "visionops.retry_of", "visionops.retried_by"
REASON_CHARS = 500  # of an exception's message in the end reason (MLflow tag values hold 8000)
SEVERITY = {"FINISHED": 0, "SCHEDULED": 1, "RUNNING": 1, "KILLED": 2, "FAILED": 3}


def process_start(pid: int) -> int:
    """When process `pid` started, as a number that stays the same while it runs (psutil.NoSuchProcess if gone).

    On Linux, clock ticks since boot (/proc/PID/stat, field 22): psutil's create_time() there adds the boot time
    as the wall clock sees it now, which moves by whole seconds when NTP adjusts the clock, and a live process
    would look gone. Elsewhere psutil's create_time() (a recorded timestamp) in centiseconds.
    """
    import psutil

    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        if Path("/proc/self/stat").exists():
            raise psutil.NoSuchProcess(pid) from None
        return round(psutil.Process(pid).create_time() * 100)
    return int(stat.rsplit(")", 1)[1].split()[19])  # after the command name, which may hold spaces and ")"


def owner_tags(pid: int | None = None, started: int | None = None) -> dict[str, str]:
    """Tags naming the process that owns a run (this process by default)."""
    pid = pid or os.getpid()
    if started is None:
        started = process_start(pid)
    return {HOST_TAG: socket.gethostname(), PID_TAG: str(pid), STARTED_TAG: str(started)}


def pipeline_owner_tags(pipeline_id: str) -> dict[str, str]:
    """The owner of a pipeline run: the `dvc` process of `dvc-<pid>-<start>` ids, this process for
    `single-` ids, none (unknown) for ids set from outside (the Prefect flow's)."""
    if pipeline_id.startswith("dvc-"):
        _, pid, started = pipeline_id.split("-")
        return owner_tags(int(pid), int(started))
    return owner_tags() if pipeline_id.startswith("single-") else {}


def owner_gone(tags: dict[str, str]) -> bool:
    """True when the run's owner was a process of this host that no longer exists (pid reuse included)."""
    if tags.get(HOST_TAG) != socket.gethostname() or PID_TAG not in tags:
        return False
    import psutil

    try:
        started = process_start(int(tags[PID_TAG]))
    except psutil.NoSuchProcess:
        return True
    return str(started) != tags.get(STARTED_TAG, str(started))


class Terminated(BaseException):
    """SIGTERM reached a stage process (a Prefect task timeout or a stop terminates its process group)."""


@contextlib.contextmanager
def sigterm_raises() -> Iterator[None]:
    """Within the block SIGTERM raises `Terminated` (in the main thread), so the run ends KILLED, with why."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def _raise(signum, frame):
        raise Terminated("terminated by SIGTERM (a Prefect task timeout or a stop ends the stage's process group)")

    previous = signal.signal(signal.SIGTERM, _raise)
    try:
        yield
    except Terminated:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)  # end as SIGTERM would have ended it; the run says why
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)


def ending(exc: BaseException) -> tuple[str, str]:
    """(status, reason) of a run that the exception `exc` ended."""
    status = "KILLED" if isinstance(exc, Terminated | KeyboardInterrupt) else "FAILED"
    text = str(exc)
    if len(text) > REASON_CHARS:
        text = text[:REASON_CHARS] + " ..."
    return status, f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def link_retry(client, experiment_id: str, run_id: str, same: dict[str, str]) -> str | None:
    """Link run `run_id` to the latest earlier run with the tags `same` (its pipeline run and stage) that no
    other run retried: this is a retry of it. Returns that run's id (None: a first attempt)."""
    where = " and ".join(f"tags.`{key}` = '{value}'" for key, value in same.items())
    runs = client.search_runs([experiment_id], where, order_by=["attributes.start_time DESC"], max_results=100)
    earlier = [r for r in runs if r.info.run_id != run_id and RETRIED_BY_TAG not in r.data.tags]
    if not earlier:
        return None
    previous = earlier[0]
    client.set_tag(run_id, RETRY_OF_TAG, previous.info.run_id)
    client.set_tag(previous.info.run_id, RETRIED_BY_TAG, run_id)
    if previous.info.status == "FINISHED" and END_REASON_TAG not in previous.data.tags:
        client.set_tag(previous.info.run_id, END_REASON_TAG,
                       "the stage finished, but its `dvc repro` did not, and its task was retried")
    return previous.info.run_id


def worst(statuses) -> str:
    return max(statuses, key=lambda s: SEVERITY.get(s, 3), default="FINISHED")


def settle_parent(client, parent_id: str, floor: str = "FINISHED") -> str:
    """Give a pipeline's parent run the status of its worst stage run (at least `floor`); a run that was
    retried counts no more: its retry stands for it."""
    parent = client.get_run(parent_id)
    children = client.search_runs(
        [parent.info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent_id}'", max_results=10_000
    )
    status = worst([floor, *(run.info.status for run in children if RETRIED_BY_TAG not in run.data.tags)])
    if SEVERITY[status] == SEVERITY["RUNNING"]:
        client.update_run(parent_id, status="RUNNING")
    elif parent.info.status != status or parent.info.end_time is None:
        client.set_terminated(parent_id, status)
    return status


def end_orphans(client, experiment_id: str) -> list[str]:
    """End KILLED the RUNNING runs whose owner process is gone from this host; return their ids."""
    running = client.search_runs([experiment_id], "attributes.status = 'RUNNING'", max_results=10_000)
    orphans = [run for run in running if owner_gone(run.data.tags)]
    parents = set()
    for run in orphans:
        tags = run.data.tags
        why = f"process {tags[PID_TAG]} on {tags[HOST_TAG]} ended without closing the run (killed or crashed)"
        client.set_tag(run.info.run_id, END_REASON_TAG, why)
        if tags.get("visionops.role") == "pipeline":
            settle_parent(client, run.info.run_id, floor="KILLED")
        else:
            client.set_terminated(run.info.run_id, "KILLED")
            if "mlflow.parentRunId" in tags:
                parents.add(tags["mlflow.parentRunId"])
    for parent_id in parents - {run.info.run_id for run in orphans}:
        settle_parent(client, parent_id)
    return [run.info.run_id for run in orphans]


class ResumeLink:
    """Ties a stage's run to the run whose checkpoint it resumes, through the sidecar beside the checkpoints.

    The sidecar names the run that owns the checkpoint progress and the last epoch of each training
    loop (`desc`). A run resumes that progress when its first epoch of such a loop is not the first (the
    trainer resumed a checkpoint), or when it trains only loops the sidecar does not name (those it
    names were complete), or nothing.
    """

    def __init__(self, client, stage: str, run_id: str, directory: Path = layout.CHECKPOINTS):
        self.client, self.run_id = client, run_id
        self.path = Path(directory) / f"{stage}.mlflow.json"
        try:
            self.previous = json.loads(self.path.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            self.previous = None
        self.first: dict[str, int] = {}
        self.last: dict[str, int] = {}
        self.resumed: bool | None = None if self.previous else False

    def on_epoch(self, desc: str, epoch: int) -> None:
        """Call after each epoch's checkpoint is written."""
        if desc not in self.first:
            self.first[desc] = epoch
            if self.resumed is None:
                earlier = self.previous["epochs"]
                self._decide(epoch > 1 if desc in earlier else True)
        self.last[desc] = epoch
        carried = self.previous["epochs"] if self.resumed else {}
        atomic.write_json(self.path, {"run_id": self.run_id, "epochs": {**carried, **self.last}})

    def on_end(self, status: str) -> None:
        """Decide a resume that had nothing left to train; forget the checkpoints once the stage succeeded."""
        if self.resumed is None:
            self._decide(True)
        if status == "FINISHED":
            self.path.unlink(missing_ok=True)

    def _decide(self, resumed: bool) -> None:
        self.resumed = resumed and self.previous["run_id"] != self.run_id
        if self.resumed:
            self.client.set_tag(self.run_id, RESUMED_FROM_TAG, self.previous["run_id"])
            self.client.set_tag(self.previous["run_id"], RESUMED_BY_TAG, self.run_id)
