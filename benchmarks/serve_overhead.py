"""What does SkyServe's load balancer cost? Through it versus straight to one replica's gateway, in one run.

    sudo python benchmarks/serve_overhead.py [--concurrency 1,16,64] [--requests 60] [--rounds 4] [--no-spread]

Needs root and the cloud test bed installed and started (`scripts/testbed.sh install`, `start`). Brings up,
through the real CLI (`mistral-deploy up RECIPE`, in a client home made by `scripts/testbed.sh client-env
DIR nodes`, its own SkyPilot API server port), a service of the built-in tiny model with `replicas: 2` on
the bed's nodes (started with `start-nodes 2` if they were not running): SkyServe's real controller and
load balancer in the API server (consolidation mode), each replica the rendered stack (the real vLLM CPU
build and the nginx gateway) on a node of its own. Its limits are set high enough for one key and one
address (the load balancer's) to hold every stream. Then, for each concurrency, the same streamed
completion (max_tokens 8, exactly 8 tokens) is sent, the paths alternating --rounds times:
- lb:     https://localhost:PORT/v1, the load balancer (TLS pinned to the deployment's CA, the
          deployment's key), which spreads the requests over both replicas;
- direct: http://10.231.70.1N:8080/v1, one replica's gateway on the bed's link (the same key). A replica
          admits only the load balancer's source addresses, which in consolidation mode are this
          machine's: a request from this machine's own network namespace is admitted;
- spread: both replicas' gateways directly, in turn (as the load balancer spreads them; --no-spread: not).
Printed per concurrency: the first streamed chunk's latency (p50, p95, over every round) and requests/s
(answered 200 and streamed to the end; the median of the rounds) of each path, then lb's ratios to the
others. Everything (the client, the load balancer and its controller, both engines) shares this
machine's cores: compare the ratios of one run, not absolute figures. Whatever it made is torn down at the
end, also on Ctrl-C, SIGTERM or failure: `mistral-deploy down`, `sky api stop`, what is left of its
client's processes (by PID), the nodes if it started them.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import ssl
import statistics
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any, Optional

import yaml

from _bed import bed_client, cli

NAME = "bench-serve"
PORT = 8080  # each replica on a node of its own: the same port everywhere
NODES = 2
# one key and one address (the load balancer's, or this machine's) hold every stream: no 429 measured
LIMITS = {"connections_per_address": 1024, "concurrent_requests": 1024, "requests_per_minute": 1_000_000}


def service_recipe(path: Path) -> Path:
    """tests/test_cloud_bed_serve.py's service: the tiny model, cloud slurm, public, port 8080, 2 replicas."""
    import testbed

    data = testbed.tiny_recipe_data("slurm", "public", name=NAME, replicas={"min": NODES}, limits=LIMITS,
                                    health={"readiness_timeout": 900, "probe_interval": 1})
    data["network"]["port"] = PORT
    path.write_text(yaml.safe_dump(data))
    return path


def replica_urls(client: Any) -> list[str]:
    """The READY replicas' gateways, as `status --json` lists them."""
    done = cli(client, "status", NAME, "--json", timeout=300)
    if done.returncode != 0:
        raise SystemExit(f"serve_overhead: status failed: {done.stderr.strip()[-2000:]}")
    urls = []
    for replica in json.loads(done.stdout)["replicas"]:
        host = re.sub(r"^https?://", "", replica.get("endpoint") or "").split("/")[0]
        if replica["status"] == "READY" and host:
            urls.append(f"http://{host}/v1")
    return sorted(urls)


def admitted(paths: dict[str, tuple[list[str], Any]], key: str) -> None:
    """Every URL answers the key's GET /models with a 200 (a replica refusing this machine says 403)."""
    import httpx

    for name, (urls, verify) in paths.items():
        with httpx.Client(verify=verify, trust_env=False, timeout=60) as http:
            for url in urls:
                status = http.get(url + "/models", headers={"Authorization": f"Bearer {key}"}).status_code
                if status != 200:
                    raise SystemExit(f"serve_overhead: {name} {url}/models answered {status}, not 200")


async def one_stream(http: Any, url: str, headers: dict[str, str], body: dict[str, Any]
                     ) -> tuple[Optional[float], Optional[str]]:
    """(seconds to the first streamed chunk, None) or (None, what went wrong); read to its end."""
    import httpx

    started = time.perf_counter()
    first = None
    try:
        async with http.stream("POST", url, json=body, headers=headers) as response:
            if response.status_code != 200:
                await response.aread()
                return None, str(response.status_code)
            done = False
            async for line in response.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    done = True
                elif first is None:
                    first = time.perf_counter() - started
            if first is None or not done:
                return None, "cut short"
            return first, None
    except httpx.HTTPError as exc:
        return None, type(exc).__name__


async def load(http: Any, urls: list[str], headers: dict[str, str], body: dict[str, Any], concurrency: int,
               total: int) -> dict[str, Any]:
    """`total` streams over `concurrency` concurrent ones (urls taken in turn): first-chunk delays, req/s."""
    firsts: list[float] = []
    errors: Counter[str] = Counter()
    sent = 0

    async def worker() -> None:
        nonlocal sent
        while sent < total:
            url = urls[sent % len(urls)] + "/completions"
            sent += 1
            first, error = await one_stream(http, url, headers, body)
            if error:
                errors[error] += 1
            else:
                firsts.append(first)  # type: ignore[arg-type]

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.perf_counter() - started
    return {"firsts": firsts, "errors": errors, "rate": len(firsts) / elapsed}


def percentile(values: list[float], q: float) -> float:
    from mistral_deploy.bench import percentile as interpolated  # `bench`'s own (numpy's rule)

    got = interpolated(values, q)
    return float("nan") if got is None else got


async def measure(paths: dict[str, tuple[list[str], Any]], key: str, levels: list[int], requests: int,
                  rounds: int, max_tokens: int) -> dict[int, dict[str, dict[str, Any]]]:
    import httpx

    headers = {"Authorization": f"Bearer {key}"}
    body = {"model": "tiny-mistral", "prompt": "Hello, my name is", "max_tokens": max_tokens,
            "min_tokens": max_tokens, "ignore_eos": True, "stream": True}
    most = max(levels)
    limits = httpx.Limits(max_connections=most, max_keepalive_connections=most)
    clients = {name: httpx.AsyncClient(verify=verify, trust_env=False, timeout=120, limits=limits)
               for name, (_urls, verify) in paths.items()}
    results: dict[int, dict[str, dict[str, Any]]] = {}
    try:
        for concurrency in levels:
            total = max(requests, 4 * concurrency)
            cells = {name: {"firsts": [], "rates": [], "errors": Counter()} for name in paths}
            for name, (urls, _verify) in paths.items():  # warm-up: this many connections open, not measured
                await load(clients[name], urls, headers, body, concurrency, concurrency)
            for round_ in range(rounds):
                order = list(paths) if round_ % 2 == 0 else list(reversed(paths))
                for name in order:
                    got = await load(clients[name], paths[name][0], headers, body, concurrency, total)
                    cells[name]["firsts"] += got["firsts"]
                    cells[name]["rates"].append(got["rate"])
                    cells[name]["errors"] += got["errors"]
            results[concurrency] = {name: {"p50": percentile(c["firsts"], 50), "p95": percentile(c["firsts"], 95),
                                           "rate": statistics.median(c["rates"]), "rates": c["rates"],
                                           "ok": len(c["firsts"]), "errors": dict(c["errors"])}
                                    for name, c in cells.items()}
            print_level(concurrency, total, rounds, results[concurrency])
    finally:
        for http in clients.values():
            await http.aclose()
    return results


def print_level(concurrency: int, total: int, rounds: int, cells: dict[str, dict[str, Any]]) -> None:
    print(f"{concurrency} concurrent streams, {total} requests per path per round, {rounds} rounds alternating:")
    for name, c in cells.items():
        errors = f"  errors {c['errors']}" if c["errors"] else ""
        print(f"  {name:<7} first chunk p50 {c['p50'] * 1000:7.1f} ms  p95 {c['p95'] * 1000:7.1f} ms  "
              f"{c['rate']:7.1f} req/s {[round(r, 1) for r in c['rates']]}{errors}")


def ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")


def summary(results: dict[int, dict[str, dict[str, Any]]], load: tuple[float, float]) -> None:
    names = list(next(iter(results.values())))
    print("\nfirst streamed chunk (ms, over every round) and requests/s (median of the rounds):")
    print(f"  {'streams':>7}" + "".join(f"  {name + ' p50':>10}{'p95':>8}{'req/s':>8}" for name in names))
    for concurrency, cells in results.items():
        print(f"  {concurrency:>7}" + "".join(f"  {cells[n]['p50'] * 1000:10.1f}{cells[n]['p95'] * 1000:8.1f}"
                                              f"{cells[n]['rate']:8.1f}" for n in names))
    others = [name for name in names if name != "lb"]
    print("lb over each other path (latency x > 1, req/s x < 1: through the load balancer costs):")
    print(f"  {'streams':>7}" + "".join(f"  {'vs ' + name:>10} {'p50 x':>6}{'p95 x':>7}{'req/s x':>8}{'added p50':>11}"
                                        for name in others))
    for concurrency, cells in results.items():
        lb = cells["lb"]
        print(f"  {concurrency:>7}" + "".join(
            f"  {'':>10} {ratio(lb['p50'], cells[n]['p50']):6.2f}{ratio(lb['p95'], cells[n]['p95']):7.2f}"
            f"{ratio(lb['rate'], cells[n]['rate']):8.2f}{(lb['p50'] - cells[n]['p50']) * 1000:8.1f} ms"
            for n in others))
    print("  the load balancer spreads over both replicas; `direct` goes to one, `spread` to both in turn")
    print(f"  the client, the load balancer and both engines share this machine's {os.cpu_count()} cores "
          f"(load average {load[0]:.1f} before, {load[1]:.1f} after): compare the ratios, not the figures")
    print(json.dumps({"load_average": load, **{str(c): cells for c, cells in results.items()}}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--concurrency", default="1,16,64", help="concurrent streams, comma-separated")
    parser.add_argument("--requests", type=int, default=60,
                        help="requests per path per round at each concurrency (at least 4 per stream)")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--no-spread", dest="spread", action="store_false",
                        help="leave out `spread` (both replicas' gateways directly, in turn)")
    args = parser.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[attr-defined]  (progress while it runs)

    with bed_client("serve_overhead", NODES, NAME) as client:
        recipe = service_recipe(client.root / "serve.yaml")
        print(f"mistral-deploy up: {NAME}, the tiny model, {NODES} replicas on the bed's nodes (minutes)")
        started = time.monotonic()
        up = cli(client, "up", str(recipe), timeout=1500)
        if up.returncode != 0:
            raise SystemExit(f"serve_overhead: up failed (exit {up.returncode}):\n{up.stderr.strip()[-4000:]}")
        print(f"up of {NODES} replicas: {time.monotonic() - started:.0f} s")
        record = client.record(NAME)
        key = client.key(NAME)
        replicas = replica_urls(client)
        deadline = time.monotonic() + 900  # `up` returns once one serves; both are measured
        while len(replicas) < NODES and time.monotonic() < deadline:
            time.sleep(10)
            replicas = replica_urls(client)
        if len(replicas) < NODES:
            raise SystemExit(f"serve_overhead: {len(replicas)} replicas READY, not {NODES}: {replicas}")
        context = ssl.create_default_context(cafile=record["tls_ca"])
        paths: dict[str, tuple[list[str], Any]] = {"lb": ([record["endpoint"]], context),
                                                   "direct": (replicas[:1], True)}
        if args.spread:
            paths["spread"] = (replicas, True)
        print(f"lb {record['endpoint']} (TLS pinned), direct {replicas[0]}, replicas {', '.join(replicas)}; "
              f"{args.max_tokens}-token streamed completions; {os.cpu_count()} cores shared by all")
        admitted(paths, key)
        before = os.getloadavg()[0]
        results = asyncio.run(measure(paths, key, levels, args.requests, args.rounds, args.max_tokens))
        summary(results, (before, os.getloadavg()[0]))


if __name__ == "__main__":
    main()
