"""Inference errors, each carrying the HTTP status the REST adapter answers with.

The dataplane raises these and knows nothing of HTTP beyond the status number, so the adapter stays a
lookup and a gRPC adapter could map the same classes to its own codes.

A 4xx is the client's doing (malformed, too large, unknown model, over the body budget): the runtime counts
it apart from model failures (`metrics.RuntimeMetrics.observe_infer`), so that no client can move the
error ratio an analysis gate reads.
"""

from __future__ import annotations

MAX_MESSAGE = 1000


class InferenceError(Exception):
    """An error the client sees as OIP error JSON `{"error": message}`."""

    status = 500
    # Seconds for a Retry-After header, for answers that say "not now" rather than "not this".
    retry_after: int | None = None

    def __init__(self, message: str) -> None:
        # Messages may quote what the client sent (a datatype, a name); a megabyte of it is no help in a reply.
        if len(message) > MAX_MESSAGE:
            message = message[:MAX_MESSAGE] + "..."
        super().__init__(message)
        self.message = message


class BadRequest(InferenceError):
    status = 400


class ModelNotFound(InferenceError):
    status = 404


class PayloadTooLarge(InferenceError):
    status = 413


class BodyBudgetExceeded(InferenceError):
    """The bodies in flight already hold `--max-inflight-body-bytes`: retry shortly (never an OOM)."""

    status = 429
    retry_after = 1


class ModelNotReady(InferenceError):
    status = 503


class Overloaded(InferenceError):
    """The queue is over its limit; with a fallback URL the request goes to the cloud instead."""

    status = 503


class InjectedFault(InferenceError):
    """Raised by `--fail-ratio`, a test aid that lets health gates be exercised on a real server."""

    status = 500


class UpstreamError(InferenceError):
    """The cloud fallback was needed and did not answer usefully."""

    status = 502


def is_client_error(status: int) -> bool:
    return 400 <= status < 500
