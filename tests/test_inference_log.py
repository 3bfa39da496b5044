"""The inference log's writer for real: Parquet files in a temporary folder, the writer's own thread, and real
processes for the clean exit and the kill -9 (the S3 sink is tested on SeaweedFS in test_services.py)."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import yaml

from visionops.errors import InvalidInputError
from visionops.monitoring.inference_log import LogWriter, read_log, read_status

ROOT = Path(__file__).resolve().parents[1]
PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 16
JPEG = b"\xff\xd8\xff\xe0" + b"\x00" * 16


def rows(n: int, request_id: str = "r", start: int = 0) -> pd.DataFrame:
    return pd.DataFrame({"time": pd.Timestamp.now(tz="UTC"), "request_id": request_id,
                         "row": range(start, start + n), "confidence": 0.5})


def log_files(uri: Path) -> list[Path]:
    """The log's finished files (not the temporary ones, which start with a dot)."""
    return sorted(p for p in uri.glob("day=*/*.parquet") if not p.name.startswith("."))


def wait_for(condition, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_rows_are_written_in_files_of_flush_rows_and_close_writes_the_rest(tmp_path):
    writer = LogWriter(str(tmp_path / "log"), flush_rows=10, flush_seconds=3600)
    for i in range(0, 95, 7):
        writer.write(rows(min(7, 95 - i), request_id=f"q{i:03d}"))
    wait_for(lambda: writer.stats["rows_written"] == 90)
    assert len(log_files(tmp_path / "log")) == 9  # the 5 rows left wait: no timer has run out
    writer.close()
    files = log_files(tmp_path / "log")
    assert sorted(pq.read_metadata(f).num_rows for f in files) == [5] + [10] * 9  # ceil(95 / 10) files
    assert writer.stats == {"rows_written": 95, "rows_dropped": 0, "write_errors": 0, "files": 10,
                            "samples_written": 0, "last_error": ""}
    log = read_log(str(tmp_path / "log"))
    assert [(r, n) for r, n in zip(log.request_id, log.row)] == [(f"q{i:03d}", n) for i in range(0, 95, 7)
                                                                 for n in range(min(7, 95 - i))]


def test_fewer_than_flush_rows_are_written_once_flush_seconds_pass(tmp_path):
    writer = LogWriter(str(tmp_path / "log"), flush_rows=1000, flush_seconds=1.0)
    start = time.monotonic()
    writer.write(rows(3))
    assert writer.stats["rows_written"] == 0 and not log_files(tmp_path / "log")
    wait_for(lambda: writer.stats["files"] == 1)
    assert time.monotonic() - start >= 1.0
    assert len(read_log(str(tmp_path / "log"))) == 3
    writer.close()
    assert writer.stats["files"] == 1  # nothing was left to write


def test_rows_beyond_queue_rows_are_dropped_and_counted_never_raised(tmp_path):
    writer = LogWriter(str(tmp_path / "log"), flush_rows=1000, flush_seconds=3600, queue_rows=100)
    for i in range(9):
        writer.write(rows(10, request_id=f"q{i}"))
    writer.write(rows(15, request_id="q9"))  # 10 fit
    writer.write(rows(10, request_id="late"))  # none fits
    assert writer.stats["rows_dropped"] == 15
    writer.close()
    writer.write(rows(4, request_id="closed"))  # after close: dropped, counted
    assert writer.stats == {"rows_written": 100, "rows_dropped": 19, "write_errors": 0, "files": 1,
                            "samples_written": 0, "last_error": ""}
    log = read_log(str(tmp_path / "log"))
    assert len(log) == 100 and set(log.request_id) == {f"q{i}" for i in range(10)}
    assert sorted(log[log.request_id == "q9"].row) == list(range(10))


def test_a_failing_sink_is_counted_and_logged_once_and_the_writer_recovers(tmp_path, caplog):
    uri = tmp_path / "log"
    uri.write_text("a file where the log's folder should be")  # root or not, no folder can be made under it
    writer = LogWriter(str(uri), flush_rows=10, flush_seconds=3600)
    with caplog.at_level(logging.WARNING, logger="visionops.monitoring.inference_log"):
        writer.write(rows(10, request_id="lost1"))
        wait_for(lambda: writer.stats["write_errors"] == 1)
        writer.write(rows(10, request_id="lost2"))
        wait_for(lambda: writer.stats["write_errors"] == 2)
        uri.unlink()
        writer.write(rows(10, request_id="kept"))
        wait_for(lambda: writer.stats["rows_written"] == 10)
        writer.close()
    stats = writer.stats
    assert stats["rows_dropped"] == 20 and stats["files"] == 1 and stats["last_error"]
    warnings = [r for r in caplog.records if r.name == "visionops.monitoring.inference_log"]
    assert len(warnings) == 1 and "1 failed writes" in warnings[0].getMessage(), warnings  # one a minute, not per batch
    assert set(read_log(str(uri)).request_id) == {"kept"}
    [status] = read_status(str(uri))  # written once the folder could be made again: the sink's history
    assert status["pid"] == os.getpid() and status["write_errors"] == 2 and status["rows_dropped"] == 20


def test_s3_down_is_counted_never_raised_nor_waited_for(tmp_path, monkeypatch):
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "nobody")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "nothing")
    writer = LogWriter("s3://inference/log", flush_rows=10, flush_seconds=3600)
    start = time.monotonic()
    for i in range(3):
        writer.write(rows(10, request_id=f"q{i}"))
    assert time.monotonic() - start < 1.0  # handed over, not written
    writer.close()
    stats = writer.stats
    assert stats["rows_written"] == 0 and stats["rows_dropped"] == 30 and stats["write_errors"] == 3, stats
    assert "127.0.0.1" in stats["last_error"] or "connect" in stats["last_error"].lower(), stats["last_error"]


def test_readers_never_see_a_temporary_file_nor_the_status_and_samples(tmp_path):
    uri = str(tmp_path / "log")
    writer = LogWriter(uri, flush_rows=5, flush_seconds=3600, sample_images=1.0)
    done = threading.Event()

    def produce():
        for i in range(200):
            writer.write(rows(5, request_id=f"q{i:03d}"), raw=[PNG] * 5)
        writer.close()
        done.set()

    threading.Thread(target=produce).start()
    seen = []
    while not done.is_set():
        seen.append(len(read_log(uri)))  # raises on a partial or foreign file
    assert seen == sorted(seen) and all(n % 5 == 0 for n in seen) and len(set(seen)) > 1, seen
    assert len(read_log(uri)) == 1000
    assert (tmp_path / "log" / "_status").is_dir() and (tmp_path / "log" / "samples").is_dir()
    [status] = read_status(uri)
    assert status["rows_written"] == 1000 and status["files"] == 200 and status["samples_written"] == 1000


def test_read_log_filters_by_time_and_model(tmp_path):
    uri = str(tmp_path / "log")
    day = datetime(2026, 1, 2, 12, tzinfo=timezone.utc)
    frame = pd.DataFrame({"time": [day - timedelta(days=1), day, day + timedelta(hours=1)], "request_id": "r",
                          "row": [0, 1, 2], "model_sha256": ["a", "b", "a"]})
    from visionops.monitoring.inference_log import to_table, write_file

    write_file(uri, to_table(frame.iloc[:1]), when=day - timedelta(days=1))  # a folder per day
    write_file(uri, to_table(frame.iloc[1:]), when=day + timedelta(hours=2))
    assert list(read_log(uri).row) == [0, 1, 2]
    assert list(read_log(uri, since=day - timedelta(hours=1)).row) == [1, 2]
    assert list(read_log(uri, since=day - timedelta(days=2), until=day).row) == [0, 1]
    assert list(read_log(uri, model_sha256="a").row) == [0, 2]
    assert read_log(str(tmp_path / "none")).empty


def test_sampled_images_are_kept_by_their_bytes_kind_beside_their_row(tmp_path):
    uri = tmp_path / "log"
    writer = LogWriter(str(uri), flush_rows=100, flush_seconds=3600, sample_images=1.0)
    writer.write(rows(4, request_id="req/1"), raw=[PNG, JPEG, b"GIF89a...", None])
    writer.write(rows(2, request_id="req2"))  # no bytes: nothing to keep
    writer.close()
    today = datetime.now(timezone.utc).strftime("%Y-%m-%d")
    folder = uri / "samples" / f"day={today}"
    assert sorted(p.name for p in folder.iterdir()) == ["req_1-0.png", "req_1-1.jpg", "req_1-2.bin"]
    assert (folder / "req_1-0.png").read_bytes() == PNG and (folder / "req_1-1.jpg").read_bytes() == JPEG
    assert writer.stats["samples_written"] == 3 and len(read_log(str(uri))) == 6


def test_a_fraction_of_the_images_is_kept(tmp_path):
    writer = LogWriter(str(tmp_path / "log"), flush_rows=1000, flush_seconds=3600, sample_images=0.25)
    writer.write(rows(400), raw=[PNG] * 400)
    writer.close()
    kept = list((tmp_path / "log" / "samples").glob("day=*/*.png"))
    assert 50 <= len(kept) <= 150 and writer.stats["samples_written"] == len(kept)  # mean 100, sd 8.7


def test_the_oldest_samples_go_beyond_the_count_and_the_age(tmp_path):
    uri = tmp_path / "log"
    old, recent = uri / "samples" / "day=2020-01-01" / "old-0.png", uri / "samples" / "day=2020-02-01" / "recent-0.png"
    for path, days in ((old, 40), (recent, 10)):
        path.parent.mkdir(parents=True)
        path.write_bytes(PNG)
        stamp = time.time() - days * 86400
        os.utime(path, (stamp, stamp))
    writer = LogWriter(str(uri), flush_rows=3, flush_seconds=3600, sample_images=1.0, sample_max_images=4,
                       sample_retention_days=30)
    writer.write(rows(1, request_id="new"), raw=[PNG])
    writer.close()
    assert not old.exists() and not old.parent.exists() and recent.exists()  # older than 30 days: gone

    writer = LogWriter(str(uri), flush_rows=3, flush_seconds=3600, sample_images=1.0, sample_max_images=5)
    for k in range(4):
        writer.write(rows(3, request_id=f"b{k}"), raw=[PNG] * 3)
        wait_for(lambda k=k: writer.stats["samples_written"] == 3 * (k + 1))
        time.sleep(0.02)  # distinct modification times between batches
    writer.close()
    names = {p.stem for p in (uri / "samples").glob("day=*/*.png")}
    assert len(names) == 5 and {"b3-0", "b3-1", "b3-2"} <= names and len(names & {"b2-0", "b2-1", "b2-2"}) == 2, names


def test_from_settings_builds_the_writer_of_the_monitor_section(tmp_path):
    monitor = yaml.safe_load((ROOT / "params.yaml").read_text())["monitor"]
    writer = LogWriter.from_settings({**monitor, "log_uri": str(tmp_path / "log")})
    assert (writer.uri, writer.flush_rows, writer.flush_seconds, writer.queue_rows) == (
        str(tmp_path / "log"), monitor["flush_rows"], monitor["flush_seconds"], monitor["queue_rows"])
    assert (writer.sample_images, writer.sample_max_images, writer.sample_retention_days) == (
        monitor["sample_images"], monitor["sample_max_images"], monitor["sample_retention_days"])
    writer.close()
    assert LogWriter.from_settings({**monitor, "log_uri": None}) is None
    assert LogWriter.from_settings({"log_uri": ""}) is None
    with pytest.raises(InvalidInputError, match="flush_rows"):
        LogWriter.from_settings({"log_uri": str(tmp_path / "log"), "flush_rows": 0})
    with pytest.raises(InvalidInputError, match="log_uri"):
        LogWriter.from_settings({"log_uri": "gs://bucket/log"})


def test_a_forked_child_writes_through_its_own_thread(tmp_path):
    """A server that forks workers after loading the model: the child has no writer thread of its parent's."""
    writer = LogWriter(str(tmp_path / "log"), flush_rows=1000, flush_seconds=3600)
    writer.write(rows(3, request_id="parent"))  # the parent's thread is running
    pid = os.fork()
    if pid == 0:  # the child
        code = 1
        try:
            writer.write(rows(4, request_id="child"))
            writer.close()
            code = 0 if writer.stats["rows_written"] == 4 else 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    writer.close()
    log = read_log(str(tmp_path / "log"))
    assert sorted(log.request_id) == ["child"] * 4 + ["parent"] * 3 and writer.stats["rows_written"] == 3


def _child_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}


def test_a_clean_exit_writes_what_is_pending(tmp_path):
    script = ("import sys, pandas as pd\nfrom visionops.monitoring.inference_log import LogWriter\n"
              "w = LogWriter(sys.argv[1], flush_rows=1000, flush_seconds=3600)\n"
              "w.write(pd.DataFrame({'time': pd.Timestamp.now(tz='UTC'), 'request_id': 'x', 'row': range(5)}))\n")
    subprocess.run([sys.executable, "-c", script, str(tmp_path / "log")], env=_child_env(), check=True, timeout=120)
    assert len(read_log(str(tmp_path / "log"))) == 5  # the atexit hook closed the writer


KILLED = """
import sys, time, pandas as pd
from visionops.monitoring.inference_log import LogWriter
w = LogWriter(sys.argv[1], flush_rows=int(sys.argv[2]), flush_seconds=3600)
n = 0
while True:
    w.write(pd.DataFrame({"time": pd.Timestamp.now(tz="UTC"), "request_id": f"{n // 10:08d}", "row": range(10)}))
    n += 10
    print(n, flush=True)
    time.sleep(0.005)
"""


def test_a_kill_9_loses_at_most_the_unflushed_batch_and_leaves_only_whole_files(tmp_path):
    uri, flush_rows = tmp_path / "log", 50
    proc = subprocess.Popen([sys.executable, "-c", KILLED, str(uri), str(flush_rows)], env=_child_env(),
                            stdout=subprocess.PIPE, text=True)
    try:
        handed = 0
        while handed < 2980:  # not a multiple of flush_rows: a batch is pending when the kill comes
            line = proc.stdout.readline()
            assert line, f"the writer exited with {proc.poll()}"
            handed = int(line)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
    files = log_files(uri)
    assert all(pq.read_metadata(f).num_rows == flush_rows for f in files)  # whole batches, each readable
    log = read_log(str(uri))
    seq = sorted(int(r) * 10 + n for r, n in zip(log.request_id, log.row))
    assert seq == list(range(len(seq)))  # the first rows handed over, none missing, none twice
    assert len(seq) >= handed - flush_rows, (len(seq), handed)
    print(f"kill -9 after {handed} rows handed over: {len(seq)} rows in {len(files)} files")


@pytest.mark.slow
def test_a_served_model_killed_with_sigkill_loses_at_most_its_unflushed_batch(store, tmp_path, monkeypatch):
    """The real `mlflow models serve` of a registered classifier with the log on answers 13 requests of 5
    images; once its writer has written the whole batches (off the request path), the server is killed with
    SIGKILL: the log holds every answered row but the ones of the unflushed batch (65 = 4 x 16 + 1)."""
    import mlflow
    import psutil
    from conftest import corner_images, train_quickly
    from model_server import model_server, post

    from visionops.config import MonitorConfig
    from visionops.data import dataset
    from visionops.monitoring import reference
    from visionops.serving.pyfunc import encode_png
    from visionops.tasks import get_task
    from visionops.tasks.classification import classifier

    classes = ["top_left", "top_right", "bottom"]
    rng = np.random.default_rng(0)
    splits = {}
    for name, n in {"train": 60, "val": 24, "test": 6}.items():
        labels = np.arange(n) % 3
        splits[name] = dataset.Split(corner_images(labels, rng), labels, [f"{name}/{i}.png" for i in range(n)])
    dataset.save(dataset.Dataset(classes, splits, "synthetic"), tmp_path / "ds")
    model = train_quickly("lenet", classes, splits["train"], seed=0, steps=5)
    classifier.save(tmp_path / "model.pt", model, "lenet", classes, (16, 16, 1))
    log, flush_rows, requests, per_request = tmp_path / "log", 16, 13, 5
    settings = MonitorConfig(log_uri=str(log), flush_rows=flush_rows, flush_seconds=3600, embedding_dim=8).model_dump()
    with mlflow.start_run():
        profile = reference.build("classification", tmp_path / "model.pt", tmp_path / "ds", settings, tmp_path / "profile", "served")
        version = get_task("classification").log_model(tmp_path / "model.pt", "served", {}, None, profile)
    monkeypatch.delenv("VISIONOPS_LOG_URI", raising=False)  # the registered settings decide
    payload = {"dataframe_split": {"columns": ["image"],
                                   "data": [[encode_png(im)] for im in splits["val"].images[:per_request]]}}
    with model_server(f"models:/served/{version.version}", store, tmp_path) as base:
        for _ in range(requests):
            status, body = post(f"{base}/invocations", payload)
            assert status == 200 and [p["error"] for p in body["predictions"]] == [""] * per_request, body
        answered = requests * per_request
        wait_for(lambda: len(log_files(log)) == answered // flush_rows, timeout=60)
        port = int(base.rsplit(":", 1)[1])
        [server] = {c.pid for c in psutil.net_connections("tcp") if c.laddr.port == port and c.status == psutil.CONN_LISTEN}
        os.killpg(os.getpgid(server), signal.SIGKILL)
        psutil.wait_procs([psutil.Process(server)], timeout=30)
        assert not psutil.pid_exists(server) or psutil.Process(server).status() == psutil.STATUS_ZOMBIE
    assert all(pq.read_metadata(f).num_rows == flush_rows for f in log_files(log))
    rows = read_log(str(log))
    assert len(rows) == answered - answered % flush_rows >= answered - flush_rows
    per_id = rows.groupby("request_id", sort=False)["row"].apply(list).tolist()  # in time order
    assert per_id == [list(range(per_request))] * (requests - 1) + [list(range(per_request - 1))]
    assert (rows["error"] == "").all() and rows["model_sha256"].notna().all()
