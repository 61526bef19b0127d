"""What `top`, `usage` and `metrics` show: samples of an endpoint's records and metrics (usage.py, run where
the endpoint runs), turned into rates, latency percentiles, usage per key and cost.

Where the samples come from: locally, usage.py reads the deployment's files and the engine's socket in this
process. On a VM (and on each replica of a service), usage.py's text goes over SkyPilot's SSH access (as
`tunnel` and `status` use it) into the engine's container, where it reads the same records (mounted at
/md-usage) and the engine's socket: nothing listens anywhere new, and nothing but numbers comes back.
"""

from __future__ import annotations

import json
import re
import subprocess
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Optional

from mistral_deploy import usage
from mistral_deploy.errors import CloudError, MistralDeployError

if TYPE_CHECKING:
    from mistral_deploy.state import Deployment, StateStore

# On the VM (templates/run.sh.j2): the records' folder as the engine's container mounts it.
VM_USAGE_DIR = "/md-usage"
LATENCY_WINDOW_S = 60.0
REFUSALS = ("401/403", "429", "4xx")


# --------------------------------------------------------------------------------------------- sources
class LocalSource:
    """The local backend's records and engine socket, read in this process."""

    label = "local"

    def __init__(self, deployment: "Deployment", store: "StateStore") -> None:
        directory = store.dir(deployment.name)
        self.paths = (str(directory / "gateway" / "access.log"), str(directory / "usage" / "engine.jsonl"),
                      str(deployment.details.get("engine_socket") or ""))

    def sample(self, since: float = 0.0) -> dict[str, Any]:
        return usage.sample(usage.Records(*self.paths[:2], since=since), self.paths[2])

    def follow(self, every: float, stop: threading.Event) -> Iterator[dict[str, Any]]:
        records = usage.Records(*self.paths[:2])
        while not stop.is_set():
            started = time.monotonic()
            yield usage.sample(records, self.paths[2])
            stop.wait(max(0.0, every - (time.monotonic() - started)))

    def metrics_text(self) -> str:
        text = usage.engine_metrics_text(self.paths[2])
        return (text or "# the engine did not answer\n") + usage.key_metrics(usage.Records(*self.paths[:2]).update())


class RemoteSource:
    """A cluster's head (a VM, or a service's replica): usage.py runs in its engine container, over SSH."""

    def __init__(self, cluster: str, label: str, *, replica: bool = False) -> None:
        from mistral_deploy.render import VM_ENGINE_SOCKET

        self.cluster = cluster
        self.label = label
        self.replica = replica
        self.paths = (f"{VM_USAGE_DIR}/access.log", f"{VM_USAGE_DIR}/engine.jsonl", VM_ENGINE_SOCKET)

    def _where(self) -> dict[str, bool]:
        return {"replica": True} if self.replica else {}

    def _script(self, *args: str) -> str:
        quoted = " ".join(args)  # modes, paths and numbers: nothing to quote
        code = Path(usage.__file__).read_text(encoding="utf-8")
        return ("set -e\nDOCKER=docker; docker info >/dev/null 2>&1 || DOCKER='sudo -n docker'\n"
                f"exec $DOCKER exec -i md-engine python3 - {quoted} <<'MD_USAGE_PY'\n{code}\nMD_USAGE_PY\n")

    def _run(self, *args: str) -> str:
        from mistral_deploy.skysdk import get_sdk

        try:
            return get_sdk().run_on_head(self.cluster, self._script(*args), timeout=120, **self._where())
        except CloudError as exc:
            raise CloudError(f"{self.label}: cannot read the endpoint's records: {exc.message}",
                             hint=exc.hint or "is it up? (`mistral-deploy status`)") from None

    def sample(self, since: float = 0.0) -> dict[str, Any]:
        out = self._run("sample", *self.paths, repr(float(since)))
        try:
            return json.loads(out.strip().splitlines()[-1])
        except (ValueError, IndexError):
            raise CloudError(f"{self.label}: the endpoint's sampler said no numbers: {out.strip()[-200:]!r}") from None

    def follow(self, every: float, stop: threading.Event) -> Iterator[dict[str, Any]]:
        from mistral_deploy.skysdk import get_sdk

        proc = get_sdk().stream_on_head(self.cluster, self._script("follow", *self.paths, repr(float(every))),
                                        **self._where())
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                if stop.is_set():
                    return
                try:
                    yield json.loads(line)
                except ValueError:
                    continue
            err = proc.stderr.read() if proc.stderr else ""
            lines = [line for line in err.splitlines() if line.strip()]
            raise CloudError(f"{self.label}: the sampler stopped: {lines[-1] if lines else proc.wait()}")
        finally:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()

    def metrics_text(self) -> str:
        return self._run("metrics", *self.paths)


def sources(deployment: "Deployment", store: "StateStore") -> list[Any]:
    """Where the deployment's samples come from: one source, or one per replica of a service."""
    if deployment.phase not in ("ready", "updating"):
        raise MistralDeployError(f"{deployment.name} is not running (phase {deployment.phase})",
                                 hint=f"`mistral-deploy status {deployment.name}`")
    if deployment.backend == "local":
        if not deployment.details.get("engine_socket"):
            raise MistralDeployError(f"{deployment.name} has no engine socket recorded: is it running?")
        return [LocalSource(deployment, store)]
    if deployment.backend == "cloud":
        cluster = deployment.details.get("cluster")
        if not cluster:
            raise MistralDeployError(f"{deployment.name} has no cluster recorded")
        return [RemoteSource(cluster, cluster)]
    from mistral_deploy.skysdk import get_sdk

    info = get_sdk().serve_status(deployment.details.get("service") or deployment.name)
    replicas = [r for r in (info.replicas if info else ()) if r.cluster and r.status == "READY"]
    if not replicas:
        raise MistralDeployError(f"{deployment.name}: no replica is ready to read",
                                 hint=f"`mistral-deploy status {deployment.name}`")
    return [RemoteSource(r.cluster, f"replica {r.replica_id}", replica=True) for r in replicas]


# ------------------------------------------------------------------------------------------ arithmetic
def merge_keys(samples: list[dict[str, Any]]) -> dict[str, dict[str, int]]:
    total: dict[str, dict[str, int]] = {}
    for sample in samples:
        for key, entry in (sample.get("keys") or {}).items():
            into = total.setdefault(key, dict.fromkeys(entry, 0))
            for name, value in entry.items():
                into[name] = into.get(name, 0) + value
    return total


def quantile(q: float, bounds: list[float], counts: list[float]) -> Optional[float]:
    """Prometheus's histogram_quantile: linear within the bucket that holds the q-th observation."""
    if not counts or counts[-1] <= 0:
        return None
    rank = q * counts[-1]
    lower, below = 0.0, 0.0
    for bound, count in zip(bounds, counts):
        if count >= rank:
            if bound == float("inf"):
                return lower
            inside = count - below
            return lower + (bound - lower) * ((rank - below) / inside if inside else 0.0)
        lower, below = bound, count
    return lower


def _histogram_delta(new: dict[str, Any], old: Optional[dict[str, Any]]) -> tuple[list[float], list[float]]:
    bounds, counts = list(new.get("le") or []), list(new.get("count") or [])
    if old and old.get("le") == bounds and all(a >= b for a, b in zip(counts, old.get("count") or [])):
        counts = [a - b for a, b in zip(counts, old["count"])]
    return bounds, counts


@dataclass
class Series:
    """One source's samples over the last minute: rates between the last two, latency over the window."""

    label: str
    samples: deque = field(default_factory=lambda: deque())

    def add(self, sample: dict[str, Any]) -> None:
        self.samples.append(sample)
        while len(self.samples) > 2 and sample["t"] - self.samples[1]["t"] >= LATENCY_WINDOW_S:
            self.samples.popleft()

    def latency(self, lifetime: bool = False) -> dict[str, tuple[list[float], list[float]]]:
        """TTFT and ITL bucket counts over the window (lifetime: since the engine started)."""
        last = self.samples[-1]["engine"]
        oldest = self.samples[0]["engine"] if len(self.samples) > 1 and not lifetime else None
        return {short: _histogram_delta(last[short], oldest[short] if oldest else None) for short in ("ttft", "itl")}

    def view(self, lifetime: bool = False) -> dict[str, Any]:
        last = self.samples[-1]
        engine = last["engine"]
        row: dict[str, Any] = {"label": self.label, "engine_up": engine["reachable"],
                               "running": engine["running"], "waiting": engine["waiting"],
                               "kv_cache": engine["kv_cache"]}
        previous = self.samples[-2] if len(self.samples) > 1 else None
        if previous is not None:
            dt = max(1e-6, last["t"] - previous["t"])
            now, before = merge_keys([last]), merge_keys([previous])
            row["requests_per_s"] = {o: max(0, sum(e[o] for e in now.values()) - sum(e[o] for e in before.values()))
                                     / dt for o in usage.OUTCOMES}
            pe = previous["engine"]
            row["prompt_tokens_per_s"] = max(0.0, engine["prompt_tokens"] - pe["prompt_tokens"]) / dt
            row["generated_tokens_per_s"] = max(0.0, engine["generation_tokens"] - pe["generation_tokens"]) / dt
        oldest = self.samples[0] if len(self.samples) > 1 and not lifetime else None
        for short, (bounds, counts) in self.latency(lifetime).items():
            row[short] = {"p50": quantile(0.5, bounds, counts), "p95": quantile(0.95, bounds, counts),
                          "count": int(counts[-1]) if counts else 0}
        row["latency_window_s"] = round(last["t"] - oldest["t"], 1) if oldest else None
        return row


def cost_figures(deployment: "Deployment", tokens: int, generated_per_s: Optional[float]) -> dict[str, Any]:
    """Cost so far, $/Mtok over the deployment's life and at the current rate, and what idle costs."""
    price = deployment.details.get("hourly_price")
    if not isinstance(price, (int, float)) or price <= 0:
        return {"hourly_price": None}
    hours = max(0.0, time.time() - deployment.created_at) / 3600
    so_far = price * hours
    figures = {"hourly_price": price, "cost_so_far": round(so_far, 4),
               "usd_per_mtok_so_far": round(so_far / tokens * 1e6, 4) if tokens else None,
               "usd_per_mtok_now": (round(price / (generated_per_s * 3600) * 1e6, 4)
                                    if generated_per_s else None)}
    if generated_per_s is not None and generated_per_s <= 0:
        figures["idle_usd_per_hour"] = price
    return figures


def cost_line(figures: dict[str, Any], backend: str = "local") -> str:
    price = figures.get("hourly_price")
    if not price:
        return ("no hourly price (a local endpoint costs only its machine)" if backend == "local"
                else "no hourly price: SkyPilot's catalog has none for this infrastructure")
    parts = [f"${figures['cost_so_far']:.2f} so far at ${price:.2f}/hour"]
    if figures.get("usd_per_mtok_so_far") is not None:
        parts.append(f"${figures['usd_per_mtok_so_far']:.2f}/Mtok so far")
    if figures.get("usd_per_mtok_now") is not None:
        parts.append(f"${figures['usd_per_mtok_now']:.2f}/Mtok generated at this rate")
    if figures.get("idle_usd_per_hour"):
        parts.append(f"idle: ${figures['idle_usd_per_hour']:.2f}/hour for no tokens")
    return "; ".join(parts)


# --------------------------------------------------------------------------------------------- usage
def usage_report(deployment: "Deployment", samples: list[dict[str, Any]], since: float) -> dict[str, Any]:
    """Per key id over [since, now]: requests, tokens, refusals and their share of the cost."""
    keys = merge_keys(samples)
    total_tokens = sum(e["prompt"] + e["completion"] for e in keys.values())
    price = deployment.details.get("hourly_price")
    start = max(since, deployment.created_at)
    cost = (price * max(0.0, time.time() - start) / 3600
            if isinstance(price, (int, float)) and price > 0 else None)
    rows = []
    for key in sorted(keys, key=lambda k: (k == usage.NO_KEY, k)):
        entry = keys[key]
        tokens = entry["prompt"] + entry["completion"]
        share = tokens / total_tokens if total_tokens else 0.0
        rows.append({"key": key, "requests": sum(entry[o] for o in usage.OUTCOMES),
                     "prompt_tokens": entry["prompt"], "completion_tokens": entry["completion"],
                     "refused": sum(entry[o] for o in REFUSALS), "errors": entry["5xx"],
                     "outcomes": {o: entry[o] for o in usage.OUTCOMES},
                     "cost_share": round(share, 4), "cost": round(cost * share, 4) if cost is not None else None})
    return {"name": deployment.name, "since": since, "until": time.time(), "keys": rows,
            "prompt_tokens": sum(r["prompt_tokens"] for r in rows),
            "completion_tokens": sum(r["completion_tokens"] for r in rows),
            "cost": round(cost, 4) if cost is not None else None, "hourly_price": price,
            "usd_per_mtok": round(cost / total_tokens * 1e6, 4) if cost is not None and total_tokens else None}


_DURATION_RE = re.compile(r"^([0-9]+(?:\.[0-9]+)?)\s*([smhdw])$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_since(text: str) -> float:
    """`24h`, `30m`, `7d` ago, or `all`: the unix time usage counts from."""
    if text.strip().lower() == "all":
        return 0.0
    match = _DURATION_RE.match(text.strip().lower())
    if not match:
        raise MistralDeployError(f"--since: expected a duration such as 30m, 24h or 7d (or all), got {text!r}")
    return time.time() - float(match.group(1)) * _UNIT_S[match.group(2)]


# ------------------------------------------------------------------------------------------- metrics
_SERIES_RE = re.compile(r"^([A-Za-z_:][A-Za-z0-9_:]*)(\{([^}]*)\})?(\s.*)$")


def labelled(text: str, replica: str, seen_meta: set[str]) -> list[str]:
    """A replica's Prometheus text with replica="N" on every series (HELP/TYPE lines once for all)."""
    out = []
    for line in text.splitlines():
        if line.startswith("#"):
            if line not in seen_meta:
                seen_meta.add(line)
                out.append(line)
            continue
        match = _SERIES_RE.match(line)
        if not match:
            continue
        name, _, labels, rest = match.groups()
        inner = f'replica="{replica}"' + (f",{labels}" if labels else "")
        out.append(f"{name}{{{inner}}}{rest}")
    return out
