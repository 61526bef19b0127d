"""Usage records as `usage`, `top` and `metrics` read them: rotated files followed by inode, the access log's
key ids, the engine's per-key tokens, histogram quantiles and cost. (On the real stack:
test_converge_local.py's usage tests, and the bed's VM and service tests.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mistral_deploy import observe, usage
from mistral_deploy.errors import MistralDeployError
from mistral_deploy.state import Deployment

LINE = '127.0.0.1 [{t}] "POST /v1/chat/completions" {status} key={key} 773 0.087 0.087\n'


def _access(path: Path, *entries: tuple[str, int, str]) -> None:
    with path.open("a") as fh:
        for when, status, key in entries:
            fh.write(LINE.format(t=when, status=status, key=key))


def _engine(path: Path, *entries: tuple[float, str, int, int]) -> None:
    with path.open("a") as fh:
        for when, key, prompt, completion in entries:
            fh.write(json.dumps({"t": when, "key": key, "prompt": prompt, "completion": completion}) + "\n")


def test_a_follower_reads_each_line_once_across_rotations_and_waits_for_whole_lines(tmp_path):
    log = tmp_path / "access.log"
    log.write_text("one\ntwo\nthr")
    follower = usage.Follower(str(log))
    assert list(follower.lines()) == ["one", "two"]
    with log.open("a") as fh:
        fh.write("ee\n")
    os.replace(log, f"{log}.1")  # rotated, as the log pipe and the run script do: the same inode, renamed
    log.write_text("four\n")
    assert list(follower.lines()) == ["three", "four"]
    os.replace(f"{log}.1", f"{log}.2")
    os.replace(log, f"{log}.1")
    log.write_text("five\n")
    assert list(follower.lines()) == ["five"]
    assert usage.rotated(str(log)) == [f"{log}.2", f"{log}.1", str(log)]


def test_records_count_requests_by_outcome_and_tokens_per_key_since_a_time(tmp_path):
    access, engine = tmp_path / "access.log", tmp_path / "engine.jsonl"
    _access(access, ("2026-12-06T09:00:00+00:00", 200, "key-1"), ("2026-12-06T10:00:00+00:00", 200, "key-1"),
            ("2026-12-06T10:00:01+00:00", 429, "key-1"), ("2026-12-06T10:00:02+00:00", 401, "-"),
            ("2026-12-06T10:00:03+00:00", 400, "ci"), ("2026-12-06T10:00:04+00:00", 503, "ci"))
    (tmp_path / "access.log").open("a").write("a line of another format\n")
    since = usage.epoch("2026-12-06T09:30:00+00:00")
    _engine(engine, (since - 60, "key-1", 100, 100), (since + 1, "key-1", 7, 30), (since + 2, "ci", 3, 0))
    keys = usage.Records(str(access), str(engine), since=since).update()
    assert keys["key-1"] == {"2xx": 1, "401/403": 0, "429": 1, "4xx": 0, "5xx": 0, "prompt": 7, "completion": 30}
    assert keys["-"]["401/403"] == 1 and keys["ci"]["4xx"] == 1 and keys["ci"]["5xx"] == 1 and keys["ci"]["prompt"] == 3
    everything = usage.Records(str(access), str(engine)).update()
    assert everything["key-1"]["2xx"] == 2 and everything["key-1"]["completion"] == 130


def test_quantiles_follow_prometheus_histogram_quantile():
    bounds, counts = [0.01, 0.1, 1.0, float("inf")], [0.0, 50.0, 100.0, 100.0]
    assert observe.quantile(0.5, bounds, counts) == pytest.approx(0.1)
    assert observe.quantile(0.95, bounds, counts) == pytest.approx(0.1 + 0.9 * 0.9)
    assert observe.quantile(0.25, bounds, counts) == pytest.approx(0.01 + 0.09 * 0.5)
    assert observe.quantile(0.5, bounds, [0.0, 0.0, 0.0, 0.0]) is None
    # a window: the newer counts less the older ones
    assert observe._histogram_delta({"le": bounds, "count": [1, 60, 110, 110]},
                                    {"le": bounds, "count": [1, 10, 10, 10]}) == (bounds, [0, 50, 100, 100])


def test_engine_metrics_are_summed_over_label_sets():
    text = "\n".join([
        "# HELP vllm:generation_tokens_total x", 'vllm:generation_tokens_total{engine="0",model_name="m"} 10.0',
        'vllm:generation_tokens_total{engine="1",model_name="m"} 5.0', 'vllm:num_requests_running{engine="0"} 2.0',
        'vllm:kv_cache_usage_perc{engine="0"} 0.25',
        'vllm:time_to_first_token_seconds_bucket{engine="0",le="0.1"} 3.0',
        'vllm:time_to_first_token_seconds_bucket{engine="0",le="+Inf"} 4.0'])
    numbers = usage.engine_numbers(text)
    assert numbers["generation_tokens"] == 15 and numbers["running"] == 2 and numbers["kv_cache"] == 0.25
    assert numbers["ttft"] == {"le": [0.1, float("inf")], "count": [3.0, 4.0]} and numbers["reachable"]
    assert usage.engine_numbers(None)["reachable"] is False


def test_a_replicas_series_get_its_label_and_help_lines_come_once():
    seen: set[str] = set()
    text = '# TYPE a counter\na_total{x="1"} 3\nb 4\n'
    assert observe.labelled(text, "1", seen) == ['# TYPE a counter', 'a_total{replica="1",x="1"} 3', 'b{replica="1"} 4']
    assert observe.labelled(text, "2", seen) == ['a_total{replica="2",x="1"} 3', 'b{replica="2"} 4']


def test_usage_shares_the_cost_by_tokens_and_prices_a_million():
    deployment = Deployment(name="d", backend="cloud", recipe={}, created_at=time.time() - 7200,
                            details={"hourly_price": 2.0})
    sample = {"keys": {"a": {**dict.fromkeys(usage.OUTCOMES, 0), "2xx": 3, "429": 1, "prompt": 250_000,
                             "completion": 500_000},
                       "b": {**dict.fromkeys(usage.OUTCOMES, 0), "401/403": 2, "prompt": 0, "completion": 250_000}}}
    report = observe.usage_report(deployment, [sample], time.time() - 3600)
    rows = {r["key"]: r for r in report["keys"]}
    assert report["cost"] == pytest.approx(2.0, abs=0.01) and report["usd_per_mtok"] == pytest.approx(2.0, abs=0.01)
    assert rows["a"]["cost_share"] == 0.75 and rows["a"]["refused"] == 1 and rows["b"]["refused"] == 2
    assert rows["a"]["requests"] == 4 and rows["b"]["cost"] == pytest.approx(0.5, abs=0.01)
    idle = observe.cost_figures(deployment, 1_000_000, 0.0)
    assert idle["idle_usd_per_hour"] == 2.0 and idle["usd_per_mtok_so_far"] == pytest.approx(4.0, abs=0.01)
    assert "idle: $2.00/hour" in observe.cost_line(idle)


@pytest.mark.parametrize("text", ["yesterday", "24", "-1h", "1y"])
def test_since_is_a_duration(text):
    with pytest.raises(MistralDeployError, match="--since"):
        observe.parse_since(text)


def test_the_sampler_runs_as_a_script_with_the_standard_library_alone(tmp_path):
    """As on a VM: usage.py's text alone, in a Python that has no mistral_deploy (-I: isolated)."""
    access, engine = tmp_path / "access.log", tmp_path / "engine.jsonl"
    _access(access, ("2026-12-06T10:00:00+00:00", 200, "key-1"))
    _engine(engine, (time.time(), "key-1", 5, 9))
    code = Path(usage.__file__).read_text()
    done = subprocess.run([sys.executable, "-I", "-", "sample", str(access), str(engine), str(tmp_path / "none.sock")],
                          input=code, capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    sample = json.loads(done.stdout)
    assert sample["keys"]["key-1"]["completion"] == 9 and sample["engine"]["reachable"] is False
    metrics = subprocess.run([sys.executable, "-I", "-", "metrics", str(access), str(engine), "/nonexistent"],
                             input=code, capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert 'mistral_deploy_completion_tokens_total{key="key-1"} 9' in metrics.stdout


@pytest.mark.parametrize("argv, says, code", [
    (["usage", "nope", "--since", "yesterday"], "--since: expected a duration", 1),
    (["usage", "nope"], "nope", 5),
    (["top", "nope", "--json"], "--json: only with --once", 1),
    (["top", "nope", "--once"], "nope", 5),
    (["metrics", "nope"], "nope", 5),
])
def test_bad_input_is_one_line_naming_the_flag_or_deployment(tmp_path, monkeypatch, argv, says, code):
    from _cli import run_cli

    monkeypatch.setenv("MISTRAL_DEPLOY_HOME", str(tmp_path))
    result = run_cli(*argv)
    assert result.exit_code == code and says in result.stderr and "Traceback" not in result.output
    assert len(result.stderr.strip().splitlines()) <= 2  # the error, and at most a hint


def test_each_sample_keeps_its_own_counts_so_that_rates_are_differences(tmp_path):
    access, engine = tmp_path / "access.log", tmp_path / "engine.jsonl"
    _access(access, ("2026-12-06T10:00:00+00:00", 200, "key-1"))
    records = usage.Records(str(access), str(engine))
    first = usage.sample(records, str(tmp_path / "none.sock"))
    _access(access, ("2026-12-06T10:00:01+00:00", 200, "key-1"), ("2026-12-06T10:00:01+00:00", 429, "key-1"))
    second = usage.sample(records, str(tmp_path / "none.sock"))
    assert first["keys"]["key-1"]["2xx"] == 1 and second["keys"]["key-1"]["2xx"] == 2
    series = observe.Series("local")
    series.add(first)
    series.add({**second, "t": first["t"] + 2.0})
    assert series.view()["requests_per_s"] == {"2xx": 0.5, "401/403": 0.0, "429": 0.5, "4xx": 0.0, "5xx": 0.0}
