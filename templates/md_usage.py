"""mistral-deploy's token count per API key, inside the vLLM engine: a stat logger plugin (entry point group
`vllm.stat_logger_plugins`), loaded by the API server's process.

vLLM adds to its counters vllm:prompt_tokens_total and vllm:generation_tokens_total, in
IterationStats.update_from_output, a prefilled request's prompt tokens and each step's new tokens. This
module adds the very same numbers, at the very same place, to the key that sent the request, so that the
keys' sums equal vLLM's counters exactly: streamed or not, finished, stopped or cancelled half way.

The key comes from the request id: the gateway sends every request as `X-Request-Id: mdk.KEY_ID.NGINX_ID`
(and vLLM names the request after it); a request that did not come through the gateway counts as "-".
Once a second at most, each key's new tokens are appended to $MD_USAGE_DIR/engine.jsonl as one JSON line,
{"t": unix time, "key": id, "prompt": n, "completion": n}: counts and ids, never a prompt or a key. The
file is rotated at MD_USAGE_MAX_BYTES into engine.jsonl.1 ... .N (MD_USAGE_BACKUPS).

Standard library and vLLM only: it runs in the engine's own Python (the vLLM container's, or the local
engine's venv).
"""

import atexit
import fcntl
import json
import os
import re
import threading
import time

from vllm.v1.metrics import stats as _stats
from vllm.v1.metrics.loggers import StatLoggerBase

KEY_RE = re.compile(r"mdk\.([a-z0-9][a-z0-9-]{0,39})\.")
FLUSH_SECONDS = 1.0

_lock = threading.Lock()
_pending = {}  # key id -> [prompt tokens, generated tokens] not yet written
_key_of_request = {}  # request id -> key id (the regex runs once per request)
_original_update = _stats.IterationStats.update_from_output


def _key(request_id):
    key = _key_of_request.get(request_id)
    if key is None:
        match = KEY_RE.search(request_id or "")
        key = match.group(1) if match else "-"
        if len(_key_of_request) >= 65536:
            _key_of_request.clear()
        _key_of_request[request_id] = key
    return key


def _update_from_output(self, output, engine_core_timestamp, is_prefilling, *args, **kwargs):
    _original_update(self, output, engine_core_timestamp, is_prefilling, *args, **kwargs)
    # exactly what vLLM adds to its own counters for this output (see IterationStats.update_from_output),
    # per request id here (the hot path: one dict update); record() sums them per key
    try:
        generated = self._md_generated
    except AttributeError:
        generated = self._md_generated = {}
        self._md_prompt = {}
    request_id = output.request_id
    generated[request_id] = generated.get(request_id, 0) + len(output.new_token_ids)
    if is_prefilling and output.prefill_stats is not None:
        self._md_prompt[request_id] = self._md_prompt.get(request_id, 0) + output.prefill_stats.num_prompt_tokens


_stats.IterationStats.update_from_output = _update_from_output


def _rotate(path, backups):
    for n in range(backups - 1, 0, -1):
        if os.path.exists("%s.%d" % (path, n)):
            os.replace("%s.%d" % (path, n), "%s.%d" % (path, n + 1))
    os.replace(path, path + ".1")


def flush():
    """Append what is pending, one line per key; rotate the file first when it is full."""
    with _lock:
        if not _pending:
            return
        taken = dict(_pending)
        _pending.clear()
    folder = os.environ.get("MD_USAGE_DIR")
    if not folder:
        return
    now = round(time.time(), 3)
    data = "".join(json.dumps({"t": now, "key": key, "prompt": p, "completion": c}) + "\n"
                   for key, (p, c) in sorted(taken.items())).encode()
    path = os.path.join(folder, "engine.jsonl")
    max_bytes = int(os.environ.get("MD_USAGE_MAX_BYTES", str(20 * 1024 * 1024)))
    backups = int(os.environ.get("MD_USAGE_BACKUPS", "5"))
    # several API server processes may share the folder: one writer at a time, rotation included
    with open(os.path.join(folder, ".engine.lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if os.path.exists(path) and os.path.getsize(path) + len(data) > max_bytes and backups > 0:
                _rotate(path, backups)
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(fd, data)
            finally:
                os.close(fd)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _flusher():
    while True:
        time.sleep(FLUSH_SECONDS)
        try:
            flush()
        except Exception as exc:  # noqa: BLE001 - a full disk must not stop the engine
            print("mistral-deploy usage: cannot write the usage record: %s" % exc, flush=True)


_started = False


class UsagePerKey(StatLoggerBase):
    """Collects each step's per-key counts; a thread writes them out."""

    def __init__(self, vllm_config, engine_index=0):
        global _started
        with _lock:
            if not _started:
                _started = True
                threading.Thread(target=_flusher, name="md-usage", daemon=True).start()
                atexit.register(flush)

    def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None, engine_idx=0):
        generated = getattr(iteration_stats, "_md_generated", None) if iteration_stats is not None else None
        if not generated:
            return
        prompt = iteration_stats._md_prompt
        per_key = {}
        for request_id, tokens in generated.items():
            key = _key(request_id)
            counts = per_key.get(key)
            if counts is None:
                counts = per_key[key] = [0, 0]
            counts[1] += tokens
        for request_id, tokens in prompt.items():
            per_key.setdefault(_key(request_id), [0, 0])[0] += tokens
        with _lock:
            for key, (p, g) in per_key.items():
                counts = _pending.setdefault(key, [0, 0])
                counts[0] += p
                counts[1] += g

    def log_engine_initialized(self):
        pass
