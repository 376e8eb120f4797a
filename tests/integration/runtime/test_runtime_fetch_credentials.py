"""Store credentials the Kubernetes way, against real servers that demand them.

- An HTTPS store behind a private CA (made here with the openssl CLI) that answers 401 without the right
  `Authorization`: the fetcher trusts the CA only through `KIRI_CA_FILE`, sends a bearer token or basic
  auth from the environment (what the operator wires from `credentials.secretRef`), never logs it, and
  never forwards it to another host on a redirect.
- An S3-compatible server (moto) with IAM enforcement on: without keys, or with a wrong secret, the fetch
  fails at once with HTTP 403 and says whether keys were sent; with the Secret's keys it succeeds.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
from test_runtime_fetch import MOTO, _free_port

from kiri_runtime import redaction
from kiri_runtime.fetching import ArtifactCache, ArtifactFetcher, FetchError, RetryPolicy

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]

PAYLOAD = os.urandom(256 * 1024 + 3)
DIGEST = hashlib.sha256(PAYLOAD).hexdigest()
TOKEN = "kiri-test-bearer-0123456789abcdef"
USER, PASSWORD = "edge-reader", "kiri-test-password-42"


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture(scope="module")
def private_ca(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A CA and a server certificate for 127.0.0.1 that it signed; neither is in any public bundle."""
    d = tmp_path_factory.mktemp("ca")
    _openssl(
        "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.crt",
        "-days", "2", "-subj", "/CN=Kiri Test Private CA",
        "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        cwd=d,
    )  # fmt: skip
    _openssl(
        "req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out", "server.csr",
        "-subj", "/CN=127.0.0.1", cwd=d,
    )  # fmt: skip
    (d / "ext.cnf").write_text(
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\n"
        "keyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n"
        "authorityKeyIdentifier=keyid,issuer\nsubjectKeyIdentifier=hash\n"
    )
    _openssl(
        "x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
        "-out", "server.crt", "-days", "2", "-extfile", "ext.cnf", cwd=d,
    )  # fmt: skip
    return {"ca": d / "ca.crt", "cert": d / "server.crt", "key": d / "server.key"}


class Seen:
    """What each server received."""

    def __init__(self) -> None:
        self.authorizations: list[str | None] = []


def _serve(handler: type[BaseHTTPRequestHandler], tls: dict[str, Path] | None) -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    scheme = "http"
    if tls is not None:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(tls["cert"], tls["key"])
        server.socket = context.wrap_socket(server.socket, server_side=True)
        scheme = "https"
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"{scheme}://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def elsewhere() -> Iterator[tuple[str, Seen]]:
    """Another host (another origin): records what reaches it and serves the payload to anyone."""
    seen = Seen()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def do_GET(self) -> None:
            seen.authorizations.append(self.headers.get("Authorization"))
            self.send_response(200)
            self.send_header("Content-Length", str(len(PAYLOAD)))
            self.end_headers()
            self.wfile.write(PAYLOAD)

    for url in _serve(Handler, None):
        yield url, seen


@pytest.fixture
def store(private_ca: dict[str, Path], elsewhere: tuple[str, Seen]) -> Iterator[tuple[str, Seen]]:
    """HTTPS behind the private CA: 401 unless `Bearer TOKEN` or `Basic USER:PASSWORD`; `/away` redirects
    (authorized) to the other host."""
    seen = Seen()
    accepted = {f"Bearer {TOKEN}", "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()}
    other = elsewhere[0]

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def do_GET(self) -> None:
            given = self.headers.get("Authorization")
            seen.authorizations.append(given)
            if given not in accepted:
                self.send_response(401)
                self.send_header("WWW-Authenticate", 'Bearer realm="kiri-test"')
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            if self.path == "/away":
                self.send_response(302)
                self.send_header("Location", f"{other}/model.onnx")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(200)
            self.send_header("Content-Length", str(len(PAYLOAD)))
            self.end_headers()
            self.wfile.write(PAYLOAD)

    for url in _serve(Handler, private_ca):
        yield url, seen


def _fetcher(tmp_path: Path, env: dict[str, str]) -> ArtifactFetcher:
    return ArtifactFetcher(
        ArtifactCache(tmp_path / "cache"), RetryPolicy(attempts=1), sleep=lambda s: None, env=env
    )


def test_https_store_behind_a_private_ca_is_refused_until_kiri_ca_file_names_the_ca(
    store: tuple[str, Seen], private_ca: dict[str, Path], tmp_path: Path
) -> None:
    url, seen = store
    with pytest.raises(FetchError, match="CERTIFICATE_VERIFY_FAILED"):
        _fetcher(tmp_path, {"KIRI_HTTP_BEARER_TOKEN": TOKEN}).fetch(f"{url}/model.onnx", DIGEST)
    assert seen.authorizations == []  # the TLS handshake failed: the token never left the process
    env = {"KIRI_HTTP_BEARER_TOKEN": TOKEN, "KIRI_CA_FILE": str(private_ca["ca"])}
    assert _fetcher(tmp_path, env).fetch(f"{url}/model.onnx", DIGEST).read_bytes() == PAYLOAD
    assert seen.authorizations == [f"Bearer {TOKEN}"]


def test_https_store_without_credentials_fails_at_once_with_401_saying_none_were_sent(
    store: tuple[str, Seen], private_ca: dict[str, Path], tmp_path: Path
) -> None:
    url, seen = store
    fetcher = _fetcher(tmp_path, {"KIRI_CA_FILE": str(private_ca["ca"])})
    fetcher.policy = RetryPolicy(attempts=5)
    with pytest.raises(FetchError) as info:
        fetcher.fetch(f"{url}/model.onnx", DIGEST)
    assert str(info.value) == (
        f"{url}/model.onnx: HTTP 401: no credentials were sent (set KIRI_HTTP_BEARER_TOKEN(_FILE) or "
        "KIRI_HTTP_USERNAME/KIRI_HTTP_PASSWORD, e.g. with the spec's credentials.secretRef)"
    )
    assert seen.authorizations == [None]  # a 4xx is not retried


def test_https_store_with_a_wrong_token_says_the_credentials_were_refused(
    store: tuple[str, Seen], private_ca: dict[str, Path], tmp_path: Path
) -> None:
    url, _ = store
    env = {"KIRI_CA_FILE": str(private_ca["ca"]), "KIRI_HTTP_BEARER_TOKEN": "not-the-token"}
    with pytest.raises(FetchError, match=r"HTTP 401: the store refused the credentials in KIRI_HTTP_BEARER"):
        _fetcher(tmp_path, env).fetch(f"{url}/model.onnx", DIGEST)


@pytest.mark.parametrize("how", ["token-file", "basic"])
def test_https_store_accepts_a_token_file_or_basic_auth(
    how: str, store: tuple[str, Seen], private_ca: dict[str, Path], tmp_path: Path
) -> None:
    url, seen = store
    env = {"KIRI_CA_FILE": str(private_ca["ca"])}
    if how == "token-file":
        (tmp_path / "token").write_text(TOKEN + "\n")
        env["KIRI_HTTP_BEARER_TOKEN_FILE"] = str(tmp_path / "token")
    else:
        env.update(KIRI_HTTP_USERNAME=USER, KIRI_HTTP_PASSWORD=PASSWORD)
    assert _fetcher(tmp_path, env).fetch(f"{url}/model.onnx", DIGEST).read_bytes() == PAYLOAD
    assert len(seen.authorizations) == 1 and seen.authorizations[0] is not None


def test_credentials_reach_no_log_and_no_other_host(
    store: tuple[str, Seen],
    elsewhere: tuple[str, Seen],
    private_ca: dict[str, Path],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    url, seen = store
    redaction.install()
    caplog.set_level(logging.DEBUG)
    env = {"KIRI_CA_FILE": str(private_ca["ca"]), "KIRI_HTTP_BEARER_TOKEN": TOKEN}
    # Redirected (by the authorized store) to another origin: the token stays behind.
    assert _fetcher(tmp_path, env).fetch(f"{url}/away", DIGEST).read_bytes() == PAYLOAD
    assert seen.authorizations == [f"Bearer {TOKEN}"]
    assert elsewhere[1].authorizations == [None]
    # A refused token is not echoed either.
    with pytest.raises(FetchError) as info:
        _fetcher(tmp_path / "b", {**env, "KIRI_HTTP_BEARER_TOKEN": TOKEN + "x"}).fetch(f"{url}/m2", "1" * 64)
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "httpx" in {r.name for r in caplog.records}  # httpx did log the requests
    assert TOKEN not in logged and TOKEN not in str(info.value)
    assert base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode() not in logged


# --- S3 with IAM enforced ------------------------------------------------------------------------------

MOTO_PYTHON = MOTO.parent / "python"
# The setup's first three calls (user, policy, key) are unauthenticated; from the fourth on moto checks
# every request against IAM, as S3 does.
_SETUP = """
import boto3, json, sys
kw = dict(endpoint_url=sys.argv[1], region_name="us-east-1")
iam = boto3.client("iam", aws_access_key_id="setup", aws_secret_access_key="setup", **kw)
iam.create_user(UserName="edge-reader")
iam.put_user_policy(UserName="edge-reader", PolicyName="read", PolicyDocument=json.dumps(
    {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}))
key = iam.create_access_key(UserName="edge-reader")["AccessKey"]
s3 = boto3.client("s3", aws_access_key_id=key["AccessKeyId"], aws_secret_access_key=key["SecretAccessKey"], **kw)
s3.create_bucket(Bucket="models")
s3.put_object(Bucket="models", Key="clf/v1/model.onnx", Body=open(sys.argv[2], "rb").read())
print(json.dumps({"id": key["AccessKeyId"], "secret": key["SecretAccessKey"]}))
"""


@pytest.fixture
def s3_with_iam(tmp_path: Path) -> Iterator[tuple[str, dict[str, str]]]:
    if not MOTO.exists():
        (pytest.fail if os.environ.get("CI") else pytest.skip)(
            f"no S3-compatible server: {MOTO} is absent (run hack/install-test-servers.sh)"
        )
    port = _free_port()
    proc = subprocess.Popen(
        [str(MOTO), "-H", "127.0.0.1", "-p", str(port)],
        env={**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "3"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                httpx.get(f"{url}/moto-api/")
                break
            except httpx.TransportError:
                time.sleep(0.1)
        (tmp_path / "payload").write_bytes(PAYLOAD)
        out = subprocess.run(
            [str(MOTO_PYTHON), "-c", _SETUP, url, str(tmp_path / "payload")],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        key = json.loads(out)
        yield url, {"AWS_ACCESS_KEY_ID": key["id"], "AWS_SECRET_ACCESS_KEY": key["secret"]}
    finally:
        proc.terminate()
        proc.wait(10)


def test_s3_store_demanding_credentials_fails_with_403_without_them_and_succeeds_with_the_secrets_keys(
    s3_with_iam: tuple[str, dict[str, str]], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    url, keys = s3_with_iam
    base = {"AWS_ENDPOINT_URL": url, "AWS_REGION": "us-east-1"}
    uri = "s3://models/clf/v1/model.onnx"
    with pytest.raises(FetchError) as info:
        _fetcher(tmp_path / "a", base).fetch(uri, DIGEST)
    assert str(info.value) == (
        f"{url}/models/clf/v1/model.onnx: HTTP 403: no credentials were sent (give the pod "
        "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY with the spec's credentials.secretRef, or a service account "
        "bound to a cloud role)"
    )
    wrong = {**base, **keys, "AWS_SECRET_ACCESS_KEY": "not-the-secret"}
    with pytest.raises(
        FetchError, match="HTTP 403: the store refused the credentials from AWS_ACCESS_KEY_ID"
    ):
        _fetcher(tmp_path / "b", wrong).fetch(uri, DIGEST)
    redaction.install()
    caplog.set_level(logging.DEBUG)
    path = _fetcher(tmp_path / "c", {**base, **keys}).fetch(uri, DIGEST)
    assert path.read_bytes() == PAYLOAD
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert keys["AWS_SECRET_ACCESS_KEY"] not in logged


# --- S3 through the pod's identity (EKS IRSA, EKS Pod Identity) -----------------------------------------

# Four unauthenticated setup calls, then the fetcher's unsigned STS exchange is the fifth and last request
# moto lets through unchecked (an unsigned AssumeRoleWithWebIdentity is refused by moto's checks, not by
# AWS's); every later request, the fetcher's GET included, must carry credentials IAM knows.
_ROLE_SETUP = """
import boto3, json, sys
kw = dict(endpoint_url=sys.argv[1], region_name="us-east-1", aws_access_key_id="setup", aws_secret_access_key="setup")
iam = boto3.client("iam", **kw)
iam.create_role(RoleName="edge-reader", AssumeRolePolicyDocument="{}")
iam.put_role_policy(RoleName="edge-reader", PolicyName="read", PolicyDocument=json.dumps(
    {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}))
s3 = boto3.client("s3", **kw)
s3.create_bucket(Bucket="models")
s3.put_object(Bucket="models", Key="clf/v1/model.onnx", Body=open(sys.argv[2], "rb").read())
"""


def _moto(no_auth_requests: int) -> tuple[subprocess.Popen[bytes], str]:
    if not MOTO.exists():
        (pytest.fail if os.environ.get("CI") else pytest.skip)(
            f"no S3-compatible server: {MOTO} is absent (run hack/install-test-servers.sh)"
        )
    port = _free_port()
    proc = subprocess.Popen(
        [str(MOTO), "-H", "127.0.0.1", "-p", str(port)],
        env={**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": str(no_auth_requests)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            httpx.get(f"{url}/moto-api/")
            break
        except httpx.TransportError:
            time.sleep(0.1)
    return proc, url


def test_s3_through_irsa_web_identity_exchanges_the_projected_token_and_signs_with_the_role(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    proc, url = _moto(no_auth_requests=5)
    try:
        (tmp_path / "payload").write_bytes(PAYLOAD)
        subprocess.run([str(MOTO_PYTHON), "-c", _ROLE_SETUP, url, str(tmp_path / "payload")], check=True)
        (tmp_path / "token").write_text("eyJhbGciOiJSUzI1NiJ9.projected-service-account-token.sig\n")
        env = {
            "AWS_ENDPOINT_URL": url,
            "AWS_REGION": "us-east-1",
            # What the EKS pod identity webhook injects for a service account annotated with a role.
            "AWS_ROLE_ARN": "arn:aws:iam::123456789012:role/edge-reader",
            "AWS_WEB_IDENTITY_TOKEN_FILE": str(tmp_path / "token"),
        }
        redaction.install()
        caplog.set_level(logging.DEBUG)
        fetcher = _fetcher(tmp_path / "a", env)
        assert fetcher.fetch("s3://models/clf/v1/model.onnx", DIGEST).read_bytes() == PAYLOAD
        # IAM is enforced by now: the same object unsigned is refused.
        with pytest.raises(FetchError, match="HTTP 403: no credentials were sent"):
            _fetcher(tmp_path / "b", {"AWS_ENDPOINT_URL": url}).fetch("s3://models/clf/v1/model.onnx", DIGEST)
        logged = "\n".join(r.getMessage() for r in caplog.records)
        assert "projected-service-account-token" not in logged
    finally:
        proc.terminate()
        proc.wait(10)


def test_s3_through_eks_pod_identity_takes_the_agents_credentials(
    s3_with_iam: tuple[str, dict[str, str]], tmp_path: Path
) -> None:
    url, keys = s3_with_iam
    seen: list[str | None] = []

    class Agent(BaseHTTPRequestHandler):
        """The EKS Pod Identity agent's answer (its link-local endpoint, here on 127.0.0.1)."""

        def log_message(self, *args: object) -> None:
            pass

        def do_GET(self) -> None:
            seen.append(self.headers.get("Authorization"))
            body = json.dumps(
                {
                    "AccessKeyId": keys["AWS_ACCESS_KEY_ID"],
                    "SecretAccessKey": keys["AWS_SECRET_ACCESS_KEY"],
                    "Token": None,
                    "Expiration": "2099-01-01T00:00:00Z",
                }
            ).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    (tmp_path / "agent-token").write_text("pod-identity-token\n")
    for agent in _serve(Agent, None):
        env = {
            "AWS_ENDPOINT_URL": url,
            "AWS_CONTAINER_CREDENTIALS_FULL_URI": f"{agent}/v1/credentials",
            "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE": str(tmp_path / "agent-token"),
        }
        fetcher = _fetcher(tmp_path / "a", env)
        assert fetcher.fetch("s3://models/clf/v1/model.onnx", DIGEST).read_bytes() == PAYLOAD
    assert seen == ["pod-identity-token"]
