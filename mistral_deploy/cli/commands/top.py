"""`mistral-deploy top`: a live view of what an endpoint is doing, refreshed until Ctrl-C."""

from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING, Annotated, Any, Optional

import typer

from mistral_deploy.cli import app
from mistral_deploy.cli._output import Output

if TYPE_CHECKING:
    from mistral_deploy.observe import Series
    from mistral_deploy.state import Deployment


@app.command()
def top(
    name: Annotated[str, typer.Argument(help="A deployment.")],
    once: Annotated[bool, typer.Option("--once", help="Take one sample (two readings, --interval apart), "
                                                      "print it and exit.")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="With --once: the sample as JSON on stdout.")] = False,
    interval: Annotated[float, typer.Option("--interval", min=0.2, max=60.0,
                                            help="Seconds between readings.")] = 1.0,
) -> None:
    """Live view: requests/s by outcome, tokens/s, running and waiting requests, KV cache, time to first token
    and between tokens (p50, p95 over the last minute), usage per key, cost. Reads the endpoint's own
    records and engine metrics (over SkyPilot's SSH on a cloud; per replica for a service). Exit 5: no such
    deployment."""
    from mistral_deploy.errors import MistralDeployError
    from mistral_deploy.state import StateStore

    out = Output(json_mode=json_out)
    if json_out and not once:
        raise MistralDeployError("--json: only with --once (one sample as data); the live view is for a terminal")
    store = StateStore()
    deployment = store.load(name)
    from mistral_deploy import observe

    feeds = [_Feed(source, interval) for source in observe.sources(deployment, store)]
    try:
        if once:
            for feed in feeds:
                feed.wait(2, timeout=60 + 3 * interval)
            snapshot = _snapshot(deployment, feeds, lifetime=True)
            if json_out:
                out.json(snapshot)
            else:
                out.print(_screen(snapshot))
            return
        from rich.live import Live

        for feed in feeds:
            feed.wait(1, timeout=60)
        with Live(_screen(_snapshot(deployment, feeds)), console=out.console, auto_refresh=False,
                  screen=False, transient=False) as live:
            while True:
                time.sleep(interval)
                live.update(_screen(_snapshot(deployment, feeds)), refresh=True)
    except KeyboardInterrupt:
        return
    finally:
        for feed in feeds:
            feed.close()


class _Feed:
    """One source's samples, read by a thread into a Series."""

    def __init__(self, source: Any, interval: float) -> None:
        from mistral_deploy.observe import Series

        self.source = source
        self.series: "Series" = Series(source.label)
        self.error: Optional[BaseException] = None
        self._stop = threading.Event()
        self._arrived = threading.Condition()
        self._thread = threading.Thread(target=self._pump, args=(interval,), name=f"top-{source.label}", daemon=True)
        self._thread.start()

    def _pump(self, interval: float) -> None:
        try:
            for sample in self.source.follow(interval, self._stop):
                with self._arrived:
                    self.series.add(sample)
                    self._arrived.notify_all()
        except BaseException as exc:  # noqa: BLE001 - shown by the screen, raised by wait()
            with self._arrived:
                self.error = exc
                self._arrived.notify_all()

    def wait(self, count: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        with self._arrived:
            while len(self.series.samples) < count and self.error is None:
                left = deadline - time.monotonic()
                if left <= 0:
                    from mistral_deploy.errors import MistralDeployError

                    raise MistralDeployError(f"{self.source.label}: no sample within {timeout:.0f}s")
                self._arrived.wait(left)
            if self.error is not None and len(self.series.samples) < count:
                raise self.error

    def close(self) -> None:
        self._stop.set()


def _snapshot(deployment: "Deployment", feeds: list[_Feed], *, lifetime: bool = False) -> dict[str, Any]:
    """What the screen shows. lifetime: latency over the engine's life (one sample has no minute behind it)."""
    from mistral_deploy import observe

    views, lasts, deltas = [], [], []
    for feed in feeds:
        with feed._arrived:  # noqa: SLF001 - the feed's own lock
            if not feed.series.samples:
                views.append({"label": feed.source.label, "error": str(feed.error or "no sample yet")})
                continue
            view = feed.series.view(lifetime)
            lasts.append(feed.series.samples[-1])
            deltas.append(feed.series.latency(lifetime))
        if feed.error is not None:
            view["error"] = str(feed.error)
        views.append(view)
    total = _total([v for v in views if "error" not in v or "running" in v], deltas, lifetime)
    keys = observe.usage_report(deployment, lasts, 0.0)
    tokens = keys["prompt_tokens"] + keys["completion_tokens"]
    cost = observe.cost_figures(deployment, tokens, total.get("generated_tokens_per_s"))
    snapshot = {"name": deployment.name, "backend": deployment.backend, "endpoint": deployment.endpoint,
                "t": time.time(), "total": total, "keys": keys["keys"], "cost": cost}
    if deployment.backend == "serve":
        snapshot["replicas"] = views
    elif views and views[0].get("error"):
        snapshot["source"] = {"label": views[0]["label"], "error": views[0]["error"]}
    return snapshot


def _total(views: list[dict[str, Any]], deltas: list[dict[str, Any]], lifetime: bool) -> dict[str, Any]:
    from mistral_deploy.observe import quantile
    from mistral_deploy.usage import OUTCOMES

    total: dict[str, Any] = {"engines_up": sum(1 for v in views if v.get("engine_up")), "engines": len(views)}
    for name in ("running", "waiting"):
        total[name] = sum(v.get(name) or 0 for v in views)
    total["kv_cache"] = max((v.get("kv_cache") or 0.0 for v in views), default=0.0)  # the fullest replica's
    rated = [v for v in views if "requests_per_s" in v]
    if rated:
        total["requests_per_s"] = {o: sum(v["requests_per_s"][o] for v in rated) for o in OUTCOMES}
        for name in ("prompt_tokens_per_s", "generated_tokens_per_s"):
            total[name] = sum(v[name] for v in rated)
    for short in ("ttft", "itl"):
        bounds: list[float] = []
        counts: list[float] = []
        for delta in deltas:
            b, c = delta[short]
            if not bounds:
                bounds, counts = list(b), list(c)
            elif b == bounds:
                counts = [x + y for x, y in zip(counts, c)]
        total[short] = {"p50": quantile(0.5, bounds, counts), "p95": quantile(0.95, bounds, counts),
                        "count": int(counts[-1]) if counts else 0}
    windows = [v["latency_window_s"] for v in views if v.get("latency_window_s")]
    total["latency_window_s"] = None if lifetime or not windows else max(windows)  # None: the engine's life
    return total


def _ms(value: Optional[float]) -> str:
    return "-" if value is None else f"{value * 1000:.0f} ms" if value >= 0.001 else f"{value * 1000:.2f} ms"


def _screen(snapshot: dict[str, Any]) -> Any:
    """The view, within 80 columns."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    from mistral_deploy.observe import cost_line

    total = snapshot["total"]
    head = Text(f"{snapshot['name']}  {snapshot['backend']}  {snapshot.get('endpoint') or '-'}  "
                f"engine{'s' if total['engines'] > 1 else ''} up {total['engines_up']}/{total['engines']}  "
                f"{time.strftime('%H:%M:%S', time.localtime(snapshot['t']))}", style="bold")
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="dim", no_wrap=True)
    grid.add_column()
    rps = total.get("requests_per_s")
    grid.add_row("requests/s", "  ".join(f"{o} {rps[o]:.1f}" for o in rps) if rps else "(measuring)")
    if "generated_tokens_per_s" in total:
        grid.add_row("tokens/s", f"prompt {total['prompt_tokens_per_s']:.1f}  generated "
                                 f"{total['generated_tokens_per_s']:.1f}")
    grid.add_row("engine", f"running {total['running']:.0f}  waiting {total['waiting']:.0f}  "
                           f"KV cache {total['kv_cache'] * 100:.1f}%")
    window = total.get("latency_window_s")
    label = f"latency {window:.0f}s" if window else "latency (life)"
    ttft, itl = total["ttft"], total["itl"]
    grid.add_row(label, f"TTFT p50 {_ms(ttft['p50'])}  p95 {_ms(ttft['p95'])}   "
                        f"ITL p50 {_ms(itl['p50'])}  p95 {_ms(itl['p95'])}")
    grid.add_row("cost", cost_line(snapshot["cost"], snapshot["backend"]))
    parts: list[Any] = [head, grid]
    for view in snapshot.get("replicas") or [snapshot.get("source") or {}]:
        if view.get("error"):
            parts.append(Text(f"{view.get('label', '')}: {view['error']}"[:240], style="red"))
    if snapshot.get("replicas"):
        replicas = Table(box=None, pad_edge=False, header_style="dim")
        for column in ("REPLICA", "REQ/S", "GEN TOK/S", "RUN", "WAIT", "KV", "TTFT P95"):
            replicas.add_column(column, justify="left" if column == "REPLICA" else "right")
        for view in snapshot["replicas"]:
            if "running" not in view:
                replicas.add_row(view["label"], view.get("error", "-")[:60], "", "", "", "", "")
                continue
            rate = sum(view["requests_per_s"].values()) if "requests_per_s" in view else None
            replicas.add_row(view["label"], "-" if rate is None else f"{rate:.1f}",
                             f"{view.get('generated_tokens_per_s', 0.0):.1f}", f"{view['running']:.0f}",
                             f"{view['waiting']:.0f}", f"{view['kv_cache'] * 100:.0f}%", _ms(view["ttft"]["p95"]))
        parts += [Text(""), replicas]
    keys = Table(box=None, pad_edge=False, header_style="dim")
    for column in ("KEY", "REQUESTS", "PROMPT TOK", "GEN TOK", "REFUSED", "5XX", "COST"):
        keys.add_column(column, justify="left" if column == "KEY" else "right")
    for row in snapshot["keys"]:
        keys.add_row(row["key"] if row["key"] != "-" else "(no key)", f"{row['requests']:,}",
                     f"{row['prompt_tokens']:,}", f"{row['completion_tokens']:,}", f"{row['refused']:,}",
                     f"{row['errors']:,}", "-" if row["cost"] is None else f"${row['cost']:.2f}")
    parts += [Text(""), keys if snapshot["keys"] else Text("no requests recorded yet", style="dim")]
    return Group(*parts)
