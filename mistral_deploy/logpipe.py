"""Rotating log files for the local backend's processes: `python -m mistral_deploy.logpipe FILE MAX_BYTES
BACKUPS` copies its standard input into FILE, and when FILE would pass MAX_BYTES it becomes FILE.1 (FILE.1
becomes FILE.2, ... up to BACKUPS files kept). It runs in the process group of the process it logs,
ignores SIGTERM and SIGINT (so that the last lines of a stopping process are kept) and ends when its input
does: when every process writing to it has exited. Imports nothing but the standard library's basics.
"""

from __future__ import annotations

import os
import signal
import sys

CHUNK = 64 * 1024


def _rotate(path: str, backups: int) -> None:
    for n in range(backups - 1, 0, -1):
        if os.path.exists(f"{path}.{n}"):
            os.replace(f"{path}.{n}", f"{path}.{n + 1}")
    if backups > 0:
        os.replace(path, f"{path}.1")
    else:
        os.unlink(path)


def copy(source: int, path: str, max_bytes: int, backups: int) -> None:
    """Copy what `source` (a file descriptor) yields into `path`, rotating at line ends past max_bytes."""
    out = open(path, "ab", buffering=0)
    size = out.tell()
    try:
        while True:
            data = os.read(source, CHUNK)
            if not data:
                return
            while size + len(data) > max_bytes:
                # rotate after the last whole line that still fits (or the first line, if none does)
                cut = data.rfind(b"\n", 0, max(0, max_bytes - size)) + 1
                if cut == 0 and size == 0:
                    cut = data.find(b"\n") + 1 or len(data)
                out.write(data[:cut])
                data = data[cut:]
                out.close()
                _rotate(path, backups)
                out = open(path, "ab", buffering=0)
                size = 0
            out.write(data)
            size += len(data)
    finally:
        out.close()


def main(argv: list[str]) -> int:
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    path, max_bytes, backups = argv[0], int(argv[1]), int(argv[2])
    copy(sys.stdin.fileno(), path, max_bytes, backups)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
