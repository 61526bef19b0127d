"""Where mistral-deploy keeps its state: the user data directory, or $MISTRAL_DEPLOY_HOME."""

from __future__ import annotations

import os
from pathlib import Path

HOME_ENV = "MISTRAL_DEPLOY_HOME"


def data_dir() -> Path:
    override = os.environ.get(HOME_ENV)
    if override:
        return Path(override).expanduser()
    from platformdirs import user_data_dir

    return Path(user_data_dir("mistral-deploy", appauthor=False))
