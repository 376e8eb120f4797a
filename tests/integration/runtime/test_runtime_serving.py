"""Readiness, cloud fallback, micro-batching, metrics and fault injection on real servers."""

from __future__ import annotations

import asyncio
import shutil
import time

import httpx
import numpy as np
import pytest
from runtime_helpers import (
    CLASSES,
    FEATURES,
    classifier_model,
    metric_samples,
    reference_probs,
    sample,
    sha256_of,
)

from kiri_runtime.dataplane import BatchingConfig

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]


def x_body(x: np.ndarray, **extra: object) -> dict:
    return {
        "inputs": [{"name": "x", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}],
        **extra,
    }


X = np.random.default_rng(5).standard_normal((2, FEATURES)).astype(np.float32)


def test_not_ready_until_verified_model_loads_then_cloud_covers(serve, tmp_path):
    cloud_path, w, b = classifier_model(tmp_path / "cloud.onnx")
    cloud = serve(cloud_path)
    pending = tmp_path / "later" / "edge.onnx"
    edge = serve(pending.as_uri(), wait=False, fallback_url=cloud.url)
    assert httpx.get(f"{edge.url}/v2/health/live").status_code == 200
    assert httpx.get(f"{edge.url}/v2/health/ready").status_code == 503
    assert httpx.get(f"{edge.url}/v2/models/clf/ready").json()["ready"] is False

    reply = httpx.post(f"{edge.url}/v2/models/clf/infer", json=x_body(X, id="c1"))
    assert reply.status_code == 200, reply.text
    out = reply.json()
    assert out["parameters"] == {"kiri_tier": "cloud", "kiri_fallback_reason": "not_ready"}
    assert out["id"] == "c1"
    np.testing.assert_allclose(
        np.array(out["outputs"][0]["data"]).reshape(2, CLASSES), reference_probs(X, w, b), rtol=1e-5
    )

    pending.parent.mkdir()
    shutil.copy(cloud_path, pending)  # the artifact "arrives": the retry loop picks it up
    edge.wait_ready(timeout=20)
    reply = httpx.post(f"{edge.url}/v2/models/clf/infer", json=x_body(X))
    assert reply.json()["parameters"] == {"kiri_tier": "edge"}
    samples = metric_samples(edge.url)
    assert sample(samples, "kiri_fallback_total", model="clf", reason="not_ready") == 1
    assert sample(samples, "kiri_responses_total", model="clf", tier="cloud") == 1
    assert sample(samples, "kiri_responses_total", model="clf", tier="edge") == 1


def test_wrong_sha256_is_never_served(serve, classifier, tmp_path):
    edge = serve(classifier[0], wait=False, sha256="0" * 64)
    deadline = time.monotonic() + 5
    quarantine = tmp_path / "cache0" / "quarantine"
    while time.monotonic() < deadline and not any(quarantine.glob("*")):
        time.sleep(0.05)
    assert any(quarantine.glob("*")), "the mismatching file was not quarantined"
    assert httpx.get(f"{edge.url}/v2/health/ready").status_code == 503
    reply = httpx.post(f"{edge.url}/v2/models/clf/infer", json=x_body(X))
    assert reply.status_code == 503 and "not loaded" in reply.json()["error"]
    assert not any((tmp_path / "cache0" / "blobs" / "sha256").iterdir())


def test_corrupt_model_with_matching_sha_stays_not_ready(serve, tmp_path, caplog):
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"not an onnx model")
    edge = serve(garbage, wait=False, sha256=sha256_of(garbage))
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not any("not loaded" in r.getMessage() for r in caplog.records):
        time.sleep(0.05)
    assert any("model clf not loaded" in r.getMessage() for r in caplog.records), (
        "ONNX Runtime did not reject it"
    )
    assert httpx.get(f"{edge.url}/v2/health/live").status_code == 200
    assert httpx.get(f"{edge.url}/v2/health/ready").status_code == 503
    reply = httpx.post(f"{edge.url}/v2/models/clf/infer", json=x_body(X))
    assert reply.status_code == 503 and "not loaded" in reply.json()["error"]
    assert not edge.call(lambda server: server._loader.done()), "the loader must keep retrying, not die"


def test_low_confidence_goes_to_cloud(serve, tmp_path):
    cloud_path, w, b = classifier_model(tmp_path / "cloud.onnx", scale=3.0)
    unsure_path, *_ = classifier_model(tmp_path / "unsure.onnx", scale=0.001)  # near-uniform probabilities
    cloud = serve(cloud_path)
    strict = serve(unsure_path, fallback_url=cloud.url, confidence_threshold=0.6)
    lenient = serve(unsure_path, fallback_url=cloud.url, confidence_threshold=0.2)

    out = httpx.post(f"{strict.url}/v2/models/clf/infer", json=x_body(X)).json()
    assert out["parameters"] == {"kiri_tier": "cloud", "kiri_fallback_reason": "low_confidence"}
    np.testing.assert_allclose(
        np.array(out["outputs"][0]["data"]).reshape(2, CLASSES), reference_probs(X, w, b), rtol=1e-5
    )
    assert httpx.post(f"{lenient.url}/v2/models/clf/infer", json=x_body(X)).json()["parameters"] == {
        "kiri_tier": "edge"
    }
    assert (
        sample(metric_samples(strict.url), "kiri_fallback_total", model="clf", reason="low_confidence") == 1
    )


def test_low_confidence_with_cloud_down_keeps_edge_answer(serve, tmp_path):
    unsure_path, *_ = classifier_model(tmp_path / "unsure.onnx", scale=0.001)
    edge = serve(
        unsure_path, fallback_url="http://127.0.0.1:9", confidence_threshold=0.6, fallback_timeout_s=2
    )
    out = httpx.post(f"{edge.url}/v2/models/clf/infer", json=x_body(X)).json()
    assert out["parameters"]["kiri_tier"] == "edge"
    assert out["parameters"]["kiri_fallback_reason"] == "low_confidence"
    assert "kiri_fallback_error" in out["parameters"]
    samples = metric_samples(edge.url)
    assert sample(samples, "kiri_fallback_failures_total", model="clf", reason="low_confidence") == 1


def test_not_ready_with_cloud_down_is_502(serve, tmp_path):
    edge = serve((tmp_path / "absent.onnx").as_uri(), wait=False, fallback_url="http://127.0.0.1:9")
    reply = httpx.post(f"{edge.url}/v2/models/clf/infer", json=x_body(X))
    assert reply.status_code == 502 and "fallback failed" in reply.json()["error"]


async def _concurrent(url: str, bodies: list[dict]) -> list[httpx.Response]:
    async with httpx.AsyncClient(timeout=30) as client:
        return await asyncio.gather(*(client.post(url, json=b) for b in bodies))


def test_queue_limit_overflows_to_cloud_or_503(serve, tmp_path):
    path, *_ = classifier_model(tmp_path / "m.onnx")
    cloud = serve(path)
    edge = serve(path, fallback_url=cloud.url, queue_limit=1, delay_ms=800)
    alone = serve(path, queue_limit=1, delay_ms=800)
    replies = asyncio.run(_concurrent(f"{edge.url}/v2/models/clf/infer", [x_body(X)] * 3))
    tiers = sorted(r.json()["parameters"]["kiri_tier"] for r in replies)
    assert tiers == ["cloud", "cloud", "edge"]
    assert all(
        r.json()["parameters"].get("kiri_fallback_reason", "overloaded") == "overloaded" for r in replies
    )
    replies = asyncio.run(_concurrent(f"{alone.url}/v2/models/clf/infer", [x_body(X)] * 3))
    assert sorted(r.status_code for r in replies) == [200, 503, 503]
    assert "queued" in next(r for r in replies if r.status_code == 503).json()["error"]


def test_micro_batching_merges_and_splits_correctly(serve, tmp_path):
    path, w, b = classifier_model(tmp_path / "m.onnx")
    server = serve(path, batching=BatchingConfig(True, max_batch_size=16, max_wait_ms=20))
    rng = np.random.default_rng(9)
    xs = [rng.standard_normal((int(rng.integers(1, 4)), FEATURES)).astype(np.float32) for _ in range(48)]
    replies = asyncio.run(
        _concurrent(f"{server.url}/v2/models/clf/infer", [x_body(x, id=str(i)) for i, x in enumerate(xs)])
    )
    for i, (x, reply) in enumerate(zip(xs, replies, strict=True)):
        out = reply.json()
        assert out["id"] == str(i)
        got = np.array(out["outputs"][0]["data"]).reshape(x.shape[0], CLASSES)
        np.testing.assert_allclose(got, reference_probs(x, w, b), rtol=1e-5)
    samples = metric_samples(server.url)
    runs = sample(samples, "kiri_batch_size_count", model="clf")
    rows = sample(samples, "kiri_batch_size_sum", model="clf")
    assert rows == sum(x.shape[0] for x in xs)
    assert runs < len(xs), f"{runs} runs for {len(xs)} requests: nothing was batched"


def test_metrics_names_and_labels(serve, classifier):
    path = classifier[0]
    sha = sha256_of(path)
    server = serve(path, sha256=sha, model_version="7", variant="int8")
    for _ in range(3):
        httpx.post(f"{server.url}/v2/models/clf/infer", json=x_body(X))
    httpx.post(f"{server.url}/v2/models/clf/infer", content=b"{")
    httpx.post(f"{server.url}/v2/models/ghost/infer", json=x_body(X))
    reply = httpx.get(f"{server.url}/metrics")
    assert reply.headers["content-type"].startswith("text/plain")
    samples = metric_samples(server.url)
    assert sample(samples, "kiri_requests_total", model="clf", code="200") == 3
    # Client errors are counted apart and left out of the latency histogram (see kiri_runtime.metrics).
    assert sample(samples, "kiri_requests_total", model="clf", code="400") == 0
    assert sample(samples, "kiri_rejected_requests_total", model="clf", code="400") == 1
    assert sample(samples, "kiri_rejected_requests_total", model="_unknown", code="404") == 1
    assert sample(samples, "kiri_request_duration_seconds_count", model="clf") == 3
    assert sample(samples, "kiri_inflight_body_bytes") == 0
    assert sample(samples, "kiri_inference_duration_seconds_count", model="clf") == 3
    assert sample(samples, "kiri_batch_size_sum", model="clf") == 6
    assert sample(samples, "kiri_queue_depth", model="clf") == 0
    assert sample(samples, "kiri_model_info", model="clf", version="7", variant="int8", sha256=sha) == 1
    assert sample(samples, "kiri_model_ready", model="clf") == 1
    assert sample(samples, "kiri_artifact_fetches_total", result="downloaded") == 1


def test_fail_ratio_injects_seeded_500s(serve, classifier):
    server = serve(classifier[0], fail_ratio=0.5, fail_seed=3)
    with httpx.Client() as client:
        codes = [
            client.post(f"{server.url}/v2/models/clf/infer", json=x_body(X)).status_code for _ in range(200)
        ]
    failures = codes.count(500)
    assert set(codes) == {200, 500}
    assert 70 <= failures <= 130
    assert sample(metric_samples(server.url), "kiri_requests_total", model="clf", code="500") == failures
