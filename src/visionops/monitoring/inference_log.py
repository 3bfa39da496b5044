"""The inference log's files: Parquet, one folder per UTC day (`<uri>/day=YYYY-MM-DD/`), local or on S3, and
their writer.

Each write is one new file, made visible whole (locally a temporary name then a rename; on S3 one PUT), so
a reader never sees a half-written file and a crash loses only what was not yet written. Beside the day
folders, `_status/` holds each writing process's counters and `samples/` the kept images (`samples.py`);
readers skip both.

`LogWriter` keeps the sink off the request path: `write` only enqueues (it never waits on I/O, never raises),
`write_later` enqueues a closure that builds the rows, and a daemon thread builds and writes: a file every
`flush_rows` rows or `flush_seconds` after the oldest waiting row, whichever comes first. `close()`, and an
atexit hook at a clean exit, write what is pending. A failing sink (an unwritable folder, S3 down) is counted
in `stats` and the status file, logged at most once a minute, its batch's rows dropped; the next batch tries
again.

Kill -9 bound: a killed process loses the rows it had not written yet: those handed over since its last file,
built or not (`write_later`'s rows are built when their batch is written), fewer than `flush_rows` rows and
none older than `flush_seconds` while the sink keeps up with the traffic (a slower sink lets up to
`queue_rows` rows wait, then drops and counts the excess). Every file already written is whole. Until it is
built, a `write_later` item keeps what its closure captured (a request's canonical images) in memory.
"""

from __future__ import annotations

import atexit
import collections
import itertools
import json
import logging
import os
import random
import socket
import threading
import time
import uuid
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from visionops import atomic
from visionops.errors import InvalidInputError
from visionops.monitoring import samples as kept
from visionops.monitoring.log_schema import PARTITION, SCHEMA

log = logging.getLogger(__name__)
STATUS = "_status"  # <uri>/_status/<host>-<pid>-<n>.json: a writer's counters, rewritten at each flush
WARN_EVERY_S = 60.0  # a failing sink logs one warning a minute, not one per batch
PRUNE_EVERY_S = 3600.0  # kept images are pruned after each flush that kept one, and at least this often


def filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path) of a log location: a local directory or s3://bucket/prefix (the endpoint from
    AWS_ENDPOINT_URL or MLFLOW_S3_ENDPOINT_URL, the keys from the usual AWS variables)."""
    if uri.startswith("s3://"):
        endpoint = os.environ.get("AWS_ENDPOINT_URL") or os.environ.get("MLFLOW_S3_ENDPOINT_URL")
        fs = pafs.S3FileSystem(endpoint_override=endpoint, region=os.environ.get("AWS_DEFAULT_REGION", "us-east-1"),
                               allow_bucket_creation=False, connect_timeout=5.0, request_timeout=30.0)
        return fs, uri[len("s3://"):].rstrip("/")
    if "://" in uri:
        raise InvalidInputError(f"monitor.log_uri: {uri!r} is neither a local directory nor s3://bucket/prefix")
    return pafs.LocalFileSystem(), os.path.abspath(uri)


def to_table(rows: pd.DataFrame | dict) -> pa.Table:
    """The log's Arrow table of rows (a frame, or columns: name to one value per row) with the schema's columns
    (missing ones null; extra ones are an error)."""
    names = set(rows.columns if isinstance(rows, pd.DataFrame) else rows)
    extra = names - set(SCHEMA.names)
    if extra:
        raise InvalidInputError(f"inference log rows: unknown columns {sorted(extra)}")
    n = _length(rows)
    arrays = [pa.array(rows[f.name], type=f.type, from_pandas=True) if f.name in names else pa.nulls(n, f.type)
              for f in SCHEMA]
    return pa.Table.from_arrays(arrays, schema=SCHEMA)


def _length(rows: pd.DataFrame | dict) -> int:
    return len(rows) if isinstance(rows, pd.DataFrame) else len(next(iter(rows.values()), ()))


def _head(rows: pd.DataFrame | dict, n: int) -> pd.DataFrame | dict:
    return rows.iloc[:n] if isinstance(rows, pd.DataFrame) else {k: v[:n] for k, v in rows.items()}


def _put(fs: pafs.FileSystem, path: str, data: bytes) -> None:
    """Write `data` at `path` whole (locally a temporary sibling then a rename; on S3 one object)."""
    if isinstance(fs, pafs.LocalFileSystem):
        atomic.write_bytes(path, data)
    else:
        with fs.open_output_stream(path) as out:
            out.write(data)


def _write_table(fs: pafs.FileSystem, root: str, table: pa.Table, when: datetime | None = None) -> str:
    when = when or datetime.now(timezone.utc)
    folder = f"{root}/{PARTITION}={when:%Y-%m-%d}"
    name = f"{when:%H%M%S}-{os.getpid()}-{uuid.uuid4().hex[:12]}.parquet"
    fs.create_dir(folder, recursive=True)
    if isinstance(fs, pafs.LocalFileSystem):
        with atomic.atomic_path(f"{folder}/{name}") as tmp:  # a dot-named temporary: readers skip it
            pq.write_table(table, str(tmp), filesystem=fs)
    else:
        pq.write_table(table, f"{folder}/{name}", filesystem=fs)
    return f"{folder}/{name}"


def write_file(uri: str, table: pa.Table, when: datetime | None = None) -> str:
    """Write `table` as one new Parquet file in the folder of `when`'s UTC day; returns its path."""
    fs, root = filesystem(uri)
    return _write_table(fs, root, table, when)


def _utc(when: datetime) -> datetime:
    return when.astimezone(timezone.utc) if when.tzinfo else when.replace(tzinfo=timezone.utc)


def _log_files(fs: pafs.FileSystem, root: str, since: datetime | None) -> list[str]:
    """The Parquet files of the day folders (no temporary name), from `since`'s day on: a row is written on
    or after its own day, so earlier folders hold no row after `since`."""
    first = f"{PARTITION}={_utc(since):%Y-%m-%d}" if since else ""
    days = [i.path for i in fs.get_file_info(pafs.FileSelector(root))
            if i.type == pafs.FileType.Directory and i.base_name.startswith(f"{PARTITION}=") and i.base_name >= first]
    return sorted(i.path for day in days for i in fs.get_file_info(pafs.FileSelector(day, recursive=True))
                  if i.type == pafs.FileType.File and i.base_name.endswith(".parquet") and not i.base_name.startswith("."))


def read_log(uri: str, since: datetime | None = None, until: datetime | None = None,
             model_sha256: str | None = None) -> pd.DataFrame:
    """The log's rows with since < time <= until (either open), of one model version when given, in time order."""
    fs, root = filesystem(uri)
    try:
        info = fs.get_file_info(root)
        files = _log_files(fs, root, since) if info.type == pafs.FileType.Directory else []
    except OSError as exc:
        raise InvalidInputError(f"monitor.log_uri {uri!r}: cannot be read ({exc})") from exc
    if not files:
        return SCHEMA.empty_table().to_pandas()
    dataset = ds.dataset(files, filesystem=fs, format="parquet", schema=SCHEMA, partition_base_dir=root,
                         partitioning=ds.partitioning(pa.schema([(PARTITION, pa.string())]), flavor="hive"))
    cond = None
    for c in ([ds.field("time") > pa.scalar(since, pa.timestamp("us", tz="UTC"))] if since else []) + \
             ([ds.field("time") <= pa.scalar(until, pa.timestamp("us", tz="UTC"))] if until else []) + \
             ([ds.field("model_sha256") == model_sha256] if model_sha256 else []):
        cond = c if cond is None else cond & c
    table = dataset.to_table(filter=cond, columns=SCHEMA.names)
    return table.to_pandas().sort_values(["time", "request_id", "row"], kind="stable").reset_index(drop=True)


def read_status(uri: str) -> list[dict]:
    """The status files of the processes that wrote the log at `uri` (their counters at their last flush)."""
    fs, root = filesystem(uri)
    infos = fs.get_file_info(pafs.FileSelector(f"{root}/{STATUS}", allow_not_found=True))
    out = []
    for info in sorted(infos, key=lambda i: i.path):
        if info.type == pafs.FileType.File and info.base_name.endswith(".json") and not info.base_name.startswith("."):
            with fs.open_input_stream(info.path) as f:
                out.append(json.loads(f.read()))
    return out


@dataclass
class _Later:
    """A `write_later` item: `rows` rows that `build()` makes in the writer's thread."""

    build: Callable[[], tuple[pd.DataFrame | dict, list | None] | None]
    rows: int


_live: weakref.WeakSet[LogWriter] = weakref.WeakSet()  # the writers an exit must flush
_serial = itertools.count()


@atexit.register
def _close_all() -> None:
    for writer in list(_live):
        writer.close()


class LogWriter:
    """Appends rows to the log at `uri` from a background thread without ever failing or delaying the caller:
    a failed write is counted in `stats` (and its rows dropped), never raised.

    Interface kept by every implementation: `from_settings(monitor)`, `write(frame, raw=None)` (rows with the
    schema's columns, and optionally their images' bytes as received), `write_later(rows, build)` (the same,
    built by the writer's thread), `close()` (writes what is pending),
    `stats` (rows_written, rows_dropped, write_errors, files, samples_written, last_error).
    """

    def __init__(self, uri: str, flush_rows: int = 256, flush_seconds: float = 5.0, queue_rows: int = 100_000,
                 sample_images: float = 0.0, sample_max_images: int = 1000, sample_retention_days: float = 30.0):
        self.fs, self.root = filesystem(uri)  # a bad location fails here, when the model loads, not per row
        self.uri = uri if uri.startswith("s3://") else self.root  # a relative folder: of the process's start dir
        self.flush_rows, self.flush_seconds, self.queue_rows = flush_rows, flush_seconds, queue_rows
        self.sample_images, self.sample_max_images = sample_images, sample_max_images
        self.sample_retention_days = sample_retention_days
        self._reset()
        _live.add(self)

    @classmethod
    def from_settings(cls, settings: dict) -> LogWriter | None:
        """The writer that the `monitor` settings (params.yaml's section as a dict; other keys ignored, missing
        ones at their defaults) describe; None when log_uri is None or empty."""
        from pydantic import ValidationError

        from visionops.config import MonitorConfig

        if not settings.get("log_uri"):
            return None
        try:
            m = MonitorConfig(**{k: v for k, v in settings.items() if k in MonitorConfig.model_fields})
        except ValidationError as exc:
            raise InvalidInputError(f"monitor settings: {exc}") from exc
        return cls(m.log_uri, m.flush_rows, m.flush_seconds, m.queue_rows,
                   m.sample_images, m.sample_max_images, m.sample_retention_days)

    def _reset(self) -> None:
        """A fresh queue, thread and counters: at start, and in a forked child (which has no writer thread)."""
        self._pid = os.getpid()
        self._name = f"{socket.gethostname()}-{self._pid}-{next(_serial)}"
        self._cond = threading.Condition()
        self._queue: collections.deque = collections.deque()  # (frame, table or _Later, [(position, request_id,
        # row, bytes)], enqueued at)
        self._rows = 0  # rows in the queue
        self._closed = False
        self._thread: threading.Thread | None = None
        self._stats = {"rows_written": 0, "rows_dropped": 0, "write_errors": 0, "files": 0, "samples_written": 0,
                       "last_error": ""}
        self._warned_at, self._warned = -WARN_EVERY_S, (0, 0)
        self._pruned_at = time.monotonic()
        self._rng = random.Random()

    @property
    def stats(self) -> dict:
        with self._cond:
            return dict(self._stats)

    def write(self, frame: pd.DataFrame, raw: list[bytes | None] | None = None) -> None:
        """Hand over rows, and with `monitor.sample_images` on their images' bytes (a list aligned with the
        rows, None where there are none); returns at once. Rows beyond `queue_rows` waiting are dropped and
        counted, as are rows handed over after `close()`."""
        try:
            if os.getpid() != self._pid:
                self._reset()
            picked = self._pick(frame, raw) if raw is not None and self.sample_images > 0 else []
            self._hand_over(frame, len(frame), picked)
        except Exception as exc:  # noqa: BLE001 - logging must never fail an answer
            self._count_error(exc)

    def write_later(self, rows: int, build: Callable[[], tuple[pd.DataFrame | dict, list | None] | None]) -> None:
        """Hand over `rows` rows that the writer's thread builds when their batch is written: `build()` returns
        them (a frame or `to_table`'s columns) with their images' bytes (`write`'s `raw`), or None for nothing;
        an exception there is counted like a failed write. Returns at once; the rows are counted (toward
        `queue_rows` and the kill -9 bound) and dropped like `write`'s."""
        try:
            if os.getpid() != self._pid:
                self._reset()
            self._hand_over(_Later(build, rows), rows, [])
        except Exception as exc:  # noqa: BLE001 - logging must never fail an answer
            self._count_error(exc)

    def _hand_over(self, item, n: int, picked: list[tuple]) -> None:
        with self._cond:
            room = 0 if self._closed else max(0, self.queue_rows - self._rows)
            if n > room:
                self._stats["rows_dropped"] += n - room
                n = room
                if isinstance(item, _Later):
                    item.rows = room
                else:
                    item = item.iloc[:room]
                    picked = [p for p in picked if p[0] < room]
            if not n:
                return
            was = self._rows
            self._queue.append((item, picked, time.monotonic()))
            self._rows += n
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="visionops-inference-log", daemon=True)
                self._thread.start()
            if was == 0 or (was < self.flush_rows <= self._rows):  # a new timer, or a batch is full
                self._cond.notify()

    def _pick(self, frame: pd.DataFrame | dict, raw: list) -> list[tuple]:
        """A random `sample_images` fraction of the rows that have bytes: (position, request_id, row, bytes)."""
        chosen = [i for i, data in enumerate(raw) if data is not None and self._rng.random() < self.sample_images]
        if not chosen:
            return []
        ids, rows = np.asarray(frame["request_id"]), np.asarray(frame["row"])
        return [(i, ids[i], rows[i], bytes(raw[i])) for i in chosen]

    def close(self, timeout: float = 60.0) -> None:
        """Write what is pending and stop the thread (waiting at most `timeout` seconds for a slow sink)."""
        with self._cond:
            self._closed = True
            self._cond.notify()
            thread = self._thread if os.getpid() == self._pid else None
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)
        _live.discard(self)

    # -- the writer thread

    def _due(self) -> bool:
        return self._rows >= self.flush_rows or bool(self._queue) and self._age() >= self.flush_seconds

    def _age(self) -> float:
        return time.monotonic() - self._queue[0][2]

    def _run(self) -> None:
        while True:
            with self._cond:
                while not (self._closed or self._due()):
                    self._cond.wait(self.flush_seconds - self._age() if self._queue else None)
                final, everything = self._closed, self._closed or bool(self._queue) and self._age() >= self.flush_seconds
                items, self._queue, self._rows = list(self._queue), collections.deque(), 0
            self._flush(items, everything)
            self._report()
            if final:
                return

    def _flush(self, items: list[tuple], everything: bool) -> None:
        """Write the rows of `items` in files of `flush_rows` rows; unless `everything`, a last part shorter
        than that goes back to the queue's head (with its oldest row's time) to wait for more rows."""
        tables, starts, picked = [], [], []
        for frame, chosen, at in items:
            rows = frame.rows if isinstance(frame, _Later) else len(frame)
            try:
                if isinstance(frame, _Later):
                    frame, chosen = self._build(frame)
                    if frame is None:
                        continue
                tables.append(frame if isinstance(frame, pa.Table) else to_table(frame))
                starts.append(at)
            except Exception as exc:  # noqa: BLE001 - a bad frame costs its own rows, not the batch's
                self._count_error(exc, rows)
            picked += chosen
        if tables:
            table = pa.concat_tables(tables)
            n = len(table)
            cut = n if everything else n - n % self.flush_rows
            for start in range(0, cut, self.flush_rows):
                self._write_rows(table.slice(start, min(self.flush_rows, cut - start)))
            if cut < n:
                ends = list(itertools.accumulate(len(t) for t in tables))
                oldest = starts[next(i for i, end in enumerate(ends) if end > cut)]
                with self._cond:
                    self._queue.appendleft((table.slice(cut), [], oldest))
                    self._rows += n - cut
        self._keep_samples(picked)

    def _build(self, later: _Later) -> tuple[pd.DataFrame | dict | None, list[tuple]]:
        """A `write_later` item's rows (at most the `rows` handed over) and the images picked to keep."""
        built = later.build()
        if built is None:
            return None, []
        rows, raw = built
        if _length(rows) > later.rows:
            rows, raw = _head(rows, later.rows), raw and raw[: later.rows]
        return rows, self._pick(rows, raw) if raw is not None and self.sample_images > 0 else []

    def _write_rows(self, table: pa.Table) -> None:
        try:
            _write_table(self.fs, self.root, table)
        except Exception as exc:  # noqa: BLE001 - a failing sink is counted and retried with the next batch
            self._count_error(exc, len(table))
            return
        with self._cond:
            self._stats["rows_written"] += len(table)
            self._stats["files"] += 1

    def _keep_samples(self, picked: list[tuple]) -> None:
        now = datetime.now(timezone.utc)
        for _, request_id, row, data in picked:
            try:
                kept.write_sample(self.fs, self.root, now, request_id, row, data)
            except Exception as exc:  # noqa: BLE001
                self._count_error(exc)
                continue
            with self._cond:
                self._stats["samples_written"] += 1
        if self.sample_images > 0 and (picked or time.monotonic() - self._pruned_at >= PRUNE_EVERY_S):
            self._pruned_at = time.monotonic()
            try:
                kept.prune(self.fs, self.root, self.sample_max_images, self.sample_retention_days)
            except Exception as exc:  # noqa: BLE001
                self._count_error(exc)

    def _count_error(self, exc: Exception, rows: int = 0) -> None:
        with self._cond:
            self._stats["write_errors"] += 1
            self._stats["rows_dropped"] += rows
            self._stats["last_error"] = f"{type(exc).__name__}: {exc}"

    def _report(self) -> None:
        """Warn (at most once a minute) when rows were dropped or writes failed since the last warning, and
        rewrite this process's status file (best effort: the sink may be what fails)."""
        with self._cond:
            stats, queued = dict(self._stats), self._rows
        trouble = (stats["write_errors"], stats["rows_dropped"])
        if trouble != self._warned and time.monotonic() - self._warned_at >= WARN_EVERY_S:
            log.warning("inference log %s: %d failed writes and %d dropped rows so far (last error: %s)",
                        self.uri, *trouble, stats["last_error"] or "none: the queue was full")
            self._warned_at, self._warned = time.monotonic(), trouble
        status = {"host": socket.gethostname(), "pid": self._pid, "uri": self.uri,
                  "updated": datetime.now(timezone.utc).isoformat(), "rows_queued": queued, **stats}
        try:
            self.fs.create_dir(f"{self.root}/{STATUS}", recursive=True)
            _put(self.fs, f"{self.root}/{STATUS}/{self._name}.json", (json.dumps(status, indent=1) + "\n").encode())
        except Exception:  # noqa: BLE001 - best effort: the counters stay in `stats` and the warning
            pass
