"""An httpx transport over httpcore's connection pool on the load generator's own socket layer
(`bench.LoopBackend`), through the public interfaces of both: httpx's AsyncBaseTransport and httpcore's
`network_backend`. httpx's own AsyncHTTPTransport does the same on the anyio backend; the request and the
response are handed over as it hands them, and httpcore's errors are raised as httpx's of the same name,
so callers see what they would see with httpx's transport. Imported by `bench` when it sends.
"""

from __future__ import annotations

import contextlib
from typing import Any, AsyncIterator, Iterator

import httpcore
import httpx

from mistral_deploy.bench import LoopBackend


class LoopTransport(httpx.AsyncBaseTransport):
    def __init__(self, ssl: Any, connections: int) -> None:
        self._pool = httpcore.AsyncConnectionPool(
            ssl_context=ssl, max_connections=connections, max_keepalive_connections=connections,
            network_backend=LoopBackend())

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        core = httpcore.Request(
            method=request.method,
            url=httpcore.URL(scheme=request.url.raw_scheme, host=request.url.raw_host, port=request.url.port,
                             target=request.url.raw_path),
            headers=request.headers.raw, content=request.stream, extensions=request.extensions)
        with _httpx_errors():
            answer = await self._pool.handle_async_request(core)
        return httpx.Response(status_code=answer.status, headers=answer.headers,
                              stream=_ResponseStream(answer.stream), extensions=answer.extensions)

    async def aclose(self) -> None:
        await self._pool.aclose()


class _ResponseStream(httpx.AsyncByteStream):
    def __init__(self, stream: Any) -> None:
        self._stream = stream

    async def __aiter__(self) -> AsyncIterator[bytes]:
        with _httpx_errors():
            async for part in self._stream:
                yield part

    async def aclose(self) -> None:
        if hasattr(self._stream, "aclose"):
            await self._stream.aclose()


@contextlib.contextmanager
def _httpx_errors() -> Iterator[None]:
    """httpcore's exceptions as httpx's of the same name (ReadTimeout, ConnectError, RemoteProtocolError...)."""
    try:
        yield
    except httpcore.TimeoutException as exc:  # PoolTimeout included
        raise getattr(httpx, type(exc).__name__, httpx.TimeoutException)(str(exc)) from exc
    except (httpcore.NetworkError, httpcore.ProtocolError, httpcore.UnsupportedProtocol, httpcore.ProxyError) as exc:
        raise getattr(httpx, type(exc).__name__, httpx.TransportError)(str(exc)) from exc
