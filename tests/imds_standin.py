"""A stand-in for the EC2 instance metadata service as SkyPilot's AWS instances have it: IMDSv2 only
(`HttpTokens: required`, sky/templates/aws-ray.yml.j2) and the token's reply sent with an IP TTL of 1
(EC2's default `HttpPutResponseHopLimit`), so that it reaches the instance itself but dies one hop further,
on a container bridge the instance routes for. Requests without a token get 401, as on such an instance.

Run as a program inside a network namespace that holds 169.254.169.254: `python imds_standin.py LOG`, the
role's name, credentials and region as JSON on standard input (never in an argument). It prints `ready`
once it listens. The log names each request (method, path, status, whether a token came): no credential
and no token is ever written to it.
"""

from __future__ import annotations

import json
import secrets
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

ADDRESS = "169.254.169.254"
TOKEN_TTL_HEADER = "X-aws-ec2-metadata-token-ttl-seconds"
TOKEN_HEADER = "X-aws-ec2-metadata-token"
HOP_LIMIT = 1


class Metadata:
    def __init__(self, config: dict[str, Any], log_path: str) -> None:
        self.role = config["role"]
        self.credentials = config["credentials"]  # AccessKeyId, SecretAccessKey, Token, Expiration
        self.region = config["region"]
        self.tokens: dict[str, float] = {}  # token -> expiry (monotonic)
        self.lock = threading.Lock()
        self.log = open(log_path, "a", buffering=1)

    def new_token(self, ttl: int) -> str:
        token = secrets.token_urlsafe(40)
        with self.lock:
            self.tokens[token] = time.monotonic() + ttl
        return token

    def valid(self, token: str | None) -> bool:
        with self.lock:
            return token is not None and self.tokens.get(token, 0) > time.monotonic()

    def document(self, path: str) -> tuple[int, str]:
        path = path.rstrip("/")  # a listing is asked with or without its slash (the AWS CRT: without)
        creds = "/latest/meta-data/iam/security-credentials"
        if path == creds:
            return 200, self.role
        if path == f"{creds}/{self.role}":
            return 200, json.dumps({"Code": "Success", "LastUpdated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                                    "Type": "AWS-HMAC", **self.credentials})
        if path == "/latest/meta-data/iam/info":
            return 200, json.dumps({"Code": "Success", "InstanceProfileArn":
                                    f"arn:aws:iam::123456789012:instance-profile/{self.role}",
                                    "InstanceProfileId": "AIPAEXAMPLE0000000000"})
        if path == "/latest/meta-data/placement/region":
            return 200, self.region
        if path == "/latest/meta-data/placement/availability-zone":
            return 200, self.region + "a"
        if path == "/latest/dynamic/instance-identity/document":
            return 200, json.dumps({"region": self.region, "availabilityZone": self.region + "a",
                                    "instanceId": "i-0123456789abcdef0", "accountId": "123456789012"})
        return 404, ""


def handler_for(metadata: Metadata) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _answer(self, status: int, body: str, hops: int | None = None) -> None:
            if hops is not None:
                # every packet of this connection from now on, the reply first: it reaches the instance (one
                # hop) and is dropped by whatever would forward it further (TTL exceeded)
                self.connection.setsockopt(socket.IPPROTO_IP, socket.IP_TTL, hops)
            data = body.encode()
            self.send_response(status)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
            token = "token" if self.headers.get(TOKEN_HEADER) else "no token"
            metadata.log.write(f"{self.command} {self.path} {status} ({token}{f', ttl {hops}' if hops else ''}) "
                               f"from {self.client_address[0]}\n")

        def do_PUT(self) -> None:  # noqa: N802
            if self.headers.get("X-Forwarded-For"):
                return self._answer(403, "")  # as IMDS: no token for a request that went through a proxy
            if self.path != "/latest/api/token":
                return self._answer(404, "")
            try:
                ttl = int(self.headers.get(TOKEN_TTL_HEADER, ""))
            except ValueError:
                return self._answer(400, "")
            if not 1 <= ttl <= 21600:
                return self._answer(400, "")
            self._answer(200, metadata.new_token(ttl), hops=HOP_LIMIT)

        def do_GET(self) -> None:  # noqa: N802
            if not metadata.valid(self.headers.get(TOKEN_HEADER)):
                return self._answer(401, "")  # HttpTokens: required
            self._answer(*metadata.document(self.path))

        def log_message(self, *args: Any) -> None:  # the one log line per request is _answer's
            pass

    return Handler


def main() -> None:
    metadata = Metadata(json.loads(sys.stdin.read()), sys.argv[1])
    server = ThreadingHTTPServer((ADDRESS, 80), handler_for(metadata))
    server.daemon_threads = True
    print("ready", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
