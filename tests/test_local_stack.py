"""The serving stack for real: `mistral-deploy up --cloud local` runs the vLLM engine (CPU build, the tiny
model) and the nginx gateway; the official `openai` client, raw HTTP and other hosts (network namespaces)
talk to it. One endpoint serves most tests (the engine takes ~20 s to start); tests that break an
endpoint make their own. Every deployment is taken down by its test, and its PIDs and ports checked.
"""

from __future__ import annotations

import grp
import hashlib
import http.client
import json
import os
import signal
import stat
import subprocess
import time
from pathlib import Path
from typing import Iterator

import httpx
import pytest

from local_support import (
    CLI, Deployed, assert_gone, cli, cli_env, down_and_assert_gone, free_port, make_hosts, pid_alive, read_deployed,
    tcp_listeners, unix_listeners, up,
)

pytestmark = pytest.mark.engine
MODEL = "tiny-mistral"


@pytest.fixture(scope="module")
def endpoint(tmp_path_factory: pytest.TempPathFactory, models_dir: Path) -> Iterator[Deployed]:
    """One private endpoint for the module: up through the CLI, down (and checked) at the end."""
    home = tmp_path_factory.mktemp("endpoint")
    env = cli_env(home, models_dir)
    deployed = up("shared", home, env, "--port", str(free_port()))
    try:
        yield deployed
    finally:
        down_and_assert_gone(deployed)


def _raw(deployed: Deployed, method: str, path: str, headers: dict[str, str] | None = None,
         body: bytes | None = None) -> tuple[int, bytes]:
    """A request whose path is sent exactly as written (http.client does not normalise it)."""
    conn = http.client.HTTPConnection("127.0.0.1", deployed.port, timeout=30)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def _auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


# --------------------------------------------------------------------------------------------------
# the official client through the gateway


def test_openai_client_lists_completes_and_chats(endpoint):
    from openai import OpenAI

    client = OpenAI(base_url=endpoint.endpoint, api_key=endpoint.key, max_retries=0)
    assert [m.id for m in client.models.list().data] == [MODEL]
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hello!"}],
                                          max_tokens=8)
    assert chat.model == MODEL and isinstance(chat.choices[0].message.content, str)
    assert chat.usage.completion_tokens > 0
    completion = client.completions.create(model=MODEL, prompt="The sky is", max_tokens=4)
    assert completion.choices[0].text is not None and completion.usage.completion_tokens > 0


def test_streamed_chunks_pass_through_unbuffered(endpoint):
    """The first SSE chunk reaches the client long before the last: the gateway does not buffer."""
    from openai import OpenAI

    client = OpenAI(base_url=endpoint.endpoint, api_key=endpoint.key, max_retries=0)
    started = time.monotonic()
    arrivals: list[float] = []
    stream = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Count"}], max_tokens=96, stream=True,
        extra_body={"ignore_eos": True, "min_tokens": 96},
    )
    text = ""
    for chunk in stream:
        arrivals.append(time.monotonic() - started)
        if chunk.choices and chunk.choices[0].delta.content:
            text += chunk.choices[0].delta.content
    assert len(arrivals) >= 50 and text
    # a buffering proxy delivers every chunk at the end: first and last would arrive together
    assert arrivals[0] < 0.5 * arrivals[-1], (arrivals[0], arrivals[-1])


# --------------------------------------------------------------------------------------------------
# keys


def test_every_forwarded_route_needs_a_valid_key(endpoint):
    key = endpoint.key
    bad_headers = [
        {},
        {"Authorization": "Bearer md-not-the-key-0000000000000000000000"},
        {"Authorization": f"Bearer {key.upper()}"},  # keys are case-sensitive
        {"Authorization": f"Bearer {key}x"},
        {"Authorization": f"Basic {key}"},
        {"Authorization": key},
        {"X-Api-Key": key},
        {"Authorization": f"Bearer  {key}"},
    ]
    body = json.dumps({"model": MODEL, "prompt": "x", "max_tokens": 1}).encode()
    for path, method in (("/v1/models", "GET"), ("/v1/completions", "POST"), ("/v1/chat/completions", "POST")):
        for headers in bad_headers:
            status, data = _raw(endpoint, method, path, {**headers, "Content-Type": "application/json"}, body)
            assert status == 401, (path, headers.keys(), status)
            assert b"invalid API key" in data
    status, _ = _raw(endpoint, "GET", f"/v1/models?api_key={key}")
    assert status == 401  # never a key in the query string
    assert _raw(endpoint, "GET", "/v1/models", {"Authorization": f"bearer {key}"})[0] == 200  # scheme: any case
    assert _raw(endpoint, "GET", "/v1/models", _auth(key))[0] == 200


def test_health_answers_without_a_key_and_says_only_ready(endpoint):
    status, data = _raw(endpoint, "GET", "/health")
    assert status == 200 and len(data) < 64 and b"tiny" not in data


# --------------------------------------------------------------------------------------------------
# the route allowlist: vLLM's open routes are refused whatever the path tricks


OPEN_ENGINE_ROUTES = ["/metrics", "/tokenize", "/detokenize", "/version", "/ping", "/invocations", "/pause",
                      "/is_paused", "/docs", "/openapi.json", "/load", "/v1/load_lora_adapter", "/pooling",
                      "/classify", "/score", "/rerank", "/v1/embeddings", "/v1/responses", "/server_info",
                      "/collective_rpc", "/reset_prefix_cache", "/sleep"]
TRICKS = ["//metrics", "/v1/../metrics", "/v1/%2e%2e/metrics", "/v1/%2E%2E/metrics", "/v1/models/../../metrics",
          "/v1/models%2f..%2f..%2fmetrics", "/./metrics", "/METRICS", "/Metrics", "/V1/models", "/v1/Models",
          "/v1/models/", "/v1/models.json", "/%6detrics", "/v1/chat/completions/../../../tokenize",
          "/v1//../metrics", "/v1/models;/../../metrics"]


def test_the_engine_itself_leaves_these_routes_open(endpoint):
    """The premise of the allowlist: vLLM answers /metrics and /tokenize to whoever reaches its socket."""
    with httpx.Client(transport=httpx.HTTPTransport(uds=endpoint.engine_socket), timeout=10) as http:
        assert http.get("http://engine/metrics").status_code == 200
        assert http.post("http://engine/tokenize", json={"model": MODEL, "prompt": "hi"}).status_code == 200


def test_the_engine_serves_http_only_on_a_socket_only_this_user_reaches(endpoint):
    """No HTTP port to race for or to reach: the engine's API server listens on a Unix socket in a folder
    only the user (the gateway's) may open. (vLLM's own internal sockets, torch's store among them, are
    not its HTTP server.)"""
    engine_pid = endpoint.record["details"]["engine"]["pid"]
    argv = Path(f"/proc/{engine_pid}/cmdline").read_bytes().decode().split("\0")
    assert "--port" not in argv and "--host" not in argv and argv[argv.index("--uds") + 1] == endpoint.engine_socket
    assert endpoint.engine_socket in unix_listeners([engine_pid])
    # its folder: this user's, and open to the group of the gateway's workers alone (root runs them as an
    # unprivileged user); the socket inherits that group
    socket_dir = Path(endpoint.engine_socket).parent
    worker_gid = grp.getgrnam("www-data").gr_gid if os.geteuid() == 0 else os.getegid()
    assert stat.S_IMODE(os.stat(socket_dir).st_mode) == 0o2750 and os.stat(socket_dir).st_uid == os.geteuid()
    assert os.stat(socket_dir).st_gid == worker_gid
    socket_stat = os.stat(endpoint.engine_socket)
    assert (stat.S_IMODE(socket_stat.st_mode) & 0o007, socket_stat.st_gid) == (0, worker_gid)
    for listener in tcp_listeners([engine_pid]):
        assert listener.startswith("0100007F:"), "only loopback, for vLLM's internal sockets"


@pytest.mark.parametrize("path", OPEN_ENGINE_ROUTES + TRICKS)
def test_everything_but_the_allowlist_is_refused_even_with_a_key(endpoint, path):
    for method in ("GET", "POST"):
        body = b'{"model": "tiny-mistral", "prompt": "hi"}' if method == "POST" else None
        status, data = _raw(endpoint, method, path, {**_auth(endpoint.key), "Content-Type": "application/json"}, body)
        assert status in (400, 404, 405), (method, path, status)
        assert b"vllm" not in data.lower() and b"# HELP" not in data and b"tokens" not in data


def test_merged_slashes_reach_the_canonical_route_and_a_query_is_not_a_path(endpoint):
    assert _raw(endpoint, "GET", "//v1//models", _auth(endpoint.key))[0] == 200
    status, data = _raw(endpoint, "GET", "/v1/models?/../metrics", _auth(endpoint.key))
    assert status == 200 and b'"tiny-mistral"' in data and b"# HELP" not in data


def test_request_bodies_are_limited(endpoint):
    big = b'{"model": "tiny-mistral", "prompt": "' + b"a" * (5 * 1024 * 1024) + b'"}'
    status, _ = _raw(endpoint, "POST", "/v1/completions", {**_auth(endpoint.key), "Content-Type": "application/json"},
                     big)
    assert status == 413


def _engine_metric(deployed: Deployed, name: str) -> float:
    with httpx.Client(transport=httpx.HTTPTransport(uds=deployed.engine_socket), timeout=10) as http:
        text = http.get("http://engine/metrics").text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + "{"))


@pytest.mark.parametrize("body, says", [
    ({"prompt": "hi", "max_tokens": 2, "n": 5000}, "n: at most 4 completions"),
    ({"prompt": "hi", "max_tokens": 2, "best_of": 50}, "best_of: at most 4"),
    ({"prompt": "hi", "max_tokens": 100000}, "max_tokens: at most 4096 output tokens"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 5000}, "max_completion_tokens"),
    ({"prompt": ["hi"] * 17, "max_tokens": 2}, "at most 16 prompts per request on this endpoint, got 17"),
    ({"prompt": [[1, 2]] * 40, "max_tokens": 2}, "got 40"),
])
def test_requests_over_the_caps_are_refused_before_the_engine_sees_them(endpoint, body, says):
    """limits.max_n, max_tokens and max_batch (their defaults): 400 from the gateway, no engine work."""
    route = "/v1/chat/completions" if "messages" in body else "/v1/completions"
    before = _engine_metric(endpoint, "vllm:prompt_tokens_total")
    status, data = _raw(endpoint, "POST", route, {**_auth(endpoint.key), "Content-Type": "application/json"},
                        json.dumps({"model": MODEL, **body}).encode())
    assert status == 400 and says in json.loads(data)["error"]["message"], data
    ok, _ = _raw(endpoint, "POST", "/v1/completions", {**_auth(endpoint.key), "Content-Type": "application/json"},
                 json.dumps({"model": MODEL, "prompt": "hi", "max_tokens": 2, "n": 4}).encode())
    assert ok == 200
    # only the allowed request reached the engine: its prompt, n times over at most
    assert 0 < _engine_metric(endpoint, "vllm:prompt_tokens_total") - before <= 4 * 8


def test_a_body_that_is_not_a_json_object_is_refused_by_the_gateway(endpoint):
    for body in (b"not json", b"[1, 2]", b""):
        status, data = _raw(endpoint, "POST", "/v1/completions",
                            {**_auth(endpoint.key), "Content-Type": "application/json"}, body)
        assert status == 400 and b"invalid_request_error" in data


def test_health_passes_no_query_to_the_engine(endpoint):
    assert _raw(endpoint, "GET", "/health?probe-query-test=1")[0] == 200
    time.sleep(0.5)
    assert "probe-query-test" not in (endpoint.dir / "engine.log").read_text()
    assert "/health" in (endpoint.dir / "engine.log").read_text()[-20000:]


# --------------------------------------------------------------------------------------------------
# secrets stay out of logs, records, arguments and readable files


def test_keys_never_leave_their_0600_files(endpoint):
    key = endpoint.key
    assert stat.S_IMODE(os.stat(endpoint.dir / "api_keys").st_mode) == 0o600
    # the gateway holds the key's SHA-256 only, in the private temp folder: readable by this user and, when
    # root started it, by the group of the gateway's unprivileged workers (gateway.js reads it)
    tmpdir = Path(endpoint.record["details"]["tmpdir"])
    key_map = tmpdir / "gateway" / "api_keys.map"
    assert hashlib.sha256(key.encode()).hexdigest() in key_map.read_text()
    worker_gid = grp.getgrnam("www-data").gr_gid if os.geteuid() == 0 else os.getegid()
    assert (stat.S_IMODE(os.stat(key_map).st_mode), os.stat(key_map).st_gid) == (
        (0o640, worker_gid) if os.geteuid() == 0 else (0o600, worker_gid))
    assert stat.S_IMODE(os.stat(tmpdir).st_mode) == 0o2750
    assert stat.S_IMODE(os.stat(tmpdir / "engine").st_mode) == 0o700
    assert stat.S_IMODE(os.stat(endpoint.dir).st_mode) == 0o700
    _raw(endpoint, "GET", "/v1/models?probe=keys-test", _auth(key))
    _raw(endpoint, "GET", "/v1/models", {"Authorization": "Bearer md-wrong-key-00000000000000000000"})
    access_log = endpoint.dir / "gateway" / "access.log"
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and " 401 " not in access_log.read_text()[-2000:]:
        time.sleep(0.2)  # the access log is flushed once a second
    assert '"GET /v1/models" 401' in access_log.read_text()  # the requests were logged, without the key
    assert "probe=keys-test" not in access_log.read_text()  # nor the query string
    for path in endpoint.dir.rglob("*"):
        if path.is_file() and path.name != "api_keys":
            assert key not in path.read_text(errors="replace"), path
            assert "md-wrong-key" not in path.read_text(errors="replace"), path
    for pid in endpoint.pids:
        assert key.encode() not in Path(f"/proc/{pid}/cmdline").read_bytes()
        assert key.encode() not in Path(f"/proc/{pid}/environ").read_bytes()
    for args in (["status", "--json"], ["status"], ["logs", endpoint.name, "-n", "1000"]):
        result = cli(*args, env=endpoint.env, timeout=60)
        assert result.returncode == 0 and key not in result.stdout + result.stderr


# --------------------------------------------------------------------------------------------------
# the CLI around a running endpoint


def test_status_env_and_logs(endpoint):
    status = json.loads(cli("status", endpoint.name, "--json", env=endpoint.env, timeout=60).stdout)
    assert status["healthy"] is True and status["phase"] == "ready" and status["endpoint"] == endpoint.endpoint
    assert status["engine_pid"] in endpoint.pids and status["gateway_pid"] in endpoint.pids
    assert cli("status", endpoint.name, "--ip", env=endpoint.env, timeout=60).stdout.strip() == "127.0.0.1"

    exports = cli("env", endpoint.name, env=endpoint.env, timeout=60).stdout
    shell = subprocess.run(["bash", "-c", exports + '\ncurl -s -o /dev/null -w "%{http_code}" '
                            '"$OPENAI_BASE_URL/models" -H "Authorization: Bearer $OPENAI_API_KEY"'],
                           capture_output=True, text=True, timeout=30)
    assert shell.stdout == "200"

    logs = cli("logs", endpoint.name, "-n", "5", env=endpoint.env, timeout=60)
    assert logs.returncode == 0 and 0 < len(logs.stdout.splitlines()) <= 5


def test_a_taken_name_is_a_change_for_up_and_refused_by_run(endpoint):
    # `up` converges: with another port it is a change (shown by --dry-run, nothing touched)
    result = cli("up", "tiny-mistral", "--cloud", "local", "--name", endpoint.name, "--dry-run", env=endpoint.env,
                 timeout=60)
    assert result.returncode == 0 and f"network.port  {endpoint.port} -> 8443" in result.stdout, result.stderr
    # `run` never adopts a deployment it did not create
    result = cli("run", "tiny-mistral", "--cloud", "local", "--name", endpoint.name, "--", "true", env=endpoint.env,
                 timeout=60)
    assert result.returncode == 6 and "already exists" in result.stderr
    assert "Traceback" not in result.stderr
    after = read_deployed(endpoint.name, endpoint.home, endpoint.env)
    assert after.record["phase"] == "ready" and after.port == endpoint.port and after.pids == endpoint.pids


def test_a_busy_port_is_one_line_naming_the_flag(endpoint):
    result = cli("up", "tiny-mistral", "--cloud", "local", "--name", "other", "--port", str(endpoint.port),
                 env=endpoint.env, timeout=60)
    assert result.returncode == 7 and "--port" in result.stderr and "Traceback" not in result.stderr
    assert not (endpoint.home / "state" / "deployments" / "other").exists()


# --------------------------------------------------------------------------------------------------
# failures


def test_engine_dying_while_loading_fails_up_fast_with_the_log_tail(tmp_path, models_dir):
    env = cli_env(tmp_path, models_dir)
    port = free_port()
    proc = subprocess.Popen([CLI, "up", "tiny-mistral", "--cloud", "local", "--name", "dies", "--port", str(port)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _up_dies(proc, tmp_path, env, port)
    finally:
        if proc.poll() is None:  # the test failed early: take down whatever it started
            proc.terminate()
            proc.communicate(timeout=60)
        cli("down", "--all", env=env, timeout=120)


def _up_dies(proc: subprocess.Popen, tmp_path: Path, env: dict, port: int) -> None:
    record_file = tmp_path / "state" / "deployments" / "dies" / "deployment.json"
    deadline = time.monotonic() + 120
    engine_pid = None
    while engine_pid is None and time.monotonic() < deadline and proc.poll() is None:
        if record_file.exists():
            engine_pid = (json.loads(record_file.read_text())["details"].get("engine") or {}).get("pid")
        time.sleep(0.05)
    assert engine_pid, "up never recorded an engine"
    engine_log = record_file.parent / "engine.log"
    while time.monotonic() < deadline and not (engine_log.exists() and engine_log.read_text(errors="replace").strip()):
        time.sleep(0.1)  # the engine is importing and loading: kill it once it has said something
    os.kill(engine_pid, signal.SIGKILL)
    killed = time.monotonic()
    _out, err = proc.communicate(timeout=60)
    assert time.monotonic() - killed < 5
    assert proc.returncode == 8
    assert "the engine stopped before it was ready" in err and "last log lines" in err
    assert "Traceback (most recent call last)" not in err.split("--- last log lines ---")[0]
    record = json.loads(record_file.read_text())
    assert record["phase"] == "failed"
    pids = [record["details"][p]["pid"] for p in ("engine", "gateway") if record["details"].get(p)]
    assert_gone(pids, [port])
    assert cli("down", "dies", env=env, timeout=60).returncode == 0
    assert not record_file.parent.exists()


def test_public_endpoint_from_other_hosts_tls_cidrs_then_engine_crash(tmp_path, models_dir, endpoint):
    """Two other hosts (network namespaces): one allowed by CIDR, one not. The private endpoint is not
    reachable from either; the public one admits only the allowed host, over TLS pinned to its CA."""
    with make_hosts(2) as hosts:
        allowed, denied = hosts
        # the private endpoint binds 127.0.0.1: another host cannot even connect
        code, _ = allowed.curl(f"http://{allowed.gateway_address}:{endpoint.port}/health")
        assert code == 7  # curl: could not connect

        env = cli_env(tmp_path, models_dir)
        public = up("public", tmp_path, env, "--port", str(free_port()), "--network", "public",
                    "--allow", f"{allowed.address}/32")
        try:
            assert public.endpoint.startswith("https://") and public.ca
            url = f"https://{allowed.gateway_address}:{public.port}/v1/models"
            auth = ["-H", f"Authorization: Bearer {public.key}"]
            assert allowed.curl(url, "--cacert", public.ca, *auth) == (0, "200")
            assert allowed.curl(url, "--cacert", public.ca) == (0, "401")
            code, _ = allowed.curl(url, *auth)  # without the pinned certificate: refused by the client
            assert code == 60
            denied_url = f"https://{denied.gateway_address}:{public.port}/v1/models"
            assert denied.curl(denied_url, "--cacert", public.ca, *auth) == (0, "403")
            # the engine's HTTP server is on its socket: from another host only the gateway answers
            assert public.engine_socket in unix_listeners([public.record["details"]["engine"]["pid"]])

            # a crashed engine: the gateway answers an error at once instead of hanging
            engine_pid = public.record["details"]["engine"]["pid"]
            os.kill(engine_pid, signal.SIGKILL)
            while pid_alive(engine_pid):
                time.sleep(0.05)
            import ssl

            ctx = ssl.create_default_context(cafile=public.ca)
            with httpx.Client(verify=ctx, timeout=5, trust_env=False) as http:
                started = time.monotonic()
                response = http.get(public.endpoint + "/models", headers=_auth(public.key))
                assert response.status_code == 503 and time.monotonic() - started < 2
                # /health is answered from a one-second cache: it says so within a second or two
                health = [http.get(public.endpoint.removesuffix("/v1") + "/health").status_code]
                while health[-1] != 503 and time.monotonic() - started < 3:
                    time.sleep(0.1)
                    health.append(http.get(public.endpoint.removesuffix("/v1") + "/health").status_code)
                assert health[-1] == 503 and set(health) <= {200, 503}, health
            status = json.loads(cli("status", "public", "--json", env=env, timeout=60).stdout)
            assert status["healthy"] is False and status["engine_running"] is False
        finally:
            down_and_assert_gone(public)
