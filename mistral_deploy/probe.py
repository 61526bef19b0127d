"""Readiness and health probes of an endpoint, as a client sees it (through the gateway).

Ready means, in this order: the gateway's `/health` answers 200 (the engine is up), the authenticated
model list names the served model, and a one-token completion succeeds. The same probe serves the
local backend, a cloud VM (directly, or through an SSH tunnel) and a SkyServe service.

TLS is verified against the deployment's pinned certificate (`ca_file`); nothing here turns
verification off.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, Callable, Optional

from mistral_deploy.errors import NotReadyError

if TYPE_CHECKING:  # imported where used: `status` of a deployment that is down probes nothing
    import ssl

    import httpx

# The probe's own steps, reported through on_phase while it waits.
STEP_HEALTH = "health"
STEP_MODELS = "models"
STEP_COMPLETION = "first-token"


class _Refused(Exception):
    """An answer that waiting will not change (a rejected key, a model that is not served)."""


def base_url(endpoint: str) -> str:
    """https://host:port/v1 -> https://host:port (where /health lives)."""
    endpoint = endpoint.rstrip("/")
    return endpoint[: -len("/v1")] if endpoint.endswith("/v1") else endpoint


def ssl_context(ca_file: Optional[str]) -> ssl.SSLContext | bool:
    """What httpx verifies against: the pinned certificate when there is one, the system's CAs otherwise."""
    import ssl

    if ca_file:
        return ssl.create_default_context(cafile=ca_file)
    return True


def client(ca_file: Optional[str] = None, timeout: float = 30.0) -> "httpx.Client":
    import httpx

    # trust_env=False: a proxy from the environment must never see the key or sit between us and loopback
    return httpx.Client(verify=ssl_context(ca_file), timeout=timeout, trust_env=False)


def check_health(endpoint: str, *, ca_file: Optional[str] = None, timeout: float = 5.0) -> bool:
    """The gateway's /health (no key): True when it answers 200, i.e. the engine behind it is ready."""
    import ssl

    import httpx

    try:
        with client(ca_file, timeout) as http:
            return http.get(base_url(endpoint) + "/health").status_code == 200
    except (httpx.HTTPError, OSError, ssl.SSLError):  # OSError: a missing or unreadable pinned CA file
        return False


def probe_task(recipe: Any) -> str:
    """What the readiness check asks for: one embedding, one chat token (a guardrail closes raw
    completions to the deployment's keys), or one completion token."""
    if recipe.model.task == "embed":
        return "embed"
    return "chat" if recipe.guardrail else "generate"


def check_ready(http: "httpx.Client", endpoint: str, key: str, served_model: str,
                on_step: Callable[[str], None] = lambda _step: None, *, task: str = "generate") -> None:
    """One full readiness check; raises what went wrong (httpx errors, _Refused, or a plain message)."""
    base = endpoint.rstrip("/")
    headers = {"Authorization": f"Bearer {key}"}
    on_step(STEP_HEALTH)
    health = http.get(base_url(endpoint) + "/health")
    _refused_address(health)
    if health.status_code != 200:
        raise RuntimeError(f"/health answered {health.status_code}")
    on_step(STEP_MODELS)
    models = http.get(base + "/models", headers=headers)
    _refused_address(models)
    if models.status_code == 401:
        raise _Refused("the gateway refused the deployment's API key (401)")
    if models.status_code != 200:
        raise RuntimeError(f"/v1/models answered {models.status_code}")
    ids = [m.get("id") for m in _json(models).get("data", [])]
    if served_model not in ids:
        raise _Refused(f"the endpoint serves {ids}, not {served_model!r}")
    on_step(STEP_COMPLETION)
    if task == "embed":  # an embedding model has no completions route: one embedding instead
        route, body, field = "/embeddings", {"model": served_model, "input": "ping"}, "data"
    elif task == "chat":  # a guardrail closes raw completions: one chat token, the guardrail put first
        route, body, field = "/chat/completions", {"model": served_model, "max_tokens": 1, "temperature": 0,
                                                   "messages": [{"role": "user", "content": "ping"}]}, "choices"
    else:
        route, body, field = "/completions", {"model": served_model, "prompt": "ping", "max_tokens": 1,
                                              "temperature": 0}, "choices"
    answer = http.post(base + route, headers=headers, json=body)
    if answer.status_code == 404:
        raise _Refused(f"the endpoint has no {route} route (404)")
    if answer.status_code != 200 or not _json(answer).get(field):
        raise RuntimeError(f"a one-token request to /v1{route} answered {answer.status_code}")


def _refused_address(response: "httpx.Response") -> None:
    """403: the gateway does not admit the address this machine connects from (network.allow)."""
    if response.status_code == 403:
        raise _Refused("the gateway refused this machine's address (403): it admits only the CIDRs in "
                       "network.allow; add the address you connect from with --allow A.B.C.D/32 (or widen it), "
                       "or check from a host inside the allowed range")


def _json(response: "httpx.Response") -> dict[str, Any]:
    try:
        data = response.json()
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


def wait_ready(
    endpoint: str,
    key: str,
    served_model: str,
    *,
    ca_file: Optional[str] = None,
    timeout: float,
    interval: float = 1.0,
    probe_timeout: float = 30.0,
    alive: Optional[Callable[[], bool]] = None,
    on_phase: Optional[Callable[[str], None]] = None,
    task: str = "generate",
) -> float:
    """Probe until ready; return the seconds waited. NotReadyError on timeout, when `alive()` turns
    False (the engine died: no point waiting), or on an answer that waiting will not change."""
    import ssl

    import httpx

    started = time.monotonic()
    deadline = started + timeout
    last_problem = "no answer yet"
    reported: set[str] = set()

    def step(name: str) -> None:
        if on_phase is not None and name not in reported:
            reported.add(name)
            on_phase(name)

    with client(ca_file, probe_timeout) as http:
        while True:
            if alive is not None and not alive():
                raise NotReadyError(f"the engine stopped before it was ready (last probe: {last_problem})")
            try:
                check_ready(http, endpoint, key, served_model, step, task=task)
                return time.monotonic() - started
            except _Refused as exc:
                raise NotReadyError(str(exc)) from None
            except ssl.SSLCertVerificationError as exc:
                raise NotReadyError(f"the endpoint's TLS certificate does not match the pinned one: "
                                    f"{exc.verify_message}") from None
            except httpx.ConnectError as exc:
                if isinstance(exc.__cause__, ssl.SSLCertVerificationError) or "CERTIFICATE_VERIFY_FAILED" in str(exc):
                    raise NotReadyError("the endpoint's TLS certificate does not match the pinned one") from None
                last_problem = "connection refused"
            except httpx.HTTPError as exc:
                last_problem = f"{type(exc).__name__}"
            except RuntimeError as exc:
                last_problem = str(exc)
            left = deadline - time.monotonic()
            if left <= 0:
                raise NotReadyError(f"not ready after {timeout:.0f}s (last probe: {last_problem})")
            time.sleep(min(interval, left))
