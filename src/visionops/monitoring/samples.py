"""The kept images of the inference log: a random fraction of the served images, raw, for labelling.

Each is `<uri>/samples/day=YYYY-MM-DD/<request_id>-<row>.<png|jpg|bin>` (the name joins it to its log row; the
extension from the bytes' magic), written whole (locally a temporary name then a rename; on S3 one object).
`prune` keeps at most `max_images`, none older than `retention_days`: the oldest go first.
"""

from __future__ import annotations

import re
import time
from datetime import datetime

import pyarrow.fs as pafs

from visionops.atomic import write_bytes
from visionops.monitoring.log_schema import PARTITION

FOLDER = "samples"
MAGIC = ((b"\x89PNG\r\n\x1a\n", "png"), (b"\xff\xd8\xff", "jpg"))


def extension(data: bytes) -> str:
    """png or jpg from the bytes' magic; bin for anything else."""
    return next((ext for magic, ext in MAGIC if data.startswith(magic)), "bin")


def sample_name(request_id: str, row: int, data: bytes) -> str:
    """`<request_id>-<row>.<ext>`, the request id made safe for a file name."""
    return f"{re.sub(r'[^A-Za-z0-9._-]', '_', str(request_id))}-{int(row)}.{extension(data)}"


def write_sample(fs: pafs.FileSystem, root: str, when: datetime, request_id: str, row: int, data: bytes) -> str:
    """Write one kept image under `root`'s samples folder of `when`'s day; returns its path."""
    folder = f"{root}/{FOLDER}/{PARTITION}={when:%Y-%m-%d}"
    path = f"{folder}/{sample_name(request_id, row, data)}"
    fs.create_dir(folder, recursive=True)
    if isinstance(fs, pafs.LocalFileSystem):
        write_bytes(path, data)
    else:
        with fs.open_output_stream(path) as out:
            out.write(data)
    return path


def prune(fs: pafs.FileSystem, root: str, max_images: int, retention_days: float) -> int:
    """Delete the kept images beyond `max_images` (oldest first) or older than `retention_days`, and the day
    folders left empty; returns how many were deleted."""
    base = f"{root}/{FOLDER}"
    infos = fs.get_file_info(pafs.FileSelector(base, recursive=True, allow_not_found=True))
    files = sorted((i for i in infos if i.type == pafs.FileType.File and not i.base_name.startswith(".")),
                   key=lambda i: (i.mtime_ns or 0, i.path), reverse=True)  # newest first
    cutoff_ns = int((time.time() - retention_days * 86400) * 1e9)
    doomed = files[max_images:] + [i for i in files[:max_images] if (i.mtime_ns or 0) < cutoff_ns]
    for info in doomed:
        fs.delete_file(info.path)
    if doomed and isinstance(fs, pafs.LocalFileSystem):  # S3 has no folders to leave behind
        for info in infos:
            if info.type == pafs.FileType.Directory and not fs.get_file_info(pafs.FileSelector(info.path)):
                fs.delete_dir(info.path)
    return len(doomed)
