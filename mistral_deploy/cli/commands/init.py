"""`mistral-deploy init --ci github`: a GitHub Actions workflow that tests against an ephemeral endpoint."""

from __future__ import annotations

import enum
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from mistral_deploy.cli import app
from mistral_deploy.cli._options import DEFAULT_RECIPE, Cloud, Gpu, load, overrides
from mistral_deploy.cli._output import Output

DEFAULT_WORKFLOW = Path(".github/workflows/llm-tests.yml")
DEFAULT_TTL = "1h"
DEFAULT_TEST_COMMAND = "pytest tests/llm"
WORKFLOW_TEMPLATE = "github-workflow.yml.j2"
PYTHON_VERSION = "3.11"
# Minutes the job may run beyond the TTL: provisioning, the model download, teardown.
JOB_TIMEOUT_MARGIN_MIN = 30

# Repository secrets per cloud, and what each one holds.
CLOUD_SECRETS: dict[str, tuple[tuple[str, str], ...]] = {
    "aws": (("AWS_ACCESS_KEY_ID", "access key id of an IAM user SkyPilot may launch with"),
            ("AWS_SECRET_ACCESS_KEY", "its secret access key")),
    "gcp": (("GCP_CREDENTIALS", "a service account key (JSON) for google-github-actions/auth"),),
    "azure": (("AZURE_CREDENTIALS", "a service principal (JSON, `az ad sp create-for-rbac --sdk-auth`) "
                                    "for azure/login"),),
}
HF_TOKEN_SECRET = ("HF_TOKEN", "a Hugging Face token with access to the gated model")
# The GitHub environment that holds the credentials (and whose required reviewers gate each run), and the
# branch whose pushes run the workflow. Never pull_request(_target): see the template's opening comment.
GITHUB_ENVIRONMENT = "cloud"
DEFAULT_BRANCH = "main"


class CiSystem(str, enum.Enum):
    github = "github"


@app.command()
def init(
    ci: Annotated[CiSystem, typer.Option("--ci", help="The CI system to write a workflow for.")],
    out_path: Annotated[
        Path, typer.Option("--out", help="Where to write the workflow.", show_default=True)
    ] = DEFAULT_WORKFLOW,
    recipe: Annotated[
        str, typer.Option("--recipe", help="A built-in recipe name or a recipe YAML file in the repository.")
    ] = DEFAULT_RECIPE,
    cloud: Cloud = None,
    gpu: Gpu = None,
    ttl: Annotated[
        str, typer.Option("--ttl", help="Tear the endpoint down after this long, even if the runner dies.")
    ] = DEFAULT_TTL,
    command: Annotated[
        str, typer.Option("--command", help="The test command, run with OPENAI_BASE_URL and OPENAI_API_KEY set.")
    ] = DEFAULT_TEST_COMMAND,
    install_from: Annotated[
        Optional[str],
        typer.Option("--install-from", "--package",
                     help="Where the job installs mistral-deploy from, pinned: git+https://HOST/REPO@<40-hex commit> "
                          "or an archive URL ending #sha256=<hex>. Default: where this copy came from (pip's "
                          "record), never a package index."),
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing file.")] = False,
) -> None:
    """Write a CI workflow that brings up an ephemeral endpoint with the cloud credentials from the
    secrets of the `cloud` GitHub environment, runs the tests against it, and always tears it down (the
    TTL is the backstop). It runs on pushes to main and by hand, never on pull requests: give the
    environment required reviewers and each run waits for a maintainer's approval.

    The job installs mistral-deploy from a pinned source (mistral-deploy is not on PyPI, where the name could
    be anyone's): where this copy came from as pip recorded it (git at its commit, an archive with its
    sha256, this repository's own folder, or the pushed commit of a clean git checkout), or --install-from.

    Exit 0: written; 1: the file exists (pass --force) or cannot be written; 3: invalid recipe or flag, or no
    pinned source for mistral-deploy.
    """
    from mistral_deploy.errors import MistralDeployError, RecipeError
    from mistral_deploy.install_source import resolve

    output = Output()
    if out_path.exists() and not force:
        raise MistralDeployError(f"{out_path} exists; pass --force to overwrite it")
    if install_from is not None and ("\n" in install_from or "\r" in install_from):
        raise RecipeError("--install-from: must be one line")
    source = resolve(install_from, out_path)
    renderer = {CiSystem.github: render_github_workflow}[ci]
    text, secrets = renderer(recipe=recipe, cloud=cloud, gpu=gpu, ttl=ttl, command=command,
                             package=source.requirement, package_origin=source.origin)
    try:
        out_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = out_path.with_name(out_path.name + ".tmp")
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(out_path)
    except OSError as exc:
        raise MistralDeployError(f"--out: cannot write {out_path}: {exc.strerror}") from None
    output.info(f"wrote {out_path}")
    output.info(f"the job installs mistral-deploy from {source.origin}: {source.requirement}")
    output.info(f"add these secrets to the GitHub environment {GITHUB_ENVIRONMENT!r} (Settings > Environments) "
                "and give it required reviewers: " + ", ".join(name for name, _ in secrets))
    output.info(f"the workflow runs on pushes to {DEFAULT_BRANCH} and by hand, never on pull requests")
    if Path(recipe).suffix in (".yaml", ".yml"):
        output.info(f"the workflow reads {recipe} from the repository: commit it")


def render_github_workflow(*, recipe: str, cloud: Optional[str], gpu: Optional[str], ttl: str, command: str,
                           package: str, package_origin: str) -> tuple[str, tuple[tuple[str, str], ...]]:
    """The workflow's text, and the repository secrets it reads. Validates the recipe with the flags.
    `package`: the pinned pip requirement for mistral-deploy (mistral_deploy.install_source), `package_origin`
    where it comes from, in words."""
    import math
    import shlex
    from importlib import metadata

    import yaml

    from mistral_deploy.errors import MistralDeployError, RecipeError
    from mistral_deploy.recipe import format_duration
    from mistral_deploy.templates import render_template

    for flag, value in (("--recipe", recipe), ("--command", command), ("--install-from", package),
                        ("--install-from", package_origin)):
        if "\n" in value or "\r" in value:
            raise RecipeError(f"{flag}: must be one line")
    if not command.strip():
        raise RecipeError("--command: must not be empty")
    loaded = load(recipe, overrides(cloud=cloud, gpu=gpu, ttl=ttl))
    named = loaded.recipe.resources.clouds or ["aws"]
    if len(named) > 1:
        where = "--cloud" if cloud else f"{loaded.source}: resources.cloud"
        raise RecipeError(f"{where}: a workflow sets up one cloud's credentials; name one of {', '.join(named)}")
    target = named[0]
    if target not in CLOUD_SECRETS:
        where = "--cloud" if cloud else f"{loaded.source}: resources.cloud"
        raise RecipeError(f"{where}: init --ci github writes credentials for {', '.join(CLOUD_SECRETS)}; "
                          f"got {target!r}")
    ttl_seconds = loaded.recipe.lifetime.ttl
    assert ttl_seconds is not None  # the --ttl flag always sets it

    deploy_args = [shlex.quote(recipe), "--cloud", target]
    if gpu:
        deploy_args += ["--gpu", shlex.quote(gpu)]
    secrets = CLOUD_SECRETS[target] + ((HF_TOKEN_SECRET,) if loaded.recipe.model.needs_hf_token else ())
    try:
        skypilot_version = metadata.version("skypilot")
    except metadata.PackageNotFoundError:
        skypilot_version = None
    sky_requirement = f"skypilot[{target}]" + (f"=={skypilot_version}" if skypilot_version else "")
    requirements = [package, sky_requirement]
    context: dict[str, Any] = {
        "cloud": target,
        "recipe_label": f"{recipe}" + (f" on {gpu}" if gpu else ""),
        "deploy_args": " ".join(deploy_args),
        "ttl": format_duration(ttl_seconds),
        "timeout_minutes": math.ceil(ttl_seconds / 60) + JOB_TIMEOUT_MARGIN_MIN,
        "command": command.strip(),
        "install": " ".join(shlex.quote(r) for r in requirements),
        "install_origin": f"mistral-deploy from {package_origin}: pinned, never a name on a package index",
        "python_version": PYTHON_VERSION,
        "hf_token": loaded.recipe.model.needs_hf_token,
        "secrets": secrets,
        "environment": GITHUB_ENVIRONMENT,
        "branch": DEFAULT_BRANCH,
        "secret": lambda name: "${{ secrets." + name + " }}",
    }
    text = render_template(WORKFLOW_TEMPLATE, **context)
    try:
        parsed = yaml.safe_load(text)
    except yaml.YAMLError as exc:  # a flag value that breaks the YAML: ours to fix, not the user's
        raise MistralDeployError(f"the rendered workflow is not valid YAML: {exc}") from None
    if not isinstance(parsed, dict) or "jobs" not in parsed:
        raise MistralDeployError("the rendered workflow has no jobs")
    triggers = parsed.get("on", parsed.get(True)) or {}  # YAML 1.1 reads a bare `on` as true
    if "pull_request" in triggers or "pull_request_target" in triggers:  # would hand a PR's code the secrets
        raise MistralDeployError("the rendered workflow runs on pull requests")
    return text, secrets
