"""What does the gateway cost? Through nginx versus straight to the engine, in one run, on one machine.

    python benchmarks/gateway_overhead.py [--seconds 5] [--connections 16,256] [--streams 30]

Brings up a local tiny-mistral endpoint (the real vLLM CPU engine and the real nginx gateway) with every
limit on (`limits:` set high enough for one key and one address to hold 256 connections), then:
- throughput: requests/s of GET /v1/models (a fast route) through the gateway (with the key, over TCP)
  and direct to the engine (its Unix socket, the only way in), alternating --rounds times per connection
  count, and the ratio of the medians (aim: >= 0.97); every answer must be a 200;
- streaming: the first SSE chunk's delay of a streamed chat completion through the gateway and direct,
  median over --streams requests each, interleaved, and the difference (aim: < 1 ms).
With --guardrail the recipe has `guardrail: mistral`: the gateway rewrites each chat request's body
(gateway.js) and the direct requests carry the same system prompt, so the difference is the rewrite's cost.
With --usage-off the gateway is also measured with its usage counting off (the key id out of its access log,
no X-Request-Id naming the key to the engine; nginx reloaded between rounds): "gateway" is then the
product as shipped (counting on), "no-usage" the same gateway without it, side by side in every round.
(The engine's side of the counting, its plugin, is measured by benchmarks/usage_cost.py.)
The load generator is the same for both paths (keep-alive HTTP/1.1 on asyncio streams), and its own
ceiling is printed: its rate against a server that answers without work (nginx `return 200`).
Load generator and server share the machine's cores.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Awaitable, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _local import deployment, free_port, state_home  # noqa: E402

LIMITS = {"connections_per_address": 1024, "concurrent_requests": 1024, "requests_per_minute": 1_000_000}
Opener = Callable[[], Awaitable[tuple[asyncio.StreamReader, asyncio.StreamWriter]]]


async def _one_connection(open_: Opener, request: bytes, deadline: float, counts: list[int]) -> None:
    reader, writer = await open_()
    try:
        while time.perf_counter() < deadline:
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            status = head[9:12]
            length, close, chunked = 0, False, False
            for line in head.lower().split(b"\r\n"):
                if line.startswith(b"content-length:"):
                    length = int(line[15:])
                elif line.startswith(b"connection:") and b"close" in line:
                    close = True  # the server ends keep-alive after so many requests (nginx: 1000)
                elif line.startswith(b"transfer-encoding:") and b"chunked" in line:
                    chunked = True  # the gateway's /v1/models (its body rewritten: no length known up front)
            if chunked:
                while size := int((await reader.readuntil(b"\r\n")).split(b";")[0], 16):
                    await reader.readexactly(size + 2)
                await reader.readuntil(b"\r\n")
            else:
                await reader.readexactly(length)
            counts[0 if status == b"200" else 1] += 1
            if close:
                writer.close()
                reader, writer = await open_()
    finally:
        writer.close()


def hammer(open_: Opener, path: str, authorization: str, seconds: float, connections: int) -> float:
    """Requests/s of `GET path` over `connections` keep-alive connections; exits if any answer is not 200."""
    auth = f"Authorization: {authorization}\r\n" if authorization else ""
    request = f"GET {path} HTTP/1.1\r\nHost: bench\r\n{auth}\r\n".encode()
    counts = [0, 0]

    async def run() -> float:
        started = time.perf_counter()
        deadline = started + seconds
        await asyncio.gather(*(_one_connection(open_, request, deadline, counts) for _ in range(connections)))
        return time.perf_counter() - started

    elapsed = asyncio.run(run())
    if counts[1]:
        sys.exit(f"gateway_overhead: {counts[1]} of {sum(counts)} requests to {path} were not answered 200")
    return counts[0] / elapsed


def tcp(port: int) -> Opener:
    return lambda: asyncio.open_connection("127.0.0.1", port, limit=1 << 20)


def unix(path: str) -> Opener:
    return lambda: asyncio.open_unix_connection(path, limit=1 << 20)


def ceiling_server() -> tuple[subprocess.Popen, int, str]:
    """An nginx that answers 200 without work: what the load generator can do at most."""
    folder = tempfile.mkdtemp(prefix="md-ceiling-")
    port = free_port()
    Path(folder, "nginx.conf").write_text(
        f"worker_processes auto; pid {folder}/nginx.pid; error_log {folder}/error.log;\n"
        "events { worker_connections 4096; }\n"
        f"http {{ access_log off; client_body_temp_path {folder}; proxy_temp_path {folder};\n"
        f"  fastcgi_temp_path {folder}; uwsgi_temp_path {folder}; scgi_temp_path {folder};\n"
        f"  server {{ listen 127.0.0.1:{port}; location / {{ return 200 '{{}}'; }} }} }}\n")
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    proc = subprocess.Popen([nginx, "-p", folder, "-c", f"{folder}/nginx.conf", "-g", "daemon off;"])
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not Path(folder, "nginx.pid").exists():
        time.sleep(0.05)
    return proc, port, folder


def first_chunk_seconds(client, url: str, headers: dict[str, str],  # type: ignore[no-untyped-def]
                        system: str = "") -> float:
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": "Hi"}]
    body = {"model": "tiny-mistral", "messages": messages, "max_tokens": 16, "stream": True}
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


class _UsageSwitch:
    """Turns the gateway's usage counting off and on again: its nginx.conf without the key id in the access
    log and without the X-Request-Id that names the key to the engine, then as rendered; a reload each way."""

    def __init__(self, deployed, store) -> None:  # type: ignore[no-untyped-def]
        self.conf = store.dir(deployed.name) / "gateway" / "nginx.conf"
        self.pid = int(deployed.details["gateway"]["pid"])
        self.counting = self.conf.read_text()
        plain = self.counting.replace(" key=$md_key_log", "")
        plain = "\n".join(line for line in plain.splitlines() if "X-Request-Id mdk." not in line)
        assert plain != self.counting and "X-Request-Id mdk." not in plain
        self.plain = plain + "\n"

    def _reload(self, text: str) -> None:
        self.conf.write_text(text)
        os.kill(self.pid, signal.SIGHUP)
        time.sleep(1.5)  # the new workers start, the old ones finish

    @contextlib.contextmanager
    def off(self):  # type: ignore[no-untyped-def]
        self._reload(self.plain)
        try:
            yield
        finally:
            self._reload(self.counting)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--connections", default="16,256", help="connection counts, comma-separated")
    parser.add_argument("--streams", type=int, default=30)
    parser.add_argument("--guardrail", action="store_true", help="the recipe's guardrail: mistral on")
    parser.add_argument("--usage-off", action="store_true", help="also measure the gateway with usage counting off")
    args = parser.parse_args()
    import httpx

    ceiling, ceiling_port, ceiling_dir = ceiling_server()
    try:
        from mistral_deploy.gateway import GUARDRAIL_PROMPTS

        guardrail = "mistral" if args.guardrail else None
        system = GUARDRAIL_PROMPTS["mistral"] if args.guardrail else ""
        with state_home(), deployment("bench-gateway", limits=LIMITS, guardrail=guardrail) as (deployed, key, _store):
            gateway_port = int(deployed.details["port"])
            socket_path = deployed.details["engine_socket"]
            gateway = deployed.endpoint.removesuffix("/v1")
            auth = f"Bearer {key}"
            print(f"endpoint {gateway} (gateway, every limit on) and unix:{socket_path} (engine), "
                  f"{os.cpu_count()} cores shared with the load generator")
            usage = _UsageSwitch(deployed, _store) if args.usage_off else None
            hammer(tcp(gateway_port), "/v1/models", auth, 2, 16)  # warm-up
            for connections in (int(c) for c in args.connections.split(",")):
                rates: dict[str, list[float]] = {"gateway": [], "direct": [], "ceiling": [], "no-usage": []}
                for _ in range(args.rounds):
                    rates["gateway"].append(hammer(tcp(gateway_port), "/v1/models", auth, args.seconds, connections))
                    rates["direct"].append(hammer(unix(socket_path), "/v1/models", "", args.seconds, connections))
                    if usage:
                        with usage.off():
                            rates["no-usage"].append(hammer(tcp(gateway_port), "/v1/models", auth, args.seconds,
                                                            connections))
                rates["ceiling"].append(hammer(tcp(ceiling_port), "/", "", args.seconds, connections))
                g, d = statistics.median(rates["gateway"]), statistics.median(rates["direct"])
                print(f"GET /v1/models, {connections} connections, {args.rounds} alternating rounds of "
                      f"{args.seconds:g}s each (medians):")
                print(f"  direct   {d:9.0f} req/s  {[round(r) for r in rates['direct']]}")
                print(f"  gateway  {g:9.0f} req/s  {[round(r) for r in rates['gateway']]}")
                print(f"  ratio    {g / d:9.3f}  (aim >= 0.97)")
                if usage:
                    n = statistics.median(rates["no-usage"])
                    print(f"  no-usage {n:9.0f} req/s  {[round(r) for r in rates['no-usage']]}  (usage counting off)")
                    print(f"  ratio    {n / d:9.3f}  without usage counting; with it / without: {g / n:.3f}")
                print(f"  load generator ceiling {rates['ceiling'][0]:9.0f} req/s (nginx answering without work)")

            firsts: dict[str, list[float]] = {"gateway": [], "direct": [], "no-usage": []}
            modes = [("gateway", False), ("no-usage", True)] if usage else [("gateway", False)]
            with httpx.Client(timeout=60, trust_env=False) as via_gateway, \
                    httpx.Client(timeout=60, transport=httpx.HTTPTransport(uds=socket_path)) as direct:
                for mode, counting_off in modes:
                    with (usage.off() if counting_off else contextlib.nullcontext()):
                        for i in range(args.streams + 2):
                            for name, client, base, headers, own_system in (
                                    (mode, via_gateway, gateway, {"Authorization": auth}, ""),
                                    ("direct", direct, "http://engine", {}, system)):
                                value = first_chunk_seconds(client, base + "/v1/chat/completions", headers, own_system)
                                if i >= 2:  # the first two are warm-up
                                    firsts[name].append(value)
            mg, md = statistics.median(firsts["gateway"]), statistics.median(firsts["direct"])
            what = " (guardrail on: the gateway rewrites each body)" if args.guardrail else ""
            print(f"first streamed chunk, median of {args.streams} interleaved requests each{what}:")
            print(f"  direct   {md * 1000:7.2f} ms")
            print(f"  gateway  {mg * 1000:7.2f} ms")
            print(f"  added    {(mg - md) * 1000:7.2f} ms  (aim < 1 ms)")
            if usage:
                mn = statistics.median(firsts["no-usage"])
                print(f"  no-usage {mn * 1000:7.2f} ms  (usage counting off); counting adds {(mg - mn) * 1000:.2f} ms")
    finally:
        ceiling.terminate()
        ceiling.wait(timeout=10)
        shutil.rmtree(ceiling_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
