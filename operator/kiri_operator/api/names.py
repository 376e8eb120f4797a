"""Identity of the ModelDeployment resource: group, version, kind and the names kubectl knows."""

from __future__ import annotations

from typing import Final

GROUP: Final = "kiri.dev"
VERSION: Final = "v1alpha1"
API_VERSION: Final = f"{GROUP}/{VERSION}"
KIND: Final = "ModelDeployment"
LIST_KIND: Final = "ModelDeploymentList"
PLURAL: Final = "modeldeployments"
SINGULAR: Final = "modeldeployment"
# `md` is Cluster API's MachineDeployment (and kubectl would pick one of the two): `mdep` collides with
# no common CRD.
SHORT_NAMES: Final = ("mdep",)
CATEGORIES: Final = ("kiri",)
CRD_NAME: Final = f"{PLURAL}.{GROUP}"
