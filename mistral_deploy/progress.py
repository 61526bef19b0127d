"""How `up`, `down` and `run` show their phases: a rich live spinner for a person at a terminal, plain
timestamped lines otherwise (CI, pipes, --json). Always on stderr: stdout is for data.
"""

from __future__ import annotations

import sys
import time
from typing import Any, Optional


class Progress:
    """The interface backends report to: phase(name, detail), done(message), fail(message)."""

    def __init__(self, *, interactive: Optional[bool] = None, quiet: bool = False) -> None:
        from rich.console import Console

        self.console = Console(stderr=True, highlight=False, soft_wrap=True)
        if interactive is None:
            import os

            interactive = sys.stderr.isatty() and not os.environ.get("CI")
        self.interactive = interactive
        self.quiet = quiet
        self.started = time.monotonic()
        self.phases: list[tuple[str, float]] = []  # (name, seconds since start)
        self._status: Any = None

    def _elapsed(self) -> str:
        return f"{time.monotonic() - self.started:6.1f}s"

    def phase(self, name: str, detail: str = "") -> None:
        from rich.markup import escape

        new = not self.phases or self.phases[-1][0] != name
        if new:
            self.phases.append((name, time.monotonic() - self.started))
        if self.quiet or (not new and not detail):
            return
        text = f"{name}" + (f": {detail}" if detail else "")
        if self.interactive:
            if self._status is None:
                self._status = self.console.status(escape(text))
                self._status.start()
            else:
                self._status.update(escape(text))
            if new:
                self.console.print(f"[dim]{self._elapsed()}[/dim] {escape(text)}")
        else:
            self.console.print(f"{self._elapsed()} {escape(text)}")

    def _stop(self) -> None:
        if self._status is not None:
            self._status.stop()
            self._status = None

    def done(self, message: str) -> None:
        from rich.markup import escape

        self._stop()
        if not self.quiet:
            self.console.print(f"{self._elapsed()} [green]{escape(message)}[/green]")

    def fail(self, message: str) -> None:
        from rich.markup import escape

        self._stop()
        self.console.print(f"{self._elapsed()} [red]{escape(message)}[/red]")

    def close(self) -> None:
        self._stop()


class PhaseClock:
    """How long each phase of `up` took, in order: what a deployment records as `phases` (status --json)."""

    def __init__(self) -> None:
        self._start = time.monotonic()
        self._marks: list[tuple[str, float]] = []

    def enter(self, name: str) -> None:
        if not self._marks or self._marks[-1][0] != name:
            self._marks.append((name, time.monotonic()))

    def times(self) -> list[dict[str, Any]]:
        """[{phase, seconds}] in order (a phase entered twice adds up), the last one until now."""
        now = time.monotonic()
        ends = [at for _name, at in self._marks[1:]] + [now]
        out: dict[str, float] = {}
        for (name, at), end in zip(self._marks, ends):
            out[name] = out.get(name, 0.0) + end - at
        return [{"phase": name, "seconds": round(seconds, 2)} for name, seconds in out.items()]

    def total(self) -> float:
        return round(time.monotonic() - self._start, 2)
