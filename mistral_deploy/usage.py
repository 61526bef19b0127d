"""What an endpoint did, read where it runs: its records and the engine's own metrics, as numbers.

Three sources, all on the endpoint's machine, none open to key holders:
- the gateway's access log (`... "POST /v1/chat/completions" 200 key=KEY_ID ...`, never a key or a prompt):
  requests per key id and outcome; "-" for a request without a valid key;
- the engine's usage record (templates/md_usage.py, a vLLM plugin): tokens per key id, counted where vLLM
  counts its own, so that the keys add up to vLLM's counters exactly;
- the engine's /metrics, over its Unix socket: what runs and waits, the KV cache, latency histograms.
Both records are rotated (FILE, FILE.1 ... FILE.N) and read across rotations by inode, so a follower
neither misses nor counts twice the lines of a file renamed under it.

Standard library only, Python 3.8+: `top`, `usage` and `metrics` import it locally, and send this file's
text to a cloud endpoint, where it runs in the engine's container (`python3 - ARGS`, see observe.py).
"""

import datetime
import glob
import json
import os
import re
import socket
import sys
import time

# the access log's line (templates/nginx.conf.j2, log_format mistral_deploy)
ACCESS_RE = re.compile(r'^\S+ \[([^\]]+)\] "[^"]*" ([0-9]{3}) key=(\S+) ')
OUTCOMES = ("2xx", "401/403", "429", "4xx", "5xx")
NO_KEY = "-"
PROM_RE = re.compile(r'^([A-Za-z_:][A-Za-z0-9_:]*)(\{[^}]*\})?\s+(\S+)')
LE_RE = re.compile(r'le="([^"]+)"')
COUNTERS = {"vllm:prompt_tokens_total": "prompt_tokens", "vllm:generation_tokens_total": "generation_tokens",
            "vllm:request_success_total": "requests_finished"}
GAUGES = {"vllm:num_requests_running": "running", "vllm:num_requests_waiting": "waiting",
          "vllm:kv_cache_usage_perc": "kv_cache"}
HISTOGRAMS = {"vllm:time_to_first_token_seconds": "ttft", "vllm:inter_token_latency_seconds": "itl"}


def outcome(status):
    code = int(status)
    if code < 400:
        return "2xx"
    if code in (401, 403):
        return "401/403"
    if code == 429:
        return "429"
    return "4xx" if code < 500 else "5xx"


def rotated(path):
    """FILE's rotations, oldest first, then FILE itself: the order their lines were written in."""
    older = [p for p in glob.glob(path + ".*") if p.rsplit(".", 1)[1].isdigit()]
    older.sort(key=lambda p: -int(p.rsplit(".", 1)[1]))
    return older + ([path] if os.path.exists(path) else [])


class Follower:
    """New whole lines of a rotated file, each line once: files are known by inode, so FILE renamed to
    FILE.1 is read on from where it was."""

    def __init__(self, path):
        self.path = path
        self.offsets = {}  # inode -> bytes read

    def lines(self):
        seen = {}
        for name in rotated(self.path):
            try:
                with open(name, "rb") as fh:
                    inode = os.fstat(fh.fileno()).st_ino
                    start = self.offsets.get(inode, 0)
                    fh.seek(start)
                    data = fh.read()
            except OSError:
                continue  # rotated away between the listing and the open: read under its new name next time
            end = data.rfind(b"\n") + 1  # a line being written is read once it is whole
            seen[inode] = start + end
            for line in data[:end].decode("utf-8", "replace").splitlines():
                yield line
        self.offsets = seen


_EPOCHS = {}


def epoch(iso):
    value = _EPOCHS.get(iso)
    if value is None:
        try:
            value = datetime.datetime.fromisoformat(iso).timestamp()
        except ValueError:
            value = 0.0
        if len(_EPOCHS) > 4096:
            _EPOCHS.clear()
        _EPOCHS[iso] = value
    return value


def _blank():
    entry = dict.fromkeys(OUTCOMES, 0)
    entry.update(prompt=0, completion=0)
    return entry


class Records:
    """Per key id: requests by outcome (the gateway's log) and tokens (the engine's record), since `since`."""

    def __init__(self, access_log, engine_usage, since=0.0):
        self.access = Follower(access_log)
        self.engine = Follower(engine_usage)
        self.since = since
        self.keys = {}
        self.first = None  # the earliest record counted (unix time)

    def _entry(self, key, when):
        if self.first is None or when < self.first:
            self.first = when
        entry = self.keys.get(key)
        if entry is None:
            entry = self.keys[key] = _blank()
        return entry

    def update(self):
        for line in self.access.lines():
            match = ACCESS_RE.match(line)
            if not match:
                continue
            when = epoch(match.group(1))
            if when >= self.since:
                self._entry(match.group(3), when)[outcome(match.group(2))] += 1
        for line in self.engine.lines():
            try:
                record = json.loads(line)
                when = float(record["t"])
                prompt, completion = int(record["prompt"]), int(record["completion"])
                key = str(record["key"])
            except (ValueError, KeyError, TypeError):
                continue
            if when >= self.since:
                entry = self._entry(key, when)
                entry["prompt"] += prompt
                entry["completion"] += completion
        return self.keys


def engine_metrics_text(engine_socket, timeout=3.0):
    """The engine's /metrics (Prometheus text), asked over its Unix socket; None if it does not answer."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(engine_socket)
        sock.sendall(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")
        chunks = []
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            chunks.append(chunk)
    except OSError:
        return None
    finally:
        sock.close()
    head, _, body = b"".join(chunks).partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.") or head.split(b" ", 2)[1:2] != [b"200"]:
        return None
    return body.decode("utf-8", "replace")


def engine_numbers(text):
    """The figures `top` shows from the engine's metrics, summed over their label sets."""
    numbers = {"reachable": text is not None}
    for name in list(COUNTERS.values()) + list(GAUGES.values()):
        numbers[name] = 0.0
    buckets = {short: {} for short in HISTOGRAMS.values()}
    for line in (text or "").splitlines():
        if not line or line[0] == "#":
            continue
        match = PROM_RE.match(line)
        if not match:
            continue
        name, labels, raw = match.groups()
        try:
            value = float(raw)
        except ValueError:
            continue
        if name in COUNTERS:
            numbers[COUNTERS[name]] += value
        elif name in GAUGES:
            numbers[GAUGES[name]] += value
        elif name.endswith("_bucket") and name[:-7] in HISTOGRAMS:
            le = LE_RE.search(labels or "")
            if le:
                series = buckets[HISTOGRAMS[name[:-7]]]
                series[le.group(1)] = series.get(le.group(1), 0.0) + value
    for short, series in buckets.items():
        bounds = sorted(series, key=lambda b: float(b))
        numbers[short] = {"le": [float(b) for b in bounds], "count": [series[b] for b in bounds]}
    return numbers


def key_metrics(keys):
    """The gateway's counters per key id, in Prometheus text."""
    out = ["# HELP mistral_deploy_requests_total Requests the gateway answered, per API key id and outcome "
           "(key \"-\": no valid key).",
           "# TYPE mistral_deploy_requests_total counter"]
    for key in sorted(keys):
        for what in OUTCOMES:
            out.append('mistral_deploy_requests_total{key="%s",outcome="%s"} %d' % (key, what, keys[key][what]))
    for field, help_text in (("prompt", "Prompt tokens the engine prefilled"),
                             ("completion", "Tokens the engine generated")):
        name = "mistral_deploy_%s_tokens_total" % field
        out += ["# HELP %s %s, per API key id (they add up to vLLM's counters)." % (name, help_text),
                "# TYPE %s counter" % name]
        for key in sorted(keys):
            out.append('%s{key="%s"} %d' % (name, key, keys[key][field]))
    return "\n".join(out) + "\n"


def sample(records, engine_socket, with_text=False):
    text = engine_metrics_text(engine_socket)
    keys = {key: dict(entry) for key, entry in records.update().items()}  # a copy: the records count on
    result = {"t": time.time(), "engine": engine_numbers(text), "keys": keys, "first": records.first}
    if with_text:
        result["metrics_text"] = text
    return result


def main(argv):
    """sample ACCESS_LOG ENGINE_USAGE ENGINE_SOCKET [SINCE]: one JSON sample;
    follow ... EVERY: a JSON line every EVERY seconds until the reader goes away;
    metrics ...: Prometheus text, the engine's metrics then the gateway's per key."""
    mode, access_log, engine_usage, engine_socket = argv[:4]
    records = Records(access_log, engine_usage, float(argv[4]) if mode == "sample" and len(argv) > 4 else 0.0)
    if mode == "metrics":
        text = engine_metrics_text(engine_socket)
        sys.stdout.write((text or "# the engine did not answer\n") + key_metrics(records.update()))
        return 0
    if mode == "sample":
        sys.stdout.write(json.dumps(sample(records, engine_socket)) + "\n")
        return 0
    every = float(argv[4]) if len(argv) > 4 else 1.0
    try:
        while True:
            started = time.monotonic()
            sys.stdout.write(json.dumps(sample(records, engine_socket)) + "\n")
            sys.stdout.flush()
            time.sleep(max(0.0, every - (time.monotonic() - started)))
    except (BrokenPipeError, KeyboardInterrupt):
        return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
