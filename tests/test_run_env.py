"""`run`'s command environment, without an engine: the command gets a base set, the endpoint's variables and
what --pass-env names, never a cloud credential or a token it was not given by name; bad --pass-env values
are one line naming the flag, before anything is started."""

from __future__ import annotations

import pytest

from _cli import run_cli
from mistral_deploy.cli.commands.run import BASE_ENV, command_env, parse_pass_env
from mistral_deploy.errors import MistralDeployError

ENDPOINT = {"OPENAI_BASE_URL": "https://127.0.0.1:8443/v1", "OPENAI_API_KEY": "sk-endpoint",
            "SSL_CERT_FILE": "/state/tls/trust-bundle.pem", "CURL_CA_BUNDLE": "/state/tls/trust-bundle.pem",
            "REQUESTS_CA_BUNDLE": "/state/tls/trust-bundle.pem", "MISTRAL_DEPLOY_CA_FILE": "/state/tls/ca.pem"}

# What a GitHub Actions runner's step with cloud credentials looks like, more or less.
ENVIRON = {
    "PATH": "/usr/bin:/bin", "HOME": "/home/runner", "USER": "runner", "SHELL": "/bin/bash", "LANG": "C.UTF-8",
    "LC_ALL": "C.UTF-8", "TERM": "xterm", "TMPDIR": "/tmp", "VIRTUAL_ENV": "/venv", "PYTHONPATH": "src",
    "CI": "true", "GITHUB_ACTIONS": "true", "GITHUB_SHA": "0123abc", "GITHUB_REF": "refs/heads/main",
    "GITHUB_WORKSPACE": "/home/runner/work/repo", "GITHUB_RUN_ID": "42", "GITHUB_STEP_SUMMARY": "/tmp/summary",
    "RUNNER_OS": "Linux", "RUNNER_TEMP": "/home/runner/_temp", "MISTRAL_DEPLOY_HOME": "/state",
    # secrets: none of these may reach the command unless named
    "GITHUB_TOKEN": "ghs_secret", "GH_TOKEN": "ghs_secret", "ACTIONS_ID_TOKEN_REQUEST_TOKEN": "oidc",
    "ACTIONS_RUNTIME_TOKEN": "runtime", "GITHUB_ENV": "/tmp/env", "GITHUB_PATH": "/tmp/path",
    "AWS_ACCESS_KEY_ID": "AKIA", "AWS_SECRET_ACCESS_KEY": "aws-secret", "AWS_SESSION_TOKEN": "aws-session",
    "GOOGLE_APPLICATION_CREDENTIALS": "/keys/gcp.json", "AZURE_CLIENT_SECRET": "azure-secret",
    "HF_TOKEN": "hf_secret", "CI_JOB_TOKEN": "gitlab", "MISTRAL_DEPLOY_PROBE_KEY": "probe",
    "MY_APP_URL": "http://app", "MY_APP_KEY": "app-key", "MY_OTHER": "other",
    # the caller's own OpenAI settings: the endpoint's win
    "OPENAI_BASE_URL": "https://api.openai.com/v1", "OPENAI_API_KEY": "sk-real-openai",
}
SECRETS = {"GITHUB_TOKEN", "GH_TOKEN", "ACTIONS_ID_TOKEN_REQUEST_TOKEN", "ACTIONS_RUNTIME_TOKEN", "AWS_ACCESS_KEY_ID",
           "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "GOOGLE_APPLICATION_CREDENTIALS", "AZURE_CLIENT_SECRET",
           "HF_TOKEN", "CI_JOB_TOKEN", "MISTRAL_DEPLOY_PROBE_KEY"}


def test_by_default_the_base_set_and_the_endpoint_and_no_credential() -> None:
    env = command_env(ENVIRON, ENDPOINT)
    assert not SECRETS & set(env)
    assert "GITHUB_ENV" not in env and "GITHUB_PATH" not in env  # they would reach the later steps' environment
    assert not {"MY_APP_URL", "MY_APP_KEY", "MY_OTHER"} & set(env)
    for name in ("PATH", "HOME", "USER", "SHELL", "LANG", "LC_ALL", "TERM", "TMPDIR", "VIRTUAL_ENV", "PYTHONPATH",
                 "CI", "GITHUB_ACTIONS", "GITHUB_SHA", "GITHUB_REF", "GITHUB_WORKSPACE", "GITHUB_RUN_ID",
                 "GITHUB_STEP_SUMMARY", "RUNNER_OS", "RUNNER_TEMP", "MISTRAL_DEPLOY_HOME"):
        assert env[name] == ENVIRON[name], name
    assert {key: env[key] for key in ENDPOINT} == ENDPOINT  # always, over the caller's own values


def test_the_base_set_names_no_credential() -> None:
    assert not SECRETS & BASE_ENV
    assert not [name for name in BASE_ENV if any(word in name for word in ("TOKEN", "SECRET", "KEY", "PASSWORD"))]


def test_named_variables_are_passed() -> None:
    env = command_env(ENVIRON, ENDPOINT, parse_pass_env(["AWS_SECRET_ACCESS_KEY", "GITHUB_TOKEN,HF_TOKEN"]))
    assert env["AWS_SECRET_ACCESS_KEY"] == "aws-secret" and env["GITHUB_TOKEN"] == "ghs_secret"
    assert env["HF_TOKEN"] == "hf_secret"
    assert "AWS_ACCESS_KEY_ID" not in env and "GH_TOKEN" not in env  # only those named
    assert "UNSET_VARIABLE" not in command_env(ENVIRON, ENDPOINT, ["UNSET_VARIABLE"])  # named but unset: absent


def test_a_trailing_star_is_a_prefix() -> None:
    env = command_env(ENVIRON, ENDPOINT, parse_pass_env(["MY_APP_*", "AWS_*"]))
    assert env["MY_APP_URL"] == "http://app" and env["MY_APP_KEY"] == "app-key" and "MY_OTHER" not in env
    assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"} <= set(env)
    assert "GOOGLE_APPLICATION_CREDENTIALS" not in env and "GITHUB_TOKEN" not in env
    everything = command_env(ENVIRON, ENDPOINT, parse_pass_env(["*"]))  # the explicit opt-out
    assert set(everything) == set(ENVIRON) | set(ENDPOINT) and everything["OPENAI_API_KEY"] == "sk-endpoint"


def test_naming_an_endpoint_variable_does_not_override_the_endpoint() -> None:
    env = command_env(ENVIRON, ENDPOINT, parse_pass_env(["OPENAI_API_KEY", "OPENAI_*"]))
    assert env["OPENAI_API_KEY"] == "sk-endpoint" and env["OPENAI_BASE_URL"] == ENDPOINT["OPENAI_BASE_URL"]


def test_parse_pass_env_accepts_names_lists_and_globs() -> None:
    assert parse_pass_env(None) == ()
    assert parse_pass_env(["A", " B , _c1 ", "MY_APP_*", "*"]) == ("A", "B", "_c1", "MY_APP_*", "*")


@pytest.mark.parametrize(("value", "shown"), [
    ("MY-VAR", "'MY-VAR'"), ("1ABC", "'1ABC'"), ("A=B", "'A=B'"), ("MY_*_KEY", "'MY_*_KEY'"), ("*A", "'*A'"),
    ("A B", "'A B'"), ("A,", "an empty name in 'A,'"), ("", "an empty name"), ("$HOME", "'$HOME'"),
])
def test_parse_pass_env_refuses_what_is_not_a_name(value: str, shown: str) -> None:
    with pytest.raises(MistralDeployError) as raised:
        parse_pass_env(["OK", value])
    assert raised.value.message.startswith(f"--pass-env: {shown}") and "\n" not in raised.value.message


def test_a_bad_pass_env_is_one_line_and_starts_nothing(tmp_path) -> None:
    env = {"MISTRAL_DEPLOY_HOME": str(tmp_path / "state")}
    result = run_cli("run", "tiny-mistral", "--cloud", "local", "--pass-env", "GOOD", "--pass-env", "MY-VAR",
                     "--", "true", env=env)
    assert result.exit_code == MistralDeployError.exit_code
    assert result.stderr.splitlines() == [
        "error: --pass-env: 'MY-VAR' is not a variable name (letters, digits and _, not starting with a digit) "
        "or a PREFIX* glob such as 'MY_APP_*'"]
    assert "Traceback" not in result.output and not (tmp_path / "state").exists()
