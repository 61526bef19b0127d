"""The one place that talks to SkyPilot: a thin layer over its Python SDK, and over the SSH access it sets up.

Everything here is I/O against SkyPilot (its API server, its catalog, `ssh` with the config it writes);
everything above (cloud.py) is our logic and sees only plain values: ClusterInfo, ServiceInfo, Tunnel,
lines of log text. Tests replace `SkySdk` as a whole (see `get_sdk`) and nothing else.

SkyPilot 0.14's SDK returns request ids; `sky.stream_and_get` / `sky.get` resolve them against an API
server, which the first call starts locally if none is configured (`sky api stop` ends it). `sky` is
imported lazily: it costs seconds.
"""

from __future__ import annotations

import contextlib
import io
import os
import queue
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Optional

from mistral_deploy.errors import CloudError

if TYPE_CHECKING:
    import sky as sky_t

# SkyServe's load balancer asks its controller for the READY replicas this often
# (sky/serve/constants.py LB_CONTROLLER_SYNC_INTERVAL_SECONDS, SkyPilot 0.14.1; a test compares them)
LB_SYNC_SECONDS = 20
_ANSI_RE = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]")


@dataclass(frozen=True)
class ClusterInfo:
    """What we need to know about one SkyPilot cluster."""

    name: str
    status: str  # SkyPilot's ClusterStatus value: INIT, UP, STOPPED
    head_ip: Optional[str] = None  # the address SkyPilot reaches the head at (external unless internal IPs)
    internal_ip: Optional[str] = None
    cloud: Optional[str] = None
    region: Optional[str] = None
    zone: Optional[str] = None
    instance_type: Optional[str] = None
    use_spot: bool = False
    accelerators: Optional[str] = None
    autostop_minutes: int = -1
    autodown: bool = False


@dataclass(frozen=True)
class LaunchResult:
    job_id: Optional[int]
    cluster: ClusterInfo


@dataclass(frozen=True)
class ReplicaInfo:
    replica_id: int
    status: str  # SkyServe's ReplicaStatus value: PROVISIONING, STARTING, READY, ...
    endpoint: Optional[str] = None
    cluster: Optional[str] = None
    version: Optional[int] = None  # the service version the replica runs (`sky serve update` adds one)
    is_spot: bool = False


@dataclass(frozen=True)
class ServiceInfo:
    name: str
    status: str  # SkyServe's ServiceStatus value: CONTROLLER_INIT, NO_REPLICA, READY, ...
    endpoint: Optional[str] = None  # the load balancer, e.g. https://203.0.113.7:30001
    replicas: tuple[ReplicaInfo, ...] = field(default_factory=tuple)
    version: Optional[int] = None  # the latest version (the target of the last update)


class Tunnel:
    """A local port forwarded to an address on the cluster, by an `ssh -N -L` process we started."""

    def __init__(self, local_port: int, process: Optional[subprocess.Popen[bytes]] = None) -> None:
        self.local_port = local_port
        self.process = process

    @property
    def pid(self) -> Optional[int]:
        return self.process.pid if self.process else None

    def alive(self) -> bool:
        return self.process is None or self.process.poll() is None

    def wait(self) -> int:
        """Block until the tunnel ends (Ctrl-C ends it); its exit status."""
        return self.process.wait() if self.process else 0

    def close(self) -> None:
        proc = self.process
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)

    def __enter__(self) -> "Tunnel":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _LineWriter(io.TextIOBase):
    """A text stream that hands each complete line (ANSI colours removed) to a callback."""

    def __init__(self, on_line: Callable[[str], None]) -> None:
        super().__init__()
        self._on_line = on_line
        self._buffer = ""

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        self._buffer += text.replace("\r", "\n")
        while "\n" in self._buffer:
            line, self._buffer = self._buffer.split("\n", 1)
            line = _ANSI_RE.sub("", line).rstrip()
            if line:
                self._on_line(line)
        return len(text)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        if self._buffer.strip():
            self._on_line(_ANSI_RE.sub("", self._buffer).rstrip())
        self._buffer = ""
        super().close()


def _sky() -> "sky_t":  # type: ignore[valid-type]
    import sky

    _logs_to_stderr()
    return sky


def _logs_to_stderr() -> None:
    """SkyPilot logs to stdout (its handlers hold the stream they were made with, so redirect_stdout
    misses them, e.g. "Starting a local server."); our stdout is for data (`--json`): stderr for them."""
    import logging

    names = ["sky"] + [n for n in logging.root.manager.loggerDict if n.startswith("sky.")]
    for name in names:
        for handler in logging.getLogger(name).handlers:
            if isinstance(handler, logging.StreamHandler) and handler.stream in (sys.stdout, sys.__stdout__):
                handler.setStream(sys.stderr)


def _field(record: Any, key: str, default: Any = None) -> Any:
    """A field of an SDK response: pydantic response models and plain dicts both occur in 0.14."""
    if isinstance(record, dict):
        return record.get(key, default)
    try:
        return record[key]
    except (KeyError, TypeError, IndexError):
        return getattr(record, key, default)


def _enum_value(value: Any) -> str:
    return str(getattr(value, "value", value))


def first_line(text: str) -> str:
    for line in _ANSI_RE.sub("", str(text)).splitlines():
        line = line.strip()
        if line:
            return line
    return ""


class SkySdk:
    """SkyPilot, as mistral-deploy uses it. Methods raise CloudError with a one-line message."""

    # --- task construction (in-process, no API server) -----------------------------------------------

    def make_task(self, task_config: dict[str, Any], secrets: dict[str, str]) -> Any:
        """A sky.Task from our rendered config, its null `secrets:` filled with these values.

        The values go in as `secrets_overrides`, so that they are inline secrets (not managed-secret
        references) and the task's user-specified YAML, which SkyPilot records and shows, keeps nulls.
        """
        import copy

        sky = _sky()
        missing = [k for k, v in (task_config.get("secrets") or {}).items() if v is None and k not in secrets]
        if missing:
            raise CloudError(f"no value for the secret(s) {', '.join(missing)}")
        try:
            return sky.Task.from_yaml_config(copy.deepcopy(task_config), secrets_overrides=list(secrets.items()))
        except Exception as exc:  # SkyPilot raises ValueError / jsonschema errors for invalid tasks
            raise CloudError(f"SkyPilot rejected the task: {first_line(str(exc))}") from None

    @contextlib.contextmanager
    def _global_config(self, global_config: dict[str, Any]) -> Iterator[None]:
        """SkyPilot global config keys for the requests made inside (sent along with each request)."""
        if not global_config:
            yield
            return
        from sky import skypilot_config

        with skypilot_config.override_skypilot_config(global_config):
            yield

    # --- clusters ---------------------------------------------------------------------------------

    def launch(self, task_config: dict[str, Any], *, cluster_name: str, secrets: dict[str, str],
               global_config: dict[str, Any], on_line: Callable[[str], None]) -> LaunchResult:
        """Provision (or reuse) the cluster, run setup, submit the run job; stream SkyPilot's lines.

        The autostop (TTL) travels in the task's resources, so no autostop argument is passed here.
        Ctrl-C cancels the launch request on the API server before re-raising.
        """
        sky = _sky()
        task = self.make_task(task_config, secrets)
        # SkyPilot's client prints a line or two to stdout; ours is for data (--json), so they go to stderr
        with translate_errors("launch"), contextlib.redirect_stdout(sys.stderr):
            with self._global_config(global_config):
                request_id = sky.launch(task, cluster_name=cluster_name)
            writer = _LineWriter(on_line)
            try:
                result = sky.stream_and_get(request_id, output_stream=writer)
            except KeyboardInterrupt:
                self._cancel(request_id)
                raise
            finally:
                writer.close()
        job_id = result[0] if isinstance(result, tuple) and result else None
        info = self.cluster(cluster_name)
        if info is None:
            raise CloudError(f"SkyPilot reported a launch of {cluster_name!r} but has no such cluster")
        return LaunchResult(job_id=job_id, cluster=info)

    def _cancel(self, request_id: Any) -> None:
        with contextlib.suppress(Exception):
            sky = _sky()
            sky.get(sky.api_cancel(request_id, silent=True))

    def cluster(self, cluster_name: str, *, refresh: bool = False) -> Optional[ClusterInfo]:
        """The cluster's record, or None if SkyPilot has none. refresh: ask the cloud again where
        SkyPilot's record can be stale (spot instances, clusters with an autostop or TTL)."""
        sky = _sky()
        mode = sky.StatusRefreshMode.AUTO if refresh else sky.StatusRefreshMode.NONE
        with translate_errors("status"):
            records = sky.get(sky.status(cluster_names=[cluster_name], refresh=mode))
        for record in records or []:
            if _field(record, "name") == cluster_name:
                return _cluster_info(record)
        return None

    def endpoint(self, cluster_name: str, port: int) -> str:
        """host:port at which the cluster's opened port is reachable (resources.ports)."""
        sky = _sky()
        with translate_errors("endpoints"):
            endpoints = sky.get(sky.endpoints(cluster_name, port))
        value = (endpoints or {}).get(port) or (endpoints or {}).get(str(port))
        if not value:
            raise CloudError(f"SkyPilot has no endpoint for port {port} of {cluster_name!r}")
        return str(value).removeprefix("http://").removeprefix("https://").rstrip("/")

    def down(self, cluster_name: str) -> None:
        """Tear the cluster down; a cluster that does not exist (any more) is not an error."""
        sky = _sky()
        from sky import exceptions

        try:
            with translate_errors("down"):
                sky.stream_and_get(sky.down(cluster_name), output_stream=_LineWriter(lambda _l: None))
        except CloudError as exc:
            if isinstance(exc.__cause__, exceptions.ClusterDoesNotExist):
                return
            raise

    def cancel_job(self, cluster_name: str, job_id: Optional[int]) -> None:
        """Cancel the cluster's job (the serving job: its run script's trap removes the containers)."""
        sky = _sky()
        with translate_errors("cancel"):
            if job_id is None:
                sky.get(sky.cancel(cluster_name, all=True))
            else:
                sky.get(sky.cancel(cluster_name, job_ids=[int(job_id)]))

    def autostop(self, cluster_name: str, minutes: Optional[int]) -> None:
        """Tear the cluster down `minutes` from now (autodown that waits for nothing); None: never.
        SkyPilot counts the time from when it is set."""
        sky = _sky()
        from sky.skylet import autostop_lib

        with translate_errors("autostop"):
            sky.get(sky.autostop(cluster_name, -1 if minutes is None else int(minutes),
                                 wait_for=autostop_lib.AutostopWaitFor.NONE, down=minutes is not None))

    def tail_job(self, cluster_name: str, job_id: Optional[int], *, follow: bool, lines: int = 0,
                 stop: Optional[threading.Event] = None) -> Iterator[str]:
        """The job's log lines (setup then run: our scripts, then the engine's container log)."""
        sky = _sky()
        with translate_errors("logs"):
            stream = sky.tail_logs(cluster_name, job_id, follow=follow, tail=lines, preload_content=False)
            pending = ""
            for chunk in stream:
                if chunk is None:
                    break
                pending += chunk
                while "\n" in pending:
                    line, pending = pending.split("\n", 1)
                    yield _ANSI_RE.sub("", line).rstrip("\r")
                if stop is not None and stop.is_set():
                    return
            if pending:
                yield _ANSI_RE.sub("", pending)

    def job_finished(self, cluster_name: str, job_id: Optional[int]) -> bool:
        """Whether the job has ended (succeeded, failed, cancelled), or no longer exists."""
        sky = _sky()
        with translate_errors("job status"):
            statuses = sky.get(sky.job_status(cluster_name, [job_id] if job_id is not None else None))
        status = None
        for key, value in (statuses or {}).items():
            if job_id is None or str(key) == str(job_id):
                status = value
        return status is None or bool(status.is_terminal())

    # --- SkyServe ---------------------------------------------------------------------------------

    def serve_up(self, task_config: dict[str, Any], *, service_name: str, secrets: dict[str, str],
                 global_config: dict[str, Any], on_line: Callable[[str], None]) -> str:
        """Start the service (controller, load balancer, replicas); its endpoint URL."""
        sky = _sky()
        task = self.make_task(task_config, secrets)
        with translate_errors("serve up"), contextlib.redirect_stdout(sys.stderr):
            with self._global_config(global_config):
                request_id = sky.serve.up(task, service_name)
            writer = _LineWriter(on_line)
            try:
                _name, endpoint = sky.stream_and_get(request_id, output_stream=writer)
            except KeyboardInterrupt:
                self._cancel(request_id)
                raise
            finally:
                writer.close()
        return str(endpoint)

    def serve_update(self, task_config: dict[str, Any], *, service_name: str, secrets: dict[str, str],
                     global_config: dict[str, Any], blue_green: bool = False) -> None:
        """`sky serve update`: a new version of the service, replicas replaced one by one (rolling) or all
        at once once the new ones are ready (blue-green). Returns once SkyPilot accepted it."""
        sky = _sky()
        from sky.serve import serve_utils

        task = self.make_task(task_config, secrets)
        mode = serve_utils.UpdateMode.BLUE_GREEN if blue_green else serve_utils.UpdateMode.ROLLING
        with translate_errors("serve update"), contextlib.redirect_stdout(sys.stderr):
            with self._global_config(global_config):
                request_id = sky.serve.update(task, service_name, mode=mode)
            sky.stream_and_get(request_id, output_stream=_LineWriter(lambda _l: None))

    # SkyPilot 0.14.1's `serve status` fails now and then while a replica's cluster is removed (a rollout, a
    # scale-down): the replica's endpoint is read from its cluster YAML, already gone
    # (replica_managers.ReplicaInfo.url -> global_user_state.get_cluster_yaml_dict: "Attempted to read a None
    # YAML"), and the whole call ends in "Failed to fetch services". Seen on the bed during a rolling update.
    _SERVE_STATUS_RACE = "Failed to fetch services"
    _SERVE_STATUS_TRIES = 3
    _SERVE_STATUS_RETRY_AFTER = 3.0

    def serve_status(self, service_name: str) -> Optional[ServiceInfo]:
        sky = _sky()
        for attempt in range(1, self._SERVE_STATUS_TRIES + 1):
            try:
                with translate_errors("serve status"):
                    records = sky.get(sky.serve.status([service_name]))
                break
            except CloudError as exc:
                if attempt == self._SERVE_STATUS_TRIES or self._SERVE_STATUS_RACE not in str(exc.__cause__):
                    raise
                time.sleep(self._SERVE_STATUS_RETRY_AFTER)
        for record in records or []:
            if _field(record, "name") != service_name:
                continue
            replicas = tuple(
                ReplicaInfo(
                    replica_id=int(_field(r, "replica_id")),
                    status=_enum_value(_field(r, "status")),
                    endpoint=_field(r, "endpoint"),
                    cluster=_field(r, "name"),
                    version=_int_or_none(_field(r, "version")),
                    is_spot=bool(_field(r, "is_spot", False)),
                )
                for r in _field(record, "replica_info") or []
            )
            return ServiceInfo(name=service_name, status=_enum_value(_field(record, "status")),
                               endpoint=_field(record, "endpoint"), replicas=replicas,
                               version=_int_or_none(_field(record, "version")))
        return None

    def serve_consolidation_mode(self) -> bool:
        """SkyServe's consolidation mode (`serve.controller.consolidation_mode: true`): the controller and
        load balancer run inside SkyPilot's API server, with no VM of their own. As SkyPilot reads its
        config now (a remote API server's own config cannot be read from here: the local one is)."""
        from sky import skypilot_config

        skypilot_config.reload_config()
        return skypilot_config.get_nested(("serve", "controller", "consolidation_mode"), False) is True

    def api_server_host(self) -> Optional[str]:
        """The host of SkyPilot's API server when it runs elsewhere; None for a local one."""
        from urllib.parse import urlsplit

        from sky.server import common

        url = common.get_server_url()
        return None if common.is_api_server_local(url) else urlsplit(url).hostname

    def serve_down(self, service_name: str) -> None:
        """Tear the service down (replicas, then its place on the controller); gone already is fine."""
        sky = _sky()
        from sky import exceptions

        try:
            with translate_errors("serve down"):
                sky.stream_and_get(sky.serve.down(service_name), output_stream=_LineWriter(lambda _l: None))
        except CloudError as exc:
            # a controller that is down holds no service any more
            if isinstance(exc.__cause__, (exceptions.ClusterNotUpError, exceptions.ClusterDoesNotExist)):
                return
            raise

    def serve_logs(self, service_name: str, *, replica_id: int, follow: bool, lines: int = 0,
                   stop: Optional[threading.Event] = None) -> Iterator[str]:
        """One replica's log lines (SkyServe only writes them to a stream: relayed through a thread)."""
        sky = _sky()
        lines_q: "queue.Queue[Optional[str]]" = queue.Queue()
        failure: list[BaseException] = []

        def pump() -> None:
            try:
                with translate_errors("serve logs"):
                    sky.serve.tail_logs(service_name, target="replica", replica_id=replica_id, follow=follow,
                                        output_stream=_LineWriter(lines_q.put), tail=lines or None)
            except BaseException as exc:  # noqa: BLE001 - re-raised in the consumer
                failure.append(exc)
            finally:
                lines_q.put(None)

        threading.Thread(target=pump, name="serve-logs", daemon=True).start()
        while True:
            line = lines_q.get()
            if line is None:
                break
            yield line
            if stop is not None and stop.is_set():
                return
        if failure:
            raise failure[0]

    def serve_controller_host(self) -> Optional[str]:
        """The address of this user's SkyServe controller, if a service already runs on it.

        Every service endpoint is the controller's address plus a port, so the address names the
        load balancer's certificate before the new service exists.
        """
        sky = _sky()
        from urllib.parse import urlsplit

        with translate_errors("serve status"):
            records = sky.get(sky.serve.status(None))
        for record in records or []:
            endpoint = _field(record, "endpoint")
            if endpoint:
                host = urlsplit(endpoint if "://" in endpoint else f"http://{endpoint}").hostname
                if host:
                    return host
        return None

    # --- what a cloud can do (in-process: SkyPilot's cloud classes and catalog) ----------------------

    def unsupported_features(self, cloud: str, features: list[str]) -> dict[str, str]:
        """Of these CloudImplementationFeatures values, those the cloud lacks, each with SkyPilot's reason."""
        sky = _sky()
        from sky import clouds as sky_clouds
        from sky import exceptions
        from sky.utils import registry

        impl = registry.CLOUD_REGISTRY.from_str(cloud)
        missing: dict[str, str] = {}
        for name in features:
            try:
                with _quiet():
                    impl.check_features_are_supported(sky.Resources(infra=cloud),
                                                      {sky_clouds.CloudImplementationFeatures(name)})
            except exceptions.NotSupportedError as exc:
                missing[name] = _feature_reason(str(exc), name)
        return missing

    def offered_gpus(self, cloud: str) -> Optional[dict[str, list[int]]]:
        """GPU name -> the counts per instance SkyPilot's catalog offers on the cloud; None if unknown here."""
        try:
            from sky import catalog

            with _quiet():
                listing = catalog.list_accelerators(gpus_only=True, clouds=cloud, all_regions=False)
        except Exception:  # noqa: BLE001 - no catalog here (offline), a cluster that cannot be asked
            return None
        return {name: sorted({int(i.accelerator_count) for i in infos if i.accelerator_count})
                for name, infos in listing.items()}

    # --- prices (the local catalog, in-process) ---------------------------------------------------

    def hourly_price(self, cluster: ClusterInfo) -> Optional[float]:
        """On-demand or spot price per hour of the cluster's instance, from SkyPilot's catalog."""
        if not (cluster.cloud and cluster.instance_type):
            return None
        try:
            from sky import catalog

            price = float(catalog.get_hourly_cost(cluster.instance_type, use_spot=cluster.use_spot,
                                                  region=cluster.region, zone=cluster.zone,
                                                  clouds=cluster.cloud.lower()))
        except Exception:  # a price is informative only; never fail a deployment over it
            return None
        return price if price > 0 else None  # Slurm, Kubernetes: no price list (0)

    # --- SSH, through the config SkyPilot writes for its clusters ---------------------------------

    def ssh_config(self, cluster_name: str) -> Path:
        """Write SkyPilot's SSH config entry for the cluster (as `sky status` does); its file.

        The SDK leaves this to its CLI; the CLI's helper is reused so that keys, users, ports and proxy
        commands are exactly what `ssh CLUSTER` would use.
        """
        from sky.client.cli import command as sky_cli
        from sky.utils import cluster_utils

        with translate_errors("ssh config"):
            sky_cli._get_cluster_records_and_set_ssh_config(clusters=[cluster_name])  # noqa: SLF001
        path = Path(os.path.expanduser(cluster_utils.SSHConfigHelper.ssh_cluster_path.format(cluster_name)))
        if not path.is_file():
            raise CloudError(f"SkyPilot wrote no SSH access for {cluster_name!r}: is it up? (`sky status`)")
        return path

    def _replica_command(self, cluster_name: str) -> list[str]:
        """The command that runs `bash -s` (its script on standard input) on a SkyServe replica's head.

        SkyPilot leaves a service's clusters out of `sky status`, of the SSH access it writes, and of its API
        server's SSH proxy (they are its controller's). With the controller in consolidation mode and the API
        server on this machine, they are in this machine's SkyPilot state: their handle gives SkyPilot's own
        command runner, as the controller uses it (SSH; on Slurm, SSH to the login node and `srun --overlap`
        into the replica's allocation). Elsewhere (a controller VM, a remote API server) a replica is not
        reachable from here."""
        if self.api_server_host() is not None or not self.serve_consolidation_mode():
            raise CloudError(f"{cluster_name}: SkyPilot gives no access to a service's replicas from here (they are "
                             "its controller's clusters)", hint="per-replica views need SkyServe's consolidation mode "
                             "(serve.controller.consolidation_mode: true) with the API server on this machine")
        from sky import global_user_state
        from sky.utils import command_runner

        with translate_errors("replica access"):
            handle = global_user_state.get_handle_from_cluster_name(cluster_name)
            if handle is None:
                raise CloudError(f"the replica cluster {cluster_name!r} is not in SkyPilot's state here")
            head = handle.get_command_runners()[0]
            argv = head.ssh_base_command(ssh_mode=command_runner.SshMode.NON_INTERACTIVE, port_forward=None,
                                         connect_timeout=20)
        if isinstance(head, command_runner.SlurmCommandRunner):
            if getattr(head, "slurm_user", None):
                raise CloudError(f"{cluster_name}: a Slurm allocation of another user ({head.slurm_user}) is not "
                                 "reached from here")
            return argv + ["srun", "--unbuffered", "--quiet", "--overlap", f"--jobid={head.job_id}",
                           f"--nodelist={head.slurm_node}", "--nodes=1", "--ntasks=1", "bash", "-s"]
        return argv + ["bash -s"]

    def _ssh_base(self, cluster_name: str) -> list[str]:
        ssh = shutil.which("ssh")
        if not ssh:
            raise CloudError("no `ssh` client on this machine; install OpenSSH")
        config = self.ssh_config(cluster_name)
        argv = [ssh, "-F", str(config), "-o", "BatchMode=yes", "-o", "ConnectTimeout=20"]
        # SkyPilot writes `IdentityFile ~/.sky/...`: OpenSSH expands `~` from the passwd database, SkyPilot
        # (and this process) from $HOME; where they differ the key is not found. Name it explicitly.
        for identity in identity_files(config):
            argv += ["-i", identity]
        return argv

    def read_head_file(self, cluster_name: str, path: str) -> str:
        """A (public) file from the head node, e.g. the gateway's certificate. Never a secret."""
        argv = self._ssh_base(cluster_name) + [cluster_name, "cat", path]
        try:
            done = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
        except subprocess.TimeoutExpired:
            raise CloudError(f"ssh {cluster_name}: timed out reading {path}") from None
        if done.returncode != 0:
            raise CloudError(f"ssh {cluster_name}: cannot read {path}: {first_line(done.stderr) or done.returncode}")
        return done.stdout

    def write_head_file(self, cluster_name: str, path: str, data: str, *, node: int = 0) -> None:
        """Write a file on the head node (or worker `node` of a multi-node cluster: SkyPilot's SSH config
        names it CLUSTER-workerN), readable by its owner only (0600), through SkyPilot's SSH access. The
        content travels on ssh's standard input: never in an argument, a log or SkyPilot's records."""
        if not re.fullmatch(r"~/[A-Za-z0-9._/-]+", path):
            raise CloudError(f"not a path under the home folder: {path}")
        temp = path + ".tmp"
        command = f"umask 077 && mkdir -p \"$(dirname {temp})\" && cat > {temp} && mv -f {temp} {path}"
        host = cluster_name if node == 0 else f"{cluster_name}-worker{node}"
        argv = self._ssh_base(cluster_name) + [host, command]
        try:
            done = subprocess.run(argv, input=data, capture_output=True, text=True, timeout=120, check=False)
        except subprocess.TimeoutExpired:
            raise CloudError(f"ssh {host}: timed out writing {path}") from None
        if done.returncode != 0:
            raise CloudError(f"ssh {host}: cannot write {path}: {first_line(done.stderr) or done.returncode}")

    def run_on_head(self, cluster_name: str, script: str, *, timeout: float = 300.0, replica: bool = False) -> str:
        """Run a bash script on the head node through SkyPilot's SSH access (replica: a service replica's
        cluster, see replica_ssh_config); its output. The script travels on ssh's standard input, never in an
        argument. CloudError with its last line on failure."""
        argv = (self._replica_command(cluster_name) if replica
                else self._ssh_base(cluster_name) + [cluster_name, "bash -s"])
        try:
            done = subprocess.run(argv, input=script, capture_output=True, text=True, timeout=timeout, check=False)
        except subprocess.TimeoutExpired:
            raise CloudError(f"ssh {cluster_name}: timed out after {timeout:.0f}s") from None
        if done.returncode != 0:
            lines = [line for line in done.stderr.splitlines() if line.strip()]
            raise CloudError(f"on {cluster_name}: {lines[-1] if lines else f'exit code {done.returncode}'}")
        return done.stdout

    def stream_on_head(self, cluster_name: str, script: str, *, replica: bool = False) -> subprocess.Popen[str]:
        """Start a bash script on the head node through SkyPilot's SSH access and return at once: the caller
        reads its output lines as they come, and terminates it. The script travels on ssh's standard input."""
        argv = (self._replica_command(cluster_name) if replica
                else self._ssh_base(cluster_name) + ["-o", "ServerAliveInterval=15", cluster_name, "bash -s"])
        proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, bufsize=1)
        assert proc.stdin is not None
        proc.stdin.write(script)
        proc.stdin.close()
        return proc

    def open_tunnel(self, cluster_name: str, *, remote_host: str, remote_port: int,
                    local_port: int = 0, timeout: float = 60.0) -> Tunnel:
        """Forward 127.0.0.1:local_port (0: a free one) to remote_host:remote_port as seen from the head."""
        port = local_port or free_port()
        argv = self._ssh_base(cluster_name) + [
            "-N", "-o", "ExitOnForwardFailure=yes", "-o", "ServerAliveInterval=30",
            "-L", f"127.0.0.1:{port}:{remote_host}:{remote_port}", cluster_name,
        ]
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE)
        tunnel = Tunnel(port, proc)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
                raise CloudError(f"ssh tunnel to {cluster_name} failed: {first_line(err) or proc.returncode}")
            if port_open("127.0.0.1", port):
                return tunnel
            time.sleep(0.2)
        tunnel.close()
        raise CloudError(f"ssh tunnel to {cluster_name}: port {port} did not open within {timeout:.0f}s")


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """SkyPilot's server-side code run in-process writes its spinners, encoded, to stdout: ours is for data."""
    with contextlib.redirect_stdout(io.StringIO()):
        yield


def _feature_reason(text: str, feature: str) -> str:
    """SkyPilot's table of unsupported features -> the reason it gives for one of them."""
    for line in text.splitlines():
        parts = line.split(None, 1)
        if len(parts) == 2 and parts[0] == feature:
            return parts[1].strip()
    return first_line(text) or feature


def identity_files(ssh_config: Path) -> list[str]:
    """The IdentityFile paths of an SSH config file, `~` expanded from $HOME, that exist."""
    found = []
    for line in ssh_config.read_text(encoding="utf-8").splitlines():
        key, _, value = line.strip().partition(" ")
        if key.lower() == "identityfile" and value.strip():
            path = os.path.expanduser(value.strip().strip('"'))
            if os.path.isfile(path) and path not in found:
                found.append(path)
    return found


def _int_or_none(value: Any) -> Optional[int]:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def host_addresses() -> list[str]:
    """This machine's addresses, as other machines may see its connections come from (loopback and
    link-local left out), from the interfaces' own list (psutil, a SkyPilot dependency)."""
    import ipaddress

    import psutil

    found: list[str] = []
    for entries in psutil.net_if_addrs().values():
        for entry in entries:
            if entry.family not in (socket.AF_INET, socket.AF_INET6):
                continue
            ip = ipaddress.ip_address(entry.address.split("%", 1)[0])
            if not (ip.is_loopback or ip.is_link_local) and str(ip) not in found:
                found.append(str(ip))
    return found


def resolve_addresses(host: str) -> list[str]:
    """The addresses a host name resolves to (an address resolves to itself)."""
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except socket.gaierror as exc:
        raise CloudError(f"cannot resolve {host}: {exc.strerror}") from None
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def _cluster_info(record: Any) -> ClusterInfo:
    handle = _field(record, "handle")
    res = getattr(handle, "launched_resources", None)
    ips = getattr(handle, "stable_internal_external_ips", None) or []
    internal = ips[0][0] if ips else None
    head = getattr(handle, "head_ip", None) if handle is not None else None
    cloud = getattr(res, "cloud", None)
    return ClusterInfo(
        name=str(_field(record, "name")),
        status=_enum_value(_field(record, "status")),
        head_ip=head,
        internal_ip=internal,
        cloud=str(cloud).lower() if cloud is not None else _field(record, "cloud"),
        region=getattr(res, "region", None) or _field(record, "region"),
        zone=getattr(res, "zone", None),
        instance_type=getattr(res, "instance_type", None),
        use_spot=bool(getattr(res, "use_spot", False)),
        accelerators=_field(record, "accelerators"),
        autostop_minutes=int(_field(record, "autostop", -1) or -1),
        autodown=bool(_field(record, "to_down", False)),
    )


# --- errors: SkyPilot's exceptions -> one line that says what to do ----------------------------------

_QUOTA_RE = re.compile(r"quota|limitexceeded|VcpuLimitExceeded|QUOTA_EXCEEDED|exceeded .*limit", re.IGNORECASE)
_CAPACITY_RE = re.compile(
    r"InsufficientInstanceCapacity|capacity|ZONE_RESOURCE_POOL_EXHAUSTED|stockout|SkuNotAvailable|unavailable",
    re.IGNORECASE,
)


def describe_sky_error(exc: BaseException, what: str) -> CloudError:
    """A SkyPilot exception as a CloudError whose message is one line saying what to do."""
    from sky import exceptions as sx

    text = first_line(str(exc)) or type(exc).__name__
    history = " ".join(str(e) for e in getattr(exc, "failover_history", []) or [])
    if isinstance(exc, sx.ResourcesUnavailableError):
        if _QUOTA_RE.search(text) or _QUOTA_RE.search(history):
            return CloudError(
                f"{what}: the cloud refused for lack of quota ({text}); request a GPU quota increase in the "
                "cloud console, or try another region (--region) or GPU (--gpu)"
            )
        if _CAPACITY_RE.search(history) or not history:
            return CloudError(
                f"{what}: no capacity for the requested GPUs ({text}); try another region (--region), another "
                "GPU (--gpu), --spot/--on-demand, or later"
            )
        return CloudError(f"{what}: resources unavailable ({text}); try another region (--region) or GPU (--gpu)")
    if isinstance(exc, (sx.NoCloudAccessError, sx.CloudUserIdentityError, sx.InvalidCloudCredentials,
                        sx.InvalidCloudConfigs)):
        return CloudError(f"{what}: no usable cloud credentials ({text}); run `sky check` and set up the cloud")
    if isinstance(exc, sx.NotSupportedError):
        return CloudError(f"{what}: not supported by SkyPilot on this cloud ({text}); pick another --cloud")
    if isinstance(exc, sx.ClusterOwnerIdentityMismatchError):
        return CloudError(f"{what}: the cluster belongs to another cloud identity ({text})")
    if isinstance(exc, sx.ClusterNotUpError):
        return CloudError(f"{what}: the cluster is not up ({text}); `sky status` shows it")
    if isinstance(exc, (sx.ApiServerConnectionError, sx.APIVersionMismatchError)):
        return CloudError(f"{what}: cannot use the SkyPilot API server ({text}); `sky api status` / `sky api start`")
    if isinstance(exc, sx.CloudError):
        return CloudError(f"{what}: {exc.cloud_provider} refused ({text})")
    return CloudError(f"{what}: SkyPilot failed: {text}")


@contextlib.contextmanager
def translate_errors(what: str) -> Iterator[None]:
    """SkyPilot's exceptions leave as CloudError (the original as __cause__); ours and Ctrl-C pass."""
    from mistral_deploy.errors import MistralDeployError

    try:
        yield
    except (KeyboardInterrupt, MistralDeployError):
        raise
    except Exception as exc:
        error = describe_sky_error(exc, what)
        raise error from exc


# --- which SkySdk: the real one, or the one a test installed -------------------------------------------

_override: Optional[Any] = None


def get_sdk() -> SkySdk:
    return _override if _override is not None else SkySdk()


def set_sdk(sdk: Optional[Any]) -> None:
    """Install a stand-in for SkySdk (tests: a fake at the SkyPilot boundary); None restores the real one."""
    global _override
    _override = sdk
