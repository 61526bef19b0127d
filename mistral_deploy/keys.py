"""Secrets we generate: API keys (cryptographic RNG) and TLS certificates (a per-deployment CA)."""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mistral_deploy.recipe import Recipe

API_KEY_PREFIX = "md-"


def generate_api_key() -> str:
    """A URL-safe key with 256 bits from the OS's CSPRNG."""
    return API_KEY_PREFIX + secrets.token_urlsafe(32)


def hf_token_secret(recipe: "Recipe") -> dict[str, str]:
    """{HF_TOKEN: token} from the user's environment for a gated model, {} otherwise; reported before
    anything is created when it is missing. The token travels as a secret, never as an argument."""
    from mistral_deploy.render import HF_TOKEN_SECRET

    if not recipe.model.needs_hf_token:
        return {}
    token = os.environ.get(HF_TOKEN_SECRET, "").strip()
    if not token:
        from mistral_deploy.errors import MistralDeployError

        raise MistralDeployError(
            f"{recipe.model.id} is gated on the Hugging Face Hub (model.hf_token: true) and HF_TOKEN is not set",
            hint="export HF_TOKEN=hf_... (a token with access to the model); it is passed on as a secret "
                 "(a SkyPilot secret on clouds, the engine's environment locally)",
        )
    return {HF_TOKEN_SECRET: token}


def write_private(path: Path, data: str | bytes) -> Path:
    """Write a file readable by its owner only: created 0600, never world-readable even for an instant."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    payload = data.encode() if isinstance(data, str) else data
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(payload)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


@dataclass(frozen=True)
class TlsFiles:
    ca_cert: Path  # what clients pin (public)
    cert: Path  # the gateway's certificate chain (public)
    key: Path  # the gateway's private key (0600)


def generate_tls(directory: Path, hosts: list[str], *, common_name: str = "mistral-deploy") -> TlsFiles:
    """A throw-away CA and a server certificate for `hosts` (IPs or names) signed by it.

    The CA's private key is never written: nothing else will ever be signed with it. Its name constraints
    permit `hosts` alone besides, so that even a leaked CA key could not vouch for another name.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = dt.datetime.now(dt.timezone.utc)
    names: list[x509.GeneralName] = []
    permitted: list[x509.GeneralName] = []
    for host in hosts:
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            names.append(x509.DNSName(host))
            permitted.append(x509.DNSName(host))
        else:
            names.append(x509.IPAddress(address))
            permitted.append(x509.IPAddress(ipaddress.ip_network(f"{address}/{address.max_prefixlen}")))
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{common_name} CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=825))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.NameConstraints(permitted_subtrees=permitted, excluded_subtrees=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False, data_encipherment=False,
                                     key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=825))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    ca_path = directory / "ca.pem"
    cert_path = directory / "cert.pem"
    ca_path.write_bytes(ca_cert.public_bytes(pem))
    cert_path.write_bytes(cert.public_bytes(pem))
    key_path = write_private(
        directory / "key.pem",
        key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()),
    )
    return TlsFiles(ca_cert=ca_path, cert=cert_path, key=key_path)
