"""Local processes the backends start and stop: detached, logged to a file, identified by PID and start time.

A PID alone can be reused after a crash or a reboot; the kernel's start time of the process (from
/proc/PID/stat) makes `down` and `status` act on our process, never on a stranger that got its PID.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Sequence


@dataclass(frozen=True)
class ProcessRef:
    pid: int
    start_time: int  # clock ticks since boot (field 22 of /proc/PID/stat)

    def to_json(self) -> dict[str, int]:
        return {"pid": self.pid, "start_time": self.start_time}

    @classmethod
    def from_json(cls, data: Optional[dict[str, int]]) -> Optional["ProcessRef"]:
        if not data:
            return None
        return cls(int(data["pid"]), int(data["start_time"]))


def _stat(pid: int) -> Optional[tuple[str, int]]:
    """(state, start time) of a PID, or None when there is no such process."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # the command name (field 2) may hold spaces and parentheses: split after the last ')'
    fields = text[text.rindex(")") + 2:].split()
    return fields[0], int(fields[19])


def _reap(pid: int) -> None:
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass  # not our child (another CLI process started it): init reaps it


def alive(ref: Optional[ProcessRef]) -> bool:
    if ref is None:
        return False
    stat = _stat(ref.pid)
    if stat is None or stat[1] != ref.start_time:
        return False
    if stat[0] in ("Z", "X"):
        _reap(ref.pid)
        return False
    return True


# Logs of the processes we start are rotated (mistral_deploy.logpipe): at most LOG_BACKUPS + 1 files of
# LOG_MAX_BYTES each, like the VM's Docker logs.
LOG_MAX_BYTES = 50 * 1024 * 1024
LOG_BACKUPS = 2


def spawn(argv: Sequence[str], *, env: dict[str, str], log: Path, cwd: Path,
          err_log: Optional[Path] = None, umask: int = -1) -> ProcessRef:
    """Start a detached process (its own session: Ctrl-C in the terminal does not reach it), its output
    appended to `log` (its standard error to `err_log` if given); `umask`: the process's own.

    The output goes through a pipe to a `mistral_deploy.logpipe` process of the same process group, which
    keeps the log files within LOG_MAX_BYTES each and ends with the process."""
    targets = [log] if err_log is None else [log, err_log]
    pipes = [os.pipe() for _ in targets]
    try:
        proc = subprocess.Popen(
            list(argv), env=env, cwd=str(cwd), stdin=subprocess.DEVNULL, stdout=pipes[0][1],
            stderr=pipes[1][1] if len(pipes) > 1 else subprocess.STDOUT, start_new_session=True, close_fds=True,
            umask=umask,
        )
    except BaseException:
        for read_end, _ in pipes:
            os.close(read_end)
        raise
    finally:
        for _, write_end in pipes:
            os.close(write_end)
    for (read_end, _), target in zip(pipes, targets):
        _start_logpipe(read_end, target, proc.pid)
    stat = _stat(proc.pid)
    # the Popen object is dropped: the process outlives the CLI; alive() reaps it if it is our child
    proc.returncode = 0  # keeps Popen.__del__ from warning about a running child
    return ProcessRef(proc.pid, stat[1] if stat else 0)


def _start_logpipe(read_end: int, target: Path, group: int) -> None:
    """A logpipe reading `read_end` into `target`, in the process group `group` (stopped with it)."""
    import sys

    def join_group() -> None:
        try:
            os.setpgid(0, group)
        except OSError:
            os.setsid()  # the process is already gone: the logpipe ends at its input's end anyway

    try:
        pipe = subprocess.Popen(
            [sys.executable, "-m", "mistral_deploy.logpipe", str(target), str(LOG_MAX_BYTES), str(LOG_BACKUPS)],
            stdin=read_end, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, close_fds=True,
            preexec_fn=join_group, env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"),
                                        "PYTHONPATH": str(Path(__file__).resolve().parent.parent)},
        )
    finally:
        os.close(read_end)
    pipe.returncode = 0


def stop(ref: Optional[ProcessRef], *, timeout: float = 15.0, sig: int = signal.SIGTERM) -> bool:
    """Stop the process and every process of its group: `sig`, then SIGKILL after `timeout`.

    The group is stopped even when its leader is already dead: vLLM's EngineCore child outlives an
    API server killed with SIGKILL. True if anything was running."""
    if ref is None:
        return False
    members = group_members(ref)
    if not members:
        return False
    signalled: set[int] = set()
    deadline = time.monotonic() + timeout
    give_up = deadline + 10
    while members:
        now = time.monotonic()
        for pid in members:
            if now > deadline:
                _signal(pid, signal.SIGKILL)
            elif pid not in signalled:  # members that appeared since are signalled too
                _signal(pid, sig)
                signalled.add(pid)
        if now > give_up:  # e.g. stuck in uninterruptible sleep: do not hang `down` forever
            break
        time.sleep(0.05)
        members = group_members(ref)
    return True


def group_members(ref: ProcessRef) -> list[int]:
    """Live processes of the group `ref` leads (started with their own session: group id = its PID),
    started no earlier than it: a later stranger that reused the number has its own, later start time."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            text = (entry / "stat").read_text()
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
        fields = text[text.rindex(")") + 2:].split()
        state, pgrp, start = fields[0], int(fields[2]), int(fields[19])
        if int(entry.name) == ref.pid and start != ref.start_time:
            return []  # the number was reused: Linux does not reuse it while our group exists
        if pgrp != ref.pid or start < ref.start_time:
            continue
        if state in ("Z", "X"):
            _reap(int(entry.name))
            continue
        members.append(int(entry.name))
    return members


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass  # gone, or not ours to signal


@contextmanager
def signals_ignored() -> Iterator[None]:
    """Ctrl-C and SIGTERM wait while a clean-up runs (main thread only; elsewhere nothing changes)."""
    try:
        previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
    except ValueError:
        yield
        return
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def tail(path: Path, lines: int = 40) -> str:
    """The last lines of a log file ('' when it does not exist)."""
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - 64 * 1024))
            data = fh.read().decode("utf-8", "replace")
    except FileNotFoundError:
        return ""
    return "\n".join(data.splitlines()[-lines:])
