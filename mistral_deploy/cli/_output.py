"""All terminal output goes through Output: data to stdout, progress and diagnostics to stderr."""

from __future__ import annotations

import os
import sys
from typing import Any, NoReturn

import typer

from mistral_deploy.errors import MistralDeployError


class Output:
    def __init__(self, *, json_mode: bool = False, quiet: bool = False) -> None:
        self.json_mode = json_mode
        self.quiet = quiet
        self._console = None
        self._err_console = None

    # rich is imported on first use: plain `--help` and `render` stay fast
    @property
    def console(self):  # type: ignore[no-untyped-def]
        if self._console is None:
            from rich.console import Console

            self._console = Console(highlight=False, soft_wrap=True)
        return self._console

    @property
    def err(self):  # type: ignore[no-untyped-def]
        if self._err_console is None:
            from rich.console import Console

            self._err_console = Console(stderr=True, highlight=False, soft_wrap=True)
        return self._err_console

    @property
    def interactive(self) -> bool:
        """Prompts and live displays only for a person at a terminal, never in CI."""
        return sys.stdin.isatty() and sys.stderr.isatty() and not os.environ.get("CI")

    def data(self, text: str) -> None:
        """Machine-readable or primary output, unstyled, on stdout."""
        sys.stdout.write(text if text.endswith("\n") else text + "\n")
        sys.stdout.flush()

    def json(self, obj: Any) -> None:
        import json

        self.data(json.dumps(obj, indent=2, sort_keys=True, default=str))

    def print(self, *objects: Any, **kwargs: Any) -> None:
        """Human output on stdout (tables, summaries)."""
        self.console.print(*objects, **kwargs)

    def info(self, message: str) -> None:
        if not self.quiet:
            self.err.print(message)

    def warn(self, message: str) -> None:
        self.err.print(f"[yellow]warning:[/yellow] {message}")

    def error(self, message: str) -> None:
        from rich.markup import escape

        self.err.print(f"[red]error:[/red] {escape(message)}")

    def abort(self, exc: MistralDeployError) -> NoReturn:
        log_tail = getattr(exc, "log_tail", "")
        if log_tail:
            from rich.markup import escape

            self.err.print("[dim]--- last log lines ---[/dim]")
            self.err.print(escape(log_tail))
            self.err.print("[dim]---[/dim]")
        self.error(exc.message)
        if exc.hint:
            self.info(exc.hint)
        raise typer.Exit(exc.exit_code)
