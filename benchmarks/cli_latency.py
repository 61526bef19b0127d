"""How fast do `mistral-deploy --help` and `render` start, next to `sky --help`?

    python benchmarks/cli_latency.py [--runs 7]

Runs each command once to warm the file cache, then --runs times, and prints the best and the median
wall time of each and how many times faster than `sky --help` they are (best against best, median against
median). The aim is at least 8x: neither command imports SkyPilot, vLLM or torch
(tests/test_cli_speed.py).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _executable(name: str) -> str:
    found = shutil.which(name, path=str(Path(sys.executable).parent)) or shutil.which(name)
    if not found:
        sys.exit(f"cli_latency: {name} is not installed (pip install -e .)")
    return found


def _time(argv: list[str], runs: int, env: dict[str, str]) -> list[float]:
    def once() -> float:
        start = time.perf_counter()
        proc = subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, timeout=120)
        elapsed = time.perf_counter() - start
        if proc.returncode != 0:
            sys.exit(f"cli_latency: {' '.join(argv)} failed: {proc.stderr.decode(errors='replace').strip()}")
        return elapsed

    once()  # warm the file cache
    return [once() for _ in range(runs)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7, help="timed runs per command (default 7)")
    args = parser.parse_args()

    md, sky = _executable("mistral-deploy"), _executable("sky")
    with tempfile.TemporaryDirectory(prefix="cli-latency-") as home:
        # a throwaway HOME and SkyPilot home: nothing here reads or writes the user's state
        env = {**os.environ, "HOME": home, "SKY_RUNTIME_DIR": str(Path(home) / "sky"),
               "SKYPILOT_DISABLE_USAGE_COLLECTION": "1", "MISTRAL_DEPLOY_HOME": str(Path(home) / "md")}
        commands = {
            "mistral-deploy --help": [md, "--help"],
            "mistral-deploy render mistral-7b --cloud aws": [md, "render", "mistral-7b", "--cloud", "aws"],
            "sky --help": [sky, "--help"],
        }
        times = {label: _time(argv, args.runs, env) for label, argv in commands.items()}

    sky_best, sky_median = min(times["sky --help"]), statistics.median(times["sky --help"])
    width = max(len(label) for label in times)
    print(f"{'command':<{width}}  {'best':>8}  {'median':>8}  {'vs sky --help (best / median)':>30}")
    for label, samples in times.items():
        best, median = min(samples), statistics.median(samples)
        ratio = "" if label == "sky --help" else f"{sky_best / best:.1f}x / {sky_median / median:.1f}x faster"
        print(f"{label:<{width}}  {best:>7.3f}s  {median:>7.3f}s  {ratio:>30}")
    print(f"({args.runs} runs each after one warm-up; {sys.platform}, Python {sys.version.split()[0]})")


if __name__ == "__main__":
    main()
