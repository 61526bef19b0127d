"""Every test runs isolated: its own state dir, SkyPilot home and HOME, no cloud credentials, no colour.

The local vLLM engine's Python is looked up once, before the isolation, from the real environment:
$MISTRAL_DEPLOY_ENGINE_PYTHON, or the engine `mistral-deploy engine install` put in the user data dir.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

ENGINE_PYTHON_ENV = "MISTRAL_DEPLOY_ENGINE_PYTHON"
REPO = Path(__file__).resolve().parent.parent


def _real_engine_python() -> str | None:
    explicit = os.environ.get(ENGINE_PYTHON_ENV)
    if explicit:
        return explicit
    from mistral_deploy.paths import data_dir

    candidate = data_dir() / "engine" / "venv" / "bin" / "python"
    return str(candidate) if candidate.exists() else None


ENGINE_PYTHON = _real_engine_python()
_CLOUD_ENV_PREFIXES = ("AWS_", "GOOGLE_", "GCLOUD_", "AZURE_", "SKYPILOT_", "SKY_", "KUBECONFIG", "HF_TOKEN",
                       "OPENAI_", "MISTRAL_DEPLOY_")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--update-golden", action="store_true", help="rewrite the golden files under tests/golden")


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Built-in models are built once per test session (the tiny model takes seconds), not once per test."""
    return tmp_path_factory.mktemp("models")


@pytest.fixture(autouse=True)
def isolated(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch, models_dir: Path) -> Path:
    root = tmp_path_factory.mktemp("isolated")
    for key in list(os.environ):
        if key.startswith(_CLOUD_ENV_PREFIXES):
            monkeypatch.delenv(key, raising=False)
    home = root / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("MISTRAL_DEPLOY_HOME", str(root / "state"))
    monkeypatch.setenv("SKY_RUNTIME_DIR", str(root / "sky"))
    monkeypatch.setenv("SKYPILOT_DISABLE_USAGE_COLLECTION", "1")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("NO_COLOR", "1")
    monkeypatch.setenv("COLUMNS", "120")
    monkeypatch.setenv("TERM", "dumb")
    monkeypatch.setenv("MISTRAL_DEPLOY_MODELS_DIR", str(models_dir))
    # SkyPilot's catalogs are never fetched from the internet by a test: a closed loopback port instead
    monkeypatch.setenv("MISTRAL_DEPLOY_SKYPILOT_CATALOG_URL", "http://127.0.0.1:9/catalogs")
    if ENGINE_PYTHON:
        monkeypatch.setenv(ENGINE_PYTHON_ENV, ENGINE_PYTHON)
    return root


@pytest.fixture
def cli_path() -> str:
    """The installed console script (tests run it for real in a subprocess)."""
    # the venv's bin folder need not be on PATH (`.venv/bin/python -m pytest`)
    path = shutil.which("mistral-deploy") or shutil.which("mistral-deploy", path=str(Path(sys.executable).parent))
    assert path, "mistral-deploy is not installed: pip install -e '.[test]'"
    return path
