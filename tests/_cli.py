"""Run the CLI in-process through its real entry point, `main()`, inside typer's CliRunner isolation.

`CliRunner.invoke(app)` would bypass `main()`, where errors become one line and an exit code; this runs
`main(argv)` itself, so tests see exactly what a user sees (stdout and stderr apart).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from typer.testing import CliRunner


@dataclass
class Run:
    exit_code: int
    stdout: str
    stderr: str

    @property
    def output(self) -> str:
        return self.stdout + self.stderr


def run_cli(*argv: str, env: Optional[dict[str, str]] = None) -> Run:
    from mistral_deploy.cli import main

    runner = CliRunner()
    with runner.isolation(env=env) as (out, err, _mixed):
        try:
            main(list(argv))
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        finally:
            import sys

            sys.stdout.flush()
            sys.stderr.flush()
        stdout = out.getvalue().decode("utf-8", "replace")
        stderr = err.getvalue().decode("utf-8", "replace")
    return Run(code, stdout, stderr)
