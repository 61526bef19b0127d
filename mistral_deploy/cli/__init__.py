"""The `mistral-deploy` command line: one module per command, each thin (parse, call the core, report).

Nothing here imports `sky`, `vllm` or `torch` at module level: `--help`, `recipes`, `validate` and
`render` must stay fast (benchmarks/cli_latency.py). A command imports its own module only, and Typer builds
that command only (`_app_for`). Errors become exit codes in one place, `main()`.
"""

from __future__ import annotations

import copy
import os
import sys

import typer
from typer.core import TyperGroup

from mistral_deploy import __version__
from mistral_deploy.errors import EXIT_INTERRUPTED, MistralDeployError

DEBUG_ENV = "MISTRAL_DEPLOY_DEBUG"  # set: unexpected errors show their traceback

# `--help` lists the commands in these sections, in this order; a command in none of them is listed under
# OTHER_SECTION (tests/test_cli_help.py checks that every command is in exactly one).
COMMAND_SECTIONS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("Create and change", ("up", "down", "run", "ttl", "keys")),
    ("Use and watch", ("status", "env", "tunnel", "logs", "top", "usage", "metrics", "bench")),
    ("Recipes", ("recipes", "validate", "plan", "render", "schema", "cache")),
    ("Setup", ("doctor", "init", "engine", "exit-codes")),
)
OTHER_SECTION = "Other"


class _Group(TyperGroup):
    """The root command: its help lists the commands in sections (COMMAND_SECTIONS), and its commands'
    parameters are coerced without building a pydantic TypeAdapter for the plain ones (_startup.py)."""

    def format_commands(self, ctx, formatter) -> None:  # type: ignore[no-untyped-def]
        commands = [(name, cmd) for name in self.list_commands(ctx)
                    if (cmd := self.get_command(ctx, name)) is not None and not cmd.hidden]
        if not commands:
            return
        width = max(len(name) for name, _ in commands)
        limit = formatter.width - 6 - width
        placed = {name for _, names in COMMAND_SECTIONS for name in names}
        sections = [*COMMAND_SECTIONS, (OTHER_SECTION, tuple(n for n, _ in commands if n not in placed))]
        by_name = dict(commands)
        for title, names in sections:
            # names padded to one width: the help texts line up across sections
            rows = [(name.ljust(width), by_name[name].get_short_help_str(limit)) for name in names if name in by_name]
            if rows:
                with formatter.section(title):
                    formatter.write_dl(rows)

    def make_context(self, info_name, args, parent=None, **extra):  # type: ignore[no-untyped-def]
        from mistral_deploy.cli._startup import use_plain_coercion

        use_plain_coercion()
        return super().make_context(info_name, args, parent=parent, **extra)


app = typer.Typer(
    cls=_Group,
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


def _register(name: str | None = None) -> None:
    """Register the command `name` on `app` (its module only), or all of them."""
    from mistral_deploy.cli.commands import register

    register(name)


def _app_for(args: list[str]) -> typer.Typer:
    """`app` with only the command that `args` starts with: Typer turns every registered command into a
    click command (reading its signature and evaluating its annotations) before it runs one, which costs
    a command tens of milliseconds. Anything else (root options, no command, an unknown one): all of them."""
    if not args:
        return app
    from typer.main import get_command_name

    commands = [info for info in app.registered_commands
                if (info.name or get_command_name(info.callback.__name__)) == args[0]]
    groups = [info for info in app.registered_groups if info.name == args[0]]
    if len(commands) + len(groups) != 1:
        return app
    only = copy.copy(app)
    only.registered_commands, only.registered_groups = commands, groups
    return only


def main(argv: list[str] | None = None) -> None:
    """Entry point of the console script: every error leaves as one line and an exit code."""
    from typer.exceptions import TyperException

    from mistral_deploy.cli import _startup

    # We use no pydantic plugins, and looking for them scans every installed distribution's entry points
    # (~50 ms of each command's start-up in a venv with SkyPilot's dependencies).
    os.environ.setdefault("PYDANTIC_DISABLE_PLUGINS", "__all__")
    _startup.skip_pydantic_plugin_lookup()
    if argv is None:  # the console script: this process is the command's (a caller's collector is its own)
        _startup.pause_gc()
    args = sys.argv[1:] if argv is None else argv
    _register(args[0] if args else None)
    try:
        code = _app_for(args)(args=argv, standalone_mode=False)
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
    code = code if isinstance(code, int) else 0
    if argv is None:  # the console script: no teardown of every module loaded, where nothing needs it
        _startup.exit_now(code, args)
    sys.exit(code)
