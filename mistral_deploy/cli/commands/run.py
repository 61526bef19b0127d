"""`mistral-deploy run`: an ephemeral endpoint for the length of one command (CI jobs, evaluations).

Up, run the command with OPENAI_BASE_URL / OPENAI_API_KEY (and the pinned CA file) in its environment,
then always down: on success, on failure, on Ctrl-C and on SIGTERM. On clouds the TTL is the backstop
if this process itself is killed: without --ttl (and without one in the recipe), a single VM gets
DEFAULT_RUN_TTL; --ttl none asks for no end time.

The command does not inherit `run`'s environment, which holds the cloud credentials `up` needs (AWS_*,
GOOGLE_*, AZURE_*, HF_TOKEN, GITHUB_TOKEN, ...). It gets a small base set (the shell's basics, the locale,
the Python environment, CI's and GitHub Actions' non-secret description of the run: BASE_ENV), the
endpoint's variables (client_env), and the variables the user names with `--pass-env`: see command_env.

A private cloud endpoint (network mode private) listens on the VM's loopback only: `up` reaches it over an
SSH tunnel of its own, closed when `up` returns. `run` opens one for the command (the backend's
open_tunnel, as `mistral-deploy tunnel` does), checks through it that the endpoint answers an
authenticated one-token request before the command starts, hands the command the tunnel's URL, and closes
it once the command has ended, before the teardown: see _reachable.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from typing import TYPE_CHECKING, Annotated, Any, Iterable, Iterator, Mapping, Optional

import typer

from mistral_deploy.cli import app
from mistral_deploy.cli._options import (
    Allow, Cloud, Gpu, Model, Name, Network, Nodes, Port, RecipeArg, Region, Spot, Ttl, load, overrides,
)
from mistral_deploy.cli._output import Output

if TYPE_CHECKING:
    from mistral_deploy.recipe import Recipe
    from mistral_deploy.state import Deployment, StateStore

# What a cloud endpoint of `run` lives at most, unless --ttl says otherwise: a CI job's endpoint with room to
# spare (GitHub's own job limit is 6 hours, most evaluation jobs take minutes).
DEFAULT_RUN_TTL = "2h"

# How long the command gets to exit after it was forwarded SIGTERM/SIGINT, before SIGKILL.
COMMAND_GRACE_SECONDS = 10.0

# How long a private endpoint gets to answer through run's own tunnel: `up` has just found it ready, so this
# covers the SSH connection and a slow first request, not the engine starting.
TUNNEL_READY_SECONDS = 60.0

# What the command inherits without being asked: nothing that is a credential. CI's variables are named one
# by one (a prefix such as GITHUB_* or CI_* would take GITHUB_TOKEN, GitLab's CI_JOB_TOKEN, ...); of GitHub's
# defaults GITHUB_ENV and GITHUB_PATH are left out too, as they change the environment of the later steps,
# which hold the cloud credentials. ACTIONS_* (the runner's and OIDC tokens) are never passed unless named.
BASE_ENV = frozenset({
    # the shell's basics, the locale, temporary files
    "PATH", "HOME", "USER", "LOGNAME", "SHELL", "LANG", "LANGUAGE", "TERM", "TZ", "TMPDIR", "PWD", "NO_COLOR",
    "XDG_CACHE_HOME", "XDG_CONFIG_HOME", "XDG_DATA_HOME", "XDG_RUNTIME_DIR",
    # the Python environment, and where to find the system's CA certificates (paths, not secrets)
    "VIRTUAL_ENV", "PYTHONPATH", "SSL_CERT_FILE", "SSL_CERT_DIR", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE",
    # our own state folder, so that `mistral-deploy status` / `env` in the command see this deployment
    "MISTRAL_DEPLOY_HOME",
    # CI, and GitHub Actions' description of the run (docs.github.com: "Default environment variables")
    "CI", "GITHUB_ACTIONS", "GITHUB_ACTION", "GITHUB_ACTION_PATH", "GITHUB_ACTION_REPOSITORY", "GITHUB_ACTOR",
    "GITHUB_ACTOR_ID", "GITHUB_API_URL", "GITHUB_BASE_REF", "GITHUB_EVENT_NAME", "GITHUB_EVENT_PATH",
    "GITHUB_GRAPHQL_URL", "GITHUB_HEAD_REF", "GITHUB_JOB", "GITHUB_OUTPUT", "GITHUB_REF", "GITHUB_REF_NAME",
    "GITHUB_REF_PROTECTED", "GITHUB_REF_TYPE", "GITHUB_REPOSITORY", "GITHUB_REPOSITORY_ID",
    "GITHUB_REPOSITORY_OWNER", "GITHUB_REPOSITORY_OWNER_ID", "GITHUB_RETENTION_DAYS", "GITHUB_RUN_ATTEMPT",
    "GITHUB_RUN_ID", "GITHUB_RUN_NUMBER", "GITHUB_SERVER_URL", "GITHUB_SHA", "GITHUB_STEP_SUMMARY",
    "GITHUB_TRIGGERING_ACTOR", "GITHUB_WORKFLOW", "GITHUB_WORKFLOW_REF", "GITHUB_WORKFLOW_SHA", "GITHUB_WORKSPACE",
    "RUNNER_ARCH", "RUNNER_DEBUG", "RUNNER_ENVIRONMENT", "RUNNER_NAME", "RUNNER_OS", "RUNNER_TEMP",
    "RUNNER_TOOL_CACHE", "RUNNER_WORKSPACE",
})
BASE_ENV_PREFIXES = ("LC_",)

# A --pass-env entry: a variable's name, or a prefix followed by `*` (`*` alone: everything).
_PASS_ENV_ENTRY = re.compile(r"(?:[A-Za-z_][A-Za-z0-9_]*)?\*|[A-Za-z_][A-Za-z0-9_]*")


def parse_pass_env(values: Optional[Iterable[str]]) -> tuple[str, ...]:
    """The --pass-env values, each a name, a `PREFIX*` glob or a comma-separated list of them; raises a
    one-line error naming the flag for anything else."""
    from mistral_deploy.errors import MistralDeployError

    entries: list[str] = []
    for value in values or ():
        for entry in value.split(","):
            entry = entry.strip()
            if not entry:
                raise MistralDeployError(f"--pass-env: an empty name in {value!r}")
            if not _PASS_ENV_ENTRY.fullmatch(entry):
                raise MistralDeployError(f"--pass-env: {entry!r} is not a variable name (letters, digits and _, "
                                         f"not starting with a digit) or a PREFIX* glob such as 'MY_APP_*'")
            entries.append(entry)
    return tuple(entries)


def command_env(environ: Mapping[str, str], endpoint_env: Mapping[str, str],
                pass_env: Iterable[str] = ()) -> dict[str, str]:
    """The command's environment: of `environ`, the base set (BASE_ENV, LC_*) and what `pass_env` names
    (names and PREFIX* globs, as parse_pass_env returns them); then the endpoint's variables, which win."""
    names = set(BASE_ENV)
    prefixes = list(BASE_ENV_PREFIXES)
    for entry in pass_env:
        if entry.endswith("*"):
            prefixes.append(entry[:-1])
        else:
            names.add(entry)
    env = {key: value for key, value in environ.items() if key in names or key.startswith(tuple(prefixes))}
    env.update(endpoint_env)
    return env


@app.command()
def run(
    recipe: RecipeArg,
    command: Annotated[list[str], typer.Argument(help="The command to run, after `--`.", show_default=False)],
    cloud: Cloud = None,
    gpu: Gpu = None,
    nodes: Nodes = None,
    region: Region = None,
    model: Model = None,
    name: Name = None,
    spot: Spot = None,
    network: Network = None,
    allow: Allow = None,
    ttl: Ttl = None,
    port: Port = None,
    pass_env: Annotated[
        Optional[list[str]],
        typer.Option("--pass-env", metavar="NAME",
                     help="Also pass this variable to COMMAND (repeatable; NAME,NAME; a trailing * matches a "
                          "prefix: 'MY_APP_*'). Cloud credentials and tokens reach COMMAND only if named.",
                     show_default=False),
    ] = None,
    json_out: Annotated[
        bool, typer.Option("--json", help="One JSON object on stdout; the command's stdout goes to stderr.")
    ] = False,
) -> None:
    """Bring an endpoint up, run COMMAND against it, always tear it down; exit with COMMAND's exit code.

    mistral-deploy run tiny-mistral --cloud local -- python my_eval.py

    COMMAND does not inherit this environment, which holds the cloud credentials: it gets OPENAI_BASE_URL,
    OPENAI_API_KEY and the CA bundle variables (SSL_CERT_FILE, ...) of the endpoint, a base set (PATH,
    HOME, USER, SHELL, LANG, LC_*, TERM, TZ, TMPDIR, VIRTUAL_ENV, PYTHONPATH, CI, GitHub Actions' non-secret
    GITHUB_* and RUNNER_* variables, ...), and what --pass-env names: AWS_*, GOOGLE_*, AZURE_*, HF_TOKEN,
    GITHUB_TOKEN and the rest only that way (--pass-env '*' passes everything).

    A private cloud endpoint (network mode private) is reached over an SSH tunnel that `run` holds open
    while COMMAND runs: OPENAI_BASE_URL is http(s)://127.0.0.1:PORT/v1, the tunnel's port.

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
    passed = parse_pass_env(pass_env)
    if not command:
        raise MistralDeployError("run: name the command to run after `--`, e.g. -- pytest tests/llm")
    import shutil

    if shutil.which(command[0]) is None:
        raise MistralDeployError(f"run: command not found: {command[0]!r} (nothing was started)")
    flags = overrides(cloud=cloud, gpu=gpu, nodes=nodes, region=region, model=model, name=name, spot=spot,
                      network=network, allow=allow, ttl=ttl, port=port)
    r = load(recipe, flags).recipe
    if not r.is_local and r.replicas is None and ttl is None and r.lifetime.ttl is None:
        # An ephemeral endpoint always ends by itself, even if this runner dies hard (killed, preempted,
        # cut off) and never reaches `down`. No TTL only when asked for: --ttl none.
        flags.ttl = DEFAULT_RUN_TTL
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
            with _reachable(backend, deployment, r, store, out) as endpoint:
                result["endpoint"] = endpoint  # a private endpoint: the tunnel the command uses
                env = command_env(os.environ, client_env(deployment, store), passed)
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


@contextmanager
def _reachable(backend: Any, deployment: "Deployment", recipe: "Recipe", store: "StateStore",
               out: Output) -> Iterator[Optional[str]]:
    """While open, the deployment's endpoint answers from this machine; yields its URL.

    A private cloud endpoint needs an SSH tunnel for that (up's own is closed): one is opened on the port
    `up` recorded, or on a free one when that is taken, and the record then names the tunnel's port, so
    that the URL the command gets, and `mistral-deploy env`/`status` run from the command, are the tunnel's.
    It must answer an authenticated one-token request through the tunnel before the command starts
    (NotReadyError, exit 8, if the tunnel cannot be opened or the endpoint does not answer). The tunnel is
    closed when the block ends, however it ends. Any other endpoint is reachable as it is."""
    open_tunnel = getattr(backend, "open_tunnel", None)
    if recipe.network.mode != "private" or deployment.backend != "cloud" or open_tunnel is None:
        yield deployment.endpoint
        return
    from urllib.parse import urlsplit

    from mistral_deploy import probe
    from mistral_deploy.errors import MistralDeployError, NotReadyError
    from mistral_deploy.processes import signals_ignored
    from mistral_deploy.skysdk import free_port, port_open

    name = deployment.name
    port = deployment.details.get("tunnel_port")
    if not port or port_open("127.0.0.1", int(port)):
        port = free_port()  # taken (another process, another `mistral-deploy tunnel`): a port of our own
    try:
        tunnel = open_tunnel(deployment, local_port=int(port))
    except MistralDeployError as exc:
        raise NotReadyError(f"run: no SSH tunnel to {name}'s private endpoint: {exc.message}") from None
    try:
        scheme = urlsplit(deployment.endpoint or "http://").scheme or "http"
        endpoint = f"{scheme}://127.0.0.1:{tunnel.local_port}/v1"
        key = next(iter(store.read_keys(name).values()), "")
        try:
            probe.wait_ready(endpoint, key, recipe.served_model_name, ca_file=deployment.tls_ca,
                             timeout=TUNNEL_READY_SECONDS, interval=min(recipe.health.probe_interval, 1.0),
                             alive=tunnel.alive, task=probe.probe_task(recipe))
        except NotReadyError as exc:
            why = "the SSH tunnel ended" if not tunnel.alive() else exc.message
            raise NotReadyError(f"run: {name}'s private endpoint did not answer through the SSH tunnel: {why}") \
                from None
        if endpoint != deployment.endpoint:
            deployment.endpoint = endpoint
            deployment.details["tunnel_port"] = tunnel.local_port
            store.save(deployment)
        yield endpoint
        if not tunnel.alive():
            out.warn(f"run: the SSH tunnel to {name} ended while the command ran")
    finally:
        with signals_ignored():  # closed before the teardown, whatever ended the block
            tunnel.close()


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
