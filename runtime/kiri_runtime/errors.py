"""Inference errors, each carrying the HTTP status the REST adapter answers with.

The dataplane raises these and knows nothing of HTTP beyond the status number, so the adapter stays a
lookup and a gRPC adapter could map the same classes to its own codes.
"""

from __future__ import annotations


class InferenceError(Exception):
    """An error the client sees as OIP error JSON `{"error": message}`."""

    status = 500

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class BadRequest(InferenceError):
    status = 400


class ModelNotFound(InferenceError):
    status = 404


class PayloadTooLarge(InferenceError):
    status = 413


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
