"""Where the workflow `init --ci github` writes installs mistral-deploy from: a pinned source, never a bare name.

mistral-deploy is not published on PyPI, so `pip install mistral-deploy==X` there would install whatever
anyone published under that name, in a job that holds cloud credentials. The install line is written from
where this copy came, as pip recorded it in the distribution's `direct_url.json` (PEP 610):

- a VCS install at a commit: `mistral-deploy @ git+https://HOST/REPO@<commit>` (git over https only: a
  runner has no SSH key);
- an archive URL with its sha256: `mistral-deploy @ https://...#sha256=<hex>` (pip checks the hash);
- a local folder (`pip install -e .` included): inside the repository the workflow is written into, that
  path there (`.`), which the job's checkout holds at the commit it runs; otherwise, if the folder is a git
  checkout with no uncommitted or untracked changes, whose HEAD is on a branch of `origin` as this clone last
  fetched it, and whose `origin` is an https URL: `git+<origin>@<HEAD>`. Anything else is refused;
- installed from a package index (no `direct_url.json`): refused.

`--install-from SPEC` names the source instead; it must be pinned in one of the two URL forms above.
Refusals are RecipeError (exit 3), one line, naming the flag and how to fix it. A URL's user and password
(a token in a remote's URL) are dropped, never written or printed.
"""

from __future__ import annotations

import json
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional
from urllib.parse import unquote, urlsplit, urlunsplit

from mistral_deploy.errors import RecipeError

if TYPE_CHECKING:
    from importlib.metadata import Distribution

DISTRIBUTION = "mistral-deploy"
FLAG = "--install-from"
_COMMIT = re.compile(r"^[0-9a-f]{40}$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_NAME = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*@\s*(\S+)\s*$")  # PEP 508 `name @ url`
_FORMS = "git+https://HOST/OWNER/REPO@<40-hex commit>, or an archive URL ending #sha256=<64 hex>"
_HOW = f"pass {FLAG} with a pinned source: {_FORMS}"
_GIT_TIMEOUT = 10.0


@dataclass(frozen=True)
class InstallSource:
    """What the workflow's `pip install` gets (one argument), and where it comes from, in words."""

    requirement: str
    origin: str


# --- the boundary ------------------------------------------------------------------------------------------


def own_distribution() -> Optional["Distribution"]:
    """The installed mistral-deploy distribution this process runs from (None if it has no metadata)."""
    from importlib import metadata

    try:
        return metadata.distribution(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        return None


# --- the choice --------------------------------------------------------------------------------------------


def resolve(explicit: Optional[str], workflow: Path) -> InstallSource:
    """The pinned source the workflow written to `workflow` installs mistral-deploy from."""
    try:
        if explicit is not None:
            return InstallSource(pinned_spec(explicit), f"the source given with {FLAG}")
        dist = own_distribution()
        text = dist.read_text("direct_url.json") if dist is not None else None
        return from_direct_url(text, workflow)
    except ValueError:  # urllib on a malformed URL (a bad port, an unclosed IPv6 bracket)
        where = "the URL given" if explicit is not None else "the URL pip recorded for this mistral-deploy"
        raise RecipeError(f"{FLAG}: {where} cannot be parsed; {_FORMS}") from None


def pinned_spec(spec: str) -> str:
    """`spec` as a pip argument if it is pinned (a git URL at a full commit, an archive URL with its sha256)."""
    text = spec.strip()
    if not text:
        raise RecipeError(f"{FLAG}: must not be empty; {_FORMS}")
    named = _NAME.match(text)
    if named:
        if _normalize(named.group(1)) != DISTRIBUTION:
            raise RecipeError(f"{FLAG}: names {named.group(1)!r}, not {DISTRIBUTION}")
        text = named.group(2)
    if any(c.isspace() for c in text):
        raise RecipeError(f"{FLAG}: one requirement, without spaces; {_FORMS}")
    shown = _redact(text)
    parts = urlsplit(text)
    scheme = parts.scheme.lower()
    if scheme and (not parts.hostname or parts.port == 0):  # `.port` raises ValueError for a bad port
        raise RecipeError(f"{FLAG}: {shown} has no host; {_FORMS}")
    if parts.password is not None or (parts.username is not None and scheme != "git+ssh"):
        raise RecipeError(f"{FLAG}: {shown} carries a user or token: the workflow is committed to the "
                          "repository; give a URL without one")
    if scheme.startswith("git+"):
        if scheme not in ("git+https", "git+ssh"):
            raise RecipeError(f"{FLAG}: {shown}: a runner can fetch git over https (or ssh with a key); "
                              f"not {scheme}")
        head, _, ref = parts.path.rpartition("@")
        if not head or "/" in ref or not _COMMIT.match(ref):
            raise RecipeError(f"{FLAG}: {shown} is not pinned: end the URL with @<the full 40-hex commit id>, "
                              "not a branch or tag (they move)")
        return f"{DISTRIBUTION} @ {text}"
    if scheme in ("https", "http"):
        digest = _fragment(parts.fragment).get("sha256", "")
        if not _SHA256.match(digest.lower()):
            raise RecipeError(f"{FLAG}: {shown} is not pinned: add #sha256=<the archive's 64-hex sha256> "
                              "(pip checks it)")
        return f"{DISTRIBUTION} @ {text}"
    raise RecipeError(f"{FLAG}: {shown!r} is not a pinned source: give {_FORMS} (mistral-deploy is not "
                      "published on PyPI: a name there may be anyone's)")


def from_direct_url(text: Optional[str], workflow: Path) -> InstallSource:
    """The pinned source for an installation pip recorded with this direct_url.json (None: from an index)."""
    if text is None:
        raise RecipeError(f"{FLAG}: this mistral-deploy was installed from a package index, and mistral-deploy "
                          f"is not published on PyPI (the name there may be anyone's); {_HOW}")
    try:
        data = json.loads(text)
        url = str(data["url"])
    except (ValueError, KeyError, TypeError):
        raise RecipeError(f"{FLAG}: pip's record of where this mistral-deploy came from (direct_url.json) "
                          f"cannot be read; {_HOW}") from None
    if not isinstance(data, dict):
        raise RecipeError(f"{FLAG}: direct_url.json is not an object; {_HOW}")
    subdirectory = data.get("subdirectory")
    if isinstance(data.get("vcs_info"), dict):
        return _from_vcs(url, data["vcs_info"], subdirectory)
    if isinstance(data.get("archive_info"), dict):
        return _from_archive(url, data["archive_info"])
    if isinstance(data.get("dir_info"), dict):
        folder = _local_path(url)
        if folder is None:
            raise RecipeError(f"{FLAG}: this mistral-deploy was installed from a folder pip names by a URL that "
                              f"is not a local path ({_redact(url)}); {_HOW}")
        if subdirectory:
            folder = folder / str(subdirectory)
        return _from_folder(folder, workflow)
    raise RecipeError(f"{FLAG}: direct_url.json says neither a VCS, an archive nor a folder; {_HOW}")


def _from_vcs(url: str, vcs: dict[str, Any], subdirectory: Any) -> InstallSource:
    shown = _redact(url)
    if vcs.get("vcs") != "git":
        raise RecipeError(f"{FLAG}: this mistral-deploy was installed from {vcs.get('vcs')} ({shown}); "
                          f"the workflow installs from git only; {_HOW}")
    commit = str(vcs.get("commit_id", "")).lower()
    if not _COMMIT.match(commit):
        raise RecipeError(f"{FLAG}: pip recorded no full commit for this mistral-deploy ({shown}); {_HOW}")
    clean = _https_url(url)
    if clean is None:
        raise RecipeError(f"{FLAG}: this mistral-deploy was installed from git at {shown}, which a CI runner "
                          f"cannot fetch (not https); {_HOW}")
    requirement = f"git+{clean}@{commit}"
    if subdirectory:
        requirement += f"#subdirectory={subdirectory}"
    return InstallSource(f"{DISTRIBUTION} @ {requirement}", f"git, at commit {commit} (where this copy came from)")


def _from_archive(url: str, archive: dict[str, Any]) -> InstallSource:
    parts = urlsplit(url)
    shown = _redact(url)
    if parts.scheme.lower() not in ("https", "http"):
        raise RecipeError(f"{FLAG}: this mistral-deploy was installed from an archive on this machine ({shown}), "
                          f"which a CI runner cannot reach; {_HOW}")
    hashes = archive.get("hashes") if isinstance(archive.get("hashes"), dict) else {}
    digest = str(hashes.get("sha256", "")).lower()
    legacy = str(archive.get("hash", ""))
    if not digest and legacy.startswith("sha256="):
        digest = legacy.split("=", 1)[1].lower()
    if not _SHA256.match(digest):
        raise RecipeError(f"{FLAG}: pip recorded no sha256 for the archive this mistral-deploy came from "
                          f"({shown}); {_HOW}")
    base = urlunsplit((parts.scheme, _host(parts), parts.path, parts.query, ""))
    return InstallSource(f"{DISTRIBUTION} @ {base}#sha256={digest}",
                         "the archive this copy came from, checked against its sha256")


def _from_folder(folder: Path, workflow: Path) -> InstallSource:
    where = str(folder)
    top = _git_toplevel(folder)
    workflow_top = _git_toplevel(_existing_ancestor(workflow.absolute().parent))
    if top is not None and workflow_top is not None and top == workflow_top:
        # the repository the workflow lives in: its checkout on the runner holds this folder, at that commit
        relative = folder.resolve().relative_to(top).as_posix()
        if not (_git(top, "ls-files", "--", relative) or "").strip():
            raise RecipeError(f"{FLAG}: this mistral-deploy is installed from {folder}, which is not committed to "
                              f"the repository the workflow is written into: commit it, or {_HOW}")
        requirement = "." if relative == "." else f"./{relative}"
        return InstallSource(requirement, "this repository's own copy, as the job checks it out")
    if top is None:
        raise RecipeError(f"{FLAG}: this mistral-deploy is installed from the folder {where}, which is not a git "
                          f"checkout a CI runner could fetch; {_HOW}")
    status = _git(top, "status", "--porcelain")
    if status is None or status.strip():
        raise RecipeError(f"{FLAG}: this mistral-deploy is installed from {top}, which has uncommitted or "
                          f"untracked changes: commit and push them, or {_HOW}")
    commit = (_git(top, "rev-parse", "--verify", "HEAD^{commit}") or "").strip().lower()
    if not _COMMIT.match(commit):
        raise RecipeError(f"{FLAG}: {top} has no commit to pin; {_HOW}")
    remote = (_git(top, "remote", "get-url", "origin") or "").strip()
    if not remote:
        raise RecipeError(f"{FLAG}: {top} has no remote 'origin' a CI runner could fetch from; {_HOW}")
    clean = _https_url(remote)
    if clean is None:
        raise RecipeError(f"{FLAG}: origin of {top} is {_redact(remote)}, not an https URL a CI runner can fetch "
                          f"without a key; {_HOW}")
    pushed = _git(top, "branch", "--remotes", "--contains", commit) or ""
    if not any(line.strip().startswith("origin/") for line in pushed.splitlines()):
        raise RecipeError(f"{FLAG}: commit {commit[:12]} of {top} is on no branch of origin known here: "
                          f"push it (and fetch), or {_HOW}")
    return InstallSource(f"{DISTRIBUTION} @ git+{clean}@{commit}",
                         f"git, at commit {commit} (the commit of the checkout this copy is installed from)")


# --- helpers -----------------------------------------------------------------------------------------------


def _git(folder: Path, *args: str) -> Optional[str]:
    """`git -C folder ARGS` stdout; None where git is missing or fails. Local only: nothing is fetched."""
    import os

    env = {**os.environ, "GIT_TERMINAL_PROMPT": "0", "GIT_OPTIONAL_LOCKS": "0", "LC_ALL": "C"}
    try:
        done = subprocess.run(["git", "-C", str(folder), *args], capture_output=True, text=True,
                              timeout=_GIT_TIMEOUT, env=env, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout if done.returncode == 0 else None


def _git_toplevel(folder: Path) -> Optional[Path]:
    if not folder.is_dir():
        return None
    out = _git(folder, "rev-parse", "--show-toplevel")
    return Path(out.strip()).resolve() if out and out.strip() else None


def _existing_ancestor(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _local_path(url: str) -> Optional[Path]:
    parts = urlsplit(url)
    if parts.scheme.lower() != "file" or parts.netloc not in ("", "localhost"):
        return None
    return Path(unquote(parts.path))


def _https_url(url: str) -> Optional[str]:
    """The URL without user or password, if it is https; None otherwise."""
    parts = urlsplit(url)
    if parts.scheme.lower() != "https" or not parts.hostname:
        return None
    return urlunsplit(("https", _host(parts), parts.path, parts.query, ""))


def _host(parts: Any) -> str:
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    return host + (f":{parts.port}" if parts.port else "")


def _redact(url: str) -> str:
    """A URL fit to print: its user and password (a token) dropped."""
    try:
        parts = urlsplit(url)
        if parts.username is None and parts.password is None:
            return url
        return urlunsplit((parts.scheme, _host(parts), parts.path, parts.query, parts.fragment))
    except ValueError:
        return "(a URL that cannot be parsed)"


def _fragment(fragment: str) -> dict[str, str]:
    pairs = (item.split("=", 1) for item in fragment.split("&") if "=" in item)
    return {key.lower(): value for key, value in pairs}


def _normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()
