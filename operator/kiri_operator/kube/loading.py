"""Where Kiri's API credentials come from: the pod's service account, or a kubeconfig as kubectl reads it.

This reads what kubectl reads: KUBECONFIG files merged, the current context, token files, client
certificates, exec credential plugins. What it gives is a `kube.credentials.Credentials`.

No message here contains a token, password or key: these errors end up in logs and terminals.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from kiri_operator.kube.credentials import EXEC_API_VERSION, Credentials, ExecPlugin, read_token
from kiri_operator.kube.errors import CredentialsError

SERVICE_ACCOUNT_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
DEFAULT_KUBECONFIG = "~/.kube/config"


def load(kubeconfig: str | None = None, context: str | None = None) -> Credentials:
    """The pod's service account when running in a cluster and neither a kubeconfig nor a context is named,
    else the kubeconfig (`kubeconfig`, else KUBECONFIG, else ~/.kube/config) at `context` (else its current
    context), as kubectl's `--kubeconfig` and `--context` do."""
    if kubeconfig is None and context is None and os.environ.get("KUBERNETES_SERVICE_HOST"):
        return in_cluster()
    return from_kubeconfig(kubeconfig, context=context)


def in_cluster(
    directory: str | os.PathLike[str] | None = None, environ: Mapping[str, str] | None = None
) -> Credentials:
    """The pod's service account (`directory`, else SERVICE_ACCOUNT_DIR) and the API server's service."""
    env = os.environ if environ is None else environ
    host, port = env.get("KUBERNETES_SERVICE_HOST"), env.get("KUBERNETES_SERVICE_PORT")
    if not host or not port:
        raise CredentialsError(
            "not running in a cluster: KUBERNETES_SERVICE_HOST and KUBERNETES_SERVICE_PORT are not both set"
        )
    if ":" in host and not host.startswith("["):  # an IPv6 address
        host = f"[{host}]"
    base = Path(SERVICE_ACCOUNT_DIR if directory is None else directory)
    origin = f"the service account in {base}"
    token_path = base / "token"
    token = read_token(token_path, origin)
    ca = base / "ca.crt"
    if not ca.is_file():
        raise CredentialsError(f"{origin} has no CA certificate: {ca} is missing")
    namespace: str | None = None
    with contextlib.suppress(OSError):
        namespace = (base / "namespace").read_text(encoding="utf-8").strip() or None
    return Credentials(
        server=f"https://{host}:{port}",
        ca_path=str(ca),
        token=token,
        token_path=str(token_path),
        default_namespace=namespace,
        origin=origin,
        read_at=time.monotonic(),
    )


@dataclass
class _Entry:
    """A named context, cluster or user, with the file it came from (relative paths are resolved there)."""

    body: dict[str, Any]
    file: Path


@dataclass
class _Merged:
    files: list[Path]
    current_context: str | None = None
    contexts: dict[str, _Entry] = field(default_factory=dict)
    clusters: dict[str, _Entry] = field(default_factory=dict)
    users: dict[str, _Entry] = field(default_factory=dict)

    @property
    def named(self) -> str:
        return "kubeconfig " + os.pathsep.join(str(f) for f in self.files)


def from_kubeconfig(
    path: str | os.PathLike[str] | None = None,
    environ: Mapping[str, str] | None = None,
    *,
    context: str | None = None,
) -> Credentials:
    """The current context of a kubeconfig, or `context`. `path` (else KUBECONFIG, else ~/.kube/config) may
    list several files separated by os.pathsep: they are merged as kubectl does, the first file to set a
    value wins."""
    env = os.environ if environ is None else environ
    merged = _merge(_kubeconfig_files(path, env))
    if context is not None and context not in merged.contexts:
        raise CredentialsError(f"{merged.named}: no context named {context!r}")
    current = context or merged.current_context
    if not current:
        raise CredentialsError(
            f"{merged.named} has no current-context: choose one with `kubectl config use-context NAME`"
        )
    if current not in merged.contexts:
        raise CredentialsError(f"{merged.named}: the current-context {current!r} is not among its contexts")
    entry = merged.contexts[current]
    where = f"context {current!r} of {entry.file}"
    cluster_name, user_name = entry.body.get("cluster"), entry.body.get("user")
    if not isinstance(cluster_name, str) or cluster_name not in merged.clusters:
        raise CredentialsError(f"{merged.named}: the cluster {cluster_name!r} of {where} is not defined")
    user = _Entry({}, entry.file)
    if user_name:
        if not isinstance(user_name, str) or user_name not in merged.users:
            raise CredentialsError(f"{merged.named}: the user {user_name!r} of {where} is not defined")
        user = merged.users[user_name]
    namespace = entry.body.get("namespace")
    return _credentials(
        merged.clusters[cluster_name],
        cluster_name,
        user,
        str(user_name or ""),
        where,
        namespace if isinstance(namespace, str) and namespace else None,
    )


def _kubeconfig_files(path: str | os.PathLike[str] | None, env: Mapping[str, str]) -> list[Path]:
    spec = os.fspath(path) if path is not None else env.get("KUBECONFIG") or DEFAULT_KUBECONFIG
    named = [Path(p.strip()).expanduser() for p in spec.split(os.pathsep) if p.strip()]
    if not named:
        named = [Path(DEFAULT_KUBECONFIG).expanduser()]
    # As kubectl: files of a list that do not exist are skipped, but one of them must.
    present = [p for p in named if p.exists()]
    if not present:
        which = " nor ".join(str(p) for p in named)
        raise CredentialsError(f"kubeconfig {which} does not exist")
    return present


def _merge(files: list[Path]) -> _Merged:
    merged = _Merged(files)
    for file in files:
        try:
            text = file.read_text(encoding="utf-8")
        except OSError as exc:
            raise CredentialsError(f"kubeconfig {file} cannot be read: {exc.strerror or exc}") from exc
        try:
            doc = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            # Only the problem and its place: the YAML error's own text quotes the offending line.
            mark = getattr(exc, "problem_mark", None)
            place = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
            problem = getattr(exc, "problem", None) or "malformed"
            raise CredentialsError(f"kubeconfig {file} is not valid YAML: {problem}{place}") from exc
        if doc is None:
            continue
        if not isinstance(doc, dict):
            raise CredentialsError(f"kubeconfig {file} is not a mapping")
        current = doc.get("current-context")
        if merged.current_context is None and isinstance(current, str) and current:
            merged.current_context = current
        for section, item_key, into in (
            ("contexts", "context", merged.contexts),
            ("clusters", "cluster", merged.clusters),
            ("users", "user", merged.users),
        ):
            items = doc.get(section) or []
            if not isinstance(items, list):
                raise CredentialsError(f"kubeconfig {file}: {section} is not a list")
            for item in items:
                name = item.get("name") if isinstance(item, dict) else None
                body = item.get(item_key) if isinstance(item, dict) else None
                if not isinstance(name, str) or not name:
                    raise CredentialsError(f"kubeconfig {file}: an entry of {section} has no name")
                if body is not None and not isinstance(body, dict):
                    raise CredentialsError(f"kubeconfig {file}: {item_key} {name!r} is not a mapping")
                into.setdefault(name, _Entry(body or {}, file))
    return merged


def _credentials(
    cluster: _Entry, cluster_name: str, user: _Entry, user_name: str, where: str, namespace: str | None
) -> Credentials:
    c, u = cluster.body, user.body
    cluster_where = f"cluster {cluster_name!r} in {cluster.file}"
    user_where = f"user {user_name!r} in {user.file}"
    server = c.get("server")
    if not isinstance(server, str) or not server:
        raise CredentialsError(f"{cluster_where} has no server")
    if "auth-provider" in u:
        provider = u["auth-provider"].get("name") if isinstance(u["auth-provider"], dict) else None
        raise CredentialsError(
            f"{user_where} (of {where}) uses the legacy auth-provider {provider!r}, which Kiri does not "
            "support: switch the user to an exec credential plugin (for example gke-gcloud-auth-plugin, "
            "kubelogin or `aws eks get-token`)"
        )
    ca_data = _b64(c.get("certificate-authority-data"), "certificate-authority-data", cluster_where)
    ca_path = None if ca_data else _path(c.get("certificate-authority"), cluster.file, cluster_where)
    cert = _b64(u.get("client-certificate-data"), "client-certificate-data", user_where) or _file(
        u.get("client-certificate"), user.file, user_where
    )
    key = _b64(u.get("client-key-data"), "client-key-data", user_where) or _file(
        u.get("client-key"), user.file, user_where
    )
    if bool(cert) != bool(key):
        raise CredentialsError(f"{user_where} has a client certificate without its key, or a key without one")
    token = u.get("token") if isinstance(u.get("token"), str) and u.get("token") else None
    token_path = None
    if token is None and u.get("tokenFile"):
        token_path = _path(u.get("tokenFile"), user.file, user_where)
        assert token_path is not None
        token = read_token(Path(token_path), user_where)
    username, password = u.get("username"), u.get("password")
    proxy = c.get("proxy-url")
    credentials = Credentials(
        server=server,
        ca_data=ca_data,
        ca_path=ca_path,
        insecure=bool(c.get("insecure-skip-tls-verify", False)),
        token=token,
        token_path=token_path,
        certificate_data=cert,
        private_key_data=key,
        username=str(username) if username is not None else None,
        password=str(password) if password is not None else None,
        default_namespace=namespace,
        proxy_url=proxy if isinstance(proxy, str) and proxy else None,
        exec_plugin=_exec_plugin(u.get("exec"), user.file, user_where, c, ca_data, ca_path),
        origin=where,
        read_at=time.monotonic(),
    )
    return credentials.refreshed() if credentials.exec_plugin is not None else credentials


def _exec_plugin(
    spec: Any, file: Path, where: str, cluster: Mapping[str, Any], ca_data: bytes | None, ca_path: str | None
) -> ExecPlugin | None:
    if not spec:
        return None
    if not isinstance(spec, dict) or not isinstance(spec.get("command"), str) or not spec["command"]:
        raise CredentialsError(f"{where}: exec has no command")
    command: str = spec["command"]
    # As kubectl: a relative command with a directory part is relative to the kubeconfig, not the cwd.
    if os.sep in command and not os.path.isabs(command):
        command = str(file.parent / command)
    env: list[tuple[str, str]] = []
    for item in spec.get("env") or []:
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise CredentialsError(f"{where}: an exec env entry has no name")
        env.append((item["name"], str(item.get("value", ""))))
    cluster_json = None
    if spec.get("provideClusterInfo"):
        ca = ca_data or _file(ca_path, file, where)
        cluster_json = json.dumps(_exec_cluster_info(cluster, ca))
    hint = spec.get("installHint")
    return ExecPlugin(
        command=command,
        args=tuple(str(a) for a in spec.get("args") or []),
        env=tuple(env),
        api_version=str(spec.get("apiVersion") or EXEC_API_VERSION),
        cluster_json=cluster_json,
        install_hint=hint if isinstance(hint, str) else None,
        where=where,
    )


def _exec_cluster_info(cluster: Mapping[str, Any], ca_data: bytes | None) -> dict[str, Any]:
    """`spec.cluster` of KUBERNETES_EXEC_INFO (client.authentication.k8s.io Cluster)."""
    info: dict[str, Any] = {"server": cluster.get("server")}
    if ca_data:
        info["certificate-authority-data"] = base64.b64encode(ca_data).decode("ascii")
    for key in ("tls-server-name", "insecure-skip-tls-verify", "proxy-url", "disable-compression"):
        if cluster.get(key):
            info[key] = cluster[key]
    for extension in cluster.get("extensions") or []:
        # The one extension meant for exec plugins travels as `config`.
        if isinstance(extension, dict) and extension.get("name") == "client.authentication.k8s.io/exec":
            info["config"] = extension.get("extension")
    return info


def _b64(value: Any, what: str, where: str) -> bytes | None:
    if not value:
        return None
    try:
        return base64.b64decode(str(value))
    except (binascii.Error, ValueError) as exc:
        raise CredentialsError(f"{what} of {where} is not base64") from exc


def _path(value: Any, base: Path, where: str) -> str | None:
    """A path from a kubeconfig: relative paths are relative to the kubeconfig file that holds them."""
    if not value:
        return None
    path = Path(str(value)).expanduser()
    resolved = path if path.is_absolute() else base.parent / path
    if not resolved.is_file():
        raise CredentialsError(f"{where}: {resolved} does not exist")
    return str(resolved)


def _file(value: Any, base: Path, where: str) -> bytes | None:
    path = _path(value, base, where)
    if path is None:
        return None
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise CredentialsError(f"{where}: cannot read {path}: {exc.strerror or exc}") from exc
