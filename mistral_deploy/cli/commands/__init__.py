"""The commands, one module each; importing a module registers its command on the app.

`register()` imports them all (`--help` lists them); `register(NAME)` only the module of the command NAME,
so that a command imports nothing that another one needs. A new command module goes in MODULES
(tests/test_cli_help.py checks that every module is there, under the name it registers).
"""

from __future__ import annotations

import importlib
from typing import Optional

# command name -> its module, in the order `--help` lists a command that no section names
MODULES = {
    "up": "up", "down": "down", "run": "run", "ttl": "ttl", "keys": "keys",
    "status": "status", "env": "env", "tunnel": "tunnel", "logs": "logs", "top": "top", "usage": "usage",
    "metrics": "metrics", "bench": "bench",
    "recipes": "recipes", "validate": "validate", "plan": "plan", "render": "render", "schema": "schema",
    "cache": "cache",
    "doctor": "doctor", "init": "init", "engine": "engine", "exit-codes": "exit_codes",
}


def register(name: Optional[str] = None) -> None:
    """Register the command `name` on the app, or every command when name is None or unknown."""
    modules = [MODULES[name]] if name in MODULES else list(dict.fromkeys(MODULES.values()))
    for module in modules:
        importlib.import_module(f"{__name__}.{module}")
