"""`mistral-deploy keys list|add|revoke NAME`: a deployment's API keys, changed live.

Each key has an id (key-1, or one chosen with --id) and a creation time; its secret is shown once, by
`keys add` (and by `env NAME --key ID`, which exports it for a client). A change reaches the gateway by
a reload, locally and on a VM (over SkyPilot's SSH access), or by a rolling `sky serve update` for a
service: requests in flight finish, a revoked key's next request is refused.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Annotated, Optional

import typer

from mistral_deploy.cli import app
from mistral_deploy.cli._output import Output

if TYPE_CHECKING:
    from mistral_deploy.state import Deployment, StateStore

keys_app = typer.Typer(help="List, add and revoke a deployment's API keys (applied live).", no_args_is_help=True)
app.add_typer(keys_app, name="keys")

NameArg = Annotated[str, typer.Argument(help="A deployment.")]
JsonFlag = Annotated[bool, typer.Option("--json", help="JSON on stdout.")]


@keys_app.command("list")
def list_keys(name: NameArg, json_out: JsonFlag = False) -> None:
    """Key ids and creation times; never a secret. A service's revoked key stays listed, as "revoke
    pending", while a replica of an older version still accepts it. Exit 5: no such deployment."""
    from mistral_deploy.state import StateStore

    out = Output(json_mode=json_out)
    store = StateStore()
    deployment = store.load(name)
    created = deployment.details.get("key_created") or {}
    rows = [{"id": key_id, "created_at": created.get(key_id, deployment.created_at), "state": "active"}
            for key_id in store.read_keys(name)]
    if deployment.details.get("rollout"):
        from mistral_deploy.serve import ServeBackend

        rollout = ServeBackend().refresh_rollout(deployment, store)
        for key_id in (rollout or {}).get("revoked") or []:
            rows.append({"id": key_id, "created_at": created.get(key_id, deployment.created_at),
                         "state": "revoke failed" if rollout.get("state") == "failed" else "revoke pending",
                         "detail": rollout.get("detail")})
    if json_out:
        out.json({"name": name, "keys": rows})
        return
    out.data("\n".join(f"{row['id']}\t{_when(row['created_at'])}"
                       + (f"\t{row['state']}: {row['detail']}" if row["state"] != "active" else "")
                       for row in rows))


@keys_app.command("add")
def add(
    name: NameArg,
    key_id: Annotated[Optional[str], typer.Option("--id", help="The new key's id (default: key-N).")] = None,
    json_out: JsonFlag = False,
) -> None:
    """Make a new key, apply it, and print its secret (once: keep it). Exit 5: no such deployment."""
    from mistral_deploy.gateway import check_key_id
    from mistral_deploy.keys import generate_api_key
    from mistral_deploy.state import StateStore

    out = Output(json_mode=json_out)
    store = StateStore()
    with store.changing(name):
        deployment = store.load(name)
        keys = store.read_keys(name)
        if key_id is None:
            n = len(keys) + 1
            while f"key-{n}" in keys:
                n += 1
            key_id = f"key-{n}"
        check_key_id(key_id)
        if key_id in keys:
            from mistral_deploy.errors import RecipeError

            raise RecipeError(f"--id: {name} already has a key {key_id!r}; revoke it first or pick another id")
        secret = generate_api_key()
        _apply(deployment, {**keys, key_id: secret}, store)
        created = time.time()
        deployment = store.load(name)
        deployment.details.setdefault("key_created", {})[key_id] = created
        store.save(deployment)
    if json_out:
        out.json({"name": name, "id": key_id, "key": secret, "created_at": created})
    else:
        out.info(f"{name}: key {key_id} added; it is shown once: keep it (`mistral-deploy env {name} --key "
                 f"{key_id}` exports it)")
        out.data(secret)


@keys_app.command("revoke")
def revoke(name: NameArg, key_id: Annotated[str, typer.Argument(help="The id of the key to revoke.")],
           json_out: JsonFlag = False) -> None:
    """Revoke a key: its next request is refused (401); a request it started finishes. The last key
    cannot be revoked (add another first). A service's replicas refuse it once the rolling update that
    carries the new key set is done: the command waits for it, or reports it pending. `probe` on a
    service: a new key for SkyServe's readiness probe. Exit 5: no such deployment."""
    from mistral_deploy.errors import RecipeError
    from mistral_deploy.gateway import PROBE_KEY_ID
    from mistral_deploy.state import StateStore

    out = Output(json_mode=json_out)
    store = StateStore()
    with store.changing(name):
        deployment = store.load(name)
        keys = store.read_keys(name)
        if key_id == PROBE_KEY_ID and deployment.backend == "serve" and key_id not in keys:
            from mistral_deploy.progress import Progress
            from mistral_deploy.serve import ServeBackend

            progress = Progress()
            try:
                ServeBackend().rotate_probe_key(deployment, store, progress)
            finally:
                progress.close()
            if json_out:
                out.json({"name": name, "revoked": key_id, "keys": list(keys), "rotated": True})
            return
        if key_id not in keys:
            raise RecipeError(f"{name} has no key {key_id!r}; its keys: {', '.join(keys) or 'none'}")
        if len(keys) == 1:
            raise RecipeError(f"{key_id} is {name}'s last key; add another first (`mistral-deploy keys add {name}`)")
        remaining = {k: v for k, v in keys.items() if k != key_id}
        _apply(deployment, remaining, store)
        deployment = store.load(name)
        (deployment.details.get("key_created") or {}).pop(key_id, None)
        store.save(deployment)
    if json_out:
        out.json({"name": name, "revoked": key_id, "keys": list(remaining)})
    else:
        out.info(f"{name}: key {key_id} revoked")


def _apply(deployment: "Deployment", keys: dict[str, str], store: "StateStore") -> None:
    """The gateway first, then the keys file: a key is listed as long as the gateway may accept it."""
    from mistral_deploy.backends import backend_named
    from mistral_deploy.progress import Progress

    progress = Progress()
    try:
        backend_named(deployment.backend).apply_keys(deployment, keys, store, progress)
    finally:
        progress.close()
    store.write_keys(deployment.name, keys)


def _when(timestamp: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(timestamp))
