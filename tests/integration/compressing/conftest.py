from __future__ import annotations

import sys
from collections.abc import Callable

import pytest
from compress_helpers import compress


@pytest.fixture
def run_compress(capsys: pytest.CaptureFixture[str]) -> Callable[..., tuple[int, str]]:
    """Run `kiri compress` in-process; return its exit status and its progress/error output."""

    def _run(*argv: str) -> tuple[int, str]:
        rc = compress(*argv)
        captured = capsys.readouterr()
        sys.stderr.write(captured.err[-4000:])
        return rc, captured.err

    return _run
