"""moto's S3 server, the real program (`moto_server`, a test dependency), on a given address: where the
tests keep model weights as a cloud bucket would. Started and stopped by PID; its port is free after."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from local_support import assert_gone, free_port


@contextmanager
def moto_s3(host: str, log: Path) -> Iterator[dict[str, str]]:
    """The server on host:<a free port>; yields the environment that points boto3 and vLLM's Run:ai
    streamer at it (moto accepts any credentials)."""
    port = free_port()
    server = subprocess.Popen([str(Path(sys.executable).parent / "moto_server"), "-H", host, "-p", str(port)],
                              stdout=log.open("w"), stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    env = {"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1", "AWS_REGION": "us-east-1",
           "AWS_EC2_METADATA_DISABLED": "true",
           # moto serves path-style URLs (http://host/bucket/key), not bucket.host
           "RUNAI_STREAMER_S3_USE_VIRTUAL_ADDRESSING": "0"}
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection((host, port), timeout=1).close()
                break
            except OSError:
                assert server.poll() is None and time.monotonic() < deadline, log.read_text()[-2000:]
                time.sleep(0.2)
        yield env
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(timeout=15)
        assert_gone([server.pid], [port])


def s3_client(env: dict[str, str]) -> Any:
    import boto3

    return boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], region_name=env["AWS_DEFAULT_REGION"],
                        aws_access_key_id=env["AWS_ACCESS_KEY_ID"], aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"])
