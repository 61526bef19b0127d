"""Preflight checks, before any money is spent: which clouds SkyPilot can use, and on AWS whether the
account's GPU vCPU quota in the region (on-demand and spot) covers the instance the recipe needs.

Two boundaries, each one small function, and the only places that reach outside this process:

- `sky_check_credentials(cloud)`: SkyPilot's own credential check for one cloud, run in-process (the cloud
  class's `check_credentials`, which is what `sky check` runs on its API server), so no API server starts;
- `aws_client(service, region)`: a boto3 client (tests hand back one with botocore's Stubber attached).

Instance types, vCPUs and prices come from SkyPilot's catalog through mistral_deploy.pricing, which fetches
a catalog not on disk yet as `plan` does (once, with a timeout); offline, that is a failed check reported
beside the credential checks, never a crash. `sky` and `boto3` are imported inside functions (seconds of
start-up that only `doctor` pays).

AWS counts GPU quota in vCPUs per region and instance family ("Running On-Demand G and VT instances",
"All G and VT Spot Instance Requests", ...). The quota is a ceiling on everything running in the region:
instances already running count against it, and this check does not subtract them.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import functools
import io
import math
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from mistral_deploy.errors import CloudError, RecipeError
from mistral_deploy.recipe import LOCAL_CLOUD, GpuRequest, Recipe

# The command a hint names when a check needs running again (a catalog fetch that failed offline).
COMMAND = "doctor"
# Checked when neither --cloud nor the recipe names a cloud.
DEFAULT_CLOUDS = ("aws", "gcp", "azure", "kubernetes")
ON_DEMAND, SPOT = "on-demand", "spot"
EC2_SERVICE_CODE = "ec2"

# EC2 vCPU quotas by instance family, (code, name) for on-demand and for spot, as the Service Quotas
# console lists them. Used where SkyPilot's catalog (aws/instance_quota_mapping.csv) has no row; the name
# shown is the one the Service Quotas API returns, these only when it cannot be read.
_P_ON_DEMAND = ("L-417A185B", "Running On-Demand P instances")
_QUOTA_TABLE: tuple[tuple[re.Pattern[str], tuple[str, str], Optional[tuple[str, str]]], ...] = (
    (re.compile(r"^(g\d|vt\d)"), ("L-DB2E81BA", "Running On-Demand G and VT instances"),
     ("L-3819A6DF", "All G and VT Spot Instance Requests")),
    (re.compile(r"^p[234]"), _P_ON_DEMAND, ("L-7212CCBC", "All P4, P3 and P2 Spot Instance Requests")),
    (re.compile(r"^p5"), _P_ON_DEMAND, ("L-C4BD4855", "All P5 Spot Instance Requests")),
    (re.compile(r"^p\d"), _P_ON_DEMAND, None),  # newer P families: spot quota not known here
    (re.compile(r"^inf\d"), ("L-1945791B", "Running On-Demand Inf instances"),
     ("L-B5D1601B", "All Inf Spot Instance Requests")),
    (re.compile(r"^dl\d"), ("L-6E869C2A", "Running On-Demand DL instances"),
     ("L-85EED4F7", "All DL Spot Instance Requests")),
)
_QUOTA_NAMES = {code: name for _, od, sp in _QUOTA_TABLE for code, name in (od, sp or od)}

# Quota check outcomes.
OK, INSUFFICIENT, ERROR, UNKNOWN, NOT_OFFERED = "ok", "insufficient", "error", "unknown", "not-offered"

_CREDENTIAL_ERROR_CODES = frozenset({
    "UnrecognizedClientException", "InvalidClientTokenId", "ExpiredToken", "ExpiredTokenException",
    "InvalidSignatureException", "SignatureDoesNotMatch", "IncompleteSignature", "AuthFailure",
    "MissingAuthenticationToken",
})
_NO_CREDENTIALS = ("no AWS credentials found: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE), "
                   "or run `aws configure`")


@dataclass(frozen=True)
class Problem:
    """A failed check: one line that says what is wrong, and lines that say how to fix it."""

    message: str
    hints: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {"message": self.message, "hints": list(self.hints)}


@dataclass(frozen=True)
class CloudAccess:
    """SkyPilot's verdict on one cloud's credentials."""

    cloud: str
    enabled: bool
    reason: Optional[str] = None  # one line; why not, or a remark when enabled
    target: bool = False  # the cloud the recipe deploys to

    def to_json(self) -> dict[str, Any]:
        return {"cloud": self.cloud, "enabled": self.enabled, "reason": self.reason, "target": self.target}


@dataclass(frozen=True)
class QuotaCheck:
    """One EC2 vCPU quota, for one GPU candidate's instance type and one market, against what it needs."""

    gpu: str
    instance_type: str
    region: str
    market: str  # ON_DEMAND or SPOT
    used: bool  # the launch would try this market (the recipe's spot setting, and its spot fallback)
    vcpus_per_instance: int
    instances: int
    status: str  # OK, INSUFFICIENT, ERROR, UNKNOWN (no quota code known), NOT_OFFERED (no spot market)
    quota_code: Optional[str] = None
    quota_name: Optional[str] = None
    quota_vcpus: Optional[float] = None
    value_source: Optional[str] = None  # "applied" (this account's value) or "default" (AWS's default)
    detail: Optional[str] = None

    @property
    def needed_vcpus(self) -> int:
        return self.vcpus_per_instance * self.instances

    def request_command(self) -> Optional[str]:
        if not self.quota_code:
            return None
        return (f"aws service-quotas request-service-quota-increase --service-code {EC2_SERVICE_CODE} "
                f"--quota-code {self.quota_code} --desired-value {self.needed_vcpus} --region {self.region}")

    def console_url(self) -> Optional[str]:
        if not self.quota_code:
            return None
        return (f"https://{self.region}.console.aws.amazon.com/servicequotas/home/services/"
                f"{EC2_SERVICE_CODE}/quotas/{self.quota_code}")

    def to_json(self) -> dict[str, Any]:
        return {
            "gpu": self.gpu,
            "instance_type": self.instance_type,
            "region": self.region,
            "market": self.market,
            "used": self.used,
            "vcpus_per_instance": self.vcpus_per_instance,
            "instances": self.instances,
            "needed_vcpus": self.needed_vcpus,
            "status": self.status,
            "quota_code": self.quota_code,
            "quota_name": self.quota_name,
            "quota_vcpus": self.quota_vcpus,
            "value_source": self.value_source,
            "detail": self.detail,
            "request_increase": self.request_command() if self.status == INSUFFICIENT else None,
        }


@dataclass
class DoctorReport:
    recipe: str
    source: str
    cloud: Optional[str]  # the cloud the recipe deploys to, None: SkyPilot picks
    region: Optional[str] = None  # the region whose quota was read
    clouds: list[CloudAccess] = field(default_factory=list)
    quotas: list[QuotaCheck] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "recipe": self.recipe,
            "source": self.source,
            "cloud": self.cloud,
            "region": self.region,
            "clouds": [c.to_json() for c in self.clouds],
            "quotas": [q.to_json() for q in self.quotas],
            "problems": [p.to_json() for p in self.problems],
            "notes": list(self.notes),
        }


# --- the boundaries ---------------------------------------------------------------------------------


def sky_check_credentials(cloud: str) -> tuple[bool, Optional[str]]:
    """SkyPilot's compute credential check for one cloud, in-process: (usable, why not / remark).

    Raises RecipeError for a name SkyPilot does not know.
    """
    from sky import clouds as sky_clouds
    from sky.utils import registry

    try:
        cloud_obj = registry.CLOUD_REGISTRY.from_str(cloud)
    except ValueError:
        cloud_obj = None
    if cloud_obj is None:
        raise RecipeError(f"--cloud: SkyPilot knows no cloud {cloud!r}")
    ok, reason = cloud_obj.check_credentials(sky_clouds.CloudCapability.COMPUTE)
    if isinstance(reason, dict):  # Kubernetes and SSH: a verdict per context
        reason = "; ".join(f"{ctx}: {text}" for ctx, text in reason.items())
    return bool(ok), reason


def aws_client(service: str, region: str) -> Any:
    """A boto3 client, with the credentials boto3 finds (environment, profile, SSO, instance role)."""
    import boto3

    return boto3.session.Session().client(service, region_name=region)


# --- the checks ----------------------------------------------------------------------------------


def diagnose(recipe: Recipe, source: str, say: Callable[[str], None] = lambda _line: None) -> DoctorReport:
    """Every preflight check for the recipe (with its flags applied): the clouds' credentials first, then on
    AWS the GPU quota. `say` gets progress lines (a catalog being fetched)."""
    targets = recipe.resources.clouds  # several: SkyPilot fails over between them, one usable is enough
    report = DoctorReport(recipe=recipe.name, source=source, cloud=",".join(targets) or None)
    if targets == [LOCAL_CLOUD]:
        report.notes.append("the local backend needs no cloud account and no quota")
        return report
    report.clouds = check_clouds(targets or list(DEFAULT_CLOUDS), targets)
    enabled = [c.cloud for c in report.clouds if c.enabled]
    if targets and not set(targets) & set(enabled):
        if len(targets) == 1:
            reason = report.clouds[0].reason
            report.problems.append(Problem(
                f"SkyPilot cannot use {targets[0]}: {reason or 'no usable credentials'}",
                (f"set up {targets[0]} credentials, then check with `sky check {targets[0]}`",),
            ))
        else:
            report.problems.append(Problem(
                f"SkyPilot can use none of {', '.join(targets)}: "
                + "; ".join(f"{c.cloud}: {c.reason or 'no usable credentials'}" for c in report.clouds),
                ("set up credentials for one of them, then check with `sky check`",),
            ))
    elif not targets and not enabled:
        report.problems.append(Problem(
            f"SkyPilot can use none of {', '.join(DEFAULT_CLOUDS)}",
            ("set up credentials for one of them (`sky check` says what is missing), or pass --cloud",),
        ))

    if "aws" in targets or (not targets and "aws" in enabled):
        try:
            check_aws_quota(recipe, report, say)
        except CloudError as exc:  # the catalog missing and not fetched, or unreadable: a failed check
            report.problems.append(Problem(exc.message, (exc.hint,) if exc.hint else ()))
    elif not targets:
        report.notes.append("GPU quota not checked: SkyPilot cannot use AWS here; pass --cloud aws to check it")
    else:
        report.notes.append(f"GPU quota is checked on AWS only; for {', '.join(targets)}, see the console's "
                            "quota page")
    return report


def check_clouds(names: list[str], targets: list[str]) -> list[CloudAccess]:
    """SkyPilot's credential check for each cloud, in parallel (some clouds call their APIs)."""
    # SkyPilot prints hints for some clouds on stdout; keep stdout for our own output. Redirected once,
    # around the threads: sys.stdout is process-wide, and nested per-thread swaps would not restore it.
    with contextlib.redirect_stdout(io.StringIO()):
        with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, len(names))) as pool:
            verdicts = list(pool.map(_check_one_cloud, names))
    return [CloudAccess(cloud=name, enabled=ok, reason=_one_line(reason), target=name in targets)
            for name, (ok, reason) in zip(names, verdicts)]


def _check_one_cloud(cloud: str) -> tuple[bool, Optional[str]]:
    try:
        return sky_check_credentials(cloud)
    except RecipeError:
        raise
    except Exception as exc:  # a cloud's check that crashes says that it cannot be used, and why
        return False, f"the credential check failed: {type(exc).__name__}: {exc}"


def markets(recipe: Recipe) -> list[tuple[str, bool]]:
    """Both markets, each with whether the launch would try it (as render.py writes the task's choices)."""
    res = recipe.resources
    spot_fallback = res.spot and res.spot_fallback and recipe.replicas is None
    return [(ON_DEMAND, not res.spot or spot_fallback), (SPOT, res.spot)]


def check_aws_quota(recipe: Recipe, report: DoctorReport, say: Callable[[str], None] = lambda _line: None) -> None:
    """Read the EC2 vCPU quotas the recipe's GPU candidates need, in one region, into the report."""
    from mistral_deploy import pricing

    gpus = _fitting_candidates(recipe)
    if not gpus:
        report.notes.append("no GPU in the recipe: no GPU quota to check (pass --gpu)")
        return
    # instance types and vCPUs come from SkyPilot's AWS catalog: fetched once if missing, as `plan` does
    pricing.ensure_catalogs(["aws"], say=say, command=COMMAND)
    use_spot = recipe.resources.spot
    instances = max(1, recipe.replicas.min) if recipe.replicas is not None else 1
    region = recipe.resources.region_for("aws")
    if region is None:
        # where SkyPilot tries first: the cheapest region for the first candidate that AWS offers
        for gpu in gpus:
            found = pricing.cheapest_first(pricing.find_offers([gpu], ["aws"], command=COMMAND), spot=use_spot)
            if found:
                region = found[0].region
                report.notes.append(f"region {region}: the cheapest for {gpu} in SkyPilot's catalog, where a "
                                    "launch tries first; pass --region to check another")
                break
    if region is None:
        report.problems.append(Problem(
            f"AWS offers none of {', '.join(str(g) for g in gpus)} in SkyPilot's catalog",
            ("try another --gpu or --cloud (`mistral-deploy plan` lists the offers)",),
        ))
        return
    report.region = region

    reader = _QuotaReader(region)
    for gpu in gpus:
        offers = pricing.find_offers([gpu], ["aws"], region, command=COMMAND)
        if not offers:
            report.notes.append(f"{gpu}: AWS offers no instance with it in {region}")
            continue
        for market, used in markets(recipe):
            # each market's cheapest instance type: the one SkyPilot picks for it (they can differ)
            in_market = [o for o in offers if market == ON_DEMAND or o.spot_price is not None]
            offer = pricing.cheapest_first(in_market or offers, spot=market == SPOT)[0]
            vcpus = instance_vcpus(offer.instance_type)
            make_check = functools.partial(QuotaCheck, gpu=str(gpu), instance_type=offer.instance_type, region=region,
                                           market=market, used=used, vcpus_per_instance=vcpus, instances=instances)
            if not in_market:
                report.quotas.append(make_check(status=NOT_OFFERED,
                                                detail=f"no spot market for {gpu} in {region}"))
                continue
            quota = quota_code(offer.instance_type, spot=market == SPOT)
            if quota is None:
                report.quotas.append(make_check(status=UNKNOWN,
                                                detail=f"no known {market} quota code for {offer.instance_type}"))
                continue
            code, name = quota
            value = reader.read(code)
            if isinstance(value, Problem):
                report.quotas.append(make_check(status=ERROR, quota_code=code, quota_name=name,
                                                detail=value.message))
                continue
            vcpu_limit, api_name, source = value
            needed = vcpus * instances
            report.quotas.append(make_check(
                status=OK if vcpu_limit >= needed else INSUFFICIENT, quota_code=code,
                quota_name=api_name or name, quota_vcpus=vcpu_limit, value_source=source,
            ))
    problems = _quota_problems(report.quotas, reader.problems)
    report.problems.extend(problems)
    report.notes.extend(f"not verified: {p.message}" for p in reader.problems if p not in problems)
    for check in report.quotas:
        if check.used and check.status == UNKNOWN:
            report.notes.append(f"not verified: {check.detail}; check its EC2 quota in the Service Quotas console")
        if not check.used and check.status == INSUFFICIENT:
            report.notes.append(
                f"{check.market} quota {check.quota_code} ({check.quota_name}) is {check.quota_vcpus:g} vCPUs, "
                f"below the {check.needed_vcpus} {check.instance_type} needs; this recipe does not use {check.market}"
            )


def _quota_problems(checks: list[QuotaCheck], read_problems: list[Problem]) -> list[Problem]:
    """Nothing when one choice the launch would try is covered (or cannot be judged); else what blocks each."""
    used = [c for c in checks if c.used]
    if not used or any(c.status in (OK, UNKNOWN) for c in used):
        return []
    problems = list(read_problems)
    for check in used:
        if check.status == INSUFFICIENT:
            problems.append(Problem(
                f"AWS {check.market} GPU quota too low in {check.region}: {check.quota_code} "
                f"\"{check.quota_name}\" is {check.quota_vcpus:g} vCPUs; {check.instances} x {check.instance_type} "
                f"({check.gpu}) needs {check.needed_vcpus}",
                (f"request more: {check.request_command()}",
                 f"or in the console: {check.console_url()} (Request increase at account level)"),
            ))
        elif check.status == NOT_OFFERED:
            problems.append(Problem(f"{check.gpu}: {check.detail}; pass --on-demand or another --region"))
    return problems


class _QuotaReader:
    """Reads EC2 quotas in one region, once per code; the first error that is not per-quota stops it."""

    def __init__(self, region: str) -> None:
        self.region = region
        self.problems: list[Problem] = []
        self._client: Any = None
        self._values: dict[str, Any] = {}

    def read(self, code: str) -> tuple[float, Optional[str], str] | Problem:
        if self.problems:
            return self.problems[0]
        if code not in self._values:
            try:
                self._values[code] = self._read(code)
            except Exception as exc:  # noqa: BLE001 - every AWS failure becomes one line
                problem = describe_aws_error(exc, self.region)
                self.problems.append(problem)
                return problem
        return self._values[code]

    def _read(self, code: str) -> tuple[float, Optional[str], str]:
        from botocore.exceptions import ClientError

        if self._client is None:
            self._client = aws_client("service-quotas", self.region)
        try:
            quota = self._client.get_service_quota(ServiceCode=EC2_SERVICE_CODE, QuotaCode=code)["Quota"]
            source = "applied"
        except ClientError as exc:
            # an account that never changed a quota may have no applied value: AWS's default applies
            if _error_code(exc) != "NoSuchResourceException":
                raise
            quota = self._client.get_aws_default_service_quota(ServiceCode=EC2_SERVICE_CODE,
                                                               QuotaCode=code)["Quota"]
            source = "default"
        return float(quota["Value"]), quota.get("QuotaName"), source


def describe_aws_error(exc: BaseException, region: str) -> Problem:
    """A boto3/botocore failure as one line that says what to do."""
    from botocore import exceptions as bx

    if isinstance(exc, (bx.NoCredentialsError, bx.PartialCredentialsError)):
        return Problem(_NO_CREDENTIALS)
    if isinstance(exc, bx.ProfileNotFound):
        return Problem(f"AWS profile not found ({exc}): fix AWS_PROFILE or run `aws configure --profile NAME`")
    if isinstance(exc, (bx.SSOError, bx.TokenRetrievalError)):
        return Problem(f"AWS SSO credentials are not usable ({_one_line(str(exc))}): run `aws sso login`")
    if isinstance(exc, bx.ClientError):
        code = _error_code(exc)
        message = _one_line(exc.response.get("Error", {}).get("Message", "")) or code
        if code in _CREDENTIAL_ERROR_CODES:
            return Problem(f"AWS rejected the credentials ({code}: {message}): check AWS_ACCESS_KEY_ID and "
                           "AWS_SECRET_ACCESS_KEY (or AWS_PROFILE); `aws sts get-caller-identity` shows who you are")
        if code in ("AccessDeniedException", "AccessDenied"):
            return Problem(f"the AWS identity may not read service quotas ({code}): allow "
                           "servicequotas:GetServiceQuota and servicequotas:GetAWSDefaultServiceQuota",
                           (f"or read the quota in the console: https://{region}.console.aws.amazon.com/"
                            f"servicequotas/home/services/{EC2_SERVICE_CODE}/quotas",))
        return Problem(f"the Service Quotas API in {region} refused ({code}: {message})")
    if isinstance(exc, (bx.EndpointConnectionError, bx.ConnectTimeoutError, bx.ReadTimeoutError)):
        return Problem(f"cannot reach the Service Quotas API in {region}: {_one_line(str(exc))}")
    return Problem(f"reading AWS quotas in {region} failed: {type(exc).__name__}: {_one_line(str(exc))}")


def quota_code(instance_type: str, *, spot: bool) -> Optional[tuple[str, str]]:
    """(quota code, quota name) that limits the instance type's vCPUs: SkyPilot's catalog, then our table."""
    code = _skypilot_quota_code(instance_type, spot=spot)
    if code:
        return code, _QUOTA_NAMES.get(code, code)
    for pattern, on_demand, spot_quota in _QUOTA_TABLE:
        if pattern.match(instance_type):
            return spot_quota if spot else on_demand
    return None


def _skypilot_quota_code(instance_type: str, *, spot: bool) -> Optional[str]:
    try:
        from sky.catalog import aws_catalog

        with contextlib.redirect_stdout(io.StringIO()):
            code = aws_catalog.get_quota_code(instance_type, spot)
    except Exception:  # a missing or header-only mapping file: our table answers
        return None
    return code if isinstance(code, str) and code.startswith("L-") else None


def instance_vcpus(instance_type: str) -> int:
    """The instance type's vCPUs, from SkyPilot's AWS catalog."""
    import sky.catalog

    with contextlib.redirect_stdout(io.StringIO()):
        vcpus, _memory = sky.catalog.get_vcpus_mem_from_instance_type(instance_type, clouds="aws")
    if vcpus is None:
        raise CloudError(f"SkyPilot's AWS catalog lists no vCPU count for {instance_type}")
    return int(math.ceil(float(vcpus)))


def _fitting_candidates(recipe: Recipe) -> list[GpuRequest]:
    """The recipe's GPU candidates that fit the model (or cannot be judged); FitError when none does."""
    from mistral_deploy.fit import architecture_of, check_fit, estimate

    arch = architecture_of(recipe)
    fitting = []
    for gpu in recipe.resources.gpu:
        est = estimate(recipe, gpu, arch) if arch else None
        if est is None or est.fits:
            fitting.append(gpu)
    if recipe.resources.gpu and not fitting:
        check_fit(recipe)  # raises FitError (exit 4), naming what would fit
    return fitting


def _error_code(exc: Any) -> str:
    return str(getattr(exc, "response", {}).get("Error", {}).get("Code", ""))


def _one_line(text: Optional[str]) -> Optional[str]:
    """SkyPilot's multi-line reasons (hint, commands, links) as one line."""
    if not text:
        return None
    return " ".join(str(text).split())
