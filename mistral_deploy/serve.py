"""The SkyServe backend: a deployment as a service, replicas behind SkyServe's load balancer.

Replicas run the single VM's stack (cloud.py): the engine on its Unix socket, the gateway checking every
request. SkyServe's controller launches, probes and replaces them; its load balancer is the endpoint.
Every SkyPilot call goes through skysdk.SkySdk.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, Callable, Iterator, Optional
from urllib.parse import urlsplit

from mistral_deploy.cloud import LOG_TAIL_LINES, _CloudBase, _ready_message, launch_secrets, resource_name
from mistral_deploy.errors import CloudError, MistralDeployError, NotReadyError, RecipeError
from mistral_deploy.gateway import PROBE_KEY_ID, hashes_for, hashes_secret, key_hash
from mistral_deploy.infra import check_gpus_offered, check_launchable
from mistral_deploy.keys import generate_api_key, generate_tls
from mistral_deploy.render import (KEY_HASHES_SECRET, NO_ADDRESS_YET, PROBE_KEY_SECRET, admit_load_balancer,
                                   cloud_config, render_task)
from mistral_deploy.skysdk import ServiceInfo
from mistral_deploy.state import Deployment

if TYPE_CHECKING:
    from mistral_deploy.converge import Plan
    from mistral_deploy.progress import Progress
    from mistral_deploy.recipe import Recipe
    from mistral_deploy.state import StateStore

# SkyServe replica states -> our phases.
_REPLICA_PHASES = {"PENDING": "provisioning", "PROVISIONING": "provisioning", "STARTING": "engine-start",
                   "READY": "ready"}
_SERVICE_FAILED = {"FAILED", "FAILED_CLEANUP", "CONTROLLER_FAILED", "NO_REPLICA", "SHUTTING_DOWN"}
# What a service with replicas.min: 0 does (SkyServe's autoscaler: no upscale delay from zero replicas,
# a decision every 20 s on what the load balancer reports every 20 s).
SCALED_TO_ZERO = ("no replica runs until a request comes: SkyServe launches one within about a minute of "
                  "the first request, and it serves once provisioned, its image pulled and the model loaded "
                  "(minutes on a fresh VM); the load balancer answers 503 until then")
_REPLICA_FAILED = {"FAILED", "FAILED_PROBING", "FAILED_PROVISION", "FAILED_INITIAL_DELAY", "FAILED_CLEANUP",
                   "FAILED_SETUP"}

class ServeBackend(_CloudBase):
    """A deployment as a SkyServe service: replicas behind SkyServe's load balancer (sky.serve.*).

    Each replica runs the same stack as a single VM (engine on 127.0.0.1, the gateway checking keys);
    the load balancer reaches replicas over plain HTTP, so TLS ends at the load balancer, with a
    certificate made here for the controller's address and pinned by clients.
    """

    kind = "serve"
    _ALIVE_EVERY = 15.0  # seconds between SkyServe status polls while waiting for readiness

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
            # for one token, at a low rate, and nothing else (gateway.js); revoked by its id, `probe`
            probe_key = generate_api_key()
            secrets[KEY_HASHES_SECRET] = hashes_secret({**hashes_for(keys), PROBE_KEY_ID: key_hash(probe_key)})
            secrets[PROBE_KEY_SECRET] = probe_key
            phase("provisioning", f"service {service_name}: controller and load balancer")
            # Replicas admit the load balancer alone, and its certificate names it: both need the
            # controller's address, known only once a controller runs.
            controller = self._controller_host()
            if recipe.tls_enabled:
                self._service_tls(task_config, store, deployment, controller)
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
                    self._service_tls(task_config, store, deployment, host)
                admit_load_balancer(task_config, [host])
                endpoint_url = sdk.serve_up(task_config, service_name=service_name, secrets=secrets,
                                            global_config=cloud_config(recipe), on_line=lambda _line: None)
            deployment.details["load_balancer"] = host
            from mistral_deploy.converge import estimate_price

            deployment.details["hourly_price"] = estimate_price(recipe)  # replicas and controller (catalog)
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

    # ------------------------------------------------------------------------------ changes in place
    def apply(self, deployment: Deployment, recipe: "Recipe", plan: "Plan", store: "StateStore",
              progress: "Progress") -> Deployment:
        """Every change of a service goes through `sky serve update` (rolling): SkyServe replaces the
        replicas one at a time, the load balancer keeps serving from the others."""
        self._check_service(recipe)
        self._update(deployment, recipe, store.read_keys(deployment.name), store, progress)
        deployment.recipe = recipe.to_yaml_config()
        store.save(deployment)
        return deployment

    def apply_keys(self, deployment: Deployment, keys: dict[str, str], store: "StateStore",
                   progress: "Progress") -> None:
        """Replicas get their keys' hashes as a SkyPilot secret: a new key set is a rolling update. A revoked
        key is refused by each replica once it is replaced (minutes, not the second of a single VM)."""
        self._update(deployment, deployment.recipe_model(), keys, store, progress)

    def _update(self, deployment: Deployment, recipe: "Recipe", keys: dict[str, str], store: "StateStore",
                progress: "Progress") -> None:
        from mistral_deploy.fit import check_fit

        check_fit(recipe)
        service_name = deployment.details["service"]
        task_config = render_task(recipe)
        tls_dir = store.dir(deployment.name) / "service-tls"
        if recipe.tls_enabled and (tls_dir / "key.pem").is_file():
            # the same certificate: clients keep the file they pinned
            task_config["service"]["tls"] = {"keyfile": str(tls_dir / "key.pem"), "certfile": str(tls_dir / "cert.pem")}
        admit_load_balancer(task_config, [deployment.details.get("load_balancer") or NO_ADDRESS_YET])
        probe_key = generate_api_key()  # the new version's readiness probe gets a key of its own
        secrets = {**launch_secrets(recipe),
                   KEY_HASHES_SECRET: hashes_secret({**hashes_for(keys), PROBE_KEY_ID: key_hash(probe_key)}),
                   PROBE_KEY_SECRET: probe_key}
        blue_green = recipe.replicas is not None and recipe.replicas.update == "blue-green"
        mode = "blue-green" if blue_green else "rolling"
        progress.phase("service-update", f"sky serve update {service_name} ({mode})")
        self.sdk.serve_update(task_config, service_name=service_name, secrets=secrets,
                              global_config=cloud_config(recipe), blue_green=blue_green)
        how = ("SkyServe switches to the new replicas once they are ready" if blue_green
               else "SkyServe replaces the replicas one at a time")
        progress.done(f"{deployment.name}: update submitted; {how} (`mistral-deploy status {deployment.name}` "
                      f"shows them)")

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
                     controller_host: Optional[str]) -> list[str]:
        """A certificate for the load balancer (SkyServe uploads key and certificate to the controller)."""
        # the controller's address, once known; before that a name no endpoint has, so it is re-issued
        hosts = [controller_host] if controller_host else ["localhost"]
        files = generate_tls(store.dir(deployment.name) / "service-tls", hosts, common_name=deployment.name)
        task_config["service"]["tls"] = {"keyfile": str(files.key), "certfile": str(files.cert)}
        deployment.tls_ca = str(files.ca_cert)
        return hosts

    def _alive_check(self, service_name: str, phase: Callable[[str, str], None]) -> Callable[[], bool]:
        """For the readiness wait: False once SkyServe gives up on the service; phases from replica states."""
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
            elif info.replicas and all(r.status in _REPLICA_FAILED for r in info.replicas):
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
        store.remove(deployment.name)
        progress.done(f"{deployment.name}: service {service} removed" if service else f"{deployment.name} removed")

    def status(self, deployment: Deployment) -> dict[str, Any]:
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
        if deployment.phase == "ready" and info is not None:
            healthy = self._probe(deployment.endpoint, deployment.tls_ca)
            if not healthy and info.status == "NO_REPLICA" and deployment.details.get("scaled_to_zero"):
                phase = "idle"  # scaled to zero: the next request wakes a replica
        elif deployment.phase == "ready" and service_status == "missing":
            phase = "gone"
        return {
            "name": deployment.name,
            "backend": self.kind,
            "phase": phase,
            "healthy": healthy,
            "endpoint": deployment.endpoint,
            "ip": urlsplit(deployment.endpoint).hostname if deployment.endpoint else None,
            "network": "public",
            "service": service,
            "service_status": service_status,
            "replicas": [{"id": r.replica_id, "status": r.status, "endpoint": r.endpoint}
                         for r in (info.replicas if info else ())],
            "tls_ca": deployment.tls_ca,
        }

    def logs(self, deployment: Deployment, *, follow: bool, lines: int) -> Iterator[str]:
        service = deployment.details.get("service")
        replica = self._first_replica(service) if service else None
        if replica is None:
            return iter(())
        return self.sdk.serve_logs(service, replica_id=replica, follow=follow, lines=lines)
