"""How long does `up --cloud slurm` take on the cloud test bed, phase by phase, and how much of it is ours?

    sudo python benchmarks/cloud_up.py [--runs 2]     # needs `scripts/testbed.sh install` (root)

Runs `mistral-deploy up` of the tiny model on the test bed (real SkyPilot launching on the local Slurm
cluster, the real Docker daemon pulling the stand-in images from the bed's registry, the real vLLM CPU
build), as a user would, then `down`. The first run starts with the images absent from the daemon (a real
pull, as on a new VM); later runs find them cached, as a second `up` on the same VM would. Each run's
phases are those `up` records in the deployment (`status --json`).

Overhead is what `up` adds beyond SkyPilot's launch (provisioning, its node runtime, the job submitted)
and the job itself (our setup script: image pulls, model build; then the engine's own start until its
/health answers): our checks before the launch, and the readiness probe after the engine answers (the
authenticated model list and a one-token completion). These are this machine's figures (2 cores, a CPU
engine) for a tiny model: a real GPU VM adds minutes of provisioning, a ~10 GB image and the weights.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

# The phases as `up` records them (mistral_deploy/cloud.py), and which part each belongs to.
OURS_BEFORE = ("checks",)
SKYPILOT = ("provisioning", "setup")  # until our setup script starts: SkyPilot's provisioning and runtime
JOB_SETUP = ("image-pull",)  # our setup script: image pulls, the tiny model built
ENGINE = ("engine-start", "weights", "warmup")  # the engine's own start, until /health answers
OURS_AFTER = ("models", "first-token")  # the readiness probe: model list, a one-token completion


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=2)
    args = parser.parse_args()

    import testbed  # the bed's harness: its paths, and a SkyPilot client home that knows it

    reason = testbed.unavailable()
    if reason:
        sys.exit(f"the cloud test bed is not usable: {reason}")
    started_bed = subprocess.run([str(testbed.SCRIPT), "status"], capture_output=True).returncode != 0
    if started_bed:
        subprocess.run([str(testbed.SCRIPT), "start"], check=True)
    bed = testbed.Bed(dir=testbed.BED_DIR)
    rows = []
    with tempfile.TemporaryDirectory(prefix="md-bench-cloud-") as tmp:
        root = Path(tmp)
        client = testbed.BedClient(root=root, env=testbed.client_env(root, bed))
        try:
            for run in range(args.runs):
                if run == 0:  # a new VM's daemon has no image: pull for real
                    bed.docker("rmi", "-f", "vllm/vllm-openai:v0.32.0", "nginx:1.28.0-alpine", check=False)
                rows.append(one_run(client, root, run))
                print_run(run, rows[-1])
        finally:
            client.down_all()
            client.sky("api", "stop")
            bed.clean()
            if started_bed:
                subprocess.run([str(testbed.SCRIPT), "stop"], check=False)
    summary(rows)


def one_run(client, root: Path, run: int) -> dict:
    import testbed

    data = testbed.tiny_recipe_data("slurm", "private", name="bench-up")
    recipe = root / "bench.yaml"
    recipe.write_text(yaml.safe_dump(data))
    started = time.monotonic()
    up = client.cli("up", str(recipe), "--json")
    wall = time.monotonic() - started
    if up.returncode != 0:
        sys.exit(f"run {run + 1}: up failed:\n{up.stderr[-3000:]}")
    details = client.record("bench-up")["details"]
    down = client.cli("down", "bench-up")
    if down.returncode != 0:
        sys.exit(f"run {run + 1}: down failed: {down.stderr[-2000:]}")
    return {"wall": wall, "phases": {p["phase"]: p["seconds"] for p in details["phases"]},
            "launch": details["launch_seconds"], "total": details["up_seconds"]}


def part(row: dict, names: tuple[str, ...]) -> float:
    return sum(row["phases"].get(name, 0.0) for name in names)


def print_run(run: int, row: dict) -> None:
    kind = "images pulled" if run == 0 else "images cached"
    print(f"run {run + 1} ({kind}): `up` returned after {row['wall']:.1f}s (recorded {row['total']:.1f}s)")
    for name, seconds in row["phases"].items():
        print(f"  {name:<13} {seconds:6.1f}s")
    print(f"  SkyPilot's launch call (provisioning, node runtime, job submitted): {row['launch']:.1f}s")


def summary(rows: list[dict]) -> None:
    print("\nwhere the time goes (seconds; this machine, tiny model):")
    print(f"  {'run':<5}{'total':>8}{'ours before':>13}{'SkyPilot':>10}{'setup job':>11}{'engine':>8}"
          f"{'ours after':>12}{'overhead':>10}")
    for i, row in enumerate(rows, 1):
        before, after = part(row, OURS_BEFORE), part(row, OURS_AFTER)
        print(f"  {i:<5}{row['total']:8.1f}{before:13.1f}{part(row, SKYPILOT):10.1f}{part(row, JOB_SETUP):11.1f}"
              f"{part(row, ENGINE):8.1f}{after:12.1f}{before + after:10.1f}")
    print("  overhead = our checks before SkyPilot's launch + the readiness probe after the engine answers")
    print(json.dumps({"runs": rows}))


if __name__ == "__main__":
    main()
