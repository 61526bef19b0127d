"""`up` converges, keys rotate live: on the real local stack (vLLM CPU engine, tiny model, nginx gateway),
through the CLI as a user runs it, with the official `openai` client streaming through every change.
"""

from __future__ import annotations

import json
import os
import re
import select
import shutil
import signal
import subprocess
import ssl
import threading
import time
from pathlib import Path
from typing import Any, Iterator, Optional

import httpx
import pytest
import yaml

from local_support import CLI, Deployed, assert_gone, cli, cli_env, down_and_assert_gone, free_port, read_deployed
from mistral_deploy.skysdk import port_open
from mistral_deploy.recipe import builtin_recipes_dir

pytestmark = pytest.mark.engine
NAME = "conv"
# Streams long enough to be in flight while a change is applied: 4 completions of 480 tokens each (the
# tiny model's context is 512), 8 requests at once (about 3 s on 2 cores).
STREAM = {"max_tokens": 480, "n": 4, "extra_body": {"ignore_eos": True}, "stream": True,
          "stream_options": {"include_usage": True}}


def _recipe(home: Path, port: int, **changes: Any) -> Path:
    data = yaml.safe_load((builtin_recipes_dir() / "tiny-mistral.yaml").read_text())
    data["name"] = NAME
    data["resources"] = {"cloud": "local"}
    data["network"] = {"mode": "private", "tls": True, "port": port}
    data["model"]["max_model_len"] = 512
    for section, values in changes.items():
        data.setdefault(section, {}).update(values)
    path = home / f"recipe-{len(list(home.glob('recipe-*')))}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture(scope="module")
def converging(tmp_path_factory: pytest.TempPathFactory, models_dir: Path) -> Iterator[dict[str, Any]]:
    home = tmp_path_factory.mktemp("converge")
    env = cli_env(home, models_dir)
    port = free_port()
    recipe = _recipe(home, port)
    created = cli("up", str(recipe), "--json", env=env)
    assert created.returncode == 0, created.stderr[-3000:]
    state = {"home": home, "env": env, "port": port, "recipe": recipe}
    try:
        yield state
    finally:
        deployed = _deployed(state)
        down_and_assert_gone(deployed)


def _deployed(state: dict[str, Any]) -> Deployed:
    return read_deployed(NAME, state["home"], state["env"])


def _keys(deployed: Deployed) -> dict[str, str]:
    return dict(line.split() for line in (deployed.dir / "api_keys").read_text().splitlines())


def _client(deployed: Deployed, key: str) -> Any:
    from openai import OpenAI

    return OpenAI(base_url=deployed.endpoint, api_key=key, max_retries=0,
                  http_client=httpx.Client(verify=_tls(deployed), trust_env=False, timeout=120))


def _long_completion(deployed: Deployed) -> httpx.Response:
    return httpx.post(f"{deployed.endpoint}/completions", verify=_tls(deployed), trust_env=False, timeout=60,
                      headers={"Authorization": f"Bearer {deployed.key}"},
                      json={"model": "tiny-mistral", "prompt": "a", "max_tokens": 450, "ignore_eos": True})


def _tls(deployed: Deployed) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=deployed.ca)


class _Streams:
    """Streaming completions in threads: each one's finish reasons, tokens, and when it ended."""

    def __init__(self, deployed: Deployed, key: str, count: int) -> None:
        self.started = threading.Barrier(count + 1, timeout=120)
        self.results: list[dict[str, Any]] = []
        self.errors: list[BaseException] = []
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._one, args=(deployed, key)) for _ in range(count)]
        for thread in self._threads:
            thread.start()
        self.started.wait()  # every stream has its first chunk

    def _one(self, deployed: Deployed, key: str) -> None:
        first = True
        finish: dict[int, Optional[str]] = {}
        usage = None
        try:
            for chunk in _client(deployed, key).completions.create(model="tiny-mistral", prompt="a", **STREAM):
                if first:
                    first = False
                    self.started.wait()
                for choice in chunk.choices:
                    if choice.finish_reason:
                        finish[choice.index] = choice.finish_reason
                if chunk.usage is not None:
                    usage = chunk.usage.completion_tokens
            with self._lock:
                self.results.append({"finish": finish, "tokens": usage, "ended": time.monotonic()})
        except BaseException as exc:  # noqa: BLE001 - reported by join()
            with self._lock:
                self.errors.append(exc)
            if first:
                self.started.abort()

    def join(self) -> list[dict[str, Any]]:
        for thread in self._threads:
            thread.join(timeout=300)
        assert self.errors == []
        return self.results


class _FirstRefusal:
    """When the gateway first answered 401 to `key`: a thread asks every 20 ms. The revoke was applied before
    that answer came, so a stream still running then was in flight when the key was revoked."""

    def __init__(self, deployed: Deployed, key: str) -> None:
        self._at: Optional[float] = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, args=(deployed, key))
        self._thread.start()

    def _poll(self, deployed: Deployed, key: str) -> None:
        with httpx.Client(verify=_tls(deployed), trust_env=False, timeout=30) as client:
            while not self._stop.wait(0.02):
                answer = client.get(f"{deployed.endpoint}/models", headers={"Authorization": f"Bearer {key}"})
                if answer.status_code == 401:
                    self._at = time.monotonic()
                    return
                assert answer.status_code == 200, answer.text

    def at(self) -> float:
        self._thread.join(timeout=30)
        self._stop.set()
        assert self._at is not None, "the gateway never refused the revoked key"
        return self._at


def _assert_whole(results: list[dict[str, Any]], count: int, after: float) -> None:
    """Every stream got its 4 x 480 tokens to the end, and was still in flight at `after`."""
    assert len(results) == count
    for result in results:
        assert result["finish"] == {0: "length", 1: "length", 2: "length", 3: "length"}
        assert result["tokens"] == 4 * 480
        assert result["ended"] > after, "a stream ended before the change was applied: it proves nothing"


def test_the_same_recipe_again_changes_nothing_and_dry_run_only_shows(converging):
    before = _deployed(converging)
    record = (before.dir / "deployment.json").read_bytes()
    again = cli("up", str(converging["recipe"]), "--json", env=converging["env"])
    assert again.returncode == 0, again.stderr[-2000:]
    summary = json.loads(again.stdout)
    assert summary["unchanged"] is True and summary["plan"]["changes"] == [] and summary["endpoint"] == before.endpoint
    assert _deployed(converging).pids == before.pids

    changed = _recipe(converging["home"], converging["port"], limits={"requests_per_minute": 600},
                      model={"max_model_len": 384})
    text = cli("up", str(changed), "--dry-run", env=converging["env"])
    assert text.returncode == 0, text.stderr
    assert re.search(r"^  limits\.requests_per_minute +1200 -> 600 +\[gateway-reload\]$", text.stdout, re.M)
    assert re.search(r"^  model\.max_model_len +512 -> 384 +\[engine-restart\]$", text.stdout, re.M)
    assert "apply: engine restart" in text.stdout
    plan = json.loads(cli("up", str(changed), "--dry-run", "--json", env=converging["env"]).stdout)
    assert plan["dry_run"] is True and plan["effect"] == "engine-restart"
    assert {(c["field"], c["from"], c["to"], c["effect"]) for c in plan["changes"]} == {
        ("limits.requests_per_minute", 1200, 600, "gateway-reload"), ("model.max_model_len", 512, 384, "engine-restart")}
    # nothing moved: same record, same processes, the gateway's configuration as it was
    assert (before.dir / "deployment.json").read_bytes() == record
    assert _deployed(converging).pids == before.pids
    assert "rate=1200r/m" in (before.dir / "gateway" / "nginx.conf").read_text()


def _engine_counts(deployed: Deployed) -> tuple[float, float]:
    """vLLM's own counters, read from the engine's socket: prompt and generated tokens since it started."""
    with httpx.Client(transport=httpx.HTTPTransport(uds=deployed.engine_socket), trust_env=False) as engine:
        text = engine.get("http://engine/metrics").text
    totals = {"vllm:prompt_tokens_total": 0.0, "vllm:generation_tokens_total": 0.0}
    for line in text.splitlines():
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if name in totals:
            totals[name] += float(line.rsplit(" ", 1)[1])
    return totals["vllm:prompt_tokens_total"], totals["vllm:generation_tokens_total"]


def _usage(state: dict[str, Any], since: str = "all") -> dict[str, dict[str, Any]]:
    done = cli("usage", NAME, "--since", since, "--json", env=state["env"])
    assert done.returncode == 0, done.stderr
    return {row["key"]: row for row in json.loads(done.stdout)["keys"]}


def _tokens(rows: dict[str, dict[str, Any]]) -> tuple[int, int]:
    return (sum(r["prompt_tokens"] for r in rows.values()), sum(r["completion_tokens"] for r in rows.values()))


def _settled(state: dict[str, Any], deployed: Deployed, usage_before: dict[str, Any],
             engine_before: tuple[float, float], requests: int) -> tuple[dict[str, Any], tuple[int, int]]:
    """Usage once the records caught up (the engine's and the access log are written once a second) with the
    engine's counters and with `requests` more logged requests; and the engine's increase."""
    deadline = time.monotonic() + 15
    logged_before = sum(r["requests"] for r in usage_before.values())
    while True:
        rows, engine_now = _usage(state), _engine_counts(deployed)
        grew = tuple(int(a - b) for a, b in zip(engine_now, engine_before))
        counted = tuple(a - b for a, b in zip(_tokens(rows), _tokens(usage_before)))
        logged = sum(r["requests"] for r in rows.values()) - logged_before
        if (counted == grew and logged >= requests) or time.monotonic() > deadline:
            return rows, grew
        time.sleep(0.5)


def _delta(after: dict[str, Any], before: dict[str, Any], key: str, field: str) -> Any:
    if field == "outcomes":
        old = before.get(key, {}).get("outcomes", {})
        return {o: n - old.get(o, 0) for o, n in after[key]["outcomes"].items()}
    return after[key][field] - before.get(key, {}).get(field, 0)


def test_usage_per_key_counts_exactly_what_the_engine_counted(converging):
    deployed = _deployed(converging)
    time.sleep(2.5)  # the readiness probe's token is in the records (written once a second)
    engine_before, usage_before = _engine_counts(deployed), _usage(converging)
    client = _client(deployed, deployed.key)
    chat = client.chat.completions.create(model="tiny-mistral", messages=[{"role": "user", "content": "hello"}],
                                          max_tokens=12)
    assert chat.usage.completion_tokens == 12
    counted = list(client.completions.create(model="tiny-mistral", prompt="a b c", max_tokens=30, stream=True,
                                             stream_options={"include_usage": True}, extra_body={"ignore_eos": True}))
    assert counted[-1].usage.completion_tokens == 30
    # a stream that did not ask for usage gets none: counting takes nothing from what the client receives
    plain = list(client.completions.create(model="tiny-mistral", prompt="a", max_tokens=20, stream=True,
                                           extra_body={"ignore_eos": True}))
    assert all(chunk.usage is None for chunk in plain) and plain[-1].choices[0].finish_reason == "length"
    # cancelled half way: two completions of up to 400 tokens, the connection closed after 20 chunks
    with httpx.stream("POST", f"{deployed.endpoint}/completions", verify=_tls(deployed), trust_env=False, timeout=60,
                      headers={"Authorization": f"Bearer {deployed.key}"},
                      json={"model": "tiny-mistral", "prompt": "a", "max_tokens": 400, "n": 2, "stream": True,
                            "ignore_eos": True}) as cancelled:
        for number, _line in enumerate(cancelled.iter_lines()):
            if number >= 20:
                break
    root = deployed.endpoint.rsplit("/v1", 1)[0]
    assert httpx.get(f"{deployed.endpoint}/models", headers={"Authorization": "Bearer md-" + "x" * 43},
                     verify=_tls(deployed), trust_env=False).status_code == 401
    assert httpx.get(f"{root}/metrics", headers={"Authorization": f"Bearer {deployed.key}"},
                     verify=_tls(deployed), trust_env=False).status_code == 404  # key holders: no metrics

    rows, (prompt, generated) = _settled(converging, deployed, usage_before, engine_before, requests=6)
    assert 12 + 30 + 20 < generated < 12 + 30 + 20 + 2 * 400  # the cancelled one got some tokens, then stopped
    # every token the engine counted, counted for the key that asked for it
    assert (_delta(rows, usage_before, "key-1", "prompt_tokens"), _delta(rows, usage_before, "key-1",
                                                                        "completion_tokens")) == (prompt, generated)
    assert _delta(rows, usage_before, "key-1", "outcomes") == {"2xx": 4, "401/403": 0, "429": 0, "4xx": 1, "5xx": 0}
    assert _delta(rows, usage_before, "-", "outcomes")["401/403"] == 1
    assert all(deployed.key not in json.dumps(r) for r in rows.values())

    text = cli("metrics", NAME, env=converging["env"]).stdout
    series = dict(line.rsplit(" ", 1) for line in text.splitlines() if line and not line.startswith("#"))
    assert float(series['mistral_deploy_completion_tokens_total{key="key-1"}']) == rows["key-1"]["completion_tokens"]
    assert float(series['mistral_deploy_requests_total{key="-",outcome="401/403"}']) >= 1
    assert any(name.startswith("vllm:generation_tokens_total{") for name in series)

    # for Prometheus: the same text on 127.0.0.1 of this machine, read anew at each scrape, until stopped
    port = free_port()
    exporter = subprocess.Popen([CLI, "metrics", NAME, "--serve", str(port)], env=converging["env"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while not port_open("127.0.0.1", port) and exporter.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        scraped = httpx.get(f"http://127.0.0.1:{port}/metrics", trust_env=False, timeout=30)
        assert scraped.status_code == 200 and scraped.headers["content-type"].startswith("text/plain")
        assert 'mistral_deploy_completion_tokens_total{key="key-1"}' in scraped.text
        assert httpx.get(f"http://127.0.0.1:{port}/", trust_env=False).status_code == 404
    finally:
        exporter.send_signal(signal.SIGINT)
        assert exporter.wait(timeout=30) == 0
    assert_gone([exporter.pid], [port])

    top = cli("top", NAME, "--once", "--json", "--interval", "0.5", env=converging["env"])
    assert top.returncode == 0, top.stderr
    snapshot = json.loads(top.stdout)
    assert snapshot["total"]["engines_up"] == 1 and set(snapshot["total"]["requests_per_s"]) >= {"2xx", "429"}
    assert snapshot["total"]["ttft"]["count"] > 0 and snapshot["total"]["ttft"]["p95"] > 0
    assert {r["key"]: r["completion_tokens"] for r in snapshot["keys"]}["key-1"] == rows["key-1"]["completion_tokens"]
    screen = cli("top", NAME, "--once", "--interval", "0.5", env={**converging["env"], "COLUMNS": "80"}).stdout
    assert "TTFT p50" in screen and "key-1" in screen and max(len(line) for line in screen.splitlines()) <= 80
    converging["usage"] = rows


def test_top_refreshes_live_in_a_terminal_until_ctrl_c(converging):
    import pty

    main, terminal = pty.openpty()
    env = {**converging["env"], "COLUMNS": "80", "LINES": "30", "TERM": "xterm"}
    env.pop("NO_COLOR", None)
    live = subprocess.Popen([CLI, "top", NAME, "--interval", "0.5"], env=env, stdin=terminal, stdout=terminal,
                            stderr=terminal, close_fds=True)
    os.close(terminal)
    screen = b""
    try:
        deadline = time.monotonic() + 30
        # refreshed: the clock on its first line changes (a frame every half second)
        while time.monotonic() < deadline and len(set(re.findall(rb"engine up 1/1  (\d\d:\d\d:\d\d)", screen))) < 3:
            ready, _, _ = select.select([main], [], [], 1.0)
            if ready:
                try:
                    screen += os.read(main, 65536)
                except OSError:
                    break
        assert len(set(re.findall(rb"engine up 1/1  (\d\d:\d\d:\d\d)", screen))) >= 3, screen[-2000:]
        assert b"requests/s" in screen and b"TTFT p50" in screen and b"key-1" in screen
    finally:
        live.send_signal(signal.SIGINT)
        code = live.wait(timeout=30)
        os.close(main)
    assert code == 0
    assert_gone([live.pid], [])


def test_a_gateway_change_is_a_reload_that_finishes_every_stream_in_flight(converging):
    before = _deployed(converging)
    streams = _Streams(before, before.key, 8)
    changed = _recipe(converging["home"], converging["port"], limits={"requests_per_minute": 600})
    applied = cli("up", str(changed), "--json", env=converging["env"])
    applied_at = time.monotonic()
    assert applied.returncode == 0, applied.stderr[-2000:]
    assert json.loads(applied.stdout)["plan"]["effect"] == "gateway-reload"
    _assert_whole(streams.join(), 8, applied_at)
    after = _deployed(converging)
    assert after.pids == before.pids  # neither the engine nor nginx's master restarted
    assert "rate=600r/m" in (after.dir / "gateway" / "nginx.conf").read_text()
    assert after.record["recipe"]["limits"]["requests_per_minute"] == 600
    converging["recipe"] = changed


def test_a_revoked_key_is_refused_at_once_while_its_stream_finishes(converging):
    deployed = _deployed(converging)
    env = converging["env"]
    added = cli("keys", "add", NAME, "--id", "ci-job", "--json", env=env)
    assert added.returncode == 0, added.stderr
    new = json.loads(added.stdout)
    assert new["id"] == "ci-job" and new["key"].startswith("md-") and new["key"] not in added.stderr
    assert _client(deployed, new["key"]).models.list().data[0].id == "tiny-mistral"
    listed = json.loads(cli("keys", "list", NAME, "--json", env=env).stdout)
    assert [k["id"] for k in listed["keys"]] == ["key-1", "ci-job"]
    assert new["key"] not in json.dumps(listed)
    exported = cli("env", NAME, "--key", "ci-job", env=env).stdout
    assert f"export OPENAI_API_KEY={new['key']}" in exported

    streams = _Streams(deployed, new["key"], 8)
    refusal = _FirstRefusal(deployed, new["key"])
    revoked = cli("keys", "revoke", NAME, "ci-job", env=env)
    returned_at = time.monotonic()
    assert revoked.returncode == 0, revoked.stderr
    refused = httpx.get(f"{deployed.endpoint}/models", headers={"Authorization": f"Bearer {new['key']}"},
                        verify=_tls(deployed), trust_env=False)
    assert refused.status_code == 401 and time.monotonic() - returned_at < 1.0
    # the streams began with the key and were still running once the gateway refused it
    _assert_whole(streams.join(), 8, refusal.at())
    assert _client(deployed, deployed.key).models.list().data[0].id == "tiny-mistral"  # key-1 untouched
    assert list(_keys(deployed)) == ["key-1"]
    assert cli("env", NAME, "--key", "ci-job", env=env).returncode == 1
    last = cli("keys", "revoke", NAME, "key-1", env=env)
    assert last.returncode == 3 and "last key" in last.stderr


def test_an_engine_change_restarts_the_engine_behind_the_same_url_key_and_certificate(converging):
    before = _deployed(converging)
    ca = Path(before.ca).read_bytes()
    assert _long_completion(before).status_code == 200  # 450 tokens fit a context of 512
    changed = _recipe(converging["home"], converging["port"], limits={"requests_per_minute": 600},
                      model={"max_model_len": 384})
    applied = cli("up", str(changed), "--json", env=converging["env"])
    assert applied.returncode == 0, applied.stderr[-3000:]
    assert json.loads(applied.stdout)["plan"]["effect"] == "engine-restart"
    after = _deployed(converging)
    engine_before, gateway_before = before.pids
    engine_after, gateway_after = after.pids
    assert engine_after != engine_before and gateway_after == gateway_before
    assert after.endpoint == before.endpoint and after.key == before.key and Path(after.ca).read_bytes() == ca
    reply = _client(after, before.key).completions.create(model="tiny-mistral", prompt="a", max_tokens=300)
    assert reply.choices[0].finish_reason == "length"
    too_long = _long_completion(after)
    assert too_long.status_code == 400 and "max_model_len=384" in too_long.text  # the new engine's context
    converging["recipe"] = changed


def test_a_dead_engine_shows_in_status_and_up_starts_it_again(converging):
    before = _deployed(converging)
    engine_pid = before.pids[0]
    os.killpg(engine_pid, signal.SIGKILL)
    # and its private folder gone, as a reboot empties the system's temp folder
    shutil.rmtree(Path(before.engine_socket).parent)
    deadline = time.monotonic() + 30
    status: dict[str, Any] = {}
    while time.monotonic() < deadline:
        status = json.loads(cli("status", NAME, "--json", env=converging["env"]).stdout)
        if status["phase"] == "down":
            break
        time.sleep(0.5)
    assert status["phase"] == "down" and status["healthy"] is False and "engine is not running" in status["error"]
    repaired = cli("up", str(converging["recipe"]), "--json", env=converging["env"])
    assert repaired.returncode == 0, repaired.stderr[-3000:]
    assert "repair" in repaired.stderr
    after = _deployed(converging)
    assert after.pids[0] != engine_pid and after.pids[1] == before.pids[1] and after.endpoint == before.endpoint
    assert after.engine_socket != before.engine_socket and Path(after.engine_socket).is_socket()
    status = json.loads(cli("status", NAME, "--json", env=converging["env"]).stdout)
    assert status["phase"] == "ready" and status["healthy"] is True


def test_usage_is_kept_across_reloads_key_changes_and_engine_restarts(converging):
    earlier = converging["usage"]  # before a gateway reload, a key added and revoked, two engine starts
    time.sleep(2.5)  # the last readiness probe's token is in the records (written once a second)
    rows = _usage(converging)
    for field in ("requests", "prompt_tokens", "completion_tokens"):
        assert rows["key-1"][field] >= earlier["key-1"][field]
    assert rows["ci-job"]["completion_tokens"] == 8 * 4 * 480  # its 8 streams, whole, then it was revoked
    assert _usage(converging, since="1s") != rows  # --since counts from then on
    deployed = _deployed(converging)
    engine_before = _engine_counts(deployed)
    _client(deployed, deployed.key).completions.create(model="tiny-mistral", prompt="a", max_tokens=25)
    after, grew = _settled(converging, deployed, rows, engine_before, requests=1)
    assert grew[1] == 25 and _delta(after, rows, "key-1", "completion_tokens") == 25
    assert _delta(after, rows, "key-1", "prompt_tokens") == grew[0]

