"""What a hostile network or a greedy key holder can do to a real endpoint (the vLLM engine and the nginx
gateway through `up --cloud local`), and the recipe's `limits:` that stop it.

Clients come from different loopback addresses (127.0.0.N, bound as the source), which the gateway
counts as different hosts. Requests are held in flight without any load on the engine by sending their
headers and only part of their body: the gateway counts a request against its address and key as soon as
its headers are read.
"""

from __future__ import annotations

import socket
import time
from pathlib import Path
from typing import Iterator

import pytest
import yaml

from local_support import Deployed, cli_env, down_and_assert_gone, free_port, up
from mistral_deploy.recipe import builtin_recipes_dir

pytestmark = pytest.mark.engine
FLOOD = 9000  # more connections than the gateway held before it had limits (2 workers x 4096)


@pytest.fixture(scope="module")
def limited(tmp_path_factory: pytest.TempPathFactory, models_dir: Path) -> Iterator[Deployed]:
    """A public endpoint (every address admitted, TLS off to keep the raw sockets simple) with two keys
    and small limits."""
    home = tmp_path_factory.mktemp("limits")
    data = yaml.safe_load((builtin_recipes_dir() / "tiny-mistral.yaml").read_text())
    data["network"] = {"mode": "public", "tls": False, "port": free_port()}
    data["auth"] = {"keys": 2}
    data["limits"] = {"header_timeout": "3s", "connections_per_address": 2, "concurrent_requests": 3,
                      "requests_per_minute": 60}
    recipe = home / "limited.yaml"
    recipe.write_text(yaml.safe_dump(data))
    env = cli_env(home, models_dir)
    deployed = up("limited", home, env, recipe=str(recipe))
    try:
        yield deployed
    finally:
        down_and_assert_gone(deployed)


def _keys(deployed: Deployed) -> list[str]:
    return [line.split()[-1] for line in (deployed.dir / "api_keys").read_text().splitlines()]


def _connect(deployed: Deployed, source: str) -> socket.socket:
    sock = socket.socket()
    sock.bind((source, 0))
    sock.settimeout(10)
    sock.connect(("127.0.0.1", deployed.port))
    return sock


def _request(deployed: Deployed, source: str, key: str, path: str = "/v1/models") -> tuple[int, dict[str, str]]:
    """One whole request from `source`: (status, headers)."""
    with _connect(deployed, source) as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n"
                     "Connection: close\r\n\r\n".encode())
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    head = data.split(b"\r\n\r\n", 1)[0].decode(errors="replace").split("\r\n")
    headers = dict(line.split(": ", 1) for line in head[1:] if ": " in line)
    return int(head[0].split()[1]), headers


def _held(deployed: Deployed, source: str, key: str) -> socket.socket:
    """A completion request in flight: headers sent, its body not yet."""
    sock = _connect(deployed, source)
    sock.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n"
                 "Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{".encode())
    return sock


def _wait_counted(sockets: list[socket.socket]) -> None:
    time.sleep(0.3)  # the gateway reads the headers as they arrive; give its event loop a moment


def test_a_flood_of_idle_connections_locks_nobody_out_and_is_dropped(limited):
    """~9,000 connections that send half a request line and wait, from one address: a client with a key
    from another address is still served, and the flood is dropped after the header timeout."""
    key = _keys(limited)[0]
    flood: list[socket.socket] = []
    try:
        for _ in range(FLOOD):
            sock = socket.socket()
            sock.bind(("127.0.0.10", 0))
            sock.connect(("127.0.0.1", limited.port))
            sock.sendall(b"GET /v1/mod")
            flood.append(sock)
        assert _request(limited, "127.0.0.11", key)[0] == 200
        assert _request(limited, "127.0.0.11", key)[0] == 200
        time.sleep(3 + 2)  # limits.header_timeout, then the gateway's timer
        closed = 0
        for sock in flood[:: FLOOD // 50]:
            sock.settimeout(5)
            try:
                closed += sock.recv(1024) == b""
            except (ConnectionResetError, BrokenPipeError):
                closed += 1
        assert closed == len(flood[:: FLOOD // 50])
    finally:
        for sock in flood:
            sock.close()
    errors = (limited.dir / "gateway" / "error.log").read_text()
    assert "worker_connections are not enough" not in errors and "Too many open files" not in errors


def test_requests_in_flight_are_limited_per_address(limited):
    keys = _keys(limited)
    held = [_held(limited, "127.0.0.20", keys[0]), _held(limited, "127.0.0.20", keys[1])]
    try:
        _wait_counted(held)
        status, headers = _request(limited, "127.0.0.20", keys[1])
        assert status == 429 and headers.get("Retry-After") == "1"
        assert _request(limited, "127.0.0.21", keys[1])[0] == 200  # another address is not held back
    finally:
        for sock in held:
            sock.close()


def test_one_key_at_its_concurrency_limit_leaves_the_other_key_served(limited):
    greedy, other = _keys(limited)
    held = [_held(limited, f"127.0.0.{30 + n}", greedy) for n in range(3)]  # limits.concurrent_requests
    try:
        _wait_counted(held)
        status, headers = _request(limited, "127.0.0.34", greedy)
        assert status == 429 and headers.get("Retry-After") == "1"
        assert _request(limited, "127.0.0.35", other)[0] == 200
    finally:
        for sock in held:
            sock.close()


def test_one_key_over_its_rate_gets_429_with_retry_after_the_other_does_not(limited):
    greedy, other = _keys(limited)
    statuses = [_request(limited, f"127.0.0.{40 + n % 20}", greedy) for n in range(30)]
    refused = [headers for status, headers in statuses if status == 429]
    # 60 a minute with a burst of 10: at most ~11 of 30 quick requests pass
    assert len(refused) >= 15 and all(h.get("Retry-After") == "1" for h in refused)
    assert all(status in (200, 429) for status, _ in statuses)
    assert _request(limited, "127.0.0.60", other)[0] == 200


def test_requests_without_a_valid_key_are_limited_per_address_the_machine_itself_is_not(limited):
    """Over 200 at once (then 20 a second) without a valid key from one address: 429 with Retry-After; a
    key holder from another address is served; 127.0.0.1 (the machine's own probes, an SSH tunnel) is
    not counted."""
    key = _keys(limited)[1]
    flood = [_request(limited, "127.0.0.41", "md-wrong-key-00000000000000000000") for _ in range(300)]
    codes = [status for status, _ in flood]
    assert codes[0] == 401 and set(codes) == {401, 429}, set(codes)
    assert all("Retry-After" in headers for status, headers in flood if status == 429)
    assert _request(limited, "127.0.0.42", key)[0] == 200
    assert {_request(limited, "127.0.0.1", "md-wrong-key-00000000000000000000")[0] for _ in range(300)} == {401}
