"""Uploads a compression's outputs to an HTTP artifact store (`kiri store`, or any server taking PUT).

The compression Job writes its variants and manifest.json to a local directory; with an http(s) store, its
publish step PUTs every file the manifest names (a variant's `uri` may be a file or, for language models,
a directory) and then the manifest itself, each with its sha256 in `X-Kiri-Sha256` so the store keeps
nothing torn. Only httpx: it runs in the operator's `kiri publish-manifest`, which has no aiohttp.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import httpx

from kiri_runtime.manifests import Manifest
from kiri_runtime.redaction import strip_url

__all__ = ["PublishError", "files_to_publish", "upload"]

SHA256_HEADER = "X-Kiri-Sha256"  # kiri_runtime.storing.SHA256_HEADER (no aiohttp import here)
_CHUNK = 1 << 20


class PublishError(Exception):
    pass


def files_to_publish(manifest: Manifest, out_dir: Path, manifest_path: Path) -> list[Path]:
    """Every file of an accepted variant with a relative URI, then the manifest (last: once it is in the
    store, everything it names is too)."""
    files: list[Path] = []
    for variant in manifest.variants:
        if not variant.uri or "://" in variant.uri:
            continue
        path = (out_dir / variant.uri).resolve()
        if not path.is_relative_to(out_dir.resolve()):
            raise PublishError(f"variant {variant.name}: uri {variant.uri!r} leaves {out_dir}")
        if path.is_dir():
            files += sorted(p for p in path.rglob("*") if p.is_file())
        elif path.is_file():
            files.append(path)
        else:
            raise PublishError(f"variant {variant.name}: {path} does not exist")
    return [*files, manifest_path]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _chunks(path: Path) -> Iterator[bytes]:
    with path.open("rb") as fh:
        while chunk := fh.read(_CHUNK):
            yield chunk


def upload(files: list[Path], base_dir: Path, base_url: str, client: httpx.Client | None = None) -> int:
    """PUTs each file to `base_url/<its path under base_dir>`; returns the bytes sent. A 409 (the store
    holds other bytes at that path) or any other refusal raises PublishError naming the file."""
    own = client is None
    http = client or httpx.Client(timeout=httpx.Timeout(300.0, connect=10.0))
    sent = 0
    try:
        for path in files:
            rel = path.resolve().relative_to(base_dir.resolve()).as_posix()
            url = f"{base_url.rstrip('/')}/{rel}"
            size = path.stat().st_size
            headers = {SHA256_HEADER: _sha256(path), "Content-Length": str(size)}
            try:
                reply = http.put(url, content=_chunks(path), headers=headers)
            except httpx.HTTPError as exc:
                raise PublishError(f"PUT {strip_url(url)}: {exc}") from None
            if reply.status_code not in (200, 201):
                raise PublishError(f"PUT {strip_url(url)}: HTTP {reply.status_code}: {reply.text[:500]}")
            sent += size
    finally:
        if own:
            http.close()
    return sent
