"""The in-cluster artifact store (`kiri store`, a real process): the compression Job's upload
(`kiri_runtime.publishing`) and the edge fetcher against it, write-once, refusals, and its counters."""

from __future__ import annotations

import hashlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from kiri_runtime.fetching import ArtifactCache, ArtifactFetcher, RetryPolicy
from kiri_runtime.manifests import Manifest
from kiri_runtime.publishing import PublishError, files_to_publish, upload
from planning_worlds import manifest

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

REPO = Path(__file__).resolve().parents[3]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _start_store(root: Path, *extra: str) -> tuple[subprocess.Popen[bytes], str]:
    """`kiri store` on `root` as its own process, once it answers /healthz: the process and its URL."""
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": f"{REPO / 'operator'}:{REPO / 'runtime'}"}
    cmd = [sys.executable, "-m", "kiri_operator.cli", "store", f"--root={root}", "--host=127.0.0.1"]
    proc = subprocess.Popen(
        [*cmd, f"--port={port}", *extra], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    url = f"http://127.0.0.1:{port}"
    for _ in range(200):
        try:
            if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                return proc, url
        except httpx.TransportError:
            time.sleep(0.1)
    proc.kill()
    raise AssertionError(f"kiri store did not start: {proc.communicate()[1].decode()[-2000:]}")


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """One store process for the module (each test writes paths of its own)."""
    root = tmp_path_factory.mktemp("store")
    proc, url = _start_store(root)
    try:
        yield url, root
    finally:
        proc.terminate()
        proc.wait(10)


def _counter(url: str, name: str, labels: str = "") -> float:
    text = httpx.get(f"{url}/metrics", timeout=5).text
    for line in text.splitlines():
        if line.startswith(f"{name}{labels} ") or (not labels and line.startswith(f"{name} ")):
            return float(line.split()[-1])
    return 0.0


def _gets(url: str) -> float:
    return _counter(url, "kiri_store_requests_total", '{code="200",method="GET"}')


def test_a_put_file_is_fetched_by_the_edge_fetcher_and_a_cache_hit_costs_the_store_nothing(
    store: tuple[str, Path], tmp_path: Path
) -> None:
    url, root = store
    payload = os.urandom(2 * 1024 * 1024 + 5)
    sha = hashlib.sha256(payload).hexdigest()
    reply = httpx.put(f"{url}/fetch/md/key/int8.onnx", content=payload, headers={"X-Kiri-Sha256": sha})
    assert reply.status_code == 201, reply.text
    assert (root / "fetch/md/key/int8.onnx").read_bytes() == payload

    gets_before, sent_before = _gets(url), _counter(url, "kiri_store_sent_bytes_total")
    fetcher = ArtifactFetcher(ArtifactCache(tmp_path / "cache"), RetryPolicy(attempts=2, backoff_s=0.01))
    try:
        path = fetcher.fetch(f"{url}/fetch/md/key/int8.onnx", sha)
        assert path.read_bytes() == payload
        assert _gets(url) == gets_before + 1
        assert _counter(url, "kiri_store_sent_bytes_total") == sent_before + len(payload)
        fetcher.fetch(f"{url}/fetch/md/key/int8.onnx", sha)  # a hit: the cache, not the store
        assert _gets(url) == gets_before + 1
    finally:
        fetcher.close()


def test_a_range_get_answers_206_with_the_tail_so_a_cut_download_resumes(store: tuple[str, Path]) -> None:
    url, _ = store
    payload = bytes(range(256)) * 64
    httpx.put(f"{url}/a/b.bin", content=payload).raise_for_status()
    reply = httpx.get(f"{url}/a/b.bin", headers={"Range": "bytes=1000-"})
    assert reply.status_code == 206
    assert reply.headers["content-range"] == f"bytes 1000-{len(payload) - 1}/{len(payload)}"
    assert reply.content == payload[1000:]


def test_paths_are_written_once_the_same_bytes_again_answer_200_and_other_bytes_409(
    store: tuple[str, Path],
) -> None:
    url, root = store
    assert httpx.put(f"{url}/x/y.onnx", content=b"first").status_code == 201
    again = httpx.put(f"{url}/x/y.onnx", content=b"first")
    assert again.status_code == 200 and again.json() == {"path": "x/y.onnx", "created": False}
    other = httpx.put(f"{url}/x/y.onnx", content=b"second")
    assert other.status_code == 409
    assert "written once" in other.json()["error"]
    assert (root / "x/y.onnx").read_bytes() == b"first"


def test_a_body_that_does_not_match_its_sha256_header_is_refused_with_400_and_nothing_is_kept(
    store: tuple[str, Path],
) -> None:
    url, root = store
    reply = httpx.put(f"{url}/x/torn.onnx", content=b"torn", headers={"X-Kiri-Sha256": "0" * 64})
    assert reply.status_code == 400
    assert "sha256" in reply.json()["error"]
    assert not (root / "x/torn.onnx").exists()
    assert list((root / ".partial").iterdir()) == []  # the torn upload's temporary file is gone too


@pytest.mark.parametrize("path", [".partial/x", "a/.hidden", "-a/b", "a/b c"])
def test_paths_naming_hidden_or_odd_segments_are_refused_with_400(store: tuple[str, Path], path: str) -> None:
    url, _ = store
    reply = httpx.put(f"{url}/{path}", content=b"x")
    assert reply.status_code == 400, reply.text
    assert "refused" in reply.json()["error"]
    assert httpx.get(f"{url}/{path}").status_code == 400


@pytest.mark.parametrize("raw", ["/../outside.bin", "/a/../../outside.bin", "/%2e%2e/outside.bin"])
def test_dot_dot_paths_never_write_outside_the_root(store: tuple[str, Path], raw: str) -> None:
    url, root = store
    with httpx.Client() as client:  # httpx would normalise `..` away: send the raw target
        request = client.build_request("PUT", f"{url}/placeholder", content=b"x")
        request.url = request.url.copy_with(raw_path=raw.encode())
        reply = client.send(request)
    assert not (root.parent / "outside.bin").exists()
    # aiohttp resolves `..` within the URL before routing (then the file is inside the root), or refuses.
    if reply.status_code in (200, 201):
        assert (root / reply.json()["path"]).resolve().is_relative_to(root.resolve())
    else:
        assert reply.status_code in (400, 404), reply.text


def test_a_missing_artifact_is_a_404(store: tuple[str, Path]) -> None:
    url, _ = store
    reply = httpx.get(f"{url}/nope/int8.onnx")
    assert reply.status_code == 404 and reply.json() == {"error": "nope/int8.onnx not found"}


def _manifest(variant_uri: str) -> Manifest:
    m = manifest({"int8": True, "fp16": False})
    m.variants[0].uri = variant_uri
    return m


def test_publishing_uploads_the_accepted_variants_then_the_manifest_under_the_compression_directory(
    store: tuple[str, Path], tmp_path: Path
) -> None:
    url, root = store
    out = tmp_path / "out"
    out.mkdir()
    (out / "int8.onnx").write_bytes(b"int8 bytes")
    (out / "manifest.json").write_text("{}")
    files = files_to_publish(_manifest("int8.onnx"), out, out / "manifest.json")
    assert [f.name for f in files] == ["int8.onnx", "manifest.json"]
    sent = upload(files, out, f"{url}/ns/md/key/")
    assert sent == len(b"int8 bytes") + 2
    assert (root / "ns/md/key/int8.onnx").read_bytes() == b"int8 bytes"
    assert (root / "ns/md/key/manifest.json").read_text() == "{}"
    # A retried Job publishes the same bytes again: accepted.
    assert upload(files, out, f"{url}/ns/md/key/") == sent
    (out / "int8.onnx").write_bytes(b"other bytes")
    with pytest.raises(PublishError, match="HTTP 409"):
        upload(files, out, f"{url}/ns/md/key/")


def test_a_variant_uri_outside_the_output_directory_is_refused_before_anything_is_uploaded(
    tmp_path: Path,
) -> None:
    with pytest.raises(PublishError, match="leaves"):
        files_to_publish(_manifest("../secret"), tmp_path, tmp_path / "manifest.json")


def test_a_read_only_store_serves_files_refuses_every_put_with_405_and_writes_nothing(tmp_path: Path) -> None:
    """How a site's SuperNode serves the adapters it kept to the site's edge pods (its volume is mounted
    read-only there): GET and HEAD, never a write."""
    root = tmp_path / "kept"
    root.mkdir()
    (root / "round-0001.onnx_adapter").write_bytes(b"adapter bytes")
    root.chmod(0o555)  # as a read-only mount: a write would fail, so the store must not try
    proc, url = _start_store(root, "--read-only")
    try:
        got = httpx.get(f"{url}/round-0001.onnx_adapter", timeout=5)
        assert (got.status_code, got.content) == (200, b"adapter bytes")
        put = httpx.put(f"{url}/round-0002.onnx_adapter", content=b"x", timeout=5)
        assert put.status_code == 405
        assert httpx.put(f"{url}/round-0001.onnx_adapter", content=b"y", timeout=5).status_code == 405
        assert sorted(p.name for p in root.iterdir()) == ["round-0001.onnx_adapter"]
        assert proc.poll() is None
    finally:
        root.chmod(0o755)
        proc.terminate()
        proc.wait(10)
