"""The one error type `kiri compress` reports to the user: its message is the whole explanation."""

from __future__ import annotations


class CompressionError(Exception):
    """Bad input or a failed check. The CLI prints the message and exits non-zero."""
