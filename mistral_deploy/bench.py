"""A load generator for an OpenAI-compatible endpoint: concurrent streaming requests, latency figures.

Each request streams a chat completion (or a completion) of exactly `output_len` tokens (`ignore_eos`,
as vLLM's own benchmark sends, and `min_tokens`, so that no stop token ends it early) for a synthetic
prompt of about `input_len` tokens, and records its time to first token (TTFT), the gaps between token
chunks (ITL), its end-to-end latency and its output tokens (from the stream's `usage`). The report gives
requests/s, output tokens/s, the mean and p50/p95/p99 of each latency, and the errors by kind with a few
sample messages (the key blanked out).

The statistics (`percentile`, `distribution`, `summarize`) are pure; the HTTP lives in `run`. The hot
loop timestamps each network read and parses only the few SSE events that are not plain token chunks,
and httpx runs on a lean asyncio socket layer (`LoopBackend`, through a transport of our own:
`loop_transport.LoopTransport`), so that the generator, which may share
the machine with the engine it measures, stays far from being the bottleneck.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Optional, Sequence

from mistral_deploy.errors import MistralDeployError

if TYPE_CHECKING:
    import httpx

API_CHAT = "chat"
API_COMPLETIONS = "completions"
APIS = (API_CHAT, API_COMPLETIONS)
PATHS = {API_CHAT: "/chat/completions", API_COMPLETIONS: "/completions"}

DEFAULT_REQUESTS = 64  # when neither a request count nor a duration is given
PERCENTILES = (50, 95, 99)
ERROR_SAMPLES = 3
# A key refused or a model missing will not change while we wait: stop starting new requests.
FATAL_STATUSES = (401, 403, 404)

# Common short English words: most are one token for real tokenizers; `prepare` measures the actual
# ratio against the endpoint's tokenizer, so the prompt lands near input_len tokens anyway.
WORDS = (
    "the of and to in is you that it he was for on are as with his they at be this have from or one had "
    "by word but not what all were we when your can said there use an each which she do how their if will "
    "up other about out many then them these so some her would make like him into time has look two more "
    "write go see number no way could people my than first water been call who oil its now find long down "
    "day did get come made may part over new sound take only little work know place year live me back give "
    "most very after thing our just name good sentence man think say great where help through much before "
    "line right too mean old any same tell boy follow came want show also around form three small set put"
).split()


class BenchError(MistralDeployError):
    """The benchmark could not start or measured nothing (exit 1)."""


@dataclass(frozen=True, kw_only=True)
class LoadSpec:
    """What to send. `requests` and `duration` both bound the run; with neither, DEFAULT_REQUESTS."""

    base_url: str  # the OpenAI base URL, ending in /v1
    model: Optional[str] = None  # None: the first model the endpoint lists
    api: str = API_CHAT
    requests: Optional[int] = None
    duration: Optional[float] = None
    concurrency: int = 8
    input_len: int = 128
    output_len: int = 64
    timeout: float = 300.0  # for a connection, and for each read of an answer
    seed: int = 0

    def __post_init__(self) -> None:
        if self.api not in APIS:
            raise BenchError(f"api must be one of {', '.join(APIS)}, not {self.api!r}")
        for name in ("concurrency", "input_len", "output_len"):
            if getattr(self, name) < 1:
                raise BenchError(f"{name} must be at least 1")
        if self.requests is not None and self.requests < 1:
            raise BenchError("requests must be at least 1")
        if self.duration is not None and self.duration <= 0:
            raise BenchError("duration must be positive")
        if self.timeout <= 0:
            raise BenchError("timeout must be positive")
        if self.requests is None and self.duration is None:
            object.__setattr__(self, "requests", DEFAULT_REQUESTS)


@dataclass(slots=True)
class RequestResult:
    """One request as the client saw it. Times in seconds, from the moment it was sent."""

    started: float  # perf_counter when sent
    ended: float = 0.0  # perf_counter when the stream ended (or the request failed)
    ttft: Optional[float] = None
    itls: list[float] = field(default_factory=list)
    output_tokens: int = 0
    prompt_tokens: Optional[int] = None
    status: Optional[int] = None  # the HTTP status, when one came back
    error: Optional[str] = None  # the error's kind: "HTTP 401", "ReadTimeout", "stream ended early"
    detail: str = ""  # a short message for the error samples

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def e2e(self) -> float:
        return self.ended - self.started


# --------------------------------------------------------------------------------------------------
# Statistics: pure functions


def percentile(values: Sequence[float], q: float) -> Optional[float]:
    """The q-th percentile (0-100) with linear interpolation between closest ranks (numpy's default,
    which vLLM's benchmark uses); None for no values."""
    if not 0 <= q <= 100:
        raise ValueError(f"percentile must be within 0..100, not {q}")
    if not values:
        return None
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def distribution(values: Sequence[float], scale: float = 1000.0) -> dict[str, Optional[float]]:
    """Mean and p50/p95/p99, scaled (seconds to milliseconds by default); None where there are no values."""
    out: dict[str, Optional[float]] = {"mean": sum(values) / len(values) * scale if values else None}
    for q in PERCENTILES:
        value = percentile(values, q)
        out[f"p{q}"] = None if value is None else value * scale
    return out


def rate(count: float, seconds: float) -> float:
    """count per second; 0 when no time has passed (nothing was measured)."""
    return count / seconds if seconds > 0 else 0.0


def summarize(results: Sequence[RequestResult], duration: float, *, secret: str = "") -> dict[str, Any]:
    """The report's figures from the requests' results and the run's wall-clock duration.

    Throughputs count successful requests only, over the whole run (first send to last answer), as
    vLLM's benchmark does; ITL pools the gaps of every request. `secret` is blanked out of the samples.
    """
    done = [r for r in results if r.ok]
    failed = [r for r in results if not r.ok]
    counts: dict[str, int] = {}
    samples: list[str] = []
    for r in failed:
        kind = r.error or "error"
        counts[kind] = counts.get(kind, 0) + 1
        sample = f"{kind}: {r.detail}" if r.detail else kind
        if secret:
            sample = sample.replace(secret, "***")
        if len(samples) < ERROR_SAMPLES and sample not in samples:
            samples.append(sample)
    output_tokens = sum(r.output_tokens for r in done)
    prompts = [r.prompt_tokens for r in done if r.prompt_tokens is not None]
    return {
        "requests": len(results),
        "completed": len(done),
        "errors": len(failed),
        "error_counts": dict(sorted(counts.items())),
        "error_samples": samples,
        "duration_s": duration,
        "requests_per_s": rate(len(done), duration),
        "output_tokens_per_s": rate(output_tokens, duration),
        "output_tokens": output_tokens,
        "mean_input_tokens": sum(prompts) / len(prompts) if prompts else None,
        "mean_output_tokens": output_tokens / len(done) if done else None,
        "ttft_ms": distribution([r.ttft for r in done if r.ttft is not None]),
        "itl_ms": distribution([gap for r in done for gap in r.itls]),
        "e2e_ms": distribution([r.e2e for r in done]),
    }


def cost_per_million(hourly_price: Optional[float], tokens_per_s: Optional[float]) -> Optional[float]:
    """$ per million tokens when the whole hourly price buys tokens at this rate; None without a price
    or a rate."""
    if not hourly_price or hourly_price <= 0 or not tokens_per_s or tokens_per_s <= 0:
        return None
    return hourly_price / (tokens_per_s * 3600) * 1e6


def add_costs(report: dict[str, Any], hourly_price: Optional[float], source: str) -> dict[str, Any]:
    """The report's $/Mtok figures: the endpoint's hourly price over the output tokens measured per
    second (and, apart, over the input tokens), at the run's concurrency."""
    input_per_s = (report["mean_input_tokens"] or 0) * report["requests_per_s"]
    report.update(
        hourly_price=hourly_price, price_source=source if hourly_price else None,
        usd_per_mtok_output=cost_per_million(hourly_price, report["output_tokens_per_s"]),
        usd_per_mtok_input=cost_per_million(hourly_price, input_per_s),
    )
    return report


def synthetic_prompt(rng: random.Random, words: int) -> str:
    """`words` random common words: every prompt differs from its first word on, so the engine's prefix
    cache does not make prefill free (vLLM's benchmark sends random tokens for the same reason)."""
    return " ".join(rng.choices(WORDS, k=words))


def words_for(input_len: int, one_word_tokens: float, many_words: int, many_words_tokens: float) -> int:
    """Words for a prompt of about `input_len` tokens, from two measured prompts (1 word and
    `many_words` words): the difference is the words' tokens, the rest the template's overhead."""
    if many_words <= 1 or many_words_tokens <= one_word_tokens:
        return input_len
    per_word = (many_words_tokens - one_word_tokens) / (many_words - 1)
    return max(1, round(input_len / per_word))


# --------------------------------------------------------------------------------------------------
# HTTP


def request_body(spec: LoadSpec, model: str, prompt: str, *, stream: bool = True,
                 max_tokens: Optional[int] = None) -> bytes:
    tokens = spec.output_len if max_tokens is None else max_tokens
    body: dict[str, Any] = {"model": model, "max_tokens": tokens, "min_tokens": tokens, "ignore_eos": True}
    if spec.api == API_CHAT:
        body["messages"] = [{"role": "user", "content": prompt}]
    else:
        body["prompt"] = prompt
    if stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    return json.dumps(body).encode()


def _refusal(status: int, text: str, spec: LoadSpec, model: Optional[str]) -> BenchError:
    """A clear error for an answer that ends the benchmark before it starts."""
    snippet = " ".join(text.split())[:200]
    if status in (401, 403):
        return BenchError(f"the endpoint refused the API key (HTTP {status})",
                          hint="`bench NAME` uses the deployment's first key; with --url the key is read "
                               "from OPENAI_API_KEY")
    if status == 404:
        what = f"model {model!r} or " if model else ""
        return BenchError(f"HTTP 404 from {spec.base_url}: no such {what}route ({snippet})",
                          hint="the URL is the OpenAI base URL, ending in /v1")
    return BenchError(f"HTTP {status} from {spec.base_url}: {snippet}")


def _loop_transport(ssl: Any, connections: int) -> "httpx.AsyncBaseTransport":
    from mistral_deploy.loop_transport import LoopTransport  # imports httpx and httpcore: only when sending

    return LoopTransport(ssl, connections)


def _client(spec: LoadSpec, api_key: str, ca_file: Optional[str]) -> "httpx.AsyncClient":
    import httpx

    from mistral_deploy.probe import ssl_context

    # identity: the stream is read raw, without a decoder in the hot loop
    headers = {"Content-Type": "application/json", "Accept-Encoding": "identity"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    # trust_env=False: a proxy from the environment must never see the key or sit in the measurements
    tls = httpx.create_ssl_context(verify=ssl_context(ca_file), trust_env=False)
    return httpx.AsyncClient(
        base_url=spec.base_url.rstrip("/"), headers=headers, transport=_loop_transport(tls, spec.concurrency),
        trust_env=False, timeout=httpx.Timeout(spec.timeout, connect=min(spec.timeout, 10.0)),
    )


class _Buffered(asyncio.Protocol):
    """Received bytes wait in a list until the stream reads them all at once."""

    HIGH_WATER = 1 << 20

    def __init__(self) -> None:
        self.chunks: list[bytes] = []
        self.size = 0
        self.eof = False
        self.waiter: Optional[asyncio.Future[None]] = None
        self.drained: Optional[asyncio.Future[None]] = None
        self.transport: Optional[asyncio.Transport] = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.chunks.append(data)
        self.size += len(data)
        if self.size > self.HIGH_WATER and self.transport is not None:
            self.transport.pause_reading()
        self._wake()

    def eof_received(self) -> bool:
        self.eof = True
        self._wake()
        return False

    def connection_lost(self, exc: Optional[Exception]) -> None:
        self.eof = True
        self._wake()
        self.resume_writing()

    def pause_writing(self) -> None:
        self.drained = asyncio.get_running_loop().create_future()

    def resume_writing(self) -> None:
        if self.drained is not None and not self.drained.done():
            self.drained.set_result(None)
        self.drained = None

    def _wake(self) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)


class _LoopStream:
    """httpcore's AsyncNetworkStream on an asyncio transport: one future per wait, no task or cancel scope."""

    def __init__(self, transport: asyncio.Transport, protocol: _Buffered) -> None:
        self._transport = transport
        self._protocol = protocol

    async def read(self, max_bytes: int, timeout: Optional[float] = None) -> bytes:
        protocol = self._protocol
        if not protocol.chunks:
            if protocol.eof:
                return b""
            loop = asyncio.get_running_loop()
            waiter = protocol.waiter = loop.create_future()
            timer = loop.call_later(timeout, _expire, waiter) if timeout is not None else None
            try:
                await waiter
            finally:
                protocol.waiter = None
                if timer is not None:
                    timer.cancel()
            if waiter.result() is _TIMED_OUT:
                import httpcore

                raise httpcore.ReadTimeout(f"no data for {timeout}s")
            if not protocol.chunks:
                return b""
        chunks = protocol.chunks
        data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        chunks.clear()
        if protocol.size > protocol.HIGH_WATER:
            self._transport.resume_reading()
        protocol.size = 0
        return data

    async def write(self, buffer: bytes, timeout: Optional[float] = None) -> None:
        if self._transport.is_closing():
            import httpcore

            raise httpcore.WriteError("the connection is closed")
        self._transport.write(buffer)
        if self._protocol.drained is not None:
            await asyncio.wait_for(asyncio.shield(self._protocol.drained), timeout)

    async def aclose(self) -> None:
        self._transport.close()

    async def start_tls(self, ssl_context: Any, server_hostname: Optional[str] = None,
                        timeout: Optional[float] = None) -> "_LoopStream":
        loop = asyncio.get_running_loop()
        try:
            transport = await asyncio.wait_for(
                loop.start_tls(self._transport, self._protocol, ssl_context, server_hostname=server_hostname),
                timeout)
        except (OSError, asyncio.TimeoutError) as exc:  # ssl.SSLError is an OSError
            import httpcore

            self._transport.close()
            raise (httpcore.ConnectTimeout if isinstance(exc, asyncio.TimeoutError)
                   else httpcore.ConnectError)(str(exc)) from exc
        self._protocol.transport = transport  # type: ignore[assignment]
        return _LoopStream(transport, self._protocol)  # type: ignore[arg-type]

    def get_extra_info(self, info: str) -> Any:
        if info == "is_readable":  # an idle kept-alive connection with data or EOF was closed by the server
            return self._protocol.eof or bool(self._protocol.chunks)
        names = {"ssl_object": "ssl_object", "client_addr": "sockname", "server_addr": "peername",
                 "socket": "socket"}
        return self._transport.get_extra_info(names[info]) if info in names else None


_TIMED_OUT = object()


def _expire(waiter: "asyncio.Future[object]") -> None:
    if not waiter.done():
        waiter.set_result(_TIMED_OUT)


class LoopBackend:
    """httpcore's network backend on plain asyncio transports.

    httpcore's default (anyio) backend costs ~2x the CPU per network read: a cancel scope for the
    timeout and a pause/resume of the socket around every read. A streamed token is one read, so that
    cost is most of what the generator spends; on a machine it shares with the engine it is taken from
    the engine. httpx still does all the HTTP (and h11 the parsing); only the socket layer is swapped.
    """

    async def connect_tcp(self, host: str, port: int, timeout: Optional[float] = None,
                          local_address: Optional[str] = None, socket_options: Any = None) -> _LoopStream:
        loop = asyncio.get_running_loop()
        try:
            transport, protocol = await asyncio.wait_for(
                loop.create_connection(_Buffered, host, port,
                                       local_addr=(local_address, 0) if local_address else None), timeout)
        except (OSError, asyncio.TimeoutError) as exc:
            import httpcore

            raise (httpcore.ConnectTimeout if isinstance(exc, asyncio.TimeoutError)
                   else httpcore.ConnectError)(str(exc) or type(exc).__name__) from exc
        return _LoopStream(transport, protocol)

    async def connect_unix_socket(self, path: str, timeout: Optional[float] = None,
                                  socket_options: Any = None) -> _LoopStream:
        raise NotImplementedError("unix sockets are not used here")

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


async def _get_json(client: "httpx.AsyncClient", spec: LoadSpec, method: str, path: str,
                    model: Optional[str] = None, content: Optional[bytes] = None) -> dict[str, Any]:
    import httpx

    try:
        response = await client.request(method, path, content=content)
    except httpx.HTTPError as exc:
        raise BenchError(f"cannot reach {spec.base_url}: {type(exc).__name__}: {exc}") from None
    if response.status_code != 200:
        raise _refusal(response.status_code, response.text, spec, model)
    try:
        data = response.json()
    except ValueError:
        data = None
    if not isinstance(data, dict):
        raise BenchError(f"{path} did not answer a JSON object: is {spec.base_url} an OpenAI base URL?")
    return data


async def prepare(client: "httpx.AsyncClient", spec: LoadSpec) -> tuple[str, int, dict[str, Any]]:
    """(model, words per prompt, facts) before the clock starts: the key is accepted, the model is served,
    the prompt's length is calibrated against the endpoint's tokenizer, and prompt + output fit."""
    models = await _get_json(client, spec, "GET", "/models")
    cards = {m.get("id"): m for m in models.get("data", []) if isinstance(m, dict)}
    model = spec.model or next(iter(cards), None)
    if not model:
        raise BenchError(f"{spec.base_url}/models lists no model")
    if model not in cards:
        raise BenchError(f"the endpoint does not serve {model!r}; it serves: {', '.join(map(str, cards)) or 'none'}")
    context = cards[model].get("max_model_len")

    rng = random.Random(-1 - spec.seed)  # not the measured prompts' sequence

    async def prompt_tokens(words: int) -> int:
        body = request_body(spec, model, synthetic_prompt(rng, words), stream=False, max_tokens=1)
        answer = await _get_json(client, spec, "POST", PATHS[spec.api], model, body)
        tokens = (answer.get("usage") or {}).get("prompt_tokens")
        return int(tokens) if isinstance(tokens, int) else words

    one = await prompt_tokens(1)
    probe_words = max(16, spec.input_len)  # long enough to average over words of different lengths
    if isinstance(context, int):  # short enough to fit the context even at 4 tokens a word
        probe_words = max(2, min(probe_words, (context - one) // 4))
    many = (await prompt_tokens(probe_words) + await prompt_tokens(probe_words)) / 2
    words = words_for(spec.input_len, one, probe_words, many)
    overhead = max(0, one - round((many - one) / (probe_words - 1)))
    needed = spec.input_len + overhead + spec.output_len
    if isinstance(context, int) and needed > context:
        raise BenchError(f"a prompt of ~{spec.input_len + overhead} tokens (with the template) and "
                         f"{spec.output_len} output tokens exceed {model}'s context of {context} tokens",
                         hint="lower --input-len or --output-len")
    return model, words, {"max_model_len": context, "prompt_words": words}


# An SSE payload with one of these is parsed; any other is a token chunk.
PARSE_MARKERS = (b'"role"', b'"usage"', b'"error"', b'"choices":[]', b'"choices": []')


def _role_only(choice: dict[str, Any]) -> bool:
    delta = choice.get("delta") or {}
    return "role" in delta and not delta.get("content")


async def stream_one(client: "httpx.AsyncClient", path: str, body: bytes, chat: bool) -> RequestResult:
    """Send one streaming request and time its token chunks. The hot loop: keep it light."""
    import httpx

    perf = time.perf_counter
    loads = json.loads
    result = RequestResult(started=perf())
    itls = result.itls
    last = 0.0
    tokens = 0
    done = False
    try:
        async with client.stream("POST", path, content=body) as response:
            result.status = response.status_code
            if response.status_code != 200:
                text = (await response.aread())[:300].decode("utf-8", "replace")
                result.error = f"HTTP {response.status_code}"
                result.detail = " ".join(text.split())[:160]
                result.ended = perf()
                return result
            pending = b""
            async for chunk in response.aiter_raw():
                now = perf()
                lines = (pending + chunk).split(b"\n")
                pending = lines.pop()
                for line in lines:
                    if not line.startswith(b"data:"):
                        continue  # blank separators, SSE comments (keep-alives), event names
                    payload = line[5:].strip()
                    if payload == b"[DONE]":
                        done = True
                        continue
                    # Token chunks are most of the stream: recognised without parsing. None of the markers
                    # can occur inside generated text (JSON escapes its quotes).
                    token = not any(marker in payload for marker in PARSE_MARKERS)
                    if not token:
                        event = loads(payload)
                        choices = event.get("choices")
                        # a chat stream starts with a role announcement, which is not a token
                        token = bool(choices) and not (chat and _role_only(choices[0]))
                        usage = event.get("usage")
                        if usage:
                            result.output_tokens = usage.get("completion_tokens") or 0
                            result.prompt_tokens = usage.get("prompt_tokens")
                        if "error" in event:
                            err = event["error"]
                            result.error = "stream error"
                            result.detail = str(err.get("message", err) if isinstance(err, dict) else err)[:160]
                    if token:
                        if result.ttft is None:
                            result.ttft = now - result.started
                        else:
                            itls.append(now - last)
                        last = now
                        tokens += 1
    except httpx.HTTPError as exc:
        result.error = type(exc).__name__
        result.detail = str(exc)[:160]
    except ValueError as exc:  # a data line that is not JSON
        result.error = "bad stream"
        result.detail = str(exc)[:160]
    result.ended = perf()
    if result.error is None:
        if result.ttft is None:
            result.error = "no token"
        elif not done:
            result.error = "stream ended early"
    if not result.output_tokens:
        result.output_tokens = tokens  # no usage in the stream: count the token chunks
    return result


async def _run(spec: LoadSpec, api_key: str, ca_file: Optional[str],
               on_progress: Optional[Callable[[int, int, float], None]]) -> dict[str, Any]:
    async with _client(spec, api_key, ca_file) as client:
        model, words, facts = await prepare(client, spec)
        rng = random.Random(spec.seed)
        path = PATHS[spec.api]
        chat = spec.api == API_CHAT
        results: list[RequestResult] = []
        stopped: list[str] = []
        sent = failed = 0
        started = time.perf_counter()
        deadline = started + spec.duration if spec.duration else math.inf

        def more() -> bool:
            return (not stopped and (spec.requests is None or sent < spec.requests)
                    and time.perf_counter() < deadline)

        async def worker() -> None:
            nonlocal sent, failed
            while more():
                sent += 1
                body = request_body(spec, model, synthetic_prompt(rng, words))
                result = await stream_one(client, path, body, chat)
                results.append(result)
                if result.error:
                    failed += 1
                    if result.status in FATAL_STATUSES and not stopped:
                        stopped.append(f"stopped early: {result.error} (the endpoint refuses these requests)")

        async def ticker() -> None:
            while True:
                on_progress(len(results), failed, time.perf_counter() - started)  # type: ignore[misc]
                await asyncio.sleep(0.2)

        tick = asyncio.create_task(ticker()) if on_progress else None
        try:
            await asyncio.gather(*(worker() for _ in range(spec.concurrency)))
        finally:
            if tick:
                tick.cancel()
        duration = time.perf_counter() - started
        if on_progress:
            on_progress(len(results), failed, duration)

    report = {
        "url": spec.base_url, "model": model, "api": spec.api, "concurrency": spec.concurrency,
        "input_len": spec.input_len, "output_len": spec.output_len,
        "requested": spec.requests, "duration_limit_s": spec.duration, **facts,
        **summarize(results, duration, secret=api_key),
        "stopped_early": stopped[0] if stopped else None,
    }
    return report


def run(spec: LoadSpec, *, api_key: str = "", ca_file: Optional[str] = None,
        on_progress: Optional[Callable[[int, int, float], None]] = None) -> dict[str, Any]:
    """Drive the endpoint as `spec` says and return the report (see `summarize`, plus the run's settings).

    `on_progress(finished, failed, elapsed_seconds)` is called a few times a second while it runs.
    BenchError when it cannot start (unreachable, key refused, no such model, too long for the context).
    """
    return asyncio.run(_run(spec, api_key, ca_file, on_progress))
