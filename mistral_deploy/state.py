"""The state store: one folder per deployment under the data directory.

    <data_dir>/
      state.lock                     one lock for every read-modify-write (filelock, across processes)
      deployments/<name>/            0700
        deployment.json              the record (no secret in it), replaced atomically
        api_keys                     0600, one `ID KEY` line per key
        .changing.lock               held while `up`, `keys` or `ttl` change a running deployment
        ...                          backend files: logs, gateway config, TLS files, pid files

Several CLI processes at once: names are reserved under the lock (a half-made deployment is already
recorded, so `down` can clean it), and every write is a write to a temporary file plus os.replace.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Optional

from mistral_deploy.errors import DeploymentExists, DeploymentNotFound
from mistral_deploy.keys import write_private
from mistral_deploy.paths import data_dir

if TYPE_CHECKING:
    from mistral_deploy.recipe import Recipe

RECORD = "deployment.json"
API_KEYS = "api_keys"


@dataclass
class Deployment:
    """What we remember about one deployment. Never holds a secret: keys live in their own 0600 file."""

    name: str
    backend: str  # "local", "cloud" (a SkyPilot cluster) or "serve" (a SkyServe service)
    recipe: dict[str, Any]  # the validated recipe, as YAML data
    created_at: float = field(default_factory=time.time)
    phase: str = "creating"  # creating -> ready | failed; down removes the record
    endpoint: Optional[str] = None  # base URL clients use, e.g. https://1.2.3.4:8443/v1
    tls_ca: Optional[str] = None  # path of the CA/certificate file clients pin
    details: dict[str, Any] = field(default_factory=dict)  # backend-specific: pids, ports, cluster name

    def recipe_model(self) -> "Recipe":
        """The recorded recipe, validated again (it was valid when recorded)."""
        from mistral_deploy.recipe import Recipe

        return Recipe.model_validate(self.recipe)

    @property
    def served_model_name(self) -> str:
        """The recorded recipe's Recipe.served_model_name (its model.served_name, or its name), read from the
        record as it is, without importing and running the recipe's validation for one field."""
        return (self.recipe.get("model") or {}).get("served_name") or self.recipe["name"]

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "Deployment":
        known = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
        return cls(**known)


class StateStore:
    def __init__(self, root: Optional[Path] = None) -> None:
        self.root = root or data_dir()

    @property
    def deployments_dir(self) -> Path:
        return self.root / "deployments"

    def dir(self, name: str) -> Path:
        return self.deployments_dir / name

    @contextmanager
    def lock(self, timeout: float = 30.0) -> Iterator[None]:
        from filelock import FileLock

        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        with FileLock(str(self.root / "state.lock"), timeout=timeout):
            yield

    def reserve(self, deployment: Deployment) -> Path:
        """Record a new deployment under its name; DeploymentExists if the name is taken."""
        with self.lock():
            self.deployments_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            path = self.dir(deployment.name)
            try:
                path.mkdir(mode=0o700)
            except FileExistsError:
                raise DeploymentExists(
                    f"a deployment named {deployment.name!r} already exists",
                    hint=f"use --name to pick another, or `mistral-deploy down {deployment.name}` first",
                ) from None
            self._write_record(deployment)
        return path

    def save(self, deployment: Deployment) -> None:
        with self.lock():
            if not self.dir(deployment.name).is_dir():
                raise DeploymentNotFound(f"deployment {deployment.name!r} was removed meanwhile")
            self._write_record(deployment)

    def _write_record(self, deployment: Deployment) -> None:
        text = json.dumps(deployment.to_json(), indent=2, sort_keys=True)
        write_private(self.dir(deployment.name) / RECORD, text + "\n")

    def load(self, name: str) -> Deployment:
        path = self.dir(name) / RECORD
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            names = [d.name for d in self.list()]
            known = f"; known: {', '.join(names)}" if names else "; there are none (see `mistral-deploy up`)"
            raise DeploymentNotFound(f"no deployment named {name!r}{known}") from None
        except (OSError, ValueError) as exc:
            raise DeploymentNotFound(f"deployment {name!r}: unreadable record {path}: {exc}") from None
        return Deployment.from_json(data)

    def list(self) -> list[Deployment]:
        if not self.deployments_dir.is_dir():
            return []
        out = []
        for child in sorted(self.deployments_dir.iterdir()):
            record = child / RECORD
            if record.is_file():
                try:
                    out.append(Deployment.from_json(json.loads(record.read_text(encoding="utf-8"))))
                except (OSError, ValueError, TypeError):
                    continue
        return out

    def remove(self, name: str) -> None:
        with self.lock():
            shutil.rmtree(self.dir(name), ignore_errors=True)

    @contextmanager
    def changing(self, name: str, timeout: float = 1800.0) -> Iterator[None]:
        """Held while a deployment is changed (`up` converging, `keys`, `ttl`): one change at a time. Its
        own lock, not the store's: applying a change can take minutes."""
        from filelock import FileLock, Timeout

        path = self.dir(name)
        if not path.is_dir():
            self.load(name)  # DeploymentNotFound, naming the known ones
        try:
            with FileLock(str(path / ".changing.lock"), timeout=timeout):
                yield
        except Timeout:
            from mistral_deploy.errors import MistralDeployError

            raise MistralDeployError(f"{name} is being changed by another mistral-deploy command") from None

    # Secrets: files of their own, 0600, never in the record. One `ID KEY` line per key (a file of an
    # earlier version holds one key per line: ids key-1, key-2, ... by position).
    def write_keys(self, name: str, keys: dict[str, str]) -> Path:
        return write_private(self.dir(name) / API_KEYS, "".join(f"{i} {k}\n" for i, k in keys.items()))

    def read_keys(self, name: str) -> dict[str, str]:
        path = self.dir(name) / API_KEYS
        try:
            lines = [line.split() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        except FileNotFoundError:
            return {}
        return {(parts[0] if len(parts) > 1 else f"key-{n}"): parts[-1] for n, parts in enumerate(lines, 1)}

    def write_api_keys(self, name: str, keys: list[str]) -> Path:
        return self.write_keys(name, {f"key-{n}": key for n, key in enumerate(keys, 1)})

    def read_api_keys(self, name: str) -> list[str]:
        return list(self.read_keys(name).values())


def ensure_private_dir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(path, 0o700)
    return path
