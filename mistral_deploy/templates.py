"""Text templates (templates/): rendered with StrictUndefined, so a missing variable is an error, not ''.

jinja2 is imported on the first render (importing this module costs nothing). A template's compiled code is
kept in jinja2's bytecode cache (a 0700 folder of this user's in the system temp dir, which jinja2 checks),
as Python keeps a module's: compiling nginx.conf.j2 and the VM scripts again costs `render` about a tenth
of its run. An entry is used only for the same template text, jinja2 version and options; a cache that
cannot be read or written is skipped.
"""

from __future__ import annotations

from functools import lru_cache
from typing import TYPE_CHECKING, Any, Optional

from mistral_deploy import resources_dir

if TYPE_CHECKING:
    import jinja2

_OPTIONS: dict[str, Any] = dict(keep_trailing_newline=True, trim_blocks=True, lstrip_blocks=True, autoescape=False)


@lru_cache(maxsize=1)
def _environment() -> "jinja2.Environment":
    import jinja2

    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(resources_dir("templates"))),
        undefined=jinja2.StrictUndefined,
        bytecode_cache=_bytecode_cache(),
        **_OPTIONS,
    )


def _bytecode_cache(directory: Optional[str] = None) -> Optional["jinja2.BytecodeCache"]:
    """jinja2's cache in `directory`, by default its own private folder in the system temp dir."""
    import jinja2

    class Cache(jinja2.FileSystemBytecodeCache):
        def get_cache_key(self, name: str, filename: Optional[str] = None) -> str:
            # jinja2 keys an entry by the template's name and file, and checks its text: the compiled code
            # also depends on the environment's options and on jinja2 itself
            return super().get_cache_key(f"{name}|{jinja2.__version__}|{sorted(_OPTIONS.items())}", filename)

        def load_bytecode(self, bucket: Any) -> None:
            try:
                super().load_bytecode(bucket)
            except OSError:
                bucket.reset()

        def dump_bytecode(self, bucket: Any) -> None:
            try:
                super().dump_bytecode(bucket)
            except OSError:
                pass

    try:
        return Cache(directory, pattern="mistral_deploy_%s.cache")
    except (OSError, RuntimeError):  # no private temp folder to be had: compile every time
        return None


def render_template(name: str, **context: Any) -> str:
    return _environment().get_template(name).render(**context)


def template_text(name: str) -> str:
    """A template file's raw text (for files shipped as they are, such as the tiny-model builder)."""
    return (resources_dir("templates") / name).read_text(encoding="utf-8")
