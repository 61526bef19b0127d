"""`plan`: the fit check, then prices from SkyPilot's catalog (the seeded fixture), cheapest first.

Expected prices are computed from tests/fixtures/catalog, never hard-coded: AWS lists a price per instance
and region (spot: the cheapest zone), GCP prices a GPU as the accelerator plus its host VM.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from _catalog import CATALOG_FIXTURE, CATALOG_VERSION, sky_catalog, sky_session  # noqa: F401  (fixtures)
from _cli import run_cli
from mistral_deploy.errors import CloudError, FitError, RecipeError
from mistral_deploy.pricing import HOURS_PER_MONTH, Offer, cheapest_first, cheapest_per_region
from mistral_deploy.recipe import GpuRequest

CATALOG = CATALOG_FIXTURE / CATALOG_VERSION


def _rows(cloud: str) -> list[dict[str, str]]:
    with (CATALOG / cloud / "vms.csv").open(encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _aws_prices(instance: str, region: str) -> tuple[float, float]:
    rows = [r for r in _rows("aws") if r["InstanceType"] == instance and r["Region"] == region]
    assert rows, (instance, region)
    return float(rows[0]["Price"]), min(float(r["SpotPrice"]) for r in rows if r["SpotPrice"])


def _gcp_prices(host: str, gpu: str, count: int, region: str) -> tuple[float, float]:
    rows = _rows("gcp")
    acc = [r for r in rows if r["AcceleratorName"] == gpu and r["AcceleratorCount"] == str(count)
           and r["Region"] == region]
    vm = [r for r in rows if r["InstanceType"] == host and r["Region"] == region]
    assert acc and vm
    return (float(acc[0]["Price"]) + float(vm[0]["Price"]), float(acc[0]["SpotPrice"]) + float(vm[0]["SpotPrice"]))


def _plan_json(*args: str) -> dict[str, Any]:
    result = run_cli("plan", *args, "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_prices_come_from_the_catalog(sky_session: Any) -> None:
    plan = _plan_json("mistral-7b")
    offers = {(o["cloud"], o["region"], o["instance_type"]): o for o in plan["offers"]}
    on_demand, spot = _aws_prices("g5.xlarge", "us-east-1")
    assert offers[("aws", "us-east-1", "g5.xlarge")]["price_per_hour"] == pytest.approx(on_demand)
    assert offers[("aws", "us-east-1", "g5.xlarge")]["spot_price_per_hour"] == pytest.approx(spot)
    on_demand, spot = _gcp_prices("g2-standard-4", "L4", 1, "us-central1")
    gcp = offers[("gcp", "us-central1", "g2-standard-4")]
    assert (gcp["price_per_hour"], gcp["spot_price_per_hour"]) == (pytest.approx(on_demand), pytest.approx(spot))
    assert gcp["monthly"] == pytest.approx(on_demand * HOURS_PER_MONTH, abs=0.01)
    assert {o["gpu"] for o in plan["offers"]} == {"A10G:1", "L4:1", "A10:1"}  # A10: Azure's
    assert plan["hours_per_month"] == HOURS_PER_MONTH and plan["clouds"] == ["aws", "gcp", "azure"]


def test_cheapest_first_on_demand_and_spot(sky_session: Any) -> None:
    hourly = [o["price_per_hour"] for o in _plan_json("mistral-7b")["offers"]]
    assert hourly == sorted(hourly)
    spot = _plan_json("mistral-7b", "--spot")
    assert spot["spot"] is True
    spot_hourly = [o["spot_price_per_hour"] for o in spot["offers"]]
    assert spot_hourly == sorted(spot_hourly)
    assert all(o["monthly"] == pytest.approx(o["spot_price_per_hour"] * HOURS_PER_MONTH, abs=0.01)
               for o in spot["offers"])


def test_one_row_per_region_unless_all(sky_session: Any) -> None:
    cheapest = _plan_json("mistral-7b", "--gpu", "A10G", "--cloud", "aws")["offers"]
    assert len({(o["region"], o["gpu"]) for o in cheapest}) == len(cheapest)
    assert {o["instance_type"] for o in cheapest} == {"g5.xlarge"}  # g5.2xlarge costs more everywhere
    every = _plan_json("mistral-7b", "--gpu", "A10G", "--cloud", "aws", "--all")["offers"]
    assert {o["instance_type"] for o in every} == {"g5.xlarge", "g5.2xlarge"}


def test_cloud_and_region_filters(sky_session: Any) -> None:
    plan = _plan_json("mixtral-8x7b-instruct", "--cloud", "gcp")
    assert {o["cloud"] for o in plan["offers"]} == {"gcp"} and plan["clouds"] == ["gcp"]
    assert {o["gpu"] for o in plan["offers"]} == {"A100-80GB:2", "H100:2"}
    plan = _plan_json("mistral-7b", "--region", "us-east-2")
    assert {(o["cloud"], o["region"]) for o in plan["offers"]} == {("aws", "us-east-2")}


def test_a_gpu_without_a_spot_market_shows_none(sky_session: Any) -> None:
    offers = _plan_json("mistral-7b", "--gpu", "H100", "--cloud", "aws")["offers"]
    assert offers[0]["instance_type"] == "p5.4xlarge" and offers[0]["spot_price_per_hour"] is None


def test_only_candidates_that_fit_are_priced(sky_session: Any, tmp_path: Path) -> None:
    path = tmp_path / "two-candidates.yaml"
    path.write_text("name: seven\nmodel: {id: mistralai/Mistral-7B-Instruct-v0.3, max_model_len: 16384}\n"
                    "resources: {gpu: [T4:1, A10G:1]}\n", encoding="utf-8")
    plan = _plan_json(str(path))
    assert {e["gpu"]: e["fits"] for e in plan["estimates"]} == {"T4:1": False, "A10G:1": True}
    assert {o["gpu"] for o in plan["offers"]} == {"A10G:1"}


def test_local_recipe_is_priced_on_every_cloud(sky_session: Any) -> None:
    plan = _plan_json("tiny-mistral")
    assert plan["clouds"] == ["aws", "gcp", "azure"]
    assert {o["cloud"] for o in plan["offers"]} == {"aws", "gcp", "azure"}  # the fixture has T4 on all three
    gcp = next(o for o in plan["offers"] if o["cloud"] == "gcp")
    # GCP prices the T4 and its host VM (n1-highmem-8, SkyPilot's default for one T4) apart: both counted
    assert gcp["instance_type"] == "n1-highmem-8" and abs(gcp["price_per_hour"] - (0.35 + 0.47321)) < 1e-6


def test_table_output(sky_session: Any) -> None:
    result = run_cli("plan", "mistral-7b-instruct", "--gpu", "A10G")
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "A10G:1: fits: weights" in out
    for header in ("cloud", "region", "instance type", "GPU", "$/h on-demand", "$/h spot", "est. $/month"):
        assert header in out
    on_demand, spot = _aws_prices("g5.xlarge", "us-east-1")
    row = next(line for line in out.splitlines() if "us-east-1" in line)
    assert "g5.xlarge" in row and f"{on_demand:.3f}" in row and f"{spot:.3f}" in row
    assert f"{on_demand * HOURS_PER_MONTH:,.0f}" in row


def test_plan_does_not_fit(sky_session: Any) -> None:
    result = run_cli("plan", "mixtral-8x7b-instruct", "--gpu", "A10G")
    assert result.exit_code == FitError.exit_code
    assert "would fit: A100-80GB:2" in result.stderr and result.stdout == ""


def test_no_offer_is_a_clear_error(sky_session: Any) -> None:
    result = run_cli("plan", "mistral-7b", "--gpu", "A10G", "--cloud", "gcp")
    assert result.exit_code == RecipeError.exit_code
    assert "no offer for A10G:1 on gcp" in result.stderr and "Traceback" not in result.output


def test_unpriced_cloud_is_a_clear_error(sky_session: Any) -> None:
    result = run_cli("plan", "mistral-7b", "--cloud", "kubernetes")
    assert result.exit_code == RecipeError.exit_code
    assert "--cloud" in result.stderr and "aws, gcp, azure" in result.stderr


def test_plan_needs_a_gpu(tmp_path: Path) -> None:
    path = tmp_path / "cpu.yaml"
    path.write_text("name: cpu-only\nmodel: {id: mistralai/Mistral-7B-v0.1}\n", encoding="utf-8")
    result = run_cli("plan", str(path))
    assert result.exit_code == RecipeError.exit_code and "--gpu" in result.stderr


def test_ordering_helpers() -> None:
    a = Offer("aws", "us-east-1", "a", GpuRequest(name="A10G"), price=1.0, spot_price=0.5)
    b = Offer("aws", "us-east-1", "b", GpuRequest(name="A10G"), price=0.9, spot_price=None)
    c = Offer("gcp", "us-east1", "c", GpuRequest(name="L4"), price=1.2, spot_price=0.3)
    assert [o.instance_type for o in cheapest_first([a, b, c], spot=False)] == ["b", "a", "c"]
    # no spot market: the on-demand price is what one pays
    assert [o.instance_type for o in cheapest_first([a, b, c], spot=True)] == ["c", "a", "b"]
    assert [o.instance_type for o in cheapest_per_region([a, b, c], spot=False)] == ["b", "c"]
    assert b.monthly(spot=True, replicas=2) == pytest.approx(0.9 * HOURS_PER_MONTH * 2)


def _run_plan_subprocess(*args: str) -> subprocess.CompletedProcess[str]:
    code = "from mistral_deploy.cli import main; main()"
    return subprocess.run([sys.executable, "-c", code, "plan", *args], capture_output=True, text=True,
                          timeout=120, env=dict(os.environ))


def test_plan_in_a_fresh_process_reads_the_seeded_catalog_without_an_api_server(sky_catalog: Path) -> None:
    proc = _run_plan_subprocess("mistral-7b", "--cloud", "aws", "--json")
    assert proc.returncode == 0, proc.stderr
    offers = json.loads(proc.stdout)["offers"]
    assert offers and {o["cloud"] for o in offers} == {"aws"}
    home = Path(os.environ["HOME"])
    for root in (home, sky_catalog):
        assert not (root / ".sky" / "api_server").exists(), "plan must not start SkyPilot's API server"
    assert not (sky_catalog / ".sky" / "catalogs" / CATALOG_VERSION / ".meta").exists(), "nothing was fetched"


def test_missing_catalog_offline_fails_clearly() -> None:
    # this test's SkyPilot home has no catalog, and the catalog's source (conftest) is a closed port
    proc = _run_plan_subprocess("mistral-7b", "--cloud", "aws")
    assert proc.returncode == CloudError.exit_code
    assert "fetching SkyPilot's aws catalog (aws/vms.csv, once) from 127.0.0.1:9" in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and errors[0].startswith("error: SkyPilot's aws catalog is not downloaded yet (")
    assert "and fetching it failed (ConnectError" in errors[0] and "sky show-gpus" in proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout == ""
    assert not (Path(os.environ["SKY_RUNTIME_DIR"]) / ".sky" / "catalogs").exists()


def test_missing_catalog_online_is_fetched_once_and_recorded_as_skypilot_does(monkeypatch) -> None:
    """A catalog server on loopback (SkyPilot's own files) stands in for GitHub, which is not reachable here."""
    import functools
    import hashlib
    import threading
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    served: list[str] = []

    class Handler(SimpleHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            served.append(self.path)

    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(CATALOG_FIXTURE.parent)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        monkeypatch.setenv("MISTRAL_DEPLOY_SKYPILOT_CATALOG_URL", f"http://127.0.0.1:{server.server_address[1]}/catalog")
        proc = _run_plan_subprocess("mistral-7b", "--cloud", "aws", "--json")
        again = _run_plan_subprocess("mistral-7b", "--cloud", "aws", "--json")
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
    assert proc.returncode == 0, proc.stderr
    assert "fetching SkyPilot's aws catalog (aws/vms.csv, once)" in proc.stderr
    assert {o["cloud"] for o in json.loads(proc.stdout)["offers"]} == {"aws"}
    fetched = Path(os.environ["SKY_RUNTIME_DIR"]) / ".sky" / "catalogs" / CATALOG_VERSION
    text = (fetched / "aws" / "vms.csv").read_text()
    assert text == (CATALOG_FIXTURE / CATALOG_VERSION / "aws" / "vms.csv").read_text()
    # the md5 SkyPilot writes beside its own downloads: it refreshes the file later instead of keeping it forever
    assert (fetched / ".meta" / "aws" / "vms.csv.md5").read_text() == hashlib.md5(text.encode()).hexdigest()
    assert again.returncode == 0 and "fetching" not in again.stderr
    assert [p for p in served if "vms.csv" in p] == [f"/catalog/{CATALOG_VERSION}/aws/vms.csv"]  # once


def test_a_service_is_priced_by_its_replicas_and_the_shared_controller_apart(sky_session: Any,
                                                                             tmp_path: Path) -> None:
    """One SkyServe controller VM serves all of a user's services: a service's price counts its replicas, and
    the controller is shown apart, once; in consolidation mode there is no controller VM to count."""
    from mistral_deploy import pricing
    from mistral_deploy.converge import estimate_price
    from mistral_deploy.recipe import Overrides, load_recipe, validate_recipe_data

    where = Overrides(cloud="gcp", gpu="L4", region="us-central1")
    data = load_recipe("mistral-7b-instruct", where).recipe.to_yaml_config()
    data.update(replicas=3, network={"mode": "public"})
    service = validate_recipe_data(data, "test").recipe
    vm_price = _gcp_prices("g2-standard-4", "L4", 1, "us-central1")[0]
    # the controller: GCP's default VM for SkyServe's 4+ CPUs and 8+ GB, as the fixture catalog prices it
    cpu_vms = [r for r in _rows("gcp") if r["InstanceType"] and float(r["vCPUs"]) >= 4 and float(r["MemoryGiB"]) >= 8
               and not r["AcceleratorName"]]
    assert cpu_vms
    controller_vm = pricing.controller_price("gcp", "us-central1")
    assert controller_vm is not None and controller_vm in {float(r["Price"]) for r in cpu_vms}
    assert estimate_price(service) == pytest.approx(3 * vm_price, abs=1e-4)  # the replicas, not the controller
    single = load_recipe("mistral-7b-instruct", where).recipe
    assert estimate_price(single) == pytest.approx(vm_price, abs=1e-4)
    from mistral_deploy.converge import serve_controller

    controller = serve_controller(service, services=2)
    assert controller.price == pytest.approx(controller_vm, abs=1e-4) and controller.consolidated is False
    assert "once for all your services (2 services recorded here); not in a service's price" in controller.line()

    path = tmp_path / "service.yaml"
    path.write_text(json.dumps(data), encoding="utf-8")
    plan = _plan_json(str(path))
    assert plan["serve_controller"] == {"price_per_hour": pytest.approx(controller_vm, abs=1e-4),
                                        "consolidation_mode": False, "services_recorded": 1,
                                        "in_service_price": False}
    cheapest = plan["offers"][0]
    assert cheapest["monthly"] == pytest.approx(cheapest["price_per_hour"] * HOURS_PER_MONTH * 3, abs=0.01)
    text = run_cli("plan", str(path))
    assert text.exit_code == 0 and "+ SkyServe controller: $" in text.stdout

    # consolidation mode (SkyPilot's config, as SkyPilot reads it): the controller runs in the API server
    config = Path(os.environ["HOME"]) / ".sky" / "config.yaml"
    config.parent.mkdir(parents=True, exist_ok=True)
    config.write_text("serve:\n  controller:\n    consolidation_mode: true\n", encoding="utf-8")
    try:
        consolidated = serve_controller(service, services=2)
        assert consolidated.consolidated is True and consolidated.price is None
        assert "no VM of its own" in consolidated.line()
        assert _plan_json(str(path))["serve_controller"]["consolidation_mode"] is True
    finally:
        config.unlink()
        assert pricing.serve_consolidation_mode() is False  # and SkyPilot's loaded config is this one again


def test_plan_estimates_dollars_per_million_tokens_and_shows_the_quantized_variants(sky_session: Any) -> None:
    from mistral_deploy.fit import decode_ceiling
    from mistral_deploy.recipe import Overrides, load_recipe

    plan = _plan_json("mistral-7b-instruct", "--cloud", "aws")
    ceiling = plan["throughput_estimate"]["output_tokens_per_s_ceiling"]["A10G:1"]
    assert "datasheet memory bandwidth" in plan["throughput_estimate"]["source"] and "bench" in plan["throughput_estimate"]["source"]
    # the ceiling is below what the A10G's 600 GB/s could stream of the bf16 weights alone, 16 at a time
    recipe = load_recipe("mistral-7b-instruct", Overrides(cloud="aws")).recipe
    assert ceiling == pytest.approx(decode_ceiling(recipe, GpuRequest(name="A10G", count=1)), abs=1e-3)
    assert 0 < ceiling < 16 * 600e9 / (7.25e9 * 2)
    for offer in plan["offers"]:
        expected = offer["price_per_hour"] / (ceiling * 3600) * 1e6 if offer["gpu"] == "A10G:1" else None
        if expected is not None:
            assert offer["usd_per_mtok_output_floor"] == pytest.approx(expected, abs=1e-3)
    rows = {row["recipe"]: row for row in plan["variants"]}
    assert set(rows) == {"mistral-7b-instruct", "mistral-7b-instruct-awq", "mistral-7b-instruct-gptq"}
    t4 = rows["mistral-7b-instruct-awq"]
    assert t4["gpu"] == "T4:1" and t4["quantization"] == "awq" and t4["weights_gib"] < 4.5
    on_demand, _spot = _aws_prices("g4dn.xlarge", "us-east-1")
    assert t4["price_per_hour"] == pytest.approx(on_demand) and t4["price_per_hour"] < rows["mistral-7b-instruct"]["price_per_hour"]

    table = run_cli("plan", "mistral-7b-instruct-gptq", "--cloud", "aws")
    assert table.exit_code == 0, table.output
    assert "$/Mtok out (floor)" in table.stdout and "mistral-7b-instruct-gptq (this one)" in table.stdout


def test_plan_of_mistral_large_3_shows_its_nvfp4_variant_and_how_each_gpu_runs_the_weights(sky_session: Any) -> None:
    plan = _plan_json("mistral-large-3-nvfp4", "--cloud", "aws", "--gpu", "H100:8")
    (h100,) = plan["estimates"]
    assert h100["fits"] and h100["runs"] and "FP4 Marlin" in h100["kernel_note"]
    rows = {row["recipe"]: row for row in plan["variants"]}
    assert set(rows) == {"mistral-large-3", "mistral-large-3-nvfp4", "mistral-large-3-2-nodes"}
    assert rows["mistral-large-3-2-nodes"]["nodes"] == 2 and rows["mistral-large-3-2-nodes"]["gpu"] == "H100:8"
    assert rows["mistral-large-3"]["quantization"] == "fp8" and rows["mistral-large-3-nvfp4"]["quantization"] == "nvfp4"
    assert rows["mistral-large-3-nvfp4"]["weights_gib"] < 0.6 * rows["mistral-large-3"]["weights_gib"]


def test_plan_of_a_model_across_two_nodes_prices_both(sky_session: Any) -> None:
    """Mistral Large 3's FP8 weights on H100: more than one node of eight; two of them, priced together."""
    plan = _plan_json("mistral-large-3-2-nodes", "--cloud", "aws", "--gpu", "H100:8")
    (h100,) = plan["estimates"]
    assert h100["fits"] and h100["usable_gib"] == pytest.approx(2 * 8 * 80 * 0.9)
    offers = {(o["region"], o["instance_type"]): o for o in plan["offers"]}
    on_demand, spot = _aws_prices("p5.48xlarge", "us-east-1")
    offer = offers[("us-east-1", "p5.48xlarge")]
    assert offer["nodes"] == 2
    assert offer["price_per_hour"] == pytest.approx(2 * on_demand)
    assert offer["spot_price_per_hour"] == pytest.approx(2 * spot)
    assert offer["monthly"] == pytest.approx(2 * on_demand * HOURS_PER_MONTH, rel=1e-3)
    # the $/Mtok floor: both nodes' price over the pipeline's ceiling (no more than one node's bandwidth
    # reading the weights: pipeline parallelism adds memory, not decode speed)
    ceiling = plan["throughput_estimate"]["output_tokens_per_s_ceiling"]["H100:8"]
    assert offer["usd_per_mtok_output_floor"] == pytest.approx(2 * on_demand / (ceiling * 3600) * 1e6, rel=1e-2)
    text = run_cli("plan", "mistral-large-3-2-nodes", "--cloud", "aws", "--gpu", "H100:8")
    assert text.exit_code == 0 and "H100:8 x 2 nodes" in text.stdout


def test_one_node_too_small_names_the_nodes_that_would_do(sky_session: Any) -> None:
    result = run_cli("plan", "mistral-large-3", "--cloud", "aws", "--gpu", "H100:8")
    assert result.exit_code == 4
    assert "does not fit H100:8" in result.output and "--gpu H100:8 --nodes 2" in result.output
    two = run_cli("validate", "mistral-large-3", "--gpu", "H100:8", "--nodes", "2")
    assert two.exit_code == 0 and "H100:8 x 2 nodes: fits" in two.stdout


def test_more_nodes_than_the_model_needs_are_pointed_out() -> None:
    result = run_cli("validate", "mistral-7b-instruct", "--cloud", "aws", "--nodes", "2")
    assert result.exit_code == 0
    assert "resources.num_nodes: mistralai/Mistral-7B-Instruct-v0.3 fits 1 node of" in result.output
    assert "num_nodes" not in run_cli("validate", "mistral-large-3-2-nodes").output
