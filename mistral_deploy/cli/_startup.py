"""What a command spends before it does anything, made smaller. None of it changes what a command does.

- Typer (0.29 and later) coerces every parameter through a pydantic TypeAdapter that it builds when the
  command runs, whatever the value: importing pydantic and building the adapters costs tens of
  milliseconds (`exit-codes`, `env` and `keys list` need no pydantic at all). PlainCoercion returns what
  the adapter would for the values a command line gives in the common cases (a string for `str`, a bool
  for a flag, digits for an `int` within its bounds, strings for `list[str]`, nothing given) and hands
  every other value, and every other type, to the adapter Typer builds, only then: results and error
  messages are Typer's. Older Typer versions, which coerce with click types, are left alone.
- pydantic imports importlib.metadata (email, zipfile, csv...: about 10 ms) to look for plugins when it
  builds a model, even when PYDANTIC_DISABLE_PLUGINS says there are none to look for.
- Start-up allocates hundreds of thousands of objects and frees few: the cyclic garbage collector's passes
  over them cost a command about 6% of its run. It is paused for the first second.
- At exit, the interpreter tears down every module it loaded (pydantic's, typer's...) and frees each of
  their objects: a tenth of a short command's run, to give back memory that the process's end gives back
  anyway. A command that reads only (exit_now's READ_ONLY) ends with os._exit once its output is flushed,
  where nothing else is left to run at exit: no atexit function, no thread but daemons.
"""

from __future__ import annotations

import atexit
import gc
import os
import re
import sys
import threading
import types
from typing import Any

_DIGITS = re.compile(r"[0-9]{1,18}")
_NO = object()
GC_PAUSE_SECONDS = 1.0
_PLUGINS_OFF = ("__all__", "1", "true")  # pydantic.plugin._loader: the values that disable every plugin
_PLUGIN_LOADER = "pydantic.plugin._loader"
# the commands (and `--help`, `--version`: no command) that write no file but through a closed one, start
# no process that outlives them and leave nothing for an atexit function or a finalizer to finish
READ_ONLY = frozenset({"", "recipes", "validate", "render", "schema", "exit-codes", "env", "keys list", "status",
                       "logs"})


class PlainCoercion:
    """Stands in for Typer's RuntimeParam of one parameter (its `coerce`), building that on first need."""

    __slots__ = ("descriptor", "_full")

    def __init__(self, descriptor: Any) -> None:
        self.descriptor = descriptor
        self._full: Any = None

    def coerce(self, value: Any, param: Any, ctx: Any) -> Any:
        multi = param.multiple or param.nargs == -1
        if value is None:  # as RuntimeParam.coerce: nothing given
            return () if multi else None
        if not (multi and isinstance(value, str)):
            plain = _plain(self.descriptor, value)
            if plain is not _NO:
                return plain
        if self._full is None:
            from typer._coercion import build_runtime_param

            self._full = build_runtime_param(self.descriptor)
        return self._full.coerce(value, param=param, ctx=ctx)


def _plain(descriptor: Any, value: Any) -> Any:
    """What Typer's adapter returns for `value`, when that is plain; _NO otherwise."""
    annotation, info = descriptor.annotation, descriptor.parameter_info
    if descriptor.file_annotation is not None or info.parser is not None or getattr(info, "click_type", None):
        return _NO
    if annotation is str:
        return value if type(value) is str else _NO
    if annotation is bool:
        return value if type(value) is bool else _NO
    if annotation is int:
        if type(value) is str and _DIGITS.fullmatch(value):
            value = int(value)
        if type(value) is not int or info.clamp:
            return _NO
        if (info.min is not None and value < info.min) or (info.max is not None and value > info.max):
            return _NO  # the adapter says what the bounds are
        return value
    if getattr(annotation, "__origin__", None) is list and getattr(annotation, "__args__", None) == (str,):
        if isinstance(value, (list, tuple)) and all(type(item) is str for item in value):
            return list(value)
    return _NO


def use_plain_coercion() -> None:
    """Every Typer parameter gets the plain coercion (once per process; what it cannot do, Typer does)."""
    try:
        from typer.core import _TyperParameter
    except ImportError:  # Typer before 0.29: click types, no adapters
        return
    if getattr(_TyperParameter, "_plain_coercion", False) or not hasattr(_TyperParameter, "get_runtime_param"):
        return

    def get_runtime_param(self: Any) -> Any:
        if getattr(self, "_runtime_param", None) is None:
            self._runtime_param = PlainCoercion(self.type_descriptor)
        return self._runtime_param

    _TyperParameter.get_runtime_param = get_runtime_param
    _TyperParameter._plain_coercion = True


def skip_pydantic_plugin_lookup() -> None:
    """While every pydantic plugin is disabled, pydantic's plugin loader (imported when pydantic builds its
    first model) is a stand-in that finds none without importing importlib.metadata. Any other name
    asked of it, or get_plugins once plugins are enabled again, is the real loader's, imported then."""
    if _PLUGIN_LOADER not in sys.modules and not any(isinstance(f, _PluginLoaderStandIn) for f in sys.meta_path):
        sys.meta_path.insert(0, _PluginLoaderStandIn())


def _plugins_off() -> bool:
    return os.environ.get("PYDANTIC_DISABLE_PLUGINS") in _PLUGINS_OFF


def _real_plugin_loader() -> Any:
    import importlib

    module = sys.modules.get(_PLUGIN_LOADER)
    if module is not None and isinstance(module.__spec__.loader, _PluginLoaderStandIn):
        del sys.modules[_PLUGIN_LOADER]  # the finder is gone: this import is pydantic's own
    return importlib.import_module(_PLUGIN_LOADER)


class _PluginLoaderStandIn:
    """A meta path finder and loader for pydantic.plugin._loader alone, used once."""

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> Any:
        if name != _PLUGIN_LOADER:
            return None
        sys.meta_path.remove(self)
        if not _plugins_off():
            return None  # pydantic's own
        from importlib.machinery import ModuleSpec

        return ModuleSpec(name, self)

    def create_module(self, spec: Any) -> None:
        return None  # a plain module

    def exec_module(self, module: types.ModuleType) -> None:
        def get_plugins() -> Any:
            return () if _plugins_off() else _real_plugin_loader().get_plugins()

        def __getattr__(name: str) -> Any:  # noqa: N807 (PEP 562)
            if name.startswith("__"):
                raise AttributeError(name)
            return getattr(_real_plugin_loader(), name)

        module.get_plugins = get_plugins  # type: ignore[attr-defined]
        module.__getattr__ = __getattr__  # type: ignore[attr-defined]


def pause_gc(seconds: float = GC_PAUSE_SECONDS) -> None:
    """No cyclic garbage collection for the first `seconds` of the process (a command that runs longer
    gets it back then; one that ends sooner leaves its garbage to the exit)."""
    if not gc.isenabled():
        return
    gc.disable()
    timer = threading.Timer(seconds, gc.enable)
    timer.daemon = True
    timer.name = "gc-pause"
    timer.start()


def exit_now(code: int, args: list[str]) -> None:
    """End the process with `code` at once, without the interpreter's teardown, when the command line `args`
    runs a READ_ONLY command, its output flushes, and nothing else would run at exit; otherwise return (the
    caller exits as usual)."""
    command = "" if not args or args[0].startswith("-") else " ".join(args[:2]) if args[0] == "keys" else args[0]
    if command not in READ_ONLY or getattr(atexit, "_ncallbacks", lambda: 1)() != 0:
        return
    if any(t.is_alive() and not t.daemon for t in threading.enumerate() if t is not threading.main_thread()):
        return
    try:
        for stream in (sys.stdout, sys.stderr):
            if stream is not None:
                stream.flush()
    except (OSError, ValueError):  # a closed pipe: the interpreter's own exit reports it, as always
        return
    os._exit(code)
