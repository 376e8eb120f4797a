"""Keeps credentials out of log lines: URL userinfo, signed-URL query parameters, bearer tokens.

httpx logs every request at INFO with its full URL, and a presigned S3 URL or `https://user:pass@host/`
carries its credentials in the URL. `install()` (called by the `kiri serve`, learning and operator entry
points) makes every log record redacted at creation, whatever logger made it and whatever handler prints
it, including handlers added after the call (kopf's, a test's capture). `RedactingFilter` is the same as a
`logging.Filter` for a handler wired by hand.

Redaction rewrites the record's message (and its formatted traceback) with each secret replaced by `***`;
the rest of the line is untouched, so the host, path and non-secret parameters still help a reader.
"""

from __future__ import annotations

import logging
import re
from typing import Any
from urllib.parse import urlsplit

MASK = "***"

# Query parameter names (case-insensitive) whose values are credentials: AWS SigV4 and GCS V4 presigned
# URLs, Azure SAS (`sig`), and the usual OAuth / API-key names.
SENSITIVE_PARAMS = (
    "x-amz-signature",
    "x-amz-credential",
    "x-amz-security-token",
    "x-goog-signature",
    "x-goog-credential",
    "awsaccesskeyid",
    "signature",
    "sig",
    "token",
    "access_token",
    "id_token",
    "refresh_token",
    "client_secret",
    "api_key",
    "apikey",
    "key",
    "password",
    "passwd",
    "secret",
)

# scheme://<userinfo>@ : greedy up to the authority's last '@' (a raw '@' in a password is common).
_USERINFO = re.compile(r"(?P<scheme>\b[a-zA-Z][a-zA-Z0-9+.\-]*://)[^/\s?#@]*(?:@[^/\s?#@]*)*@")
_PARAMS = re.compile(
    r"(?P<lead>[?&;])(?P<name>" + "|".join(re.escape(p) for p in SENSITIVE_PARAMS) + r")=[^&;#\s\"'<>]*",
    re.IGNORECASE,
)
_BEARER = re.compile(r"\b(?P<kind>Bearer|Basic)\s+[A-Za-z0-9._~+/=\-]+", re.IGNORECASE)


def redact(text: str) -> str:
    """`text` with every URL userinfo, sensitive query value and bearer/basic credential masked."""
    if "://" in text:
        text = _USERINFO.sub(lambda m: f"{m['scheme']}{MASK}@", text)
    if "=" in text:
        text = _PARAMS.sub(lambda m: f"{m['lead']}{m['name']}={MASK}", text)
    return _BEARER.sub(lambda m: f"{m['kind']} {MASK}", text)


def strip_url(uri: str) -> str:
    """scheme://host[:port]/path only: for Kiri's own lines about an artifact, where the query adds nothing."""
    parts = urlsplit(uri)
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return f"{parts.scheme}://{host}{parts.path}" if parts.scheme else uri


_FORMATTER = logging.Formatter()


class RedactingFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        redact_record(record)
        return True


def redact_record(record: logging.LogRecord) -> None:
    try:
        message = record.getMessage()
    except Exception:  # a record whose args do not fit its format: logging reports it at emit time
        return
    clean = redact(message)
    if clean != message:
        record.msg, record.args = clean, None
    if record.exc_info and not record.exc_text:
        # Exception messages carry URLs too (httpx puts the request URL in them).
        record.exc_text = redact(_FORMATTER.formatException(record.exc_info))
    if record.stack_info:
        record.stack_info = redact(record.stack_info)


_installed = False


def install() -> None:
    """Redacts every log record from now on, in this process. Idempotent."""
    global _installed
    if _installed:
        return
    previous = logging.getLogRecordFactory()

    def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = previous(*args, **kwargs)
        redact_record(record)
        return record

    logging.setLogRecordFactory(factory)
    _installed = True
