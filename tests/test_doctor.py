"""`doctor`: SkyPilot's credential check (faked at its one boundary, `doctor.sky_check_credentials`, except
where the real one runs) and the AWS GPU vCPU quota, read through a real boto3 client whose Service Quotas
answers come from botocore's Stubber (moto implements Service Quotas for VPC only). Nothing leaves the
machine: the stub answers before a request is signed, and AWS_ENDPOINT_URL points at a closed local port.

Instance types and vCPUs are computed from tests/fixtures/catalog, never hard-coded.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import pytest

from _catalog import CATALOG_FIXTURE, CATALOG_VERSION, sky_catalog, sky_session  # noqa: F401  (fixtures)
from _cli import run_cli
from mistral_deploy import doctor
from mistral_deploy.errors import CloudError, RecipeError

REGION = "us-east-1"
G_ON_DEMAND = ("L-DB2E81BA", "Running On-Demand G and VT instances")
G_SPOT = ("L-3819A6DF", "All G and VT Spot Instance Requests")
P_ON_DEMAND = ("L-417A185B", "Running On-Demand P instances")
CLOSED_PORT_URL = "http://127.0.0.1:9"  # discard port: nothing listens, nothing leaves


def _aws_rows() -> list[dict[str, str]]:
    with (CATALOG_FIXTURE / CATALOG_VERSION / "aws" / "vms.csv").open(encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _cheapest(gpu: str, count: int = 1, *, region: Optional[str] = None, spot: bool = False) -> dict[str, str]:
    """The catalog row SkyPilot would pick first: cheapest instance (spot: cheapest zone) for the GPU."""
    rows = [r for r in _aws_rows() if r["AcceleratorName"] == gpu and float(r["AcceleratorCount"]) == count
            and (region is None or r["Region"] == region) and (not spot or r["SpotPrice"])]
    assert rows, (gpu, region)
    return min(rows, key=lambda r: (float(r["SpotPrice"] if spot else r["Price"]), r["Region"], r["InstanceType"]))


# --- the two boundaries -------------------------------------------------------------------------------


@pytest.fixture
def sky_check(monkeypatch: pytest.MonkeyPatch) -> Callable[..., list[str]]:
    """Replace SkyPilot's credential check with fixed verdicts; returns the list of clouds asked about."""
    asked: list[str] = []

    def install(**verdicts: tuple[bool, Optional[str]]) -> list[str]:
        def fake(cloud: str) -> tuple[bool, Optional[str]]:
            asked.append(cloud)
            return verdicts.get(cloud, (False, f"no {cloud} credentials (test)"))

        monkeypatch.setattr(doctor, "sky_check_credentials", fake)
        return asked

    return install


@pytest.fixture
def aws_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Fake AWS credentials, no shared config, every endpoint a closed local port."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAIOSFODNN7EXAMPLE")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY")
    monkeypatch.setenv("AWS_ENDPOINT_URL", CLOSED_PORT_URL)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    assert os.environ["AWS_EC2_METADATA_DISABLED"] == "true"  # conftest: no instance-metadata lookups


class QuotaStub:
    """Service Quotas answers, in the order doctor must ask for them (Stubber checks code and order)."""

    def __init__(self, region: str) -> None:
        import boto3
        from botocore.stub import Stubber

        self.region = region
        self.client = boto3.session.Session().client("service-quotas", region_name=region)
        self.stubber = Stubber(self.client)
        self.clients_made: list[tuple[str, str]] = []

    def applied(self, quota: tuple[str, str], value: float) -> "QuotaStub":
        self.stubber.add_response("get_service_quota", {"Quota": _quota(quota, value)},
                                  {"ServiceCode": "ec2", "QuotaCode": quota[0]})
        return self

    def default_only(self, quota: tuple[str, str], value: float) -> "QuotaStub":
        self.stubber.add_client_error("get_service_quota", "NoSuchResourceException", "not applied", 400,
                                      expected_params={"ServiceCode": "ec2", "QuotaCode": quota[0]})
        self.stubber.add_response("get_aws_default_service_quota", {"Quota": _quota(quota, value)},
                                  {"ServiceCode": "ec2", "QuotaCode": quota[0]})
        return self

    def error(self, quota: tuple[str, str], code: str, message: str, status: int = 400) -> "QuotaStub":
        self.stubber.add_client_error("get_service_quota", code, message, status,
                                      expected_params={"ServiceCode": "ec2", "QuotaCode": quota[0]})
        return self

    def make_client(self, service: str, region: str) -> Any:
        self.clients_made.append((service, region))
        return self.client


def _quota(quota: tuple[str, str], value: float) -> dict[str, Any]:
    code, name = quota
    return {"ServiceCode": "ec2", "ServiceName": "Amazon Elastic Compute Cloud (Amazon EC2)", "QuotaCode": code,
            "QuotaName": name, "Value": value, "Unit": "None", "Adjustable": True, "GlobalQuota": False,
            "QuotaArn": f"arn:aws:servicequotas:{REGION}:123456789012:ec2/{code}"}


@pytest.fixture
def quotas(monkeypatch: pytest.MonkeyPatch, aws_env: None) -> Iterator[Callable[[str], QuotaStub]]:
    made: list[QuotaStub] = []

    def install(region: str = REGION) -> QuotaStub:
        stub = QuotaStub(region)
        stub.stubber.activate()
        monkeypatch.setattr(doctor, "aws_client", stub.make_client)
        made.append(stub)
        return stub

    yield install
    for stub in made:
        stub.stubber.assert_no_pending_responses()  # every answer prepared was asked for
        stub.stubber.deactivate()


@pytest.fixture
def no_aws_calls(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(service: str, region: str) -> Any:
        raise AssertionError(f"doctor made an AWS {service} client in {region}")

    monkeypatch.setattr(doctor, "aws_client", refuse)


def _doctor_json(*args: str, code: int = 0) -> dict[str, Any]:
    result = run_cli("doctor", *args, "--json")
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output
    return json.loads(result.stdout)


def _by_market(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {q["market"]: q for q in report["quotas"]}


# --- AWS quota: enough and too little, on-demand and spot ----------------------------------------------


def test_enough_on_demand_quota_passes(sky_session: Any, sky_check: Any, quotas: Any) -> None:
    asked = sky_check(aws=(True, None))
    stub = quotas().applied(G_ON_DEMAND, 8).applied(G_SPOT, 0)
    report = _doctor_json("mistral-7b-instruct", "--cloud", "aws", "--gpu", "A10G")
    row = _cheapest("A10G")
    assert report["ok"] is True and report["problems"] == []
    assert report["region"] == row["Region"] == REGION and stub.clients_made == [("service-quotas", REGION)]
    assert asked == ["aws"] and report["clouds"] == [{"cloud": "aws", "enabled": True, "reason": None,
                                                      "target": True}]
    on_demand, spot = _by_market(report)["on-demand"], _by_market(report)["spot"]
    assert on_demand["instance_type"] == row["InstanceType"] == "g5.xlarge"
    assert on_demand["vcpus_per_instance"] == int(float(row["vCPUs"])) and on_demand["needed_vcpus"] == 4
    assert (on_demand["quota_code"], on_demand["quota_name"]) == G_ON_DEMAND
    assert on_demand["quota_vcpus"] == 8 and on_demand["status"] == "ok" and on_demand["used"] is True
    assert on_demand["value_source"] == "applied" and on_demand["request_increase"] is None
    # the spot quota is too low, but this on-demand recipe never uses it: a note, not a failure
    assert spot["status"] == "insufficient" and spot["used"] is False
    assert any("spot quota L-3819A6DF" in note and "does not use spot" in note for note in report["notes"])


def test_too_little_on_demand_quota_fails_with_the_quota_and_how_to_get_more(
    sky_session: Any, sky_check: Any, quotas: Any
) -> None:
    sky_check(aws=(True, None))
    quotas().applied(G_ON_DEMAND, 2).applied(G_SPOT, 64)
    result = run_cli("doctor", "mistral-7b-instruct", "--cloud", "aws", "--gpu", "A10G", "--json")
    assert result.exit_code == CloudError.exit_code == 9, result.output
    report = json.loads(result.stdout)
    on_demand = _by_market(report)["on-demand"]
    assert report["ok"] is False and on_demand["status"] == "insufficient" and on_demand["quota_vcpus"] == 2
    command = ("aws service-quotas request-service-quota-increase --service-code ec2 --quota-code L-DB2E81BA "
               f"--desired-value 4 --region {REGION}")
    assert on_demand["request_increase"] == command
    [problem] = report["problems"]
    assert "L-DB2E81BA" in problem["message"] and G_ON_DEMAND[1] in problem["message"]
    assert "is 2 vCPUs" in problem["message"] and "g5.xlarge" in problem["message"] and "needs 4" in problem["message"]
    assert problem["hints"][0] == f"request more: {command}"
    assert f"https://{REGION}.console.aws.amazon.com/servicequotas/home/services/ec2/quotas/L-DB2E81BA" in (
        problem["hints"][1])
    # stderr: the failed check in one line, then how to fix it
    lines = result.stderr.splitlines()
    error_lines = [line for line in lines if line.startswith("error: ")]
    assert error_lines == [f"error: {problem['message']}"]
    assert any(command in line for line in lines)


def test_spot_recipe_with_enough_spot_quota_passes(sky_session: Any, sky_check: Any, quotas: Any) -> None:
    sky_check(aws=(True, None))
    row = _cheapest("A10G", spot=True)  # a spot launch tries the cheapest spot region first
    assert row["Region"] != REGION
    vcpus = int(float(row["vCPUs"]))
    quotas(row["Region"]).applied(G_ON_DEMAND, 0).applied(G_SPOT, vcpus)  # exactly enough
    report = _doctor_json("mistral-7b-instruct", "--cloud", "aws", "--gpu", "A10G", "--spot")
    assert report["ok"] is True and report["region"] == row["Region"]
    spot, on_demand = _by_market(report)["spot"], _by_market(report)["on-demand"]
    assert spot["instance_type"] == row["InstanceType"] and spot["needed_vcpus"] == vcpus
    assert spot["status"] == "ok" and spot["used"] is True
    assert (spot["quota_code"], spot["quota_name"], spot["quota_vcpus"]) == (*G_SPOT, vcpus)
    # spot falls back to on-demand (the recipe's default): that market is tried too, with its own cheapest
    # instance type, and is short here
    assert on_demand["instance_type"] == _cheapest("A10G", region=row["Region"])["InstanceType"]
    assert on_demand["used"] is True and on_demand["status"] == "insufficient"


def test_spot_only_recipe_with_too_little_spot_quota_fails(
    sky_session: Any, sky_check: Any, quotas: Any, tmp_path: Path
) -> None:
    path = tmp_path / "spot-only.yaml"
    path.write_text("name: spot-only\nmodel: {id: mistralai/Mistral-7B-v0.1}\n"
                    "resources: {cloud: aws, region: us-east-1, gpu: A10G:1, spot: true, spot_fallback: false}\n",
                    encoding="utf-8")
    sky_check(aws=(True, None))
    quotas().applied(G_ON_DEMAND, 512).applied(G_SPOT, 0)
    report = _doctor_json(str(path), code=CloudError.exit_code)
    assert report["cloud"] == "aws" and report["region"] == "us-east-1"
    assert not any("cheapest" in note for note in report["notes"])  # the recipe's region, not the catalog's
    spot, on_demand = _by_market(report)["spot"], _by_market(report)["on-demand"]
    assert spot["used"] is True and spot["status"] == "insufficient" and spot["quota_code"] == G_SPOT[0]
    assert on_demand["used"] is False and on_demand["status"] == "ok"  # plenty, but the recipe forbids it
    [problem] = report["problems"]
    assert problem["message"].startswith("AWS spot GPU quota too low in us-east-1: L-3819A6DF")
    assert "--quota-code L-3819A6DF --desired-value 4 --region us-east-1" in problem["hints"][0]


def test_spot_with_fallback_fails_only_when_both_markets_are_short(
    sky_session: Any, sky_check: Any, quotas: Any
) -> None:
    sky_check(aws=(True, None))
    quotas().applied(G_ON_DEMAND, 0).applied(G_SPOT, 0)
    report = _doctor_json("mistral-7b-instruct", "--cloud", "aws", "--gpu", "A10G", "--spot", "--region", REGION,
                          code=CloudError.exit_code)
    assert [p["message"].split(":")[0] for p in report["problems"]] == [
        f"AWS on-demand GPU quota too low in {REGION}", f"AWS spot GPU quota too low in {REGION}"]


def test_every_candidate_is_checked_and_one_that_fits_is_enough(sky_session: Any, sky_check: Any,
                                                                 quotas: Any) -> None:
    sky_check(aws=(True, None))
    # A10G and L4 (both G family: one quota, read once per code)
    quotas().applied(G_ON_DEMAND, 4).applied(G_SPOT, 0)
    report = _doctor_json("mistral-7b-instruct", "--cloud", "aws", "--region", REGION)
    by_gpu = {(q["gpu"], q["market"]): q for q in report["quotas"]}
    assert set(by_gpu) == {("A10G:1", "on-demand"), ("A10G:1", "spot"), ("L4:1", "on-demand"), ("L4:1", "spot")}
    assert by_gpu[("L4:1", "on-demand")]["instance_type"] == _cheapest("L4", region=REGION)["InstanceType"]
    assert report["ok"] is True


def test_applied_value_missing_falls_back_to_the_aws_default(sky_session: Any, sky_check: Any,
                                                             quotas: Any) -> None:
    sky_check(aws=(True, None))
    quotas().default_only(G_ON_DEMAND, 0).default_only(G_SPOT, 0)
    report = _doctor_json("mistral-7b", "--cloud", "aws", "--gpu", "A10G", "--region", REGION,
                          code=CloudError.exit_code)
    on_demand = _by_market(report)["on-demand"]
    assert on_demand["value_source"] == "default" and on_demand["quota_vcpus"] == 0
    assert on_demand["status"] == "insufficient"


def test_p_family_quota_and_no_spot_market(sky_session: Any, sky_check: Any, quotas: Any) -> None:
    sky_check(aws=(True, None))
    quotas().applied(P_ON_DEMAND, 16)  # the spot market is not asked about: there is none
    report = _doctor_json("mistral-7b", "--cloud", "aws", "--gpu", "H100", "--region", REGION)
    row = _cheapest("H100", region=REGION)
    on_demand, spot = _by_market(report)["on-demand"], _by_market(report)["spot"]
    assert on_demand["instance_type"] == row["InstanceType"] == "p5.4xlarge"
    assert on_demand["needed_vcpus"] == int(float(row["vCPUs"])) == 16
    assert (on_demand["quota_code"], on_demand["status"]) == ("L-417A185B", "ok")
    assert spot["status"] == "not-offered" and spot["quota_code"] is None and report["ok"] is True


# --- AWS errors: one clear line -------------------------------------------------------------------------


def test_no_aws_credentials_is_one_clear_line(sky_session: Any, sky_check: Any, monkeypatch: pytest.MonkeyPatch,
                                              tmp_path: Path) -> None:
    # the real boto3 client, with nothing to sign with: it fails before any request is made
    monkeypatch.setenv("AWS_ENDPOINT_URL", CLOSED_PORT_URL)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    sky_check(aws=(True, None))
    result = run_cli("doctor", "mistral-7b", "--cloud", "aws", "--gpu", "A10G", "--region", REGION)
    assert result.exit_code == CloudError.exit_code, result.output
    assert "Traceback" not in result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert errors == ["error: no AWS credentials found: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
                      "(or AWS_PROFILE), or run `aws configure`"]
    assert "cannot read" in result.stdout  # the table still says which quotas it needed


@pytest.mark.parametrize(("code", "expected"), [
    ("UnrecognizedClientException", "error: AWS rejected the credentials (UnrecognizedClientException: "),
    ("AccessDeniedException", "error: the AWS identity may not read service quotas (AccessDeniedException): "
                              "allow servicequotas:GetServiceQuota"),
])
def test_refused_credentials_are_one_clear_line(sky_session: Any, sky_check: Any, quotas: Any, code: str,
                                                expected: str) -> None:
    sky_check(aws=(True, None))
    quotas().error(G_ON_DEMAND, code, "The security token included in the request is invalid.")
    result = run_cli("doctor", "mistral-7b", "--cloud", "aws", "--gpu", "A10G", "--region", REGION, "--json")
    assert result.exit_code == CloudError.exit_code, result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and errors[0].startswith(expected), errors
    statuses = {q["market"]: q["status"] for q in json.loads(result.stdout)["quotas"]}
    assert statuses == {"on-demand": "error", "spot": "error"}  # asked once: the second read is not attempted


# --- which clouds SkyPilot can use ---------------------------------------------------------------------


def test_target_cloud_without_credentials_fails(sky_session: Any, sky_check: Any, quotas: Any) -> None:
    sky_check(aws=(False, "AWS credentials are not set.\n    Run the following commands:\n      $ aws configure"))
    quotas().applied(G_ON_DEMAND, 8).applied(G_SPOT, 8)  # boto3 may still work where SkyPilot's check does not
    report = _doctor_json("mistral-7b", "--cloud", "aws", "--gpu", "A10G", "--region", REGION,
                          code=CloudError.exit_code)
    assert report["clouds"][0]["reason"] == "AWS credentials are not set. Run the following commands: $ aws configure"
    [problem] = report["problems"]
    assert problem["message"].startswith("SkyPilot cannot use aws: AWS credentials are not set.")
    assert problem["hints"] == ["set up aws credentials, then check with `sky check aws`"]


def test_without_a_cloud_every_default_cloud_is_checked(sky_session: Any, sky_check: Any, quotas: Any) -> None:
    asked = sky_check(aws=(True, None), gcp=(True, "remark"))
    quotas().applied(G_ON_DEMAND, 8).applied(G_SPOT, 8)
    report = _doctor_json("mistral-7b", "--gpu", "A10G")
    assert sorted(asked) == sorted(doctor.DEFAULT_CLOUDS)
    assert {c["cloud"]: c["enabled"] for c in report["clouds"]} == {"aws": True, "gcp": True, "azure": False,
                                                                   "kubernetes": False}
    assert report["cloud"] is None and report["ok"] is True and report["quotas"]  # AWS is usable: checked


def test_no_usable_cloud_fails(sky_session: Any, sky_check: Any, no_aws_calls: None) -> None:
    sky_check()
    report = _doctor_json("mistral-7b", code=CloudError.exit_code)
    assert report["quotas"] == []
    assert [p["message"] for p in report["problems"]] == ["SkyPilot can use none of aws, gcp, azure, kubernetes"]
    assert any("pass --cloud aws" in note for note in report["notes"])


def test_other_clouds_get_the_credential_check_only(sky_session: Any, sky_check: Any, no_aws_calls: None) -> None:
    asked = sky_check(gcp=(True, None))
    report = _doctor_json("mistral-7b", "--cloud", "gcp", "--gpu", "L4")
    assert asked == ["gcp"] and report["ok"] is True and report["quotas"] == []
    assert any("AWS only" in note for note in report["notes"])


def test_local_needs_no_cloud(sky_check: Any, no_aws_calls: None) -> None:
    asked = sky_check()
    report = _doctor_json("tiny-mistral")
    assert asked == [] and report["ok"] is True and report["clouds"] == [] and report["cloud"] == "local"


def test_table_output(sky_session: Any, sky_check: Any, quotas: Any) -> None:
    sky_check(aws=(True, None))
    quotas().applied(G_ON_DEMAND, 2).applied(G_SPOT, 8)
    result = run_cli("doctor", "mistral-7b", "--cloud", "aws", "--gpu", "A10G", "--region", REGION,
                     env={"COLUMNS": "200"})
    assert result.exit_code == CloudError.exit_code, result.output
    out = result.stdout
    for header in ("cloud", "usable", "GPU", "instance type", "market", "needs", "quota", "status", "quota code"):
        assert header in out
    row = next(line for line in out.splitlines() if "on-demand" in line)
    assert row.split()[:8] == ["A10G:1", "g5.xlarge", "on-demand", "yes", "4", "2", "TOO", "LOW"]
    assert "L-DB2E81BA" in row and "all checks passed" not in out


# --- SkyPilot's catalog: fetched as `plan` fetches it; offline, a failed check beside the credential checks --


def _doctor_subprocess(*args: str, env: Optional[dict[str, str]] = None) -> subprocess.CompletedProcess[str]:
    code = "from mistral_deploy.cli import main; main()"
    return subprocess.run([sys.executable, "-c", code, "doctor", *args], capture_output=True, text=True,
                          timeout=180, env={**os.environ, **(env or {})})


def _no_aws_credentials(tmp_path: Path) -> dict[str, str]:
    """No credentials anywhere (conftest removed AWS_* from the environment), every endpoint a closed port."""
    return {"AWS_ENDPOINT_URL": CLOSED_PORT_URL, "AWS_CONFIG_FILE": str(tmp_path / "none"),
            "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none")}


def test_missing_catalog_offline_reports_the_credential_check_and_names_doctor(tmp_path: Path) -> None:
    """A fresh SkyPilot home with no catalog, whose source (conftest) is a closed port: the credential check is
    reported, the fetch is tried as `plan` tries it, and its failure is a failed check whose hint says to run
    doctor again (not plan)."""
    proc = _doctor_subprocess("mistral-7b-instruct", "--cloud", "aws", "--gpu", "A10G", "--json",
                              env=_no_aws_credentials(tmp_path))
    assert proc.returncode == CloudError.exit_code, proc.stderr
    assert "Traceback" not in proc.stderr
    report = json.loads(proc.stdout)
    [aws] = report["clouds"]  # SkyPilot's own check ran, and is in the report
    assert aws["cloud"] == "aws" and aws["target"] is True and aws["enabled"] is False and aws["reason"]
    assert "fetching SkyPilot's aws catalog (aws/vms.csv, once) from 127.0.0.1:9" in proc.stderr
    messages = [p["message"] for p in report["problems"]]
    assert messages[0] == f"SkyPilot cannot use aws: {aws['reason']}"
    [catalog] = [p for p in report["problems"] if "catalog" in p["message"]]
    assert catalog["message"].startswith("SkyPilot's aws catalog is not downloaded yet (")
    assert "fetching it failed (ConnectError" in catalog["message"]
    assert catalog["hints"] and catalog["hints"][0].endswith("then run doctor again")
    assert "plan again" not in proc.stderr and "plan again" not in proc.stdout
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert errors == [f"error: {message}" for message in messages]
    assert report["quotas"] == [] and report["ok"] is False


def test_missing_catalog_is_fetched_once_as_plan_does(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """SkyPilot's AWS VM catalog missing, every other catalog file there; a catalog server on loopback stands
    in for GitHub: doctor fetches it (with the md5 SkyPilot writes beside its own downloads) and goes on to
    the quota, whose read fails for want of credentials, one line."""
    import functools
    import hashlib
    import threading
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    from _catalog import seed_catalog

    runtime = Path(os.environ["SKY_RUNTIME_DIR"])
    vms = seed_catalog(runtime) / "aws" / "vms.csv"
    vms.unlink()
    served: list[str] = []

    class Handler(SimpleHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            served.append(self.path)

    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(CATALOG_FIXTURE.parent)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        env = {**_no_aws_credentials(tmp_path),
               "MISTRAL_DEPLOY_SKYPILOT_CATALOG_URL": f"http://127.0.0.1:{server.server_address[1]}/catalog"}
        proc = _doctor_subprocess("mistral-7b-instruct", "--cloud", "aws", "--gpu", "A10G", "--region", REGION,
                                  "--json", env=env)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
    assert proc.returncode == CloudError.exit_code, proc.stderr
    assert "fetching SkyPilot's aws catalog (aws/vms.csv, once)" in proc.stderr
    assert served == [f"/catalog/{CATALOG_VERSION}/aws/vms.csv"]
    text = vms.read_text(encoding="utf-8")
    assert text == (CATALOG_FIXTURE / CATALOG_VERSION / "aws" / "vms.csv").read_text(encoding="utf-8")
    assert (vms.parent.parent / ".meta" / "aws" / "vms.csv.md5").read_text() == hashlib.md5(text.encode()).hexdigest()
    report = json.loads(proc.stdout)
    assert [c["cloud"] for c in report["clouds"]] == ["aws"]
    on_demand = _by_market(report)["on-demand"]  # the fetched catalog's instance type, its quota not readable
    assert on_demand["instance_type"] == _cheapest("A10G", region=REGION)["InstanceType"]
    assert on_demand["status"] == "error"
    assert any(p["message"].startswith("no AWS credentials found") for p in report["problems"])
    assert not any("catalog" in p["message"] for p in report["problems"])


def test_an_unreadable_catalog_is_a_failed_check_after_the_credential_check(
    sky_session: Any, sky_check: Any, no_aws_calls: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mistral_deploy import pricing

    sky_check(aws=(True, None))

    def unreadable(*args: Any, **kwargs: Any) -> Any:
        raise CloudError("reading SkyPilot's catalog failed: ParserError: bad row")

    monkeypatch.setattr(pricing, "_list_accelerators", unreadable)
    result = run_cli("doctor", "mistral-7b", "--cloud", "aws", "--gpu", "A10G")
    assert result.exit_code == CloudError.exit_code, result.output
    assert "Traceback" not in result.output
    assert "aws (target)" in result.stdout and "yes" in result.stdout  # the credential check is reported
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert errors == ["error: reading SkyPilot's catalog failed: ParserError: bad row"]


# --- the real SkyPilot boundary, and quota codes ----------------------------------------------------------


def test_real_skypilot_check_in_process(sky_session: Any) -> None:
    ok, reason = doctor.sky_check_credentials("azure")  # no ~/.azure here: answered from local files
    assert ok is False and reason and "az login" in reason
    with pytest.raises(RecipeError, match="SkyPilot knows no cloud 'nebulous'"):
        doctor.sky_check_credentials("nebulous")


def test_fresh_process_runs_skypilots_check_without_an_api_server(sky_catalog: Path) -> None:
    code = "from mistral_deploy.cli import main; main()"
    proc = subprocess.run([sys.executable, "-c", code, "doctor", "mistral-7b", "--cloud", "azure", "--json"],
                          capture_output=True, text=True, timeout=120, env=dict(os.environ))
    assert proc.returncode == CloudError.exit_code, proc.stderr
    report = json.loads(proc.stdout)  # SkyPilot printed nothing on our stdout
    [azure] = report["clouds"]
    assert azure["cloud"] == "azure" and azure["enabled"] is False and "az login" in azure["reason"]
    assert [line for line in proc.stderr.splitlines() if line.startswith("error: ")] == [
        f"error: SkyPilot cannot use azure: {azure['reason']}"]
    for root in (Path(os.environ["HOME"]), sky_catalog):
        assert not (root / ".sky" / "api_server").exists(), "doctor must not start SkyPilot's API server"


def test_unknown_cloud_is_a_flag_error(sky_session: Any) -> None:
    result = run_cli("doctor", "mistral-7b", "--cloud", "nebulous")
    assert result.exit_code == RecipeError.exit_code
    assert "--cloud (resources.cloud): unknown infrastructure 'nebulous'; did you mean 'nebius'?" in result.stderr


@pytest.mark.parametrize(("instance_type", "on_demand", "spot"), [
    ("g4dn.xlarge", "L-DB2E81BA", "L-3819A6DF"),
    ("g5.xlarge", "L-DB2E81BA", "L-3819A6DF"),
    ("g6e.12xlarge", "L-DB2E81BA", "L-3819A6DF"),
    ("vt1.3xlarge", "L-DB2E81BA", "L-3819A6DF"),
    ("p3.2xlarge", "L-417A185B", "L-7212CCBC"),
    ("p4d.24xlarge", "L-417A185B", "L-7212CCBC"),
    ("p5.48xlarge", "L-417A185B", "L-C4BD4855"),
    ("p6-b200.48xlarge", "L-417A185B", None),
    ("inf2.xlarge", "L-1945791B", "L-B5D1601B"),
    ("m5.large", None, None),
])
def test_quota_codes(sky_session: Any, instance_type: str, on_demand: Optional[str], spot: Optional[str]) -> None:
    def code(spot_market: bool) -> Optional[str]:
        found = doctor.quota_code(instance_type, spot=spot_market)
        return found[0] if found else None

    assert (code(False), code(True)) == (on_demand, spot)


# --- start-up cost ------------------------------------------------------------------------------------------


def test_help_does_not_import_sky_or_boto3() -> None:
    runner = (
        "import json, sys\n"
        "from mistral_deploy.cli import main\n"
        "for argv in (['--help'], ['doctor', '--help'], ['init', '--help']):\n"
        "    try:\n"
        "        main(argv)\n"
        "    except SystemExit as exc:\n"
        "        assert exc.code in (0, None), (argv, exc.code)\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in ('sky', 'boto3', 'botocore'))),\n"
        "      file=sys.stderr)\n"
    )
    proc = subprocess.run([sys.executable, "-c", runner], capture_output=True, text=True, timeout=120,
                          env=dict(os.environ))
    assert proc.returncode == 0, proc.stderr
    assert "doctor" in proc.stdout and "init" in proc.stdout
    assert json.loads(proc.stderr.strip().splitlines()[-1]) == []
