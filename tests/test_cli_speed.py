"""The commands that need no cloud start fast: none imports SkyPilot, vLLM or torch (each costs seconds), and
each imports only what it uses (benchmarks/cli_latency.py times them against `sky --help`).

Checked in a fresh interpreter, which runs the CLI's main() for each command and then lists the modules it
loaded. No timing is asserted here.
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import time
import types
from pathlib import Path
from typing import Any

import pytest

HEAVY = ("sky", "vllm", "torch")
# what start-up avoids where a command does not use it (see mistral_deploy/cli/_startup.py)
RECIPE_LIBS = ("pydantic", "yaml", "jinja2", "rich")
METADATA = ("importlib.metadata", "email", "zipfile", "csv")

_RUNNER = """
import json, sys
from mistral_deploy.cli import main
for argv in json.loads(sys.argv[1]):
    try:
        main(argv)
    except SystemExit as exc:
        assert exc.code in (0, None), (argv, exc.code)
names = json.loads(sys.argv[2])
loaded = sorted(m for m in sys.modules if any(m == n or m.startswith(n + '.') for n in names))
print(json.dumps(loaded), file=sys.stderr)
"""


def _modules_after(commands: list[list[str]], names: tuple[str, ...]) -> list[str]:
    """The modules among `names` (and their submodules) loaded after running `commands` in one interpreter."""
    proc = subprocess.run([sys.executable, "-c", _RUNNER, json.dumps(commands), json.dumps(names)],
                          capture_output=True, text=True, timeout=120, env=dict(os.environ))
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stderr.strip().splitlines()[-1])


def _heavy_modules_after(commands: list[list[str]], heavy: tuple[str, ...] = HEAVY) -> list[str]:
    return sorted({m.split(".")[0] for m in _modules_after(commands, heavy)})


@pytest.fixture
def local_deployment() -> str:
    """A local deployment as `up` records it (nothing running: status probes nothing), with a key and a log."""
    from mistral_deploy.recipe import Overrides, load_recipe
    from mistral_deploy.state import Deployment, StateStore

    recipe = load_recipe("tiny-mistral", Overrides(cloud="local", name="quick")).recipe
    store = StateStore()
    store.reserve(Deployment(name="quick", backend="local", recipe=recipe.to_yaml_config(), phase="ready",
                             endpoint="http://127.0.0.1:9/v1", details={"network": "private"}))
    store.write_keys("quick", {"key-1": "sk-quick"})
    (store.dir("quick") / "engine.log").write_text("one\ntwo\n", encoding="utf-8")
    return "quick"


def test_fast_commands_do_not_import_sky_vllm_or_torch(local_deployment: str) -> None:
    commands = [["--help"], ["recipes"], ["validate", "tiny-mistral"], ["render", "mistral-7b", "--cloud", "aws"],
                ["recipes", "show", "mistral-7b"], ["schema"], ["exit-codes"], ["env", local_deployment],
                ["keys", "list", local_deployment], ["status", local_deployment], ["logs", local_deployment]]
    assert _heavy_modules_after(commands) == []


def test_help_does_not_even_import_pydantic() -> None:
    """--help loads typer only: command modules import the recipe model (pydantic, yaml, jinja2) lazily."""
    assert _heavy_modules_after([["--help"]], ("pydantic", "yaml", "jinja2", "rich", *HEAVY)) == []


@pytest.mark.parametrize("argv", [["exit-codes"], ["env", "{d}"], ["keys", "list", "{d}"], ["logs", "{d}"],
                                  ["status"], ["status", "{d}"]], ids=lambda argv: " ".join(argv))
def test_commands_without_a_recipe_import_no_recipe_library(argv: list[str], local_deployment: str,
                                                            tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Typer's parameters are coerced without pydantic (PlainCoercion); the local backend's modules import
    the recipe model, YAML and templates only where they use them. `status` with no deployment, too, and
    a local deployment's `status` reads its served model name from the record (Deployment.served_model_name)."""
    if argv == ["status"]:
        monkeypatch.setenv("MISTRAL_DEPLOY_HOME", str(tmp_path / "empty"))
    argv = [a.format(d=local_deployment) for a in argv]
    assert _heavy_modules_after([argv], (*RECIPE_LIBS[:3], *HEAVY)) == []


@pytest.mark.parametrize("argv,unused", [
    (["validate", "mistral-7b"], ("jinja2", "rich")),
    (["recipes"], ("jinja2", "rich")),
    (["recipes", "show", "mistral-7b"], ("jinja2", "rich")),
    (["schema"], ("yaml", "jinja2", "rich")),
    (["render", "mistral-7b", "--cloud", "aws"], ("rich",)),
], ids=lambda v: " ".join(v) if isinstance(v, list) else None)
def test_recipe_commands_import_only_what_they_use(argv: list[str], unused: tuple[str, ...]) -> None:
    assert _heavy_modules_after([argv], unused) == []


@pytest.mark.parametrize("argv", [["validate", "mistral-7b"], ["render", "mistral-7b", "--cloud", "aws"]],
                         ids=lambda argv: argv[0])
def test_pydantic_does_not_look_for_plugins(argv: list[str]) -> None:
    """PYDANTIC_DISABLE_PLUGINS is set: its plugin loader's stand-in finds none without importing
    importlib.metadata (and email, zipfile, csv with it)."""
    assert _modules_after([argv], METADATA) == []


def test_a_command_imports_its_own_module_only() -> None:
    loaded = _modules_after([["render", "mistral-7b", "--cloud", "aws"]], ("mistral_deploy.cli.commands",))
    assert loaded == ["mistral_deploy.cli.commands", "mistral_deploy.cli.commands.render"]


def test_default_recipe_constant_matches() -> None:
    from mistral_deploy.cli._options import DEFAULT_RECIPE as cli_default
    from mistral_deploy.recipe import DEFAULT_RECIPE

    assert cli_default == DEFAULT_RECIPE


# --- what start-up changes returns what it would have otherwise --------------------------------------------


def _outcome(runtime: Any, value: Any, *, multiple: bool = False) -> tuple[str, Any]:
    from typer._click.exceptions import BadParameter

    param = types.SimpleNamespace(multiple=multiple, nargs=1, name="p")
    try:
        result = runtime.coerce(value, param=param, ctx=None)
    except BadParameter as exc:
        return "error", exc.message
    return "value", (type(result).__name__, result)


CASES: list[tuple[Any, dict[str, Any], list[Any]]] = [
    (str, {}, ["x", "", "  spaced ", "ünï", b"bytes", None, 5]),
    (bool, {}, [True, False, None, "true", "no", "maybe"]),
    (int, {}, ["8443", "0", "007", "-3", "+4", " 5", "1_000", "x", "1.5", 7, None, "9" * 30]),
    (int, {"min": 0}, ["0", "-1", "100"]),
    (int, {"min": 1, "max": 65535}, ["1", "65535", "65536", "0"]),
    (int, {"min": 0, "max": 10, "clamp": True}, ["11", "-2", "3"]),
    (list[str], {}, [("a", "b"), (), ["x"], None]),
    (Path, {}, ["out", None]),
    (float, {}, ["1.5", "x"]),
]


@pytest.mark.parametrize("annotation,info,values", CASES, ids=lambda v: repr(v)[:30])
def test_plain_coercion_returns_what_typer_returns(annotation: Any, info: dict[str, Any], values: list[Any]) -> None:
    typer_coercion = pytest.importorskip("typer._coercion")
    from typer.models import OptionInfo

    from mistral_deploy.cli._startup import PlainCoercion

    descriptor = typer_coercion.resolve_type_descriptor(annotation, OptionInfo(**info))
    multiple = annotation == list[str]
    for value in values:
        expected = _outcome(typer_coercion.build_runtime_param(descriptor), value, multiple=multiple)
        assert _outcome(PlainCoercion(descriptor), value, multiple=multiple) == expected, value


def test_usage_errors_are_typers_own() -> None:
    from _cli import run_cli

    result = run_cli("logs", "x", "--lines", "-1")
    assert result.exit_code == 2 and "Invalid value for '--lines' / '-n'" in result.stderr
    assert "greater than or equal to 0" in result.stderr
    result = run_cli("render", "mistral-7b", "--port", "https")
    assert result.exit_code == 2 and "Invalid value for '--port'" in result.stderr


def test_the_plugin_loader_stand_in_defers_to_pydantics_own() -> None:
    code = """
import os, sys
os.environ["PYDANTIC_DISABLE_PLUGINS"] = "__all__"
from mistral_deploy.cli import _startup
_startup.skip_pydantic_plugin_lookup()
from pydantic import BaseModel
class M(BaseModel):
    x: int
assert M(x="3").x == 3
assert "importlib.metadata" not in sys.modules
from pydantic.plugin import _loader
assert tuple(_loader.get_plugins()) == ()
assert _loader.PYDANTIC_ENTRY_POINT_GROUP == "pydantic"  # not the stand-in's: pydantic's own loader
os.environ["PYDANTIC_DISABLE_PLUGINS"] = "other"
assert list(_loader.get_plugins()) == []  # looked up, for real
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


def test_garbage_collection_comes_back_after_the_pause() -> None:
    from mistral_deploy.cli._startup import pause_gc

    assert gc.isenabled()
    try:
        pause_gc(0.05)
        assert not gc.isenabled()
        deadline = time.monotonic() + 5
        while not gc.isenabled() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert gc.isenabled()
    finally:
        gc.enable()


def test_compiled_templates_are_cached_and_a_broken_cache_is_skipped(tmp_path: Path) -> None:
    import jinja2

    from mistral_deploy import resources_dir, templates

    def compile_with(cache: Any) -> jinja2.Template:
        env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(resources_dir("templates"))),
                                 undefined=jinja2.StrictUndefined, bytecode_cache=cache, **templates._OPTIONS)
        return env.get_template("reload.sh.j2")

    cache_dir = tmp_path / "cache"
    cache_dir.mkdir()
    compile_with(templates._bytecode_cache(str(cache_dir)))
    [entry] = cache_dir.iterdir()  # compiled once, kept
    written = entry.stat().st_mtime_ns
    compile_with(templates._bytecode_cache(str(cache_dir)))  # read back, not written again
    assert [p.stat().st_mtime_ns for p in cache_dir.iterdir()] == [written]
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("")
    assert compile_with(templates._bytecode_cache(str(not_a_folder))).name == "reload.sh.j2"  # no cache, no error


# --- the end of a read-only command, and PyYAML's import -------------------------------------------------

_CONSOLE = """
import atexit, sys
sys.argv = ["mistral-deploy", *sys.argv[1:]]
if "--with-atexit" in sys.argv:
    sys.argv.remove("--with-atexit")
    atexit.register(lambda: print("atexit ran", flush=True))
class Teardown:
    def __del__(self):
        print("torn down", flush=True)
keep = Teardown()  # finalized by the interpreter's teardown, never by os._exit
from mistral_deploy.cli import main
main()
"""


def _console(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", _CONSOLE, *args], capture_output=True, text=True, timeout=60)


def test_a_read_only_command_ends_without_the_teardown_and_keeps_its_output_and_code(tmp_path: Path) -> None:
    """The console script ends a READ_ONLY command with os._exit once its output is flushed: what it
    printed, and its exit code, are the same."""
    proc = _console("exit-codes")
    assert proc.returncode == 0 and "torn down" not in proc.stdout
    assert proc.stdout.strip() and proc.stdout == _console("exit-codes", "--with-atexit").stdout.replace(
        "atexit ran\n", "").replace("torn down\n", "")
    proc = _console("validate", str(tmp_path / "missing.yaml"))
    assert proc.returncode == 3 and "recipe file not found" in proc.stderr and "torn down" not in proc.stdout


def test_the_teardown_runs_where_something_waits_for_it() -> None:
    """An atexit function registered, or a command that is not READ_ONLY: the interpreter's usual exit."""
    proc = _console("exit-codes", "--with-atexit")
    assert proc.returncode == 0 and "atexit ran" in proc.stdout and "torn down" in proc.stdout
    proc = _console("keys", "--help")
    assert proc.returncode == 0 and "torn down" in proc.stdout


def test_yaml_reader_pattern_is_compiled_on_first_use() -> None:
    code = """
import re, sys
from mistral_deploy.yaml_lib import NON_PRINTABLE, LazyPattern, import_yaml
yaml = import_yaml()
assert isinstance(yaml.reader.Reader.NON_PRINTABLE, LazyPattern)
assert not any(isinstance(v, LazyPattern) for v in list(re._cache.values()) + list(getattr(re, "_cache2", {}).values()))
assert yaml.safe_load("a: [1, 2]") == {"a": [1, 2]}  # the pure-Python reader, which uses the pattern
try:
    yaml.safe_load("a: \x01")
except yaml.reader.ReaderError as exc:
    assert "#x0001" in str(exc)
else:
    raise AssertionError("a non-printable character was accepted")
assert yaml.reader.Reader.NON_PRINTABLE.pattern == NON_PRINTABLE
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    import yaml  # the pattern, as PyYAML's own source writes it

    assert yaml.reader.Reader.NON_PRINTABLE.pattern == __import__("mistral_deploy.yaml_lib").yaml_lib.NON_PRINTABLE
