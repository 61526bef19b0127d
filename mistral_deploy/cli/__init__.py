"""The `mistral-deploy` command line: one module per command, each thin (parse, call the core, report).

Nothing here imports `sky`, `vllm` or `torch` at module level: `--help`, `recipes`, `validate` and
`render` must stay fast. Errors become exit codes in one place, `main()`.
"""

from __future__ import annotations

import os
import sys

import typer

from mistral_deploy import __version__
from mistral_deploy.errors import EXIT_INTERRUPTED, MistralDeployError

DEBUG_ENV = "MISTRAL_DEPLOY_DEBUG"  # set: unexpected errors show their traceback

app = typer.Typer(
    name="mistral-deploy",
    help="Put an open-weight Mistral model behind a private, secure, healthy OpenAI-compatible endpoint.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,  # locals can hold API keys and tokens
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        print(f"mistral-deploy {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
) -> None:
    """Recipes in, secure endpoints out. Exit codes: see `mistral-deploy exit-codes`."""


def _register() -> None:
    from mistral_deploy.cli import commands  # noqa: F401  (registers the commands on `app`)


def main(argv: list[str] | None = None) -> None:
    """Entry point of the console script: every error leaves as one line and an exit code."""
    from typer.exceptions import TyperException

    # We use no pydantic plugins, and looking for them scans every installed distribution's entry points
    # (~50 ms of each command's start-up in a venv with SkyPilot's dependencies).
    os.environ.setdefault("PYDANTIC_DISABLE_PLUGINS", "__all__")
    _register()
    try:
        code = app(args=argv, standalone_mode=False)
    except MistralDeployError as exc:
        from mistral_deploy.cli._output import Output

        try:
            Output().abort(exc)
        except typer.Exit as exit_:
            code = exit_.exit_code
    except TyperException as exc:  # usage errors: unknown flag, missing argument (exit 2)
        exc.show()  # type: ignore[attr-defined]
        code = exc.exit_code
    except (KeyboardInterrupt, typer.Abort):
        print("interrupted", file=sys.stderr)
        code = EXIT_INTERRUPTED
    except typer.Exit as exc:
        code = exc.exit_code
    except Exception as exc:  # noqa: BLE001 - a bug or an unforeseen OS error: one line, not a traceback
        if os.environ.get(DEBUG_ENV):
            raise
        print(f"error: unexpected {type(exc).__name__}: {exc}", file=sys.stderr)
        print(f"set {DEBUG_ENV}=1 to see where it came from", file=sys.stderr)
        code = 1
    sys.exit(code if isinstance(code, int) else 0)
