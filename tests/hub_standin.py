"""A stand-in for the Hugging Face Hub (which cannot be reached here): one gated model repository, served
to one token as the Hub serves it (the API's model info and file tree, `resolve` downloads with the Hub's
headers), and refused to anyone else as the Hub refuses a gated model (401, `X-Error-Code: GatedRepo`).
`huggingface_hub` (snapshot_download, hf_hub_download) and vLLM talk to it through HF_ENDPOINT.
"""

from __future__ import annotations

import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Optional
from urllib.parse import unquote, urlsplit

COMMIT = "0123456789abcdef0123456789abcdef01234567"


class HubStandIn:
    def __init__(self, host: str, repo: str, folder: Optional[Path], token: Optional[str]) -> None:
        """Serve the files of `folder` as `repo` to `token`; with no folder or token, refuse everything."""
        self.repo, self.token = repo, token
        self.files = {p.relative_to(folder).as_posix(): p.read_bytes()
                      for p in sorted(folder.rglob("*")) if p.is_file()} if folder else {}
        self.authorizations: list[str] = []
        self.downloaded: list[str] = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def _send(self, code: int, body: bytes, headers: dict[str, str]) -> None:
                self.send_response(code)
                for name, value in {**headers, "Content-Length": str(len(body))}.items():
                    self.send_header(name, value)
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def _refuse(self) -> None:
                self._send(401, json.dumps({"error": f"Access to model {hub.repo} is restricted."}).encode(), {
                    "X-Error-Code": "GatedRepo", "Content-Type": "application/json",
                    "X-Error-Message": f"Access to model {hub.repo} is restricted. You must have access to it "
                                       "and be authenticated to access it. Please log in."})

            def _answer(self) -> None:
                auth = self.headers.get("Authorization", "")
                hub.authorizations.append(auth)
                if not hub.token or auth != f"Bearer {hub.token}":
                    return self._refuse()
                path = unquote(urlsplit(self.path).path)
                api = f"/api/models/{hub.repo}"
                if path == api or path.startswith(api + "/revision/"):
                    info = {"id": hub.repo, "modelId": hub.repo, "sha": COMMIT, "private": False, "gated": "auto",
                            "siblings": [{"rfilename": name} for name in hub.files]}
                    return self._send(200, json.dumps(info).encode(), {"Content-Type": "application/json"})
                if path.startswith(api + "/tree/"):
                    tree = [hub.entry(name) for name in hub.files]
                    return self._send(200, json.dumps(tree).encode(), {"Content-Type": "application/json"})
                prefix = f"/{hub.repo}/resolve/"
                if path.startswith(prefix):
                    name = path[len(prefix):].split("/", 1)[1]
                    if name in hub.files:
                        data = hub.files[name]
                        if self.command == "GET":
                            hub.downloaded.append(name)
                        return self._send(200, data, {"X-Repo-Commit": COMMIT, "ETag": f'"{hub.etag(name)}"',
                                                      "Content-Type": "application/octet-stream"})
                self._send(404, b'{"error":"Entry not found"}', {"X-Error-Code": "EntryNotFound",
                                                                  "Content-Type": "application/json"})

            do_GET = do_HEAD = _answer  # noqa: N815

        self.server = ThreadingHTTPServer((host, 0), Handler)
        self.url = f"http://{host}:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def etag(self, name: str) -> str:
        data = self.files[name]
        if name.endswith(".safetensors"):
            return hashlib.sha256(data).hexdigest()  # LFS files: the Hub's ETag is the content's SHA-256
        return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()  # git's blob id

    def entry(self, name: str) -> dict[str, Any]:
        data = self.files[name]
        item: dict[str, Any] = {"type": "file", "path": name, "size": len(data),
                                "oid": hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()}
        if name.endswith(".safetensors"):
            item["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 130}
        return item

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)
