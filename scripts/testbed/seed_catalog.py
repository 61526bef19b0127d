"""Seed SkyPilot's catalog for a client of the bed, offline: seed_catalog.py SKY_RUNTIME_DIR GPU.

The catalog the tests use (tests/fixtures/catalog: SkyPilot's public files for the clouds and GPUs the
project's recipes name), with the bed's GPU also offered on Slurm (the public catalog knows the A10G on
AWS only; the bed's Slurm cluster declares one per node in gres.conf).
"""

import shutil
import sys
from pathlib import Path

CATALOG_VERSION = "v8"  # sky.skylet.constants.CATALOG_SCHEMA_VERSION in SkyPilot 0.14.1

runtime, gpu = Path(sys.argv[1]), sys.argv[2]
source = Path(__file__).resolve().parents[2] / "tests" / "fixtures" / "catalog" / CATALOG_VERSION
target = runtime / ".sky" / "catalogs" / CATALOG_VERSION
shutil.copytree(source, target, dirs_exist_ok=True)
accelerators = target / "common" / "accelerators.csv"
rows = accelerators.read_text().splitlines()
accelerators.write_text("\n".join(f"{gpu},\"['AWS', 'Slurm']\"" if row.split(",", 1)[0] == gpu else row
                                  for row in rows) + "\n")
print(target)
