"""`kiri checkpoint`: an `hf` source made ready for another server (vLLM's init container in a cloud pod).

The source is fetched and checked exactly as `kiri compress` checks it (`sources.load_source`: the runtime's
fetcher, the sha256, architecture, tokenizer, safetensors headers), then linked at a fixed path.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from kiri_runtime.compressing.lm.sources import load_source


def place_checkpoint(uri: str, sha256: str, out: Path) -> Path:
    """The `hf` source fetched, checked (sha256, architecture, tokenizer, safetensors headers) and unpacked
    under `out`, with `out/model` a link to the checkpoint directory (what another server, vLLM, loads).

    The fetched tar is deleted once unpacked: the checkpoint is on disk once. A source directory (a path,
    file://, a claim's mount) is checked where it is and linked, not copied."""
    work = out / ".source"
    source = load_source(uri, "hf", work, sha256)
    shutil.rmtree(work / "fetch-cache", ignore_errors=True)
    link = out / "model"
    if link.is_symlink() or link.exists():
        link.unlink()
    target = source.hf_dir.resolve()
    # Relative inside `out`, so the link holds wherever another container mounts the volume.
    link.symlink_to(target.relative_to(out.resolve()) if target.is_relative_to(out.resolve()) else target)
    return link
