"""SuperNode authentication keys: one EC key pair (NIST P-384) per site, in the forms Flower 1.42 reads.

The operator makes a site's pair once and keeps it in a Secret it owns (`<md>-supernode-key-<site>`), the way
it makes the TLS material (`certificates`): it creates the Secret and can never read it back. `supernode.key`
(OpenSSH private key, what `flower-supernode --auth-supernode-private-key` loads) goes to that site's SuperNode
only; `supernode.pub` (OpenSSH public key, what `flwr supernode register` takes) goes to the SuperLink, which
registers it under the site's name before it accepts any connection (`flower_processes`). The private key is
never logged and never leaves the Secret.

The SuperLink also writes which node id each site's key was registered as (`write_registered_sites`, the file
named by `$KIRI_SUPERNODE_SITES`, which its ServerApp processes inherit): a round admits a node only as the site
its key was registered for (`registered_sites`), so a site's SuperNode cannot say it is another site (and spend
that site's privacy budget, or take its place) by changing its `--node-config`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

PRIVATE_KEY_FILE = "supernode.key"
PUBLIC_KEY_FILE = "supernode.pub"
SITES_ENV = "KIRI_SUPERNODE_SITES"


class NodeKeyError(ValueError):
    """A public key file Flower would not accept: not an OpenSSH EC public key on a NIST curve."""


@dataclass(frozen=True)
class NodeKeys:
    public_key: bytes
    """OpenSSH public key line (`ecdsa-sha2-nistp384 AAAA...`)."""
    private_key: bytes = field(repr=False)
    """OpenSSH private key (PEM-armoured), unencrypted: the SuperNode reads it with no passphrase."""

    def as_secret_data(self) -> dict[str, bytes]:
        return {PRIVATE_KEY_FILE: self.private_key, PUBLIC_KEY_FILE: self.public_key}


def make() -> NodeKeys:
    """A fresh P-384 key pair (the curve Flower's documentation uses for SuperNode authentication)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP384R1())
    return NodeKeys(
        public_key=key.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
        )
        + b"\n",
        private_key=key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
        ),
    )


def registration_bytes(public_key: bytes) -> bytes:
    """The bytes the SuperLink registers and a SuperNode presents for this OpenSSH public key: PEM
    SubjectPublicKeyInfo, as `flwr supernode register` sends it (Flower compares the bytes exactly)."""
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    try:
        key = serialization.load_ssh_public_key(public_key.strip())
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise NodeKeyError(f"not an OpenSSH public key: {exc}") from None
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise NodeKeyError(f"not an EC public key ({type(key).__name__})")
    nist = (ec.SECP256R1, ec.SECP384R1, ec.SECP521R1)
    if not isinstance(key.curve, nist):
        raise NodeKeyError(f"curve {key.curve.name} is not a NIST curve Flower accepts")
    return key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def write_registered_sites(path: Path, node_sites: Mapping[int, str]) -> None:
    """node id -> site, for the ServerApp (JSON, the ids as strings)."""
    path.write_text(
        json.dumps({str(node): site for node, site in sorted(node_sites.items())}, sort_keys=True)
    )


def registered_sites() -> dict[int, str] | None:
    """node id -> the site its key was registered as, or None when the SuperLink registers no keys (then a
    node's site is what it says). A file that is named but cannot be read is an error, never "anyone"."""
    name = os.environ.get(SITES_ENV, "")
    if not name:
        return None
    try:
        data = json.loads(Path(name).read_text())
        return {int(node): str(site) for node, site in data.items()}
    except (OSError, ValueError, AttributeError) as exc:
        raise NodeKeyError(f"${SITES_ENV}={name}: the registered sites cannot be read: {exc}") from None
