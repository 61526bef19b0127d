"""What does counting usage, and watching it, cost the endpoint? Measured on this machine, in one run.

    python benchmarks/usage_cost.py [--outputs 256] [--steps 2000] [--seconds 30]

1. The engine's side of usage per key (templates/md_usage.py, a vLLM stat logger plugin): for a step of
   --outputs requests (one new token each, as in decode at that concurrency), the time vLLM's own
   IterationStats.update_from_output takes for the step, with the plugin's wrapper and without it, in the
   engine's Python (the real vLLM classes); what the plugin adds per step, per output, and as a share of a
   decode step of the tiny model at that batch measured on this machine (a real one is slower: a smaller
   share). The record() merge and the once-a-second write are per step and per second, not per output.
2. `top`'s sampling (aim: < 1% of one core on the endpoint): a local tiny endpoint, idle; over --seconds
   the CPU of the engine's processes without a sampler, then with the 1 Hz sampler `top` runs there
   (usage.py's follow mode: the engine's /metrics over its socket and the records), plus the sampler's own
   CPU. The engine's idle CPU is printed too: the difference is what sampling costs it.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _local import deployment, state_home  # noqa: E402

PLUGIN_TIMING = r'''
import sys, time
sys.path.insert(0, sys.argv[1])
from vllm.v1.metrics import stats
from vllm.v1.engine import EngineCoreOutput
original = stats.IterationStats.update_from_output
import md_usage  # wraps IterationStats.update_from_output
wrapped = stats.IterationStats.update_from_output
count, steps = int(sys.argv[2]), int(sys.argv[3])
outputs = [EngineCoreOutput(request_id="cmpl-mdk.key-%d.%032x-0" % (i % 4, i), new_token_ids=[7])
           for i in range(count)]
per_request = [stats.RequestStateStats(arrival_time=time.time()) for _ in range(count)]
lora = stats.LoRARequestStates(log_stats=True)
plugin = md_usage.UsagePerKey(None)

def step(update):
    iteration = stats.IterationStats()
    now = time.monotonic()
    for output, req in zip(outputs, per_request):
        update(iteration, output, now, False, req, lora, None)
    return iteration

def timed(update, with_record):
    best = []
    for _ in range(5):
        started = time.perf_counter()
        for _ in range(steps):
            iteration = step(update)
            if with_record:
                plugin.record(None, iteration)
        best.append((time.perf_counter() - started) / steps)
    return min(best)

timed(wrapped, True)
plain, counted = timed(original, False), timed(wrapped, True)
print(plain, counted)
'''


def _cpu_seconds(pids: list[int]) -> float:
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / ticks  # utime, stime
    return total


def _group(pgid: int) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if os.getpgid(int(entry.name)) == pgid:
                    pids.append(int(entry.name))
            except OSError:
                continue
    return pids


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--outputs", type=int, default=256)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--seconds", type=float, default=30)
    args = parser.parse_args()
    from mistral_deploy import engine

    python = engine.engine_python()
    with state_home(), deployment("bench-usage") as (deployed, key, store):
        plugin_dir = store.dir(deployed.name) / "engine-plugin"
        done = subprocess.run([python, "-c", PLUGIN_TIMING, str(plugin_dir), str(args.outputs), str(args.steps)],
                              capture_output=True, text=True, timeout=900, env={**os.environ, "MD_USAGE_DIR": ""})
        if done.returncode != 0:
            sys.exit(done.stderr[-2000:])
        plain, counted = (float(v) for v in done.stdout.split()[-2:])
        print(f"engine plugin, a step of {args.outputs} outputs (best of 5 x {args.steps} steps):")
        print(f"  vLLM's stats update   {plain * 1e6:8.1f} us/step")
        print(f"  with the usage plugin {counted * 1e6:8.1f} us/step  (+{(counted - plain) * 1e6:.1f} us, "
              f"{(counted - plain) / args.outputs * 1e9:.0f} ns per output)")
        import concurrent.futures

        import httpx

        with httpx.Client(base_url=deployed.endpoint, headers={"Authorization": f"Bearer {key}"}, timeout=300,
                          trust_env=False) as client:
            body = {"model": "tiny-mistral", "prompt": "a", "max_tokens": 128, "ignore_eos": True}
            client.post("/completions", json=body).raise_for_status()  # warm-up
            with concurrent.futures.ThreadPoolExecutor(64) as pool:
                started = time.perf_counter()
                for reply in pool.map(lambda _: client.post("/completions", json=body), range(64)):
                    reply.raise_for_status()
            step = (time.perf_counter() - started) / 128
        print(f"  a decode step of the tiny model at 64 requests here: {step * 1000:.1f} ms (at most; prefills "
              f"included); the plugin adds {(counted - plain) / args.outputs * 64 / step * 100:.3f}% to it "
              f"(a 7B model's step on a GPU is longer still)")

        engine_pids = _group(int(deployed.details["engine"]["pid"]))
        before = _cpu_seconds(engine_pids)
        time.sleep(args.seconds)
        idle = (_cpu_seconds(engine_pids) - before) / args.seconds
        from mistral_deploy import usage

        directory = store.dir(deployed.name)
        sampler = subprocess.Popen([sys.executable, usage.__file__, "follow", str(directory / "gateway" / "access.log"),
                                    str(directory / "usage" / "engine.jsonl"), deployed.details["engine_socket"], "1"],
                                   stdout=subprocess.PIPE, text=True)
        before = _cpu_seconds(engine_pids)
        samples = 0
        deadline = time.monotonic() + args.seconds
        assert sampler.stdout is not None
        while time.monotonic() < deadline:
            if sampler.stdout.readline():
                samples += 1
        watched = (_cpu_seconds(engine_pids) - before) / args.seconds
        own = _cpu_seconds([sampler.pid])
        sampler.terminate()
        sampler.wait(timeout=10)
        # what one /metrics answer costs the engine: back to back, its CPU over their count
        calls = 100
        before = _cpu_seconds(engine_pids)
        for _ in range(calls):
            assert usage.engine_metrics_text(deployed.details["engine_socket"]) is not None
        per_call = (_cpu_seconds(engine_pids) - before) / calls
        print(f"top's 1 Hz sampling, {samples} samples over {args.seconds:g}s, idle endpoint:")
        print(f"  one /metrics answer costs the engine {per_call * 1000:.1f} ms of CPU ({calls} back to back): "
              f"{per_call * 100:.2f}% of a core at 1 Hz")
        print(f"  engine CPU without a sampler {idle * 100:6.2f}% of a core")
        print(f"  engine CPU with the sampler  {watched * 100:6.2f}% of a core (answering /metrics once a second)")
        print(f"  the sampler's own CPU        {own / args.seconds * 100:6.2f}% of a core (start-up included)")
        print(f"  sampling costs               {(per_call + own / args.seconds) * 100:6.2f}% of a core (aim < 1%): "
              f"/metrics answers plus the sampler ({max(0.0, watched - idle) * 100:.2f}% by the idle difference, "
              f"which the engine's own idle noise blurs)")


if __name__ == "__main__":
    main()
