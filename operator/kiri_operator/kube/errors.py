"""What goes wrong talking to the API: a request the server (or the network) refused, credentials that
cannot be used."""

from __future__ import annotations


class KubeError(RuntimeError):
    """A request that failed: `status` is the HTTP status, 0 when no answer came (network, credentials)."""

    def __init__(self, status: int, verb: str, path: str, message: str) -> None:
        super().__init__(f"{verb} {path}: HTTP {status}: {message}")
        self.status = status
        self.message = message


class CredentialsError(ValueError):
    """A service account or kubeconfig Kiri cannot use; the message names the file and the context."""
