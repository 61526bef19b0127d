"""The recipe: a declarative description of one deployment, validated into typed models.

Shape is checked by pydantic (extra keys forbidden, field paths in errors); relations between
fields are checked in `Recipe._check_relations`. Loading a recipe from a file or a built-in name,
and applying CLI overrides, happen in `load_recipe`, which turns every problem into a one-line
`RecipeError` naming the file, the field path (or the flag) and what is expected.
"""

from __future__ import annotations

import difflib
import ipaddress
import itertools
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Union

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    WithJsonSchema,
    field_validator,
    model_validator,
)

from mistral_deploy import resources_dir
from mistral_deploy.errors import RecipeError
from mistral_deploy.infra import canonical_cloud

DEFAULT_VLLM_IMAGE = "vllm/vllm-openai:v0.32.0"
DEFAULT_RECIPE = "mistral-7b-instruct"
LOCAL_CLOUD = "local"
BUILTIN_MODEL_PREFIX = "builtin:"

_NAME_RE = re.compile(r"^[a-z]([-a-z0-9]{0,33}[a-z0-9])?$")
_GPU_RE = re.compile(r"^(?P<name>[A-Za-z][A-Za-z0-9._-]*)(:(?P<count>[0-9]+))?$")
_ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_DURATION_RE = re.compile(r"^(?P<n>[0-9]+)\s*(?P<unit>s|m|h|d)?$")
_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, None: 1}
# Names that hold secrets travel as SkyPilot `secrets:`, never as plain `engine.env` values.
# a bucket and a prefix: the object store's URL as vLLM's Run:ai streamer takes it
SOURCE_RE = re.compile(r"^(s3|gs|az)://[a-z0-9][a-z0-9._-]{1,253}[a-z0-9](/[A-Za-z0-9._/-]*)?$")
_SERVED_NAME_RE = re.compile(r"^[A-Za-z0-9._/:-]{1,128}$")
# Engine flags mistral-deploy sets itself: where the engine listens (never beyond 127.0.0.1), what it
# serves, and nothing that would bypass the gateway or read another config.
_HOST_RE = re.compile(r"^(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$")
_OWNED_ENGINE_FLAGS = ("--host", "--port", "--uds", "--api-key", "--model", "--served-model-name",
                       "--tensor-parallel-size", "--config", "--root-path", "--ssl-keyfile", "--ssl-certfile",
                       "--allowed-origins")
# (an Azure storage account key, or a connection string that holds one: AZURE_STORAGE_ACCOUNT_KEY,
# AZURE_STORAGE_CONNECTION_STRING, which the Run:ai streamer would read)
_SECRET_ENV_RE = re.compile(r"(TOKEN|SECRET|PASSWORD|API_KEY|PRIVATE_KEY|ACCOUNT_KEY|CONNECTION_STRING)",
                            re.IGNORECASE)
# The storage account of an az://CONTAINER/PREFIX source: the Run:ai streamer reads it from this variable
# (runai_model_streamer_azure 0.17: credentials.AzureCredentials, and its C++ reader the same).
AZURE_ACCOUNT_ENV = "AZURE_STORAGE_ACCOUNT_NAME"
# What a vpc-mode gateway admits by default: the private address ranges (RFC 1918, IPv6 ULA).
PRIVATE_RANGES = ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "fc00::/7")


# `--ttl none`: an endpoint with no end time (`run` on a cloud otherwise gets a default TTL).
NO_TTL = ("none", "never")


def parse_duration(value: object) -> object:
    """'90s', '30m', '4h', '1d' or a bare number of seconds -> seconds."""
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        match = _DURATION_RE.match(value.strip())
        if match:
            return int(match["n"]) * _DURATION_UNITS[match["unit"]]
    raise ValueError("expected a duration such as 90s, 30m, 4h or 1d (a bare number means seconds)")


# The JSON Schema (`mistral-deploy schema`) accepts the same shorthands as loading does.
_DURATION_JSON_SCHEMA: dict[str, Any] = {
    "anyOf": [
        {"type": "integer", "exclusiveMinimum": 0, "description": "seconds"},
        {"type": "string", "pattern": r"^\s*[0-9]+\s*[smhd]?\s*$", "description": "90s, 30m, 4h or 1d"},
    ]
}
Duration = Annotated[int, BeforeValidator(parse_duration), Field(gt=0), WithJsonSchema(_DURATION_JSON_SCHEMA)]


def format_duration(seconds: int) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def size_bytes(size: str) -> int:
    """A size as nginx writes it ("1m", "512k", "4096") in bytes."""
    scale = {"k": 1024, "m": 1024 * 1024}.get(size[-1:].lower(), 1)
    return int(size.rstrip("kKmM")) * scale


def media_body_bytes(media: int) -> int:
    """The request body that carries one media part of `media` bytes: base64's 4 bytes per 3, and 64 KiB for
    the rest of the request (the messages' text, the JSON around them)."""
    return -(-media // 3) * 4 + 64 * 1024


class _Spec(BaseModel):
    # Empty defaults come from lambdas, not `list` or `dict`: pydantic reads a default factory's signature,
    # and a builtin's is parsed with the tokenizer (milliseconds of every command that loads a recipe).
    model_config = ConfigDict(extra="forbid", validate_default=True)


_GPU_OBJECT_JSON_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "count": {"type": "integer", "minimum": 1, "maximum": 16}},
    "required": ["name"],
    "additionalProperties": False,
}
_GPU_STRING_JSON_SCHEMA: dict[str, Any] = {"type": "string", "pattern": _GPU_RE.pattern, "description": "NAME:COUNT"}
_GPUS_JSON_SCHEMA: dict[str, Any] = {
    "anyOf": [
        _GPU_STRING_JSON_SCHEMA,
        _GPU_OBJECT_JSON_SCHEMA,
        {"type": "array", "items": {"anyOf": [_GPU_STRING_JSON_SCHEMA, _GPU_OBJECT_JSON_SCHEMA]}},
    ],
    "description": "NAME:COUNT, or a list of candidates in order of preference",
}


class GpuRequest(_Spec):
    """One accelerator choice, written `NAME:COUNT` in YAML."""

    name: str
    count: int = Field(1, ge=1, le=16)

    def __str__(self) -> str:
        return f"{self.name}:{self.count}"


def _parse_gpus(value: object) -> object:
    items = value if isinstance(value, list) else [value]
    if value is None or items == []:
        return []
    parsed = []
    for item in items:
        if isinstance(item, dict):
            parsed.append(item)
            continue
        match = _GPU_RE.match(str(item).strip())
        if not match:
            raise ValueError(f"expected NAME:COUNT such as A10G:1 or H100:8, got {item!r}")
        parsed.append({"name": match["name"], "count": int(match["count"] or 1)})
    return parsed


# Exactly the values the pinned vLLM (engine.VLLM_VERSION) accepts for --quantization
# (vllm.model_executor.layers.quantization.QUANTIZATION_METHODS; tests/test_quantization.py compares them).
QuantizationMethod = Literal[
    "awq", "auto_awq", "fp8", "fbgemm_fp8", "fp_quant", "modelopt", "modelopt_fp4", "modelopt_mxfp8",
    "modelopt_mixed", "auto_gptq", "gptq", "gptq_marlin", "awq_marlin", "humming", "compressed-tensors",
    "experts_int8", "quark", "moe_wna16", "torchao", "inc", "mxfp4", "gpt_oss_mxfp4", "deepseek_v4_fp8",
    "online", "fp8_per_tensor", "fp8_per_block", "fp8_per_channel", "int8_per_channel_weight_only",
    "nvfp4_per_token", "mxfp8",
]


def _media_domains(args: list[str]) -> list[str]:
    """The values of --allowed-media-domains in engine arguments (`--flag A B` or `--flag="A B"`)."""
    found: list[str] = []
    for i, arg in enumerate(args):
        if arg.startswith("--allowed-media-domains="):
            found += arg.split("=", 1)[1].split()
        elif arg == "--allowed-media-domains":
            found += itertools.takewhile(lambda a: not a.startswith("-"), args[i + 1:])
    return found


class Architecture(_Spec):
    """What the fit check needs to know about a model it has no table entry for."""

    params_b: float = Field(gt=0, description="total parameters of the language model (every expert of a "
                                              "mixture of experts), in billions")
    layers: int = Field(gt=0)
    kv_heads: Optional[int] = Field(None, gt=0, description="KV heads (config.json num_key_value_heads); not "
                                                            "with mla_kv_dim")
    head_dim: Optional[int] = Field(None, gt=0, description="not with mla_kv_dim")
    # the token embeddings and the output head (vocab x hidden each) are never quantized
    hidden: Optional[int] = Field(None, gt=0, description="hidden size (config.json hidden_size)")
    vocab: Optional[int] = Field(None, gt=0, description="vocabulary size (config.json vocab_size)")
    active_params_b: Optional[float] = Field(
        None, gt=0, description="a mixture of experts: the parameters each token uses, in billions (what decoding "
                                "reads per step; every expert stays in GPU memory)")
    vision_params_b: Optional[float] = Field(
        None, gt=0, description="the vision encoder and its projector, in billions (kept at 16 bits)")
    weights: Optional[Literal["bf16", "fp8", "nvfp4"]] = Field(
        None, description="how the checkpoint stores its linear layers when model.quantization is not set: "
                          "an FP8 or NVFP4 checkpoint (vLLM reads the format from its config)")
    mla_kv_dim: Optional[int] = Field(
        None, gt=0, description="multi-head latent attention: what each layer caches per token (kv_lora_rank + "
                                "qk_rope_head_dim), instead of K and V per KV head")

    @model_validator(mode="after")
    def _kv_shape(self) -> "Architecture":
        if self.mla_kv_dim is None and (self.kv_heads is None or self.head_dim is None):
            raise ValueError("kv_heads and head_dim: both needed (or mla_kv_dim, for multi-head latent attention)")
        if self.active_params_b is not None and self.active_params_b > self.params_b:
            raise ValueError(f"active_params_b: {self.active_params_b:g} is more than params_b ({self.params_b:g})")
        return self


class ModelSpec(_Spec):
    id: str = Field(description="Hugging Face id, local path, or builtin:tiny-mistral")
    revision: Optional[str] = Field(None, description="the Hub branch, tag or commit; with a source, the commit "
                                                      "the bucket holds (`mistral-deploy cache` gives it)")
    source: Optional[str] = Field(
        None, description="a bucket holding the weights (`mistral-deploy cache`): s3://, gs:// or az://BUCKET/PREFIX; "
                          "the engine streams them from there (Run:ai model streamer), with no Hub token")
    served_name: Optional[str] = Field(None, description="model id clients use; defaults to the recipe name")
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    quantization: Optional[QuantizationMethod] = Field(
        None, description="how the checkpoint's weights are quantized (vLLM's --quantization); usually read from "
                          "the checkpoint's config, so only needed to force a kernel")
    max_model_len: Optional[int] = Field(None, ge=16)
    hf_token: bool = Field(False, description="the model is gated: pass HF_TOKEN as a secret at launch")
    task: Literal["generate", "embed"] = "generate"
    vllm_args: list[str] = Field(default_factory=lambda: [], description="extra vLLM engine arguments")
    architecture: Optional[Architecture] = None
    family: Optional[str] = Field(None, max_length=40, description="the model family `recipes` groups it under")
    license: Optional[str] = Field(None, max_length=80, description="the weights' licence, as the model card names it")

    @field_validator("served_name")
    @classmethod
    def _served_name(cls, name: Optional[str]) -> Optional[str]:
        # it reaches the gateway's config and the engine's arguments: no spaces, quotes or nginx syntax
        if name is not None and not _SERVED_NAME_RE.match(name):
            raise ValueError(f"expected 1-128 of A-Z a-z 0-9 . _ / : -, got {name!r}")
        return name

    @field_validator("source")
    @classmethod
    def _bucket(cls, source: Optional[str]) -> Optional[str]:
        if source is not None and not SOURCE_RE.match(source):
            raise ValueError(f"expected s3://BUCKET/PREFIX (or gs://, az://), got {source!r}")
        return source.rstrip("/") if source else source

    @property
    def media_domains(self) -> list[str]:
        """The hosts the engine may fetch a request's media from (the recipe's own --allowed-media-domains);
        none otherwise: base64 data: URLs only."""
        return [host.lower() for host in _media_domains(self.vllm_args)]

    @property
    def needs_hf_token(self) -> bool:
        """The engine's VM downloads a gated model from the Hub (not from a bucket source)."""
        return self.hf_token and not self.source

    @field_validator("vllm_args")
    @classmethod
    def _no_owned_args(cls, args: list[str]) -> list[str]:
        for arg in args:
            if not arg.startswith("--"):
                continue
            # vLLM's parser accepts '_' for '-' and any unambiguous prefix of a flag (--hos = --host)
            flag = arg.split("=", 1)[0].replace("_", "-")
            owned = next((o for o in _OWNED_ENGINE_FLAGS if o.startswith(flag) and len(flag) > 2), None)
            if owned:
                raise ValueError(f"{arg.split('=', 1)[0]} ({owned}) is set by mistral-deploy; "
                                 "use the recipe field instead")
        # the gateway admits media URLs of these hosts alone (gateway.js): exact host names
        for host in _media_domains(args):
            if not _HOST_RE.match(host):
                raise ValueError(f"--allowed-media-domains: expected host names such as images.example.com, "
                                 f"got {host!r}")
        return args


class EngineSpec(_Spec):
    image: str = DEFAULT_VLLM_IMAGE
    gpu_memory_utilization: float = Field(0.9, gt=0.1, le=0.98)
    env: dict[str, str] = Field(default_factory=lambda: {})

    @field_validator("image")
    @classmethod
    def _pinned(cls, image: str) -> str:
        name, _, tag = image.rpartition(":")
        if "@sha256:" in image:
            return image
        if not name or "/" in tag or tag in {"", "latest", "nightly"}:
            raise ValueError(f"expected an image pinned to a released tag such as {DEFAULT_VLLM_IMAGE}, got {image!r}")
        return image

    @field_validator("env")
    @classmethod
    def _plain_env(cls, env: dict[str, str]) -> dict[str, str]:
        for key in env:
            if not _ENV_NAME_RE.match(key):
                raise ValueError(f"{key!r} is not a valid environment variable name")
            if _SECRET_ENV_RE.search(key):
                raise ValueError(
                    f"{key} looks like a secret; secrets are never stored in recipes "
                    "(use model.hf_token: true for HF_TOKEN)"
                )
        return env


def _parse_clouds(value: object) -> object:
    """'aws', 'aws,gcp' or [aws, gcp] -> 'aws' or ['aws', 'gcp'], SkyPilot's names (aliases resolved)."""
    if value is None:
        return None
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, list) or not items:
        raise ValueError("expected a cloud name such as aws, or several in order of preference (aws,gcp)")
    names: list[str] = []
    for item in items:
        name = str(item).strip()
        if not re.match(r"^[a-z][a-z0-9-]*$", name):
            raise ValueError(f"expected a lower-case cloud name such as aws, gcp, azure or local, got {name!r}")
        if name != LOCAL_CLOUD:
            name = canonical_cloud(name)
        if name in names:
            raise ValueError(f"{name} is named twice")
        names.append(name)
    if LOCAL_CLOUD in names and len(names) > 1:
        raise ValueError("local runs on this machine and cannot be combined with clouds")
    return names[0] if len(names) == 1 else names


_PER_CLOUD_JSON_SCHEMA: dict[str, Any] = {
    "anyOf": [{"type": "string"}, {"type": "object", "additionalProperties": {"type": "string"}}],
}
PerCloud = Annotated[Union[str, dict[str, str]], WithJsonSchema(_PER_CLOUD_JSON_SCHEMA)]


class ResourcesSpec(_Spec):
    cloud: Annotated[
        Optional[Union[str, list[str]]],
        BeforeValidator(_parse_clouds),
        WithJsonSchema({"anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}},
                                  {"type": "null"}]}),
    ] = Field(None, description="aws, gcp, azure, kubernetes, slurm, ... or local; several (aws,gcp) in order "
                                "of preference, for SkyPilot to fail over between them")
    region: Optional[PerCloud] = Field(None, description="a region, or one per cloud: {aws: us-east-1, gcp: ...}")
    gpu: Annotated[list[GpuRequest], BeforeValidator(_parse_gpus), WithJsonSchema(_GPUS_JSON_SCHEMA)] = Field(
        default_factory=lambda: [], description="NAME:COUNT, or a list of candidates in order of preference"
    )
    spot: bool = False
    spot_fallback: bool = Field(True, description="fall back to on-demand when spot is unavailable")
    disk_size: int = Field(256, ge=50, le=4096, description="GB")
    tensor_parallel: Optional[int] = Field(None, ge=1, le=16)
    num_nodes: int = Field(1, ge=1, le=16, description="machines the engine spans (a model larger than one node): "
                                                       "tensor parallelism within each, pipeline parallelism across "
                                                       "them; the gateway runs on the first alone")

    @property
    def clouds(self) -> list[str]:
        """The clouds named, in order of preference ([] for any enabled cloud)."""
        if self.cloud is None:
            return []
        return [self.cloud] if isinstance(self.cloud, str) else list(self.cloud)

    def region_for(self, cloud: str) -> Optional[str]:
        return self.region.get(cloud) if isinstance(self.region, dict) else self.region


def _parse_cidrs(value: object) -> object:
    items = value if isinstance(value, list) else [value]
    out = []
    for item in items:
        try:
            out.append(str(ipaddress.ip_network(str(item).strip(), strict=False)))
        except ValueError:
            raise ValueError(f"expected CIDRs such as 10.0.0.0/8 or 203.0.113.7/32, got {item!r}") from None
    return out


class NetworkSpec(_Spec):
    mode: Literal["public", "private", "vpc"] = "public"
    allow: Annotated[
        list[str],
        BeforeValidator(_parse_cidrs),
        WithJsonSchema({"anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}]}),
    ] = Field(
        default_factory=lambda: ["0.0.0.0/0", "::/0"], description="source CIDRs the gateway admits"
    )
    port: int = Field(8443, ge=1, le=65535, description="the gateway port, the only one that listens")
    tls: Optional[bool] = Field(None, description="default: on for public endpoints")
    vpc_name: Optional[PerCloud] = Field(None, description="vpc mode: the VPC, or one per cloud")
    max_body_size: str = Field("1m", pattern=r"^[0-9]+[kKmM]?$",
                               description="largest request body (413 past it); the gateway checks each body in "
                                           "memory, about 4 times its size while the request lasts")

    @model_validator(mode="before")
    @classmethod
    def _vpc_allow(cls, value: object) -> object:
        # inside a VPC the gateway admits the private ranges by default, not the whole internet
        if isinstance(value, dict) and value.get("mode") == "vpc" and value.get("allow") is None:
            return {**value, "allow": list(PRIVATE_RANGES)}
        return value

    def vpc_name_for(self, cloud: str) -> Optional[str]:
        return self.vpc_name.get(cloud) if isinstance(self.vpc_name, dict) else self.vpc_name


class AuthSpec(_Spec):
    enabled: bool = True
    keys: int = Field(1, ge=1, le=16, description="API keys generated at launch")


class LimitsSpec(_Spec):
    """What one client address or one key may take of the endpoint; enforced by the gateway (and the
    output length by the engine too) before any generation starts. Exceeding a rate or concurrency
    limit answers 429 with Retry-After; a request over a size cap answers 400."""

    connections_per_address: int = Field(128, ge=1, le=100000,
                                         description="requests in flight from one client address")
    max_connections: int = Field(16384, ge=256, le=262144,
                                 description="connections the gateway holds at once, per worker (nginx "
                                             "worker_connections; its file-descriptor limit follows)")
    header_timeout: Duration = Field(10, le=300, description="time a client has to send a request's headers")
    body_timeout: Duration = Field(30, le=600, description="longest pause while a client sends a body")
    body_total_timeout: Duration = Field(60, le=3600, description="longest a client may take to send a whole "
                                                                  "request body (refused with 408 past it)")
    requests_per_minute: int = Field(1200, ge=1, le=1000000, description="per API key")
    concurrent_requests: int = Field(64, ge=1, le=100000, description="requests in flight per API key")
    max_n: int = Field(4, ge=1, le=128, description="completions per request (n, best_of)")
    max_batch: int = Field(16, ge=1, le=4096, description="prompts (or embedding inputs) per request")
    max_tokens: int = Field(4096, ge=1, le=1048576,
                            description="output tokens per completion: a larger max_tokens is refused, "
                                        "and the engine caps requests that give none")
    max_media_size: Optional[str] = Field(
        None, pattern=r"^[1-9][0-9]*[kKmM]?$",
        description="largest image (audio, video) one chat message part may carry as a base64 data: URL, "
                    "decoded (400 past it); network.max_body_size follows it unless set. None: the body "
                    "size alone bounds it")


class HealthSpec(_Spec):
    readiness_timeout: Duration = Field(1800, description="how long `up` waits for the endpoint")
    probe_interval: float = Field(1.0, gt=0, le=60, description="seconds between readiness probes")
    probe_timeout: float = Field(30.0, gt=0, le=600, description="seconds one probe may take")


class LifetimeSpec(_Spec):
    ttl: Optional[Duration] = Field(None, description="tear down after this long (SkyPilot autostop, down)")


class ReplicasSpec(_Spec):
    min: int = Field(1, ge=0, le=100)
    max: Optional[int] = Field(None, ge=1, le=100)
    target_qps: Optional[float] = Field(None, gt=0, description="per replica, for autoscaling")
    update: Literal["rolling", "blue-green"] = Field(
        "rolling", description="how `up` applies a change to a running service (sky serve update): replicas "
                               "replaced one at a time, or all switched at once once the new ones are ready")

    @model_validator(mode="before")
    @classmethod
    def _count(cls, value: object) -> object:
        if isinstance(value, int) and not isinstance(value, bool):
            return {"min": value}
        return value

    @model_validator(mode="after")
    def _bounds(self) -> "ReplicasSpec":
        if self.max is not None and self.max < self.min:
            raise ValueError(f"max ({self.max}) must be at least min ({self.min})")
        if self.max is not None and self.max > self.min and self.target_qps is None:
            raise ValueError("autoscaling between min and max needs target_qps")
        if self.min == 0 and not self.max:
            raise ValueError("min 0 scales to zero: give max (at least 1) and target_qps, for requests to wake "
                             "replicas")
        return self


class Recipe(_Spec):
    name: str = Field(description="deployment name: lower-case letters, digits and dashes")
    description: Optional[str] = None
    model: ModelSpec
    engine: EngineSpec = Field(default_factory=EngineSpec)
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec)
    network: NetworkSpec = Field(default_factory=NetworkSpec)
    auth: AuthSpec = Field(default_factory=AuthSpec)
    limits: LimitsSpec = Field(default_factory=LimitsSpec)
    health: HealthSpec = Field(default_factory=HealthSpec)
    lifetime: LifetimeSpec = Field(default_factory=LifetimeSpec)
    guardrail: Optional[Literal["mistral"]] = Field(
        None, description="mistral: every chat request starts with Mistral's guardrail system prompt, set by "
                          "the gateway (a client's own system message comes after it)")
    replicas: Optional[ReplicasSpec] = Field(
        None,
        description="a replica count, or min/max/target_qps: serve with SkyServe",
        # `replicas: 2` is the count shorthand (ReplicasSpec._count)
        json_schema_extra=lambda schema: schema["anyOf"].insert(0, {"type": "integer", "minimum": 0}),
    )

    @field_validator("name")
    @classmethod
    def _name(cls, name: str) -> str:
        if not _NAME_RE.match(name):
            raise ValueError(
                f"expected 1-35 lower-case letters, digits or dashes, starting with a letter, got {name!r}"
            )
        return name

    @model_validator(mode="after")
    def _check_relations(self) -> "Recipe":
        res, net = self.resources, self.network
        if net.mode != "private" and not self.auth.enabled:
            raise ValueError(f"auth.enabled: a {net.mode} endpoint must require API keys (only a private "
                             "endpoint, reached through its tunnel, may go without)")
        clouds = res.clouds
        for field_name, value in (("resources.region", res.region), ("network.vpc_name", net.vpc_name)):
            if isinstance(value, str) and len(clouds) > 1:
                raise ValueError(f"{field_name}: with several clouds ({', '.join(clouds)}) it belongs to one of "
                                 f"them; give it per cloud, e.g. {{{clouds[0]}: {value}}}")
            if isinstance(value, dict):
                unknown = sorted(set(value) - set(clouds))
                if unknown:
                    raise ValueError(f"{field_name}: {', '.join(unknown)} is not among the recipe's clouds "
                                     f"({', '.join(clouds) or 'none named'})")
        if net.mode == "vpc" and "aws" in clouds and not net.vpc_name_for("aws"):
            raise ValueError("network.vpc_name: vpc mode on AWS needs the VPC's name (a VPC with private subnets "
                             "and a NAT gateway: the VM has no public address); see docs/cloud.md")
        if res.tensor_parallel and res.gpu:
            for gpu in res.gpu:
                if gpu.count % res.tensor_parallel:
                    raise ValueError(
                        f"resources.tensor_parallel: {res.tensor_parallel} must divide the GPU count of {gpu}"
                    )
        if self.model.source and self.model.source.startswith("az://") and AZURE_ACCOUNT_ENV not in self.engine.env:
            raise ValueError(f"model.source: {self.model.source} names a container, not its storage account: the "
                             f"engine's streamer reads the account from engine.env, e.g. "
                             f"engine: {{env: {{{AZURE_ACCOUNT_ENV}: myaccount}}}}")
        if self.limits.max_media_size:
            needed = media_body_bytes(size_bytes(self.limits.max_media_size))
            if "max_body_size" not in net.model_fields_set:
                # the body holds one part of the largest size, in base64, and the rest of the request
                if needed > size_bytes(net.max_body_size):
                    net.max_body_size = f"{-(-needed // (1024 * 1024))}m"
                    net.__pydantic_fields_set__.discard("max_body_size")  # derived: not written back
            elif size_bytes(net.max_body_size) < needed:
                raise ValueError(
                    f"network.max_body_size: {net.max_body_size} cannot carry one part of limits.max_media_size "
                    f"({self.limits.max_media_size}: {needed / 1024 / 1024:.1f} MiB with its base64 and the "
                    f"request around it); set at least {-(-needed // (1024 * 1024))}m")
        if self.guardrail and self.model.task != "generate":
            raise ValueError(f"guardrail: a system prompt is for chat models; model.task is {self.model.task}")
        if res.num_nodes > 1:
            if res.cloud == LOCAL_CLOUD:
                raise ValueError("resources.num_nodes: the local backend runs on this machine alone; "
                                 "remove num_nodes or pick a cloud")
            if self.replicas is not None:
                raise ValueError("resources.num_nodes: a service's replicas are one node each here; remove replicas "
                                 "(one multi-node endpoint) or num_nodes")
            if not res.gpu:
                raise ValueError("resources.num_nodes: several nodes are for a model larger than one node's GPUs; "
                                 "name the GPUs (resources.gpu)")
        if self.replicas is not None:
            if res.cloud == LOCAL_CLOUD:
                raise ValueError("replicas: the local backend runs one replica; remove replicas or pick a cloud")
            if net.mode != "public":
                raise ValueError("replicas: a SkyServe service needs network.mode: public")
        return self

    def cautions(self) -> list[str]:
        """What this recipe leaves exposed on purpose: said by `validate` and `up`, never an error."""
        said = []
        if self.network.mode == "vpc" and not self.tls_enabled:
            said.append("network.tls is off: API keys and prompts cross the VPC in clear, readable by anything "
                        "that sees its traffic; set network.tls: true to encrypt them")
        if self.network.mode == "public" and not self.tls_enabled:
            said.append("network.tls is off on a public endpoint: API keys and prompts cross the internet in "
                        "clear; set network.tls: true")
        return said

    # Derived values, so that nothing downstream re-implements the defaults.
    @property
    def served_model_name(self) -> str:
        return self.model.served_name or self.name

    @property
    def tls_enabled(self) -> bool:
        return self.network.tls if self.network.tls is not None else self.network.mode == "public"

    @property
    def tensor_parallel_size(self) -> int:
        if self.resources.tensor_parallel:
            return self.resources.tensor_parallel
        return self.resources.gpu[0].count if self.resources.gpu else 1

    @property
    def is_local(self) -> bool:
        return self.resources.cloud == LOCAL_CLOUD

    @property
    def builtin_model(self) -> Optional[str]:
        """The built-in model to build before the engine starts (none when the weights come from a bucket)."""
        if self.model.id.startswith(BUILTIN_MODEL_PREFIX) and not self.model.source:
            return self.model.id[len(BUILTIN_MODEL_PREFIX):]
        return None

    def to_yaml_config(self) -> dict[str, Any]:
        """The recipe as YAML data, with only the fields that were set (round-trips through load)."""
        return self.model_dump(mode="json", exclude_unset=True, exclude_none=True)


# --------------------------------------------------------------------------------------------
# Loading


@dataclass
class Overrides:
    """CLI flags that override recipe fields; None means 'not given'."""

    cloud: Optional[str] = None
    gpu: Optional[str] = None
    region: Optional[str] = None
    model: Optional[str] = None
    name: Optional[str] = None
    spot: Optional[bool] = None
    network: Optional[str] = None
    allow: Optional[list[str]] = None
    ttl: Optional[str] = None
    port: Optional[int] = None
    nodes: Optional[int] = None

    # field path in the recipe for each flag, so errors can name the flag the user typed
    FLAGS: typing.ClassVar[dict[str, tuple[str, ...]]] = {
        "cloud": ("resources", "cloud"),
        "gpu": ("resources", "gpu"),
        "region": ("resources", "region"),
        "model": ("model", "id"),
        "name": ("name",),
        "spot": ("resources", "spot"),
        "network": ("network", "mode"),
        "allow": ("network", "allow"),
        "ttl": ("lifetime", "ttl"),
        "port": ("network", "port"),
        "nodes": ("resources", "num_nodes"),
    }

    def given(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.FLAGS if getattr(self, k) not in (None, [])}


@dataclass
class LoadedRecipe:
    recipe: Recipe
    source: str  # what errors call the recipe: a path, or "built-in recipe NAME"
    raw: dict[str, Any] = field(default_factory=dict)


def builtin_recipes_dir() -> Path:
    return resources_dir("recipes")


def builtin_recipe_names() -> list[str]:
    return sorted(p.stem for p in builtin_recipes_dir().glob("*.yaml"))


def resolve_recipe_path(ref: str) -> tuple[Path, str]:
    """A built-in recipe name or a path to a YAML file -> (path, name used in messages)."""
    path = Path(ref).expanduser()
    looks_like_path = path.suffix in {".yaml", ".yml"} or "/" in ref or path.exists()
    if not looks_like_path:
        builtin = builtin_recipes_dir() / f"{ref}.yaml"
        if builtin.is_file():
            return builtin, f"built-in recipe {ref}"
        names = builtin_recipe_names()
        close = difflib.get_close_matches(ref, names, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise RecipeError(f"{ref}: no built-in recipe or file of that name; {hint}built-ins: {', '.join(names)}")
    if not path.is_file():
        raise RecipeError(f"{ref}: recipe file not found")
    return path, str(ref)


def read_recipe_data(path: Path, source: str) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise RecipeError(f"{source}: cannot read the recipe: {exc}") from None
    from mistral_deploy.yaml_lib import import_yaml  # here: `schema`, and the deployments' records, need no YAML

    yaml = import_yaml()

    try:
        data = _parse_yaml(yaml, text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f":{mark.line + 1}:{mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise RecipeError(f"{source}{where}: YAML syntax error: {problem}") from None
    if not isinstance(data, dict):
        raise RecipeError(f"{source}: expected a YAML mapping with at least name: and model:, got {type(data).__name__}")
    return data


def _parse_yaml(yaml: Any, text: str) -> Any:
    """yaml.safe_load, by libyaml's parser where PyYAML has it (four times sooner: `recipes` reads every
    built-in recipe). A document it refuses is parsed again by PyYAML's own, whose error is the one reported."""
    fast = getattr(yaml, "CSafeLoader", None)
    if fast is not None:
        try:
            return yaml.load(text, Loader=fast)  # noqa: S506 - a safe loader
        except yaml.YAMLError:
            pass
    return yaml.safe_load(text)


def apply_overrides(data: dict[str, Any], overrides: Overrides) -> dict[str, Any]:
    data = _deep_copy(data)
    given = overrides.given()
    for flag, value in given.items():
        path = Overrides.FLAGS[flag]
        node = data
        for key in path[:-1]:
            child = node.get(key)
            if not isinstance(child, dict):
                child = {}
                node[key] = child
            node = child
        if flag == "ttl" and str(value).strip().lower() in NO_TTL:
            node.pop(path[-1], None)  # --ttl none: no end time, asked for in so many words
            continue
        node[path[-1]] = value
    resources = data.get("resources") if isinstance(data.get("resources"), dict) else None
    if "cloud" in given and "region" not in given and resources is not None:
        # a region from the recipe belongs to the recipe's cloud, not the one on the command line
        resources.pop("region", None)
    if "model" in given and isinstance(data.get("model"), dict):
        # the recipe's served name, architecture, family and licence describe the recipe's model, not this one
        for field_name in ("architecture", "served_name", "family", "license"):
            data["model"].pop(field_name, None)
    return data


def load_recipe(ref: str, overrides: Optional[Overrides] = None) -> LoadedRecipe:
    path, source = resolve_recipe_path(ref)
    raw = read_recipe_data(path, source)
    return validate_recipe_data(raw, source, overrides or Overrides())


def validate_recipe_data(raw: dict[str, Any], source: str, overrides: Optional[Overrides] = None) -> LoadedRecipe:
    overrides = overrides or Overrides()
    data = apply_overrides(raw, overrides)
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as exc:
        raise RecipeError(format_validation_error(exc, source, overrides)) from None
    return LoadedRecipe(recipe=recipe, source=source, raw=raw)


# --------------------------------------------------------------------------------------------
# Error messages


def format_validation_error(exc: ValidationError, source: str, overrides: Overrides) -> str:
    errors = exc.errors(include_url=False)
    # an unknown key usually explains a "missing" one (a typo), so it is the one to report
    first = next((e for e in errors if e["type"] == "extra_forbidden"), errors[0])
    loc = tuple(part for part in first["loc"] if not (isinstance(part, str) and part.startswith("function-")))
    message = _describe(first, loc)
    relation = _RELATION_RE.match(message) if not loc else None
    if relation:  # a relation between fields names the field it is about: report it there
        loc, message = tuple(relation.group(1).split(".")), relation.group(2)
    where = _location(loc, overrides)
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return f"{source}: {where}: {message}{more}"


_RELATION_RE = re.compile(r"^([a-z_]+(?:\.[a-z_]+)+): (.*)$", re.DOTALL)


def _location(loc: tuple[Any, ...], overrides: Overrides) -> str:
    dotted = ".".join(str(p) for p in loc) or "(top level)"
    given = overrides.given()
    for flag, path in Overrides.FLAGS.items():
        if flag in given and tuple(str(p) for p in loc[: len(path)]) == path:
            return f"--{flag} ({dotted})"
    return dotted


def _describe(error: dict[str, Any], loc: tuple[Any, ...]) -> str:
    kind = error["type"]
    if kind == "extra_forbidden":
        known = _fields_at(loc[:-1])
        close = difflib.get_close_matches(str(loc[-1]), known, n=1, cutoff=0.5)
        suggestion = f"did you mean {close[0]!r}? " if close else ""
        return f"unknown field; {suggestion}expected one of: {', '.join(known)}"
    if kind == "missing":
        return "required field is missing"
    message = str(error["msg"])
    message = message.removeprefix("Value error, ").removeprefix("Assertion failed, ")
    value = error.get("input")
    if kind not in {"value_error", "assertion_error"} and isinstance(value, (str, int, float)) and not _is_env(loc):
        shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:57] + "..."
        message = f"{message}, got {shown}"
    return message


def _is_env(loc: tuple[Any, ...]) -> bool:
    return len(loc) >= 2 and loc[0] == "engine" and loc[1] == "env"


def _fields_at(loc: tuple[Any, ...]) -> list[str]:
    model: Any = Recipe
    for part in loc:
        if isinstance(part, int):
            continue
        info = model.model_fields.get(part) if isinstance(model, type) and issubclass(model, BaseModel) else None
        if info is None:
            return []
        model = _model_of(info.annotation)
    if isinstance(model, type) and issubclass(model, BaseModel):
        return list(model.model_fields)
    return []


def _model_of(annotation: Any) -> Any:
    for candidate in (annotation, *typing.get_args(annotation)):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
        for inner in typing.get_args(candidate):
            if isinstance(inner, type) and issubclass(inner, BaseModel):
                return inner
    return None


def _deep_copy(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _deep_copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_deep_copy(v) for v in value]
    return value


def json_schema() -> dict[str, Any]:
    schema = Recipe.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "mistral-deploy recipe"
    return schema
