"""`mistral-deploy --help` lists every command once, in sections, in the order a user looks for them; each
command lives in the module MODULES names (a command imports that module only)."""

from __future__ import annotations

import re
from pathlib import Path

import typer

from _cli import run_cli
from mistral_deploy.cli import COMMAND_SECTIONS, OTHER_SECTION, _register, app
from mistral_deploy.cli import commands as commands_package
from mistral_deploy.cli.commands import MODULES

SECTION_ORDER = ["Create and change", "Use and watch", "Recipes", "Setup"]


def _registered() -> dict[str, str]:
    """Every command registered on the app -> the module that registered it."""
    _register()
    from typer.main import get_command_name

    found: dict[str, str] = {}
    for info in app.registered_commands:
        found[info.name or get_command_name(info.callback.__name__)] = info.callback.__module__
    for group in app.registered_groups:
        sub = group.typer_instance
        callback = sub.registered_callback.callback if sub.registered_callback else sub.registered_commands[0].callback
        found[group.name] = callback.__module__
    return found


def _sections(help_text: str) -> dict[str, list[str]]:
    """The help's sections of commands: title -> command names, in the order printed."""
    sections: dict[str, list[str]] = {}
    current = None
    for line in help_text.splitlines():
        title = re.fullmatch(r"([A-Z][A-Za-z ]*):", line)
        if title:
            current = sections.setdefault(title.group(1), [])
        elif current is not None and re.match(r"  [a-z]", line):
            current.append(line.split()[0])
        elif not line.strip():
            current = None
    sections.pop("Options", None)
    sections.pop("Usage", None)
    return sections


def test_sections_name_registered_commands_once_each() -> None:
    named = [name for _, names in COMMAND_SECTIONS for name in names]
    assert len(named) == len(set(named)), "a command in two sections"
    assert set(named) <= set(_registered()), "a section names a command that does not exist"
    assert [title for title, _ in COMMAND_SECTIONS] == SECTION_ORDER


def test_help_lists_every_command_in_exactly_one_section_in_order() -> None:
    result = run_cli("--help")
    assert result.exit_code == 0, result.output
    sections = _sections(result.stdout)
    expected = [title for title in SECTION_ORDER if title in sections]
    assert list(sections) == expected or list(sections) == [*expected, OTHER_SECTION]
    assert list(sections)[:4] == SECTION_ORDER
    listed = [name for names in sections.values() for name in names]
    assert sorted(listed) == sorted(_registered()), "each command listed once"
    for title, names in COMMAND_SECTIONS:  # in the order the sections give
        assert sections[title] == list(names)
    assert sections["Create and change"] == ["up", "down", "run", "ttl", "keys"]
    assert sections["Use and watch"] == ["status", "env", "tunnel", "logs", "top", "usage", "metrics", "bench"]
    assert sections["Recipes"] == ["recipes", "validate", "plan", "render", "schema", "cache"]
    assert sections["Setup"] == ["doctor", "init", "engine", "exit-codes"]
    # the help texts line up across sections
    rows = [line for line in result.stdout.splitlines() if line[:2] == "  " and line.split()[:1] and
            line.split()[0] in listed]
    assert len(rows) == len(listed) and len({len(row) - len(row[2:].lstrip().split(maxsplit=1)[1]) for row in rows}) == 1


def test_a_command_in_no_section_is_listed_under_other() -> None:
    _register()
    extra = typer.Typer()

    @extra.command("zz-new")
    def zz_new() -> None:
        """A command no section names yet."""

    group = typer.main.get_command(app)
    group.add_command(typer.main.get_command(extra), "zz-new")
    ctx = group.context_class(group, info_name="mistral-deploy")
    sections = _sections(group.get_help(ctx))
    assert list(sections) == [*SECTION_ORDER, OTHER_SECTION]
    assert sections[OTHER_SECTION] == ["zz-new"]


def test_modules_table_names_every_command_module_and_what_it_registers() -> None:
    files = {p.stem for p in Path(commands_package.__file__).parent.glob("*.py") if not p.name.startswith("_")}
    assert set(MODULES.values()) == files, "every command module is in MODULES, and only those"
    registered = _registered()
    assert set(registered) == set(MODULES), "MODULES names every command, and only those"
    for name, module in MODULES.items():
        assert registered[name] == f"mistral_deploy.cli.commands.{module}", name


def test_a_command_help_is_its_own() -> None:
    result = run_cli("render", "--help")
    assert result.exit_code == 0 and " render [OPTIONS] " in result.stdout
    assert "--out" in result.stdout and "Recipes:" not in result.stdout
    result = run_cli("keys", "--help")
    assert result.exit_code == 0 and all(sub in result.stdout for sub in ("list", "add", "revoke"))
