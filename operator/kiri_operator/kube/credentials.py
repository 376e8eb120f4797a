"""Credentials for one API server and one user: a token (re-read from its file), a client certificate, basic
auth, or an exec credential plugin run again when its credential expires; and the TLS context they make.

Where they come from (the service account, a kubeconfig) is `kube.loading`. Why not the official client's
loader: importing `kubernetes` costs the operator about 10 MiB of resident memory for what is a few hundred
lines of parsing. The same credentials feed kopf's login (the watches) and `kube.Kube` (the writes), so
both talk to the same server as the same user.

No message or repr here contains a token, password or key: these errors end up in logs and terminals.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import ssl
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from kiri_operator.kube.errors import CredentialsError

# Projected service-account tokens rotate (kubelet rewrites the file well before expiry); re-reading once
# a minute is what client-go does.
TOKEN_REREAD_SECONDS = 60.0
# An exec credential is renewed this long before it expires, so a request sent just before the expiry
# does not reach the server just after it.
EXPIRY_MARGIN = timedelta(seconds=10)
EXEC_TIMEOUT_SECONDS = 60.0
EXEC_API_VERSION = "client.authentication.k8s.io/v1"


@dataclass(frozen=True)
class ExecPlugin:
    """A kubeconfig user's `exec` credential plugin: a command that prints an ExecCredential."""

    command: str
    args: tuple[str, ...] = ()
    # Plugins are often given secrets through their environment.
    env: tuple[tuple[str, str], ...] = field(default=(), repr=False)
    api_version: str = EXEC_API_VERSION
    cluster_json: str | None = field(default=None, repr=False)
    """The cluster as `spec.cluster` of KUBERNETES_EXEC_INFO, when the user asks for provideClusterInfo."""
    install_hint: str | None = None
    where: str = ""
    """Which user of which kubeconfig, for messages."""

    def run(self) -> Issued:
        spec: dict[str, Any] = {"interactive": False}
        if self.cluster_json is not None:
            spec["cluster"] = json.loads(self.cluster_json)
        info = {"apiVersion": self.api_version, "kind": "ExecCredential", "spec": spec}
        env = {**os.environ, **dict(self.env), "KUBERNETES_EXEC_INFO": json.dumps(info)}
        name = f"exec plugin {self.command!r} of {self.where}"
        try:
            # stderr is left to the operator's own: plugins explain their failures there, as with kubectl.
            done = subprocess.run(
                [self.command, *self.args],
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                timeout=EXEC_TIMEOUT_SECONDS,
                check=False,
            )
        except FileNotFoundError as exc:
            hint = f" ({self.install_hint.strip()})" if self.install_hint else ""
            raise CredentialsError(f"{name} is not installed or not on PATH{hint}") from exc
        except OSError as exc:
            raise CredentialsError(f"{name} cannot be run: {exc.strerror or exc}") from exc
        except subprocess.TimeoutExpired as exc:
            raise CredentialsError(f"{name} did not finish in {EXEC_TIMEOUT_SECONDS:.0f} s") from exc
        if done.returncode != 0:
            raise CredentialsError(f"{name} exited with status {done.returncode}")
        try:
            doc = json.loads(done.stdout)
        except ValueError as exc:
            raise CredentialsError(f"{name} did not print an ExecCredential as JSON") from exc
        status = doc.get("status") if isinstance(doc, dict) else None
        if not isinstance(doc, dict) or doc.get("kind") != "ExecCredential" or not isinstance(status, dict):
            raise CredentialsError(f"{name} did not print an ExecCredential with a status")
        token = status.get("token")
        cert = status.get("clientCertificateData")
        key = status.get("clientKeyData")
        if not (isinstance(token, str) and token) and not (isinstance(cert, str) and isinstance(key, str)):
            raise CredentialsError(f"{name} gave neither a token nor a client certificate and key")
        expires = status.get("expirationTimestamp")
        expiration: datetime | None = None
        if expires:
            try:
                expiration = datetime.fromisoformat(str(expires))
            except ValueError as exc:
                raise CredentialsError(f"{name} gave an expirationTimestamp that is not RFC 3339") from exc
            if expiration.tzinfo is None:
                expiration = expiration.replace(tzinfo=UTC)
        return Issued(
            token=token if isinstance(token, str) and token else None,
            certificate_data=cert.encode() if isinstance(cert, str) and isinstance(key, str) else None,
            private_key_data=key.encode() if isinstance(cert, str) and isinstance(key, str) else None,
            expiration=expiration,
        )


@dataclass(frozen=True)
class Issued:
    """What one run of an exec plugin gave."""

    token: str | None = field(default=None, repr=False)
    certificate_data: bytes | None = field(default=None, repr=False)
    private_key_data: bytes | None = field(default=None, repr=False)
    expiration: datetime | None = None


@dataclass(frozen=True)
class Credentials:
    """How to reach one API server as one user. PEM data is kept as bytes, as read or decoded."""

    server: str
    ca_data: bytes | None = field(default=None, repr=False)
    ca_path: str | None = None
    insecure: bool = False
    token: str | None = field(default=None, repr=False)
    token_path: str | None = None
    """Where `token` was read from; re-read at most once a minute, and after a 401."""
    certificate_data: bytes | None = field(default=None, repr=False)
    private_key_data: bytes | None = field(default=None, repr=False)
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    default_namespace: str | None = None
    proxy_url: str | None = None
    exec_plugin: ExecPlugin | None = None
    expiration: datetime | None = None
    """When the exec plugin's credential expires (None: until the server refuses it)."""
    origin: str = ""
    """Where these came from, for messages: the service account, or a context of a kubeconfig."""
    read_at: float = field(default=0.0, compare=False)
    """time.monotonic() when the token file was last read or the exec plugin last run."""

    @property
    def refreshable(self) -> bool:
        return self.token_path is not None or self.exec_plugin is not None

    def stale(self, now: float | None = None) -> bool:
        if self.exec_plugin is not None:
            return self.expiration is not None and datetime.now(UTC) >= self.expiration - EXPIRY_MARGIN
        if self.token_path is not None:
            return (time.monotonic() if now is None else now) - self.read_at >= TOKEN_REREAD_SECONDS
        return False

    def refreshed(self) -> Credentials:
        """The same credentials with the exec plugin run again, or the token file read again."""
        if self.exec_plugin is not None:
            issued = self.exec_plugin.run()
            return replace(
                self,
                token=issued.token,
                certificate_data=issued.certificate_data or self.certificate_data,
                private_key_data=issued.private_key_data or self.private_key_data,
                expiration=issued.expiration,
                read_at=time.monotonic(),
            )
        if self.token_path is not None:
            return replace(
                self, token=read_token(Path(self.token_path), self.origin), read_at=time.monotonic()
            )
        return self

    def current(self) -> Credentials:
        return self.refreshed() if self.stale() else self

    def authorization(self) -> str | None:
        """The Authorization header's value: the bearer token, else basic auth, else none."""
        if self.token:
            return f"Bearer {self.token}"
        if self.username is not None and self.password is not None:
            pair = f"{self.username}:{self.password}".encode()
            return "Basic " + base64.b64encode(pair).decode("ascii")
        return None

    def ssl_context(self) -> ssl.SSLContext:
        """Server verification from the CA (or the system's), and the client certificate if there is one."""
        try:
            context = ssl.create_default_context(
                cafile=self.ca_path,
                # `cadata` as str is PEM; as bytes it would be taken for DER.
                cadata=self.ca_data.decode("ascii") if self.ca_data else None,
            )
        except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
            raise CredentialsError(
                f"the certificate authority of {self.origin} does not load: {exc}"
            ) from exc
        if self.insecure:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        self.load_client_certificate(context)
        return context

    def load_client_certificate(self, context: ssl.SSLContext) -> None:
        """Loads (or replaces, when an exec plugin issued a new one) the client certificate of `context`."""
        if not (self.certificate_data and self.private_key_data):
            return
        try:
            with _pem_file(self.certificate_data) as cert, _pem_file(self.private_key_data) as key:
                context.load_cert_chain(cert, key)
        except (OSError, ValueError) as exc:
            # ssl's reason ("PEM lib", "KEY_VALUES_MISMATCH") says what is wrong without quoting the key.
            reason = getattr(exc, "reason", None) or type(exc).__name__
            raise CredentialsError(
                f"the client certificate and key of {self.origin} do not load: {reason}"
            ) from exc


@contextlib.contextmanager
def _pem_file(data: bytes) -> Iterator[str]:
    """A path ssl can read `data` from, for as long as the block runs.

    ssl loads certificate chains from files only. An anonymous in-memory file (Linux) keeps the key off
    any disk and works on a read-only root filesystem; elsewhere, a file in a private temporary directory
    that is removed once loaded."""
    memfd: int | None = None
    if hasattr(os, "memfd_create") and os.path.isdir("/proc/self/fd"):
        with contextlib.suppress(OSError):  # e.g. refused by a seccomp profile
            memfd = os.memfd_create("kiri-pem", getattr(os, "MFD_CLOEXEC", 0))
    if memfd is not None:
        try:
            with os.fdopen(os.dup(memfd), "wb") as f:
                f.write(data)
            yield f"/proc/self/fd/{memfd}"
        finally:
            os.close(memfd)
        return
    with tempfile.TemporaryDirectory(prefix="kiri-") as directory:  # created 0700
        path = os.path.join(directory, "pem")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        yield path


def read_token(path: Path, origin: str) -> str:
    try:
        token = path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise CredentialsError(f"{origin}: cannot read the token file {path}: {exc.strerror or exc}") from exc
    if not token:
        raise CredentialsError(f"{origin}: the token file {path} is empty")
    return token
