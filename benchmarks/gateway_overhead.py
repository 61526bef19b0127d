"""What does the gateway cost? Through nginx versus straight to the engine, in one run, on one machine.

    python benchmarks/gateway_overhead.py [--seconds 10] [--connections 32] [--streams 30]

Brings up a local tiny-mistral endpoint (the real vLLM CPU engine and the real nginx gateway), then:
- throughput: requests/s of GET /v1/models (a fast route) with wrk, through the gateway (with the key)
  and direct to the engine, alternating --rounds times, and the ratio of the medians (aim: >= 0.9);
- streaming: the first SSE chunk's delay of a streamed chat completion through the gateway and direct,
  median over --streams requests each, interleaved, and the difference (aim: a few milliseconds).
The key reaches wrk through its environment (a Lua script reads it), never its arguments.
Needs `wrk` (apt-get install wrk); load generator and server share the machine's cores.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _local import deployment, state_home  # noqa: E402

WRK_SCRIPT = 'wrk.headers["Authorization"] = os.getenv("BENCH_AUTHORIZATION")\n'


def wrk(url: str, authorization: str, seconds: int, connections: int) -> float:
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
        script.write(WRK_SCRIPT if authorization else "")
    try:
        env = dict(os.environ, BENCH_AUTHORIZATION=authorization)
        out = subprocess.run(["wrk", "-t2", f"-c{connections}", f"-d{seconds}s", "-s", script.name, url],
                             capture_output=True, text=True, env=env, check=True).stdout
    finally:
        os.unlink(script.name)
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if non2xx:
        sys.exit(f"gateway_overhead: {non2xx.group(1)} failed requests against {url}")
    return float(re.search(r"Requests/sec:\s+([0-9.]+)", out).group(1))  # type: ignore[union-attr]


def first_chunk_seconds(client, url: str, headers: dict[str, str]) -> float:  # type: ignore[no-untyped-def]
    body = {"model": "tiny-mistral", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 16,
            "stream": True}
    started = time.perf_counter()
    with client.stream("POST", url, json=body, headers=headers) as response:
        response.raise_for_status()
        lines = response.iter_lines()
        for line in lines:
            if line.startswith("data: "):
                elapsed = time.perf_counter() - started
                break
        for _ in lines:  # read the rest on the same iterator
            pass
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--streams", type=int, default=30)
    args = parser.parse_args()
    if not shutil.which("wrk"):
        sys.exit("gateway_overhead: wrk is not installed (apt-get install wrk)")
    import httpx

    with state_home(), deployment("bench-gateway") as (deployed, key, _store):
        gateway = deployed.endpoint.removesuffix("/v1")
        direct = f"http://127.0.0.1:{deployed.details['engine_port']}"
        auth = f"Bearer {key}"
        print(f"endpoint {gateway} (gateway) and {direct} (engine), {os.cpu_count()} cores shared with wrk")

        wrk(gateway + "/v1/models", auth, 2, args.connections)  # warm-up
        rates: dict[str, list[float]] = {"gateway": [], "direct": []}
        for _ in range(args.rounds):
            rates["gateway"].append(wrk(gateway + "/v1/models", auth, args.seconds, args.connections))
            rates["direct"].append(wrk(direct + "/v1/models", "", args.seconds, args.connections))
        g, d = statistics.median(rates["gateway"]), statistics.median(rates["direct"])
        print(f"GET /v1/models, {args.connections} connections, {args.rounds} alternating rounds of "
              f"{args.seconds}s each (medians):")
        print(f"  direct   {d:9.0f} req/s  {[round(r) for r in rates['direct']]}")
        print(f"  gateway  {g:9.0f} req/s  {[round(r) for r in rates['gateway']]}")
        print(f"  ratio    {g / d:9.3f}  (aim >= 0.9)")

        firsts: dict[str, list[float]] = {"gateway": [], "direct": []}
        with httpx.Client(timeout=60, trust_env=False) as client:
            for i in range(args.streams + 2):
                for name, base, headers in (("gateway", gateway, {"Authorization": auth}), ("direct", direct, {})):
                    value = first_chunk_seconds(client, base + "/v1/chat/completions", headers)
                    if i >= 2:  # the first two are warm-up
                        firsts[name].append(value)
        mg, md = statistics.median(firsts["gateway"]), statistics.median(firsts["direct"])
        print(f"first streamed chunk, median of {args.streams} interleaved requests each:")
        print(f"  direct   {md * 1000:7.2f} ms")
        print(f"  gateway  {mg * 1000:7.2f} ms")
        print(f"  added    {(mg - md) * 1000:7.2f} ms  (aim: a few ms)")


if __name__ == "__main__":
    main()
