"""Does one greedy key hold back another? Key B's latency while key A floods the endpoint, with and without
A's per-key concurrency limit, against B's latency on an idle endpoint; in one run, on one machine.

    python benchmarks/key_isolation.py [--greedy 32] [--samples 20]

Two local tiny-mistral endpoints (the real vLLM CPU engine and nginx gateway), each with two keys:
- "limited": limits.concurrent_requests 1 per key (A gets 429 beyond 1 in flight);
- "unlimited": the same with concurrent_requests 1024 (A may hold the engine).
For each: B's median time for a short completion (8 tokens) idle, then while A keeps --greedy long
completions (128 tokens) in flight, retrying after Retry-After on 429 (as the OpenAI clients do). The ratio loaded/idle is the figure: near 1
means A's flood left B's latency unchanged.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _local import deployment, state_home  # noqa: E402

SHORT = {"model": "tiny-mistral", "prompt": "Hello", "max_tokens": 8}
LONG = {"model": "tiny-mistral", "prompt": "Once upon a time", "max_tokens": 128, "ignore_eos": True}


def b_latency(url: str, key: str, samples: int) -> float:
    import httpx

    times = []
    with httpx.Client(timeout=120, trust_env=False) as client:
        for _ in range(samples):
            started = time.perf_counter()
            response = client.post(url, json=SHORT, headers={"Authorization": f"Bearer {key}"})
            response.raise_for_status()
            times.append(time.perf_counter() - started)
    return statistics.median(times)


def flood(url: str, key: str, workers: int, stop: threading.Event, counts: dict[str, int]) -> list[threading.Thread]:
    import httpx

    def worker() -> None:
        with httpx.Client(timeout=300, trust_env=False) as client:
            while not stop.is_set():
                response = client.post(url, json=LONG, headers={"Authorization": f"Bearer {key}"})
                counts[str(response.status_code)] = counts.get(str(response.status_code), 0) + 1
                if response.status_code == 429:  # as the OpenAI clients do: wait as long as Retry-After says
                    stop.wait(float(response.headers.get("Retry-After", "1")))

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(workers)]
    for thread in threads:
        thread.start()
    return threads


def measure(name: str, concurrent: int, args: argparse.Namespace) -> tuple[float, float, dict[str, int]]:
    limits = {"concurrent_requests": concurrent, "connections_per_address": 1024, "requests_per_minute": 1_000_000}
    with deployment(name, limits=limits, keys=2) as (deployed, _key, store):
        key_a, key_b = store.read_api_keys(name)[:2]
        url = deployed.endpoint + "/completions"
        b_latency(url, key_b, 3)  # warm-up
        idle = b_latency(url, key_b, args.samples)
        stop, counts = threading.Event(), {}
        threads = flood(url, key_a, args.greedy, stop, counts)
        time.sleep(2)
        loaded = b_latency(url, key_b, args.samples)
        stop.set()
        for thread in threads:
            thread.join(timeout=300)
    return idle, loaded, counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--greedy", type=int, default=32, help="key A's requests kept in flight")
    parser.add_argument("--samples", type=int, default=20)
    args = parser.parse_args()
    with state_home():
        rows = [("limited (A: 1 in flight)", *measure("iso-limited", 1, args)),
                ("unlimited", *measure("iso-unlimited", 1024, args))]
    print(f"key B: median of {args.samples} completions of {SHORT['max_tokens']} tokens; key A keeps "
          f"{args.greedy} completions of {LONG['max_tokens']} tokens in flight")
    for name, idle, loaded, counts in rows:
        print(f"  {name:26s} idle {idle * 1000:7.1f} ms  A flooding {loaded * 1000:7.1f} ms  "
              f"ratio {loaded / idle:5.2f}  A's answers {counts}")


if __name__ == "__main__":
    main()
