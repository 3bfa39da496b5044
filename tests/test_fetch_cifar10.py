"""`visionops.data.fetch` and the cifar10 source against a real loopback HTTP server."""

from __future__ import annotations

import hashlib
import http.server
import pickle
import socket
import threading
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from cifar_archive import write_cifar10_archive
from PIL import Image

from visionops.config import DataConfig
from visionops.data.fetch import DownloadError, _BrokenArchive, check_archive, fetch
from visionops.data.images import array_to_canonical
from visionops.data.sources import load_source
from visionops.data.sources.cifar10 import read_archive

pytestmark = pytest.mark.network

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
NAME = "cifar-10-python.tar.gz"


class _Handler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args) -> None:  # keep test output quiet
        pass

    def do_GET(self) -> None:
        state: LoopbackServer = self.server.state
        name = self.path.lstrip("/")
        state.requests[name] += 1
        plan = state.plans.get(name, ["ok"])
        mode = plan.pop(0) if len(plan) > 1 else plan[0]  # the last behaviour repeats
        body = state.files.get(name)
        if body is None or mode == "404":
            self.send_error(404)
            return
        if mode == "503":
            self.send_error(503)
            return
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        if not mode.startswith("nolength"):
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if mode in ("ok", "nolength"):
            self.wfile.write(body)
            return
        if mode == "nolength-cut":  # HTTP/1.0 with no length: closing early looks like a whole body
            self.wfile.write(body[: len(body) * 9 // 10])
            return
        self.wfile.write(body[: len(body) // 2])
        self.wfile.flush()
        if mode == "drop":  # close the socket mid-body
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
        elif mode == "stall":  # hold the connection open without sending the rest
            state.release.wait(5)


class LoopbackServer:
    """Serves `files` by name; `plans[name]` lists per-request behaviours: ok, drop, stall, 404, 503,
    nolength (the whole body without Content-Length) and nolength-cut (90% of it, then close)."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.plans: dict[str, list[str]] = {}
        self.requests: Counter[str] = Counter()
        self.release = threading.Event()
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self.httpd.state = self
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/{name}"

    def serve(self, name: str, body: bytes, *plan: str) -> str:
        self.files[name] = body
        self.plans[name] = list(plan or ["ok"])
        return self.url(name)


@pytest.fixture
def server():
    srv = LoopbackServer()
    srv.thread.start()
    yield srv
    srv.release.set()
    srv.httpd.shutdown()
    srv.httpd.server_close()


def md5_of(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def listing(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir()) if d.exists() else []


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny archive in the official format: 20 train and 10 test random images."""
    rng = np.random.default_rng(0)
    train = rng.integers(0, 256, (20, 32, 32, 3), dtype=np.uint8)
    test = rng.integers(0, 256, (10, 32, 32, 3), dtype=np.uint8)
    train[7, 3, 5] = (10, 20, 30)  # a known pixel at row 3, column 5 of train image 7
    train_labels = rng.integers(0, 10, 20)
    test_labels = rng.integers(0, 10, 10)
    path = write_cifar10_archive(
        tmp_path_factory.mktemp("archive") / NAME, train, train_labels, test, test_labels, CLASSES
    )
    return {"path": path, "bytes": path.read_bytes(), "train": train, "test": test,
            "train_labels": train_labels, "test_labels": test_labels}


def cifar_cfg(url: str, md5: str, cache: Path, **kw) -> DataConfig:
    return DataConfig(source="cifar10", url=url, md5=md5, cache_dir=str(cache), **kw)


def test_cifar10_download_verify_parse(server, tiny, tmp_path):
    url = server.serve(NAME, tiny["bytes"])
    cache = tmp_path / "cache"
    data = load_source(cifar_cfg(url, md5_of(tiny["bytes"]), cache, image_size=32, channels=3))

    assert listing(cache) == [NAME] and (cache / NAME).read_bytes() == tiny["bytes"]
    assert data.class_names == CLASSES and data.rejected == []
    train, test = data.splits["train"], data.splits["test"]
    assert set(data.splits) == {"train", "test"}
    assert train.images.shape == (20, 32, 32, 3) and test.images.shape == (10, 32, 32, 3)
    assert train.images.dtype == np.uint8 and train.labels.dtype == np.int64
    assert train.images[7, 3, 5].tolist() == [10, 20, 30]
    np.testing.assert_array_equal(train.images, tiny["train"])
    np.testing.assert_array_equal(test.images, tiny["test"])
    np.testing.assert_array_equal(train.labels, tiny["train_labels"])
    np.testing.assert_array_equal(test.labels, tiny["test_labels"])
    assert train.paths[:5] == ["data_batch_1:0", "data_batch_1:1", "data_batch_1:2", "data_batch_1:3", "data_batch_2:0"]
    assert train.paths[7] == "data_batch_2:3" and test.paths[-1] == "test_batch:9"
    assert train.orig_shapes == [(32, 32, 3)] * 20

    load_source(cifar_cfg(url, md5_of(tiny["bytes"]), cache))  # cached and verified: not fetched again
    assert server.requests[NAME] == 1


def test_checksum_mismatch_leaves_nothing(server, tmp_path):
    body = b"x" * 5000
    url = server.serve("f.bin", body)
    wrong = "0" * 32
    with pytest.raises(DownloadError) as err:
        fetch(url, tmp_path / "d" / "f.bin", wrong, retries=3, backoff=0.01)
    msg = str(err.value)
    assert url in msg and f"expected {wrong}" in msg and f"got {md5_of(body)}" in msg
    assert server.requests["f.bin"] == 1  # a mismatch is not retried
    assert listing(tmp_path / "d") == []


def test_dropped_connection_every_time_fails_after_retries(server, tmp_path):
    url = server.serve("f.bin", bytes(range(256)) * 400, "drop")
    with pytest.raises(DownloadError) as err:
        fetch(url, tmp_path / "f.bin", None, retries=2, backoff=0.01)
    assert url in str(err.value) and "3 attempt" in str(err.value)
    assert server.requests["f.bin"] == 3
    assert listing(tmp_path) == []


def test_dropped_once_then_served_succeeds(server, tmp_path):
    body = bytes(range(256)) * 400
    url = server.serve("f.bin", body, "drop", "ok")
    dest = fetch(url, tmp_path / "f.bin", md5_of(body), retries=2, backoff=0.01)
    assert dest.read_bytes() == body and server.requests["f.bin"] == 2
    assert listing(tmp_path) == ["f.bin"]


def test_stalled_connection_times_out_and_retries(server, tmp_path):
    url = server.serve("f.bin", b"y" * 10000, "stall")
    with pytest.raises(DownloadError, match="2 attempt"):
        fetch(url, tmp_path / "f.bin", None, retries=1, backoff=0.01, timeout=0.2)
    assert server.requests["f.bin"] == 2 and listing(tmp_path) == []


def test_404_is_not_retried(server, tmp_path):
    url = server.url("missing.bin")
    with pytest.raises(DownloadError, match="1 attempt.*404"):
        fetch(url, tmp_path / "m.bin", None, retries=3, backoff=0.01)
    assert server.requests["missing.bin"] == 1 and listing(tmp_path) == []


def test_5xx_is_retried(server, tmp_path):
    url = server.serve("f.bin", b"z", "503")
    with pytest.raises(DownloadError, match="3 attempt.*503"):
        fetch(url, tmp_path / "f.bin", None, retries=2, backoff=0.01)
    assert server.requests["f.bin"] == 3 and listing(tmp_path) == []


def test_verified_file_not_refetched_but_corrupt_one_is(server, tmp_path):
    body = b"hello" * 1000
    url = server.serve("f.bin", body)
    dest = tmp_path / "f.bin"
    fetch(url, dest, md5_of(body))
    fetch(url, dest, md5_of(body))
    assert server.requests["f.bin"] == 1
    dest.write_bytes(b"stale")
    assert fetch(url, dest, md5_of(body)).read_bytes() == body
    assert server.requests["f.bin"] == 2 and listing(tmp_path) == ["f.bin"]


def test_file_url_and_local_path(tmp_path):
    src = tmp_path / "mirror" / "f.bin"
    src.parent.mkdir()
    src.write_bytes(b"mirror" * 100)
    good = md5_of(src.read_bytes())
    assert fetch(src.as_uri(), tmp_path / "a" / "f.bin", good).read_bytes() == src.read_bytes()
    assert fetch(str(src), tmp_path / "b" / "f.bin", good).read_bytes() == src.read_bytes()
    with pytest.raises(DownloadError, match="expected 0{32}"):
        fetch(str(src), tmp_path / "c" / "f.bin", "0" * 32)
    with pytest.raises(DownloadError, match="1 attempt.*FileNotFoundError"):
        fetch(str(tmp_path / "nope.bin"), tmp_path / "c" / "f.bin", None, retries=3)
    assert listing(tmp_path / "c") == []


def test_channels_and_resize(server, tiny, tmp_path):
    url = server.serve(NAME, tiny["bytes"])
    md5 = md5_of(tiny["bytes"])
    grey = load_source(cifar_cfg(url, md5, tmp_path, image_size=32, channels=1)).splits["train"]
    assert grey.images.shape == (20, 32, 32, 1) and grey.images.dtype == np.uint8
    pil_l = np.stack([np.asarray(Image.fromarray(img).convert("L")) for img in tiny["train"]])
    np.testing.assert_array_equal(grey.images[..., 0], pil_l)

    for channels in (1, 3):
        small = load_source(cifar_cfg(url, md5, tmp_path, image_size=16, channels=channels)).splits
        assert small["train"].images.shape == (20, 16, 16, channels)
        assert small["test"].images.shape == (10, 16, 16, channels)
        expected = np.stack([array_to_canonical(img, 16, channels) for img in tiny["test"]])
        np.testing.assert_array_equal(small["test"].images, expected)
        assert small["train"].orig_shapes[0] == (32, 32, 3)
    assert server.requests[NAME] == 1


def test_malformed_archives(tiny, tmp_path):
    args = (tiny["train"], tiny["train_labels"], tiny["test"], tiny["test_labels"], CLASSES)

    missing = write_cifar10_archive(tmp_path / "missing.tar.gz", *args, batches=4)
    with pytest.raises(ValueError, match=r"missing\.tar\.gz.*data_batch_5"):
        read_archive(missing)

    bad = pickle.dumps({b"data": np.zeros((10, 100), np.uint8), b"labels": [0] * 10})
    shape = write_cifar10_archive(tmp_path / "shape.tar.gz", *args, members={"test_batch": bad})
    with pytest.raises(ValueError, match=r"shape\.tar\.gz.*test_batch.*\(10, 100\)"):
        read_archive(shape)

    evil = pickle.dumps({b"data": Path("/")})  # any non-numpy global is refused, never called
    refused = write_cifar10_archive(tmp_path / "evil.tar.gz", *args, members={"data_batch_3": evil})
    with pytest.raises(ValueError, match=r"evil\.tar\.gz.*data_batch_3.*refusing"):
        read_archive(refused)

    not_tar = tmp_path / "junk.tar.gz"
    not_tar.write_bytes(b"not an archive")
    with pytest.raises(ValueError, match=r"junk\.tar\.gz"):
        read_archive(not_tar)


def test_archive_cut_short_without_length_or_md5_is_not_cached(server, tiny, tmp_path):
    url = server.serve(NAME, tiny["bytes"], "nolength-cut")
    cache = tmp_path / "cache"
    cfg = cifar_cfg(url, "", cache, download_retries=1)
    with pytest.raises(DownloadError) as err:
        load_source(cfg)
    msg = str(err.value)
    assert url in msg and "2 attempt" in msg and f"{NAME} does not read to its end" in msg
    assert server.requests[NAME] == 2 and listing(cache) == []

    server.plans[NAME] = ["nolength"]  # the server is fixed: the next run downloads again
    data = load_source(cfg)
    assert server.requests[NAME] == 3 and listing(cache) == [NAME]
    assert (cache / NAME).read_bytes() == tiny["bytes"]
    np.testing.assert_array_equal(data.splits["train"].labels, tiny["train_labels"])


def test_cut_archive_left_by_an_older_version_is_fetched_again(server, tiny, tmp_path):
    url = server.serve(NAME, tiny["bytes"], "nolength")
    (tmp_path / NAME).write_bytes(tiny["bytes"][:-10])  # only the gzip trailer (CRC, length) is missing
    assert fetch(url, tmp_path / NAME, None).read_bytes() == tiny["bytes"]
    assert server.requests[NAME] == 1
    fetch(url, tmp_path / NAME, None)  # whole now: reused
    assert server.requests[NAME] == 1


@pytest.mark.parametrize("name", ["a.tar", "a.tar.gz", "a.tgz", "a.gz", "a.tar.bz2", "a.tar.xz", "a.zip"])
def test_check_archive_catches_every_cut(tiny, tmp_path, name):
    import io
    import shutil
    import tarfile

    src = tmp_path / "src"
    src.mkdir()
    (src / "x.bin").write_bytes(np.random.default_rng(0).integers(0, 256, 30000, dtype=np.uint8).tobytes())
    whole = tmp_path / name
    if name.endswith(".zip"):
        shutil.make_archive(str(tmp_path / "a"), "zip", src)
    elif name == "a.gz":
        import gzip

        whole.write_bytes(gzip.compress((src / "x.bin").read_bytes()))
    else:
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tar:
            tar.add(src / "x.bin", arcname="x.bin")
        data = buf.getvalue()
        compress = {".bz2": "bz2", ".xz": "lzma", ".gz": "gzip", ".tgz": "gzip"}.get(whole.suffix)
        whole.write_bytes(__import__(compress).compress(data) if compress else data)
    check_archive(whole)
    body = whole.read_bytes()
    for cut in (len(body) // 2, len(body) - 1):
        broken = tmp_path / "cut" / name
        broken.parent.mkdir(exist_ok=True)
        broken.write_bytes(body[:cut])
        with pytest.raises(_BrokenArchive, match=f"{name} does not read to its end"):
            check_archive(broken)


def test_official_test_split_is_kept_and_holdout_val_come_from_train(server, tiny, tmp_path):
    from visionops.data import dataset
    from visionops.data.download import run_download

    url = server.serve(NAME, tiny["bytes"])
    cfg = cifar_cfg(url, md5_of(tiny["bytes"]), tmp_path / "cache", channels=3, holdout_fraction=0.2, val_fraction=0.2)
    summary = run_download(cfg, tmp_path / "ds", tmp_path / "holdout")
    ds, holdout = dataset.load(tmp_path / "ds"), dataset.load(tmp_path / "holdout")
    assert ds.splits["test"].paths == [f"test_batch:{i}" for i in range(10)]
    carved = [*ds.splits["train"].paths, *ds.splits["val"].paths, *holdout.splits["holdout"].paths]
    assert sorted(carved) == sorted(f"data_batch_{b}:{i}" for b in range(1, 6) for i in range(4))
    assert summary["splits"]["holdout"] == len(holdout.splits["holdout"]) > 0 and len(ds.splits["val"]) > 0


def _with_members(src: Path, dest: Path, extra: list[tuple[str, bytes, str | None]], drop: str = "") -> Path:
    """A copy of the archive `src` plus `extra` members (name, bytes, symlink target or None), less `drop`."""
    import io
    import tarfile

    with tarfile.open(src) as old, tarfile.open(dest, "w:gz") as new:
        for member in old.getmembers():
            if member.name != drop:
                new.addfile(member, old.extractfile(member) if member.isfile() else None)
        for name, data, target in extra:
            info = tarfile.TarInfo(name)
            if target is None:
                info.size = len(data)
                new.addfile(info, io.BytesIO(data))
            else:
                info.type, info.linkname = tarfile.SYMTYPE, target
                new.addfile(info)
    return dest


def test_archive_members_never_reach_the_disk(tiny, tmp_path, monkeypatch):
    """The cifar10 source reads members in memory: a member named ../x, an absolute one or a symlink is never
    extracted; a batch that is a symlink (or a second copy) is refused naming the member."""
    work = tmp_path / "work" / "deep"
    work.mkdir(parents=True)
    monkeypatch.chdir(work)
    escape = [("../../escaped.txt", b"x", None), (str(tmp_path / "absolute.txt"), b"x", None),
              ("cifar-10-batches-py/link", b"", str(tmp_path / "outside"))]
    archive = _with_members(tiny["path"], tmp_path / "escape.tar.gz", escape)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    cfg = cifar_cfg(str(archive), md5_of(archive.read_bytes()), tmp_path / "cache", image_size=32, channels=3)
    src = load_source(cfg)
    np.testing.assert_array_equal(src.splits["train"].images, tiny["train"])
    made = sorted(set(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) - set(before))
    assert made == [Path("cache"), Path("cache/escape.tar.gz")]  # the verified copy, and nothing else

    batch = "cifar-10-batches-py/data_batch_2"
    linked = _with_members(tiny["path"], tmp_path / "linked.tar.gz", [(batch, b"", "/etc/passwd")], drop=batch)
    with pytest.raises(ValueError, match=r"linked\.tar\.gz: member cifar-10-batches-py/data_batch_2 is not a single"):
        read_archive(linked)
