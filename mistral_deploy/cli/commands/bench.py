"""`mistral-deploy bench`: drive an endpoint with concurrent streaming requests and report its latencies."""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from typing import Annotated, Any, Callable, Iterator, Literal, Optional

import typer

from mistral_deploy.cli import app
from mistral_deploy.cli._output import Output

# The variables the OpenAI clients read; `mistral-deploy env` and `run` set them.
BASE_URL_ENV = "OPENAI_BASE_URL"
API_KEY_ENV = "OPENAI_API_KEY"
CA_FILE_ENV = "MISTRAL_DEPLOY_CA_FILE"


@app.command()
def bench(
    name: Annotated[Optional[str], typer.Argument(
        help="A deployment: its endpoint, first API key and pinned CA.")] = None,
    url: Annotated[Optional[str], typer.Option(
        "--url", help=f"An OpenAI base URL (…/v1) instead of a deployment; default ${BASE_URL_ENV}. "
                      f"The key is read from ${API_KEY_ENV}, never from a flag.")] = None,
    ca_file: Annotated[Optional[str], typer.Option(
        "--ca-file",
        help=f"The certificate to trust (pin): default the deployment's, or with --url ${CA_FILE_ENV}.")] = None,
    requests: Annotated[Optional[int], typer.Option(
        "--requests", "-n", min=1, help="Requests to send (default 64 when no --duration).")] = None,
    duration: Annotated[Optional[float], typer.Option(
        "--duration", "-d", min=0.001, help="Seconds to keep sending; requests in flight then finish.")] = None,
    concurrency: Annotated[int, typer.Option("--concurrency", "-c", min=1, help="Requests in flight at once.")] = 8,
    input_len: Annotated[int, typer.Option("--input-len", min=1, help="Prompt length, in tokens (about).")] = 128,
    output_len: Annotated[int, typer.Option("--output-len", min=1, help="Output tokens per request (exactly).")] = 64,
    model: Annotated[Optional[str], typer.Option(
        "--model", help="Model to ask for (default: the deployment's, or the first the endpoint lists).")] = None,
    api: Annotated[Literal["chat", "completions"], typer.Option(
        "--api", help="Stream /v1/chat/completions (chat) or /v1/completions.")] = "chat",
    timeout: Annotated[float, typer.Option(
        "--timeout", min=0.001, help="Seconds to wait for a connection and for each read of an answer.")] = 300.0,
    hourly_price: Annotated[Optional[float], typer.Option(
        "--hourly-price", min=0.0, help="The endpoint's price, $/hour, for $ per million tokens (default: the "
                                        "deployment's, from SkyPilot's catalog at launch).")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="One JSON object on stdout, no progress bar.")] = False,
) -> None:
    """Benchmark an endpoint: requests/s, output tokens/s, time to first token, inter-token latency.

    mistral-deploy bench NAME --requests 200 --concurrency 16

    Every request streams exactly --output-len tokens. Exit 1: the benchmark could not start (endpoint
    unreachable, key refused, no such model, too long for the context) or no request succeeded; exit 5:
    no such deployment. Requests that failed are counted in the report.
    """
    from mistral_deploy import bench as loadgen
    from mistral_deploy.errors import MistralDeployError

    out = Output(json_mode=json_out)
    price_source = "--hourly-price"
    if name and url:
        raise typer.BadParameter("name a deployment or give --url, not both", param_hint="NAME / --url")
    if name:
        from mistral_deploy.cli.commands._lifecycle import client_env
        from mistral_deploy.recipe import Recipe
        from mistral_deploy.state import StateStore

        store = StateStore()
        deployment = store.load(name)
        variables = client_env(deployment, store)
        base_url, key, ca = variables["OPENAI_BASE_URL"], variables["OPENAI_API_KEY"], ca_file or deployment.tls_ca
        model = model or Recipe.model_validate(deployment.recipe).served_model_name
        if hourly_price is None:
            recorded = deployment.details.get("hourly_price")
            if isinstance(recorded, (int, float)) and recorded > 0:  # a cloud's (Slurm, local: none)
                hourly_price = float(recorded)
                what = ("replicas.min replicas; replicas autoscaled under load are not counted, nor the SkyServe "
                        "controller's VM, shared by all your services (`mistral-deploy status` shows it)"
                        if deployment.backend == "serve" else "the VM")
                price_source = f"{name}'s price at launch ({what}; SkyPilot's catalog)"
    else:
        base_url = url or os.environ.get(BASE_URL_ENV, "")
        if not base_url:
            raise MistralDeployError(f"name a deployment, or give --url (or set {BASE_URL_ENV})",
                                     hint="mistral-deploy bench NAME, or mistral-deploy bench --url URL")
        key = os.environ.get(API_KEY_ENV, "")
        ca = ca_file or os.environ.get(CA_FILE_ENV) or None
    if ca and not os.path.isfile(ca):
        raise MistralDeployError(f"no such CA file: {ca}")

    spec = loadgen.LoadSpec(base_url=_v1(base_url), model=model, api=api, requests=requests, duration=duration,
                            concurrency=concurrency, input_len=input_len, output_len=output_len, timeout=timeout)
    with _progress(out, spec, show=not json_out and sys.stderr.isatty()) as on_progress:
        report = loadgen.run(spec, api_key=key, ca_file=ca, on_progress=on_progress)
    loadgen.add_costs(report, hourly_price, price_source)

    if json_out:
        out.json(report)
    else:
        _print_report(out, report)
    if report["stopped_early"]:
        out.warn(report["stopped_early"])
    if report["completed"] == 0:
        raise loadgen.BenchError(f"all {report['requests']} requests failed: " + _kinds(report["error_counts"]),
                                 hint=(report["error_samples"] or [None])[0])
    if report["errors"]:
        out.warn(f"{report['errors']} of {report['requests']} requests failed: " + _kinds(report["error_counts"]))


def _v1(url: str) -> str:
    """A bare http(s)://host:port means its /v1; any other path is taken as the base URL."""
    from urllib.parse import urlsplit

    url = url.rstrip("/")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        from mistral_deploy.errors import MistralDeployError

        raise MistralDeployError(f"not an http(s) URL: {url!r}")
    return url if parts.path else url + "/v1"


def _kinds(counts: dict[str, int]) -> str:
    return ", ".join(f"{kind} x{count}" for kind, count in counts.items())


@contextmanager
def _progress(out: Output, spec: Any, show: bool) -> Iterator[Optional[Callable[[int, int, float], None]]]:
    """A rich progress bar on stderr, fed by the load generator a few times a second."""
    if not show:
        yield None
        return
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    by_time = spec.duration is not None and spec.requests is None
    progress = Progress(TextColumn("bench"), BarColumn(), TextColumn("{task.description}"), TimeElapsedColumn(),
                        console=out.err, transient=True)
    task = progress.add_task("", total=spec.duration if by_time else spec.requests)

    def update(finished: int, failed: int, elapsed: float) -> None:
        errors = f", {failed} failed" if failed else ""
        progress.update(task, completed=min(elapsed, spec.duration) if by_time else finished,
                        description=f"{finished} done{errors}")

    with progress:
        yield update


def _ms(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:,.1f}"


def _print_report(out: Output, report: dict[str, Any]) -> None:
    from rich.table import Table

    out.print(f"{report['model']} at {report['url']} ({report['api']}): {report['completed']} of "
              f"{report['requests']} requests in {report['duration_s']:.2f}s, concurrency {report['concurrency']}, "
              f"~{report['input_len']} tokens in, {report['output_len']} out", markup=False)
    totals = Table(box=None, pad_edge=False, show_header=False)
    totals.add_column()
    totals.add_column(justify="right")
    totals.add_row("requests/s", f"{report['requests_per_s']:,.2f}")
    totals.add_row("output tokens/s", f"{report['output_tokens_per_s']:,.1f}")
    if report["mean_input_tokens"] is not None:
        totals.add_row("input tokens (mean, as the endpoint counted)", f"{report['mean_input_tokens']:,.1f}")
    totals.add_row("errors", str(report["errors"]))
    if report["usd_per_mtok_output"] is not None:
        totals.add_row(f"$ per 1M output tokens (${report['hourly_price']:.3f}/hour over them)",
                       f"{report['usd_per_mtok_output']:,.2f}")
    if report["usd_per_mtok_input"] is not None:
        totals.add_row("$ per 1M input tokens (the same hour over them)", f"{report['usd_per_mtok_input']:,.2f}")
    out.print(totals)
    if report["price_source"]:
        out.print(f"price: {report['price_source']}", markup=False)
    latencies = Table(box=None, pad_edge=False)
    for column in ("LATENCY (ms)", "MEAN", "P50", "P95", "P99"):
        latencies.add_column(column, justify="left" if column.startswith("LAT") else "right")
    for label, key in (("time to first token", "ttft_ms"), ("inter-token", "itl_ms"), ("end to end", "e2e_ms")):
        figures = report[key]
        latencies.add_row(label, *(_ms(figures[k]) for k in ("mean", "p50", "p95", "p99")))
    out.print(latencies)
    if report["error_counts"]:
        out.print("errors: " + _kinds(report["error_counts"]))
        for sample in report["error_samples"]:
            out.print(f"  {sample}", markup=False)
