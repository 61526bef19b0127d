"""Errors that reach the user, and the exit code each one maps to.

MistralDeployError                  exit 1, anything we report without a traceback
├── RecipeError                     exit 3, a recipe or a flag that overrides it is invalid
├── FitError                        exit 4, the model does not fit the chosen GPUs
├── DeploymentNotFound              exit 5, no deployment of that name in the state store
├── DeploymentExists                exit 6, a deployment of that name is already recorded
├── EngineError                     exit 7, the local engine or gateway could not be set up or started
├── NotReadyError                   exit 8, the endpoint did not become ready (engine died, timeout)
└── CloudError                      exit 9, SkyPilot refused or failed (credentials, quota, capacity)

Typer's own usage errors exit 2; an interrupted command exits 130.
"""

from __future__ import annotations


class MistralDeployError(Exception):
    """Base class: carries a one-line message for the user and an exit code."""

    exit_code = 1

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message


class RecipeError(MistralDeployError):
    exit_code = 3


class FitError(MistralDeployError):
    exit_code = 4


class DeploymentNotFound(MistralDeployError):
    exit_code = 5


class DeploymentExists(MistralDeployError):
    exit_code = 6


class EngineError(MistralDeployError):
    exit_code = 7


class NotReadyError(MistralDeployError):
    exit_code = 8

    def __init__(self, message: str, *, hint: str | None = None, log_tail: str = "") -> None:
        super().__init__(message, hint=hint)
        self.log_tail = log_tail


class CloudError(MistralDeployError):
    exit_code = 9


EXIT_INTERRUPTED = 130

EXIT_CODES = {
    0: "success",
    1: "other error reported by mistral-deploy",
    2: "usage error (unknown command, flag or missing argument)",
    RecipeError.exit_code: "invalid recipe or override flag",
    FitError.exit_code: "the model does not fit the chosen GPUs",
    DeploymentNotFound.exit_code: "no such deployment",
    DeploymentExists.exit_code: "a deployment of that name already exists",
    EngineError.exit_code: "the local engine or gateway could not be started",
    NotReadyError.exit_code: "the endpoint did not become ready",
    CloudError.exit_code: "SkyPilot or the cloud refused (credentials, quota, capacity)",
    EXIT_INTERRUPTED: "interrupted (Ctrl-C / SIGTERM); the deployment was cleaned up or recorded",
}
