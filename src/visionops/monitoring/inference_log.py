"""The inference log's files: Parquet, one folder per UTC day (`<uri>/day=YYYY-MM-DD/`), local or on S3.

Each write is one new file, made visible whole (locally a temporary name then a rename; on S3 one PUT), so
a reader never sees a half-written file and a crash loses only what was not yet written.
"""

from __future__ import annotations

import os
import uuid
from datetime import datetime, timezone

import pandas as pd
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from visionops.errors import InvalidInputError
from visionops.monitoring.log_schema import PARTITION, SCHEMA


def filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path) of a log location: a local directory or s3://bucket/prefix (the endpoint from
    AWS_ENDPOINT_URL or MLFLOW_S3_ENDPOINT_URL, the keys from the usual AWS variables)."""
    if uri.startswith("s3://"):
        endpoint = os.environ.get("AWS_ENDPOINT_URL") or os.environ.get("MLFLOW_S3_ENDPOINT_URL")
        fs = pafs.S3FileSystem(endpoint_override=endpoint, region=os.environ.get("AWS_DEFAULT_REGION", "us-east-1"),
                               allow_bucket_creation=False)
        return fs, uri[len("s3://"):].rstrip("/")
    if "://" in uri:
        raise InvalidInputError(f"monitor.log_uri: {uri!r} is neither a local directory nor s3://bucket/prefix")
    return pafs.LocalFileSystem(), os.path.abspath(uri)


def to_table(frame: pd.DataFrame) -> pa.Table:
    """The log's Arrow table of rows with the schema's columns (missing ones null; extra ones are an error)."""
    extra = set(frame.columns) - set(SCHEMA.names)
    if extra:
        raise InvalidInputError(f"inference log rows: unknown columns {sorted(extra)}")
    n = len(frame)
    arrays = [pa.array(frame[f.name], type=f.type, from_pandas=True) if f.name in frame.columns else pa.nulls(n, f.type)
              for f in SCHEMA]
    return pa.Table.from_arrays(arrays, schema=SCHEMA)


def write_file(uri: str, table: pa.Table, when: datetime | None = None) -> str:
    """Write `table` as one new Parquet file in the folder of `when`'s UTC day; returns its path."""
    fs, root = filesystem(uri)
    when = when or datetime.now(timezone.utc)
    folder = f"{root}/{PARTITION}={when:%Y-%m-%d}"
    name = f"{when:%H%M%S}-{os.getpid()}-{uuid.uuid4().hex[:12]}.parquet"
    fs.create_dir(folder, recursive=True)
    if isinstance(fs, pafs.LocalFileSystem):
        tmp = f"{folder}/.{name}.tmp"  # ignored by readers (a leading dot)
        pq.write_table(table, tmp, filesystem=fs)
        os.replace(tmp, f"{folder}/{name}")
    else:
        pq.write_table(table, f"{folder}/{name}", filesystem=fs)
    return f"{folder}/{name}"


def read_log(uri: str, since: datetime | None = None, until: datetime | None = None,
             model_sha256: str | None = None) -> pd.DataFrame:
    """The log's rows with since < time <= until (either open), of one model version when given, in time order."""
    fs, root = filesystem(uri)
    try:
        info = fs.get_file_info(root)
    except OSError as exc:
        raise InvalidInputError(f"monitor.log_uri {uri!r}: cannot be read ({exc})") from exc
    if info.type == pafs.FileType.NotFound:
        return SCHEMA.empty_table().to_pandas()
    dataset = ds.dataset(root, filesystem=fs, format="parquet", schema=SCHEMA,
                         partitioning=ds.partitioning(pa.schema([(PARTITION, pa.string())]), flavor="hive"))
    cond = None
    for c in ([ds.field("time") > pa.scalar(since, pa.timestamp("us", tz="UTC"))] if since else []) + \
             ([ds.field("time") <= pa.scalar(until, pa.timestamp("us", tz="UTC"))] if until else []) + \
             ([ds.field("model_sha256") == model_sha256] if model_sha256 else []):
        cond = c if cond is None else cond & c
    table = dataset.to_table(filter=cond, columns=SCHEMA.names)
    return table.to_pandas().sort_values(["time", "request_id", "row"], kind="stable").reset_index(drop=True)


class LogWriter:
    """Appends rows to the log at `uri` without ever failing the caller: a failed write is counted in `stats`
    (and its rows dropped), never raised.

    Interface kept by every implementation: `from_settings(monitor)`, `write(frame, raw=None)` (rows with the
    schema's columns; `raw`, the encoded images as received, aligned with the rows), `close()` (writes what is
    pending), `stats` (rows_written, rows_dropped, write_errors, files, last_error).
    """

    def __init__(self, uri: str, flush_rows: int = 256, flush_seconds: float = 5.0, queue_rows: int = 100_000):
        self.uri = uri
        self.flush_rows, self.flush_seconds, self.queue_rows = flush_rows, flush_seconds, queue_rows
        self.stats = {"rows_written": 0, "rows_dropped": 0, "write_errors": 0, "files": 0, "last_error": ""}

    @classmethod
    def from_settings(cls, monitor: dict) -> LogWriter:
        """A writer to `monitor["log_uri"]` with the batching of params.yaml `monitor` (a dict of its keys)."""
        return cls(monitor["log_uri"], monitor.get("flush_rows", 256), monitor.get("flush_seconds", 5.0),
                   monitor.get("queue_rows", 100_000))

    def write(self, frame: pd.DataFrame, raw: list | None = None) -> None:
        try:
            write_file(self.uri, to_table(frame))
        except Exception as exc:  # noqa: BLE001 - a failing sink must never fail an answer
            self.stats["write_errors"] += 1
            self.stats["rows_dropped"] += len(frame)
            self.stats["last_error"] = f"{type(exc).__name__}: {exc}"
            return
        self.stats["rows_written"] += len(frame)
        self.stats["files"] += 1

    def close(self) -> None:
        """Write what is pending (nothing here: every write is immediate)."""
