"""`mistral-deploy usage`: requests, tokens, refusals and cost per API key id."""

from __future__ import annotations

from typing import Annotated

import typer

from mistral_deploy.cli import app
from mistral_deploy.cli._output import Output


@app.command()
def usage(
    name: Annotated[str, typer.Argument(help="A deployment.")],
    since: Annotated[str, typer.Option("--since", help="How far back: 30m, 24h, 7d, or all.")] = "24h",
    json_out: Annotated[bool, typer.Option("--json", help="JSON on stdout.")] = False,
) -> None:
    """Per key id: requests, prompt and completion tokens (exactly as the engine counted them, streamed or
    not, cancelled included), refusals, and each key's share of the cost. Exit 5: no such deployment."""
    from mistral_deploy import observe
    from mistral_deploy.state import StateStore

    out = Output(json_mode=json_out)
    start = observe.parse_since(since)
    store = StateStore()
    deployment = store.load(name)
    samples = [source.sample(start) for source in observe.sources(deployment, store)]
    report = observe.usage_report(deployment, samples, start)
    if json_out:
        out.json(report)
        return
    from rich.table import Table

    table = Table(box=None, pad_edge=False)
    for column in ("KEY", "REQUESTS", "PROMPT TOKENS", "COMPLETION TOKENS", "REFUSED", "5XX", "COST SHARE"):
        table.add_column(column, justify="left" if column == "KEY" else "right")
    for row in report["keys"]:
        share = f"{row['cost_share'] * 100:.1f}%" + (f" ${row['cost']:.2f}" if row["cost"] is not None else "")
        table.add_row(row["key"] if row["key"] != "-" else "(no key)", f"{row['requests']:,}",
                      f"{row['prompt_tokens']:,}", f"{row['completion_tokens']:,}", f"{row['refused']:,}",
                      f"{row['errors']:,}", share)
    out.print(table if report["keys"] else f"no requests since {since}")
    tokens = report["prompt_tokens"] + report["completion_tokens"]
    if report["cost"] is not None:
        per = f", ${report['usd_per_mtok']:.2f}/Mtok" if report["usd_per_mtok"] is not None else ""
        out.print(f"{tokens:,} tokens for ${report['cost']:.2f} at ${report['hourly_price']:.2f}/hour{per}")
    else:
        from mistral_deploy.observe import cost_line

        out.print(f"{tokens:,} tokens; {cost_line({}, deployment.backend)}")
