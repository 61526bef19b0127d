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

import contextlib
import fnmatch
import json
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

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
    """The files of a repository that a cache holds: configs and tokenizer (in subfolders too, such as a
    sentence-transformers model's 1_Pooling/config.json), and the Hub-layout weights (top level)."""
    return sorted(n for n in names
                  if any(fnmatch.fnmatch(n.rsplit("/", 1)[-1], p) for p in CONFIG_PATTERNS)
                  or ("/" not in n and any(fnmatch.fnmatch(n, p) for p in WEIGHTS_PATTERNS)))


def fetch_from_hub(repo: str, revision: Optional[str], folder: Path, say: Callable[[str], None]) -> str:
    """Download what a cache holds of `repo` at `revision` (None: the default branch) into `folder`; the
    exact commit it resolved to (and downloaded: by that commit). The token, if any, comes from HF_TOKEN;
    HF_ENDPOINT is honoured."""
    from huggingface_hub import HfApi, snapshot_download

    token = os.environ.get("HF_TOKEN") or None
    where = f"model.id: {repo}{'@' + revision if revision else ''}"
    with _hub_errors(where):
        info = HfApi(token=token).model_info(repo, revision=revision, files_metadata=False)
    names = wanted([s.rfilename for s in info.siblings or []])
    if not any(fnmatch.fnmatch(n, p) for n in names for p in WEIGHTS_PATTERNS):
        raise CloudError(f"model.id: {repo} has no weights in the Hub's layout (model*.safetensors with "
                         "config.json) for the engine to stream")
    commit = str(info.sha)
    say(f"downloading {repo} at {commit} ({len(names)} files)")
    with _hub_errors(where):
        snapshot_download(repo, revision=commit, allow_patterns=names, local_dir=str(folder), token=token)
    return commit


@contextlib.contextmanager
def _hub_errors(where: str) -> Iterator[None]:
    """The Hub's refusals and network failures as one line (exit 9)."""
    from huggingface_hub.utils import HfHubHTTPError

    try:
        yield
    except HfHubHTTPError as exc:
        status = getattr(getattr(exc, "response", None), "status_code", None)
        why = {401: "the Hub refused the token (or none was given: export HF_TOKEN for a gated model)",
               403: "the token has no access to this repository", 404: "no such repository or revision"}
        raise CloudError(f"{where}: {why.get(status or 0, f'the Hub answered {status}')}") from None
    except Exception as exc:
        # the network (httpx's or requests' errors, an OSError) or the Hub library's own: one line
        library = type(exc).__module__.split(".")[0]
        if isinstance(exc, OSError) or library in ("httpx", "httpcore", "requests", "urllib3", "huggingface_hub"):
            raise CloudError(f"{where}: the download failed: {type(exc).__name__}: {_one_line(exc)}") from None
        raise


def _one_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]


def _s3() -> Any:
    import boto3

    return boto3.client("s3")  # the AWS credential chain; AWS_ENDPOINT_URL for S3-compatible stores


@contextlib.contextmanager
def _store_errors(what: str) -> Iterator[None]:
    """boto3's failures (refusals, missing credentials, the endpoint unreachable, a failed transfer) as
    one line naming what was asked (exit 9)."""
    from boto3.exceptions import Boto3Error
    from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

    try:
        yield
    except NoCredentialsError:
        raise CloudError(f"{what}: no AWS credentials found (environment, profile, SSO or instance role); "
                         "`aws configure` or export AWS_PROFILE") from None
    except ClientError as exc:
        error = exc.response.get("Error", {})
        raise CloudError(f"{what}: {error.get('Code')}: {error.get('Message', '')}".rstrip(": ")) from None
    except (BotoCoreError, Boto3Error) as exc:  # S3UploadFailedError wraps the ClientError of a transfer
        raise CloudError(f"{what}: {_one_line(exc)}") from None


def upload(folder: Path, url: str, cached: Cached, say: Callable[[str], None]) -> None:
    """Upload the folder's files to the bucket, then the manifest. A prefix filled before is emptied of
    its manifest first (a cache without one is incomplete) and of what the new commit does not have."""
    _scheme, bucket, prefix = split_url(url)
    s3 = _s3()
    files = [p for p in sorted(folder.rglob("*"))
             if p.is_file() and ".cache" not in p.relative_to(folder).parts
             and p.relative_to(folder).as_posix() in wanted([p.relative_to(folder).as_posix()])]
    names = {p.relative_to(folder).as_posix() for p in files}
    with _store_errors(f"--to: {url}"):
        s3.delete_object(Bucket=bucket, Key=_key(prefix, MANIFEST))
        listed = s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=_key(prefix, ""))
        stale = [o["Key"] for page in listed for o in page.get("Contents", [])
                 if o["Key"].removeprefix(_key(prefix, "")) not in names]
        for key in stale:
            say(f"removing {key} (not in {cached.repo} at {cached.commit or 'this build'})")
            s3.delete_object(Bucket=bucket, Key=key)
        for path in files:
            name = path.relative_to(folder).as_posix()
            say(f"uploading {name} ({path.stat().st_size / 1e6:.1f} MB)")
            s3.upload_file(str(path), bucket, _key(prefix, name))
            cached.files[name] = path.stat().st_size
        s3.put_object(Bucket=bucket, Key=_key(prefix, MANIFEST),
                      Body=(json.dumps(cached.manifest(), indent=2, sort_keys=True) + "\n").encode(),
                      ContentType="application/json")


def read_manifest(url: str) -> Optional[dict[str, Any]]:
    """The bucket's manifest, or None where there is none (or the source is not s3://); CloudError where
    it cannot be read."""
    from botocore.exceptions import ClientError

    scheme, bucket, prefix = split_url(url)
    if scheme != "s3":
        return None
    with _store_errors(f"model.source: {url}: cannot read its {MANIFEST}"):
        try:
            body = _s3().get_object(Bucket=bucket, Key=_key(prefix, MANIFEST))["Body"].read()
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                return None
            raise
    try:
        data = json.loads(body)
    except ValueError:
        raise CloudError(f"model.source: {url}: its {MANIFEST} is not JSON") from None
    return data if isinstance(data, dict) else None


def source_commit(recipe: Any, recorded: Optional[str], say: Callable[[str], None]) -> Optional[str]:
    """The commit a recipe's bucket source holds (its manifest), checked against what the recipe asks
    (`model.revision`) and what the deployment served so far (`recorded`); None where it cannot be told."""
    source = recipe.model.source
    try:
        manifest = read_manifest(source)
    except CloudError as exc:  # the VM may read what this machine may not: said, not fatal
        say(f"{exc.message}; the commit it holds is not checked or recorded")
        return None
    if manifest is None:
        why = "not filled by `mistral-deploy cache`" if source.startswith("s3://") else "checked on s3:// only"
        say(f"model.source: {source}: no {MANIFEST} read ({why}): the commit it holds is not checked or recorded")
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
