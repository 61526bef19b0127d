"""How fast do mistral-deploy's offline commands start, next to `sky --help`?

    python benchmarks/cli_latency.py [--runs 7]

Every command that needs no cloud and no engine is timed: `--help`, `recipes`, `recipes show`, `validate`,
`render`, `schema`, `exit-codes`, `status` with no deployment, and, on a local deployment recorded in a
throwaway home (no process running: nothing is probed over the network), `env`, `keys list`, `status` and
`logs`. Left out: `plan`
(SkyPilot's price catalog), `doctor` (SkyPilot's credential checks), `engine info` (starts the engine's
Python), and the commands that create, change or reach an endpoint.

Runs each command once to warm the file cache, then --runs rounds; each round runs `sky --help` and every
command once, in a rotating order, so that the machine's load drifts over all of them alike. Prints the
best and the median wall time of each, and how many times faster than `sky --help` it is (best against
best, median against median). The aim is at least 12x for every command: none imports SkyPilot, vLLM or
torch (tests/test_cli_speed.py checks it, and what else each may import).
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

AIM = 12.0
SKY = "sky --help"
DEPLOYMENT = "bench"
EMPTY_HOME = "(no deployment)"


def _executable(name: str) -> str:
    found = shutil.which(name, path=str(Path(sys.executable).parent)) or shutil.which(name)
    if not found:
        sys.exit(f"cli_latency: {name} is not installed (pip install -e .)")
    return found


def _once(argv: list[str], env: dict[str, str]) -> float:
    if argv[0] == EMPTY_HOME:  # the command runs with no deployment recorded
        argv, env = argv[1:], {**env, "MISTRAL_DEPLOY_HOME": env["MISTRAL_DEPLOY_HOME"] + "-empty"}
    start = time.perf_counter()
    proc = subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, timeout=120)
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"cli_latency: {' '.join(argv)} failed: {proc.stderr.decode(errors='replace').strip()}")
    return elapsed


def _record_local_deployment(home: Path) -> None:
    """A `--cloud local` deployment as `up` records it, with two keys and a log; no process is running."""
    os.environ["MISTRAL_DEPLOY_HOME"] = str(home)
    from mistral_deploy.recipe import Overrides, load_recipe
    from mistral_deploy.state import Deployment, StateStore

    recipe = load_recipe("tiny-mistral", Overrides(cloud="local", name=DEPLOYMENT)).recipe
    store = StateStore(home)
    store.reserve(Deployment(name=DEPLOYMENT, backend="local", recipe=recipe.to_yaml_config(), phase="ready",
                             endpoint="http://127.0.0.1:9/v1", details={"network": "private"}))
    store.write_keys(DEPLOYMENT, {"key-1": "sk-bench-1", "key-2": "sk-bench-2"})
    (store.dir(DEPLOYMENT) / "engine.log").write_text("".join(f"line {i}\n" for i in range(200)), encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7, help="timed rounds (default 7)")
    args = parser.parse_args()

    md, sky = _executable("mistral-deploy"), _executable("sky")
    with tempfile.TemporaryDirectory(prefix="cli-latency-") as home:
        # a throwaway HOME and SkyPilot home: nothing here reads or writes the user's state
        env = {**os.environ, "HOME": home, "SKY_RUNTIME_DIR": str(Path(home) / "sky"),
               "SKYPILOT_DISABLE_USAGE_COLLECTION": "1", "MISTRAL_DEPLOY_HOME": str(Path(home) / "md")}
        # as an installed package starts: from its bytecode cache (the warm-up run writes it, where an
        # editable install has none yet), not compiling every module of a checkout at each run
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        _record_local_deployment(Path(home) / "md")
        commands = {
            SKY: [sky, "--help"],
            "--help": [md, "--help"],
            "recipes": [md, "recipes"],
            "recipes show mistral-7b": [md, "recipes", "show", "mistral-7b"],
            "validate mistral-7b": [md, "validate", "mistral-7b"],
            "render mistral-7b --cloud aws": [md, "render", "mistral-7b", "--cloud", "aws"],
            "schema": [md, "schema"],
            "exit-codes": [md, "exit-codes"],
            f"env {DEPLOYMENT}": [md, "env", DEPLOYMENT],
            f"keys list {DEPLOYMENT}": [md, "keys", "list", DEPLOYMENT],
            f"status {DEPLOYMENT} (local)": [md, "status", DEPLOYMENT],
            "status (no deployment)": [EMPTY_HOME, md, "status"],
            f"logs {DEPLOYMENT} -n 20 (local)": [md, "logs", DEPLOYMENT, "-n", "20"],
        }
        labels = list(commands)
        for label in labels:  # warm the file cache
            _once(commands[label], env)
        times: dict[str, list[float]] = {label: [] for label in labels}
        for round_ in range(args.runs):
            shift = round_ % len(labels)
            for label in labels[shift:] + labels[:shift]:
                times[label].append(_once(commands[label], env))

    sky_best, sky_median = min(times[SKY]), statistics.median(times[SKY])
    width = max(len(label) for label in labels) + len("mistral-deploy ")
    print(f"{'command':<{width}}  {'best':>8}  {'median':>8}  {'vs sky --help (best / median)':>30}")
    below = []
    for label in labels:
        samples = times[label]
        best, median = min(samples), statistics.median(samples)
        shown = label if label == SKY else f"mistral-deploy {label}"
        ratio = ""
        if label != SKY:
            ratio = f"{sky_best / best:.1f}x / {sky_median / median:.1f}x faster"
            if sky_median / median < AIM:
                below.append(label)
        print(f"{shown:<{width}}  {best:>7.3f}s  {median:>7.3f}s  {ratio:>30}")
    print(f"({args.runs} rounds after one warm-up; {sys.platform}, Python {sys.version.split()[0]})")
    verdict = "every command meets it" if not below else "below it (median): " + ", ".join(below)
    print(f"aim: at least {AIM:g}x faster than `sky --help`; {verdict}")


if __name__ == "__main__":
    main()
