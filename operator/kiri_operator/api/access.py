"""Who Kiri's pods run as and what they may read: service accounts, image pull secrets, store credentials.

Every reference here names an object in the ModelDeployment's own namespace and has no `namespace` field
at all: a tenant cannot point Kiri's pods at another namespace's Secret (the kubelet resolves a pod's
`secretKeyRef`, `configMap` and `imagePullSecrets` in the pod's namespace, so this is what Kubernetes does
anyway; the schema says it where a user reads it).
"""

from __future__ import annotations

from typing import Annotated

from pydantic import ConfigDict, Field, model_validator

from kiri_operator.api.bases import ApiModel, cel, cel_rules

# A DNS-1123 subdomain: the name of a Secret, a ConfigMap or a ServiceAccount.
DNS_SUBDOMAIN_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
# A Secret's or ConfigMap's data key.
DATA_KEY_PATTERN = r"^[-._a-zA-Z0-9]+$"
MAX_PULL_SECRETS = 8

ObjectName = Annotated[str, Field(min_length=1, max_length=253, pattern=DNS_SUBDOMAIN_PATTERN)]
ServiceAccountName = Annotated[str, Field(min_length=1, max_length=253, pattern=DNS_SUBDOMAIN_PATTERN)]

# The keys of a credentials Secret that reach the pods that fetch (each one optional), and the environment
# variable each becomes. The runtime's fetcher reads exactly these (runtime/kiri_runtime/fetching.py).
CREDENTIAL_KEYS = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_REGION",
    "AWS_ENDPOINT_URL",
    "KIRI_HTTP_BEARER_TOKEN",
    "KIRI_HTTP_USERNAME",
    "KIRI_HTTP_PASSWORD",
)


class LocalObjectReference(ApiModel):
    """An object in the ModelDeployment's own namespace (there is no namespace field)."""

    name: ObjectName
    """Name of the Secret (or ConfigMap) in the same namespace."""


class KeyReference(ApiModel):
    """One key of a ConfigMap or Secret in the ModelDeployment's own namespace."""

    name: ObjectName
    """Name of the object in the same namespace."""
    key: Annotated[str, Field(min_length=1, max_length=253, pattern=DATA_KEY_PATTERN)] = "ca.crt"
    """Key holding the PEM certificates."""


class CaBundle(ApiModel):
    """PEM CA certificates that fetching pods trust in addition to the public roots: for an HTTPS store
    (or S3 endpoint) behind a private CA. Mounted read-only; the runtime reads it from `KIRI_CA_FILE`."""

    model_config = ConfigDict(
        json_schema_extra=cel_rules(
            cel(
                "has(self.configMapKeyRef) != has(self.secretKeyRef)",
                "caBundle: set exactly one of caBundle.configMapKeyRef or caBundle.secretKeyRef",
            )
        )
    )

    config_map_key_ref: KeyReference | None = None
    """A ConfigMap key holding the bundle (a CA certificate is not a secret)."""
    secret_key_ref: KeyReference | None = None
    """A Secret key holding the bundle (e.g. the `ca.crt` of a cert-manager certificate)."""

    @model_validator(mode="after")
    def _one_source(self) -> CaBundle:
        if (self.config_map_key_ref is None) == (self.secret_key_ref is None):
            raise ValueError("caBundle: set exactly one of caBundle.configMapKeyRef or caBundle.secretKeyRef")
        return self


class StoreCredentials(ApiModel):
    """How the pods that fetch from an `s3://` or `http(s)://` store authenticate, the Kubernetes way.

    Without a Secret, `s3://` is fetched with the pod's identity: set the tier's `serviceAccountName` to a
    service account bound to a cloud role (EKS IRSA: the fetcher exchanges the projected token named by
    `AWS_WEB_IDENTITY_TOKEN_FILE` for credentials of `AWS_ROLE_ARN`), or unsigned for a public bucket."""

    secret_ref: LocalObjectReference | None = None
    """A Secret in the same namespace whose keys become the fetcher's environment, each optional:
    `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`, `AWS_REGION`, `AWS_ENDPOINT_URL`
    (s3://, SigV4); `KIRI_HTTP_BEARER_TOKEN`, or `KIRI_HTTP_USERNAME` and `KIRI_HTTP_PASSWORD` (http(s)://,
    sent as `Authorization`, never across a redirect to another host). Other keys are not read."""
    ca_bundle: CaBundle | None = None
    """Extra CA certificates to trust for this store."""
