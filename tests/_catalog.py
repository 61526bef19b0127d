"""SkyPilot, offline: the catalog fixture seeded where SkyPilot reads it, and `sky` imported once.

Import the fixtures into a test module (`from _catalog import sky_catalog, sky_session  # noqa: F401`).

- `sky_catalog`: seeds tests/fixtures/catalog into this test's $SKY_RUNTIME_DIR (set by conftest's
  `isolated`), for commands run in a subprocess, which import SkyPilot afresh.
- `sky_session`: `import sky` once per session (it costs seconds) under a session SkyPilot home, with the
  catalog seeded where that import fixed SkyPilot's catalog folder. SkyPilot computes that folder when
  `sky.catalog.common` is first imported, so if another test imported it first, the files go there too.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from types import ModuleType

import pytest

CATALOG_FIXTURE = Path(__file__).parent / "fixtures" / "catalog"
# sky.skylet.constants.CATALOG_SCHEMA_VERSION in SkyPilot 0.14.1 (tests/test_skypilot_validation.py checks it);
# not imported here, because importing any sky module costs seconds.
CATALOG_VERSION = "v8"


def seed_catalog(runtime_dir: Path) -> Path:
    """Copy the fixture catalog to where SkyPilot looks under SKY_RUNTIME_DIR=runtime_dir; the folder."""
    target = Path(runtime_dir) / ".sky" / "catalogs" / CATALOG_VERSION
    shutil.copytree(CATALOG_FIXTURE / CATALOG_VERSION, target, dirs_exist_ok=True)
    return target


@pytest.fixture
def sky_catalog(isolated: Path) -> Path:
    """The fixture catalog under this test's SkyPilot home; returns $SKY_RUNTIME_DIR."""
    runtime_dir = Path(os.environ["SKY_RUNTIME_DIR"])
    seed_catalog(runtime_dir)
    return runtime_dir


@pytest.fixture(scope="session")
def sky_session(tmp_path_factory: pytest.TempPathFactory) -> ModuleType:
    """`sky`, imported once, reading the fixture catalog in-process (no API server, no network)."""
    root = tmp_path_factory.mktemp("sky-session")
    (root / "home").mkdir()
    with pytest.MonkeyPatch.context() as mp:
        for key in list(os.environ):
            if key.startswith(("SKYPILOT_", "SKY_", "AWS_", "GOOGLE_", "AZURE_")):
                mp.delenv(key, raising=False)
        mp.setenv("HOME", str(root / "home"))
        mp.setenv("SKY_RUNTIME_DIR", str(root / "sky"))
        mp.setenv("SKYPILOT_DISABLE_USAGE_COLLECTION", "1")
        mp.setenv("AWS_EC2_METADATA_DISABLED", "true")
        seed_catalog(root / "sky")
        import sky
        from sky.catalog import common
        from sky.serve import service_spec  # noqa: F401  (imported here, inside the isolated environment)

        # the folder this process's SkyPilot reads, wherever the first import fixed it
        shutil.copytree(CATALOG_FIXTURE / CATALOG_VERSION, Path(common.get_catalog_path("vms.csv")).parent,
                        dirs_exist_ok=True)
    return sky
