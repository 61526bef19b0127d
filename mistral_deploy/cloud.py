"""Cloud backends: one SkyPilot cluster per deployment (`cloud`), or a SkyServe service (`serve`).

Both follow the local backend's contract (backends.Backend): the record is reserved before anything is
created, so Ctrl-C or a crash leaves a deployment that `down` can clean; `up` returns only once the
same readiness probe as locally (an authenticated one-token completion) succeeds against the endpoint.

Every SkyPilot call goes through skysdk.SkySdk; this module holds the logic only.

How each network mode is reached from here:
  public   the gateway port opened by SkyPilot (`sky.endpoints`), TLS pinned to the VM's certificate
  private  nothing opened; an SSH tunnel (SkyPilot's SSH access) to 127.0.0.1 on the VM
  vpc      the cluster's private address (only from inside the VPC)

The VM's TLS certificate is made on the VM by the setup script (its private key never leaves the VM);
`up` reads the certificate (a public file) over SkyPilot's SSH access once setup is done and stores it
as the CA clients pin.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import threading
import time
from collections import deque
from typing import TYPE_CHECKING, Any, Callable, Iterator, Optional
from urllib.parse import urlsplit

from mistral_deploy.errors import CloudError, MistralDeployError, NotReadyError
from mistral_deploy.failures import explain
from mistral_deploy.gateway import hashes_for, hashes_secret
from mistral_deploy.infra import check_gpus_offered, check_launchable
from mistral_deploy.keys import generate_api_key, hf_token_secret, write_private
from mistral_deploy.progress import PhaseClock
from mistral_deploy.render import (
    hf_token_file,
    HF_TOKEN_SECRET,
    KEY_HASHES_SECRET,
    VM_STATE_DIR,
    cloud_config,
    from_hub,
    render_task,
    vm_gateway_tls,
)
from mistral_deploy.skysdk import ClusterInfo, SkySdk, Tunnel, free_port, get_sdk
from mistral_deploy.state import Deployment

if TYPE_CHECKING:
    from mistral_deploy.serve import ServeBackend
    from mistral_deploy.converge import Plan
    from mistral_deploy.progress import Progress
    from mistral_deploy.recipe import Recipe
    from mistral_deploy.state import StateStore

NAME_PREFIX = "md-"  # SkyPilot cluster and service names: md-<deployment>
# The certificate the setup script makes on the VM (setup.sh.j2); public, unlike the key beside it.
VM_CERT_PATH = VM_STATE_DIR.replace("$HOME", "~") + "/gateway/tls/cert.pem"
CA_FILE = "tls/ca.pem"  # under the deployment's folder
LOG_TAIL_LINES = 40
_PHASE_RE = re.compile(r"mistral-deploy: phase ([a-z][a-z-]*)")
# What the download container says (templates/download_model.py): the exact commit the VM got.
_DOWNLOADED_RE = re.compile(r"mistral-deploy: downloaded \S+ at ([0-9a-f]{40}) ")
# The engine's own lines (vLLM 0.32) that start a phase of `up`: the weights load, then the warm-up
# (profiling, KV cache, CUDA graphs) until the server answers.
_ENGINE_PHASES = ((re.compile(r"Starting to load model"), "weights"),
                  (re.compile(r"Loading weights took|Model loading took"), "warmup"))
# SkyPilot's lines once the VM is provisioned: runtime and our setup follow.
_SKY_SETUP_MARKERS = ("Cluster launched", "Running setup", "Setup detached", "Job submitted")
# Phases the run script reaches only once setup (image pulls, TLS certificate) is done.
_RUN_PHASES = ("weights-download", "engine-start", "weights")



def pinned_to_commit(recipe: "Recipe", deployment: Deployment) -> "Recipe":
    """The recipe to launch again for a running deployment: the Hub commit it serves (recorded at its first
    download) unless the recipe moves to another revision; the recipe itself keeps what the user wrote."""
    commit = deployment.details.get("model_commit")
    recorded = deployment.recipe.get("model", {})
    moved = (recipe.model.id != recorded.get("id") or recipe.model.revision != recorded.get("revision")
             or recipe.model.source != recorded.get("source"))
    return recipe if moved else _with_revision(recipe, commit)


def _with_revision(recipe: "Recipe", commit: Optional[str]) -> "Recipe":
    if not commit or recipe.model.source or recipe.model.revision == commit:
        return recipe
    return recipe.model_copy(update={"model": recipe.model.model_copy(update={"revision": commit})})


def _all_nodes(instance_price: Optional[float], recipe: "Recipe") -> Optional[float]:
    """The cluster's price per hour from its instance's: every node of a model across several."""
    return None if instance_price is None else instance_price * recipe.resources.num_nodes


def resource_name(deployment_name: str) -> str:
    return NAME_PREFIX + deployment_name


def launch_secrets(recipe: "Recipe") -> dict[str, str]:
    """Secrets other than the API keys: the Hugging Face token, from the user's environment."""
    return hf_token_secret(recipe)


def _scheme(tls: bool) -> str:
    return "https" if tls else "http"


class _JobLog:
    """The job's log, followed in a thread: phases from our scripts' markers, and the last lines."""

    REOPEN_AFTER = 2.0  # seconds before following again a stream that ended while the job runs

    def __init__(self, on_phase: Callable[[str, str], None]) -> None:
        self._on_phase = on_phase
        self.lines: deque[str] = deque(maxlen=400)
        self.phases: list[str] = []
        self.commit: Optional[str] = None  # the Hub commit the download container fetched
        self.ended = threading.Event()  # the job's log ended: setup failed, or the run script exited
        self.failed: Optional[BaseException] = None  # following broke (the job may still run)
        self.stop = threading.Event()
        self._changed = threading.Condition()
        self._thread: Optional[threading.Thread] = None

    def feed(self, line: str) -> None:
        self.lines.append(line)
        downloaded = _DOWNLOADED_RE.search(line)
        if downloaded:
            self.commit = downloaded.group(1)
        match = _PHASE_RE.search(line)
        phase = match.group(1) if match else next((p for rx, p in _ENGINE_PHASES if rx.search(line)), None)
        if phase and phase not in self.phases:
            with self._changed:
                self.phases.append(phase)
                self._changed.notify_all()
            self._on_phase(phase, "")

    def follow(self, open_lines: Callable[[], Iterator[str]], job_finished: Callable[[], bool]) -> None:
        """Follow the job's log until the job ends. SkyPilot's log stream can end while the job still
        runs (seen on Slurm during setup): then it is opened again, skipping the lines already read."""

        def run() -> None:
            seen = 0
            try:
                while not self.stop.is_set():
                    count = 0
                    for line in open_lines():
                        count += 1
                        if count <= seen:
                            continue
                        seen = count
                        self.feed(line)
                        if self.stop.is_set():
                            return
                    if self.stop.is_set():
                        return
                    if job_finished():
                        break
                    self.stop.wait(self.REOPEN_AFTER)
                else:
                    return
                self.ended.set()
            except BaseException as exc:  # noqa: BLE001 - reported through `failed`
                self.failed = exc
            finally:
                with self._changed:
                    self._changed.notify_all()

        self._thread = threading.Thread(target=run, name="job-log", daemon=True)
        self._thread.start()

    def wait_for(self, phases: tuple[str, ...], deadline: float) -> bool:
        """Until one of `phases` was seen (True), or the log ended or the deadline passed (False)."""
        with self._changed:
            while True:
                if any(p in self.phases for p in phases):
                    return True
                if self.ended.is_set() or self.failed is not None:
                    return False
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._changed.wait(min(left, 1.0))

    def alive(self) -> bool:
        return not self.ended.is_set()

    def tail(self, n: int = LOG_TAIL_LINES) -> str:
        return "\n".join(list(self.lines)[-n:])

    def close(self) -> None:
        self.stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2)


class _CloudBase:
    kind = "cloud"

    def __init__(self, sdk: Optional[SkySdk] = None) -> None:
        self._sdk = sdk

    @property
    def sdk(self) -> SkySdk:
        return self._sdk if self._sdk is not None else get_sdk()

    def _reserve(self, recipe: "Recipe", store: "StateStore", details: dict[str, Any]) -> Deployment:
        deployment = Deployment(name=recipe.name, backend=self.kind, recipe=recipe.to_yaml_config(),
                                details=details)
        store.reserve(deployment)
        return deployment

    def _fail(self, deployment: Deployment, store: "StateStore", error: str) -> None:
        deployment.phase = "failed"
        deployment.details["error"] = error
        try:
            store.save(deployment)
        except MistralDeployError:
            pass  # removed meanwhile by a concurrent `down`

    def _interrupted(self, deployment: Deployment, store: "StateStore", progress: "Progress", what: str) -> None:
        self._fail(deployment, store, f"interrupted during {deployment.details.get('last_phase', 'up')}")
        progress.fail(
            f"interrupted: the {what} may exist; `mistral-deploy down {deployment.name}` removes it"
        )

    def _store_ca(self, store: "StateStore", name: str, pem: str) -> str:
        _check_certificate(pem)
        path = store.dir(name) / CA_FILE
        write_private(path, pem if pem.endswith("\n") else pem + "\n")
        os.chmod(path, 0o644)  # a certificate is public; clients read it
        return str(path)

    @staticmethod
    def _probe(endpoint: Optional[str], ca_file: Optional[str]) -> bool:
        if not endpoint:
            return False
        from mistral_deploy import probe

        try:
            return bool(probe.check_health(endpoint, ca_file=ca_file))
        except Exception:  # noqa: BLE001 - status reports unhealthy, it does not fail
            return False


class CloudBackend(_CloudBase):
    """A deployment on one SkyPilot cluster (sky.launch / status / endpoints / down / tail_logs)."""

    kind = "cloud"
    _CERT_RETRY = 10.0  # seconds between certificate reads when the job's log cannot be followed

    def up(self, recipe: "Recipe", store: "StateStore", progress: "Progress",
           keys: Optional[dict[str, str]] = None, model_commit: Optional[str] = None) -> Deployment:
        """keys: the API keys to serve with (a deployment made again after its cluster vanished keeps its
        keys); new ones by default. model_commit: the Hub commit it served, loaded again (the same)."""
        from mistral_deploy.fit import check_fit

        clock = PhaseClock()
        clock.enter("checks")  # ours, before SkyPilot's launch: fit, rendering, what the clouds can do
        check_fit(recipe)
        task_config = render_task(_with_revision(recipe, model_commit))
        sdk = self.sdk
        check_launchable(recipe, sdk)  # what the clouds cannot do, said before anything exists
        check_gpus_offered(recipe, sdk)
        # so is a missing HF_TOKEN; a single VM gets it over SSH once its job runs, not as a SkyPilot secret
        hf_token = launch_secrets(recipe).get(HF_TOKEN_SECRET)
        # and out of this process's environment, which a SkyPilot API server started from here would inherit
        os.environ.pop(HF_TOKEN_SECRET, None)
        secrets: dict[str, str] = {}
        cluster_name = resource_name(recipe.name)
        mode = recipe.network.mode
        deployment = self._reserve(recipe, store, {"cluster": cluster_name, "network": mode,
                                                   "last_phase": "provisioning"})
        held: dict[str, Any] = {}  # the job log's follower and the tunnel, closed at the end

        lock = threading.Lock()  # phases come from the job-log thread and from the probe

        def phase(name: str, detail: str = "") -> None:
            with lock:
                deployment.details["last_phase"] = name
                clock.enter(name)
                progress.phase(name, detail)

        try:
            keys = keys or {f"key-{n}": generate_api_key() for n in range(1, recipe.auth.keys + 1)}
            store.write_keys(recipe.name, keys)
            deployment.details["key_created"] = {key_id: deployment.created_at for key_id in keys}
            # the VM receives only the keys' hashes: nothing SkyPilot stores or ships can call the endpoint
            secrets[KEY_HASHES_SECRET] = hashes_secret(hashes_for(keys))
            where = ", then ".join(recipe.resources.clouds) or "the cheapest enabled cloud"
            phase("provisioning", f"{cluster_name} on {where}")

            def on_sky_line(line: str) -> None:
                # SkyPilot's own progress lines (sky/backends/cloud_vm_ray_backend.py, provisioner.py)
                if deployment.details.get("last_phase") != "provisioning":
                    return
                if any(marker in line for marker in _SKY_SETUP_MARKERS):
                    phase("setup", line)
                elif "Launching on" in line:
                    phase("provisioning", line)

            launch_started = time.monotonic()
            try:
                result = sdk.launch(task_config, cluster_name=cluster_name, secrets=secrets,
                                    global_config=cloud_config(recipe), on_line=on_sky_line)
            except CloudError as exc:
                self._after_failed_launch(deployment, store, cluster_name, exc)
                raise
            # SkyPilot's own part: provisioning, its runtime on the node, the job submitted
            deployment.details["launch_seconds"] = round(time.monotonic() - launch_started, 2)
            cluster = result.cluster
            price = _all_nodes(sdk.hourly_price(cluster), recipe)
            deployment.details.update(_cluster_details(cluster), job_id=result.job_id, hourly_price=price,
                                      ends_at=_ends_at(recipe))
            store.save(deployment)
            if deployment.details["last_phase"] == "provisioning":
                phase("setup", f"{cluster.instance_type or ''} in {cluster.cloud}/{cluster.region}".strip())

            self._until_ready(recipe, deployment, store, cluster, result.job_id, hf_token,
                              next(iter(keys.values())), phase, held)
            deployment.phase = "ready"
            deployment.details["last_phase"] = "ready"
            deployment.details.update(phases=clock.times(), up_seconds=clock.total())
            store.save(deployment)
            progress.done(_ready_message(deployment))
            return deployment
        except NotReadyError as exc:
            tail = exc.log_tail or (held["job_log"].tail() if "job_log" in held else "") or self._log_tail(deployment)
            message = explain(tail) or exc.message
            deployment.details.update(phases=clock.times(), up_seconds=clock.total())
            self._fail(deployment, store, message)
            raise NotReadyError(
                message,
                hint=f"the cluster is kept for inspection: `mistral-deploy logs {recipe.name}`; "
                     f"`mistral-deploy down {recipe.name}` removes it",
                log_tail=tail,
            ) from None
        except KeyboardInterrupt:
            self._interrupted(deployment, store, progress, f"cluster {cluster_name}")
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
        finally:
            _close(held)

    def _until_ready(self, recipe: "Recipe", deployment: Deployment, store: "StateStore", cluster: ClusterInfo,
                     job_id: Optional[int], hf_token: Optional[str], key: str, phase: Callable[..., None],
                     held: dict[str, Any]) -> None:
        """From a submitted serving job to an endpoint that answers: follow the job's log for its phases,
        hand over the Hugging Face token, fetch and pin the VM's certificate, connect (a tunnel in private
        mode), probe. `held` gets the job log follower and the tunnel, for the caller to close."""
        sdk = self.sdk
        cluster_name = cluster.name
        job_log = held["job_log"] = _JobLog(lambda name, detail: phase(name, detail))
        job_log.follow(lambda: sdk.tail_job(cluster_name, job_id, follow=True, stop=job_log.stop),
                       lambda: sdk.job_finished(cluster_name, job_id))
        deadline = time.monotonic() + recipe.health.readiness_timeout
        # the gateway and its certificate exist once setup is done and the run script has started
        started = job_log.wait_for(_RUN_PHASES, deadline)
        if not started and job_log.failed is None:
            raise NotReadyError(f"setup did not finish on {cluster_name}", log_tail=job_log.tail())
        if hf_token:
            # the run script waits for it (phase weights-download), hands it to the download container
            # and deletes it; it never passes through SkyPilot. Each node of a multi-node cluster downloads.
            for node in range(recipe.resources.num_nodes):
                sdk.write_head_file(cluster_name, hf_token_file(node), f"{HF_TOKEN_SECRET}={hf_token}\n", node=node)
        tls = vm_gateway_tls(recipe)
        if tls:
            pem = self._vm_certificate(cluster_name, started, deadline)
            deployment.tls_ca = self._store_ca(store, recipe.name, pem)

        recorded_port = deployment.details.get("tunnel_port")
        endpoint, tunnel = self._connect(recipe, cluster, tls, recorded_port)
        held["tunnel"] = tunnel
        if recipe.network.mode == "private" and recorded_port:
            # a change applied in place: the endpoint keeps its URL (`mistral-deploy tunnel` may hold that
            # port right now; then the probe goes through a tunnel of its own)
            deployment.endpoint = f"{_scheme(tls)}://127.0.0.1:{recorded_port}/v1"
        else:
            if recipe.network.mode == "private":
                deployment.details["tunnel_port"] = tunnel.local_port if tunnel else None
            deployment.endpoint = endpoint
        store.save(deployment)

        from mistral_deploy import probe

        probe.wait_ready(
            endpoint, key, recipe.served_model_name, ca_file=deployment.tls_ca,
            timeout=max(1.0, deadline - time.monotonic()), interval=recipe.health.probe_interval,
            alive=job_log.alive, task=probe.probe_task(recipe),
            # the job's log says how far the engine is; the probe's first step only says it is probing
            on_phase=lambda name: name != probe.STEP_HEALTH and phase(name),
        )
        if job_log.commit:  # the exact weights served: kept for every later start (pinned_to_commit)
            deployment.details["model_commit"] = job_log.commit
        elif not from_hub(recipe):  # a built-in model, a path, a bucket (up records its commit)
            deployment.details.pop("model_commit", None)

    # ------------------------------------------------------------------------------ changes in place
    def apply(self, deployment: Deployment, recipe: "Recipe", plan: "Plan", store: "StateStore",
              progress: "Progress") -> Deployment:
        """Take a running deployment to `recipe` the cheapest way (converge.Plan): the TTL set again, a
        gateway reload over SSH, the serving job replaced on the same cluster (same address, keys and
        certificate), or a new cluster switched to. A serving job that ended is started again too."""
        details = deployment.details
        cluster_name = details.get("cluster") or resource_name(deployment.name)
        sdk = self.sdk
        info = sdk.cluster(cluster_name, refresh=True)
        if info is None or info.status != "UP":
            state = info.status if info else "gone (its TTL, `sky down`, or the cloud removed it)"
            raise CloudError(f"cluster {cluster_name} is {state}: nothing to change in place",
                             hint=f"`mistral-deploy down {deployment.name}`, then `mistral-deploy up` again")
        if plan.needs("new-cluster"):
            return self._replace(deployment, recipe, store, progress)
        job_ended = sdk.job_finished(cluster_name, details.get("job_id"))
        if plan.needs("engine-restart") or job_ended or deployment.phase != "ready":
            return self._restart_job(deployment, recipe, plan, info, store, progress, job_ended=job_ended)
        if plan.needs("gateway-reload"):
            from mistral_deploy.render import render_gateway_reload

            progress.phase("gateway-reload", f"nginx on {cluster_name} re-reads its configuration")
            sdk.run_on_head(cluster_name, render_gateway_reload(recipe, config=True))
        if plan.needs("ttl"):
            self._set_ttl(deployment, recipe.lifetime.ttl, progress)
        deployment.recipe = recipe.to_yaml_config()
        store.save(deployment)
        self._reprobe(deployment, recipe, store, progress)
        return deployment

    def _reprobe(self, deployment: Deployment, recipe: "Recipe", store: "StateStore", progress: "Progress") -> None:
        """After a change that restarted nothing: the endpoint still answers an authenticated completion."""
        from mistral_deploy import probe

        key = next(iter(store.read_keys(deployment.name).values()))
        tunnel = None
        endpoint = deployment.endpoint or ""
        try:
            if recipe.network.mode == "private":
                tunnel = self.open_tunnel(deployment, local_port=free_port())
                endpoint = f"{_scheme(vm_gateway_tls(recipe))}://127.0.0.1:{tunnel.local_port}/v1"
            probe.wait_ready(endpoint, key, recipe.served_model_name, ca_file=deployment.tls_ca, timeout=60.0,
                             interval=1.0, task=probe.probe_task(recipe))
        finally:
            if tunnel is not None:
                tunnel.close()
        progress.done(_ready_message(deployment))

    def _restart_job(self, deployment: Deployment, recipe: "Recipe", plan: "Plan", cluster: ClusterInfo,
                     store: "StateStore", progress: "Progress", *, job_ended: bool) -> Deployment:
        """The serving job holds the GPU: cancel it, then launch the new task on the same cluster (setup
        runs again and keeps the VM's certificate; the run script gets the same keys' hashes)."""
        from mistral_deploy.fit import check_fit
        from mistral_deploy.recipe import LifetimeSpec

        check_fit(recipe)
        details = deployment.details
        cluster_name = cluster.name
        hf_token = launch_secrets(recipe).get(HF_TOKEN_SECRET)
        os.environ.pop(HF_TOKEN_SECRET, None)
        # the end time stays where it was unless the TTL itself changed: SkyPilot counts from the launch
        ends_at = details.get("ends_at")
        if plan.needs("ttl") or not ends_at:
            ends_at = _ends_at(recipe)
        left = None if ends_at is None else max(60, math.ceil(ends_at - time.time()))
        # on the same cluster: no TTL must cancel the autodown it may have (SkyPilot keeps it otherwise)
        task_config = render_task(pinned_to_commit(recipe, deployment).model_copy(
            update={"lifetime": LifetimeSpec(ttl=left)}), cancel_autostop=True)
        keys = store.read_keys(deployment.name)
        secrets = {KEY_HASHES_SECRET: hashes_secret(hashes_for(keys))}
        if not job_ended:
            progress.phase("engine-stop", f"cancelling job {details.get('job_id')} on {cluster_name}")
            self.sdk.cancel_job(cluster_name, details.get("job_id"))
        deployment.phase = "updating"
        deployment.recipe = recipe.to_yaml_config()
        details.pop("error", None)
        store.save(deployment)
        held: dict[str, Any] = {}
        lock = threading.Lock()

        def phase(name: str, detail: str = "") -> None:
            with lock:
                details["last_phase"] = name
                progress.phase(name, detail)

        try:
            phase("setup", f"the new task on {cluster_name}")
            result = self.sdk.launch(task_config, cluster_name=cluster_name, secrets=secrets,
                                     global_config=cloud_config(recipe), on_line=lambda _line: None)
            details.update(job_id=result.job_id, ends_at=ends_at)
            store.save(deployment)
            self._until_ready(recipe, deployment, store, result.cluster, result.job_id, hf_token,
                              next(iter(keys.values())), phase, held)
        except NotReadyError as exc:
            tail = exc.log_tail or (held["job_log"].tail() if "job_log" in held else "")
            message = explain(tail) or exc.message
            self._fail(deployment, store, message)
            raise NotReadyError(message, log_tail=tail,
                                hint=f"fix the recipe and `mistral-deploy up` again; `mistral-deploy logs "
                                     f"{deployment.name}` has the job's log") from None
        except KeyboardInterrupt:
            self._interrupted(deployment, store, progress, f"cluster {cluster_name}")
            raise
        except MistralDeployError as exc:
            self._fail(deployment, store, exc.message)
            raise
        finally:
            _close(held)
        deployment.phase = "ready"
        details["last_phase"] = "ready"
        store.save(deployment)
        progress.done(_ready_message(deployment))
        return deployment

    def _replace(self, deployment: Deployment, recipe: "Recipe", store: "StateStore",
                 progress: "Progress") -> Deployment:
        """Another GPU, cloud, region or network: a new cluster with the same keys, ready before the switch;
        then the record points at it and the old cluster is removed. The old one serves until then."""
        from mistral_deploy.fit import check_fit

        check_fit(recipe)
        task_config = render_task(pinned_to_commit(recipe, deployment))
        sdk = self.sdk
        check_launchable(recipe, sdk)
        check_gpus_offered(recipe, sdk)
        hf_token = launch_secrets(recipe).get(HF_TOKEN_SECRET)
        os.environ.pop(HF_TOKEN_SECRET, None)
        details = deployment.details
        old_cluster = details["cluster"]
        generation = int(details.get("generation", 1)) + 1
        new_cluster = f"{resource_name(deployment.name)}-{generation}"
        details["next_cluster"] = new_cluster  # `down` removes it too, should this be interrupted
        store.save(deployment)
        keys = store.read_keys(deployment.name)
        staged = Deployment(name=deployment.name, backend=self.kind, recipe=recipe.to_yaml_config(),
                            created_at=deployment.created_at,
                            details={"cluster": new_cluster, "network": recipe.network.mode,
                                     "generation": generation, "key_created": details.get("key_created", {})})
        staging = _StagingStore(store, deployment.name)
        held: dict[str, Any] = {}

        def phase(name: str, detail: str = "") -> None:
            progress.phase(name, detail)

        try:
            phase("provisioning", f"{new_cluster}: the new cluster")
            result = sdk.launch(task_config, cluster_name=new_cluster,
                                secrets={KEY_HASHES_SECRET: hashes_secret(hashes_for(keys))},
                                global_config=cloud_config(recipe), on_line=lambda _line: None)
            staged.details.update(_cluster_details(result.cluster), job_id=result.job_id,
                                  hourly_price=_all_nodes(sdk.hourly_price(result.cluster), recipe),
                                  ends_at=_ends_at(recipe))
            self._until_ready(recipe, staged, staging, result.cluster, result.job_id, hf_token,
                              next(iter(keys.values())), phase, held)
        except BaseException as exc:
            # the old cluster still serves: the new one goes, the record stays as it was. A new cluster that
            # could not be removed stays in the record (`status` names it, `down` removes it): a GPU VM that
            # nothing tracks would run, and cost, until someone notices.
            left = None
            try:
                sdk.down(new_cluster)
            except MistralDeployError as down_failed:
                left = down_failed.message
            else:
                details.pop("next_cluster", None)
            with contextlib.suppress(MistralDeployError):
                store.save(deployment)
            if isinstance(exc, MistralDeployError):
                exc.hint = f"{deployment.name} still serves from {old_cluster}, unchanged"
                if left:
                    exc.hint += (f"; the new cluster {new_cluster} could not be removed ({left}) and may still run: "
                                 f"`mistral-deploy down {deployment.name}` removes it with the deployment, "
                                 f"or `sky down {new_cluster}`")
            raise
        finally:
            _close(held)
        if staged.tls_ca:
            staged.tls_ca = staging.promote_ca()
        old_endpoint = deployment.endpoint
        staged.phase = "ready"
        staged.details["last_phase"] = "ready"
        store.save(staged)
        progress.phase("teardown", f"sky down {old_cluster} (the old cluster)")
        try:
            sdk.down(old_cluster)
        except MistralDeployError as exc:
            progress.phase("teardown", f"{old_cluster} could not be removed ({exc.message}); `sky down {old_cluster}`")
        progress.done(f"{deployment.name} moved to {new_cluster}: the endpoint was {old_endpoint}, it is now "
                      f"{staged.endpoint}")
        return staged

    def _set_ttl(self, deployment: Deployment, ttl: Optional[float], progress: "Progress") -> None:
        cluster_name = deployment.details["cluster"]
        minutes = None if ttl is None else max(1, math.ceil(ttl / 60))
        progress.phase("ttl", f"{cluster_name} ends in {minutes} min" if minutes else f"{cluster_name}: no end time")
        self.sdk.autostop(cluster_name, minutes)
        deployment.details["ends_at"] = None if minutes is None else time.time() + minutes * 60

    def apply_keys(self, deployment: Deployment, keys: dict[str, str], store: "StateStore",
                   progress: "Progress") -> None:
        """The VM's gateway holds exactly `keys` (their hashes) from now on: written over SSH, then a reload."""
        from mistral_deploy.render import render_gateway_reload

        cluster_name = deployment.details["cluster"]
        progress.phase("gateway-reload", f"the keys of {cluster_name}'s gateway")
        script = render_gateway_reload(deployment.recipe_model(), config=False, hashes=hashes_for(keys))
        self.sdk.run_on_head(cluster_name, script)

    def set_ttl(self, deployment: Deployment, ttl: Optional[float], store: "StateStore", progress: "Progress") -> None:
        """`mistral-deploy ttl NAME 2h`: the cluster ends `ttl` seconds from now (None: never)."""
        info = self.sdk.cluster(deployment.details["cluster"], refresh=True)
        if info is None:
            raise CloudError(f"cluster {deployment.details['cluster']} no longer exists",
                             hint=f"`mistral-deploy down {deployment.name}` removes the record")
        self._set_ttl(deployment, ttl, progress)
        recipe = deployment.recipe_model()
        data = recipe.to_yaml_config()
        data.setdefault("lifetime", {})
        if ttl is None:
            data["lifetime"].pop("ttl", None)
        else:
            data["lifetime"]["ttl"] = int(ttl)
        deployment.recipe = data
        store.save(deployment)

    def _vm_certificate(self, cluster_name: str, started: bool, deadline: float) -> str:
        """The gateway's certificate, made by the setup script: read once the run script has started
        (`started`), or, when the job's log could not be followed, as soon as it can be read."""
        while True:
            try:
                return self.sdk.read_head_file(cluster_name, VM_CERT_PATH)
            except CloudError:
                # without the job's log to say when setup is done, ask again until the deadline
                if started or time.monotonic() + self._CERT_RETRY > deadline:
                    raise
                time.sleep(self._CERT_RETRY)

    def _after_failed_launch(self, deployment: Deployment, store: "StateStore", cluster_name: str,
                             exc: CloudError) -> None:
        """A refused launch (quota, capacity, credentials) usually leaves no cluster: then no record either."""
        try:
            exists = self.sdk.cluster(cluster_name) is not None
        except CloudError:
            exists = True  # cannot tell: keep the record so `down` can check
        if not exists:
            store.remove(deployment.name)
        else:
            self._fail(deployment, store, exc.message)
            exc.hint = exc.hint or f"`mistral-deploy down {deployment.name}` removes the partly created cluster"

    def _connect(self, recipe: "Recipe", cluster: ClusterInfo, tls: bool,
                 local_port: Optional[int] = None) -> tuple[str, Optional[Tunnel]]:
        """The endpoint URL to probe (and, in private mode, the tunnel that carries it: on `local_port`
        when given and free, so that a change applied in place keeps the endpoint's URL)."""
        port = recipe.network.port
        scheme = _scheme(tls)
        mode = recipe.network.mode
        if mode == "public":
            return f"{scheme}://{self.sdk.endpoint(cluster.name, port)}/v1", None
        if mode == "vpc":
            host = cluster.internal_ip or cluster.head_ip
            if not host:
                raise CloudError(f"SkyPilot reports no private address for {cluster.name}")
            return f"{scheme}://{host}:{port}/v1", None
        from mistral_deploy.skysdk import port_open

        if local_port and port_open("127.0.0.1", local_port):
            local_port = None  # taken (`mistral-deploy tunnel` may hold it): another one
        tunnel = self.sdk.open_tunnel(cluster.name, remote_host="127.0.0.1", remote_port=port,
                                      local_port=local_port or 0)
        return f"{scheme}://127.0.0.1:{tunnel.local_port}/v1", tunnel

    def open_tunnel(self, deployment: Deployment, *, local_port: Optional[int] = None) -> Tunnel:
        """For `mistral-deploy tunnel`: a local port forwarded to a private deployment's gateway."""
        recipe = deployment.recipe_model()
        if recipe.network.mode != "private":
            raise MistralDeployError(
                f"{deployment.name} is a {recipe.network.mode} endpoint; no tunnel is needed: {deployment.endpoint}")
        port = local_port or deployment.details.get("tunnel_port") or free_port()
        return self.sdk.open_tunnel(deployment.details["cluster"], remote_host="127.0.0.1",
                                    remote_port=recipe.network.port, local_port=int(port))

    def _log_tail(self, deployment: Deployment) -> str:
        try:
            lines = list(self.sdk.tail_job(deployment.details["cluster"], deployment.details.get("job_id"),
                                           follow=False, lines=LOG_TAIL_LINES))
        except (CloudError, KeyError):
            return ""
        return "\n".join(lines[-LOG_TAIL_LINES:])

    def down(self, deployment: Deployment, store: "StateStore", progress: "Progress") -> None:
        cluster = deployment.details.get("cluster")
        following = deployment.details.get("next_cluster")  # a move to a new cluster was interrupted
        if following:
            progress.phase("teardown", f"sky down {following}")
            self.sdk.down(following)
        if cluster:
            progress.phase("teardown", f"sky down {cluster}")
            self.sdk.down(cluster)
        store.remove(deployment.name)
        also = f" (and {following})" if following else ""
        progress.done(f"{deployment.name}: cluster {cluster}{also} removed" if cluster else f"{deployment.name} removed")

    def status(self, deployment: Deployment) -> dict[str, Any]:
        details = deployment.details
        cluster_name = details.get("cluster")
        info: Optional[ClusterInfo] = None
        cluster_status = "unknown"
        try:
            # refreshed from the cloud where SkyPilot's record may be stale: spot VMs and TTL clusters
            info = self.sdk.cluster(cluster_name, refresh=True) if cluster_name else None
            cluster_status = info.status if info else "missing"
        except CloudError as exc:
            cluster_status = f"unknown ({exc.message})"
        mode = details.get("network", "public")
        healthy = False
        phase, problem = deployment.phase, None
        if deployment.phase == "ready" and info is not None and info.status == "UP":
            if mode == "private":
                healthy = self._probe_through_tunnel(deployment)
            else:
                healthy = self._probe(deployment.endpoint, deployment.tls_ca)
            if not healthy and self._job_ended(cluster_name, details.get("job_id")):
                # drift: the cluster runs, the serving job (engine and gateway) does not
                phase, problem = "down", (f"the serving job on {cluster_name} ended (the engine or the gateway "
                                          f"stopped): `mistral-deploy logs {deployment.name}` says why; "
                                          f"`mistral-deploy up` with the same recipe starts it again")
        elif deployment.phase == "ready" and cluster_status == "missing":
            # the record says ready, the cloud has no cluster: its TTL ended it, or it was removed by hand
            phase, problem = "gone", (f"cluster {cluster_name} no longer exists (its TTL, `sky down`, or the cloud "
                                      f"removed it); `mistral-deploy down {deployment.name}` removes the record")
        elif deployment.phase == "ready" and info is not None:
            spot = " (a preempted spot VM: a plain cluster is not relaunched; use replicas for that)" \
                if details.get("use_spot") else ""
            phase, problem = "down", f"cluster {cluster_name} is {info.status}{spot}"
        ip = None
        if info is not None:
            ip = (info.internal_ip or info.head_ip) if mode == "vpc" else info.head_ip
        ip = ip or details.get("internal_ip" if mode == "vpc" else "head_ip")
        row = {
            "name": deployment.name,
            "backend": self.kind,
            "phase": phase,
            "healthy": healthy,
            "endpoint": deployment.endpoint,
            "ip": ip,
            "network": mode,
            "cluster": cluster_name,
            "cluster_status": cluster_status,
            "cloud": details.get("cloud"),
            "region": details.get("region"),
            "instance_type": details.get("instance_type"),
            "spot": details.get("use_spot"),
            "hourly_price": details.get("hourly_price"),
            "autostop_minutes": info.autostop_minutes if info else None,
            "ends_at": details.get("ends_at"),
            "time_left_seconds": max(0, round(details["ends_at"] - time.time())) if details.get("ends_at") else None,
            "cost_so_far": cost_so_far(deployment),
            "tls_ca": deployment.tls_ca,
            "phases": details.get("phases"),
        }
        if problem or deployment.phase == "failed":
            row["error"] = problem or details.get("error")
        leftover = self._leftover_cluster(deployment)
        if leftover:
            row["next_cluster"] = details["next_cluster"]
            row["warning"] = leftover
        return row

    def _leftover_cluster(self, deployment: Deployment) -> Optional[str]:
        """What to say about a new cluster from a move that failed or was interrupted (`next_cluster`), while
        SkyPilot still has it; None once it is gone."""
        following = deployment.details.get("next_cluster")
        if not following:
            return None
        try:
            info = self.sdk.cluster(following)
        except CloudError:
            state = "may still run (SkyPilot cannot tell now)"
        else:
            if info is None:
                return None
            state = f"is {info.status}"
        return (f"cluster {following}, from a move to a new cluster that failed or was interrupted, {state} and "
                f"costs while it runs: `mistral-deploy down {deployment.name}` removes it with the deployment, "
                f"or `sky down {following}`")

    def _job_ended(self, cluster_name: str, job_id: Optional[int]) -> bool:
        try:
            return self.sdk.job_finished(cluster_name, job_id)
        except CloudError:
            return False  # cannot tell

    def _probe_through_tunnel(self, deployment: Deployment) -> bool:
        """A private endpoint: probe over a tunnel of our own, or over `mistral-deploy tunnel` if it runs."""
        from mistral_deploy.skysdk import port_open

        port = deployment.details.get("tunnel_port")
        if port and port_open("127.0.0.1", int(port)) and self._probe(deployment.endpoint, deployment.tls_ca):
            return True
        try:
            with self.open_tunnel(deployment, local_port=free_port()) as tunnel:
                scheme = urlsplit(deployment.endpoint or "http://x").scheme or "http"
                return self._probe(f"{scheme}://127.0.0.1:{tunnel.local_port}/v1", deployment.tls_ca)
        except MistralDeployError:
            return False

    def logs(self, deployment: Deployment, *, follow: bool, lines: int) -> Iterator[str]:
        cluster = deployment.details.get("cluster")
        if not cluster:
            return iter(())
        return self.sdk.tail_job(cluster, deployment.details.get("job_id"), follow=follow, lines=lines)


def _ends_at(recipe: "Recipe") -> Optional[float]:
    """When a cluster launched now with the recipe's TTL tears itself down (None: never)."""
    return time.time() + recipe.lifetime.ttl if recipe.lifetime.ttl else None


def cost_so_far(deployment: Deployment) -> Optional[float]:
    """Dollars since the deployment was created, at its hourly price (None where there is no price list)."""
    price = deployment.details.get("hourly_price")
    if not isinstance(price, (int, float)) or price <= 0:
        return None
    return round(price * (time.time() - deployment.created_at) / 3600, 2)


class _StagingStore:
    """What `_until_ready` saves while a new cluster is made ready: nothing in the record (it still names
    the old cluster), the new certificate beside the pinned one until the switch."""

    def __init__(self, store: "StateStore", name: str) -> None:
        self._store, self._name = store, name

    def dir(self, name: str) -> Any:
        return self._store.dir(name) / "next"

    def save(self, deployment: Deployment) -> None:
        pass

    def promote_ca(self) -> str:
        """The new cluster's certificate becomes the pinned file (same path: clients' settings hold)."""
        target = self._store.dir(self._name) / CA_FILE
        target.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.replace(self.dir(self._name) / CA_FILE, target)
        return str(target)


def _close(held: dict[str, Any]) -> None:
    if held.get("job_log") is not None:
        held["job_log"].close()
    if held.get("tunnel") is not None:
        held["tunnel"].close()


def _cluster_details(cluster: ClusterInfo) -> dict[str, Any]:
    return {
        "cloud": cluster.cloud, "region": cluster.region, "zone": cluster.zone,
        "instance_type": cluster.instance_type, "use_spot": cluster.use_spot,
        "accelerators": cluster.accelerators, "head_ip": cluster.head_ip, "internal_ip": cluster.internal_ip,
    }


def _ready_message(deployment: Deployment) -> str:
    d = deployment.details
    where = ""
    if d.get("instance_type"):
        spot = " spot" if d.get("use_spot") else ""
        where = f" on {d['instance_type']}{spot} ({d.get('cloud')}/{d.get('region')})"
    price = d.get("hourly_price")
    # infrastructure without a price list (Slurm, Kubernetes) reports 0: say nothing rather than $0.00
    cost = f", ${price:.2f}/hour" if isinstance(price, (int, float)) and price > 0 else ""
    if cost and deployment.backend == "serve":
        # one SkyServe controller serves all of a user's services: `status` shows it once, apart
        cost += " for its replicas (the SkyServe controller it shares: `mistral-deploy status`)"
    text = f"{deployment.name} is ready at {deployment.endpoint}{where}{cost}"
    if d.get("network") == "private":
        text += f"; reach it with `mistral-deploy tunnel {deployment.name}`"
    return text


def _check_certificate(pem: str) -> None:
    """What came back from the VM is one certificate, and nothing secret."""
    if "PRIVATE KEY" in pem:
        raise CloudError("the VM returned key material where its certificate was expected; not stored")
    from cryptography import x509

    try:
        x509.load_pem_x509_certificate(pem.encode())
    except ValueError:
        raise CloudError("the VM's gateway certificate is not a PEM certificate") from None


def backend_for_kind(kind: str) -> "CloudBackend | ServeBackend":
    if kind == "cloud":
        return CloudBackend()
    if kind == "serve":
        from mistral_deploy.serve import ServeBackend

        return ServeBackend()
    raise ValueError(f"unknown cloud backend {kind!r}")
