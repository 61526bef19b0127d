"""`mistral-deploy exit-codes`: what each exit code means."""

from __future__ import annotations

from mistral_deploy.cli import app
from mistral_deploy.cli._output import Output


@app.command("exit-codes")
def exit_codes() -> None:
    """List the exit codes every command uses (`run` exits with its command's code)."""
    from mistral_deploy.errors import EXIT_CODES

    Output().data("\n".join(f"{code:>3}  {meaning}" for code, meaning in sorted(EXIT_CODES.items())))
