"""How soon after the engine can answer does `up` return? (aim: < 1 s)

    python benchmarks/readiness.py [--runs 3]

Each run brings up a local tiny-mistral endpoint with the real LocalBackend while a watcher thread asks
the engine's own port for /health every 5 ms; it prints when the engine first answered 200, when `up`
returned (after its full readiness check: gateway /health, the authenticated model list, a one-token
completion through the gateway) and the difference. Then it takes the endpoint down.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _local import free_port, state_home  # noqa: E402


def one_run(index: int) -> tuple[float, float]:
    import httpx

    from mistral_deploy.local import LocalBackend
    from mistral_deploy.progress import Progress
    from mistral_deploy.recipe import Overrides, load_recipe
    from mistral_deploy.state import StateStore

    name = f"bench-ready-{index}"
    recipe = load_recipe("tiny-mistral", Overrides(cloud="local", name=name, port=free_port())).recipe
    store = StateStore()
    first_answer: dict[str, float] = {}
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            try:
                path = store.load(name).details.get("engine_socket")
                if path and Path(path).exists():
                    with httpx.Client(timeout=1, transport=httpx.HTTPTransport(uds=path)) as http:
                        ok = http.get("http://engine/health").status_code == 200
                    if ok:
                        first_answer["at"] = time.monotonic()
                        return
            except Exception:  # noqa: BLE001 - not yet recorded, not yet listening
                pass
            time.sleep(0.005)

    watcher = threading.Thread(target=watch, daemon=True)
    started = time.monotonic()
    backend = LocalBackend()
    watcher.start()
    try:
        backend.up(recipe, store, Progress(quiet=True))
        returned = time.monotonic()
    finally:
        stop.set()
        watcher.join(timeout=2)
        backend.down(store.load(name), store, Progress(quiet=True))
    return first_answer["at"] - started, returned - first_answer["at"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    gaps = []
    with state_home():
        for i in range(args.runs):
            engine_ready, gap = one_run(i)
            gaps.append(gap)
            print(f"run {i + 1}: engine answered after {engine_ready:5.1f}s; up returned {gap * 1000:6.0f} ms later")
    print(f"up returned {statistics.median(gaps) * 1000:.0f} ms (median), {max(gaps) * 1000:.0f} ms (worst) "
          f"after the engine first answered (aim < 1000 ms)")


if __name__ == "__main__":
    main()
