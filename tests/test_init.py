"""`init --ci github`: the workflow it writes parses as YAML, has the expected job and steps, reads the cloud's
credentials from the secrets of a GitHub environment, never runs on pull requests, always tears down, and is
never written over without --force."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml

from _cli import run_cli
from mistral_deploy.errors import RecipeError

USAGE_ERROR = 2


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
    assert list(steps) == ["actions/checkout@v4", "actions/setup-python@v5", "Install mistral-deploy",
                           "Preflight (cloud access, GPU quota)", "Run the tests against an ephemeral endpoint",
                           "Tear down whatever is left"]
    install = shlex.split(steps["Install mistral-deploy"]["run"])
    assert install[:4] == ["python", "-m", "pip", "install"] and install[4].startswith("mistral-deploy==")
    assert install[5].startswith("skypilot[aws]")

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
    ("gcp", "google-github-actions/auth@v2", "GCP_CREDENTIALS"),
    ("azure", "azure/login@v2", "AZURE_CREDENTIALS"),
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
