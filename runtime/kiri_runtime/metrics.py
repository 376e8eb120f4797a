"""Prometheus metrics of the runtime, served at `/metrics`.

Names are a contract: the progressive-delivery gates query them. Labels stay low-cardinality: `model` is
a registered model name, or `_unknown` for requests naming a model this server does not have.

| name | type | labels | meaning |
|---|---|---|---|
| `kiri_requests_total` | counter | model, code | infer requests the server took on, by HTTP status (2xx, 5xx) |
| `kiri_rejected_requests_total` | counter | model, code | infer requests refused as the client's doing (any 4xx) |
| `kiri_request_duration_seconds` | histogram | model | time of a taken-on request, body in hand to reply |
| `kiri_inflight_body_bytes` | gauge | | request body bytes held by requests in flight |
| `kiri_inference_duration_seconds` | histogram | model | one ONNX Runtime `session.run` (one batch) |
| `kiri_batch_size` | histogram | model | rows per `session.run` (1 per request without batching) |
| `kiri_queue_depth` | gauge | model | infer requests admitted and not yet answered by the local model |
| `kiri_model_info` | gauge (1) | model, version, variant, sha256 | what is loaded |
| `kiri_model_ready` | gauge | model | 1 once the verified model is loaded |
| `kiri_responses_total` | counter | model, tier | successful answers by tier (`edge`, `cloud`) |
| `kiri_fallback_total` | counter | model, reason | requests sent to the cloud (`not_ready`, `overloaded`, `low_confidence`) |
| `kiri_fallback_failures_total` | counter | model, reason | cloud forwards that failed |
| `kiri_artifact_fetch_bytes_total` | counter | scheme | bytes downloaded into the node cache |
| `kiri_artifact_fetches_total` | counter | result | fetches: `hit`, `downloaded`, `failed` |

A 4xx (malformed body, unknown model, 413, 429 over the body budget) lands only in
`kiri_rejected_requests_total`, never in `kiri_requests_total` nor in the duration histogram: a client that
sends junk can neither raise a revision's error ratio nor dilute it, and a slow upload is not model latency.

Language models (`kiri serve` on an onnxruntime-genai model) add these, named after vLLM's (`vllm:` -> `kiri:`,
label `model` instead of `model_name`); docs/operations.md has the mapping:

| name | type | labels | meaning |
|---|---|---|---|
| `kiri:time_to_first_token_seconds` | histogram | model | request admitted to its first generated token |
| `kiri:inter_token_latency_seconds` | histogram | model | between two tokens of one request (¹) |
| `kiri:e2e_request_latency_seconds` | histogram | model | request admitted to its last token |
| `kiri:request_queue_time_seconds` | histogram | model | admitted to its prefill starting |
| `kiri:prompt_tokens_total` | counter | model | prompt tokens prefilled |
| `kiri:generation_tokens_total` | counter | model | tokens generated (¹) |
| `kiri:request_success_total` | counter | model, finished_reason | finished requests: `stop`, `length`, `abort` (client gone) |
| `kiri:num_requests_running` | gauge | model | requests in a decode batch |
| `kiri:num_requests_waiting` | gauge | model | requests admitted and not yet prefilled |
| `kiri:kv_cache_usage_perc` | gauge | model | KV positions allocated over `max_num_seqs` full contexts (0..1) |

(¹) Recorded when the request ends and every second while it decodes, not per token (a per-token update cost
about as much as the token's other bookkeeping on a small model); the values are the same.

Generation requests also count where infer requests do (`kiri_requests_total{model, code}` and
`kiri_request_duration_seconds`, for a stream until its last event; a 4xx, or 499 for a client that went away, in
`kiri_rejected_requests_total`), so the rollout gates read language models the same way.

Example gates: error ratio `sum(rate(kiri_requests_total{code=~"5.."}[1m])) / sum(rate(kiri_requests_total[1m]))`;
p99 latency `histogram_quantile(0.99, sum by (le) (rate(kiri_request_duration_seconds_bucket[1m])))`;
fallback share `sum(rate(kiri_fallback_total[5m])) / sum(rate(kiri_requests_total[5m]))`.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from kiri_runtime.errors import is_client_error

UNKNOWN_MODEL = "_unknown"

_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
_TOKEN_LATENCY_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.075,
    0.1,
    0.15,
    0.2,
    0.3,
    0.5,
    1.0,
    2.5,
)
_REQUEST_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 60.0, 120.0)


class RuntimeMetrics:
    """One set of runtime metrics in its own registry, so several servers can live in one test process."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "kiri_requests", "Infer requests by status code.", ["model", "code"], registry=r
        )
        self.rejected = Counter(
            "kiri_rejected_requests",
            "Infer requests refused as the client's doing (4xx).",
            ["model", "code"],
            registry=r,
        )
        self.inflight_body_bytes = Gauge(
            "kiri_inflight_body_bytes", "Request body bytes held by requests in flight.", registry=r
        )
        self.request_duration = Histogram(
            "kiri_request_duration_seconds",
            "Infer request time inside the server.",
            ["model"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.inference_duration = Histogram(
            "kiri_inference_duration_seconds",
            "ONNX Runtime run time per batch.",
            ["model"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "kiri_batch_size", "Rows per model run.", ["model"], buckets=_BATCH_BUCKETS, registry=r
        )
        self.queue_depth = Gauge(
            "kiri_queue_depth", "Infer requests in flight locally.", ["model"], registry=r
        )
        self.model_info = Gauge(
            "kiri_model_info", "The loaded model.", ["model", "version", "variant", "sha256"], registry=r
        )
        self.model_ready = Gauge(
            "kiri_model_ready", "1 when the verified model is loaded.", ["model"], registry=r
        )
        self.responses = Counter("kiri_responses", "Answers by serving tier.", ["model", "tier"], registry=r)
        self.fallbacks = Counter(
            "kiri_fallback", "Requests forwarded to the cloud.", ["model", "reason"], registry=r
        )
        self.fallback_failures = Counter(
            "kiri_fallback_failures", "Cloud forwards that failed.", ["model", "reason"], registry=r
        )
        self.fetch_bytes = Counter(
            "kiri_artifact_fetch_bytes", "Bytes downloaded into the cache.", ["scheme"], registry=r
        )
        self.fetches = Counter("kiri_artifact_fetches", "Artifact fetches by result.", ["result"], registry=r)
        # Language models (vLLM's names with a kiri: prefix).
        self.lm_ttft = Histogram(
            "kiri:time_to_first_token_seconds",
            "Time to first token.",
            ["model"],
            buckets=_TOKEN_LATENCY_BUCKETS,
            registry=r,
        )
        self.lm_itl = Histogram(
            "kiri:inter_token_latency_seconds",
            "Time between two tokens of a request.",
            ["model"],
            buckets=_TOKEN_LATENCY_BUCKETS,
            registry=r,
        )
        self.lm_e2e = Histogram(
            "kiri:e2e_request_latency_seconds",
            "Request latency, admitted to last token.",
            ["model"],
            buckets=_REQUEST_LATENCY_BUCKETS,
            registry=r,
        )
        self.lm_queue_time = Histogram(
            "kiri:request_queue_time_seconds",
            "Time waiting before prefill.",
            ["model"],
            buckets=_REQUEST_LATENCY_BUCKETS,
            registry=r,
        )
        self.lm_prompt_tokens = Counter(
            "kiri:prompt_tokens", "Prompt tokens prefilled.", ["model"], registry=r
        )
        self.lm_generation_tokens = Counter(
            "kiri:generation_tokens", "Tokens generated.", ["model"], registry=r
        )
        self.lm_finished = Counter(
            "kiri:request_success",
            "Finished requests by reason.",
            ["model", "finished_reason"],
            registry=r,
        )
        self.lm_running = Gauge("kiri:num_requests_running", "Requests decoding.", ["model"], registry=r)
        self.lm_waiting = Gauge("kiri:num_requests_waiting", "Requests waiting.", ["model"], registry=r)
        self.lm_kv_usage = Gauge(
            "kiri:kv_cache_usage_perc", "KV cache positions allocated (0..1).", ["model"], registry=r
        )
        self.lora_adapters = Gauge(
            "kiri:lora_adapters",
            "LoRA adapters loaded (requestable as model:adapter).",
            ["model"],
            registry=r,
        )
        self.lora_loads = Counter(
            "kiri:lora_adapter_loads",
            "Adapter loads and unloads by result: loaded, swapped, unloaded, refused.",
            ["model", "result"],
            registry=r,
        )

    def observe_infer(self, model: str, status: int, seconds: float) -> None:
        """Counts one answered infer request where the gates expect it (see the module docstring)."""
        if is_client_error(status):
            self.rejected.labels(model, str(status)).inc()
            return
        self.requests.labels(model, str(status)).inc()
        self.request_duration.labels(model).observe(seconds)


def observe_many(histogram: Histogram, values: Sequence[float]) -> None:
    """`histogram.observe(v)` for every v, as one update per bucket: the decode thread records inter-token
    latencies per token and observes them when a request finishes, where a plain `observe` per token (a lock and a
    bucket scan each) cost about as much as the rest of the token's bookkeeping. prometheus_client has no bulk
    observe, so this reads the child's bucket bounds and values; `Histogram.observe` does exactly this per value."""
    if not values:
        return
    bounds = histogram._upper_bounds
    counts = [0] * len(bounds)
    for v in values:
        counts[bisect_left(bounds, v)] += 1  # the first bound >= v, like observe's `v <= bound`
    histogram._sum.inc(sum(values))
    for i, count in enumerate(counts):
        if count:
            histogram._buckets[i].inc(count)


class CollabMetrics:
    """Edge-cloud collaboration (collaborating.py), vLLM's spec-decode names with the kiri: prefix:

    | name | type | labels | meaning |
    |---|---|---|---|
    | `kiri:collab_requests_total` | counter | model, collaboration | generation requests by the mode that served them |
    | `kiri:collab_tokens_total` | counter | model, tier | answer tokens by the tier that produced them (`edge`, `cloud`) |
    | `kiri:collab_handoffs_total` | counter | model, reason | hand-offs: `uncertainty`, `not_ready`, `overloaded`, `cloud_unavailable` |
    | `kiri:collab_cloud_passes_total` | counter | model | cloud forward passes (cloud passes per token: over `collab_tokens_total`) |
    | `kiri:collab_cascade_checked_tokens_total` | counter | model | cascade edge tokens the cloud checked |
    | `kiri:collab_cascade_corrected_tokens_total` | counter | model | cascade edge tokens the cloud replaced |
    | `kiri:spec_decode_num_drafts_total` | counter | model | verify rounds |
    | `kiri:spec_decode_num_draft_tokens_total` | counter | model | draft tokens sent |
    | `kiri:spec_decode_num_accepted_tokens_total` | counter | model | draft tokens accepted (acceptance rate: over draft tokens) |
    """

    def __init__(self, metrics: RuntimeMetrics) -> None:
        r = metrics.registry
        self.runtime = metrics
        self.requests = Counter(
            "kiri:collab_requests",
            "Generation requests by collaboration mode.",
            ["model", "collaboration"],
            registry=r,
        )
        self.tokens = Counter("kiri:collab_tokens", "Answer tokens by tier.", ["model", "tier"], registry=r)
        self.handoffs = Counter(
            "kiri:collab_handoffs", "Hand-offs by reason.", ["model", "reason"], registry=r
        )
        self.cloud_passes = Counter(
            "kiri:collab_cloud_passes", "Cloud forward passes.", ["model"], registry=r
        )
        self.drafts = Counter("kiri:spec_decode_num_drafts", "Verify rounds.", ["model"], registry=r)
        self.draft_tokens = Counter(
            "kiri:spec_decode_num_draft_tokens", "Draft tokens.", ["model"], registry=r
        )
        self.accepted_tokens = Counter(
            "kiri:spec_decode_num_accepted_tokens", "Accepted draft tokens.", ["model"], registry=r
        )
        self.checked_tokens = Counter(
            "kiri:collab_cascade_checked_tokens",
            "Cascade edge tokens the cloud checked.",
            ["model"],
            registry=r,
        )
        self.corrected_tokens = Counter(
            "kiri:collab_cascade_corrected_tokens",
            "Cascade edge tokens the cloud replaced.",
            ["model"],
            registry=r,
        )
