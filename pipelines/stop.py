"""Stop what `make schedule` started, cleanly: the `serve` process first, then the Prefect server.

Both write their PID under PREFECT_HOME (`serve.pid`, `server.pid`). `serve` gets SIGTERM, which
Prefect's runner handles as a graceful shutdown (it stops polling the server and exits); only then is
the server's process group sent SIGTERM. Stopping the server first left `serve` retrying a dead API for
over a minute, printing tracebacks. A process that outlives its grace period gets SIGKILL. A PID file
whose process is gone, or now belongs to another program, is removed without signalling anything.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

SERVE_PID, SERVER_PID = "serve.pid", "server.pid"
GRACE_S = 30.0


def _cmdline(pid: int) -> str | None:
    """The process's command line, or None when there is no such process."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except FileNotFoundError:
        return None
    except OSError:  # no /proc (macOS): fall back to "it exists"
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        return ""


def _alive(pid: int) -> bool:
    """Whether the process runs (a zombie, exited but not yet reaped by its parent, has stopped)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


def stop(pid_file: Path, what: str, expect: str, group: bool, grace_s: float = GRACE_S) -> str:
    """SIGTERM the process (or its group) in `pid_file` if its command line contains `expect`; wait."""
    if not pid_file.is_file():
        return f"no {what} started by make"
    pid = int(pid_file.read_text().split()[0])
    cmd = _cmdline(pid)
    if cmd is None or (cmd and expect not in cmd):
        pid_file.unlink()
        return f"no {what} running (pid {pid} is gone)"
    kill = (lambda s: os.killpg(pid, s)) if group else (lambda s: os.kill(pid, s))
    start = time.monotonic()
    kill(signal.SIGTERM)
    while _alive(pid) and time.monotonic() - start < grace_s:
        time.sleep(0.2)
    forced = _alive(pid)
    if forced:
        kill(signal.SIGKILL)
    pid_file.unlink()
    return f"stopped the {what} (pid {pid}) in {time.monotonic() - start:.1f} s" + (" with SIGKILL" if forced else "")


def stop_all(prefect_home: Path | str) -> list[str]:
    home = Path(prefect_home)
    return [
        stop(home / SERVE_PID, "Prefect serve process", "pipelines", group=False),
        stop(home / SERVER_PID, "Prefect server", "prefect", group=True),
    ]
