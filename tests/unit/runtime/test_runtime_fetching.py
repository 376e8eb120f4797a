"""Fetcher and cache logic with injected failures (respx): retries, resume, integrity, disk full, pins, S3."""

from __future__ import annotations

import errno
import hashlib
import http.server
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import respx

from kiri_runtime import fetching
from kiri_runtime.fetching import (
    ArtifactCache,
    ArtifactFetcher,
    DiskFullError,
    FetchError,
    IntegrityError,
    RetryPolicy,
    normalize_sha256,
)
from kiri_runtime.signing import sign_v4

pytestmark = pytest.mark.timeout(20)

DATA = os.urandom(200_000)
SHA = hashlib.sha256(DATA).hexdigest()
URL = "https://models.example/clf.onnx"


class CutStream(httpx.SyncByteStream):
    """Yields `prefix` and then fails like a dropped link."""

    def __init__(self, prefix: bytes) -> None:
        self.prefix = prefix

    def __iter__(self) -> Iterator[bytes]:
        yield self.prefix
        raise httpx.ReadError("connection reset by peer")


def ranged(request: httpx.Request, data: bytes = DATA) -> httpx.Response:
    rng = request.headers.get("range")
    if not rng:
        return httpx.Response(200, content=data)
    start = int(rng.removeprefix("bytes=").rstrip("-"))
    return httpx.Response(
        206, content=data[start:], headers={"content-range": f"bytes {start}-{len(data) - 1}/{len(data)}"}
    )


@pytest.fixture
def sleeps() -> list[float]:
    return []


@pytest.fixture
def fetcher(tmp_path: Path, sleeps: list[float]) -> Iterator[ArtifactFetcher]:
    f = ArtifactFetcher(
        ArtifactCache(tmp_path / "cache"), RetryPolicy(attempts=4, backoff_s=0.5), sleep=sleeps.append
    )
    yield f
    f.close()


def test_retries_with_exponential_backoff_then_succeeds(fetcher, sleeps):
    with respx.mock:
        route = respx.get(URL).mock(
            side_effect=[httpx.Response(503), httpx.Response(429), httpx.ConnectError("refused"), ranged]
        )
        path = fetcher.fetch(URL, SHA)
    assert path.read_bytes() == DATA and route.call_count == 4
    assert len(sleeps) == 3
    for attempt, delay in enumerate(sleeps, start=1):
        full = 0.5 * 2 ** (attempt - 1)
        assert full / 2 <= delay <= full


def test_gives_up_after_the_attempt_budget(fetcher, sleeps):
    with respx.mock:
        respx.get(URL).mock(side_effect=httpx.ReadTimeout("slow link"))
        with pytest.raises(FetchError, match="gave up after 4 attempts"):
            fetcher.fetch(URL, SHA)
    assert len(sleeps) == 3
    assert not any(fetcher.cache.blobs.iterdir())


def test_cut_transfer_resumes_with_range(fetcher):
    seen: list[str | None] = []

    def serve(request: httpx.Request) -> httpx.Response:
        seen.append(request.headers.get("range"))
        if len(seen) == 1:
            return httpx.Response(
                200, headers={"content-length": str(len(DATA))}, stream=CutStream(DATA[:70_000])
            )
        return ranged(request)

    with respx.mock:
        respx.get(URL).mock(side_effect=serve)
        path = fetcher.fetch(URL, SHA)
    assert seen == [None, "bytes=70000-"]
    assert path.read_bytes() == DATA


def test_short_body_without_error_is_treated_as_a_cut(fetcher):
    calls = []

    def serve(request: httpx.Request) -> httpx.Response:
        calls.append(request.headers.get("range"))
        if len(calls) == 1:
            # The proxy claimed the full length and closed early without an error.
            return httpx.Response(
                200, headers={"content-length": str(len(DATA))}, stream=httpx.ByteStream(DATA[:1000])
            )
        return ranged(request)

    with respx.mock:
        respx.get(URL).mock(side_effect=serve)
        assert fetcher.fetch(URL, SHA).read_bytes() == DATA
    assert calls == [None, "bytes=1000-"]


def test_server_ignoring_range_restarts_cleanly(fetcher):
    partial = fetcher.cache.partial_for(URL, SHA)
    partial.write_bytes(DATA[:5000])
    with respx.mock:
        respx.get(URL).mock(return_value=httpx.Response(200, content=DATA))
        assert fetcher.fetch(URL, SHA).read_bytes() == DATA


def test_digest_mismatch_is_quarantined_never_served(fetcher):
    with respx.mock:
        respx.get(URL).mock(return_value=httpx.Response(200, content=DATA[:-1] + b"!"))
        with pytest.raises(IntegrityError, match="quarantined"):
            fetcher.fetch(URL, SHA)
    assert not any(fetcher.cache.blobs.iterdir())
    assert not any(fetcher.cache.partial.iterdir())
    (bad,) = fetcher.cache.quarantined.iterdir()
    assert bad.read_bytes() == DATA[:-1] + b"!"


def test_stale_partial_from_another_upload_is_redone_from_scratch(fetcher):
    fetcher.cache.partial_for(URL, SHA).write_bytes(b"x" * 1000)  # left by an earlier process
    ranges = []

    def serve(request: httpx.Request) -> httpx.Response:
        ranges.append(request.headers.get("range"))
        return ranged(request)

    with respx.mock:
        respx.get(URL).mock(side_effect=serve)
        assert fetcher.fetch(URL, SHA).read_bytes() == DATA
    assert ranges == ["bytes=1000-", None]
    assert len(list(fetcher.cache.quarantined.iterdir())) == 1


def test_cache_hit_makes_no_request_and_corruption_is_refetched(fetcher):
    with respx.mock:
        route = respx.get(URL).mock(side_effect=ranged)
        path = fetcher.fetch(URL, SHA)
        assert fetcher.fetch(URL, SHA) == path
        assert route.call_count == 1
        path.write_bytes(b"bit rot")
        assert fetcher.fetch(URL, SHA).read_bytes() == DATA
        assert route.call_count == 2
    assert any(fetcher.cache.quarantined.iterdir())


def test_without_sha_the_blob_is_stored_under_its_digest(fetcher):
    with respx.mock:
        respx.get(URL).mock(side_effect=ranged)
        assert fetcher.fetch(URL).name == SHA


def test_disk_full_before_download(fetcher, monkeypatch):
    monkeypatch.setattr(fetching.shutil, "disk_usage", lambda p: _Usage(100))
    with respx.mock:
        respx.get(URL).mock(side_effect=ranged)
        with pytest.raises(
            DiskFullError, match=r"is full: the artifact needs 200000 more bytes, 100 are free"
        ):
            fetcher.fetch(URL, SHA)


class _Usage:
    def __init__(self, free: int) -> None:
        self.free = free


def test_enospc_while_writing_is_reported_and_partial_removed(fetcher, monkeypatch):
    def no_space(fh: object, chunk: bytes) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(fetching, "_write", no_space)
    with respx.mock:
        respx.get(URL).mock(side_effect=ranged)
        with pytest.raises(DiskFullError, match="ENOSPC"):
            fetcher.fetch(URL, SHA)
    assert not any(fetcher.cache.partial.iterdir())


def test_file_scheme_and_errors(fetcher, tmp_path):
    src = tmp_path / "m.onnx"
    src.write_bytes(DATA)
    assert fetcher.fetch(src.as_uri(), SHA).read_bytes() == DATA
    assert fetcher.fetch(str(src), SHA).name == SHA
    with pytest.raises(FetchError, match="does not exist"):
        fetcher.fetch((tmp_path / "nope").as_uri(), "a" * 64)
    with pytest.raises(FetchError, match="unsupported artifact scheme"):
        fetcher.fetch("ftp://host/m.onnx", "a" * 64)
    with pytest.raises(ValueError, match="64 hex"):
        fetcher.fetch(src.as_uri(), "abc")
    assert normalize_sha256("sha256:" + SHA.upper()) == SHA


def test_pins_keep_n_revisions_per_model_and_evict_older(tmp_path):
    cache = ArtifactCache(tmp_path, revisions_kept=2, eviction_grace_s=0)
    digests = []
    for i in range(3):
        data = f"model {i}".encode()
        digest = hashlib.sha256(data).hexdigest()
        digests.append(digest)
        cache.blob(digest).write_bytes(data)
        cache.pin(digest, f"file:///m{i}", model="clf")
    assert [p["sha256"] for p in cache.pins("clf")] == [digests[2], digests[1]]
    assert not cache.blob(digests[0]).exists()
    assert cache.blob(digests[1]).exists() and cache.blob(digests[2]).exists()
    cache.pin(digests[1], model="clf")  # a rollback to N-1 makes it the newest; nothing is fetched or evicted
    assert [p["sha256"] for p in cache.pins("clf")] == [digests[1], digests[2]]
    other = hashlib.sha256(b"other").hexdigest()
    cache.blob(other).write_bytes(b"other")
    cache.pin(other, model="detector")  # another model on the node keeps clf's revisions
    assert cache.blob(digests[1]).exists() and cache.blob(digests[2]).exists()
    with pytest.raises(ValueError):
        ArtifactCache(tmp_path, revisions_kept=0)


def test_fresh_unpinned_blobs_survive_eviction(tmp_path):
    cache = ArtifactCache(tmp_path, revisions_kept=1)  # default grace: minutes
    in_progress = hashlib.sha256(b"being loaded by another process").hexdigest()
    cache.blob(in_progress).write_bytes(b"x")
    cache.pin("a" * 64, model="clf")
    assert cache.blob(in_progress).exists()


def test_s3_requests_are_path_style_and_signed(tmp_path):
    env = {
        "AWS_ACCESS_KEY_ID": "AKIDKIRI",
        "AWS_SECRET_ACCESS_KEY": "secret",
        "AWS_SESSION_TOKEN": "token",
        "AWS_REGION": "eu-west-1",
        "AWS_ENDPOINT_URL": "http://minio.local:9000",
    }
    fetcher = ArtifactFetcher(
        ArtifactCache(tmp_path), RetryPolicy(backoff_s=0), sleep=lambda s: None, env=env
    )
    seen: list[httpx.Request] = []

    def serve(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        if len(seen) == 1:
            return httpx.Response(
                200, headers={"content-length": str(len(DATA))}, stream=CutStream(DATA[:10])
            )
        return ranged(request)

    with respx.mock:
        respx.get("http://minio.local:9000/bucket/models/clf%2B1.onnx").mock(side_effect=serve)
        assert fetcher.fetch("s3://bucket/models/clf+1.onnx", SHA).read_bytes() == DATA
    for request in seen:
        auth = request.headers["authorization"]
        assert auth.startswith("AWS4-HMAC-SHA256 Credential=AKIDKIRI/")
        assert "/eu-west-1/s3/aws4_request" in auth
        assert "SignedHeaders=host;x-amz-content-sha256;x-amz-date;x-amz-security-token," in auth
        assert request.headers["x-amz-security-token"] == "token"
        assert "secret" not in auth
    assert seen[1].headers["range"] == "bytes=10-"


def test_s3_without_credentials_is_unsigned(tmp_path):
    env = {"AWS_ENDPOINT_URL_S3": "http://s3.local"}
    fetcher = ArtifactFetcher(ArtifactCache(tmp_path), env=env)
    with respx.mock:
        route = respx.get("http://s3.local/public/m.onnx").mock(side_effect=ranged)
        fetcher.fetch("s3://public/m.onnx", SHA)
    assert "authorization" not in route.calls[0].request.headers


def test_sigv4_matches_aws_s3_get_object_example():
    # "GET Object" example of the S3 SigV4 documentation (header-based auth, Range signed).
    headers = sign_v4(
        "GET",
        "https://examplebucket.s3.amazonaws.com/test.txt",
        {"Range": "bytes=0-9", "x-amz-content-sha256": hashlib.sha256(b"").hexdigest()},
        access_key="AKIAIOSFODNN7EXAMPLE",
        secret_key="wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
        region="us-east-1",
        service="s3",
        amz_date="20130524T000000Z",
    )
    assert headers["Authorization"] == (
        "AWS4-HMAC-SHA256 Credential=AKIAIOSFODNN7EXAMPLE/20130524/us-east-1/s3/aws4_request, "
        "SignedHeaders=host;range;x-amz-content-sha256;x-amz-date, "
        "Signature=f0e8bdb87c964420e857bd35b5d6ed310bd44f0170aba48dd91039c6036bdb41"
    )


def test_sigv4_matches_aws_test_suite_get_vanilla():
    headers = sign_v4(
        "GET",
        "https://example.amazonaws.com/",
        {},
        access_key="AKIDEXAMPLE",
        secret_key="wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY",
        region="us-east-1",
        service="service",
        amz_date="20150830T123600Z",
    )
    assert headers["Authorization"].endswith(
        "SignedHeaders=host;x-amz-date, Signature=5fa00fa31553b73ebf1942676e86291e8372ff2a2260956d9b8aae1d763fbf31"
    )


# ---------------------------------------------------------------- hardening (issue 19)


def test_a_digest_that_never_matches_keeps_only_the_newest_quarantined_files(tmp_path):
    cache = ArtifactCache(tmp_path, quarantine_max_files=2, quarantine_max_bytes=10**9)
    fetcher = ArtifactFetcher(cache, RetryPolicy(attempts=1), sleep=lambda s: None)
    with respx.mock:
        for attempt in range(6):  # the serving loop retries a bad upload about once a minute, forever
            respx.get(URL).mock(return_value=httpx.Response(200, content=DATA + str(attempt).encode()))
            with pytest.raises(IntegrityError):
                fetcher.fetch(URL, SHA)
    kept = sorted(p.read_bytes()[-1:] for p in cache.quarantined.iterdir())
    assert kept == [b"4", b"5"]


def test_the_quarantine_byte_cap_deletes_what_does_not_fit(tmp_path):
    cache = ArtifactCache(tmp_path, quarantine_max_files=10, quarantine_max_bytes=250_000)
    for size in (100_000, 100_000, 100_000):
        bad = tmp_path / "bad"
        bad.write_bytes(os.urandom(size))
        cache.quarantine(bad, "f" * 64)
    assert sorted(p.stat().st_size for p in cache.quarantined.iterdir()) == [100_000, 100_000]


def test_the_loaded_bytes_are_the_verified_ones_even_if_the_blob_is_swapped(fetcher):
    with respx.mock:
        respx.get(URL).mock(side_effect=ranged)
        artifact = fetcher.open(URL, SHA)
    with artifact:
        assert artifact.path == fetcher.cache.blob(SHA)
        assert artifact.path.stat().st_mode & 0o777 == 0o444
        swapped = artifact.path.with_name("swap")
        swapped.write_bytes(b"a different model")
        os.replace(swapped, artifact.path)  # another process (or a hand) replaces the blob after the check
        with open(artifact.load_path, "rb") as loaded:
            assert loaded.read() == DATA
    assert artifact.fd == -1


def test_a_cache_hit_is_verified_from_the_descriptor_it_hands_on(fetcher):
    with respx.mock:
        respx.get(URL).mock(side_effect=ranged)
        fetcher.fetch(URL, SHA)
        with fetcher.open(URL, SHA) as hit:
            os.unlink(hit.path)  # eviction by another pod between verify and load
            with open(hit.load_path, "rb") as loaded:
                assert loaded.read() == DATA


def test_pins_are_per_namespace_and_model(tmp_path):
    cache = ArtifactCache(tmp_path, revisions_kept=1, eviction_grace_s=0)
    digests = {}
    for label in ("a1", "a2", "b1"):
        digests[label] = hashlib.sha256(label.encode()).hexdigest()
        cache.blob(digests[label]).write_bytes(label.encode())
    cache.pin(digests["b1"], model="clf", namespace="team-b")
    cache.pin(digests["a1"], model="clf", namespace="team-a")
    cache.pin(digests["a2"], model="clf", namespace="team-a")
    assert [p["sha256"] for p in cache.pins("clf", "team-a")] == [digests["a2"]]
    assert [p["sha256"] for p in cache.pins("clf", "team-b")] == [digests["b1"]]
    assert cache.blob(digests["b1"]).exists()  # team-a's rollout does not evict team-b's model
    assert not cache.blob(digests["a1"]).exists()


def test_a_namespaced_pin_replaces_the_bare_name_an_older_runtime_wrote(tmp_path):
    cache = ArtifactCache(tmp_path, revisions_kept=2, eviction_grace_s=0)
    old, new = hashlib.sha256(b"old").hexdigest(), hashlib.sha256(b"new").hexdigest()
    cache.blob(old).write_bytes(b"old")
    cache.blob(new).write_bytes(b"new")
    cache.pin(old, model="clf")
    cache.pin(new, model="clf", namespace="team-a")
    assert cache.pins("clf") == []
    assert [p["sha256"] for p in cache.pins("clf", "team-a")] == [new]
    assert not cache.blob(old).exists()


_FETCH_IN_A_PROCESS = """
import sys
from kiri_runtime.fetching import ArtifactCache, ArtifactFetcher
print(ArtifactFetcher(ArtifactCache(sys.argv[1])).fetch(sys.argv[2], sys.argv[3]))
"""


def test_two_processes_on_a_node_download_one_artifact_once(tmp_path):
    gets: list[str] = []

    class Slow(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            gets.append(self.path)
            time.sleep(1.5)  # long enough for the second process to arrive while the first downloads
            self.send_response(200)
            self.send_header("Content-Length", str(len(DATA)))
            self.end_headers()
            self.wfile.write(DATA)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Slow)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/m.onnx"
    try:
        procs = [
            subprocess.Popen(
                [sys.executable, "-c", _FETCH_IN_A_PROCESS, str(tmp_path / "cache"), url, SHA],
                stdout=subprocess.PIPE,
                text=True,
            )
            for _ in range(2)
        ]
        outputs = [p.communicate(timeout=60)[0].strip() for p in procs]
    finally:
        server.shutdown()
    assert [p.returncode for p in procs] == [0, 0]
    assert outputs == [str(tmp_path / "cache" / "blobs" / "sha256" / SHA)] * 2
    assert gets == ["/m.onnx"]
