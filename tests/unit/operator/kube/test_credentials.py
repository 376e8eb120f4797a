"""kiri_operator.kube.loading and .credentials: kubeconfigs read as kubectl reads them, the service account, exec plugins."""

from __future__ import annotations

import base64
import json
import os
import shutil
import ssl
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from kiri_operator.kube import Credentials, CredentialsError, credentials, loading

TOKEN = "s3cr3t-t0ken-value"


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@pytest.fixture(scope="module")
def pem(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    """A self-signed certificate and its key: serves as CA and as client certificate."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is needed to make a test certificate")
    d = tmp_path_factory.mktemp("pem")
    key, cert = str(d / "key.pem"), str(d / "cert.pem")
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    out = ["-keyout", key, "-out", cert, "-subj", "/CN=kiri-test", "-days", "1"]
    subprocess.run(["openssl", "req", "-x509", *ec, *out], check=True, capture_output=True)
    return {"cert": (d / "cert.pem").read_bytes(), "key": (d / "key.pem").read_bytes()}


def kubeconfig(
    *,
    current: str | None = "dev",
    contexts: dict[str, dict[str, Any]] | None = None,
    clusters: dict[str, dict[str, Any]] | None = None,
    users: dict[str, dict[str, Any]] | None = None,
) -> dict[str, Any]:
    doc: dict[str, Any] = {"apiVersion": "v1", "kind": "Config"}
    if current is not None:
        doc["current-context"] = current
    doc["contexts"] = [{"name": n, "context": c} for n, c in (contexts or {}).items()]
    doc["clusters"] = [{"name": n, "cluster": c} for n, c in (clusters or {}).items()]
    doc["users"] = [{"name": n, "user": u} for n, u in (users or {}).items()]
    return doc


def write(path: Path, doc: dict[str, Any] | str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(doc if isinstance(doc, str) else yaml.safe_dump(doc))
    return path


def simple(user: dict[str, Any], cluster: dict[str, Any] | None = None, **context: Any) -> dict[str, Any]:
    return kubeconfig(
        contexts={"dev": {"cluster": "c", "user": "u", **context}},
        clusters={"c": cluster or {"server": "https://127.0.0.1:6443"}},
        users={"u": user},
    )


def test_token_and_ca_data(tmp_path: Path, pem: dict[str, bytes]) -> None:
    cfg = simple(
        {"token": TOKEN},
        {"server": "https://10.0.0.1:6443", "certificate-authority-data": b64(pem["cert"])},
        namespace="shop",
    )
    got = loading.from_kubeconfig(write(tmp_path / "config", cfg))
    assert got.server == "https://10.0.0.1:6443"
    assert got.ca_data == pem["cert"] and got.ca_path is None
    assert got.token == TOKEN and got.authorization() == f"Bearer {TOKEN}"
    assert got.default_namespace == "shop"
    assert not got.refreshable and not got.stale()
    context = got.ssl_context()
    assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname
    assert TOKEN not in repr(got)


def test_insecure_and_basic_auth(tmp_path: Path) -> None:
    cfg = simple(
        {"username": "admin", "password": "pw"},
        {"server": "https://h:6443", "insecure-skip-tls-verify": True},
    )
    got = loading.from_kubeconfig(write(tmp_path / "config", cfg))
    assert got.insecure and got.default_namespace is None
    assert got.authorization() == "Basic " + b64(b"admin:pw")
    assert got.ssl_context().verify_mode == ssl.CERT_NONE
    assert "pw" not in repr(got)


@pytest.mark.parametrize("memfd", [True, False], ids=["in-memory", "private-temp-dir"])
def test_client_certificate_data(
    tmp_path: Path, pem: dict[str, bytes], memfd: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = simple({"client-certificate-data": b64(pem["cert"]), "client-key-data": b64(pem["key"])})
    got = loading.from_kubeconfig(write(tmp_path / "config", cfg))
    assert got.certificate_data == pem["cert"] and got.private_key_data == pem["key"]
    assert got.authorization() is None
    modes: list[int] = []
    if not memfd:
        monkeypatch.delattr(os, "memfd_create", raising=False)
        monkeypatch.setattr(credentials.tempfile, "tempdir", str(tmp_path / "tmp"))
        (tmp_path / "tmp").mkdir()
        real_open = os.open

        def spy(path: str, flags: int, mode: int = 0o777, **kwargs: Any) -> int:
            if flags & os.O_CREAT:
                modes.append(mode)
            return real_open(path, flags, mode, **kwargs)

        monkeypatch.setattr(credentials.os, "open", spy)
    got.ssl_context()  # loads the pair, or raises
    if not memfd:
        assert modes == [0o600, 0o600]
        assert list((tmp_path / "tmp").iterdir()) == []  # the key did not stay on disk


def test_client_certificate_that_does_not_load(tmp_path: Path, pem: dict[str, bytes]) -> None:
    cfg = simple({"client-certificate-data": b64(pem["cert"]), "client-key-data": b64(b"not a key")})
    got = loading.from_kubeconfig(write(tmp_path / "config", cfg))
    with pytest.raises(CredentialsError, match="client certificate and key of context 'dev'") as err:
        got.ssl_context()
    assert "not a key" not in str(err.value)


def test_relative_paths_are_relative_to_the_kubeconfig(
    tmp_path: Path, pem: dict[str, bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    home = tmp_path / "kube"
    (home / "pki").mkdir(parents=True)
    (home / "pki" / "ca.crt").write_bytes(pem["cert"])
    (home / "pki" / "client.crt").write_bytes(pem["cert"])
    (home / "pki" / "client.key").write_bytes(pem["key"])
    (home / "token").write_text(TOKEN + "\n")
    cfg = simple(
        {"client-certificate": "pki/client.crt", "client-key": "pki/client.key", "tokenFile": "token"},
        {"server": "https://h:6443", "certificate-authority": "pki/ca.crt"},
    )
    path = write(home / "config", cfg)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    got = loading.from_kubeconfig(path)
    assert got.ca_path == str(home / "pki" / "ca.crt")
    assert got.certificate_data == pem["cert"] and got.private_key_data == pem["key"]
    assert got.token == TOKEN and got.token_path == str(home / "token")
    got.ssl_context()
    # A token file is read again once a minute: it rotates.
    (home / "token").write_text("rotated")
    assert not got.stale(now=got.read_at + 1) and got.stale(now=got.read_at + 61)
    assert got.refreshed().token == "rotated"


def test_missing_referenced_file_names_it(tmp_path: Path) -> None:
    cfg = simple({"token": TOKEN}, {"server": "https://h", "certificate-authority": "nope/ca.crt"})
    with pytest.raises(CredentialsError, match=r"cluster 'c' in .*config: .*nope/ca.crt does not exist"):
        loading.from_kubeconfig(write(tmp_path / "config", cfg))


def test_kubeconfig_list_is_merged_first_wins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = write(
        tmp_path / "a" / "config",
        kubeconfig(
            current=None,
            contexts={"dev": {"cluster": "c", "user": "u", "namespace": "from-a"}},
            users={"u": {"token": TOKEN}},
        ),
    )
    second = write(
        tmp_path / "b" / "config",
        kubeconfig(
            current="dev",
            contexts={"dev": {"cluster": "other", "user": "nobody", "namespace": "from-b"}},
            clusters={"c": {"server": "https://from-b:6443"}},
            users={"u": {"token": "not-this-one"}},
        ),
    )
    missing = tmp_path / "missing" / "config"
    monkeypatch.setenv("KUBECONFIG", os.pathsep.join([str(first), str(missing), str(second)]))
    got = loading.from_kubeconfig()
    assert got.server == "https://from-b:6443"
    assert got.token == TOKEN
    assert got.default_namespace == "from-a"
    # An explicit --kubeconfig may be the same list (the CLI's default is $KUBECONFIG).
    assert loading.from_kubeconfig(os.environ["KUBECONFIG"]) == got


def test_default_kubeconfig_is_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KUBECONFIG", raising=False)
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    write(tmp_path / ".kube" / "config", simple({"token": TOKEN}, namespace="ns"))
    got = loading.load(None)
    assert got.default_namespace == "ns" and got.token == TOKEN


def exec_plugin(tmp_path: Path, expires: list[str | None]) -> Path:
    """A plugin that counts its runs, records what it was given, and answers run n with token-n."""
    script = tmp_path / "bin" / "plugin.py"
    script.parent.mkdir(parents=True, exist_ok=True)
    script.write_text(
        f"#!{sys.executable}\n"
        "import json, os, sys\n"
        "from pathlib import Path\n"
        f"here = Path({str(tmp_path)!r})\n"
        "count = here / 'runs'\n"
        "n = int(count.read_text()) + 1 if count.exists() else 1\n"
        "count.write_text(str(n))\n"
        "seen = {'argv': sys.argv[1:], 'env': os.environ.get('PLUGIN_ENV'),\n"
        "    'info': json.loads(os.environ['KUBERNETES_EXEC_INFO'])}\n"
        "(here / 'seen.json').write_text(json.dumps(seen))\n"
        f"expires = {expires!r}\n"
        "status = {'token': f'token-{n}'}\n"
        "if expires[min(n, len(expires)) - 1]:\n"
        "    status['expirationTimestamp'] = expires[min(n, len(expires)) - 1]\n"
        "print(json.dumps({'apiVersion': 'client.authentication.k8s.io/v1', 'kind': 'ExecCredential',\n"
        "    'status': status}))\n"
    )
    script.chmod(0o755)
    return script


def exec_config(command: str, **extra: Any) -> dict[str, Any]:
    return simple(
        {
            "exec": {
                "apiVersion": "client.authentication.k8s.io/v1",
                "command": command,
                "args": ["get-token", "--cluster", "dev"],
                "env": [{"name": "PLUGIN_ENV", "value": "given"}],
                "interactiveMode": "Never",
                **extra,
            }
        },
        {"server": "https://h:6443", "certificate-authority-data": b64(b"-----BEGIN CERTIFICATE-----\n")},
    )


def test_exec_plugin_token(tmp_path: Path) -> None:
    exec_plugin(tmp_path, [None])
    # A relative command with a directory part is relative to the kubeconfig, as with kubectl.
    path = write(tmp_path / "config", exec_config("./bin/plugin.py", provideClusterInfo=True))
    got = loading.from_kubeconfig(path)
    assert got.token == "token-1" and got.expiration is None and not got.stale()
    seen = json.loads((tmp_path / "seen.json").read_text())
    assert seen["argv"] == ["get-token", "--cluster", "dev"] and seen["env"] == "given"
    assert seen["info"]["kind"] == "ExecCredential"
    assert seen["info"]["spec"]["interactive"] is False
    assert seen["info"]["spec"]["cluster"]["server"] == "https://h:6443"
    assert "given" not in repr(got)


def test_expired_exec_credential_is_fetched_again(tmp_path: Path) -> None:
    later = "2999-01-01T00:00:00Z"
    script = exec_plugin(tmp_path, ["2000-01-01T00:00:00Z", later])
    got = loading.from_kubeconfig(write(tmp_path / "config", exec_config(str(script))))
    assert got.token == "token-1" and got.expiration is not None and got.stale()
    again = got.current()
    assert again.token == "token-2" and not again.stale()
    assert again.expiration is not None and again.expiration.year == 2999
    assert again.current() is again
    assert (tmp_path / "runs").read_text() == "2"


def test_exec_plugin_failures_are_clear(tmp_path: Path) -> None:
    cfg = exec_config("kiri-no-such-plugin", installHint="install it from example.org")
    with pytest.raises(CredentialsError, match=r"not installed.*install it from example\.org"):
        loading.from_kubeconfig(write(tmp_path / "config", cfg))
    bad = tmp_path / "bad.py"
    bad.write_text(f"#!{sys.executable}\nprint('{TOKEN}')\n")
    bad.chmod(0o755)
    with pytest.raises(CredentialsError, match="did not print an ExecCredential") as err:
        loading.from_kubeconfig(write(tmp_path / "config", exec_config(str(bad))))
    assert TOKEN not in str(err.value)
    failing = tmp_path / "failing.py"
    failing.write_text(f"#!{sys.executable}\nimport sys\nsys.exit(3)\n")
    failing.chmod(0o755)
    with pytest.raises(CredentialsError, match="exited with status 3"):
        loading.from_kubeconfig(write(tmp_path / "config", exec_config(str(failing))))


def test_auth_provider_asks_for_an_exec_plugin(tmp_path: Path) -> None:
    cfg = simple({"auth-provider": {"name": "gcp", "config": {"access-token": TOKEN}}})
    path = write(tmp_path / "config", cfg)
    with pytest.raises(CredentialsError, match=r"legacy auth-provider 'gcp'.*exec credential plugin") as err:
        loading.from_kubeconfig(path)
    assert str(path) in str(err.value) and TOKEN not in str(err.value)


def test_missing_current_context_names_the_file(tmp_path: Path) -> None:
    path = write(tmp_path / "config", kubeconfig(current=None, contexts={"dev": {"cluster": "c"}}))
    with pytest.raises(CredentialsError, match="has no current-context") as err:
        loading.from_kubeconfig(path)
    assert str(path) in str(err.value)


@pytest.mark.parametrize(
    ("cfg", "message"),
    [
        (kubeconfig(current="prod", contexts={"dev": {}}), "current-context 'prod' is not among"),
        (kubeconfig(contexts={"dev": {"cluster": "c", "user": "u"}}), "cluster 'c' of context 'dev'"),
        (
            kubeconfig(
                contexts={"dev": {"cluster": "c", "user": "u"}}, clusters={"c": {"server": "https://h"}}
            ),
            "user 'u' of context 'dev'",
        ),
        (kubeconfig(contexts={"dev": {"cluster": "c"}}, clusters={"c": {}}), "cluster 'c' .* has no server"),
        ({"contexts": "dev"}, "contexts is not a list"),
        ("- just\n- a list\n", "is not a mapping"),
    ],
    ids=["unknown-context", "unknown-cluster", "unknown-user", "no-server", "bad-section", "not-a-mapping"],
)
def test_bad_kubeconfigs(tmp_path: Path, cfg: dict[str, Any] | str, message: str) -> None:
    if isinstance(cfg, dict):
        cfg.setdefault("users", []).append({"name": "other", "user": {"token": TOKEN}})
    path = write(tmp_path / "config", cfg)
    with pytest.raises(CredentialsError, match=message) as err:
        loading.from_kubeconfig(path)
    assert str(path) in str(err.value) and TOKEN not in str(err.value)


def test_malformed_yaml_does_not_quote_the_file(tmp_path: Path) -> None:
    path = write(tmp_path / "config", f'users:\n- name: u\n  user:\n    token: "{TOKEN}\n  bad: [\n')
    with pytest.raises(CredentialsError, match=r"is not valid YAML: .*line \d+") as err:
        loading.from_kubeconfig(path)
    assert str(path) in str(err.value) and TOKEN not in str(err.value)


def test_missing_kubeconfig(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(CredentialsError, match=f"kubeconfig {missing} does not exist"):
        loading.from_kubeconfig(missing)


def service_account(tmp_path: Path, token: str = TOKEN, namespace: str | None = "kiri-system") -> Path:
    base = tmp_path / "serviceaccount"
    base.mkdir()
    (base / "token").write_text(token)
    (base / "ca.crt").write_text("-----BEGIN CERTIFICATE-----\n")
    if namespace is not None:
        (base / "namespace").write_text(namespace + "\n")
    return base


def test_in_cluster(tmp_path: Path) -> None:
    base = service_account(tmp_path)
    env = {"KUBERNETES_SERVICE_HOST": "10.96.0.1", "KUBERNETES_SERVICE_PORT": "443"}
    got = loading.in_cluster(base, env)
    assert got.server == "https://10.96.0.1:443"
    assert got.ca_path == str(base / "ca.crt") and got.ca_data is None
    assert got.token == TOKEN and got.token_path == str(base / "token") and got.refreshable
    assert got.default_namespace == "kiri-system"
    assert got.read_at <= time.monotonic() and not got.stale()
    v6 = loading.in_cluster(base, {"KUBERNETES_SERVICE_HOST": "fd00::1", "KUBERNETES_SERVICE_PORT": "443"})
    assert v6.server == "https://[fd00::1]:443"


def test_in_cluster_errors(tmp_path: Path) -> None:
    with pytest.raises(CredentialsError, match="KUBERNETES_SERVICE_HOST"):
        loading.in_cluster(tmp_path, {})
    env = {"KUBERNETES_SERVICE_HOST": "10.96.0.1", "KUBERNETES_SERVICE_PORT": "443"}
    with pytest.raises(CredentialsError, match="cannot read the token file"):
        loading.in_cluster(tmp_path / "absent", env)
    base = service_account(tmp_path, namespace=None)
    (base / "ca.crt").unlink()
    with pytest.raises(CredentialsError, match=r"ca\.crt is missing") as err:
        loading.in_cluster(base, env)
    assert TOKEN not in str(err.value)


def test_load_prefers_the_service_account_in_a_cluster(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    base = service_account(tmp_path)
    monkeypatch.setattr(loading, "SERVICE_ACCOUNT_DIR", str(base))
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.96.0.1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", "443")
    assert loading.load(None).origin == f"the service account in {base}"
    # A kubeconfig named explicitly wins, even in a cluster.
    path = write(tmp_path / "config", simple({"token": "other"}))
    assert loading.load(str(path)).token == "other"


def test_credentials_without_auth_have_no_header() -> None:
    assert Credentials(server="https://h").authorization() is None


def test_context_picks_another_context_as_kubectls_context_flag_does(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.0.0.1")  # a named context wins over in-cluster too
    cfg = write(
        tmp_path / "config",
        kubeconfig(
            current="dev",
            contexts={
                "dev": {"cluster": "a", "namespace": "dev-ns"},
                "prod": {"cluster": "b", "namespace": "prod-ns"},
            },
            clusters={"a": {"server": "https://a:6443"}, "b": {"server": "https://b:6443"}},
        ),
    )
    assert loading.from_kubeconfig(cfg).server == "https://a:6443"
    prod = loading.load(str(cfg), context="prod")
    assert (prod.server, prod.default_namespace) == ("https://b:6443", "prod-ns")
    with pytest.raises(CredentialsError, match=r"no context named 'staging'"):
        loading.load(str(cfg), context="staging")
