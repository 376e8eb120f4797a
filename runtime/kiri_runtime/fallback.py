"""Edge-cloud cascade: answer locally when possible, forward to the cloud runtime when not.

A request goes to the cloud (`--fallback-url`, another Kiri runtime or any OIP v2 server) when:
- `not_ready`: the local model is not loaded (still fetching, or its artifact failed verification);
- `overloaded`: the local queue is at `--queue-limit`;
- `low_confidence`: the first output looks like a classifier's (rank 2, float) and some row's top-1
  probability is below `--confidence-threshold`. Rows that already sum to 1 are read as probabilities;
  other rows are read as logits and softmaxed.

Every answer carries `parameters.kiri_tier` (`edge` or `cloud`) and, when forwarded,
`parameters.kiri_fallback_reason`. If the cloud fails on a low-confidence request, the edge answer is
still returned (with `kiri_fallback_error`): a less confident answer beats none. If the cloud fails when
there is no local answer, the client gets 502.
"""

from __future__ import annotations

import logging
from typing import Any

import httpx
import numpy as np

from kiri_runtime.dataplane import DataPlane
from kiri_runtime.errors import ModelNotReady, Overloaded, UpstreamError
from kiri_runtime.metrics import RuntimeMetrics
from kiri_runtime.tensors import (
    HEADER_LENGTH,
    Array,
    InferenceRequest,
    InferenceResponse,
    decode_response,
    encode_request,
)

log = logging.getLogger(__name__)

TIER = "kiri_tier"
REASON = "kiri_fallback_reason"


def top1_confidence(scores: Array) -> Array:
    """Top-1 probability per row of a (batch, classes) score matrix."""
    x = np.asarray(scores, dtype=np.float64)
    sums = x.sum(axis=1)
    is_prob = bool(np.all(x >= 0) and np.all(x <= 1) and np.allclose(sums, 1.0, atol=1e-3))
    if not is_prob:
        x = np.exp(x - x.max(axis=1, keepdims=True))
        x = x / x.sum(axis=1, keepdims=True)
    result: Array = x.max(axis=1)
    return result


def low_confidence(response: InferenceResponse, threshold: float) -> bool:
    if not response.outputs:
        return False
    first = response.outputs[0].data
    if first.ndim != 2 or first.dtype.kind != "f" or first.shape[1] < 2 or first.shape[0] == 0:
        return False
    return bool(top1_confidence(first).min() < threshold)


class CloudClient:
    """Forwards OIP v2 requests to the cloud runtime, tensors as binary (the cheapest on the wire)."""

    def __init__(self, base_url: str, timeout_s: float = 10.0) -> None:
        self.base_url = base_url.rstrip("/")
        self._client = httpx.AsyncClient(timeout=timeout_s)

    async def infer(self, name: str, request: InferenceRequest) -> InferenceResponse:
        body, header_length = encode_request(request, binary=True)
        headers = {"Content-Type": "application/octet-stream"}
        if header_length is not None:
            headers[HEADER_LENGTH] = str(header_length)
        url = f"{self.base_url}/v2/models/{name}/infer"
        reply = await self._client.post(url, content=body, headers=headers)
        if reply.status_code != 200:
            raise UpstreamError(f"cloud runtime answered {reply.status_code}: {reply.text[:200]}")
        raw_length = reply.headers.get(HEADER_LENGTH)
        return decode_response(reply.content, int(raw_length) if raw_length is not None else None)

    async def close(self) -> None:
        await self._client.aclose()


class Cascade:
    """Local first, cloud when the rules above say so. Without a cloud client it only labels the tier."""

    def __init__(
        self,
        dataplane: DataPlane,
        cloud: CloudClient | None = None,
        confidence_threshold: float | None = None,
    ) -> None:
        self.dataplane = dataplane
        self.cloud = cloud
        self.confidence_threshold = confidence_threshold
        self.metrics: RuntimeMetrics = dataplane.metrics

    async def infer(
        self, name: str, request: InferenceRequest, version: str | None = None
    ) -> InferenceResponse:
        local: InferenceResponse | None = None
        try:
            local = await self.dataplane.infer(name, request, version)
        except (ModelNotReady, Overloaded) as exc:
            if self.cloud is None:
                raise
            reason = "not_ready" if isinstance(exc, ModelNotReady) else "overloaded"
        else:
            threshold = self.confidence_threshold
            if self.cloud is None or threshold is None or not low_confidence(local, threshold):
                return self._tag(name, local, "edge")
            reason = "low_confidence"
        self.metrics.fallbacks.labels(name, reason).inc()
        try:
            remote = await self.cloud.infer(name, _for_cloud(request))
        except (httpx.HTTPError, UpstreamError, ValueError) as exc:
            self.metrics.fallback_failures.labels(name, reason).inc()
            log.warning("cloud fallback for %s (%s) failed: %s", name, reason, exc)
            if local is not None:
                return self._tag(name, local, "edge", reason, fallback_error=str(exc)[:200])
            raise UpstreamError(
                f"local model unavailable ({reason}) and cloud fallback failed: {exc}"
            ) from None
        remote.id = request.id
        return self._tag(name, remote, "cloud", reason)

    def _tag(
        self,
        name: str,
        response: InferenceResponse,
        tier: str,
        reason: str | None = None,
        fallback_error: str | None = None,
    ) -> InferenceResponse:
        params: dict[str, Any] = dict(response.parameters)
        params[TIER] = tier
        if reason is not None:
            params[REASON] = reason
        if fallback_error is not None:
            params["kiri_fallback_error"] = fallback_error
        response.parameters = params
        self.metrics.responses.labels(name, tier).inc()
        return response

    async def close(self) -> None:
        if self.cloud is not None:
            await self.cloud.close()


def _for_cloud(request: InferenceRequest) -> InferenceRequest:
    # The edge client's binary-output wishes are applied by the edge when it re-encodes the answer.
    params = {k: v for k, v in request.parameters.items() if k != "binary_data_output"}
    return InferenceRequest(request.inputs, request.outputs, request.id, params)
