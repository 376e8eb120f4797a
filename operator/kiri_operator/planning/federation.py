"""The learning rounds' Flower deployment, as the ModelDeployment's own children. Pure: one builder per child.

* `<md>-flower-tls` (Secret): a private CA and the SuperLink's server certificate. The operator *creates* it once
  (`kube.create`; it holds no get/list/watch on Secrets, so it can never read one back) from
  `kiri_runtime.learning.certificates`; the plan only names it (`tls_request`), key material never enters a plan,
  a status or a log line.
* `<md>-supernode-key-<site>` (Secret per site): that site's SuperNode authentication key pair
  (`kiri_runtime.learning.node_keys`), created the same way (`node_key_request`): `supernode.key` for the
  site's SuperNode only, `supernode.pub` for the SuperLink.
* `<md>-superlink` (Deployment + Service): `flower-superlink` on a cloud node, TLS on its two ports (the Fleet
  API's, the Control API's), running Kiri's ServerApp for each round (subprocess isolation, no runtime
  dependency installation), with SuperNode authentication on: it mounts only the public keys of the spec's
  sites (one projected volume, one `<site>.pub` item from each site's Secret), registers them at start and
  closes registration on its Control API (`kiri_runtime.learning.flower_processes`), so a SuperNode without a
  registered key cannot join. It mounts
  the artifact store (the base weights, the held-out set, the round records) and, for the privacy ledger
  ConfigMap only, a projected API token.
* `<md>-superlink` (NetworkPolicy): the SuperLink's pod admits this ModelDeployment's SuperNodes on the Fleet
  API's port and its round Jobs on the Control API's (`kiri learn-round`), and no one else. The two APIs are
  apart because `kiri flower-superlink --control-port` serves the Control API on a port of its own and on no
  other (Flower 1.42 alone serves the Fleet, Control and Runtime APIs on one port); the Runtime API, on the
  Fleet port, answers only loopback peers (`flower_processes.RuntimeApiLocal`): the ServerApp is in this pod.
* `<md>-supernodes` (NetworkPolicy): no ingress to any of its SuperNodes' pods (they only dial out; their own
  Runtime API is on 127.0.0.1).
* `<md>-supernode-<site>` (Deployment per site): `flower-supernode` pinned to that site's edge nodes, trusting
  only `ca.crt` (the one key of the TLS Secret it mounts), signing its requests with its own site's private key
  (the one key of its site's Secret it mounts), its site data mounted read-only from the host, no API token.
  The site's name and data path reach the ClientApp through `--node-config`.

Every pod: non-root, read-only root filesystem, all capabilities dropped, RuntimeDefault seccomp.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from typing import Any

from kiri_operator import labels as L
from kiri_operator.api.specs import ModelDeploymentSpec
from kiri_operator.planning import building as B
from kiri_operator.plans import SECRET_SUPERNODE_KEY, SecretRequest
from kiri_runtime.learning.node_keys import PRIVATE_KEY_FILE, PUBLIC_KEY_FILE

FLEET_PORT = 9092
CONTROL_PORT = 9093
"""The Control API (run submission, `flwr run`): on a port of its own (`kiri flower-superlink --control-port`;
Flower 1.42 alone would serve it on the Fleet API's), so that a NetworkPolicy can tell who reaches which."""
TLS_MOUNT = "/var/run/kiri/flower-tls"
NODE_KEY_MOUNT = "/var/run/kiri/supernode-key"
"""In a SuperNode's pod: its own site's private key, `supernode.key`."""
NODE_KEYS_MOUNT = "/var/run/kiri/supernode-keys"
"""In the SuperLink's pod: `<site>.pub` for each of the spec's sites."""
SITE_DATA_MOUNT = "/var/lib/kiri/site-data.npz"
ROLE_SUPERLINK = "superlink"
ROLE_SUPERNODE = "supernode"
ROLE_ROUND = "round"
"""The round Job's pods (`learning.round_objects`): `kiri learn-round` submits the round on the Control API."""
_SLUG = re.compile(r"[^a-z0-9-]+")
# Flower keeps its config home and the apps' bundles under these: the root filesystem is read-only.
_ENV = [
    {"name": "HOME", "value": "/tmp"},
    {"name": "FLWR_HOME", "value": "/tmp/flwr"},
    {"name": "PYTHONDONTWRITEBYTECODE", "value": "1"},
]


def supernodes_policy_name(md: str) -> str:
    return L.child_name(md, "supernodes")


def tls_secret_name(md: str) -> str:
    return L.child_name(md, "flower-tls")


def superlink_name(md: str) -> str:
    return L.child_name(md, ROLE_SUPERLINK)


def _site_suffix(site: str) -> str:
    slug = _SLUG.sub("-", site.lower()).strip("-")[:20] or "site"
    return f"{slug}-{L.short_hash(site, length=6)}"


def supernode_name(md: str, site: str) -> str:
    return L.child_name(md, ROLE_SUPERNODE, _site_suffix(site))


def node_key_secret_name(md: str, site: str) -> str:
    return L.child_name(md, "supernode-key", _site_suffix(site))


def superlink_address(owner: B.Owner) -> str:
    """The Fleet API, which the SuperNodes dial."""
    return f"{superlink_name(owner.name)}.{owner.namespace}.svc:{FLEET_PORT}"


def control_address(owner: B.Owner) -> str:
    """The Control API, which the round Job submits the round to."""
    return f"{superlink_name(owner.name)}.{owner.namespace}.svc:{CONTROL_PORT}"


def tls_request(owner: B.Owner) -> SecretRequest:
    svc = superlink_name(owner.name)
    # 127.0.0.1 and localhost: inside the SuperLink's pod, Flower's own flwr-serverapp and SuperExec reach the
    # SuperLink's Runtime API there, over the same TLS certificate (without them the ServerApp cannot start).
    names = (
        f"{svc}.{owner.namespace}.svc",
        f"{svc}.{owner.namespace}.svc.cluster.local",
        svc,
        "localhost",
        "127.0.0.1",
    )
    labels = tuple(sorted(L.common_labels(owner.name, L.COMPONENT_LEARNING).items()))
    return SecretRequest(owner.namespace, tls_secret_name(owner.name), names, owner.name, owner.uid, labels)


def node_key_request(owner: B.Owner, site: str) -> SecretRequest:
    """The site's SuperNode key pair, made by the reconciler at the create (the plan holds only its name)."""
    labels = {**_labels(owner, ROLE_SUPERNODE), L.SITE_NAME: L.short_hash(site, length=16)}
    return SecretRequest(
        owner.namespace,
        node_key_secret_name(owner.name, site),
        (),
        owner.name,
        owner.uid,
        tuple(sorted(labels.items())),
        kind=SECRET_SUPERNODE_KEY,
    )


def secret_object(request: SecretRequest, data: dict[str, str]) -> dict[str, Any]:
    """The Secret's body, `data` base64 already; built by the reconciler, which alone sees the key."""
    meta: dict[str, Any] = {
        "name": request.name,
        "namespace": request.namespace,
        "labels": dict(request.labels),
        "ownerReferences": [L.owner_reference(request.owner, request.owner_uid)],
    }
    return {"apiVersion": "v1", "kind": "Secret", "type": "Opaque", "metadata": meta, "data": data}


def _labels(owner: B.Owner, role: str) -> dict[str, str]:
    return {**L.common_labels(owner.name, L.COMPONENT_LEARNING), L.LEARNING_ROLE: role}


def role_selector(md: str, role: str) -> dict[str, str]:
    """This ModelDeployment's learning pods of one role (`ROLE_SUPERLINK`, `ROLE_SUPERNODE`, `ROLE_ROUND`):
    the labels every such pod carries and another ModelDeployment's never do (`kiri.dev/modeldeployment`)."""
    return {**L.selector_labels(md), L.COMPONENT: L.COMPONENT_LEARNING, L.LEARNING_ROLE: role}


def _network_policy(name: str, labels: dict[str, str], spec: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": B._metadata(name, labels),
        "spec": spec,
    }


def superlink_network_policy(owner: B.Owner) -> dict[str, Any]:
    """Who reaches the SuperLink's pod: this ModelDeployment's SuperNodes on the Fleet API's port, its round
    Jobs on the Control API's, no one else (the policy selects the pod, so whatever no rule admits is
    refused). Peers are pods of this namespace: no `namespaceSelector`."""
    md = owner.name
    spec = {
        "podSelector": {"matchLabels": role_selector(md, ROLE_SUPERLINK)},
        "policyTypes": ["Ingress"],
        "ingress": [
            {
                "from": [{"podSelector": {"matchLabels": role_selector(md, ROLE_SUPERNODE)}}],
                "ports": [{"protocol": "TCP", "port": FLEET_PORT}],
            },
            {
                "from": [{"podSelector": {"matchLabels": role_selector(md, ROLE_ROUND)}}],
                "ports": [{"protocol": "TCP", "port": CONTROL_PORT}],
            },
        ],
    }
    policy = _network_policy(superlink_name(md), _labels(owner, ROLE_SUPERLINK), spec)
    return B.finish(policy, owner)


def supernodes_network_policy(owner: B.Owner, *, serves_adapters: bool = False) -> dict[str, Any]:
    """No ingress to this ModelDeployment's SuperNodes: they dial the SuperLink and listen on nothing else;
    except, for a perSite language model (`serves_adapters`), the kept-adapter store's port, from this
    ModelDeployment's edge pods only."""
    ingress: list[dict[str, Any]] = []
    if serves_adapters:
        edge = {**L.selector_labels(owner.name), L.COMPONENT: L.COMPONENT_EDGE}
        ingress.append(
            {
                "from": [{"podSelector": {"matchLabels": edge}}],
                "ports": [{"protocol": "TCP", "port": SITE_STORE_PORT}],
            }
        )
    spec = {
        "podSelector": {"matchLabels": role_selector(owner.name, ROLE_SUPERNODE)},
        "policyTypes": ["Ingress"],
        "ingress": ingress,
    }
    policy = _network_policy(supernodes_policy_name(owner.name), _labels(owner, ROLE_SUPERNODE), spec)
    return B.finish(policy, owner)


def container(
    spec: ModelDeploymentSpec,
    name: str,
    command: list[str],
    mounts: list[dict[str, Any]],
    *,
    args: list[str] | None = None,
    flower_env: bool = True,
) -> dict[str, Any]:
    """A learning container: the compressor image, sized as the cloud tier, locked down (the SuperLink,
    the SuperNodes and the round Job's steps alike). `flower_env`: Flower's homes under /tmp."""
    resources = {"cpu": spec.cloud.resources.cpu, "memory": spec.cloud.resources.memory}
    out: dict[str, Any] = {
        "name": name,
        "image": spec.runtime.compressor_image,
        "imagePullPolicy": spec.runtime.image_pull_policy,
        "command": command,
    }
    if args is not None:
        out["args"] = args
    if flower_env:
        out["env"] = list(_ENV)
    return {
        **out,
        "resources": {"requests": dict(resources), "limits": dict(resources)},
        "securityContext": B.container_security(),
        "volumeMounts": mounts,
    }


def _deployment(name: str, labels: dict[str, str], pod: dict[str, Any]) -> dict[str, Any]:
    selector = {k: v for k, v in labels.items() if k != L.LEARNING_ROUND}
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": B._metadata(name, labels),
        "spec": {
            "replicas": 1,
            # One SuperLink (its state is the runs in flight) and one SuperNode per site: never two at once.
            "strategy": {"type": "Recreate"},
            "selector": {"matchLabels": selector},
            "template": {
                "metadata": {"labels": dict(labels)},
                "spec": {"securityContext": B.pod_security(), **pod},
            },
        },
    }


def node_keys_volume(md: str, sites: Sequence[str]) -> dict[str, Any]:
    """The SuperLink's view of the sites' key Secrets: `<site>.pub` from each, never `supernode.key`.
    (A site is a node label value, so a safe file name: alphanumerics, `-`, `_`, `.`, not starting with `.`.)"""
    sources = [
        {
            "secret": {
                "name": node_key_secret_name(md, site),
                "items": [{"key": PUBLIC_KEY_FILE, "path": f"{site}.pub"}],
            }
        }
        for site in sorted(sites)
    ]
    return {"name": "supernode-keys", "projected": {"defaultMode": 0o440, "sources": sources}}


def superlink(
    spec: ModelDeploymentSpec, owner: B.Owner, service_account: str, sites: Sequence[str]
) -> list[dict[str, Any]]:
    """The SuperLink's Deployment and Service; `sites` are the sites whose SuperNodes it lets in. Its state
    stays in memory (no `--database`): a run lives for one round, the round's outcome is the record in the
    store, and SQLite answered "database is locked" (HTTP 500) to the SuperNodes' pushes on the loaded 2-core
    box. The registered keys are remounted and registered again at every start."""
    store = B.artifact_dir(spec, owner, "learning")
    labels = _labels(owner, ROLE_SUPERLINK)
    tls = f"{TLS_MOUNT}/"
    command = [
        "kiri", "flower-superlink",
        "--ssl-ca-certfile", tls + "ca.crt",
        "--ssl-certfile", tls + "tls.crt",
        "--ssl-keyfile", tls + "tls.key",
        "--host", "0.0.0.0",
        "--port", str(FLEET_PORT),
        "--control-port", str(CONTROL_PORT),
        "--isolation", "subprocess",
        "--disable-runtime-dependency-installation",
        "--enable-supernode-auth",
        "--supernode-public-keys", NODE_KEYS_MOUNT,
    ]  # fmt: skip
    mounts: list[dict[str, Any]] = [
        {"name": "tls", "mountPath": TLS_MOUNT, "readOnly": True},
        {"name": "supernode-keys", "mountPath": NODE_KEYS_MOUNT, "readOnly": True},
        {"name": "artifacts", "mountPath": store.mount_path},
        {"name": "tmp", "mountPath": "/tmp"},
        B.api_token_mount(),  # the ServerApp writes the privacy ledger ConfigMap before it aggregates
    ]
    link = container(spec, "superlink", command, mounts)
    link["ports"] = [
        {"name": "fleet", "containerPort": FLEET_PORT},
        {"name": "control", "containerPort": CONTROL_PORT},
    ]
    link["readinessProbe"] = {"tcpSocket": {"port": FLEET_PORT}, "periodSeconds": 5}
    pod = B.pod_identity(
        spec,
        service_account,
        {
            "automountServiceAccountToken": False,
            "nodeSelector": dict(spec.cloud.node_selector),
            "tolerations": B.tolerations(spec.cloud.tolerations),
            "containers": [link],
            "volumes": [
                {"name": "tls", "secret": {"secretName": tls_secret_name(owner.name), "defaultMode": 0o440}},
                node_keys_volume(owner.name, sites),
                store.volume,
                {"name": "tmp", "emptyDir": {}},
                B.api_token_volume(),
            ],
        },
    )
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": B._metadata(superlink_name(owner.name), labels),
        "spec": {
            "selector": {**L.selector_labels(owner.name), L.LEARNING_ROLE: ROLE_SUPERLINK},
            "ports": [
                {"name": "fleet", "port": FLEET_PORT, "targetPort": FLEET_PORT},
                {"name": "control", "port": CONTROL_PORT, "targetPort": CONTROL_PORT},
            ],
        },
    }
    return [B.finish(_deployment(superlink_name(owner.name), labels, pod), owner), B.finish(service, owner)]


def node_config(site: str, *, allow_plain: bool, keep_dir: str | None = None) -> str:
    config = {"site": site, "data": SITE_DATA_MOUNT, "work-dir": "/tmp/kiri-learning"}
    if keep_dir is not None:
        config["keep-dir"] = keep_dir
    text = " ".join(f"{k}={json.dumps(v)}" for k, v in config.items())
    return text + (" allow-plain-rounds=true" if allow_plain else "")


def supernode(
    spec: ModelDeploymentSpec, owner: B.Owner, site: str, *, keep_dir: str | None = None
) -> dict[str, Any]:
    """One site's SuperNode: pinned to the site, its data read-only, only the CA certificate and its own
    site's private key, no API token."""
    learning = spec.learning
    assert learning is not None
    labels = {**_labels(owner, ROLE_SUPERNODE), L.SITE_NAME: L.short_hash(site, length=16)}
    command = [
        "kiri", "flower-supernode",
        "--superlink", superlink_address(owner),
        "--root-certificates", f"{TLS_MOUNT}/ca.crt",
        "--auth-supernode-private-key", f"{NODE_KEY_MOUNT}/{PRIVATE_KEY_FILE}",
        "--node-config", node_config(site, allow_plain=not learning.secure_aggregation, keep_dir=keep_dir),
        "--isolation", "subprocess",
    ]  # fmt: skip
    mounts: list[dict[str, Any]] = [
        {"name": "site-data", "mountPath": SITE_DATA_MOUNT, "readOnly": True},
        {"name": "tls", "mountPath": TLS_MOUNT, "readOnly": True},
        {"name": "supernode-key", "mountPath": NODE_KEY_MOUNT, "readOnly": True},
        {"name": "tmp", "mountPath": "/tmp"},
    ]
    pod = B.pod_identity(
        spec,
        learning.trainer_service_account_name,
        {
            "automountServiceAccountToken": False,
            "nodeSelector": {**spec.edge.node_selector, learning.site_label: site},
            "tolerations": B.tolerations(spec.edge.tolerations),
            "containers": [container(spec, "supernode", command, mounts)],
            "volumes": [
                {"name": "site-data", "hostPath": {"path": learning.site_data_path, "type": "File"}},
                # Only the CA: a SuperNode can check the SuperLink, it cannot pretend to be it.
                {
                    "name": "tls",
                    "secret": {
                        "secretName": tls_secret_name(owner.name),
                        "items": [{"key": "ca.crt", "path": "ca.crt"}],
                    },
                },
                # Only its own site's private key: a SuperNode can prove which site it is, and no other.
                {
                    "name": "supernode-key",
                    "secret": {
                        "secretName": node_key_secret_name(owner.name, site),
                        "items": [{"key": PRIVATE_KEY_FILE, "path": PRIVATE_KEY_FILE}],
                        "defaultMode": 0o440,
                    },
                },
                {"name": "tmp", "emptyDir": {}},
            ],
        },
    )
    return B.finish(_deployment(supernode_name(owner.name, site), labels, pod), owner)


# --- perSite adapters of a language model: kept on the site, served to the site's own edge pods ---------------
SITE_STORE_PORT = 8080
KEPT_DIR = f"{B.CACHE_MOUNT}/site-adapters"
"""In a keeping SuperNode's pod: where the ClientApp keeps the site's adapters (`round-<NNNN>/`, and the
`round-<NNNN>.onnx_adapter` the edge loads), in this model's node cache directory (the chart's CSI driver)."""
KEPT_FILE = re.compile(r"^round-[0-9]{4}\.onnx_adapter$")
_STORE_RESOURCES = {"cpu": "100m", "memory": "128Mi"}


def site_store_url(owner: B.Owner, site: str, file: str) -> str:
    """Where a site's edge pods fetch an adapter its SuperNode kept (`file` matches KEPT_FILE)."""
    return f"http://{supernode_name(owner.name, site)}.{owner.namespace}.svc:{SITE_STORE_PORT}/{file}"


def keeping_supernode(spec: ModelDeploymentSpec, owner: B.Owner, site: str) -> list[dict[str, Any]]:
    """A perSite language model's SuperNode (Deployment + Service): the ClientApp keeps the site's adapters in
    the node cache, and a second container (`kiri store --read-only`, the volume mounted read-only) serves them
    to the site's edge pods through the Service. The adapters never go to the SuperLink or the artifact store."""
    node = supernode(spec, owner, site, keep_dir=KEPT_DIR)
    pod = node["spec"]["template"]["spec"]
    pod["volumes"].append(B.node_cache_volume(owner))
    pod["containers"][0]["volumeMounts"].append({"name": "cache", "mountPath": B.CACHE_MOUNT})
    store = container(
        spec,
        "adapters",
        [
            "kiri",
            "store",
            "--root",
            KEPT_DIR,
            "--read-only",
            "--host",
            "0.0.0.0",
            "--port",
            str(SITE_STORE_PORT),
        ],
        [{"name": "cache", "mountPath": B.CACHE_MOUNT, "readOnly": True}],
        flower_env=False,
    )
    store["resources"] = {"requests": dict(_STORE_RESOURCES), "limits": dict(_STORE_RESOURCES)}
    store["ports"] = [{"name": "adapters", "containerPort": SITE_STORE_PORT}]
    store["readinessProbe"] = {"httpGet": {"path": "/healthz", "port": SITE_STORE_PORT}, "periodSeconds": 10}
    pod["containers"].append(store)
    labels = dict(node["spec"]["template"]["metadata"]["labels"])
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": B._metadata(supernode_name(owner.name, site), labels),
        "spec": {
            "selector": labels,
            "ports": [{"name": "adapters", "port": SITE_STORE_PORT, "targetPort": SITE_STORE_PORT}],
        },
    }
    return [B.finish(node, owner), B.finish(service, owner)]
