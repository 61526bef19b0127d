"""The SkyServe backend: a deployment as a service, replicas behind SkyServe's load balancer.

Replicas run the single VM's stack (cloud.py): the engine on its Unix socket, the gateway checking every
request. SkyServe's controller launches, probes and replaces them; its load balancer is the endpoint.
Every SkyPilot call goes through skysdk.SkySdk.

Where the load balancer runs, and so the one address each replica's gateway admits:
  controller VM        (SkyServe's default) the `sky-serve-controller-*` cluster, shared by all services;
                       its address is known once it runs: a first service is launched, then launched again
                       as `md-NAME-lb` once the address is known (before any replica serves)
  consolidation mode   (`serve.controller.consolidation_mode: true`) inside SkyPilot's API server: its
                       machine's addresses (this machine's for a local API server); SkyServe reports the
                       endpoint as localhost:PORT, reachable from that machine

Changes (keys, engine, replica counts) are `sky serve update`s. A change counts as applied once the new
version serves alone (SkyServe keeps old replicas until new ones are ready); until then it is recorded as a
rollout in progress, which `status` and `keys list` show, and a failed one stays visible as drift.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, Callable, Iterator, Optional
from urllib.parse import urlsplit

from mistral_deploy.cloud import LOG_TAIL_LINES, _CloudBase, _ready_message, launch_secrets, resource_name
from mistral_deploy.errors import CloudError, MistralDeployError, NotReadyError, RecipeError
from mistral_deploy.gateway import PROBE_KEY_ID, hashes_for, hashes_secret, key_hash
from mistral_deploy.infra import check_gpus_offered, check_launchable
from mistral_deploy.keys import generate_api_key, generate_tls, write_private
from mistral_deploy.render import (KEY_HASHES_SECRET, NO_ADDRESS_YET, PROBE_KEY_SECRET, admit_load_balancer,
                                   cloud_config, render_task)
from mistral_deploy.skysdk import LB_SYNC_SECONDS, ServiceInfo, host_addresses, resolve_addresses
from mistral_deploy.state import Deployment

if TYPE_CHECKING:
    from mistral_deploy.converge import Plan
    from mistral_deploy.progress import Progress
    from mistral_deploy.recipe import Recipe
    from mistral_deploy.state import StateStore

# SkyServe replica states -> our phases.
_REPLICA_PHASES = {"PENDING": "provisioning", "PROVISIONING": "provisioning", "STARTING": "engine-start",
                   "READY": "ready"}
# A service SkyServe gave up on. Not NO_REPLICA: SkyServe reports it whenever no replica is READY, while the
# first ones start too (sky/serve/serve_state.py, ServiceStatus.from_replica_statuses); the replicas say more.
_SERVICE_FAILED = {"FAILED", "FAILED_CLEANUP", "CONTROLLER_FAILED", "SHUTTING_DOWN"}
# What a service with replicas.min: 0 does (SkyServe's autoscaler: no upscale delay from zero replicas,
# a decision every 20 s on what the load balancer reports every 20 s).
SCALED_TO_ZERO = ("no replica runs until a request comes: SkyServe launches one within about a minute of "
                  "the first request, and it serves once provisioned, its image pulled and the model loaded "
                  "(minutes on a fresh VM); the load balancer answers 503 until then")
_REPLICA_FAILED = {"FAILED", "FAILED_PROBING", "FAILED_PROVISION", "FAILED_INITIAL_DELAY", "FAILED_CLEANUP",
                   "FAILED_SETUP", "FAILED_PROCESS"}
PROBE_KEY_FILE = "probe_key"  # the readiness probe's key, kept across updates (0600, beside api_keys)
LOCAL_NAMES = ["localhost", "127.0.0.1", "::1"]  # the load balancer of a local API server (consolidation)


def replica_failed(status: str) -> bool:
    return status in _REPLICA_FAILED or status.startswith("FAILED")


def _out_of_rotation(status: str) -> bool:
    """A replica SkyServe's load balancer no longer sends requests to, and never will again."""
    return status in ("SHUTTING_DOWN", "PREEMPTED") or replica_failed(status)


class ServeBackend(_CloudBase):
    """A deployment as a SkyServe service: replicas behind SkyServe's load balancer (sky.serve.*).

    Each replica runs the same stack as a single VM (engine on its Unix socket, the gateway checking keys);
    the load balancer reaches replicas over plain HTTP, so TLS ends at the load balancer, with a
    certificate made here for the load balancer's address and pinned by clients.
    """

    kind = "serve"
    _ALIVE_EVERY = 15.0  # seconds between SkyServe status polls while waiting for readiness
    _ROLLOUT_EVERY = 5.0  # seconds between polls while a new version rolls out
    _LB_SYNC_MARGIN = 10.0  # seconds past the load balancer's sync interval before old replicas count as gone
    _DOWN_WAIT = 900.0  # seconds `down` waits for SkyServe to remove the replicas and the service
    _ROLLOUT_UNREADABLE = 5  # polls in a row whose status could not be read before the wait gives up

    def up(self, recipe: "Recipe", store: "StateStore", progress: "Progress") -> Deployment:
        from mistral_deploy.fit import check_fit

        check_fit(recipe)
        self._check_service(recipe)
        task_config = render_task(recipe)
        sdk = self.sdk
        check_launchable(recipe, sdk)
        check_gpus_offered(recipe, sdk)
        secrets = launch_secrets(recipe)
        service_name = resource_name(recipe.name)
        deployment = self._reserve(recipe, store, {"service": service_name, "network": "public",
                                                   "last_phase": "provisioning"})

        def phase(name: str, detail: str = "") -> None:
            if deployment.details.get("last_phase") != name or detail:
                deployment.details["last_phase"] = name
                progress.phase(name, detail)

        try:
            keys = {f"key-{n}": generate_api_key() for n in range(1, recipe.auth.keys + 1)}
            store.write_keys(recipe.name, keys)
            deployment.details["key_created"] = {key_id: deployment.created_at for key_id in keys}
            # SkyServe's readiness probe sends its own key, from the service spec: the gateway lets it ask
            # for one token, at a low rate, and nothing else (gateway.js). Kept across updates (a new one
            # would change the task's secrets, and SkyServe would replace every replica for it)
            probe_key = generate_api_key()
            write_private(store.dir(recipe.name) / PROBE_KEY_FILE, probe_key + "\n")
            secrets[KEY_HASHES_SECRET] = hashes_secret({**hashes_for(keys), PROBE_KEY_ID: key_hash(probe_key)})
            secrets[PROBE_KEY_SECRET] = probe_key
            phase("provisioning", f"service {service_name}: controller and load balancer")
            consolidated = sdk.serve_consolidation_mode()
            if consolidated:
                endpoint_url, sources = self._up_consolidated(recipe, task_config, secrets, store, deployment)
            else:
                endpoint_url, sources = self._up_on_controller(recipe, task_config, secrets, store, deployment,
                                                               phase)
            service_name = deployment.details["service"]
            deployment.details["load_balancer"] = urlsplit(endpoint_url).hostname
            deployment.details["lb_sources"] = sources
            deployment.details["consolidation_mode"] = consolidated
            from mistral_deploy.converge import estimate_price

            deployment.details["hourly_price"] = estimate_price(recipe)  # its replicas (the controller: apart)
            deployment.endpoint = endpoint_url.rstrip("/") + "/v1"
            deployment.details["head_ip"] = urlsplit(endpoint_url).hostname
            store.save(deployment)
            if recipe.replicas is not None and recipe.replicas.min == 0:
                # scaled to zero: SkyServe's NO_REPLICA is the normal state; the first request wakes one
                deployment.phase = "ready"
                deployment.details.update(last_phase="ready", scaled_to_zero=True)
                store.save(deployment)
                progress.done(_ready_message(deployment) + "; " + SCALED_TO_ZERO)
                return deployment
            phase("provisioning", "replicas")

            from mistral_deploy import probe

            probe.wait_ready(
                deployment.endpoint, next(iter(keys.values())), recipe.served_model_name, ca_file=deployment.tls_ca,
                timeout=float(recipe.health.readiness_timeout), interval=recipe.health.probe_interval,
                alive=self._alive_check(service_name, phase), on_phase=lambda name: phase(name),
                task=probe.probe_task(recipe),
            )
            info = sdk.serve_status(service_name)
            if info is not None:
                deployment.details["replicas"] = len([r for r in info.replicas if r.status == "READY"])
                deployment.details["version"] = info.version
            deployment.phase = "ready"
            deployment.details["last_phase"] = "ready"
            store.save(deployment)
            progress.done(_ready_message(deployment))
            return deployment
        except NotReadyError as exc:
            tail = exc.log_tail or self._log_tail(deployment)
            self._fail(deployment, store, exc.message)
            raise NotReadyError(
                exc.message,
                hint=f"the service is kept for inspection: `mistral-deploy logs {recipe.name}`; "
                     f"`mistral-deploy down {recipe.name}` removes it",
                log_tail=tail,
            ) from None
        except KeyboardInterrupt:
            self._interrupted(deployment, store, progress, f"service {deployment.details['service']}")
            raise
        except MistralDeployError as exc:
            if store.dir(recipe.name).is_dir():
                self._fail(deployment, store, exc.message)
                if not exc.hint:
                    exc.hint = f"`mistral-deploy down {recipe.name}` removes what was created"
            raise
        except BaseException as exc:
            self._fail(deployment, store, f"{type(exc).__name__}: {exc}")
            raise

    def _up_on_controller(self, recipe: "Recipe", task_config: dict[str, Any], secrets: dict[str, str],
                          store: "StateStore", deployment: Deployment,
                          phase: Callable[[str, str], None]) -> tuple[str, list[str]]:
        """SkyServe's controller VM: its address, once it runs, is what replicas admit and the certificate
        names. A first service on a new controller is launched again under `md-NAME-lb` once it is known."""
        sdk = self.sdk
        service_name = deployment.details["service"]
        controller = self._controller_host()
        if recipe.tls_enabled:
            self._service_tls(task_config, store, deployment, [controller] if controller else ["localhost"])
        admit_load_balancer(task_config, [controller or NO_ADDRESS_YET])
        endpoint_url = sdk.serve_up(task_config, service_name=service_name, secrets=secrets,
                                    global_config=cloud_config(recipe), on_line=lambda _line: None)
        host = urlsplit(endpoint_url).hostname or ""
        if host != controller:
            # A new controller: its address was unknown when the replicas' gateways and the certificate
            # were made. Replicas are still provisioning, so start over under the same controller.
            phase("provisioning", f"admitting the load balancer at {host} (a new controller)")
            sdk.serve_down(service_name)
            service_name = resource_name(recipe.name) + "-lb"
            deployment.details["service"] = service_name
            store.save(deployment)
            if recipe.tls_enabled:
                self._service_tls(task_config, store, deployment, [host])
            admit_load_balancer(task_config, [host])
            endpoint_url = sdk.serve_up(task_config, service_name=service_name, secrets=secrets,
                                        global_config=cloud_config(recipe), on_line=lambda _line: None)
        return endpoint_url, [host]

    def _up_consolidated(self, recipe: "Recipe", task_config: dict[str, Any], secrets: dict[str, str],
                         store: "StateStore", deployment: Deployment) -> tuple[str, list[str]]:
        """Consolidation mode: the load balancer runs on the API server's machine. Its connections reach
        the replicas from that machine's addresses: this machine's own for a local API server, those its
        name resolves to for a remote one (behind NAT, replicas see the NAT's address: use a controller VM)."""
        sdk = self.sdk
        remote = sdk.api_server_host()
        sources = resolve_addresses(remote) if remote else host_addresses()
        if not sources:
            raise CloudError("serve.controller.consolidation_mode: the load balancer would run on this machine, "
                             "which has no address but loopback for the replicas to admit; unset it to use "
                             "SkyServe's controller VM")
        if recipe.tls_enabled:
            self._service_tls(task_config, store, deployment, [remote] if remote else LOCAL_NAMES)
        admit_load_balancer(task_config, sources)
        endpoint_url = sdk.serve_up(task_config, service_name=deployment.details["service"], secrets=secrets,
                                    global_config=cloud_config(recipe), on_line=lambda _line: None)
        split = urlsplit(endpoint_url)
        if remote and split.hostname in LOCAL_NAMES:
            # SkyServe names the API server's own machine localhost; from here it is the API server's host
            endpoint_url = split._replace(netloc=f"{remote}:{split.port}").geturl()
        return endpoint_url, sources

    # ------------------------------------------------------------------------------ changes in place
    def apply(self, deployment: Deployment, recipe: "Recipe", plan: "Plan", store: "StateStore",
              progress: "Progress") -> Deployment:
        """Every change of a service goes through `sky serve update` (rolling): SkyServe replaces the
        replicas one at a time, the load balancer keeps serving from the others. The recipe is recorded
        as applied once the new version serves alone; until then the rollout is recorded."""
        self._check_service(recipe)
        rollout = self._update(deployment, recipe, store.read_keys(deployment.name), store, progress,
                               what="recipe")
        if rollout["state"] == "done":
            deployment.recipe = recipe.to_yaml_config()
        store.save(deployment)
        self._report(deployment, rollout, progress)
        return deployment

    def apply_keys(self, deployment: Deployment, keys: dict[str, str], store: "StateStore",
                   progress: "Progress") -> None:
        """Replicas get their keys' hashes as a SkyPilot secret: a new key set is a rolling update. A revoked
        key is refused once no replica of an older version is left; until then the revoke is pending."""
        old = store.read_keys(deployment.name)
        rollout = self._update(deployment, self._target_recipe(deployment), keys, store, progress, what="keys",
                               revoked=sorted(set(old) - set(keys)))
        store.save(deployment)
        self._report(deployment, rollout, progress)

    def rotate_probe_key(self, deployment: Deployment, store: "StateStore", progress: "Progress") -> None:
        """A new key for SkyServe's readiness probe (the old one is refused once the rollout is done)."""
        write_private(store.dir(deployment.name) / PROBE_KEY_FILE, generate_api_key() + "\n")
        rollout = self._update(deployment, self._target_recipe(deployment), store.read_keys(deployment.name),
                               store, progress, what="probe key", revoked=[PROBE_KEY_ID])
        store.save(deployment)
        self._report(deployment, rollout, progress)

    @staticmethod
    def _target_recipe(deployment: Deployment) -> "Recipe":
        """The recipe a new version carries: a recipe still rolling out (not yet recorded), else the recorded one.
        A keys change during an engine change must not take the engine back."""
        pending = deployment.details.get("rollout") or {}
        if pending.get("recipe") and pending.get("state") != "failed":
            from mistral_deploy.recipe import Recipe

            return Recipe.model_validate(pending["recipe"])
        return deployment.recipe_model()

    def _probe_key(self, deployment: Deployment, store: "StateStore") -> str:
        path = store.dir(deployment.name) / PROBE_KEY_FILE
        try:
            return path.read_text().strip()
        except FileNotFoundError:  # a service made before the key was kept: one now, kept from here on
            key = generate_api_key()
            write_private(path, key + "\n")
            return key

    def _update(self, deployment: Deployment, recipe: "Recipe", keys: dict[str, str], store: "StateStore",
                progress: "Progress", *, what: str, revoked: Optional[list[str]] = None) -> dict[str, Any]:
        from mistral_deploy.fit import check_fit

        check_fit(recipe)
        service_name = deployment.details["service"]
        task_config = render_task(recipe)
        tls_dir = store.dir(deployment.name) / "service-tls"
        if recipe.tls_enabled and (tls_dir / "key.pem").is_file():
            # the same certificate: clients keep the file they pinned
            task_config["service"]["tls"] = {"keyfile": str(tls_dir / "key.pem"), "certfile": str(tls_dir / "cert.pem")}
        details = deployment.details
        admit_load_balancer(task_config, details.get("lb_sources") or [details.get("load_balancer") or NO_ADDRESS_YET])
        probe_key = self._probe_key(deployment, store)
        secrets = {**launch_secrets(recipe),
                   KEY_HASHES_SECRET: hashes_secret({**hashes_for(keys), PROBE_KEY_ID: key_hash(probe_key)}),
                   PROBE_KEY_SECRET: probe_key}
        blue_green = recipe.replicas is not None and recipe.replicas.update == "blue-green"
        mode = "blue-green" if blue_green else "rolling"
        progress.phase("service-update", f"sky serve update {service_name} ({mode})")
        self.sdk.serve_update(task_config, service_name=service_name, secrets=secrets,
                              global_config=cloud_config(recipe), blue_green=blue_green)
        try:
            info = self.sdk.serve_status(service_name)
        except CloudError:
            info = None  # submitted all the same: the rollout is recorded, its version read at the next look
        # a rollout still in progress is folded into this one: its old replicas are this one's old ones too
        earlier = details.get("rollout") if (details.get("rollout") or {}).get("state") == "rolling" else {}
        rollout: dict[str, Any] = {
            "version": info.version if info is not None else None, "what": what, "state": "rolling",
            "since": time.time(), "revoked": sorted(set(revoked or []) | set(earlier.get("revoked") or [])),
            "recipe": recipe.to_yaml_config() if what == "recipe" or earlier.get("recipe") else None,
        }
        details["rollout"] = rollout
        store.save(deployment)
        timeout = float(recipe.health.readiness_timeout)
        self._follow_rollout(deployment, store, progress, deadline=time.monotonic() + timeout)
        return details.get("rollout") or {**rollout, "state": "done"}

    def _follow_rollout(self, deployment: Deployment, store: "StateStore", progress: "Progress", *,
                        deadline: float) -> None:
        """Until the recorded rollout's version serves alone (done), fails, or the deadline passes."""
        last = ""
        unread = 0
        while True:
            out_since = (deployment.details.get("rollout") or {}).get("old_out_since")
            try:
                state, detail = self.rollout_state(deployment)
                unread = 0
            except CloudError as exc:
                # SkyServe's status can fail for a moment while replicas come and go: the rollout is still
                # recorded, `status` follows it; give up on the wait only when it stays unreadable
                unread += 1
                if unread >= self._ROLLOUT_UNREADABLE or time.monotonic() >= deadline:
                    raise
                state, detail = "rolling", f"SkyServe's status not read ({exc}); again in {self._ROLLOUT_EVERY:.0f}s"
            if detail != last:
                progress.phase("rollout", detail)
                last = detail
            if (deployment.details.get("rollout") or {}).get("old_out_since") != out_since:
                store.save(deployment)  # when the old replicas left the load balancer, for `status` too
            if state != "rolling":
                self._settle(deployment, store, state, detail)
                return
            if time.monotonic() >= deadline:
                return
            time.sleep(self._ROLLOUT_EVERY)

    def rollout_state(self, deployment: Deployment) -> tuple[str, str]:
        """The recorded rollout, as SkyServe's replicas say now: (rolling|done|failed, a line saying why)."""
        rollout = deployment.details.get("rollout")
        if not rollout:
            return "done", "no rollout in progress"
        version = rollout.get("version")
        info = self.sdk.serve_status(deployment.details["service"])
        if info is None:
            return "failed", f"service {deployment.details['service']} no longer exists"
        if version is None:  # the version was not known when the update was submitted: the latest one
            version = rollout["version"] = info.version
        new = [r for r in info.replicas if r.version is not None and version is not None and r.version >= version]
        old = [r for r in info.replicas if r not in new]
        ready = [r for r in new if r.status == "READY"]
        failed = [r for r in new if replica_failed(r.status)]
        if ready and not old:
            return "done", f"version {version} serves alone ({len(ready)} replica(s) ready)"
        if ready and all(_out_of_rotation(r.status) for r in old):
            # SkyServe drains a replica it scales down for 2 minutes before it removes it; its load balancer
            # stops sending it requests at its next sync with the controller (READY replicas only): once
            # that has passed, only the new version answers clients
            since = rollout.setdefault("old_out_since", time.time())
            left = since + LB_SYNC_SECONDS + self._LB_SYNC_MARGIN - time.time()
            if left <= 0:
                return "done", (f"version {version} serves alone ({len(ready)} replica(s) ready; the old ones are "
                                f"out of the load balancer, shutting down)")
            return "rolling", (f"version {version}: {len(ready)}/{len(new)} new replica(s) ready, the old ones "
                               f"shutting down (out of the load balancer at its next sync, within "
                               f"{LB_SYNC_SECONDS + self._LB_SYNC_MARGIN:.0f}s)")
        rollout.pop("old_out_since", None)
        if new and len(failed) == len(new) and not ready:
            states = ", ".join(f"replica {r.replica_id} {r.status}" for r in failed)
            return "failed", (f"version {version} failed ({states}); "
                              f"{len([r for r in old if r.status == 'READY'])} replica(s) of the old version serve")
        return "rolling", (f"version {version}: {len(ready)}/{len(new) or '?'} new replica(s) ready, "
                           f"{len(old)} old still up ({', '.join(sorted({r.status for r in old})) or '-'})")

    def _settle(self, deployment: Deployment, store: "StateStore", state: str, detail: str) -> None:
        rollout = deployment.details.get("rollout") or {}
        if state == "done":
            if rollout.get("recipe"):
                deployment.recipe = rollout["recipe"]
            deployment.details["version"] = rollout.get("version")
            deployment.details.pop("rollout", None)
        else:
            rollout.update(state=state, detail=detail)
        store.save(deployment)

    def refresh_rollout(self, deployment: Deployment, store: "StateStore") -> Optional[dict[str, Any]]:
        """For `status` and `keys list`: settle a recorded rollout that ended; the rollout if one remains."""
        rollout = deployment.details.get("rollout")
        if not rollout or rollout.get("state") == "failed":
            return rollout
        out_since = rollout.get("old_out_since")
        try:
            state, detail = self.rollout_state(deployment)
        except CloudError:
            return rollout
        if state != "rolling":
            self._settle(deployment, store, state, detail)
        else:
            rollout["detail"] = detail
            if rollout.get("old_out_since") != out_since:
                store.save(deployment)  # when the old replicas were first seen out of the load balancer
        return deployment.details.get("rollout")

    def _report(self, deployment: Deployment, rollout: dict[str, Any], progress: "Progress") -> None:
        current = deployment.details.get("rollout")
        what = rollout.get("what")
        if current is None:
            revoked = rollout.get("revoked") or []
            also = f"; {', '.join(revoked)} refused by every replica the load balancer sends to" if revoked else ""
            progress.done(f"{deployment.name}: {what} applied, version {rollout.get('version')} serves alone{also}")
        elif current.get("state") == "failed":
            raise CloudError(f"{deployment.name}: the update ({what}) failed: {current.get('detail')}",
                             hint=f"`mistral-deploy logs {deployment.name}` shows a replica's log; "
                                  f"`mistral-deploy status {deployment.name}` shows the drift")
        else:
            revoked = current.get("revoked") or []
            pending = f"; {', '.join(revoked)} still accepted by old replicas until then" if revoked else ""
            progress.done(f"{deployment.name}: {what} update pending ({current.get('detail')}){pending}; "
                          f"`mistral-deploy status {deployment.name}` follows it")

    @staticmethod
    def _check_service(recipe: "Recipe") -> None:
        if recipe.lifetime.ttl:
            raise RecipeError(
                "lifetime.ttl: a SkyServe service would relaunch replicas that autostop; "
                "remove --ttl, or deploy one VM without replicas")
        if set(recipe.network.allow) != {"0.0.0.0/0", "::/0"}:
            raise RecipeError(
                "network.allow: SkyServe's load balancer does not pass client addresses to replicas, so a "
                "service cannot restrict source CIDRs; deploy one VM (no replicas) to restrict them")

    def _controller_host(self) -> Optional[str]:
        try:
            return self.sdk.serve_controller_host()
        except CloudError:
            return None  # no controller yet

    def _service_tls(self, task_config: dict[str, Any], store: "StateStore", deployment: Deployment,
                     hosts: list[str]) -> None:
        """A certificate for the load balancer (SkyServe hands key and certificate to the load balancer)."""
        files = generate_tls(store.dir(deployment.name) / "service-tls", hosts, common_name=deployment.name)
        task_config["service"]["tls"] = {"keyfile": str(files.key), "certfile": str(files.cert)}
        deployment.tls_ca = str(files.ca_cert)

    def _alive_check(self, service_name: str, phase: Callable[[str, str], None]) -> Callable[[], bool]:
        """For the readiness wait: False once SkyServe gives up on the service or on every replica; the
        phase from the replicas' states (the service's own status says NO_REPLICA until one is READY)."""
        last = {"at": 0.0, "alive": True}

        def alive() -> bool:
            now = time.monotonic()
            if now - last["at"] < self._ALIVE_EVERY:
                return bool(last["alive"])
            last["at"] = now
            try:
                info = self.sdk.serve_status(service_name)
            except CloudError:
                return True  # cannot tell; the readiness timeout still bounds the wait
            if info is None or info.status in _SERVICE_FAILED:
                last["alive"] = False
            elif info.replicas and all(replica_failed(r.status) for r in info.replicas):
                last["alive"] = False
            else:
                states = [r.status for r in info.replicas]
                for state in ("READY", "STARTING", "PROVISIONING", "PENDING"):
                    if state in states:
                        phase(_REPLICA_PHASES[state], f"{states.count(state)}/{len(states)} replicas {state.lower()}")
                        break
            return bool(last["alive"])

        return alive

    def _first_replica(self, service_name: str) -> Optional[int]:
        info = self.sdk.serve_status(service_name)
        if info is None or not info.replicas:
            return None
        ready = [r for r in info.replicas if r.status == "READY"]
        return (ready or list(info.replicas))[0].replica_id

    def _log_tail(self, deployment: Deployment) -> str:
        try:
            service = deployment.details["service"]
            replica = self._first_replica(service)
            if replica is None:
                return ""
            lines = list(self.sdk.serve_logs(service, replica_id=replica, follow=False, lines=LOG_TAIL_LINES))
        except (CloudError, KeyError):
            return ""
        return "\n".join(lines[-LOG_TAIL_LINES:])

    def down(self, deployment: Deployment, store: "StateStore", progress: "Progress") -> None:
        service = deployment.details.get("service")
        if service:
            progress.phase("teardown", f"sky serve down {service}")
            self.sdk.serve_down(service)
            self._wait_gone(deployment, service, progress)
        store.remove(deployment.name)
        progress.done(f"{deployment.name}: service {service} removed" if service else f"{deployment.name} removed")

    def _wait_gone(self, deployment: Deployment, service: str, progress: "Progress") -> None:
        """`sky serve down` returns once SkyServe is told; its controller then drains and removes the
        replicas and the service: wait until SkyServe lists it no more (a replica still up still costs)."""
        deadline = time.monotonic() + self._DOWN_WAIT
        last, unread = "", 0
        while True:
            try:
                info = self.sdk.serve_status(service)
                unread = 0
                if info is None:
                    return
                states = ", ".join(f"replica {r.replica_id} {r.status}" for r in info.replicas) or "no replica left"
                detail = f"service {service} {info.status}: {states}"
                if detail != last:
                    progress.phase("teardown", detail)
                    last = detail
            except CloudError:
                unread += 1  # SkyServe's status races with the removal of a replica: ask again
                if unread >= self._ROLLOUT_UNREADABLE:
                    raise
            if time.monotonic() >= deadline:
                raise CloudError(f"service {service} is still shutting down after {self._DOWN_WAIT:.0f}s",
                                 hint=f"`mistral-deploy down {deployment.name}` again waits for it; "
                                      f"`sky serve status {service}` shows its replicas")
            time.sleep(self._ROLLOUT_EVERY)

    def status(self, deployment: Deployment, store: Optional["StateStore"] = None) -> dict[str, Any]:
        service = deployment.details.get("service")
        info: Optional[ServiceInfo] = None
        service_status = "unknown"
        try:
            info = self.sdk.serve_status(service) if service else None
            service_status = info.status if info else "missing"
        except CloudError as exc:
            service_status = f"unknown ({exc.message})"
        healthy = False
        phase = deployment.phase
        warning = None
        if deployment.phase == "ready" and info is not None:
            ready = any(r.status == "READY" for r in info.replicas)
            if deployment.details.get("scaled_to_zero") and not ready:
                # Scaled to zero: no health check. SkyServe's autoscaler counts every request the load
                # balancer gets, so a check would wake a replica (a GPU VM) by itself: seen on the bed
                # (benchmarks/serve_scale_to_zero.py). The next client request wakes one.
                phase = "idle"
                waking = [r for r in info.replicas if r.status in ("PENDING", "PROVISIONING", "STARTING")]
                warning = (f"a replica is starting ({', '.join(f'{r.replica_id} {r.status}' for r in waking)}): the "
                           "load balancer answers 503 until it is ready" if waking else
                           "no replica runs (min: 0): the load balancer answers 503 until the replica the first "
                           "request wakes is ready")
            else:
                healthy = self._probe(deployment.endpoint, deployment.tls_ca)
        elif deployment.phase == "ready" and service_status == "missing":
            phase = "gone"
        rollout = None
        if info is not None and deployment.details.get("rollout"):
            if store is None:
                from mistral_deploy.state import StateStore

                store = StateStore()
            rollout = self.refresh_rollout(deployment, store)
            if rollout and rollout.get("state") == "failed":
                warning = (f"drift: the last update ({rollout.get('what')}) failed and the old version serves: "
                           f"{rollout.get('detail')}; `mistral-deploy up` with the recipe tries again")
            elif rollout:
                revoked = rollout.get("revoked") or []
                also = f"; {', '.join(revoked)} still accepted by old replicas" if revoked else ""
                warning = f"update ({rollout.get('what')}) rolling out: {rollout.get('detail')}{also}"
        failed = [r for r in (info.replicas if info else ()) if replica_failed(r.status)]
        lost = [r for r in (info.replicas if info else ()) if r.status in ("NOT_READY", "PREEMPTED", "UNKNOWN")]
        if (failed or lost) and warning is None:
            warning = ("replicas " + ", ".join(f"{r.replica_id} {r.status}" for r in failed + lost)
                       + ": SkyServe replaces them; the load balancer serves from the ready ones")
        row = {
            "name": deployment.name,
            "backend": self.kind,
            "phase": phase,
            "healthy": healthy,
            "endpoint": deployment.endpoint,
            "ip": urlsplit(deployment.endpoint).hostname if deployment.endpoint else None,
            "network": "public",
            "service": service,
            "service_status": service_status,
            "version": info.version if info else deployment.details.get("version"),
            "replicas": [{"id": r.replica_id, "status": r.status, "endpoint": r.endpoint, "version": r.version,
                          "spot": r.is_spot}
                         for r in (info.replicas if info else ())],
            "rollout": rollout,
            "tls_ca": deployment.tls_ca,
        }
        if warning:
            row["warning"] = warning
        return row

    def logs(self, deployment: Deployment, *, follow: bool, lines: int) -> Iterator[str]:
        service = deployment.details.get("service")
        replica = self._first_replica(service) if service else None
        if replica is None:
            return iter(())
        return self.sdk.serve_logs(service, replica_id=replica, follow=follow, lines=lines)
