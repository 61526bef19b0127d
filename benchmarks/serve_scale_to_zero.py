"""What do clients see of a service scaled to zero (`replicas: {min: 0, ...}`) until a replica serves?

    sudo flock -o /tmp/md-bed.lock .venv/bin/python benchmarks/serve_scale_to_zero.py [--quiet 45] [--logs DIR]

Needs root and the cloud test bed installed and started (`scripts/testbed.sh install`, `start`). Brings up,
through the real CLI (`mistral-deploy up RECIPE`, in a client home made by `scripts/testbed.sh client-env
DIR nodes`, its own SkyPilot API server port), a service of the built-in tiny model with `replicas: {min: 0,
max: 1, target_qps: 1}` on the bed's nodes (started with `start-nodes 2` if they were not running):
SkyServe's real controller and load balancer in the API server (consolidation mode), the replica the
rendered stack (the real vLLM CPU build and the nginx gateway) on a node of its own. Then, as a user would:
- `mistral-deploy status NAME --json` before any request: phase, warning, SkyServe's replicas. That call's
  health check goes through the load balancer, which counts every request it gets for SkyServe's
  autoscaler; for --quiet seconds no request is sent, and SkyServe's replica list is watched from its
  controller (not through the load balancer) to see whether that check alone woke a replica;
- a client: a short completion started every second (each in a thread of its own, as many users would: a
  503 of the load balancer takes seconds, it retries first), https://localhost:PORT/v1 with TLS pinned to
  the deployment's CA and the deployment's key, until the first 200 (the requests then in flight are
  waited for, --drain seconds at most); meanwhile `status NAME --json` again and again (each call's health
  check is a request to the load balancer too).
Printed: how long `up` took; what `status` said before the first request; whether its check woke a
replica; the time to the first 200 (from the first request the load balancer got, and from the client's
first); what the client got until then (status codes and bodies); what `status` said while the replica
started; when SkyServe's replica was seen launched, starting and READY (`status --json` replicas, seen at
each call: as precise as one call is long); what SkyServe's controller and load balancer logged meanwhile
(requests counted, the autoscaler's target, the replica launched, the load balancer's ready replicas), on
the same clock (--logs DIR keeps those logs). Everything runs on this machine's cores (2 here: SkyPilot's API
server, the controller and load balancer, Slurm, the node's Docker daemon and the CPU engine share them):
the figures are noisy. A GPU VM on a real cloud adds minutes of provisioning, a ~10 GB image and the
weights. Whatever it made is torn down at the end, also on Ctrl-C or failure: `mistral-deploy down`, `sky
api stop`, what is left of its client's processes, the nodes if it started them.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import ssl
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any, Optional

import yaml

from _bed import bed_client, cli, run

NAME = "bench-zero"
PORT = 8080  # a replica on a node of its own: the same port on every node
NODES = 2
REPLICAS = {"min": 0, "max": 1, "target_qps": 1}

# SkyServe's replica list as its controller has it (sky.serve.status through the API server), with no
# request to the load balancer: what `status` shows, less `status`'s own health check
_REPLICAS_SNIPPET = """
import json, sys
from mistral_deploy.skysdk import SkySdk
info = SkySdk().serve_status(sys.argv[1])
print(json.dumps(None if info is None else {"status": info.status,
      "replicas": [[r.replica_id, r.status] for r in info.replicas]}))
"""


def service_recipe(path: Path) -> Path:
    """tests/test_cloud_bed_serve.py's service (the tiny model, cloud slurm, public, port 8080), scaled to zero."""
    import testbed

    data = testbed.tiny_recipe_data("slurm", "public", name=NAME, replicas=dict(REPLICAS),
                                    health={"readiness_timeout": 900})
    data["network"]["port"] = PORT
    path.write_text(yaml.safe_dump(data))
    return path


class Clock:
    """Seconds on one monotonic clock; marks by name."""

    def __init__(self) -> None:
        self.marks: dict[str, float] = {}

    @staticmethod
    def now() -> float:
        return time.monotonic()

    def mark(self, name: str, at: Optional[float] = None) -> float:
        self.marks.setdefault(name, self.now() if at is None else at)
        return self.marks[name]

    def since(self, name: str, at: float) -> Optional[float]:
        return None if name not in self.marks else at - self.marks[name]


def status_json(client: Any) -> tuple[float, float, dict[str, Any]]:
    """`mistral-deploy status NAME --json`: (started, ended, the row)."""
    started = time.monotonic()
    done = cli(client, "status", NAME, "--json", timeout=300)
    ended = time.monotonic()
    if done.returncode != 0:
        raise SystemExit(f"serve_scale_to_zero: status failed (exit {done.returncode}): {done.stderr.strip()[-2000:]}")
    return started, ended, json.loads(done.stdout)


def serve_replicas(client: Any, service: str) -> Optional[dict[str, Any]]:
    """SkyServe's service status and replicas from its controller, not through the load balancer."""
    done = run([sys.executable, "-c", _REPLICAS_SNIPPET, service], client.env, timeout=300)
    if done.returncode != 0:
        print(f"  (SkyServe's replica list not read: {done.stderr.strip()[-300:]})")
        return None
    return json.loads(done.stdout.strip().splitlines()[-1])


def summarize_body(response: Any, key: str) -> str:
    """A response's body in one short line (its error message when it is JSON), never the key."""
    try:
        data = response.json()
        if isinstance(data, dict):
            error = data.get("detail") or data.get("error") or data
            if isinstance(error, dict):
                error = error.get("message") or error
            text = error if isinstance(error, str) else json.dumps(error)
        else:
            text = json.dumps(data)
    except ValueError:
        text = response.text
    text = " ".join(text.split()).replace(key, "<key>")
    return text[:160]


class Client(threading.Thread):
    """A request started every second (each in a thread of its own, as many users would: a refused one takes
    seconds at the load balancer) through the load balancer, until one is answered 200; then the ones in
    flight are waited for, `drain` seconds at most."""

    def __init__(self, endpoint: str, context: ssl.SSLContext, key: str, every: float = 1.0,
                 request_timeout: float = 600, drain: float = 120) -> None:
        super().__init__(daemon=True)
        self.endpoint, self.context, self.key, self.every = endpoint, context, key, every
        self.request_timeout, self.drain = request_timeout, drain
        self.results: list[tuple[float, float, Any, str]] = []  # (sent, answered, status or error, body)
        self.pending: list[float] = []  # sent, not answered when it stopped waiting
        self.first_sent: Optional[float] = None
        self.stop = threading.Event()  # stop sending
        self.answered = threading.Event()  # a 200 came
        self._lock = threading.Lock()

    @property
    def first_ok(self) -> Optional[tuple[float, float, Any, str]]:
        with self._lock:
            oks = [r for r in self.results if r[2] == 200]
        return min(oks, key=lambda r: r[1]) if oks else None

    def _one(self, http: Any) -> None:
        import httpx

        sent = time.monotonic()
        body = {"model": "tiny-mistral", "prompt": "Hello", "max_tokens": 2}
        try:
            response = http.post(self.endpoint + "/completions", json=body,
                                 headers={"Authorization": f"Bearer {self.key}"})
            got: Any = response.status_code
            text = "" if got == 200 else summarize_body(response, self.key)
        except httpx.HTTPError as exc:
            got, text = type(exc).__name__, " ".join(str(exc).split()).replace(self.key, "<key>")[:160]
        with self._lock:
            self.results.append((sent, time.monotonic(), got, text))
        if got == 200:
            self.answered.set()

    def run(self) -> None:
        import httpx

        threads: list[tuple[float, threading.Thread]] = []
        with httpx.Client(verify=self.context, trust_env=False, timeout=self.request_timeout,
                          limits=httpx.Limits(max_connections=1000)) as http:
            next_at = time.monotonic()
            while not self.stop.is_set() and not self.answered.is_set():
                now = time.monotonic()
                if self.first_sent is None:
                    self.first_sent = now
                thread = threading.Thread(target=self._one, args=(http,), daemon=True)
                thread.start()
                threads.append((now, thread))
                next_at += self.every
                self.answered.wait(max(0.0, next_at - time.monotonic()))
            deadline = time.monotonic() + self.drain
            for sent, thread in threads:
                thread.join(timeout=max(0.0, deadline - time.monotonic()))
                if thread.is_alive():
                    self.pending.append(sent)


def seconds(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.0f} s"


def snapshot_key(row: dict[str, Any]) -> tuple[Any, ...]:
    replicas = tuple(f"{r['id']} {r['status']}" for r in row.get("replicas") or [])
    return row.get("phase"), row.get("healthy"), row.get("service_status"), replicas, row.get("warning")


def print_snapshot(label: str, row: dict[str, Any]) -> None:
    replicas = ", ".join(f"{r['id']} {r['status']}" for r in row.get("replicas") or []) or "none"
    print(f"  {label}phase {row.get('phase')}, healthy {row.get('healthy')}, SkyServe {row.get('service_status')}, "
          f"replicas: {replicas}")
    if row.get("warning"):
        print(f"  {' ' * len(label)}warning: {row['warning']}")


def measure(client: Any, quiet: float, timeout: float, drain: float, result: dict[str, Any],
            ctx: dict[str, Any]) -> None:
    clock = ctx["clock"] = Clock()
    ctx["wall_at_zero"] = (time.time(), time.monotonic())
    result.update(cores=os.cpu_count(), replicas=REPLICAS)
    recipe = service_recipe(client.root / "zero.yaml")
    print(f"mistral-deploy up: {NAME}, the tiny model, replicas {REPLICAS}, on the bed's nodes")
    started = clock.now()
    up = cli(client, "up", str(recipe), timeout=1500)
    result["up_seconds"] = clock.now() - started
    if up.returncode != 0:
        raise SystemExit(f"serve_scale_to_zero: up failed (exit {up.returncode}):\n{up.stderr.strip()[-4000:]}")
    record = client.record(NAME)
    key = client.key(NAME)
    lines = up.stderr.strip().splitlines()
    said = [line.strip() for line in lines if " is ready at " in line] or lines
    result["up_said"] = (said[-1] if said else "").replace(key, "<key>")
    print(f"up returned after {result['up_seconds']:.0f} s: {result['up_said']}")
    endpoint = record["endpoint"]
    context = ssl.create_default_context(cafile=record["tls_ca"])

    service = ctx["service"] = record["details"]["service"]
    before = serve_replicas(client, service)
    result["skyserve_before"] = before
    print(f"SkyServe before any request: {before}")
    begun, ended, row = status_json(client)
    clock.mark("status_check", begun)  # its health check reaches the load balancer between begun and ended
    result["status_before"] = {k: row.get(k) for k in ("phase", "healthy", "service_status", "warning", "replicas")}
    result["status_call_seconds"] = ended - begun
    print(f"status --json before the first request ({ended - begun:.1f} s call):")
    print_snapshot("", row)

    # no request for `quiet` seconds: did status's own health check wake a replica?
    woke: Optional[float] = None
    quiet_seen: list[tuple[float, Any]] = []
    deadline = clock.now() + quiet
    while clock.now() < deadline:
        info = serve_replicas(client, service)
        quiet_seen.append((clock.since("status_check", clock.now()), info))
        if info and info["replicas"]:
            woke = clock.since("status_check", clock.now())
            break
        time.sleep(3)
    result["woken_by_status_after"] = woke
    result["quiet_seen"] = quiet_seen
    if woke is not None:
        print(f"with no request but status's health check, SkyServe listed a replica {woke:.0f} s after that status "
              f"call began: {quiet_seen[-1][1]}")
    else:
        print(f"no replica listed within {quiet:.0f} s of that status call, with no other request "
              f"({len(quiet_seen)} looks at SkyServe's controller)")

    knocker = Client(endpoint, context, key, drain=drain)
    snapshots: list[tuple[float, dict[str, Any]]] = []
    replica_seen: dict[str, float] = {}  # SkyServe replica status -> first seen (at a status call's end)

    def look() -> None:
        _begun, ended, row = status_json(client)
        snapshots.append((ended, row))
        for replica in row.get("replicas") or []:
            replica_seen.setdefault(replica["status"], ended)

    loop_deadline = clock.now() + timeout
    knocker.start()
    try:
        while not knocker.answered.is_set() and knocker.is_alive() and clock.now() < loop_deadline:
            look()
            knocker.answered.wait(2)
        look()  # once it answered: what status says then
    finally:
        knocker.stop.set()
        knocker.join(timeout=knocker.drain + 30)
    if knocker.first_sent is None:
        raise SystemExit("serve_scale_to_zero: the client sent no request")
    clock.mark("client_first", knocker.first_sent)
    report(clock, knocker, snapshots, replica_seen, result, timeout)


def report(clock: Clock, knocker: Client, snapshots: list[tuple[float, dict[str, Any]]],
           replica_seen: dict[str, float], result: dict[str, Any], timeout: float) -> None:
    ok = knocker.first_ok
    until = ok[1] if ok else float("inf")
    before_ok = [r for r in knocker.results if r[0] < until and r is not ok]  # sent before the first 200 came
    after = lambda at: clock.since("client_first", at)  # noqa: E731
    outcomes: dict[str, list[tuple[float, float, Any, str]]] = {}
    for r in sorted(before_ok):
        outcomes.setdefault(f"{r[2]} {r[3]}".strip(), []).append(r)
    refused = [r[1] - r[0] for r in before_ok if r[2] == 503]
    result.update(
        client_requests_before_200=len(before_ok) + len(knocker.pending),
        client_histogram={what: len(rs) for what, rs in outcomes.items()},
        client_outcomes={what: {"count": len(rs), "first_sent": after(rs[0][0]),
                                "last_answered": after(max(r[1] for r in rs)),
                                "longest": max(r[1] - r[0] for r in rs)} for what, rs in outcomes.items()},
        client_pending=[after(at) for at in knocker.pending],
        client_503_seconds_median=statistics.median(refused) if refused else None,
        first_200_sent_from_client_first=after(ok[0]) if ok else None,
        first_200_from_status_check=clock.since("status_check", ok[1]) if ok else None,
        first_200_from_client_first=after(ok[1]) if ok else None,
        replica_seen_from_status_check={s: clock.since("status_check", t) for s, t in replica_seen.items()},
        replica_seen_from_client_first={s: after(t) for s, t in replica_seen.items()},
    )
    if ok is None:
        print(f"no 200 within {timeout:.0f} s of the client's first request")
    print(f"\nclient: a completion started every second from "
          f"{seconds(clock.since('status_check', clock.marks['client_first']))} after the status call")
    print(f"  first 200: {seconds(result['first_200_from_client_first'])} after the client's first request "
          f"(that request sent at {seconds(result['first_200_sent_from_client_first'])}), "
          f"{seconds(result['first_200_from_status_check'])} after the status call")
    print(f"  {result['client_requests_before_200']} requests sent before it came; what they got (count, first sent "
          f".. last answered, the longest wait; seconds after the client's first request):")
    for what, rs in sorted(outcomes.items(), key=lambda item: -len(item[1])):
        o = result["client_outcomes"][what]
        print(f"    {len(rs):4d}  {what}  [{o['first_sent']:.0f} .. {o['last_answered']:.0f} s, longest "
              f"{o['longest']:.1f} s]")
    if knocker.pending:
        print(f"    {len(knocker.pending):4d}  no answer yet {knocker.drain:.0f} s after the first 200 (sent at "
              f"{', '.join(seconds(after(at)) for at in knocker.pending)})")
    if refused:
        print(f"  a 503 came {statistics.median(refused):.1f} s after its request in the median (the load balancer "
              f"retries before it answers)")
    print("SkyServe's replica (status --json replicas), first seen, after the status call / the client's first "
          "request:")
    order = ["PENDING", "PROVISIONING", "STARTING", "READY"]
    for state in sorted(replica_seen, key=lambda st: (order.index(st) if st in order else 9, st)):
        print(f"  {state:<13} {seconds(result['replica_seen_from_status_check'][state]):>7} "
              f"/ {seconds(result['replica_seen_from_client_first'][state]):>7}")
    print(f"status --json while the replica started ({len(snapshots)} calls; each change, seconds after the "
          f"client's first request):")
    last = None
    changes = []
    for at, snap in snapshots:
        if snapshot_key(snap) != last:
            last = snapshot_key(snap)
            print_snapshot(f"{seconds(after(at)):>7}: ", snap)
            changes.append({"at_from_client_first": after(at),
                            **{k: snap.get(k) for k in ("phase", "healthy", "service_status", "warning")},
                            "replicas": [f"{r['id']} {r['status']}" for r in snap.get("replicas") or []]})
    result["status_changes"] = changes


# What SkyServe's own logs say (its controller's autoscaler, its load balancer), on the same clock
_LOG_EVENTS = [
    ("controller.log", re.compile(r"Num of requests in the last \d+ seconds: (\d+)"), "requests counted: {}"),
    ("controller.log", re.compile(r"Final target number of replicas: (\d+)"), "autoscaler target: {}"),
    ("controller.log", re.compile(r"Launching replica \(id: (\d+)\)"), "replica {} launching"),
    ("controller.log", re.compile(r"Replica cluster (\S+) launched"), "replica cluster {} launched"),
    ("controller.log", re.compile(r"Replica (\d+) is the first ready replica"), "replica {}: first probe answered"),
    ("load_balancer.log", re.compile(r"Available Replica URLs: (.*)$"), "load balancer's ready replicas: {}"),
    ("load_balancer.log", re.compile(r"(Max retries.*|error.*)$", re.I), "load balancer: {}"),
]
_LOG_TIME = re.compile(r"^[DIWEC] (\d\d-\d\d \d\d:\d\d:\d\d\.\d{3}) ")


def skyserve_timeline(client: Any, service: str, clock: Clock, wall_at_zero: tuple[float, float],
                      logs: Optional[Path]) -> list[tuple[float, str]]:
    """Changes in what SkyServe's controller and load balancer log, seconds after the client's first
    request; the logs copied to `logs` if given."""
    import shutil

    folder = Path(client.env["HOME"]) / ".sky" / "serve" / service
    if logs is not None and folder.is_dir():
        logs.mkdir(parents=True, exist_ok=True)
        for log in folder.glob("*.log"):
            shutil.copy(log, logs / log.name)
        print(f"SkyServe's logs copied to {logs}")
    if "client_first" not in clock.marks:
        return []
    wall, mono = wall_at_zero
    year = time.localtime().tm_year
    events: list[tuple[float, str]] = []
    for name, pattern, text in _LOG_EVENTS:
        path = folder / name
        if not path.is_file():
            continue
        previous = None
        for line in path.read_text(errors="replace").splitlines():
            stamp, found = _LOG_TIME.match(line), pattern.search(line)
            if not (stamp and found):
                continue
            said = text.format(found.group(1))
            if said == previous:
                continue
            previous = said
            at = time.mktime(time.strptime(f"{year}-{stamp.group(1)[:14]}", "%Y-%m-%d %H:%M:%S")) \
                + float(stamp.group(1)[14:]) - wall + mono
            events.append((at - clock.marks["client_first"], said[:160]))
    if events:
        print("SkyServe's own logs (each change; seconds after the client's first request):")
        for at, said in sorted(events):
            print(f"  {at:7.1f}  {said}")
    return sorted(events)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quiet", type=float, default=45,
                        help="seconds with no request after the first status call (0: none)")
    parser.add_argument("--timeout", type=float, default=1200,
                        help="seconds the client waits for its first 200")
    parser.add_argument("--drain", type=float, default=120,
                        help="seconds the requests in flight at the first 200 are waited for")
    parser.add_argument("--logs", type=Path, help="copy SkyServe's controller and load balancer logs here")
    args = parser.parse_args()
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[attr-defined]  (progress while it runs)

    with bed_client("serve_scale_to_zero", NODES, NAME) as client:
        result: dict[str, Any] = {}
        ctx: dict[str, Any] = {}
        try:
            measure(client, args.quiet, args.timeout, args.drain, result, ctx)
        finally:
            if ctx.get("service"):  # also on failure: what SkyServe logged, before `down` removes it
                result["skyserve_log"] = skyserve_timeline(client, ctx["service"], ctx["clock"],
                                                           ctx["wall_at_zero"], args.logs)
        print(f"({os.cpu_count()} cores shared by everything: noisy figures)")
        print(json.dumps(result))


if __name__ == "__main__":
    main()
