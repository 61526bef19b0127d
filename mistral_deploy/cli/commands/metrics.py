"""`mistral-deploy metrics`: the engine's metrics and the gateway's counters per key, in Prometheus text."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from mistral_deploy.cli import app
from mistral_deploy.cli._output import Output


@app.command()
def metrics(
    name: Annotated[str, typer.Argument(help="A deployment.")],
    serve: Annotated[Optional[int], typer.Option(
        "--serve", min=1, max=65535,
        help="Answer Prometheus on 127.0.0.1:PORT/metrics (each scrape reads the endpoint anew) until Ctrl-C.")] = None,
) -> None:
    """Print vLLM's metrics and the gateway's per-key counters (requests by outcome, prompt and completion
    tokens) in Prometheus text; a service's replicas are labelled replica="N". Read from the machine itself
    (over SkyPilot's SSH on a cloud): key holders still get 404 on /metrics. Exit 5: no such deployment."""
    from mistral_deploy.state import StateStore

    out = Output()
    store = StateStore()
    deployment = store.load(name)
    if serve is None:
        out.data(_text(deployment, store).rstrip("\n"))
        return
    _serve(deployment, store, serve, out)


def _text(deployment, store) -> str:  # type: ignore[no-untyped-def]
    from mistral_deploy import observe

    sources = observe.sources(deployment, store)
    if len(sources) == 1 and deployment.backend != "serve":
        return sources[0].metrics_text()
    lines: list[str] = []
    seen: set[str] = set()
    for source in sources:
        lines += observe.labelled(source.metrics_text(), source.label.removeprefix("replica "), seen)
    return "\n".join(lines) + "\n"


def _serve(deployment, store, port: int, out: Output) -> None:  # type: ignore[no-untyped-def]
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from mistral_deploy.errors import MistralDeployError

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            if self.path.split("?")[0] != "/metrics":
                self.send_error(404)
                return
            try:
                body, status = _text(deployment, store).encode(), 200
            except MistralDeployError as exc:
                body, status = f"# {exc.message}\n".encode(), 503
            self.send_response(status)
            self.send_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args) -> None:  # type: ignore[no-untyped-def]
            pass

    try:
        server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    except OSError as exc:
        raise MistralDeployError(f"--serve: cannot listen on 127.0.0.1:{port}: {exc.strerror}") from None
    out.info(f"serving {deployment.name}'s metrics on http://127.0.0.1:{port}/metrics (Ctrl-C stops)")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
