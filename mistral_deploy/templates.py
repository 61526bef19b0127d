"""Text templates (templates/): rendered with StrictUndefined, so a missing variable is an error, not ''."""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import jinja2

from mistral_deploy import resources_dir


@lru_cache(maxsize=1)
def _environment() -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(resources_dir("templates"))),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
        autoescape=False,
    )


def render_template(name: str, **context: Any) -> str:
    return _environment().get_template(name).render(**context)


def template_text(name: str) -> str:
    """A template file's raw text (for files shipped as they are, such as the tiny-model builder)."""
    return (resources_dir("templates") / name).read_text(encoding="utf-8")
