"""Kiri's Kubernetes API client, as kopf keeps its own: the client, the credentials it logs in with, and
the errors either may raise. The kinds it knows are `kiri_operator.kinds` (plain data the pure planning
reads too). Only this package talks to the API server.
"""

from kiri_operator.kube.client import Kube, http_client
from kiri_operator.kube.credentials import Credentials
from kiri_operator.kube.errors import CredentialsError, KubeError
from kiri_operator.kube.loading import load as load_credentials

__all__ = ["Credentials", "CredentialsError", "Kube", "KubeError", "http_client", "load_credentials"]
