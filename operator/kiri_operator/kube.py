"""The only module that talks to the Kubernetes API.

Why the plain REST calls of the official client's `ApiClient` rather than its typed APIs or kopf's own
client: Kiri's children are plain dicts built by the planner, server-side apply takes plain dicts, and
one generic `request()` is the single place that counts requests by verb and resource for the metrics.
kopf still runs the watches (reconnects, bookmarks, namespace scoping); this module does the writes and
the few reads that the watch caches do not cover.
"""

from __future__ import annotations

import json
import logging
import os
import socket
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from kiri_operator import labels as L
from kiri_operator import metrics
from kiri_operator.api.names import API_VERSION, KIND, PLURAL
from kiri_operator.plans import Event

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Resource:
    prefix: str
    plural: str
    namespaced: bool = True

    def path(self, namespace: str | None, name: str | None = None, sub: str | None = None) -> str:
        parts = [self.prefix]
        if self.namespaced and namespace:
            parts += ["namespaces", namespace]
        parts.append(self.plural)
        if name:
            parts.append(name)
        if sub:
            parts.append(sub)
        return "/".join(parts)


RESOURCES: dict[str, Resource] = {
    "Deployment": Resource("/apis/apps/v1", "deployments"),
    "DaemonSet": Resource("/apis/apps/v1", "daemonsets"),
    "Job": Resource("/apis/batch/v1", "jobs"),
    "Service": Resource("/api/v1", "services"),
    "ConfigMap": Resource("/api/v1", "configmaps"),
    "ServiceAccount": Resource("/api/v1", "serviceaccounts"),
    "Pod": Resource("/api/v1", "pods"),
    "PersistentVolumeClaim": Resource("/api/v1", "persistentvolumeclaims"),
    "Event": Resource("/api/v1", "events"),
    "Node": Resource("/api/v1", "nodes", namespaced=False),
    "Role": Resource("/apis/rbac.authorization.k8s.io/v1", "roles"),
    "RoleBinding": Resource("/apis/rbac.authorization.k8s.io/v1", "rolebindings"),
    KIND: Resource(f"/apis/{API_VERSION}", PLURAL),
}
APPLY = "application/apply-patch+yaml"
LIST_PAGE = 500
Page = list[dict[str, Any]]


class KubeError(RuntimeError):
    def __init__(self, status: int, verb: str, path: str, message: str) -> None:
        super().__init__(f"{verb} {path}: HTTP {status}: {message}")
        self.status = status
        self.message = message


def load_client(kubeconfig: str | None = None) -> Any:
    """An ApiClient from the in-cluster service account, else KUBECONFIG / ~/.kube/config."""
    from kubernetes import client, config

    cfg = client.Configuration()
    if kubeconfig is None and os.environ.get("KUBERNETES_SERVICE_HOST"):
        config.load_incluster_config(client_configuration=cfg)  # type: ignore[no-untyped-call]
    else:
        config.load_kube_config(config_file=kubeconfig, client_configuration=cfg)  # type: ignore[no-untyped-call]
    return client.ApiClient(cfg)


class Kube:
    def __init__(self, api_client: Any, timeout: float = 30.0) -> None:
        self.api = api_client
        self.timeout = timeout
        self.instance = socket.gethostname()

    def request(
        self,
        verb: str,
        method: str,
        kind: str,
        path: str,
        *,
        query: Mapping[str, str] | None = None,
        body: Any = None,
        content_type: str | None = None,
        missing_ok: bool = False,
    ) -> dict[str, Any] | None:
        headers = {"Accept": "application/json"}
        if content_type:
            headers["Content-Type"] = content_type
        elif body is not None:
            headers["Content-Type"] = "application/json"
        serialized = self.api.param_serialize(
            method=method,
            resource_path=path,
            query_params=list((query or {}).items()),
            header_params=headers,
            body=body,
            auth_settings=["BearerToken"],
        )
        method_, url, headers_, body_ = serialized[0], serialized[1], serialized[2], serialized[3]
        resource = RESOURCES[kind].plural
        try:
            response = self.api.call_api(
                method_, url, header_params=headers_, body=body_, _request_timeout=self.timeout
            )
            response.read()
            status, data = int(response.status), response.data
        except Exception as exc:  # the client raises ApiException for non-2xx codes
            status = int(getattr(exc, "status", 0) or 0)
            data = getattr(exc, "body", None) or str(exc).encode()
            if status == 0:
                metrics.API_REQUESTS.labels(verb, resource, "error").inc()
                raise KubeError(0, verb, path, str(exc)) from exc
        metrics.API_REQUESTS.labels(verb, resource, str(status)).inc()
        if status == 404 and missing_ok:
            return None
        text = data.decode() if isinstance(data, bytes) else str(data or "")
        if not 200 <= status < 300:
            try:
                message = json.loads(text).get("message", text)
            except ValueError:
                message = text
            raise KubeError(status, verb, path, message[:2000])
        parsed = json.loads(text) if text else None
        return parsed if isinstance(parsed, dict) else None

    # -- reads -------------------------------------------------------------------------------------
    def get(self, kind: str, namespace: str | None, name: str) -> dict[str, Any] | None:
        return self.request("get", "GET", kind, RESOURCES[kind].path(namespace, name), missing_ok=True)

    def list(
        self, kind: str, namespace: str | None = None, selector: str | None = None
    ) -> list[dict[str, Any]]:
        return [item for _, page in self.list_pages(kind, namespace, selector) for item in page]

    def list_pages(
        self, kind: str, namespace: str | None = None, selector: str | None = None
    ) -> Iterator[tuple[int | None, Page]]:
        """A LIST in pages of LIST_PAGE objects, each with the list's resourceVersion (the snapshot all
        pages show): one page is decoded at a time, so a fleet's pods do not need one huge response."""
        version: int | None = None
        token: str | None = None
        while True:
            query = {"limit": str(LIST_PAGE)}
            if selector:
                query["labelSelector"] = selector
            if token:
                query["continue"] = token
            result = self.request("list", "GET", kind, RESOURCES[kind].path(namespace), query=query) or {}
            meta = result.get("metadata") or {}
            if version is None:
                raw = str(meta.get("resourceVersion") or "")
                version = int(raw) if raw.isdigit() else None
            items = result.get("items") or []
            api_version = result.get("apiVersion", "")
            item_kind = str(result.get("kind", "")).removesuffix("List")
            for item in items:  # list items carry neither; the caches want them
                item.setdefault("apiVersion", api_version)
                item.setdefault("kind", item_kind)
            yield version, [i for i in items if isinstance(i, dict)]
            token = meta.get("continue") or None
            if not token:
                return

    # -- writes ------------------------------------------------------------------------------------
    def apply(self, obj: Mapping[str, Any]) -> dict[str, Any]:
        """Server-side apply with field manager `kiri`; `force` takes over fields another manager set."""
        kind = str(obj["kind"])
        meta = obj["metadata"]
        path = RESOURCES[kind].path(meta.get("namespace"), meta["name"])
        query = {"fieldManager": L.FIELD_MANAGER, "force": "true"}
        result = self.request("apply", "PATCH", kind, path, query=query, body=dict(obj), content_type=APPLY)
        assert result is not None
        return result

    def delete(self, kind: str, namespace: str, name: str) -> None:
        # Background: the garbage collector removes the Job's or DaemonSet's pods after the owner is gone.
        body = {"kind": "DeleteOptions", "apiVersion": "v1", "propagationPolicy": "Background"}
        self.request(
            "delete", "DELETE", kind, RESOURCES[kind].path(namespace, name), body=body, missing_ok=True
        )

    def apply_status(self, namespace: str, name: str, status: Mapping[str, Any]) -> dict[str, Any]:
        """Status via server-side apply too: fields Kiri stops setting are removed, not left behind."""
        body = {
            "apiVersion": API_VERSION,
            "kind": KIND,
            "metadata": {"name": name, "namespace": namespace},
            "status": dict(status),
        }
        path = RESOURCES[KIND].path(namespace, name, "status")
        query = {"fieldManager": L.FIELD_MANAGER, "force": "true"}
        result = self.request("apply", "PATCH", KIND, path, query=query, body=body, content_type=APPLY)
        assert result is not None
        return result

    def event(self, md: Mapping[str, Any], event: Event) -> None:
        meta = md.get("metadata") or {}
        namespace = str(meta.get("namespace"))
        now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        body = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"generateName": f"{meta.get('name')}.", "namespace": namespace},
            "involvedObject": {
                "apiVersion": API_VERSION,
                "kind": KIND,
                "name": meta.get("name"),
                "namespace": namespace,
                "uid": meta.get("uid"),
                "resourceVersion": meta.get("resourceVersion"),
            },
            "reason": event.reason,
            "message": event.message[:1024],
            "type": event.type,
            "source": {"component": "kiri-operator", "host": self.instance},
            "reportingComponent": "kiri.dev/operator",
            "reportingInstance": self.instance[:128],
            "action": event.reason,
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
        }
        try:
            self.request("create", "POST", "Event", RESOURCES["Event"].path(namespace), body=body)
        except KubeError as exc:  # an event is worth a log line, never a failed reconcile
            log.warning("could not record event %s: %s", event.reason, exc)

    def publish_manifest(
        self,
        namespace: str,
        name: str,
        text: str,
        compression: str,
        owner_name: str | None,
        owner_uid: str | None,
    ) -> dict[str, Any]:
        """The compression Job's last step: the manifest as a ConfigMap owned by its ModelDeployment."""
        md = owner_name or ""
        cm_labels = {**L.common_labels(md, L.COMPONENT_MANIFEST), L.COMPRESSION: compression} if md else {}
        meta: dict[str, Any] = {"name": name, "namespace": namespace, "labels": cm_labels}
        if owner_name and owner_uid:
            meta["ownerReferences"] = [
                {
                    "apiVersion": API_VERSION,
                    "kind": KIND,
                    "name": owner_name,
                    "uid": owner_uid,
                    "controller": True,
                    # True would need update on the owner's finalizers (OwnerReferencesPermissionEnforcement).
                    "blockOwnerDeletion": False,
                }
            ]
        return self.apply(
            {"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta, "data": {L.MANIFEST_KEY: text}}
        )
