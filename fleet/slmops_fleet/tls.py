"""TLS for the fleet's listeners (HTTPS API, the embedded broker) and its clients of a broker.

Two sources of certificates:

- the operator's files (`--tls-cert`, `--tls-key`, `--tls-ca`): used as they are;
- a private CA made on the first start in `<data dir>/tls/` (`ca.pem`, `ca.key`, `server.pem`,
  `server.key`; keys 0600): ECDSA P-256, the CA for ten years, the server certificate for one. The
  server certificate names every address the fleet is reached at (its listen and public hosts,
  `--tls-host` extras, localhost, 127.0.0.1) and is issued again when that list changes or it nears
  its end. Devices get the CA at enrollment; copy `ca.pem` to them for the enrollment itself.

`TlsFiles.server_context()` serves, `client_context()` verifies a peer against a CA.
"""

from __future__ import annotations

import datetime
import ipaddress
import logging
import os
import secrets
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from slmops_fleet.errors import StartupError
from slmops_protos.links import certificate_fingerprint, is_loopback

if TYPE_CHECKING:
    from slmops_fleet.settings import FleetSettings

log = logging.getLogger(__name__)

CA_DAYS = 3650
SERVER_DAYS = 365
RENEW_BEFORE_DAYS = 30
WILDCARD_HOSTS = ("", "0.0.0.0", "::")


@dataclass(frozen=True)
class TlsFiles:
    """The server certificate chain, its key, and the CA that devices and clients verify it with."""

    cert: Path
    key: Path
    ca: Path

    @property
    def ca_pem(self) -> str:
        return self.ca.read_text()

    @property
    def fingerprint(self) -> str:
        return certificate_fingerprint(self.ca_pem)

    def server_context(self) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        try:
            ctx.load_cert_chain(self.cert, self.key)
        except (OSError, ssl.SSLError) as exc:
            raise StartupError(f"cannot load the TLS certificate {self.cert} with key {self.key}: {exc}") from None
        return ctx


def client_context(ca_file: Path | None = None, *, check_hostname: bool = True) -> ssl.SSLContext:
    """A client context verifying the peer against `ca_file` (the system's CAs when None)."""
    ctx = ssl.create_default_context()
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if ca_file is not None:
        try:
            ctx.load_verify_locations(cafile=str(ca_file))
        except (OSError, ssl.SSLError) as exc:
            raise StartupError(f"cannot read the CA certificate {ca_file}: {exc}") from None
    ctx.check_hostname = check_hostname
    return ctx


def operator_files(cert: Path, key: Path, ca: Path | None) -> TlsFiles:
    """The operator's certificate, key and CA (without a CA file, the certificate itself is the CA:
    a self-signed one, or a chain file whose last certificate is the root)."""
    for path in (cert, key, *([ca] if ca else [])):
        if not path.is_file():
            raise StartupError(f"TLS file not found: {path}")
    return TlsFiles(cert=cert, key=key, ca=ca or cert)


def ensure_private_ca(tls_dir: Path, hosts: list[str]) -> TlsFiles:
    """The private CA in `tls_dir` (made if missing) and a server certificate for `hosts` (issued
    again when the host list changed, it expires within 30 days, or another CA signed it)."""
    tls_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    files = TlsFiles(cert=tls_dir / "server.pem", key=tls_dir / "server.key", ca=tls_dir / "ca.pem")
    ca_key_path = tls_dir / "ca.key"
    try:
        if ca_key_path.is_file() and files.ca.is_file():
            ca_key = serialization.load_pem_private_key(ca_key_path.read_bytes(), password=None)
            ca_cert = x509.load_pem_x509_certificate(files.ca.read_bytes())
            if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
                raise ValueError("the CA key is not an EC key")
        else:
            ca_key, ca_cert = _new_ca()
            write_file(ca_key_path, _key_pem(ca_key), private=True)
            write_file(files.ca, ca_cert.public_bytes(serialization.Encoding.PEM), private=False)
    except (OSError, ValueError) as exc:
        raise StartupError(f"cannot read or create the fleet's private CA in {tls_dir}: {exc}") from None
    names = server_names(hosts)
    if not _server_cert_current(files, ca_cert, names):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = _issue(ca_key, ca_cert, key, names)
        write_file(files.key, _key_pem(key), private=True)
        write_file(files.cert, cert.public_bytes(serialization.Encoding.PEM), private=False)
    return files


def server_names(hosts: list[str]) -> list[str]:
    """The names a server certificate carries: `hosts` without wildcards, plus localhost and
    127.0.0.1, sorted and without repeats."""
    names = {h.strip("[]").lower() for h in hosts if h not in WILDCARD_HOSTS}
    names |= {"localhost", "127.0.0.1"}
    return sorted(names)


def _new_ca() -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "slmops fleet"),
            x509.NameAttribute(NameOID.COMMON_NAME, f"slmops fleet CA {secrets.token_hex(4)}"),
        ]
    )
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return key, cert


def _issue(
    ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate, key: ec.EllipticCurvePrivateKey, names: list[str]
) -> x509.Certificate:
    sans: list[x509.GeneralName] = []
    for n in names:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(n)))
        except ValueError:
            sans.append(x509.DNSName(n))
    now = datetime.datetime.now(datetime.timezone.utc)
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=SERVER_DAYS))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )


def _server_cert_current(files: TlsFiles, ca_cert: x509.Certificate, names: list[str]) -> bool:
    if not (files.cert.is_file() and files.key.is_file()):
        return False
    try:
        cert = x509.load_pem_x509_certificate(files.cert.read_bytes())
        cert.verify_directly_issued_by(ca_cert)
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (ValueError, TypeError, x509.ExtensionNotFound, InvalidSignature):
        return False
    have = sorted([str(ip) for ip in san.get_values_for_type(x509.IPAddress)] + san.get_values_for_type(x509.DNSName))
    left = cert.not_valid_after_utc - datetime.datetime.now(datetime.timezone.utc)
    return have == names and left > datetime.timedelta(days=RENEW_BEFORE_DAYS)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def write_file(path: Path, data: bytes, *, private: bool) -> None:
    """Write atomically (temporary file, fsync, rename); `private`: only the owner may read it."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o644)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def fleet_tls_files(settings: FleetSettings) -> TlsFiles | None:
    """The fleet's certificate files when TLS is on: the operator's, else the private CA's (made or
    reissued now); None when TLS is off."""
    if not settings.tls_enabled:
        return None
    if settings.tls_cert is not None and settings.tls_key is not None:
        return operator_files(settings.tls_cert, settings.tls_key, settings.tls_ca)
    hosts = [settings.http_host, *settings.tls_hosts]
    if settings.embedded_broker:
        hosts.append(settings.broker_host)
    if settings.public_broker_host:
        hosts.append(settings.public_broker_host)
    if settings.public_url:
        hosts.append(urlsplit(settings.public_url).hostname or "")
    if settings.exposed_hosts() and all(h in WILDCARD_HOSTS or is_loopback(h) for h in hosts):
        log.warning(
            "listening on every interface, the private CA's certificate names only localhost: devices "
            "must reach the fleet by a name or address given with --tls-host or --public-url"
        )
    return ensure_private_ca(settings.tls_dir, [h for h in hosts if h])
