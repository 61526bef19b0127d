"""mistral-deploy: an open-weight Mistral model behind a private, secure, healthy OpenAI-compatible endpoint."""

from __future__ import annotations

from pathlib import Path

__version__ = "0.1.0"
__all__ = ["__version__", "resources_dir"]


def resources_dir(kind: str) -> Path:
    """The folder of built-in `recipes` or `templates`: inside the wheel, or at the top of a source checkout."""
    packaged = Path(__file__).parent / "_data" / kind
    if packaged.is_dir():
        return packaged
    return Path(__file__).parent.parent / kind
