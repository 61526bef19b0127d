"""`mistral-deploy doctor`: preflight checks before any money is spent (mistral_deploy.doctor does the work)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

import typer

from mistral_deploy.cli import app
from mistral_deploy.cli._options import DEFAULT_RECIPE, Cloud, Gpu, OptionalRecipeArg, Region, Spot, load, overrides
from mistral_deploy.cli._output import Output

if TYPE_CHECKING:
    from mistral_deploy.doctor import DoctorReport

JsonFlag = Annotated[bool, typer.Option("--json", help="Print the checks as one JSON object.")]


@app.command()
def doctor(
    recipe: OptionalRecipeArg = DEFAULT_RECIPE,
    cloud: Cloud = None,
    gpu: Gpu = None,
    region: Region = None,
    spot: Spot = None,
    json_out: JsonFlag = False,
) -> None:
    """Check, before any money is spent, that the recipe can launch: which clouds SkyPilot can use, and on AWS
    whether the account's GPU vCPU quota in the region (on-demand and spot) covers the instance it needs.

    Without --region, the region is the cheapest in SkyPilot's catalog, where a launch tries first; a catalog
    not on disk yet is fetched once, as `plan` does.
    Exit 0: every check passed; 9: a check failed (credentials, quota, the catalog); 3: invalid recipe or flag.
    """
    from mistral_deploy import doctor as checks
    from mistral_deploy.errors import CloudError

    out = Output(json_mode=json_out)
    loaded = load(recipe, overrides(cloud=cloud, gpu=gpu, region=region, spot=spot))
    report = checks.diagnose(loaded.recipe, loaded.source, say=out.info)
    if json_out:
        out.json(report.to_json())
    else:
        _print_report(out, report)
    for problem in report.problems:
        out.error(problem.message)
        for hint in problem.hints:
            out.info(f"  {hint}")
    if not report.ok:
        # the report is the output; the failed checks are already printed, one line each
        raise typer.Exit(CloudError.exit_code)


def _print_report(out: Output, report: DoctorReport) -> None:
    from rich import box
    from rich.markup import escape
    from rich.table import Table

    from mistral_deploy.doctor import ERROR, INSUFFICIENT, NOT_OFFERED, OK, UNKNOWN

    out.data(f"{report.source}: doctor")
    if report.clouds:
        table = Table(title="Clouds (SkyPilot's credential check)", title_justify="left", box=box.SIMPLE_HEAD)
        table.add_column("cloud", no_wrap=True)
        table.add_column("usable", no_wrap=True)
        table.add_column("details")
        for access in report.clouds:
            name = f"{access.cloud} (target)" if access.target else access.cloud
            table.add_row(name, "yes" if access.enabled else "no", escape(access.reason or ""))
        out.print(table)
    if report.quotas:
        table = Table(title=f"AWS GPU vCPU quota in {report.region}", title_justify="left", box=box.SIMPLE_HEAD)
        for header, justify in (("GPU", "left"), ("instance type", "left"), ("market", "left"),
                                ("launch uses", "left"), ("needs", "right"), ("quota", "right"),
                                ("status", "left"), ("quota code", "left"), ("quota name", "left")):
            table.add_column(header, justify=justify, no_wrap=header != "quota name")  # type: ignore[arg-type]
        label = {OK: "ok", INSUFFICIENT: "TOO LOW", ERROR: "cannot read", UNKNOWN: "unknown",
                 NOT_OFFERED: "no spot market"}
        for check in report.quotas:
            table.add_row(
                check.gpu,
                check.instance_type,
                check.market,
                "yes" if check.used else "no",
                str(check.needed_vcpus),
                "-" if check.quota_vcpus is None else f"{check.quota_vcpus:g}",
                label.get(check.status, check.status),
                check.quota_code or "-",
                escape(check.quota_name or ""),
            )
        out.print(table)
    for note in report.notes:
        out.info(f"note: {note}")
    if report.ok:
        out.data("all checks passed")
