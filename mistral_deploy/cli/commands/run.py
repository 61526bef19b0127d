"""`mistral-deploy run`: an ephemeral endpoint for the length of one command (CI jobs, evaluations).

Up, run the command with OPENAI_BASE_URL / OPENAI_API_KEY (and the pinned CA file) in its environment,
then always down: on success, on failure, on Ctrl-C and on SIGTERM. On clouds the TTL is the backstop
if this process itself is killed.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from typing import Annotated, Any, Optional

import typer

from mistral_deploy.cli import app
from mistral_deploy.cli._options import (
    Allow, Cloud, Gpu, Model, Name, Network, Port, RecipeArg, Region, Spot, Ttl, load, overrides,
)
from mistral_deploy.cli._output import Output

# How long the command gets to exit after it was forwarded SIGTERM/SIGINT, before SIGKILL.
COMMAND_GRACE_SECONDS = 10.0


@app.command()
def run(
    recipe: RecipeArg,
    command: Annotated[list[str], typer.Argument(help="The command to run, after `--`.", show_default=False)],
    cloud: Cloud = None,
    gpu: Gpu = None,
    region: Region = None,
    model: Model = None,
    name: Name = None,
    spot: Spot = None,
    network: Network = None,
    allow: Allow = None,
    ttl: Ttl = None,
    port: Port = None,
    json_out: Annotated[
        bool, typer.Option("--json", help="One JSON object on stdout; the command's stdout goes to stderr.")
    ] = False,
) -> None:
    """Bring an endpoint up, run COMMAND against it, always tear it down; exit with COMMAND's exit code.

    mistral-deploy run tiny-mistral --cloud local -- python my_eval.py

    Interrupted (Ctrl-C, SIGTERM) while the command runs: the signal is forwarded to it, and `run` exits
    with its code (128+N if signal N ended it). If the endpoint cannot be brought up, exits with
    mistral-deploy's own code (see `exit-codes`: 3-9), or 130 when interrupted before the command started.
    """
    import secrets

    from mistral_deploy.backends import backend_for_recipe
    from mistral_deploy.cli.commands._lifecycle import client_env, sigterm_as_interrupt, summary
    from mistral_deploy.errors import MistralDeployError
    from mistral_deploy.progress import Progress
    from mistral_deploy.skysdk import free_port
    from mistral_deploy.state import StateStore

    out = Output(json_mode=json_out)
    if not command:
        raise MistralDeployError("run: name the command to run after `--`, e.g. -- pytest tests/llm")
    import shutil

    if shutil.which(command[0]) is None:
        raise MistralDeployError(f"run: command not found: {command[0]!r} (nothing was started)")
    flags = overrides(cloud=cloud, gpu=gpu, region=region, model=model, name=name, spot=spot, network=network,
                      allow=allow, ttl=ttl, port=port)
    r = load(recipe, flags).recipe
    # Parallel CI jobs must not collide: a fresh name, and locally a free port, unless given.
    if name is None or (r.is_local and port is None):
        flags.name = name or f"{r.name[:26]}-{secrets.token_hex(4)}"
        flags.port = port if port is not None or not r.is_local else free_port()
        r = load(recipe, flags).recipe

    store = StateStore()
    if store.dir(r.name).exists():  # never tear down a deployment this run did not create
        from mistral_deploy.errors import DeploymentExists

        raise DeploymentExists(f"a deployment named {r.name!r} already exists",
                               hint="pick another --name, or leave --name out for a fresh one")
    backend = backend_for_recipe(r)
    progress = Progress()
    started = time.monotonic()
    result: dict[str, Any] = {"name": r.name, "command": command[0]}
    code: Optional[int] = None
    with sigterm_as_interrupt():
        try:
            try:
                deployment = backend.up(r, store, progress)
            finally:
                progress.close()
            result.update(summary(deployment), up_seconds=round(time.monotonic() - started, 2))
            env = dict(os.environ)
            env.update(client_env(deployment, store))
            code = _run_command(command, env, stdout=sys.stderr if json_out else None)
            result["exit_code"] = code
        finally:
            from mistral_deploy.processes import signals_ignored

            with signals_ignored():  # a second Ctrl-C or SIGTERM does not stop the clean-up
                result["teardown"] = _teardown(r.name, store)
            if json_out and (code is not None or result["teardown"] != "none"):
                out.json(result)
    if result["teardown"].startswith("failed"):
        raise MistralDeployError(f"run: {result['teardown']}", hint=f"`mistral-deploy down {r.name}` again")
    raise typer.Exit(code)


def _run_command(command: list[str], env: dict[str, str], *, stdout: Any) -> int:
    """Run the command in its own process group and return its exit code. Ctrl-C and SIGTERM sent to
    `run` are forwarded to it once, and it is waited for (then killed after a grace period)."""
    from mistral_deploy.processes import signals_ignored

    try:
        proc = subprocess.Popen(command, env=env, stdout=stdout, start_new_session=True)
    except OSError as exc:
        from mistral_deploy.errors import MistralDeployError

        raise MistralDeployError(f"run: cannot start {command[0]!r}: {exc.strerror}") from None
    try:
        return _exit_code(proc.wait())
    except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM (sigterm_as_interrupt)
        with signals_ignored():
            sig = signal.SIGTERM if "signal" in str(exc) else signal.SIGINT
            if proc.poll() is None:
                proc.send_signal(sig)
            try:
                proc.wait(timeout=COMMAND_GRACE_SECONDS)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        return _exit_code(proc.returncode)


def _exit_code(returncode: int) -> int:
    return 128 - returncode if returncode < 0 else returncode  # killed by signal N: 128+N, like a shell


def _teardown(name: str, store: Any) -> str:
    """Down the deployment whatever happened (the caller holds Ctrl-C and SIGTERM off meanwhile)."""
    from mistral_deploy.cli.commands.down import teardown
    from mistral_deploy.errors import DeploymentNotFound

    try:
        deployment = store.load(name)
    except DeploymentNotFound:
        return "none"  # up removed it (interrupted locally) or never recorded it (refused by the cloud)
    removed, failed = teardown([deployment], store)
    return "done" if removed else f"failed: {failed.get(name)}"
