"""What the fleet and the agent agree on about a network link: which hosts are loopback (plaintext is
allowed only there) and how a CA certificate is named by its fingerprint."""

from __future__ import annotations

import hashlib
import ipaddress
import ssl

FINGERPRINT_PREFIX = "sha256:"


def is_loopback(host: str) -> bool:
    """True for localhost and loopback addresses; a wildcard address (0.0.0.0, ::) is not loopback."""
    if host.lower() in ("localhost", "localhost."):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def certificate_fingerprint(pem: str) -> str:
    """`sha256:<hex>` of the DER bytes of the first certificate in `pem`; ValueError if there is none."""
    begin = pem.find("-----BEGIN CERTIFICATE-----")
    end = pem.find("-----END CERTIFICATE-----", begin)
    if begin < 0 or end < 0:
        raise ValueError("no PEM certificate found")
    der = ssl.PEM_cert_to_DER_cert(pem[begin : end + len("-----END CERTIFICATE-----")] + "\n")
    return FINGERPRINT_PREFIX + hashlib.sha256(der).hexdigest()
