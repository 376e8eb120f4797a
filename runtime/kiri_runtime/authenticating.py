"""AWS credentials for the fetcher's S3 requests, found the way the AWS SDKs' default chain finds them (the
part of it that pods use), without the SDK (~60 lines against a 100 MB dependency in an edge image):

1. `AWS_ACCESS_KEY_ID` + `AWS_SECRET_ACCESS_KEY` (+ `AWS_SESSION_TOKEN`): what a ModelDeployment's
   `credentials.secretRef` puts in the environment;
2. web identity, as EKS IRSA sets it up (`AWS_ROLE_ARN`, `AWS_WEB_IDENTITY_TOKEN_FILE`, optionally
   `AWS_ROLE_SESSION_NAME`): the service account's projected token is exchanged with STS
   `AssumeRoleWithWebIdentity` (an unsigned call) at `AWS_ENDPOINT_URL_STS`, `AWS_ENDPOINT_URL` or the
   regional STS endpoint;
3. container credentials, as EKS Pod Identity sets them up (`AWS_CONTAINER_CREDENTIALS_FULL_URI`, with
   `AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE` or `AWS_CONTAINER_AUTHORIZATION_TOKEN`);
4. none: requests go unsigned (a public bucket).

Temporary credentials are kept until five minutes before they expire; the token file is read at each
exchange, so the kubelet's rotation of the projected token is picked up.
"""

from __future__ import annotations

import threading
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx

REFRESH_BEFORE = timedelta(minutes=5)
_STS_NS = "{https://sts.amazonaws.com/doc/2011-06-15/}"


class CredentialsError(Exception):
    """Credentials were configured but could not be obtained (the message names the source, not secrets)."""


@dataclass(frozen=True)
class AwsCredentials:
    access_key: str
    secret_key: str
    session_token: str | None = None
    expires: datetime | None = None
    source: str = "environment"
    """Where they came from, by variable names: for error messages."""

    def fresh(self, now: datetime) -> bool:
        return self.expires is None or now < self.expires - REFRESH_BEFORE


def _parse_time(text: str | None) -> datetime | None:
    if not text:
        return None
    parsed = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


class AwsCredentialChain:
    """The first source the environment configures; temporary credentials cached until near expiry."""

    def __init__(self, env: dict[str, str], client: httpx.Client) -> None:
        self._env = env
        self._client = client
        self._cached: AwsCredentials | None = None
        self._lock = threading.Lock()

    def source(self) -> str | None:
        """Which source the environment configures (variable names), or None: unsigned."""
        env = self._env
        if env.get("AWS_ACCESS_KEY_ID") and env.get("AWS_SECRET_ACCESS_KEY"):
            return "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY"
        if env.get("AWS_ROLE_ARN") and env.get("AWS_WEB_IDENTITY_TOKEN_FILE"):
            return "AWS_ROLE_ARN/AWS_WEB_IDENTITY_TOKEN_FILE (web identity)"
        if env.get("AWS_CONTAINER_CREDENTIALS_FULL_URI"):
            return "AWS_CONTAINER_CREDENTIALS_FULL_URI (container credentials)"
        return None

    def get(self) -> AwsCredentials | None:
        env = self._env
        access, secret = env.get("AWS_ACCESS_KEY_ID"), env.get("AWS_SECRET_ACCESS_KEY")
        if access and secret:
            return AwsCredentials(access, secret, env.get("AWS_SESSION_TOKEN") or None)
        source = self.source()
        if source is None:
            return None
        with self._lock:
            now = datetime.now(UTC)
            if self._cached is None or not self._cached.fresh(now):
                if env.get("AWS_ROLE_ARN") and env.get("AWS_WEB_IDENTITY_TOKEN_FILE"):
                    self._cached = self._web_identity(source)
                else:
                    self._cached = self._container(source)
            return self._cached

    def _web_identity(self, source: str) -> AwsCredentials:
        env = self._env
        token_file = env["AWS_WEB_IDENTITY_TOKEN_FILE"]
        try:
            token = Path(token_file).read_text().strip()
        except OSError as exc:
            raise CredentialsError(f"{source}: cannot read {token_file}: {exc.strerror}") from None
        region = env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or "us-east-1"
        endpoint = (
            env.get("AWS_ENDPOINT_URL_STS")
            or env.get("AWS_ENDPOINT_URL")
            or f"https://sts.{region}.amazonaws.com"
        )
        form = {
            "Action": "AssumeRoleWithWebIdentity",
            "Version": "2011-06-15",
            "RoleArn": env["AWS_ROLE_ARN"],
            "RoleSessionName": env.get("AWS_ROLE_SESSION_NAME") or "kiri-fetch",
            "WebIdentityToken": token,
        }
        try:
            reply = self._client.post(endpoint.rstrip("/") + "/", data=form)
        except httpx.HTTPError as exc:
            raise CredentialsError(f"{source}: STS unreachable: {type(exc).__name__}") from None
        if reply.status_code != 200:
            raise CredentialsError(f"{source}: STS answered HTTP {reply.status_code}")
        try:
            creds = ET.fromstring(reply.content).find(f".//{_STS_NS}Credentials")
            if creds is None:
                raise ValueError("no Credentials element")

            def field(name: str) -> str:
                text = creds.findtext(f"{_STS_NS}{name}")
                if not text:
                    raise ValueError(f"no {name}")
                return text

            return AwsCredentials(
                field("AccessKeyId"),
                field("SecretAccessKey"),
                field("SessionToken"),
                _parse_time(creds.findtext(f"{_STS_NS}Expiration")),
                source,
            )
        except (ET.ParseError, ValueError) as exc:
            raise CredentialsError(f"{source}: unreadable STS answer: {exc}") from None

    def _container(self, source: str) -> AwsCredentials:
        env = self._env
        headers = {}
        token = env.get("AWS_CONTAINER_AUTHORIZATION_TOKEN")
        token_file = env.get("AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE")
        if token_file:
            try:
                token = Path(token_file).read_text().strip()
            except OSError as exc:
                raise CredentialsError(f"{source}: cannot read {token_file}: {exc.strerror}") from None
        if token:
            headers["Authorization"] = token
        try:
            reply = self._client.get(env["AWS_CONTAINER_CREDENTIALS_FULL_URI"], headers=headers)
        except httpx.HTTPError as exc:
            raise CredentialsError(f"{source}: unreachable: {type(exc).__name__}") from None
        if reply.status_code != 200:
            raise CredentialsError(f"{source}: answered HTTP {reply.status_code}")
        try:
            body = reply.json()
            return AwsCredentials(
                str(body["AccessKeyId"]),
                str(body["SecretAccessKey"]),
                body.get("Token") or None,
                _parse_time(body.get("Expiration")),
                source,
            )
        except (ValueError, KeyError, TypeError) as exc:
            raise CredentialsError(f"{source}: unreadable answer: {type(exc).__name__}") from None
