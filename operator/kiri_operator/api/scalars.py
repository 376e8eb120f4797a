"""Constrained scalar types shared by the spec and status models.

Each type carries its own validation twice: as a pydantic constraint (so the operator and the unit tests
reject bad values without a cluster) and as the OpenAPI/CEL fragment the generator copies into the CRD
(so the API server rejects them before they are stored). Keeping both on one annotation keeps them in step.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Annotated, Any

from pydantic import AfterValidator, BeforeValidator, Field, PlainSerializer, WithJsonSchema

# Schemes the artifact fetcher understands; anything else would only fail later, on a node, mid-rollout.
URI_SCHEMES = ("file", "http", "https", "s3", "pvc")
URI_PATTERN = r"^(file|https?|s3|pvc)://[^\s]+$"
SHA256_PATTERN = r"^[a-fA-F0-9]{64}$"
# The Kubernetes resource.Quantity grammar.
QUANTITY_PATTERN = r"^(\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))(([KMGTPE]i)|[numkMGTPE]|([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$"
DNS_LABEL_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
# A qualified label key: optional DNS-subdomain prefix, then a name.
LABEL_KEY_PATTERN = r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$"
SHA256_MESSAGE = "must be a sha256 digest: exactly 64 hexadecimal characters"
PERCENT_PATTERN = r"^(100|[1-9]?[0-9])%$"
MAX_URI_LENGTH = 2048
URI_MESSAGE = (
    "must be a URI with scheme file://, http://, https://, s3:// or pvc:// (got another scheme or none)"
)


def _check_pattern(pattern: str, what: str) -> Any:
    compiled = re.compile(pattern)

    def check(value: str) -> str:
        if not compiled.match(value):
            raise ValueError(f"{what} (got {value!r})")
        return value

    return AfterValidator(check)


def _cel(rule: str, message: str) -> dict[str, Any]:
    return {"x-kubernetes-validations": [{"rule": rule, "message": message}]}


Uri = Annotated[
    str,
    Field(
        min_length=1,
        max_length=MAX_URI_LENGTH,
        json_schema_extra=_cel(f"self.matches(r'{URI_PATTERN}')", URI_MESSAGE),
    ),
    _check_pattern(URI_PATTERN, URI_MESSAGE),
]
"""An artifact location in one of the schemes the fetcher supports."""

Sha256 = Annotated[
    str,
    Field(
        max_length=64,
        json_schema_extra=_cel(f"self.matches(r'{SHA256_PATTERN}')", SHA256_MESSAGE),
    ),
    _check_pattern(SHA256_PATTERN, SHA256_MESSAGE),
]

DnsLabel = Annotated[
    str,
    Field(min_length=1, max_length=63, pattern=DNS_LABEL_PATTERN),
]

LabelKey = Annotated[str, Field(min_length=1, max_length=317, pattern=LABEL_KEY_PATTERN)]


def _quantity_to_str(value: Any) -> Any:
    # YAML authors write `cpu: 2`; Kubernetes accepts both, so the model does too and keeps the string.
    if isinstance(value, bool):
        return value
    if isinstance(value, int | float):
        return str(value)
    return value


Quantity = Annotated[
    str,
    BeforeValidator(_quantity_to_str),
    _check_pattern(QUANTITY_PATTERN, "must be a Kubernetes quantity such as 500m, 2 or 4Gi"),
    WithJsonSchema(
        {
            "x-kubernetes-int-or-string": True,
            **_cel(
                "type(self) == int ? self >= 0 : isQuantity(self)",
                "must be a Kubernetes quantity such as 500m, 2 or 4Gi",
            ),
        }
    ),
]


def _percent_or_int(value: Any) -> Any:
    if isinstance(value, str) and not re.match(PERCENT_PATTERN, value):
        raise ValueError(f"must be a non-negative integer or a percentage such as '25%' (got {value!r})")
    if isinstance(value, int) and not isinstance(value, bool) and value < 0:
        raise ValueError(f"must be a non-negative integer or a percentage such as '25%' (got {value!r})")
    return value


IntOrPercent = Annotated[
    int | str,
    AfterValidator(_percent_or_int),
    WithJsonSchema(
        {
            "x-kubernetes-int-or-string": True,
            **_cel(
                f"type(self) == string ? self.matches(r'{PERCENT_PATTERN}') : self >= 0",
                "must be a non-negative integer or a percentage between 0% and 100%",
            ),
        }
    ),
]


TIME_FORMAT = "%Y-%m-%dT%H:%M:%SZ"
"""metav1.Time on the wire: RFC 3339 in UTC, second precision. Kiri's one time codec is the two functions below."""


def format_time(value: datetime) -> str:
    """A time as the API stores it; a naive time is taken as UTC."""
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value.astimezone(UTC).strftime(TIME_FORMAT)


def parse_time(value: str) -> datetime:
    """The inverse of `format_time` (ValueError on anything else)."""
    return datetime.strptime(value, TIME_FORMAT).replace(tzinfo=UTC)


Timestamp = Annotated[
    datetime,
    PlainSerializer(format_time, return_type=str),
    WithJsonSchema({"type": "string", "format": "date-time"}),
]
"""RFC 3339 in UTC with second precision, the metav1.Time wire format."""
