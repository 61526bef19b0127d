"""`mistral-deploy bench`: the statistics as pure functions, then the real command against a real local
endpoint (the vLLM CPU engine behind the nginx gateway), with the deployment's key and with a wrong one.
"""

from __future__ import annotations

import asyncio
import json
import random
import ssl
import threading
from typing import Optional

import pytest

from local_support import cli, cli_env, down_and_assert_gone, free_port, up
from mistral_deploy.bench import (
    BenchError, LoadSpec, RequestResult, distribution, percentile, rate, request_body, run, summarize,
    synthetic_prompt, words_for,
)

pytestmark = pytest.mark.engine


# --------------------------------------------------------------------------------------------------
# Statistics


@pytest.mark.parametrize(("values", "q", "expected"), [
    ([1, 2, 3, 4], 50, 2.5),
    ([1, 2, 3, 4], 0, 1),
    ([1, 2, 3, 4], 100, 4),
    ([4, 1, 3, 2], 75, 3.25),  # unsorted input; linear interpolation between ranks
    (list(range(1, 101)), 99, 99.01),
    ([7.0], 95, 7.0),
    ([], 50, None),
])
def test_percentile_interpolates_between_ranks_like_numpy(values, q, expected):
    got = percentile(values, q)
    assert got == (None if expected is None else pytest.approx(expected))


def test_percentile_rejects_a_q_outside_0_100():
    with pytest.raises(ValueError):
        percentile([1.0], 101)


def test_distribution_is_in_milliseconds_with_mean_and_three_percentiles():
    assert distribution([0.010, 0.020, 0.030]) == pytest.approx(
        {"mean": 20.0, "p50": 20.0, "p95": 29.0, "p99": 29.8})
    assert distribution([]) == {"mean": None, "p50": None, "p95": None, "p99": None}


def test_rate_is_zero_without_time():
    assert rate(10, 2.0) == 5.0
    assert rate(10, 0.0) == 0.0


def _ok(started: float, ttft: float, gaps: list[float], tokens: int, prompt: int = 10) -> RequestResult:
    return RequestResult(started=started, ended=started + ttft + sum(gaps), ttft=ttft, itls=gaps,
                         output_tokens=tokens, prompt_tokens=prompt, status=200)


def test_summarize_counts_only_successes_in_throughput_and_latencies():
    results = [
        _ok(0.0, 0.1, [0.01, 0.02, 0.03], 4),
        _ok(0.5, 0.3, [0.05], 2, prompt=20),
        RequestResult(started=1.0, ended=1.1, status=503, error="HTTP 503", detail="busy, key sk-secret-123"),
        RequestResult(started=1.0, ended=3.0, error="ReadTimeout", detail="timed out"),
        RequestResult(started=1.2, ended=1.3, status=503, error="HTTP 503", detail="busy"),
    ]
    report = summarize(results, 2.0, secret="sk-secret-123")
    assert (report["requests"], report["completed"], report["errors"]) == (5, 2, 3)
    assert report["error_counts"] == {"HTTP 503": 2, "ReadTimeout": 1}
    assert report["error_samples"] == ["HTTP 503: busy, key ***", "ReadTimeout: timed out", "HTTP 503: busy"]
    assert report["requests_per_s"] == pytest.approx(1.0)
    assert report["output_tokens"] == 6 and report["output_tokens_per_s"] == pytest.approx(3.0)
    assert report["mean_input_tokens"] == 15 and report["mean_output_tokens"] == 3
    assert report["ttft_ms"]["p50"] == pytest.approx(200.0) and report["ttft_ms"]["mean"] == pytest.approx(200.0)
    assert report["itl_ms"]["p50"] == pytest.approx(25.0)  # the gaps of every request, pooled
    assert report["e2e_ms"]["mean"] == pytest.approx((160 + 350) / 2)


def test_summarize_of_nothing_measured_is_all_zero_and_none():
    report = summarize([], 0.0)
    assert report["requests_per_s"] == 0 and report["output_tokens_per_s"] == 0
    assert report["ttft_ms"]["p50"] is None and report["error_counts"] == {}


def test_words_for_subtracts_the_template_and_scales_by_tokens_per_word():
    # 1 word: 18 tokens (16 of template), 41 words: 118 tokens -> 2.5 tokens a word
    assert words_for(100, 18, 41, 118) == 40
    assert words_for(7, 3, 1, 3) == 7  # nothing to measure with: one word, one token
    assert words_for(1, 10, 20, 400) == 1


def test_prompts_differ_and_bodies_ask_for_exactly_output_len_tokens():
    rng = random.Random(0)
    prompts = {synthetic_prompt(rng, 12) for _ in range(50)}
    assert len(prompts) == 50 and all(len(p.split()) == 12 for p in prompts)
    spec = LoadSpec(base_url="http://127.0.0.1:1/v1", output_len=16)
    chat = json.loads(request_body(spec, "m", "hi"))
    assert chat["messages"] == [{"role": "user", "content": "hi"}]
    assert (chat["max_tokens"], chat["min_tokens"], chat["ignore_eos"]) == (16, 16, True)
    assert chat["stream"] and chat["stream_options"] == {"include_usage": True}
    completion = json.loads(request_body(LoadSpec(base_url="http://x/v1", api="completions"), "m", "hi"))
    assert completion["prompt"] == "hi" and "messages" not in completion


def test_load_spec_validates_and_defaults_to_a_request_count():
    assert LoadSpec(base_url="http://x/v1").requests == 64
    assert LoadSpec(base_url="http://x/v1", duration=5).requests is None
    for bad in ({"concurrency": 0}, {"api": "embeddings"}, {"requests": 0}, {"duration": -1}):
        with pytest.raises(BenchError):
            LoadSpec(base_url="http://x/v1", **bad)


# --------------------------------------------------------------------------------------------------
# The hot loop against a scripted SSE endpoint: what vLLM does not do on demand (stalls, cut streams,
# errors in the stream, pings, events split across reads), over plain HTTP and over pinned TLS.

class ScriptedEndpoint:
    """An OpenAI-shaped endpoint on 127.0.0.1 in a thread of its own; the model's name picks how it
    streams. Each token follows the previous one after GAP seconds, the first after FIRST."""

    FIRST, GAP = 0.05, 0.01
    MODELS = ("tokens", "no-usage", "truncated", "busy", "stall", "error-event", "revoked")

    def __init__(self, tls: Optional[ssl.SSLContext] = None) -> None:
        self.tls = tls
        self.requests = 0
        self.ready = threading.Event()

    def __enter__(self) -> str:
        self.thread = threading.Thread(target=lambda: asyncio.run(self._serve()), daemon=True)
        self.thread.start()
        assert self.ready.wait(10)
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}/v1"

    def __exit__(self, *_exc: object) -> None:
        self.loop.call_soon_threadsafe(self.stop.set)
        self.thread.join(10)

    async def _serve(self) -> None:
        self.loop, self.stop = asyncio.get_running_loop(), asyncio.Event()
        server = await asyncio.start_server(self._handle, "127.0.0.1", 0, ssl=self.tls)
        self.port = server.sockets[0].getsockname()[1]
        self.ready.set()
        async with server:
            await self.stop.wait()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = (await reader.readuntil(b"\r\n\r\n")).decode()
                request_line, *lines = head.split("\r\n")
                headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines if line)}
                body = json.loads(await reader.readexactly(int(headers.get("content-length", 0))) or b"{}")
                if request_line.startswith("GET"):
                    self._json(writer, 200, {"data": [{"id": m, "max_model_len": 4096} for m in self.MODELS]})
                    continue
                prompt = body["messages"][0]["content"] if "messages" in body else body["prompt"]
                usage = {"prompt_tokens": len(prompt.split()) + 3, "completion_tokens": body["max_tokens"]}
                if not body.get("stream"):
                    self._json(writer, 200, {"choices": [{"index": 0, "text": "x"}], "usage": usage})
                    continue
                self.requests += 1
                if body["model"] == "revoked":  # the key was accepted while preparing, then revoked
                    self._json(writer, 401, {"error": "invalid key"})
                    continue
                if body["model"] == "busy" and self.requests % 2:
                    self._json(writer, 503, {"error": f"overloaded; you sent {headers.get('authorization')}"})
                    continue
                if not await self._stream(writer, body, "messages" in body, usage):
                    return
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def _stream(self, writer: asyncio.StreamWriter, body: dict, chat: bool, usage: dict) -> bool:
        """Stream one answer; False when the connection was cut on purpose."""
        def send(text: str) -> None:
            data = text.encode()
            writer.write(b"%x\r\n%s\r\n" % (len(data), data))

        def event(text: str) -> str:
            choice = {"index": 0, "delta": {"content": text}} if chat else {"index": 0, "text": text}
            return f"data: {json.dumps({'object': 'chunk', 'choices': [choice]})}\n\n"

        model = body["model"]
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n")
        if chat:
            send('data: {"choices":[{"index":0,"delta":{"role":"assistant","content":""}}]}\n\n')
        send(": ping\n\n")
        for n in range(body["max_tokens"]):
            await asyncio.sleep(self.FIRST if n == 0 else self.GAP)
            text = event(f" t{n}")
            if n == 1:  # one event split across two reads, mid-line
                send(text[:20])
                await writer.drain()
                await asyncio.sleep(0.005)
                send(text[20:])
            else:
                send(text)
            await writer.drain()
            if model == "truncated" and n == 2:
                writer.write(b"0\r\n\r\n")  # a clean end of the body, but no [DONE]
                return True
            if model == "stall" and n == 1:
                await asyncio.sleep(3)
                writer.close()
                return False
            if model == "error-event" and n == 1:
                send('data: {"error": {"message": "boom", "code": 500}}\n\n')
        if model != "no-usage":
            send(f"data: {json.dumps({'choices': [], 'usage': usage})}\n\n")
        send("data: [DONE]\n\n")
        writer.write(b"0\r\n\r\n")
        await writer.drain()
        return True

    @staticmethod
    def _json(writer: asyncio.StreamWriter, status: int, obj: object) -> None:
        data = json.dumps(obj).encode()
        writer.write(b"HTTP/1.1 %d X\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s"
                     % (status, len(data), data))


def _bench(url: str, model: str, key: str = "sk-test-key-42", ca_file: Optional[str] = None, **spec) -> dict:
    settings = {"requests": 6, "concurrency": 3, "input_len": 8, "output_len": 5, **spec}
    return run(LoadSpec(base_url=url, model=model, **settings), api_key=key, ca_file=ca_file)


@pytest.mark.parametrize("api", ["chat", "completions"])
def test_tokens_are_timed_per_chunk_and_counted_from_usage(api):
    with ScriptedEndpoint() as url:
        report = _bench(url, "tokens", api=api)
    assert (report["requests"], report["completed"], report["errors"]) == (6, 6, 0)
    assert report["output_tokens"] == 30 and report["mean_output_tokens"] == 5
    assert report["mean_input_tokens"] >= 8  # the calibrated prompt: ~8 words plus the server's 3
    # the role announcement and the ping are not tokens: TTFT is the first content's delay
    assert 45 <= report["ttft_ms"]["p50"] < 500
    assert 8 <= report["itl_ms"]["p50"] < 200  # GAP between chunks (one event arrived in two reads)
    assert report["e2e_ms"]["p50"] >= 50 + 4 * 10
    assert report["requests_per_s"] == pytest.approx(6 / report["duration_s"])


def test_without_usage_the_token_chunks_are_counted():
    with ScriptedEndpoint() as url:
        report = _bench(url, "no-usage", requests=2)
    assert report["completed"] == 2 and report["output_tokens"] == 10


@pytest.mark.parametrize(("model", "kind", "spec"), [
    ("truncated", "stream ended early", {}),
    ("stall", "ReadTimeout", {"timeout": 0.5}),
    ("error-event", "stream error", {}),
])
def test_broken_streams_are_counted_as_errors_of_their_kind(model, kind, spec):
    with ScriptedEndpoint() as url:
        report = _bench(url, model, requests=3, **spec)
    assert (report["completed"], report["errors"]) == (0, 3)
    assert report["error_counts"] == {kind: 3}
    assert report["output_tokens_per_s"] == 0 and report["ttft_ms"]["p50"] is None
    if model == "error-event":
        assert report["error_samples"] == ["stream error: boom"]


def test_http_errors_are_counted_and_their_samples_never_show_the_key():
    with ScriptedEndpoint() as url:
        report = _bench(url, "busy", requests=8, concurrency=2)
    assert report["completed"] + report["errors"] == 8 and report["errors"] >= 3
    assert list(report["error_counts"]) == ["HTTP 503"]
    assert "sk-test-key-42" not in json.dumps(report)
    assert report["error_samples"] and "Bearer ***" in report["error_samples"][0]


def test_a_refused_key_stops_the_run_instead_of_sending_every_request():
    with ScriptedEndpoint() as url:
        report = _bench(url, "revoked", requests=50, concurrency=2)
    assert report["requests"] == report["errors"] == 2  # the two in flight when the first 401 came back
    assert report["error_counts"] == {"HTTP 401": 2} and "stopped early: HTTP 401" in report["stopped_early"]


def test_a_duration_bounds_the_run_and_requests_in_flight_finish():
    with ScriptedEndpoint() as url:
        report = _bench(url, "tokens", requests=None, duration=0.3, concurrency=2)
    assert report["requested"] is None and report["errors"] == 0
    assert report["completed"] >= 2 and report["duration_s"] >= 0.3


def test_tls_is_verified_against_the_pinned_certificate(tmp_path):
    from mistral_deploy.keys import generate_tls

    files = generate_tls(tmp_path / "tls", ["127.0.0.1"])
    server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_tls.load_cert_chain(files.cert, files.key)
    with ScriptedEndpoint(tls=server_tls) as url:
        report = _bench(url, "tokens", ca_file=str(files.ca_cert), requests=3)
        assert report["completed"] == 3 and report["output_tokens"] == 15
        with pytest.raises(BenchError, match="CERTIFICATE_VERIFY_FAILED|certificate verify failed"):
            _bench(url, "tokens", requests=1)  # the system's CAs do not know this certificate


# --------------------------------------------------------------------------------------------------
# The command against a real local endpoint


def test_bench_a_deployment_and_a_url_with_a_wrong_key(tmp_path, models_dir):
    env = cli_env(tmp_path, models_dir)
    deployed = up("bench-it", tmp_path, env)
    try:
        result = cli("bench", "bench-it", "--json", "--requests", "8", "--concurrency", "4", "--output-len", "16",
                     "--input-len", "32", env=env, timeout=300)
        assert result.returncode == 0, result.stderr[-2000:]
        assert deployed.key not in result.stdout + result.stderr
        report = json.loads(result.stdout)
        assert report["model"] == "tiny-mistral" and report["url"] == deployed.endpoint
        assert (report["requests"], report["completed"], report["errors"]) == (8, 8, 0)
        assert report["error_counts"] == {} and report["stopped_early"] is None
        assert report["output_tokens"] == 8 * 16 and report["mean_output_tokens"] == 16  # exactly, ignore_eos
        assert report["requests_per_s"] > 0 and report["output_tokens_per_s"] > report["requests_per_s"]
        assert 16 < report["mean_input_tokens"] < 100  # ~32 tokens of prompt plus the chat template
        for key in ("ttft_ms", "itl_ms", "e2e_ms"):
            figures = report[key]
            assert 0 < figures["p50"] <= figures["p95"] <= figures["p99"], (key, figures)
            assert figures["mean"] > 0
        assert report["ttft_ms"]["p50"] < report["e2e_ms"]["p50"]
        assert report["e2e_ms"]["p99"] <= report["duration_s"] * 1000
        assert result.stderr.strip() == ""  # no progress bar: --json, and stderr is not a terminal
        # a local endpoint has no price: no $/Mtok is made up
        assert report["hourly_price"] is None and report["usd_per_mtok_output"] is None

        table = cli("bench", "bench-it", "--requests", "4", "--concurrency", "2", "--output-len", "8",
                    "--input-len", "16", "--api", "completions", env=env, timeout=300)
        assert table.returncode == 0, table.stderr[-2000:]
        assert "output tokens/s" in table.stdout and "time to first token" in table.stdout
        assert deployed.key not in table.stdout + table.stderr

        wrong = cli("bench", "--url", deployed.endpoint, "--json", "--requests", "8",
                    env={**env, "OPENAI_API_KEY": "wrong-key-0123456789"}, timeout=120)
        assert wrong.returncode == 1, wrong.stderr
        assert "refused the API key (HTTP 401)" in wrong.stderr and "OPENAI_API_KEY" in wrong.stderr
        assert wrong.stdout == "" and "Traceback" not in wrong.stderr
        assert "wrong-key-0123456789" not in wrong.stderr

        # the URL of the same endpoint with the right key in the environment, never on the command line
        by_url = cli("bench", "--url", deployed.endpoint, "--json", "--requests", "2", "--output-len", "4",
                     "--input-len", "8", "--hourly-price", "1.2", env={**env, "OPENAI_API_KEY": deployed.key},
                     timeout=120)
        assert by_url.returncode == 0, by_url.stderr[-2000:]
        priced = json.loads(by_url.stdout)
        assert priced["completed"] == 2 and priced["price_source"] == "--hourly-price"
        assert abs(priced["usd_per_mtok_output"] - 1.2 / (priced["output_tokens_per_s"] * 3600) * 1e6) < 1e-9
    finally:
        down_and_assert_gone(deployed)


def test_bench_usage_errors_need_no_endpoint(tmp_path, models_dir):
    env = cli_env(tmp_path, models_dir)  # no OPENAI_* variable in it
    missing = cli("bench", "no-such", env=env, timeout=60)
    assert missing.returncode == 5 and "no deployment named 'no-such'" in missing.stderr
    both = cli("bench", "x", "--url", "http://127.0.0.1:9/v1", env=env, timeout=60)
    assert both.returncode == 2 and "not both" in both.stderr
    neither = cli("bench", env=env, timeout=60)
    assert neither.returncode == 1 and "--url" in neither.stderr and "Traceback" not in neither.stderr


def test_the_fast_layer_is_a_transport_of_our_own_and_its_errors_are_httpxs():
    """The generator's socket layer is plugged in through httpx's public transport interface (no private
    attribute swapped), and what goes wrong below it surfaces as httpx's own exceptions."""
    import httpx

    from mistral_deploy.loop_transport import LoopTransport

    transport = LoopTransport(httpx.create_ssl_context(), 4)
    assert isinstance(transport, httpx.AsyncBaseTransport) and not isinstance(transport, httpx.AsyncHTTPTransport)

    async def refused() -> None:
        async with httpx.AsyncClient(transport=transport) as client:
            await client.get(f"http://127.0.0.1:{free_port()}/v1/models")

    with pytest.raises(httpx.ConnectError):
        asyncio.run(refused())
    with pytest.raises(BenchError, match="cannot reach .*: ConnectError"):
        run(LoadSpec(base_url=f"http://127.0.0.1:{free_port()}/v1", requests=1))


def test_dollars_per_million_tokens_come_from_the_price_and_the_measured_rates(tmp_path, models_dir):
    with ScriptedEndpoint() as url:
        done = cli("bench", "--url", url, "--model", "tokens", "--requests", "6", "--concurrency", "3",
                   "--output-len", "5", "--hourly-price", "2.5", "--json",
                   env={**cli_env(tmp_path, models_dir), "OPENAI_API_KEY": "sk-test-key-42"}, timeout=120)
        table = cli("bench", "--url", url, "--model", "tokens", "--requests", "2", "--output-len", "5",
                    "--hourly-price", "2.5", env={**cli_env(tmp_path, models_dir), "OPENAI_API_KEY": "sk-test-key-42"},
                    timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout)
    out_rate, in_rate = report["output_tokens_per_s"], report["mean_input_tokens"] * report["requests_per_s"]
    assert report["hourly_price"] == 2.5 and out_rate > 0 and in_rate > 0
    assert report["usd_per_mtok_output"] == pytest.approx(2.5 / (out_rate * 3600) * 1e6)
    assert report["usd_per_mtok_input"] == pytest.approx(2.5 / (in_rate * 3600) * 1e6)
    assert table.returncode == 0 and "$ per 1M output tokens ($2.500/hour over them)" in table.stdout
    assert "price: --hourly-price" in table.stdout
