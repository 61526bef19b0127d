"""What each kind of change costs on the real local stack (tiny model, vLLM CPU build, nginx), through the
CLI as a user runs it: wall time of `up` creating, `up` with nothing changed, a gateway change (reload),
`keys add` / `keys revoke`, an engine change (restart behind the same gateway), and how long a revoked key
takes to be refused. Meanwhile a client streams completions without pause; every stream that fails is
counted. Prints figures; asserts nothing.

    .venv/bin/python benchmarks/converge.py
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _local import free_port, state_home  # noqa: E402

CLI = shutil.which("mistral-deploy", path=str(Path(sys.executable).parent)) or "mistral-deploy"


def cli(*args: str) -> tuple[float, subprocess.CompletedProcess[str]]:
    started = time.perf_counter()
    done = subprocess.run([CLI, *args], capture_output=True, text=True, env=os.environ.copy(), timeout=900)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(args)}: exit {done.returncode}: {done.stderr[-2000:]}")
    return time.perf_counter() - started, done


def recipe(home: Path, port: int, tag: str, **sections: dict) -> str:
    from mistral_deploy.recipe import builtin_recipes_dir

    data = yaml.safe_load((builtin_recipes_dir() / "tiny-mistral.yaml").read_text())
    data.update(name="bench-conv", resources={"cloud": "local"}, network={"mode": "private", "port": port})
    for section, values in sections.items():
        data.setdefault(section, {}).update(values)
    path = home / f"{tag}.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


class Streamer:
    """Streams 64-token completions back to back with the first key until stopped; counts the outcomes."""

    def __init__(self, url: str, key: str) -> None:
        self.url, self.key = url, key
        self.ok = self.failed = 0
        self.errors: dict[str, int] = {}
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        body = {"model": "tiny-mistral", "prompt": "a", "max_tokens": 64, "ignore_eos": True, "stream": True}
        with httpx.Client(trust_env=False, timeout=60) as client:
            while not self.stop.is_set():
                try:
                    with client.stream("POST", f"{self.url}/completions", json=body,
                                       headers={"Authorization": f"Bearer {self.key}"}) as response:
                        text = "".join(response.iter_text())
                    if response.status_code == 200 and text.rstrip().endswith("[DONE]"):
                        self.ok += 1
                        continue
                    self.failed += 1
                    self.errors[f"HTTP {response.status_code}"] = self.errors.get(f"HTTP {response.status_code}", 0) + 1
                except httpx.HTTPError as exc:
                    self.failed += 1
                    self.errors[type(exc).__name__] = self.errors.get(type(exc).__name__, 0) + 1
                self.stop.wait(0.5)  # as a client would, before it retries

    def finish(self) -> tuple[int, int]:
        self.stop.set()
        self.thread.join(timeout=60)
        return self.ok, self.failed


def main() -> None:
    with state_home() as home:
        port = free_port()
        base = recipe(home, port, "base")
        figures: dict[str, float | int | str] = {}
        figures["up (create) s"], done = cli("up", base, "--json")
        url = json.loads(done.stdout)["endpoint"]
        key = (home / "deployments" / "bench-conv" / "api_keys").read_text().split()[1]
        try:
            figures["up (no change) s"], _ = cli("up", base, "--json")
            streamer = Streamer(url, key)
            time.sleep(1)
            figures["up (gateway reload) s"], _ = cli("up", recipe(home, port, "gw", limits={"requests_per_minute": 600}))
            figures["keys add s"], added = cli("keys", "add", "bench-conv", "--json")
            new = json.loads(added.stdout)["key"]
            figures["keys revoke s"], _ = cli("keys", "revoke", "bench-conv", "key-2")
            accepted = 0
            with httpx.Client(trust_env=False, headers={"Authorization": f"Bearer {new}"}) as client:
                while client.get(f"{url}/models", headers={"Connection": "close"}).status_code != 401:
                    accepted += 1
            figures["requests with the revoked key accepted after `keys revoke` returned"] = accepted
            gateway_ok, gateway_failed = streamer.ok, streamer.failed
            gateway_errors = dict(streamer.errors)
            figures["up (engine restart) s"], _ = cli("up", recipe(home, port, "engine", limits={"requests_per_minute": 600},
                                                                    model={"max_model_len": 384}))
            ok, failed = streamer.finish()
            figures["streams through gateway reload and keys: ok / failed"] = (
                f"{gateway_ok} / {gateway_failed} {gateway_errors or ''}")
            figures["streams over the whole run (engine restart included): ok / failed"] = (
                f"{ok} / {failed} {streamer.errors or ''}")
        finally:
            cli("down", "bench-conv")
    width = max(len(k) for k in figures)
    for name, value in figures.items():
        print(f"{name.ljust(width)}  {value if not isinstance(value, float) else f'{value:.2f}'}")


if __name__ == "__main__":
    main()
