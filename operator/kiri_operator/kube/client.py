"""The Kubernetes API client: the only code that talks to the API server.

Why plain REST over one shared `httpx.Client` rather than the official client's typed APIs (or its
`ApiClient`): Kiri's children are plain dicts built by the planner, server-side apply takes plain dicts,
one private `_request()` is the single place that counts requests by verb and resource for the metrics,
and importing the official client costs the operator about 10 MiB of resident memory. Credentials come
from `kube.loading`, the same ones kopf logs in with; paths from the kind registry (`kiri_operator.kinds`).
kopf still runs the watches (reconnects, bookmarks, namespace scoping); this module does the writes and
the few reads that the watch caches do not cover, for the operator and the command line alike.
"""

from __future__ import annotations

import json
import logging
import socket
import ssl
import threading
from collections.abc import Callable, Generator, Iterator, Mapping
from datetime import date, datetime
from types import TracebackType
from typing import Any

import httpx

from kiri_operator import labels as L
from kiri_operator import metrics
from kiri_operator.api.scalars import format_time
from kiri_operator.clocks import Clock, ServerClock
from kiri_operator.kinds import EVENT, KINDS, MODEL_DEPLOYMENT
from kiri_operator.kube.credentials import Credentials
from kiri_operator.kube.errors import CredentialsError, KubeError
from kiri_operator.kube.loading import load as load_credentials
from kiri_operator.plans import Event

log = logging.getLogger(__name__)


APPLY = "application/apply-patch+yaml"
MERGE_PATCH = "application/merge-patch+json"
# A page of 500 pods decoded to ~15 MB of Python objects at once, every resync: the operator's resident
# memory keeps its largest transient, so pages stay small (a resync of 2,000 pods is 20 short requests).
LIST_PAGE = 100
Page = list[dict[str, Any]]
# Idle keep-alive connections live this long: reconciles come in bursts (events, resyncs), and each new
# connection is a TLS handshake.
KEEPALIVE_SECONDS = 30.0


class _Auth(httpx.Auth):
    """The Authorization header from credentials that rotate: a service-account token file re-read every
    minute, an exec plugin run again when its credential expires, and either one renewed after a 401 (a
    token can be revoked or rotated before its file or expiry says so), the request then sent once more.

    One instance serves every reconcile thread, hence the lock: one thread renews, the others wait for it.
    """

    def __init__(self, credentials: Credentials, context: ssl.SSLContext) -> None:
        self._credentials = credentials
        self._context = context
        self._lock = threading.Lock()

    def _fresh(self, rejected: Credentials | None = None) -> Credentials:
        with self._lock:
            current = self._credentials
            # After a 401, renew only if no other thread did since the rejected credentials were handed out.
            if current is rejected or current.stale():
                renewed = current.refreshed()
                pair = (renewed.certificate_data, renewed.private_key_data)
                if pair != (current.certificate_data, current.private_key_data):
                    # New connections present the new certificate; open ones keep their handshake's.
                    renewed.load_client_certificate(self._context)
                self._credentials = current = renewed
            return current

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        used = self._fresh()
        _authorize(request, used)
        response = yield request
        if response.status_code == 401 and used.refreshable:
            _authorize(request, self._fresh(rejected=used))
            yield request


def _authorize(request: httpx.Request, credentials: Credentials) -> None:
    header = credentials.authorization()
    if header:
        request.headers["Authorization"] = header
    else:
        request.headers.pop("Authorization", None)


def http_client(
    credentials: Credentials,
    *,
    connections: int = 4,
    timeout: float = 30.0,
    transport: httpx.BaseTransport | None = None,
) -> httpx.Client:
    """An httpx.Client for `credentials`' server, safe to share between threads; it keeps up to
    `connections` idle connections alive (about one per reconcile worker). `transport` replaces the
    network, in tests."""
    context = credentials.ssl_context()
    return httpx.Client(
        base_url=credentials.server,
        verify=context,
        auth=_Auth(credentials, context),
        timeout=timeout,
        limits=httpx.Limits(
            max_connections=None, max_keepalive_connections=connections, keepalive_expiry=KEEPALIVE_SECONDS
        ),
        proxy=credentials.proxy_url,
        # As the official client and kopf: no proxy or CA bundle from the environment, only the kubeconfig's.
        trust_env=False,
        transport=transport,
    )


def _json_default(value: Any) -> Any:
    # What the official client's serializer did with the only non-JSON values a body could hold.
    if isinstance(value, datetime | date):
        return value.isoformat()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


class Kube:
    def __init__(
        self, http: httpx.Client | None = None, timeout: float = 30.0, clock: Clock | None = None
    ) -> None:
        """`http` None: no connection at all (every request fails as a transport error would).

        `clock` stamps the Events written; `server_clock` follows the API server's `Date` headers."""
        self.http = http
        self.timeout = timeout
        self.instance = socket.gethostname()
        self.clock = clock or Clock()
        self.server_clock = ServerClock(self.clock)
        self.fence: Callable[[], float] | None = None
        """With leader election (`kube.leasing.Elector.remaining`): seconds this process may still write.
        Every write is refused once it reaches 0, and no write waits for an answer longer than what is
        left, so a replica that lost its Lease stops writing before another replica can take the Lease."""

    @classmethod
    def connect(
        cls,
        kubeconfig: str | None = None,
        *,
        connections: int = 4,
        timeout: float = 30.0,
        clock: Clock | None = None,
    ) -> Kube:
        """From the in-cluster service account, else `kubeconfig` / KUBECONFIG / ~/.kube/config.

        Raises CredentialsError when those cannot be used."""
        return cls.from_credentials(
            load_credentials(kubeconfig), connections=connections, timeout=timeout, clock=clock
        )

    @classmethod
    def from_credentials(
        cls,
        credentials: Credentials,
        *,
        connections: int = 4,
        timeout: float = 30.0,
        clock: Clock | None = None,
    ) -> Kube:
        return cls(http_client(credentials, connections=connections, timeout=timeout), timeout, clock)

    def close(self) -> None:
        if self.http is not None:
            self.http.close()

    def __enter__(self) -> Kube:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def _request(
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
        fenced: bool = True,
        timeout: float | None = None,
    ) -> dict[str, Any] | None:
        timeout = self.timeout if timeout is None else min(timeout, self.timeout)
        if fenced and self.fence is not None and verb in metrics.WRITE_VERBS:
            left = self.fence()
            if left <= 0:
                metrics.API_REQUESTS.labels(verb, KINDS[kind].plural, "fenced").inc()
                raise KubeError(0, verb, path, "not the leader: this replica does not hold the leader Lease")
            timeout = min(timeout, left)
        headers = {"Accept": "application/json"}
        if content_type:
            headers["Content-Type"] = content_type
        elif body is not None:
            headers["Content-Type"] = "application/json"
        # JSON is YAML too, so an apply patch (application/apply-patch+yaml) is sent as JSON as well.
        content = None if body is None else json.dumps(body, default=_json_default).encode()
        resource = KINDS[kind].plural
        try:
            if self.http is None:
                raise httpx.TransportError("not connected to an API server")
            response = self.http.request(
                method, path, params=query, headers=headers, content=content, timeout=timeout
            )
        except (httpx.HTTPError, CredentialsError, OSError) as exc:
            metrics.API_REQUESTS.labels(verb, resource, "error").inc()
            raise KubeError(0, verb, path, str(exc) or type(exc).__name__) from exc
        status = response.status_code
        self.server_clock.saw(response.headers.get("date"))
        metrics.API_REQUESTS.labels(verb, resource, str(status)).inc()
        if status == 404 and missing_ok:
            return None
        text = response.content.decode("utf-8", errors="replace")
        if not 200 <= status < 300:
            try:
                parsed_error = json.loads(text)
            except ValueError:
                parsed_error = None
            message = parsed_error.get("message", text) if isinstance(parsed_error, dict) else text
            raise KubeError(status, verb, path, str(message)[:2000])
        parsed = json.loads(text) if text else None
        return parsed if isinstance(parsed, dict) else None

    # -- reads -------------------------------------------------------------------------------------
    def get(
        self, kind: str, namespace: str | None, name: str, *, timeout: float | None = None
    ) -> dict[str, Any] | None:
        """The object, or None when there is none."""
        path = KINDS[kind].path(namespace, name)
        return self._request("get", "GET", kind, path, missing_ok=True, timeout=timeout)

    def events_with_reason(
        self, namespace: str, kind: str | None, reason: str, pages: int = 10
    ) -> list[dict[str, Any]]:
        """The Events with `reason` about any object of `kind` (None: of any kind) in a namespace (one
        server-side field selector), at most `pages` pages of LIST_PAGE: the kubelet and the controllers
        fold repeats into one Event per object and message, so a namespace fits unless thousands of its
        objects fail at once."""
        fields = f"involvedObject.kind={kind},reason={reason}" if kind else f"reason={reason}"
        out: list[dict[str, Any]] = []
        token: str | None = None
        for _ in range(pages):
            query = {"fieldSelector": fields, "limit": str(LIST_PAGE)}
            if token:
                query["continue"] = token
            result = self._request("list", "GET", "Event", KINDS["Event"].path(namespace), query=query) or {}
            out += [i for i in result.get("items") or [] if isinstance(i, dict)]
            token = (result.get("metadata") or {}).get("continue") or None
            if not token:
                break
        return out

    def list(
        self,
        kind: str,
        namespace: str | None = None,
        selector: str | None = None,
        *,
        fields: str | None = None,
    ) -> list[dict[str, Any]]:
        return [
            item for _, page in self.list_pages(kind, namespace, selector, fields=fields) for item in page
        ]

    def list_pages(
        self,
        kind: str,
        namespace: str | None = None,
        selector: str | None = None,
        *,
        fields: str | None = None,
    ) -> Iterator[tuple[str | None, Page]]:
        """A LIST in pages of LIST_PAGE objects, each with the list's resourceVersion (the snapshot all
        pages show): one page is decoded at a time, so a fleet's pods do not need one huge response."""
        version: str | None = None
        token: str | None = None
        while True:
            query = {"limit": str(LIST_PAGE)}
            if selector:
                query["labelSelector"] = selector
            if fields:
                query["fieldSelector"] = fields
            if token:
                query["continue"] = token
            result = self._request("list", "GET", kind, KINDS[kind].path(namespace), query=query) or {}
            meta = result.get("metadata") or {}
            if version is None:
                # Opaque: kept as the API gave it, never compared for order.
                version = str(meta.get("resourceVersion") or "") or None
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

    def watch(
        self,
        kind: str,
        namespace: str | None,
        *,
        name: str | None = None,
        resource_version: str | None = None,
        timeout_seconds: int = 60,
    ) -> Iterator[tuple[str, dict[str, Any]]]:
        """A WATCH (the CLI's; the operator's watches are kopf's): (type, object) per event, ADDED, MODIFIED,
        DELETED or ERROR, until the server ends it after `timeout_seconds`. `name` watches one object (a
        metadata.name field selector); from `resource_version`, else from now (with the current state first).
        An ERROR event (410 Gone: the version is too old) means: get again and watch from there."""
        query = {"watch": "1", "timeoutSeconds": str(max(1, int(timeout_seconds)))}
        if name:
            query["fieldSelector"] = f"metadata.name={name}"
        if resource_version:
            query["resourceVersion"] = resource_version
        path = KINDS[kind].path(namespace)
        resource = KINDS[kind].plural
        if self.http is None:
            raise KubeError(0, "watch", path, "not connected to an API server")
        # The read timeout outlives the server's own end of the watch, so a quiet watch is not an error.
        timeout = httpx.Timeout(self.timeout, read=timeout_seconds + self.timeout)
        try:
            with self.http.stream("GET", path, params=query, timeout=timeout) as response:
                metrics.API_REQUESTS.labels("watch", resource, str(response.status_code)).inc()
                if not 200 <= response.status_code < 300:
                    text = response.read().decode("utf-8", errors="replace")
                    raise KubeError(response.status_code, "watch", path, text[:2000])
                for line in response.iter_lines():
                    if not line.strip():
                        continue
                    event = json.loads(line)
                    if isinstance(event, dict) and isinstance(event.get("object"), dict):
                        yield str(event.get("type", "")), event["object"]
        except (httpx.HTTPError, CredentialsError, OSError, ValueError) as exc:
            metrics.API_REQUESTS.labels("watch", resource, "error").inc()
            raise KubeError(0, "watch", path, str(exc) or type(exc).__name__) from exc

    # -- writes ------------------------------------------------------------------------------------
    def apply(self, obj: Mapping[str, Any]) -> dict[str, Any]:
        """Server-side apply with field manager `kiri`; `force` takes over fields another manager set."""
        kind = str(obj["kind"])
        meta = obj["metadata"]
        path = KINDS[kind].path(meta.get("namespace"), meta["name"])
        query = {"fieldManager": L.FIELD_MANAGER, "force": "true"}
        result = self._request("apply", "PATCH", kind, path, query=query, body=dict(obj), content_type=APPLY)
        assert result is not None
        return result

    def create(
        self, obj: Mapping[str, Any], *, fenced: bool = True, timeout: float | None = None
    ) -> dict[str, Any]:
        """POST: 409 when an object of that name exists (nothing is overwritten)."""
        kind = str(obj["kind"])
        path = KINDS[kind].path(obj["metadata"].get("namespace"))
        result = self._request("create", "POST", kind, path, body=dict(obj), fenced=fenced, timeout=timeout)
        assert result is not None
        return result

    def publish(self, obj: Mapping[str, Any]) -> dict[str, Any]:
        """Create `obj`; when its name exists already (a retried Job), server-side apply it over that.

        The Jobs publish so because `create` is the one ConfigMap verb a Role can grant without access to
        any existing ConfigMap (RBAC cannot limit create by name): the chart's Role for the Jobs grants it
        alone, and the per-ModelDeployment Role adds get/patch on the names it knows."""
        try:
            return self.create(obj)
        except KubeError as exc:
            if exc.status != 409:
                raise
        return self.apply(obj)

    def replace(
        self, obj: Mapping[str, Any], *, fenced: bool = True, timeout: float | None = None
    ) -> dict[str, Any]:
        """PUT with the object's metadata.resourceVersion: 409 when someone wrote it since it was read."""
        kind = str(obj["kind"])
        meta = obj["metadata"]
        path = KINDS[kind].path(meta.get("namespace"), meta["name"])
        result = self._request("update", "PUT", kind, path, body=dict(obj), fenced=fenced, timeout=timeout)
        assert result is not None
        return result

    def patch(self, kind: str, namespace: str | None, name: str, patch: Mapping[str, Any]) -> dict[str, Any]:
        """A JSON merge patch (RFC 7386): only the fields named change, no field manager takes them over."""
        path = KINDS[kind].path(namespace, name)
        result = self._request("patch", "PATCH", kind, path, body=dict(patch), content_type=MERGE_PATCH)
        return result or {}

    def annotate(
        self, kind: str, namespace: str | None, name: str, annotations: Mapping[str, str]
    ) -> dict[str, Any]:
        """Set annotations (a merge patch of metadata.annotations alone)."""
        return self.patch(kind, namespace, name, {"metadata": {"annotations": dict(annotations)}})

    def delete(self, kind: str, namespace: str, name: str) -> None:
        # Background: the garbage collector removes the Job's or DaemonSet's pods after the owner is gone.
        body = {"kind": "DeleteOptions", "apiVersion": "v1", "propagationPolicy": "Background"}
        self._request("delete", "DELETE", kind, KINDS[kind].path(namespace, name), body=body, missing_ok=True)

    def apply_status(self, namespace: str, name: str, status: Mapping[str, Any]) -> dict[str, Any]:
        """Status via server-side apply too: fields Kiri stops setting are removed, not left behind."""
        md = MODEL_DEPLOYMENT
        body = {
            "apiVersion": md.api_version,
            "kind": md.kind,
            "metadata": {"name": name, "namespace": namespace},
            "status": dict(status),
        }
        path = md.path(namespace, name, "status")
        query = {"fieldManager": L.FIELD_MANAGER, "force": "true"}
        result = self._request("apply", "PATCH", md.kind, path, query=query, body=body, content_type=APPLY)
        assert result is not None
        return result

    def event(self, md: Mapping[str, Any], event: Event) -> None:
        meta = md.get("metadata") or {}
        namespace = str(meta.get("namespace"))
        now = format_time(self.clock.now())
        body = {
            "apiVersion": EVENT.api_version,
            "kind": EVENT.kind,
            "metadata": {"generateName": f"{meta.get('name')}.", "namespace": namespace},
            "involvedObject": {
                "apiVersion": MODEL_DEPLOYMENT.api_version,
                "kind": MODEL_DEPLOYMENT.kind,
                "name": meta.get("name"),
                "namespace": namespace,
                "uid": meta.get("uid"),
                "resourceVersion": meta.get("resourceVersion"),
            },
            "reason": event.reason,
            "message": event.message[:1024],
            "type": event.type,
            "source": {"component": L.EVENT_SOURCE, "host": self.instance},
            "reportingComponent": L.REPORTING_COMPONENT,
            "reportingInstance": self.instance[:128],
            "action": event.reason,
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
        }
        try:
            self._request("create", "POST", EVENT.kind, EVENT.path(namespace), body=body)
        except KubeError as exc:  # an event is worth a log line, never a failed reconcile
            log.warning("could not record event %s: %s", event.reason, exc)
