"""Download a file over HTTP(S), or copy a local one, with retries and MD5 verification.

The bytes go to a temporary file beside `dest` that is renamed onto it only once complete: its
length matches Content-Length when the server sends one, its MD5 matches when one is given, and,
for a .tar/.tgz/.tar.gz/.gz/.bz2/.xz/.zip name, the archive reads to its end (compression CRCs
and every tar member). So `dest` is either absent or whole, even with no length and no checksum.
"""

from __future__ import annotations

import bz2
import gzip
import hashlib
import http.client
import lzma
import tarfile
import time
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from pathlib import Path
from typing import BinaryIO

from tqdm import tqdm

from visionops.atomic import atomic_path
from visionops.errors import VisionopsError

CHUNK = 1 << 20
MAX_BACKOFF = 60.0


class DownloadError(VisionopsError):
    """A download failed for good; the message names the URL, the attempts and the cause."""


class _ShortRead(Exception):
    """The bytes received differ from the Content-Length announced."""


class _ChecksumMismatch(Exception):
    """The bytes arrived whole but their MD5 is not the expected one."""


class _BrokenArchive(Exception):
    """The file does not read to its end as the archive its name says (e.g. cut short)."""


_FAILURES = (OSError, http.client.HTTPException, _ShortRead, _ChecksumMismatch, _BrokenArchive)
_DECOMPRESS = {".gz": gzip.open, ".tgz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}


def file_md5(path: Path | str) -> str:
    """The hex MD5 of a file (hashlib reads it in chunks)."""
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "md5").hexdigest()


class _Counted:
    """A read-only stream that counts the bytes read through it."""

    def __init__(self, fh: BinaryIO) -> None:
        self.fh, self.count = fh, 0

    def read(self, size: int = -1) -> bytes:
        data = self.fh.read(size)
        self.count += len(data)
        return data


def _read_tar(stream: _Counted) -> None:
    """Walk every member's data, then check that the end-of-archive blocks follow the last one."""
    end = 0
    with tarfile.open(fileobj=stream, mode="r|") as tar:
        for member in tar:
            if member.isfile():
                data = tar.extractfile(member)
                while data.read(CHUNK):
                    pass
            end = member.offset_data + -(-member.size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
        while stream.read(CHUNK):
            pass
    if stream.count % tarfile.BLOCKSIZE or stream.count - end < 2 * tarfile.BLOCKSIZE:
        raise tarfile.ReadError(f"no end-of-archive marker ({stream.count} bytes, last member ends at {end})")


def check_archive(path: Path | str, name: str | None = None) -> None:
    """Read the archive at `path` to its end, as its file `name` says; raise _BrokenArchive if it is cut or corrupt.

    Compressed streams are decompressed to the end, which checks their CRC and length trailers;
    tar archives are walked member by member up to their end-of-archive marker; zip archives have
    every member's CRC tested. Files with other names are not checked.
    """
    name = (name or Path(path).name).lower()
    suffix = Path(name).suffix
    opener = _DECOMPRESS.get(suffix)
    is_tar = suffix in (".tar", ".tgz") or Path(name).stem.endswith(".tar")
    try:
        if suffix == ".zip":
            with zipfile.ZipFile(path) as zf:
                bad = zf.testzip()
            if bad is not None:
                raise zipfile.BadZipFile(f"member {bad} fails its CRC")
        elif opener is not None or is_tar:
            with opener(path, "rb") if opener else open(path, "rb") as fh:
                stream = _Counted(fh)
                if is_tar:
                    _read_tar(stream)
                while stream.read(CHUNK):  # to the end, so a compressed stream's trailer is checked
                    pass
    except (OSError, EOFError, tarfile.TarError, zipfile.BadZipFile, lzma.LZMAError) as exc:
        raise _BrokenArchive(f"{name} does not read to its end: {type(exc).__name__}: {exc}") from exc


def _local_path(url: str) -> Path | None:
    """The path a `file://` URL or plain path names; None for any other URL."""
    parsed = urllib.parse.urlparse(url)
    if parsed.scheme == "file":
        return Path(urllib.request.url2pathname(parsed.path))
    return Path(url) if parsed.scheme == "" else None


def _open(url: str, timeout: float) -> tuple[BinaryIO, int | None]:
    """Open the source for reading; return the stream and its length when known."""
    local = _local_path(url)
    if local is not None:
        fh = open(local, "rb")  # noqa: SIM115 - closed by the caller
        return fh, local.stat().st_size
    request = urllib.request.Request(url, headers={"User-Agent": "visionops"})
    response = urllib.request.urlopen(request, timeout=timeout)  # noqa: S310 - scheme is the user's
    length = response.headers.get("Content-Length")
    return response, int(length) if length and length.isdigit() else None


def _fetch_once(url: str, dest: Path, md5: str | None, timeout: float) -> None:
    """One attempt: stream `url` into a temporary sibling, verify it, rename it onto `dest`."""
    stream, total = _open(url, timeout)
    digest = hashlib.md5()
    received = 0
    with stream, atomic_path(dest) as tmp, open(tmp, "wb") as out:
        with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024,
                  desc=dest.name, disable=None, leave=False) as bar:
            while chunk := stream.read(CHUNK):
                out.write(chunk)
                digest.update(chunk)
                received += len(chunk)
                bar.update(len(chunk))
        out.close()
        if total is not None and received != total:
            raise _ShortRead(f"received {received} of the {total} bytes announced")
        if md5 is not None and digest.hexdigest() != md5:
            raise _ChecksumMismatch(f"MD5 mismatch: expected {md5}, got {digest.hexdigest()}")
        check_archive(tmp, dest.name)


def _retryable(exc: BaseException, local: bool) -> bool:
    if isinstance(exc, urllib.error.HTTPError):
        return exc.code >= 500
    if isinstance(exc, _BrokenArchive):
        return not local  # a server may have cut the body short; a local file will not change
    return isinstance(
        exc,
        (urllib.error.URLError, ConnectionError, TimeoutError, http.client.IncompleteRead, _ShortRead),
    )


def _describe(exc: BaseException) -> str:
    if isinstance(exc, (_ShortRead, _ChecksumMismatch, _BrokenArchive, urllib.error.HTTPError)):
        return str(exc)
    return f"{type(exc).__name__}: {exc}"


def _reusable(dest: Path, md5: str | None) -> bool:
    if md5 is not None:
        return file_md5(dest) == md5
    try:
        check_archive(dest)
    except _BrokenArchive:
        return False
    return True


def fetch(
    url: str,
    dest: Path | str,
    md5: str | None,
    retries: int = 5,
    backoff: float = 1.0,
    timeout: float = 30.0,
) -> Path:
    """Download `url` (http(s), `file://` or a local path) to `dest`, verifying `md5` if given.

    An existing `dest` is reused when its MD5 matches or, with no MD5 given, when it reads to its
    end as an archive (a file cached by an older, less careful version may be cut short).
    Network errors, short reads, downloaded archives cut short and HTTP 5xx are retried `retries`
    times, waiting `backoff * 2**attempt` seconds (capped); HTTP 4xx, local errors (a broken local
    archive included) and a checksum mismatch fail at once. Raises DownloadError naming the URL,
    the attempts made and the cause.
    """
    dest = Path(dest)
    md5 = md5.strip().lower() if md5 else None
    if dest.is_file() and _reusable(dest, md5):
        return dest
    attempts = retries + 1
    for attempt in range(attempts):
        try:
            _fetch_once(url, dest, md5, timeout)
            return dest
        except _FAILURES as exc:
            if not _retryable(exc, _local_path(url) is not None) or attempt + 1 == attempts:
                raise DownloadError(
                    f"download of {url} failed after {attempt + 1} attempt(s): {_describe(exc)}"
                ) from exc
            time.sleep(min(backoff * 2**attempt, MAX_BACKOFF))
    raise AssertionError("unreachable")


__all__ = ["DownloadError", "check_archive", "fetch", "file_md5"]
