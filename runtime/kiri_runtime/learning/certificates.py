"""TLS for a round's SuperLink: a private CA and the SuperLink's server certificate, as PEM.

The operator makes them once per ModelDeployment and keeps them in a Secret it owns (`<md>-flower-tls`):
`ca.crt` goes to every SuperNode (`--root-certificates`), `tls.crt`/`tls.key` to the SuperLink
(`--ssl-certfile/--ssl-keyfile/--ssl-ca-certfile`). The key never leaves the Secret and is never logged.
ECDSA P-256; the server certificate names the SuperLink's Service DNS names and any extra names or IPs.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

CA_FILE = "ca.crt"
CERT_FILE = "tls.crt"
KEY_FILE = "tls.key"
VALID_DAYS = 365


@dataclass(frozen=True)
class TlsFiles:
    ca_crt: bytes
    tls_crt: bytes
    tls_key: bytes = field(repr=False)

    def as_secret_data(self) -> dict[str, bytes]:
        return {CA_FILE: self.ca_crt, CERT_FILE: self.tls_crt, KEY_FILE: self.tls_key}


def make(names: Sequence[str], *, days: int = VALID_DAYS, now: datetime | None = None) -> TlsFiles:
    """A fresh CA and a server certificate for `names` (DNS names or IP addresses), signed by it."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    start = (now or datetime.now(UTC)) - timedelta(minutes=5)
    end = start + timedelta(days=days)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kiri flower CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    alt: list[x509.GeneralName] = []
    for name in names:
        try:
            alt.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            alt.append(x509.DNSName(name))
    cert = (
        x509.CertificateBuilder()
        .subject_name(
            # The names are in the SAN, which is what TLS checks; a CN holds at most 64 characters, and a
            # Service's DNS name in a long namespace is longer.
            x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kiri flower superlink")])
        )
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.SubjectAlternativeName(alt), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    return TlsFiles(
        ca_crt=ca.public_bytes(pem),
        tls_crt=cert.public_bytes(pem),
        tls_key=key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()),
    )
