"""Download a file over HTTP(S), or copy a local one, with retries and MD5 verification.

The bytes go to a temporary file beside `dest` that is renamed onto it only once complete and
verified, so `dest` is either absent or whole.
"""

from __future__ import annotations

import hashlib
import http.client
import time
import urllib.error
import urllib.parse
import urllib.request
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
    """The connection closed before Content-Length bytes arrived."""


class _ChecksumMismatch(Exception):
    """The bytes arrived whole but their MD5 is not the expected one."""


def file_md5(path: Path | str) -> str:
    """The hex MD5 of a file, read in chunks."""
    digest = hashlib.md5()
    with open(path, "rb") as fh:
        while chunk := fh.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


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
        if total is not None and received < total:
            raise _ShortRead(f"connection closed after {received} of {total} bytes")
        if md5 is not None and digest.hexdigest() != md5:
            raise _ChecksumMismatch(f"MD5 mismatch: expected {md5}, got {digest.hexdigest()}")


def _retryable(exc: BaseException) -> bool:
    if isinstance(exc, urllib.error.HTTPError):
        return exc.code >= 500
    return isinstance(
        exc,
        (urllib.error.URLError, ConnectionError, TimeoutError, http.client.IncompleteRead, _ShortRead),
    )


def _describe(exc: BaseException) -> str:
    if isinstance(exc, (_ShortRead, _ChecksumMismatch, urllib.error.HTTPError)):
        return str(exc)
    return f"{type(exc).__name__}: {exc}"


def fetch(
    url: str,
    dest: Path | str,
    md5: str | None,
    retries: int = 5,
    backoff: float = 1.0,
    timeout: float = 30.0,
) -> Path:
    """Download `url` (http(s), `file://` or a local path) to `dest`, verifying `md5` if given.

    An existing `dest` is reused when its MD5 matches (or no MD5 is given: writes are atomic, so
    it is whole). Network errors, short reads and HTTP 5xx are retried `retries` times, waiting
    `backoff * 2**attempt` seconds (capped); HTTP 4xx, local errors and a checksum mismatch fail
    at once. Raises DownloadError naming the URL, the attempts made and the cause.
    """
    dest = Path(dest)
    md5 = md5.strip().lower() if md5 else None
    if dest.is_file() and (md5 is None or file_md5(dest) == md5):
        return dest
    attempts = retries + 1
    for attempt in range(attempts):
        try:
            _fetch_once(url, dest, md5, timeout)
            return dest
        except (OSError, http.client.HTTPException, _ShortRead, _ChecksumMismatch) as exc:
            if not _retryable(exc) or attempt + 1 == attempts:
                raise DownloadError(
                    f"download of {url} failed after {attempt + 1} attempt(s): {_describe(exc)}"
                ) from exc
            time.sleep(min(backoff * 2**attempt, MAX_BACKOFF))
    raise AssertionError("unreachable")


__all__ = ["DownloadError", "fetch", "file_md5"]
