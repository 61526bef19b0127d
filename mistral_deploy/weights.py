"""Weights in a bucket: `mistral-deploy cache` fills one from the Hugging Face Hub (or builds a built-in
model into it), and a recipe's `model.source` makes the engine stream from it (vLLM's Run:ai model
streamer) with no Hub token on the VM.

A cache holds what the engine streams, in the Hub's (Transformers) layout: config.json, the tokenizer's
files and model*.safetensors, never a second weights format (Mistral's consolidated*.safetensors) the
streamer would load as well. Its manifest, `mistral-deploy.json`, is written last (a cache without one is
incomplete) and says which repository and exact commit it holds: `up` reads it, records the commit, and
refuses to serve another commit from the same bucket unless the recipe asks for it (`model.revision`).

Uploads go through boto3 to s3:// (and S3-compatible stores through AWS_ENDPOINT_URL); gs:// and az://
sources are streamed by the engine but filled with the cloud's own tools. Nothing here is imported by
`--help`, `render` or `validate`.
"""

from __future__ import annotations

import fnmatch
import json
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from mistral_deploy.errors import CloudError, RecipeError

MANIFEST = "mistral-deploy.json"
# What the engine reads besides the weights (the same as templates/download_model.py fetches).
CONFIG_PATTERNS = ("*.json", "*.model", "*.model.v*", "*.txt", "*.tiktoken", "*.jinja")
# The Hub's (Transformers) layout of the weights: one file, or shards with their index (a *.json).
WEIGHTS_PATTERNS = ("model.safetensors", "model-*-of-*.safetensors")
UPLOAD_SCHEMES = ("s3",)


@dataclass
class Cached:
    source: str  # s3://bucket/prefix
    repo: str
    commit: Optional[str]  # the Hub commit; None for a built-in model (built here)
    files: dict[str, int] = field(default_factory=dict)  # name -> bytes

    @property
    def total_bytes(self) -> int:
        return sum(self.files.values())

    def manifest(self) -> dict[str, Any]:
        return {"repo": self.repo, "commit": self.commit, "files": self.files,
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def split_url(url: str) -> tuple[str, str, str]:
    """s3://bucket/a/b -> ("s3", "bucket", "a/b")."""
    scheme, _, rest = url.partition("://")
    bucket, _, prefix = rest.partition("/")
    return scheme, bucket, prefix.strip("/")


def _key(prefix: str, name: str) -> str:
    return f"{prefix}/{name}" if prefix else name


def wanted(names: list[str]) -> list[str]:
    """The files of a repository that a cache holds: configs and tokenizer, and the Hub-layout weights."""
    return sorted(n for n in names if "/" not in n
                  and any(fnmatch.fnmatch(n, p) for p in CONFIG_PATTERNS + WEIGHTS_PATTERNS))


def fetch_from_hub(repo: str, revision: Optional[str], folder: Path, say: Callable[[str], None]) -> str:
    """Download what a cache holds of `repo` at `revision` (None: the default branch) into `folder`; the
    exact commit it resolved to. The token, if any, comes from HF_TOKEN; HF_ENDPOINT is honoured."""
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.utils import HfHubHTTPError

    token = os.environ.get("HF_TOKEN") or None
    try:
        info = HfApi(token=token).model_info(repo, revision=revision, files_metadata=False)
    except HfHubHTTPError as exc:
        status = getattr(getattr(exc, "response", None), "status_code", None)
        why = {401: "the Hub refused the token (or none was given: export HF_TOKEN for a gated model)",
               403: "the token has no access to this repository", 404: "no such repository or revision"}
        raise CloudError(f"model.id: {repo}{'@' + revision if revision else ''}: "
                         f"{why.get(status or 0, f'the Hub answered {status}')}") from None
    names = wanted([s.rfilename for s in info.siblings or []])
    if not any(fnmatch.fnmatch(n, p) for n in names for p in WEIGHTS_PATTERNS):
        raise CloudError(f"model.id: {repo} has no weights in the Hub's layout (model*.safetensors with "
                         "config.json) for the engine to stream")
    commit = str(info.sha)
    say(f"downloading {repo} at {commit} ({len(names)} files)")
    snapshot_download(repo, revision=commit, allow_patterns=names, local_dir=str(folder), token=token)
    return commit


def _s3():
    import boto3

    return boto3.client("s3")  # the AWS credential chain; AWS_ENDPOINT_URL for S3-compatible stores


def upload(folder: Path, url: str, cached: Cached, say: Callable[[str], None]) -> None:
    """Upload the folder's files to the bucket, then the manifest (last: a cache without one is incomplete)."""
    from botocore.exceptions import BotoCoreError, ClientError

    _scheme, bucket, prefix = split_url(url)
    s3 = _s3()
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.name in wanted([p.name]))
    try:
        for path in files:
            say(f"uploading {path.name} ({path.stat().st_size / 1e6:.1f} MB)")
            s3.upload_file(str(path), bucket, _key(prefix, path.name))
            cached.files[path.name] = path.stat().st_size
        s3.put_object(Bucket=bucket, Key=_key(prefix, MANIFEST),
                      Body=(json.dumps(cached.manifest(), indent=2, sort_keys=True) + "\n").encode(),
                      ContentType="application/json")
    except (ClientError, BotoCoreError) as exc:
        raise CloudError(f"--to: {url}: the upload failed: {_boto_reason(exc)}") from None


def read_manifest(url: str) -> Optional[dict[str, Any]]:
    """The bucket's manifest, or None where there is none; CloudError where it cannot be read."""
    from botocore.exceptions import BotoCoreError, ClientError

    scheme, bucket, prefix = split_url(url)
    if scheme != "s3":
        return None
    try:
        body = _s3().get_object(Bucket=bucket, Key=_key(prefix, MANIFEST))["Body"].read()
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
            return None
        raise CloudError(f"model.source: {url}: cannot read its {MANIFEST}: {_boto_reason(exc)}") from None
    except BotoCoreError as exc:
        raise CloudError(f"model.source: {url}: cannot read its {MANIFEST}: {_boto_reason(exc)}") from None
    try:
        data = json.loads(body)
    except ValueError:
        raise CloudError(f"model.source: {url}: its {MANIFEST} is not JSON") from None
    return data if isinstance(data, dict) else None


def _boto_reason(exc: Exception) -> str:
    error = getattr(exc, "response", {}).get("Error", {}) if hasattr(exc, "response") else {}
    if error:
        return f"{error.get('Code')}: {error.get('Message', '')}".strip().rstrip(":")
    return str(exc).splitlines()[0]


def source_commit(recipe: Any, recorded: Optional[str], say: Callable[[str], None]) -> Optional[str]:
    """The commit a recipe's bucket source holds (its manifest), checked against what the recipe asks
    (`model.revision`) and what the deployment served so far (`recorded`); None where it cannot be told."""
    source = recipe.model.source
    manifest = read_manifest(source)
    if manifest is None:
        say(f"model.source: {source} has no {MANIFEST} (not filled by `mistral-deploy cache`): the commit it "
            "holds cannot be checked or recorded")
        return None
    commit = manifest.get("commit")
    asked = recipe.model.revision
    if asked and commit and asked != commit:
        raise RecipeError(f"model.revision: {asked} is not what {source} holds ({manifest.get('repo')} at {commit})",
                          hint=f"`mistral-deploy cache {recipe.name} --revision {asked} --to {source}`, "
                               f"or model.revision: {commit}")
    if recorded and commit and commit != recorded and asked != commit:
        raise RecipeError(
            f"model.source: {source} now holds {commit}, and this deployment serves {recorded}",
            hint=f"to move to it, set model.revision: {commit}; to keep serving {recorded}, cache it again "
                 f"(`mistral-deploy cache --revision {recorded}`) or point model.source at the bucket that holds it")
    return commit


def cache(recipe: Any, url: str, *, revision: Optional[str], say: Callable[[str], None]) -> Cached:
    """Fill the bucket at `url` with the recipe's model; what it now holds."""
    from mistral_deploy import engine

    url = url.rstrip("/")
    scheme = split_url(url)[0]
    if scheme not in UPLOAD_SCHEMES:
        raise RecipeError(f"--to: {url}: `cache` uploads to s3:// (and S3-compatible stores through "
                          f"AWS_ENDPOINT_URL); fill a {scheme}:// bucket with the cloud's own tools (the layout: "
                          f"{', '.join(WEIGHTS_PATTERNS)} and the configs, plus {MANIFEST})")
    builtin = recipe.model.id.removeprefix("builtin:") if recipe.model.id.startswith("builtin:") else None
    with tempfile.TemporaryDirectory(prefix="md-cache-") as tmp:
        if builtin:
            folder = engine.ensure_builtin_model(builtin, engine.engine_python(), say=say)
            cached = Cached(url, recipe.model.id, None)
        elif Path(recipe.model.id).expanduser().is_dir():
            raise RecipeError(f"model.id: {recipe.model.id} is a local folder; `cache` fetches from the Hub")
        else:
            folder = Path(tmp)
            commit = fetch_from_hub(recipe.model.id, revision or recipe.model.revision, folder, say)
            cached = Cached(url, recipe.model.id, commit)
        upload(folder, url, cached, say)
    return cached
