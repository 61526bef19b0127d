"""The local backend: the real vLLM engine and the real nginx gateway as processes on this machine.

    <deployment dir>/
      engine.log                  the engine's output
      gateway/nginx.conf          rendered from templates/nginx.conf.j2 (no secret in it)
      gateway/gateway.js          the gateway's key hashing and body limits (njs)
      gateway/tls/                ca.pem (clients pin it), cert.pem, key.pem (0600)
      gateway/error.log, access.log (never a key: see the template's log_format; its key ids count requests
                                  per key for `usage`, `top` and `metrics`)
      usage/engine.jsonl          tokens per key id, written by the engine's usage plugin (engine-plugin/)

    <a short md-NAME-* folder in the system temp dir>/   this user's, group: the gateway's workers, 2750
      engine.sock                 the engine's Unix socket, 0770: the gateway's workers may open it
      engine/                     0700: the engine's TMPDIR (its IPC sockets)
      gateway/api_keys.map        0640: the keys' SHA-256 hashes, the gateway's map include (gateway.js reads
                                  it too, to refuse a revoked key in an old worker)
      gateway/temp/               nginx's temporary files, its workers' own

The gateway is the only listener: 127.0.0.1 for a private endpoint, every address (with the allowed CIDRs
enforced) for a public one. Started by root, its workers (which parse untrusted requests) run as an
unprivileged user (www-data, or nobody), whose group alone may open the engine's socket; started by another
user, they run as that user. The Hugging Face token reaches the engine through its environment: never argv.
"""

from __future__ import annotations

import fcntl
import os
import pwd
import resource
import shutil
import signal
import socket
import struct
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Optional

from mistral_deploy import engine, processes
from mistral_deploy.errors import EngineError, MistralDeployError, NotReadyError
from mistral_deploy.failures import explain
from mistral_deploy.gateway import (NGINX_MODULES_DIR, GatewayLayout, hashes_for, listen_host_for,
                                    render_gateway_config, render_keys_map)
from mistral_deploy.keys import generate_api_key, generate_tls, hf_token_secret, write_private
from mistral_deploy.processes import ProcessRef
from mistral_deploy.render import engine_args
from mistral_deploy.skysdk import port_open  # plain sockets; sky itself is not imported
from mistral_deploy.templates import template_text
from mistral_deploy.state import Deployment

if TYPE_CHECKING:
    from mistral_deploy.converge import Plan
    from mistral_deploy.progress import Progress
    from mistral_deploy.recipe import Recipe
    from mistral_deploy.state import StateStore

ENGINE_LOG = "engine.log"
ENGINE_SOCKET = "engine.sock"
USAGE_DIR = "usage"  # the engine's usage record (engine.jsonl*); the gateway's is its access.log
USAGE_PLUGIN_DIR = "engine-plugin"
GATEWAY_DIR = "gateway"
# Who runs the gateway's workers when root starts it: the first of these that exists.
WORKER_USERS = ("www-data", "nobody")
LOG_TAIL_LINES = 30
# Locally a probe costs nothing: poll often, so that `up` returns soon after the engine first answers.
LOCAL_PROBE_INTERVAL = 0.05
GATEWAY_START_TIMEOUT = 10.0
# What the engine inherits from the user's environment; everything else (cloud credentials, OpenAI
# keys...) stays out of it.
_PASSED_ENV = ("PATH", "HOME", "LANG", "LC_ALL", "USER", "HF_HOME", "HF_HUB_CACHE", "HF_ENDPOINT",
               "CUDA_VISIBLE_DEVICES", "OMP_NUM_THREADS", "OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE",
               "VLLM_CPU_KVCACHE_SPACE", "VLLM_CPU_OMP_THREADS_BIND")


# With a bucket source, what the engine takes from the user's environment to read that bucket: the
# store's SDK settings and credentials (the AWS chain, Google's application credentials, Azure's), and
# the Run:ai streamer's own settings.
_BUCKET_ENV: dict[str, tuple[str, ...]] = {
    "s3": ("AWS_", "RUNAI_STREAMER_"),
    "gs": ("GOOGLE_", "CLOUDSDK_", "RUNAI_STREAMER_"),
    "az": ("AZURE_", "RUNAI_STREAMER_"),
}


def find_nginx() -> str:
    path = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/usr/local/sbin:/usr/local/nginx/sbin")
    if not path:
        raise EngineError("nginx (the gateway) is not installed",
                          hint="install it: sudo apt-get install nginx (or scripts/install.sh)")
    return path


def require_njs() -> None:
    """The gateway hashes keys and checks request bodies in nginx's njs module (gateway.js)."""
    if not (Path(NGINX_MODULES_DIR) / "ngx_http_js_module.so").is_file():
        raise EngineError(f"nginx's njs module (the gateway's key and limit checks) is not installed in "
                          f"{NGINX_MODULES_DIR}", hint="install it: sudo apt-get install libnginx-mod-http-js "
                                                       "(or scripts/install.sh)")


def port_problem(host: str, port: int) -> Optional[str]:
    """Why the gateway could not bind host:port, or None. SO_REUSEADDR as nginx sets it: connections
    of a gateway stopped a moment ago (TIME_WAIT) do not make the port busy."""
    import errno

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except PermissionError:
            return f"port {port} is privileged (below 1024) and this user may not bind it"
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return f"port {port} on {host} is in use"
            return f"cannot bind {host}:{port}: {exc.strerror}"
    return None


def local_ipv4_addresses() -> list[str]:
    """This machine's IPv4 addresses (loopback first): the hosts a public local endpoint's certificate names."""
    addresses = ["127.0.0.1"]
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        for _index, name in socket.if_nameindex():
            try:
                packed = fcntl.ioctl(sock.fileno(), 0x8915, struct.pack("256s", name[:15].encode()))  # SIOCGIFADDR
            except OSError:
                continue
            address = socket.inet_ntoa(packed[20:24])
            if address not in addresses:
                addresses.append(address)
    return addresses


class LocalBackend:
    kind = "local"

    # ---------------------------------------------------------------------------------------------- up
    def up(self, recipe: "Recipe", store: "StateStore", progress: "Progress") -> Deployment:
        nginx = find_nginx()
        require_njs()
        python = engine.engine_python()
        hf_env = hf_token_secret(recipe)  # a missing token is reported before anything exists
        mode = recipe.network.mode
        if mode == "vpc":
            raise EngineError("network.mode: vpc is for clouds; locally use private or public (--network)")
        listen_host = listen_host_for(mode)
        port = recipe.network.port
        problem = port_problem(listen_host, port)
        if problem:
            raise EngineError(f"network.port (--port): {problem}; pick another")

        deployment = Deployment(name=recipe.name, backend=self.kind, recipe=recipe.to_yaml_config(),
                                details={"network": mode, "port": port, "listen_host": listen_host})
        store.reserve(deployment)
        directory = store.dir(recipe.name)
        engine_ref: Optional[ProcessRef] = None
        gateway_ref: Optional[ProcessRef] = None
        try:
            keys = {f"key-{n}": generate_api_key() for n in range(1, recipe.auth.keys + 1)}
            store.write_keys(recipe.name, keys)
            deployment.details["key_created"] = {key_id: deployment.created_at for key_id in keys}

            model = recipe.model.id
            if recipe.builtin_model:
                progress.phase("model", recipe.builtin_model)
                model = str(engine.ensure_builtin_model(recipe.builtin_model, python,
                                                        say=lambda line: progress.phase("model", line)))

            # The engine's TMPDIR holds its IPC sockets and the Unix socket it serves on, whose paths must
            # stay under 108 bytes: a short private (0700) folder in the system's temp dir, not under the
            # (possibly deep) state folder. Only this user (the gateway's) can open it.
            tmpdir = _make_tmpdir(recipe.name)
            deployment.details["tmpdir"] = tmpdir
            engine_socket = str(Path(tmpdir) / ENGINE_SOCKET)
            layout, tls_ca = self._write_gateway(recipe, directory, keys, listen_host, port, Path(tmpdir))
            scheme = "https" if recipe.tls_enabled else "http"
            deployment.endpoint = f"{scheme}://127.0.0.1:{port}/v1"
            deployment.tls_ca = tls_ca
            deployment.details["engine_socket"] = engine_socket

            progress.phase("engine-start", f"vLLM on {engine_socket}")
            env = self._engine_env(recipe, directory, Path(tmpdir), hf_env)
            argv = [python, "-m", "vllm.entrypoints.openai.api_server",
                    *engine_args(recipe, model=model, socket=engine_socket)]
            engine_ref = processes.spawn(argv, env=env, log=directory / ENGINE_LOG, cwd=directory, umask=0o007)
            deployment.details["engine"] = engine_ref.to_json()
            store.save(deployment)

            progress.phase("gateway", f"nginx on {listen_host}:{port}")
            started: list[ProcessRef] = []  # filled as soon as nginx is spawned, before it listens
            try:
                gateway_ref = self._start_gateway(nginx, directory, layout, started)
            finally:
                gateway_ref = started[0] if started else None
            deployment.details["gateway"] = gateway_ref.to_json() if gateway_ref else None
            store.save(deployment)

            progress.phase("weights", "loading the model")
            from mistral_deploy import probe

            def both_alive() -> bool:
                return processes.alive(engine_ref) and processes.alive(gateway_ref)

            probe.wait_ready(
                deployment.endpoint, next(iter(keys.values())), recipe.served_model_name, ca_file=tls_ca,
                timeout=float(recipe.health.readiness_timeout),
                interval=min(recipe.health.probe_interval, LOCAL_PROBE_INTERVAL),
                probe_timeout=recipe.health.probe_timeout, alive=both_alive,
                on_phase=lambda step: progress.phase("readiness", step), task=probe.probe_task(recipe),
            )
            deployment.phase = "ready"
            deployment.details["ready_at"] = time.time()
            store.save(deployment)
            progress.done(ready_message(deployment))
            return deployment
        except NotReadyError as exc:
            tail = processes.tail(directory / ENGINE_LOG, LOG_TAIL_LINES) or "(the engine wrote nothing to its log)"
            if not processes.alive(gateway_ref) and gateway_ref is not None:
                tail += "\n" + processes.tail(directory / GATEWAY_DIR / "error.log", 10)
            # an engine that died says why in its log (a gated model's 401, out of memory...)
            message = (None if processes.alive(engine_ref) else explain(tail)) or exc.message
            self._fail(deployment, store, message, engine_ref, gateway_ref)
            raise NotReadyError(
                message, log_tail=tail,
                hint=f"`mistral-deploy logs {recipe.name}` has the whole log; "
                     f"`mistral-deploy down {recipe.name}` removes the record",
            ) from None
        except KeyboardInterrupt:
            # nothing local is worth keeping half-made: stop what started, forget the record; a second
            # Ctrl-C or SIGTERM does not cut the clean-up short
            with processes.signals_ignored():
                processes.stop(gateway_ref)
                processes.stop(engine_ref)
                _remove_tmpdir(deployment)
                store.remove(recipe.name)
            progress.fail(f"interrupted: {recipe.name} was stopped and removed")
            raise
        except BaseException as exc:
            message = exc.message if isinstance(exc, MistralDeployError) else f"{type(exc).__name__}: {exc}"
            self._fail(deployment, store, message, engine_ref, gateway_ref)
            if isinstance(exc, MistralDeployError) and not exc.hint:
                exc.hint = f"`mistral-deploy down {recipe.name}` removes the record"
            raise

    @staticmethod
    def _engine_env(recipe: "Recipe", directory: Path, tmpdir: Path, hf_env: dict[str, str]) -> dict[str, str]:
        env = {k: os.environ[k] for k in _PASSED_ENV if k in os.environ}
        # the usage plugin (tokens per key id, templates/md_usage.py): found by vLLM on PYTHONPATH, writing
        # into usage/, which outlives engine restarts
        env["PYTHONPATH"] = str(engine.write_usage_plugin(directory / USAGE_PLUGIN_DIR))
        env["MD_USAGE_DIR"] = str(_usage_dir(directory))
        env.setdefault("PATH", "/usr/local/bin:/usr/bin:/bin")
        env["TMPDIR"] = str(tmpdir / "engine")
        env["VLLM_CACHE_ROOT"] = str(engine.engine_dir() / "cache")
        # torch's compile cache would land in TMPDIR (~150 MB), which is per deployment: share it instead
        env["TORCHINDUCTOR_CACHE_DIR"] = str(engine.engine_dir() / "cache" / "torchinductor")
        env["VLLM_NO_USAGE_STATS"] = "1"
        env["DO_NOT_TRACK"] = "1"
        env["VLLM_MEDIA_URL_ALLOW_REDIRECTS"] = "0"  # the gateway checks a media URL's host, not where it leads
        env["PYTHONUNBUFFERED"] = "1"
        if recipe.builtin_model:
            env["HF_HUB_OFFLINE"] = "1"  # nothing to download: the model is a local folder
        if recipe.model.source:
            # the weights stream from the bucket: nothing from the Hub, and the object store's credentials
            # and endpoint (those of that store alone) from the user's environment
            env["HF_HUB_OFFLINE"] = "1"
            prefixes = _BUCKET_ENV[recipe.model.source.split(":", 1)[0]]
            env.update({k: v for k, v in os.environ.items() if k.startswith(prefixes)})
        env.update(recipe.engine.env)
        env.update(hf_env)
        return env

    @staticmethod
    def _write_gateway(recipe: "Recipe", directory: Path, keys: dict[str, str], listen_host: str, port: int,
                       tmpdir: Path) -> tuple[GatewayLayout, Optional[str]]:
        """The gateway's files. Written again when a change is applied: the certificate is made once and
        kept (clients pin it)."""
        gw = directory / GATEWAY_DIR
        gw.mkdir(mode=0o700, exist_ok=True)
        worker = worker_user()
        keys_file = write_keys_map(tmpdir, keys)
        js_file = gw / "gateway.js"
        js_file.write_text(template_text("gateway.js"), encoding="utf-8")
        tls_ca = cert = key = None
        if recipe.tls_enabled:
            tls = gw / "tls"
            if not all((tls / f).is_file() for f in ("ca.pem", "cert.pem", "key.pem")):
                hosts = local_ipv4_addresses() + ["localhost", socket.gethostname()]
                generate_tls(tls, list(dict.fromkeys(hosts)), common_name=recipe.name)
            cert, key, tls_ca = str(tls / "cert.pem"), str(tls / "key.pem"), str(tls / "ca.pem")
        layout = GatewayLayout(
            listen_host=listen_host, port=port, engine_socket=str(tmpdir / ENGINE_SOCKET), js_file=str(js_file),
            # both logs go through rotating pipes (processes.spawn): error.log and access.log
            keys_file=str(keys_file), pid_file=str(gw / "nginx.pid"), error_log="stderr",
            access_log="/dev/stdout", temp_dir=str(tmpdir / GATEWAY_DIR / "temp"), tls_cert=cert, tls_key=key,
            worker_processes="auto", max_open_files=resource.getrlimit(resource.RLIMIT_NOFILE)[1],
            # started by root, the workers (which parse untrusted requests) run as an unprivileged user
            user=worker[0] if worker else None,
        )
        config = render_gateway_config(recipe, layout)
        (gw / "nginx.conf").write_text(config, encoding="utf-8")
        return layout, tls_ca

    @staticmethod
    def _start_gateway(nginx: str, directory: Path, layout: GatewayLayout, started: list[ProcessRef]) -> ProcessRef:
        gw = directory / GATEWAY_DIR
        argv = [nginx, "-p", str(gw), "-e", layout.error_log, "-c", str(gw / "nginx.conf"), "-g", "daemon off;"]
        env = {"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/bin")}
        ref = processes.spawn(argv, env=env, log=gw / "access.log", err_log=gw / "error.log", cwd=gw)
        started.append(ref)
        deadline = time.monotonic() + GATEWAY_START_TIMEOUT
        pid_file = Path(layout.pid_file)
        # listening, and ours: nginx writes its pid file once it has bound its sockets
        while not (port_open("127.0.0.1", layout.port) and _pid_in(pid_file) == ref.pid):
            if not processes.alive(ref):
                detail = processes.tail(gw / "error.log", 3).strip().splitlines()
                raise EngineError("the gateway (nginx) did not start: " + (detail[-1] if detail else "no output"))
            if time.monotonic() > deadline:
                processes.stop(ref)
                raise EngineError(f"the gateway (nginx) did not listen on port {layout.port} "
                                  f"within {GATEWAY_START_TIMEOUT:.0f}s")
            time.sleep(0.02)
        return ref

    def _fail(self, deployment: Deployment, store: "StateStore", error: str,
              engine_ref: Optional[ProcessRef], gateway_ref: Optional[ProcessRef]) -> None:
        """Stop what started (a local process costs nothing to restart), keep the record and logs."""
        processes.stop(gateway_ref)
        processes.stop(engine_ref)
        _remove_tmpdir(deployment)
        deployment.phase = "failed"
        deployment.details["error"] = error
        try:
            store.save(deployment)
        except MistralDeployError:
            pass  # removed meanwhile by a concurrent `down`

    # ------------------------------------------------------------------------------ changes in place
    def apply(self, deployment: Deployment, recipe: "Recipe", plan: "Plan", store: "StateStore",
              progress: "Progress") -> Deployment:
        """Take a running deployment to `recipe` (converge.Plan says what differs) the cheapest way: a
        gateway reload (nothing in flight is dropped), a gateway restart (another port or network), an
        engine restart behind the same gateway (same URL, keys and certificate). Whatever is not running
        (the engine died, the machine rebooted) is started again too."""
        name = deployment.name
        directory = store.dir(name)
        details = deployment.details
        engine_ref = ProcessRef.from_json(details.get("engine"))
        gateway_ref = ProcessRef.from_json(details.get("gateway"))
        restart_engine = (plan.needs("engine-restart") or not processes.alive(engine_ref)
                          or deployment.phase != "ready")
        restart_gateway = plan.needs("gateway-restart") or not processes.alive(gateway_ref)
        tmpdir = details.get("tmpdir")
        if not tmpdir or not Path(tmpdir).is_dir():  # the system's temp folder was emptied (a reboot)
            tmpdir = None
            restart_engine = True
        nginx = find_nginx()
        require_njs()
        python = engine.engine_python() if restart_engine else ""
        hf_env = hf_token_secret(recipe) if restart_engine else {}
        mode = recipe.network.mode
        if mode == "vpc":
            raise EngineError("network.mode: vpc is for clouds; locally use private or public (--network)")
        listen_host, port = listen_host_for(mode), recipe.network.port
        if restart_gateway and (port, listen_host) != (details.get("port"), details.get("listen_host")):
            problem = port_problem(listen_host, port)
            if problem:
                raise EngineError(f"network.port (--port): {problem}; pick another")
        keys = store.read_keys(name)

        if tmpdir is None:
            tmpdir = _make_tmpdir(name)
        else:
            _prepare_tmpdir(Path(tmpdir))  # made before workers ran as another user: given their group
        engine_socket = str(Path(tmpdir) / ENGINE_SOCKET)
        if restart_engine:
            progress.phase("engine-stop", f"pid {engine_ref.pid}" if engine_ref else "not running")
            processes.stop(engine_ref)
            engine_ref = None
            Path(engine_socket).unlink(missing_ok=True)  # vLLM binds it anew, and refuses a leftover file
        layout, tls_ca = self._write_gateway(recipe, directory, keys, listen_host, port, Path(tmpdir))
        if restart_gateway:
            progress.phase("gateway", f"nginx on {listen_host}:{port}")
            processes.stop(gateway_ref)
            started: list[ProcessRef] = []
            try:
                gateway_ref = self._start_gateway(nginx, directory, layout, started)
            finally:
                gateway_ref = started[0] if started else None
        else:
            progress.phase("gateway-reload", "nginx re-reads its configuration")
            reload_gateway(nginx, directory / GATEWAY_DIR, gateway_ref)
        scheme = "https" if recipe.tls_enabled else "http"
        deployment.recipe = recipe.to_yaml_config()
        deployment.endpoint = f"{scheme}://127.0.0.1:{port}/v1"
        deployment.tls_ca = tls_ca
        details.update(network=mode, port=port, listen_host=listen_host, tmpdir=tmpdir, engine_socket=engine_socket,
                       gateway=gateway_ref.to_json() if gateway_ref else None)
        details.pop("error", None)
        try:
            if restart_engine:
                model = recipe.model.id
                if recipe.builtin_model:
                    model = str(engine.ensure_builtin_model(recipe.builtin_model, python,
                                                            say=lambda line: progress.phase("model", line)))
                progress.phase("engine-start", f"vLLM on {engine_socket}")
                argv = [python, "-m", "vllm.entrypoints.openai.api_server",
                        *engine_args(recipe, model=model, socket=engine_socket)]
                engine_ref = processes.spawn(argv, env=self._engine_env(recipe, directory, Path(tmpdir), hf_env),
                                             log=directory / ENGINE_LOG, cwd=directory, umask=0o007)
                details["engine"] = engine_ref.to_json()
            deployment.phase = "updating" if restart_engine else deployment.phase
            store.save(deployment)
            from mistral_deploy import probe

            probe.wait_ready(
                deployment.endpoint, next(iter(keys.values())), recipe.served_model_name, ca_file=tls_ca,
                timeout=float(recipe.health.readiness_timeout),
                interval=min(recipe.health.probe_interval, LOCAL_PROBE_INTERVAL),
                probe_timeout=recipe.health.probe_timeout,
                alive=lambda: processes.alive(engine_ref) and processes.alive(gateway_ref),
                on_phase=lambda step: progress.phase("readiness", step), task=probe.probe_task(recipe),
            )
        except NotReadyError as exc:
            tail = processes.tail(directory / ENGINE_LOG, LOG_TAIL_LINES) or "(the engine wrote nothing to its log)"
            message = (None if processes.alive(engine_ref) else explain(tail)) or exc.message
            self._fail(deployment, store, message, engine_ref, gateway_ref)
            raise NotReadyError(message, log_tail=tail,
                                hint=f"fix the recipe and run `mistral-deploy up` again, or "
                                     f"`mistral-deploy down {name}`") from None
        except KeyboardInterrupt:
            with processes.signals_ignored():
                self._fail(deployment, store, "interrupted while a change was applied", engine_ref, gateway_ref)
            raise
        deployment.phase = "ready"
        details["ready_at"] = time.time()
        store.save(deployment)
        progress.done(ready_message(deployment))
        return deployment

    def apply_keys(self, deployment: Deployment, keys: dict[str, str], store: "StateStore",
                   progress: "Progress") -> None:
        """The gateway holds exactly `keys` from now on: its key map rewritten, then a reload (requests in
        flight, a revoked key's included, finish; the next request with a revoked key is refused)."""
        gw = store.dir(deployment.name) / GATEWAY_DIR
        tmpdir = deployment.details.get("tmpdir")
        gateway_ref = ProcessRef.from_json(deployment.details.get("gateway"))
        if tmpdir and Path(tmpdir).is_dir():
            write_keys_map(Path(tmpdir), keys)
        else:
            gateway_ref = None  # its files are gone (a reboot): `up` writes them again
        if not processes.alive(gateway_ref):
            progress.phase("keys", "the gateway is not running: the keys apply when it starts (`mistral-deploy up`)")
            return
        progress.phase("gateway-reload", "nginx re-reads its keys")
        reload_gateway(find_nginx(), gw, gateway_ref)

    # ------------------------------------------------------------------------------------ down/status
    def down(self, deployment: Deployment, store: "StateStore", progress: "Progress") -> None:
        gateway_ref = ProcessRef.from_json(deployment.details.get("gateway"))
        engine_ref = ProcessRef.from_json(deployment.details.get("engine"))
        progress.phase("teardown", "gateway and engine")
        processes.stop(gateway_ref)
        processes.stop(engine_ref)
        _remove_tmpdir(deployment)
        store.remove(deployment.name)
        progress.done(f"{deployment.name} stopped and removed")

    def status(self, deployment: Deployment) -> dict[str, Any]:
        from mistral_deploy import probe

        details = deployment.details
        engine_up = processes.alive(ProcessRef.from_json(details.get("engine")))
        gateway_up = processes.alive(ProcessRef.from_json(details.get("gateway")))
        healthy = (deployment.phase == "ready" and engine_up and gateway_up and deployment.endpoint is not None
                   and probe.check_health(deployment.endpoint, ca_file=deployment.tls_ca))
        mode = details.get("network", "private")
        phase, error = deployment.phase, details.get("error")
        if deployment.phase == "ready" and not (engine_up and gateway_up):
            # drift: the record says ready, the processes say otherwise
            dead = " and ".join(w for w, up in (("engine", engine_up), ("gateway", gateway_up)) if not up)
            phase, error = "down", (f"the {dead} is not running (exited, killed, or the machine restarted); "
                                    f"`mistral-deploy up` with the same recipe starts it again")
        ip = "127.0.0.1" if mode == "private" else next(
            (a for a in local_ipv4_addresses() if not a.startswith("127.")), "127.0.0.1")
        return {
            "name": deployment.name,
            "backend": self.kind,
            "phase": phase,
            "healthy": bool(healthy),
            "endpoint": deployment.endpoint,
            "ip": ip,
            "network": mode,
            "model": deployment.served_model_name,
            "engine_running": engine_up,
            "gateway_running": gateway_up,
            "engine_pid": (details.get("engine") or {}).get("pid"),
            "gateway_pid": (details.get("gateway") or {}).get("pid"),
            "tls_ca": deployment.tls_ca,
            "error": error,
        }

    def logs(self, deployment: Deployment, *, follow: bool, lines: int) -> Iterator[str]:
        from mistral_deploy.state import StateStore

        path = StateStore().dir(deployment.name) / ENGINE_LOG
        return follow_file(path, lines=lines, follow=follow,
                           running=lambda: processes.alive(ProcessRef.from_json(deployment.details.get("engine"))))


def follow_file(path: Path, *, lines: int, follow: bool, running: Any = lambda: True) -> Iterator[str]:
    """The last `lines` lines of a file, then (follow) new lines as they come, until `running()` is False."""
    for line in processes.tail(path, lines).splitlines() if lines else []:
        yield line
    if not follow:
        return
    try:
        fh = open(path, "r", encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return
    with fh:
        fh.seek(0, os.SEEK_END)
        partial = ""
        while True:
            chunk = fh.readline()
            if chunk:
                partial += chunk
                if partial.endswith("\n"):
                    yield partial.rstrip("\n")
                    partial = ""
                continue
            if not running():
                if partial:
                    yield partial
                return
            time.sleep(0.2)


GATEWAY_RELOAD_TIMEOUT = 10.0


def reload_gateway(nginx: str, gw: Path, gateway_ref: Optional[ProcessRef]) -> None:
    """nginx re-reads its configuration (SIGHUP to the master): new workers take new connections, the old
    ones finish the requests in flight, streams included, and exit. The configuration is checked first
    (`nginx -t`): a refused one changes nothing. Returns once a new worker runs."""
    import subprocess

    if not processes.alive(gateway_ref):
        raise EngineError("the gateway (nginx) is not running; `mistral-deploy up` starts it again")
    assert gateway_ref is not None
    check = subprocess.run([nginx, "-t", "-q", "-p", str(gw), "-e", "stderr", "-c", str(gw / "nginx.conf")],
                           capture_output=True, text=True, timeout=30, cwd=str(gw),
                           env={"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/bin")})
    if check.returncode != 0:
        detail = (check.stderr.strip().splitlines() or ["no output"])[-1]
        raise EngineError(f"nginx refused the new gateway configuration ({detail}); the running one is kept")
    before = set(_children(gateway_ref.pid))
    os.kill(gateway_ref.pid, signal.SIGHUP)
    deadline = time.monotonic() + GATEWAY_RELOAD_TIMEOUT
    # done when new workers run and every old one has stopped accepting: it closes its listening sockets,
    # then renames itself "... is shutting down" and finishes what it serves
    while not (set(_children(gateway_ref.pid)) - before and all(_stopped_accepting(pid) for pid in before)):
        if time.monotonic() > deadline:
            raise EngineError(f"the gateway did not take its new configuration within {GATEWAY_RELOAD_TIMEOUT:.0f}s "
                              f"of a reload; see {gw / 'error.log'}")
        time.sleep(0.01)


def _stopped_accepting(pid: int) -> bool:
    try:
        title = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return True  # gone
    return not title or b"shutting down" in title  # empty: exited, not yet reaped


def _children(pid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                text = (entry / "stat").read_text()
            except OSError:
                continue
            if int(text[text.rindex(")") + 2:].split()[1]) == pid:
                out.append(int(entry.name))
    return out


def _pid_in(path: Path) -> Optional[int]:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def worker_user() -> Optional[tuple[str, int]]:
    """(name, group id) of the unprivileged user the gateway's workers run as when root starts nginx; None
    for another user, whose workers run as itself."""
    if os.geteuid() != 0:
        return None
    for name in WORKER_USERS:
        try:
            return name, pwd.getpwnam(name).pw_gid
        except KeyError:
            continue
    raise EngineError(f"no unprivileged user ({' or '.join(WORKER_USERS)}) to run the gateway's workers as")


def _usage_dir(directory: Path) -> Path:
    folder = directory / USAGE_DIR
    folder.mkdir(mode=0o700, exist_ok=True)
    return folder


def _make_tmpdir(name: str) -> str:
    """The deployment's private folder in the system's temp dir: a short path (the engine's Unix socket and
    its IPC sockets must stay under 108 bytes), not under the (possibly deep) state folder."""
    tmpdir = tempfile.mkdtemp(prefix=f"md-{name[:12]}-")
    _prepare_tmpdir(Path(tmpdir))
    return tmpdir


def _prepare_tmpdir(tmpdir: Path) -> None:
    """tmpdir 2750 and its gateway/ 0750, in the group of the gateway's workers (the engine's socket, made
    0770 under them, inherits it: only this user and those workers may open it); engine/ 0700, the
    engine's own."""
    worker = worker_user()
    gid = worker[1] if worker else os.getegid()
    (tmpdir / "engine").mkdir(mode=0o700, exist_ok=True)
    (tmpdir / GATEWAY_DIR / "temp").mkdir(mode=0o750, parents=True, exist_ok=True)
    for folder, mode in ((tmpdir, 0o2750), (tmpdir / GATEWAY_DIR, 0o750), (tmpdir / GATEWAY_DIR / "temp", 0o750)):
        os.chown(folder, -1, gid)
        os.chmod(folder, mode)


def write_keys_map(tmpdir: Path, keys: dict[str, str]) -> Path:
    """The gateway's keys map (hashes only) in the deployment's private temp folder: readable by the
    gateway's workers, which check a key against it after a change (gateway.js)."""
    path = write_private(tmpdir / GATEWAY_DIR / "api_keys.map", render_keys_map(hashes_for(keys)))
    worker = worker_user()
    if worker:
        os.chown(path, -1, worker[1])
        os.chmod(path, 0o640)
    return path


def _remove_tmpdir(deployment: Deployment) -> None:
    tmpdir = deployment.details.get("tmpdir")
    if tmpdir and Path(tmpdir).name.startswith("md-"):
        shutil.rmtree(tmpdir, ignore_errors=True)


def ready_message(deployment: Deployment) -> str:
    return f"{deployment.name} is ready at {deployment.endpoint}"
