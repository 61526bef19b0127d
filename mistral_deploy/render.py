"""Recipe -> SkyPilot task (or SkyServe service): pure and deterministic.

No clock, no randomness, no environment, no network, no `sky` import: the same recipe always renders
the same YAML, which golden files under tests/golden pin. Secrets appear only as `secrets:` entries with
null values, supplied at launch.
"""

from __future__ import annotations

import json
import math
import re
import shlex
from functools import lru_cache
from typing import TYPE_CHECKING, Any, Optional

from mistral_deploy.errors import RecipeError
from mistral_deploy.gateway import (PRIVATE_IP_PLACEHOLDER, UPSTREAM_TIMEOUT_SECONDS, GatewayLayout, listen_host_for,
                                    render_gateway_config, render_keys_map)
from mistral_deploy.templates import render_template, template_text

if TYPE_CHECKING:  # the local backend's `logs` and `status` import this module: no pydantic or yaml on import
    import yaml

    from mistral_deploy.recipe import Recipe

GATEWAY_IMAGE = "nginx:1.28.0-alpine"
# The SHA-256 of each API key, `ID:HASH ...`: the VM never receives a key (gateway.hashes_secret).
KEY_HASHES_SECRET = "MISTRAL_DEPLOY_KEY_HASHES"
# A service's readiness probe sends one key, generated for the probe alone; the gateway lets it ask for
# one token at a low rate (gateway.js), since SkyServe keeps it in clear in the service's spec.
PROBE_KEY_SECRET = "MISTRAL_DEPLOY_PROBE_KEY"
HF_TOKEN_SECRET = "HF_TOKEN"
# Where `up` writes a single VM's Hugging Face token (0600, as HF_TOKEN=... for docker's --env-file); the run
# script waits for it, hands it to the download container and deletes it.
HF_TOKEN_FILE = "~/.mistral-deploy/hf-token.env"
HF_TOKEN_WAIT_SECONDS = 900
# On the VM: the gateway's files, mounted read-only into the nginx container at VM_GATEWAY_DIR.
VM_STATE_DIR = "$HOME/.mistral-deploy"
VM_GATEWAY_DIR = "/etc/mistral-deploy"
# The engine's Unix socket on the VM: $MD_DIR/engine on the host, mounted at VM_ENGINE_DIR in both
# containers. The engine container (root) makes the folder root:GATEWAY_GID 2750 and the socket 0770,
# so that exactly root and the gateway's workers (the nginx image's user, uid/gid 101) can open it.
VM_ENGINE_DIR = "/run/mistral-deploy"
VM_ENGINE_SOCKET = f"{VM_ENGINE_DIR}/engine.sock"
# The usage records ($MD_DIR/usage on the host): the gateway's access log copy, the engine's usage plugin's
# engine.jsonl; mounted in both containers. The plugin itself: $MD_DIR/engine-plugin, on the engine's
# PYTHONPATH. At USAGE_MAX_BYTES a record is rotated, USAGE_BACKUPS kept (as the containers' logs).
VM_USAGE_DIR = "/md-usage"
VM_PLUGIN_DIR = "/md-plugin"
USAGE_MAX_BYTES = 20 * 1024 * 1024
USAGE_BACKUPS = 5
GATEWAY_USER, GATEWAY_GID = "nginx", 101
# A SkyServe replica's gateway admits its load balancer's address alone: the controller's, known only once
# the controller runs, so it reaches the replica as this variable (`up` sets it) and the run script puts
# it where the placeholder is in the gateway's config.
LOAD_BALANCER_ENV = "MISTRAL_DEPLOY_LOAD_BALANCER"
LOAD_BALANCER_PLACEHOLDER = "__MISTRAL_DEPLOY_LOAD_BALANCER__"
# What replicas admit until the controller's address is known (TEST-NET-1: no such host).
NO_ADDRESS_YET = "192.0.2.1"
# Docker's json-file logs of each container are rotated: at most LOG_FILES files of LOG_MAX_SIZE.
LOG_MAX_SIZE, LOG_FILES = "50m", 3


def uses_mistral_tokenizer(vllm_args: list[str]) -> bool:
    """--tokenizer-mode mistral: mistral_common's chat format, which takes no chat template."""
    for i, arg in enumerate(vllm_args):
        if arg == "--tokenizer-mode" and i + 1 < len(vllm_args):
            value = vllm_args[i + 1]
        elif arg.startswith("--tokenizer-mode="):
            value = arg.split("=", 1)[1]
        else:
            continue
        if value == "mistral":
            return True
    return False


def guardrail_chat_template() -> str:
    """templates/guardrail_chat_template.jinja on one line (its lines are whole Jinja tags)."""
    from mistral_deploy.templates import template_text

    return "".join(line.strip() for line in template_text("guardrail_chat_template.jinja").splitlines())


NO_MEDIA_DOMAIN = "media.invalid"


def hf_token_file(node: int = 0) -> str:
    """Where node `node` of a cluster waits for the token: a file of its own (nodes may share their home)."""
    return HF_TOKEN_FILE if node == 0 else HF_TOKEN_FILE.replace(".env", f"-node{node}.env")


def engine_args(recipe: Recipe, *, model: str, socket: str, model_positional: bool = False,
                tensor_parallel: bool = True) -> list[str]:
    """The vLLM server's arguments, shared by the local backend and the VM. Never a secret.

    socket: the Unix socket the engine serves on (`--uds`); it has no TCP listener, so nothing on the
    machine but the gateway (which alone may open the socket's folder) can reach it or take its place.

    model_positional: the model as the first argument, as `vllm serve MODEL` (the official image's
    entrypoint) wants it; `--model` otherwise (`python -m vllm.entrypoints.openai.api_server`).
    tensor_parallel: include `--tensor-parallel-size`; the VM's run script adds it itself, from the GPUs
    SkyPilot actually gave ($SKYPILOT_NUM_GPUS_PER_NODE), so that GPU candidates with different counts
    (A100-80GB:1, L40S:2) all work, unless the recipe fixes it (`resources.tensor_parallel`).
    """
    m = recipe.model
    if m.source:  # the bucket `mistral-deploy cache` filled: streamed by vLLM's Run:ai model streamer
        model = m.source
    args: list[str] = [model] if model_positional else []
    if m.revision and not m.source:
        args += ["--revision", m.revision]
    if m.dtype != "auto":
        args += ["--dtype", m.dtype]
    if m.quantization:
        args += ["--quantization", m.quantization]
    if m.max_model_len:
        args += ["--max-model-len", str(m.max_model_len)]
    if tensor_parallel and recipe.tensor_parallel_size > 1:
        args += ["--tensor-parallel-size", str(recipe.tensor_parallel_size)]
    if not recipe.is_local:
        args += ["--gpu-memory-utilization", str(recipe.engine.gpu_memory_utilization)]
    if m.task == "embed":
        args += ["--runner", "pooling"]
    user_args, generation = _split_generation_config(list(m.vllm_args))
    if m.source:
        # the bucket holds the Hub's (Transformers) layout: config.json and model*.safetensors, streamed
        args += ["--load-format", STREAMED_LOAD_FORMAT]
        user_args = without_flags(user_args, _FORMAT_FLAGS)
    args += user_args
    if m.task == "generate" and not m.media_domains:
        # A chat request's image may be a URL, which the engine would fetch from inside the VM: the cloud's
        # metadata service, the VPC. vLLM fetches remote media only from --allowed-media-domains (an exact
        # host name, vllm/multimodal/media/connector.py); given only a reserved name that never resolves
        # (RFC 2606's .invalid), it fetches none and takes base64 data: URLs alone. A recipe may name its
        # own domains in model.vllm_args.
        args += ["--allowed-media-domains", NO_MEDIA_DOMAIN]
    if recipe.guardrail and m.task == "generate" and not uses_mistral_tokenizer(user_args):
        # a model's own Hugging Face template may drop a leading system message (Mistral v0.3's unless the
        # last turn is the user's) or refuse it (v0.2's): ours keeps the guardrail first in every prompt
        args += ["--chat-template", guardrail_chat_template()]
    # The engine's own output cap (limits.max_tokens): requests that give no max_tokens get it, larger
    # ones are clamped (the gateway refuses them before they arrive). Merged into the recipe's own
    # --override-generation-config, if it has one.
    generation["max_new_tokens"] = min(int(generation.get("max_new_tokens") or recipe.limits.max_tokens),
                                       recipe.limits.max_tokens)
    if m.task == "generate":
        args += ["--override-generation-config", json.dumps(generation, sort_keys=True, separators=(",", ":"))]
    # Ours come last: where the engine listens and what it serves win over anything before them.
    if not model_positional:
        args += ["--model", model]
    args += [
        "--served-model-name", recipe.served_model_name,
        "--uds", socket,
    ]
    return args


# How the engine loads a bucket source, and the recipe's flags that named another layout (Mistral's own).
STREAMED_LOAD_FORMAT = "runai_streamer"
_FORMAT_FLAGS = ("--load-format", "--config-format")


def without_flags(args: list[str], flags: tuple[str, ...]) -> list[str]:
    """args without these flags and their values (`--flag value` or `--flag=value`)."""
    kept: list[str] = []
    i = 0
    while i < len(args):
        flag = args[i].split("=", 1)[0].replace("_", "-")
        if flag in flags:
            i += 1 if "=" in args[i] else 2
            continue
        kept.append(args[i])
        i += 1
    return kept


def _split_generation_config(args: list[str]) -> tuple[list[str], dict[str, Any]]:
    """The recipe's vLLM arguments without --override-generation-config, and that flag's JSON."""
    rest: list[str] = []
    config: dict[str, Any] = {}
    i = 0
    while i < len(args):
        flag, eq, value = args[i].partition("=")
        if flag.replace("_", "-") == "--override-generation-config":
            if not eq:
                i += 1
                value = args[i] if i < len(args) else "{}"
            try:
                parsed = json.loads(value)
            except ValueError:
                raise RecipeError("model.vllm_args: --override-generation-config needs a JSON object") from None
            if not isinstance(parsed, dict):
                raise RecipeError("model.vllm_args: --override-generation-config needs a JSON object")
            config.update(parsed)
        else:
            rest.append(args[i])
        i += 1
    return rest, config


def vm_gateway_tls(recipe: Recipe) -> bool:
    """TLS on the VM's gateway. A SkyServe replica is reached by the load balancer and the readiness
    prober over plain HTTP (SkyServe prefixes replica endpoints with http://), so TLS ends at the load
    balancer (`service.tls`) instead."""
    return recipe.tls_enabled and recipe.replicas is None


def vm_gateway_layout(recipe: Recipe) -> GatewayLayout:
    tls = vm_gateway_tls(recipe)
    return GatewayLayout(
        listen_host=listen_host_for(recipe.network.mode),
        port=recipe.network.port,
        engine_socket=VM_ENGINE_SOCKET,
        keys_file=f"{VM_GATEWAY_DIR}/api_keys.map",
        js_file=f"{VM_GATEWAY_DIR}/gateway.js",
        user=f"{GATEWAY_USER} {GATEWAY_USER}",
        pid_file="/tmp/nginx.pid",
        error_log="/dev/stderr",
        access_log="/dev/stdout",
        usage_log=f"{VM_USAGE_DIR}/access.log",
        # nginx creates only the last folder of a temp path: /tmp exists in every image, /tmp/nginx does not
        temp_dir="/tmp",
        tls_cert=f"{VM_GATEWAY_DIR}/tls/cert.pem" if tls else None,
        tls_key=f"{VM_GATEWAY_DIR}/tls/key.pem" if tls else None,
    )


def _resources(recipe: Recipe, *, cancel_autostop: bool = False) -> dict[str, Any]:
    res = recipe.resources
    out: dict[str, Any] = {}
    infras = [_infra(res.region_for(cloud), cloud) for cloud in res.clouds]
    if len(infras) == 1:
        out["infra"] = infras[0]
    out["disk_size"] = res.disk_size
    if recipe.network.mode in ("public", "vpc"):
        # public: opened to the world, the gateway enforcing network.allow; vpc: the VM has only a private
        # address, so the opened port is reachable inside the VPC alone. SkyServe replicas need it too: the
        # load balancer reaches each replica at this port.
        out["ports"] = [recipe.network.port]
    if recipe.lifetime.ttl:
        # A serving job never goes idle, so the idle rule alone never fires: wait for nothing.
        out["autostop"] = {
            "idle_minutes": max(1, math.ceil(recipe.lifetime.ttl / 60)),
            "down": True,
            "wait_for": "none",
        }
    elif cancel_autostop:
        # A task launched again on a cluster that exists: without `autostop`, SkyPilot sets the cluster's
        # previous autostop again (sky/execution.py); `false` cancels it, so a TTL removed stays removed.
        out["autostop"] = False
    choices: list[dict[str, Any]] = []
    # A task falls back from spot to on-demand through ordered choices; a service cannot mix them
    # (SkyServe wants all spot or none) and falls back through its replica policy instead.
    ordered_fallback = res.spot and res.spot_fallback and recipe.replicas is None
    spot_modes = [True, False] if ordered_fallback else [res.spot]
    # Several clouds: every cloud x GPU x spot choice, in order of preference; SkyPilot skips the ones a
    # cloud does not offer and fails over to the next on a capacity error.
    for infra in (infras if len(infras) > 1 else [None]):
        for gpu in res.gpu or [None]:
            for spot in spot_modes:
                choice: dict[str, Any] = {}
                if infra is not None:
                    choice["infra"] = infra
                if gpu is not None:
                    choice["accelerators"] = str(gpu)
                choice["use_spot"] = spot
                choices.append(choice)
    if len(choices) == 1:
        out.update(choices[0])
    else:
        out["ordered"] = choices
    return out


def _infra(region: Optional[str], cloud: str) -> str:
    return f"{cloud}/{region}" if region else cloud


def _model_source(recipe: Recipe) -> str:
    """What the engine loads: the Hub id, or the folder a built-in model is built into on the VM."""
    if recipe.builtin_model:
        return f"/models/{recipe.builtin_model}"
    return recipe.model.id


def render_setup(recipe: Recipe) -> str:
    return render_template(
        "setup.sh.j2",
        recipe=recipe,
        state_dir=VM_STATE_DIR,
        gateway_config=render_gateway_config(
            recipe, vm_gateway_layout(recipe), tls=vm_gateway_tls(recipe),
            allow=[LOAD_BALANCER_PLACEHOLDER] if recipe.replicas is not None else None),
        gateway_js=template_text("gateway.js"),
        vllm_image=recipe.engine.image,
        gateway_image=GATEWAY_IMAGE,
        tls=vm_gateway_tls(recipe),
        builtin_model=recipe.builtin_model,
        tiny_model_builder=template_text("build_tiny_model.py") if recipe.builtin_model else "",
        multi_node=recipe.resources.num_nodes > 1,
    )


def render_gateway_reload(recipe: Recipe, *, config: bool, hashes: Optional[dict[str, str]] = None) -> str:
    """The script that applies a gateway change on a running single VM (over SSH): its configuration
    (`config`), its keys (`hashes`: {id: SHA-256}), or both, then a reload."""
    if recipe.replicas is not None:
        raise ValueError("a SkyServe service's replicas are changed with `sky serve update`")
    return render_template(
        "reload.sh.j2",
        deployment=recipe.name,
        state_dir=VM_STATE_DIR,
        gateway_dir=VM_GATEWAY_DIR,
        pid_file=vm_gateway_layout(recipe).pid_file,
        gateway_config=render_gateway_config(recipe, vm_gateway_layout(recipe), tls=vm_gateway_tls(recipe))
        if config else "",
        vpc=recipe.network.mode == "vpc",
        private_ip_placeholder=PRIVATE_IP_PLACEHOLDER,
        keys_map=render_keys_map(hashes) if hashes is not None else "",
    )


def _weights_pattern(recipe: Recipe) -> str:
    """The weights files the engine loads: Mistral's consolidated format with `--load-format mistral`."""
    args = recipe.model.vllm_args
    for i, arg in enumerate(args):
        value = arg.split("=", 1)[1] if arg.startswith("--load-format=") else (
            args[i + 1] if arg == "--load-format" and i + 1 < len(args) else None)
        if value == "mistral":
            return "consolidated*.safetensors"
    return "*.safetensors"


def from_hub(recipe: Recipe) -> bool:
    """The VM downloads the weights from the Hugging Face Hub (not a built-in model, a bucket, or a path)."""
    from mistral_deploy.recipe import BUILTIN_MODEL_PREFIX

    return not (recipe.model.source or recipe.model.id.startswith(("/", ".", "~", BUILTIN_MODEL_PREFIX)))


def _instance_role_bucket(recipe: Recipe) -> bool:
    """The engine reads an s3:// bucket as the AWS instance's role: only when the VM may be on AWS (the run
    script asks SkyPilot which cloud it is on). GCP's and Azure's metadata services answer containers on
    Docker's bridge, and an S3-compatible store elsewhere has no instance role: there the engine stays on
    the bridge, out of reach of the VM's credentials and loopback services."""
    clouds = recipe.resources.clouds
    return bool(recipe.model.source and recipe.model.source.startswith("s3://") and (not clouds or "aws" in clouds))


# In each container, before its server: wait on the run script's lifeline (templates/run.sh.j2) and, once
# it closes (the script gone), stop the server (PID 1, which handles SIGTERM: vLLM and nginx both do).
LIFELINE_WATCH = (f"[ -p {VM_ENGINE_DIR}/lifeline ] && {{ cat {VM_ENGINE_DIR}/lifeline >/dev/null 2>&1; "
                  "kill -TERM 1; } &")


# A multi-node engine's rendezvous on the head's private address (vLLM's --master-port, its default): the
# torch.distributed store; the workers' message queues take free ports on each node's private address.
ENGINE_MASTER_PORT = 29501


def render_run(recipe: Recipe) -> str:
    from mistral_deploy.engine import usage_plugin_files

    args = engine_args(recipe, model=_model_source(recipe), socket=VM_ENGINE_SOCKET, model_positional=True,
                       tensor_parallel=False)
    aws_region = recipe.resources.region_for("aws") if "aws" in recipe.resources.clouds else None
    return render_template(
        "run.sh.j2",
        recipe=recipe,
        state_dir=VM_STATE_DIR,
        gateway_dir=VM_GATEWAY_DIR,
        vllm_image=recipe.engine.image,
        gateway_image=GATEWAY_IMAGE,
        engine_dir=VM_ENGINE_DIR,
        engine_socket=VM_ENGINE_SOCKET,
        lifeline_watch=LIFELINE_WATCH,
        gateway_gid=GATEWAY_GID,
        nofile=2 * recipe.limits.max_connections + 64,
        log_opts=f"--log-opt max-size={LOG_MAX_SIZE} --log-opt max-file={LOG_FILES}",
        engine_args=" ".join(shlex.quote(a) for a in args),
        engine_env=sorted(recipe.engine.env),
        tensor_parallel=recipe.resources.tensor_parallel or "",
        multi_node=recipe.resources.num_nodes > 1,
        num_nodes=recipe.resources.num_nodes,
        master_port=ENGINE_MASTER_PORT,
        hf_token=recipe.model.needs_hf_token,
        token_by_ssh=recipe.model.needs_hf_token and recipe.replicas is None,
        token_file=HF_TOKEN_FILE.replace("~", "$HOME", 1),
        token_wait=HF_TOKEN_WAIT_SECONDS,
        hub_download=from_hub(recipe),
        downloader=template_text("download_model.py") if from_hub(recipe) else "",
        download_args=" ".join(shlex.quote(a) for a in (recipe.model.id, recipe.model.revision or "",
                                                        _weights_pattern(recipe))),
        builtin_model=recipe.builtin_model,
        bucket_source=recipe.model.source,
        instance_role_bucket=_instance_role_bucket(recipe),
        aws_only=recipe.resources.clouds == ["aws"],
        # the region the role's bucket is asked in, unless the recipe's engine.env gives it
        aws_region=aws_region if aws_region and re.fullmatch(r"[a-z0-9-]+", aws_region) else "",
        set_region=not {"AWS_REGION", "AWS_DEFAULT_REGION"} & set(recipe.engine.env),
        vpc=recipe.network.mode == "vpc",
        key_hashes_secret=KEY_HASHES_SECRET,
        load_balancer_env=LOAD_BALANCER_ENV if recipe.replicas is not None else None,
        load_balancer_placeholder=LOAD_BALANCER_PLACEHOLDER,
        usage_dir=VM_USAGE_DIR,
        plugin_dir=VM_PLUGIN_DIR,
        usage_plugin=usage_plugin_files(),
        usage_max_bytes=USAGE_MAX_BYTES,
        usage_backups=USAGE_BACKUPS,
    )


def _config_overrides(recipe: Recipe) -> Optional[dict[str, Any]]:
    """Per-task SkyPilot config for vpc mode: only the keys SkyPilot lets a task override (gcp/azure vpc_name)."""
    if recipe.network.mode != "vpc":
        return None
    config = {cloud: {"vpc_name": recipe.network.vpc_name_for(cloud)} for cloud in recipe.resources.clouds
              if cloud in ("gcp", "azure") and recipe.network.vpc_name_for(cloud)}
    return config or None  # aws: vpc_names is a global config key, passed at launch (see cloud_config)


def cloud_config(recipe: Recipe) -> dict[str, Any]:
    """SkyPilot global config keys this recipe needs at launch.

    `use_internal_ips` (every cloud) and `aws.vpc_names` are not task overrides in SkyPilot 0.14
    (constants.OVERRIDEABLE_CONFIG_KEYS_IN_TASK), so they travel as config (`--config` / the config file).
    """
    if recipe.network.mode != "vpc":
        return {}
    config: dict[str, Any] = {}
    for cloud in recipe.resources.clouds:
        if cloud not in ("aws", "gcp", "azure"):
            continue
        config[cloud] = {"use_internal_ips": True}
        if cloud == "aws":
            config[cloud]["vpc_names"] = [recipe.network.vpc_name_for("aws")]
    return config


def _service(recipe: Recipe) -> dict[str, Any]:
    assert recipe.replicas is not None
    reps = recipe.replicas
    service: dict[str, Any] = {
        "readiness_probe": {
            "path": "/v1/completions" if recipe.model.task == "generate" else "/v1/embeddings",
            "post_data": (
                {"model": recipe.served_model_name, "prompt": "ping", "max_tokens": 1}
                if recipe.model.task == "generate"
                else {"model": recipe.served_model_name, "input": "ping"}
            ),
            "initial_delay_seconds": int(recipe.health.readiness_timeout),
            "timeout_seconds": int(recipe.health.probe_timeout),
            # the value comes from the probe key secret at launch, never from this file
            "headers": {"Authorization": f"Bearer ${{{PROBE_KEY_SECRET}}}"},
        },
        "ports": recipe.network.port,
        # the load balancer gives up on a response silent for longer (120 s by default) than the gateway
        # behind it waits for the engine: wait as long
        "load_balancer": {"stream_timeout_seconds": UPSTREAM_TIMEOUT_SECONDS},
    }
    autoscale = reps.max is not None and reps.max != reps.min
    spot_fallback = recipe.resources.spot and recipe.resources.spot_fallback
    if not autoscale and not spot_fallback:
        service["replicas"] = reps.min
    else:
        policy: dict[str, Any] = {"min_replicas": reps.min}
        if autoscale:
            policy["max_replicas"] = reps.max
            if reps.target_qps is not None:
                policy["target_qps_per_replica"] = reps.target_qps
        if spot_fallback:
            # replicas run on spot; SkyServe launches on-demand ones while spot is unavailable
            policy["dynamic_ondemand_fallback"] = True
        service["replica_policy"] = policy
    if recipe.tls_enabled:
        service["tls"] = {"keyfile": "~/.mistral-deploy/service-tls/key.pem",
                          "certfile": "~/.mistral-deploy/service-tls/cert.pem"}
    return service


def render_task(recipe: Recipe, *, cancel_autostop: bool = False) -> dict[str, Any]:
    """The SkyPilot task config for a recipe; with `replicas:` it carries a `service:` section.
    cancel_autostop: the task is launched again on a cluster that exists; without a TTL it says
    `autostop: false`, cancelling whatever autodown the cluster had."""
    if recipe.is_local:
        raise RecipeError(
            "resources.cloud: 'local' runs without SkyPilot and renders no task; "
            "use `mistral-deploy up --cloud local`, or render for a cloud (--cloud aws)"
        )
    task: dict[str, Any] = {"name": recipe.name, "resources": _resources(recipe, cancel_autostop=cancel_autostop)}
    if recipe.resources.num_nodes > 1:
        task["num_nodes"] = recipe.resources.num_nodes  # setup and run on each; the run script finds its role
    envs: dict[str, Optional[str]] = dict(sorted(recipe.engine.env.items()))
    if recipe.replicas is not None:
        envs[LOAD_BALANCER_ENV] = None  # the load balancer's address, given at `up` (SkyPilot requires it)
    if envs:
        task["envs"] = envs
    secrets: dict[str, None] = {KEY_HASHES_SECRET: None}
    if recipe.replicas is not None:
        secrets[PROBE_KEY_SECRET] = None
    if recipe.model.needs_hf_token and recipe.replicas is not None:
        # a service's controller launches replicas later, with no SSH from here: the token goes as a secret.
        # A single VM gets it over SSH once its job runs (HF_TOKEN_FILE), never through SkyPilot.
        secrets[HF_TOKEN_SECRET] = None
    task["secrets"] = secrets
    config = _config_overrides(recipe)
    if config:
        task["config"] = config
    if recipe.replicas is not None:
        task["service"] = _service(recipe)
    task["setup"] = render_setup(recipe)
    task["run"] = render_run(recipe)
    return task


def admit_load_balancer(task_config: dict[str, Any], addresses: list[str]) -> dict[str, Any]:
    """A service's task with the address(es) of its load balancer, the only one its replicas admit."""
    task_config.setdefault("envs", {})[LOAD_BALANCER_ENV] = " ".join(addresses)
    return task_config


def _str_representer(dumper: yaml.SafeDumper, data: str) -> yaml.Node:
    style = "|" if "\n" in data else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", data, style=style)


@lru_cache(maxsize=1)
def _dumper() -> type[yaml.SafeDumper]:
    from mistral_deploy.yaml_lib import import_yaml

    yaml = import_yaml()

    # libyaml's emitter where PyYAML has it: the same text, ten times sooner than the pure-Python one
    class Dumper(getattr(yaml, "CSafeDumper", yaml.SafeDumper)):  # type: ignore[misc]
        pass

    Dumper.add_representer(str, _str_representer)
    return Dumper


def dump_yaml(data: dict[str, Any]) -> str:
    from mistral_deploy.yaml_lib import import_yaml

    yaml = import_yaml()

    return yaml.dump(data, Dumper=_dumper(), sort_keys=False, default_flow_style=False, width=100)
