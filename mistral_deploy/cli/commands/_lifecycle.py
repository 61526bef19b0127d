"""What `up`, `run`, `status`, `env` and `down` share: signals as interrupts, summaries, client variables."""

from __future__ import annotations

import signal
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Iterator

if TYPE_CHECKING:
    from pathlib import Path

    from mistral_deploy.state import Deployment, StateStore


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM (a CI runner cancelling the job) takes the same clean-up path as Ctrl-C."""

    def handler(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def client_env(deployment: "Deployment", store: "StateStore", key_id: "str | None" = None) -> dict[str, str]:
    """The variables the official OpenAI clients (and curl) read to reach this endpoint, with the key
    `key_id` (default: the first one the deployment has)."""
    from mistral_deploy.errors import MistralDeployError

    keys = store.read_keys(deployment.name)
    if key_id is not None and key_id not in keys:
        raise MistralDeployError(f"--key: {deployment.name} has no key {key_id!r}; its keys: {', '.join(keys) or 'none'}")
    if not deployment.endpoint:
        raise MistralDeployError(f"{deployment.name} has no endpoint yet (phase {deployment.phase})",
                                 hint=f"`mistral-deploy status {deployment.name}`")
    key = keys[key_id] if key_id is not None else next(iter(keys.values()), "")
    env = {"OPENAI_BASE_URL": deployment.endpoint, "OPENAI_API_KEY": key}
    if deployment.tls_ca:
        # httpx (the openai client) reads SSL_CERT_FILE, curl CURL_CA_BUNDLE, requests REQUESTS_CA_BUNDLE:
        # a bundle of the system's CAs plus the endpoint's certificate, so other HTTPS in the same shell still
        # works. What it adds can vouch for the endpoint alone: on a VM a leaf certificate (CA:FALSE, so
        # whatever its key signs is refused), locally a CA whose key was discarded the moment it signed.
        # MISTRAL_DEPLOY_CA_FILE is the endpoint's certificate alone, for clients that pin it strictly.
        bundle = trust_bundle(deployment.tls_ca, store.dir(deployment.name) / "tls" / "trust-bundle.pem")
        env.update(SSL_CERT_FILE=bundle, CURL_CA_BUNDLE=bundle, REQUESTS_CA_BUNDLE=bundle,
                   MISTRAL_DEPLOY_CA_FILE=deployment.tls_ca)
    return env


def trust_bundle(ca_file: str, target: "Path") -> str:
    """The system's CA certificates followed by the deployment's, written once (public, 0644)."""
    import os
    import ssl
    from pathlib import Path

    from mistral_deploy.keys import write_private

    system = ssl.get_default_verify_paths().openssl_cafile
    if not system or not Path(system).is_file():
        import certifi

        system = certifi.where()
    text = Path(system).read_text(encoding="utf-8") + "\n" + Path(ca_file).read_text(encoding="utf-8")
    if not target.is_file() or target.read_text(encoding="utf-8") != text:
        write_private(target, text)
        os.chmod(target, 0o644)  # certificates only: nothing secret
    return str(target)


def summary(deployment: "Deployment") -> dict[str, Any]:
    """What `up --json` and `run --json` say about a deployment: never a key."""
    recipe = deployment.recipe_model()
    return {
        "name": deployment.name,
        "backend": deployment.backend,
        "phase": deployment.phase,
        "endpoint": deployment.endpoint,
        "model": recipe.served_model_name,
        "tls_ca": deployment.tls_ca,
        "network": recipe.network.mode,
        "hourly_price": deployment.details.get("hourly_price"),
        "ends_at": deployment.details.get("ends_at"),  # its TTL; None: no end time (or local)
        "model_commit": deployment.details.get("model_commit"),  # the exact weights served, where known
    }


def services_recorded(store: "StateStore", including: "str | None" = None) -> int:
    """SkyServe services recorded here (and `including`, a service about to be): they share one SkyServe
    controller (converge.ServeController)."""
    names = {d.name for d in store.list() if d.backend == "serve"}
    return len(names | {including}) if including else len(names)


def usage_lines(deployment: "Deployment") -> list[str]:
    model = deployment.recipe_model().served_model_name
    cacert = ' --cacert "$MISTRAL_DEPLOY_CA_FILE"' if deployment.tls_ca else ""
    lines = [
        f"endpoint: {deployment.endpoint}",
        f"model:    {model}",
        f'use it:   eval "$(mistral-deploy env {deployment.name})"',
        f'          curl -s{cacert} $OPENAI_BASE_URL/models -H "Authorization: Bearer $OPENAI_API_KEY"',
    ]
    if deployment.tls_ca:
        lines.append(f"TLS:      pin {deployment.tls_ca}")
    if deployment.backend == "cloud":
        lines.append(f"ends:     {lifetime_text(deployment)}")
    if deployment.backend == "cloud" and deployment.details.get("network") == "private":
        lines.append(f"reach it: mistral-deploy tunnel {deployment.name}")
    lines.append(f"stop it:  mistral-deploy down {deployment.name}")
    return lines


def lifetime_text(deployment: "Deployment") -> str:
    """When a cloud deployment ends by itself (its TTL), said so that nobody forgets a GPU VM."""
    import time

    ends_at = deployment.details.get("ends_at")
    if not ends_at:
        return (f"never: no TTL, it runs (and costs) until `mistral-deploy down {deployment.name}` "
                f"(`mistral-deploy ttl {deployment.name} 4h` sets one)")
    return f"in {format_left(ends_at - time.time())} (TTL; `mistral-deploy ttl {deployment.name} 2h` changes it)"


def format_left(seconds: float) -> str:
    if seconds <= 0:
        return "0m (ending)"
    minutes = int(seconds // 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m"
