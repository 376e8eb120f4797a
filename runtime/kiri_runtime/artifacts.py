"""The node's content-addressed artifact cache: layout, per-artifact locks, bounded quarantine, pins.

Layout under the cache dir (a hostPath on edge nodes, shared by the revisions on a node):

    blobs/sha256/<hex>      verified artifacts, only ever created by an atomic rename, read-only (0444)
    partial/<key>.part      downloads in progress; resumed with Range, never served
    quarantine/<hex>.<ts>   files whose digest did not match, kept for a post-mortem: the newest
                            `quarantine_max_files` within `quarantine_max_bytes`, older ones deleted
    locks/<key>.lock        flock(2) held by the process fetching that artifact
    pins.json               per namespace/model, the last N verified revisions (N-1 stays for a fast rollback)

Several pods on a node share the cache. A fetch holds `locks/<key>.lock` (key: the expected digest, else
the URI) from the cache lookup to the rename, so a second process waits and then finds the blob instead of
downloading it again; the lock dies with its process. `open` verifies the digest on the bytes of an open
file descriptor and hands that descriptor on (`VerifiedArtifact.load_path` is `/proc/self/fd/N`), so what
is loaded is what was verified even if the blob is replaced or deleted in between. The file, its directory
and `pins.json` are fsynced before they count, so a power cut leaves the old state or the new one.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from kiri_runtime.redaction import strip_url

log = logging.getLogger(__name__)

_CHUNK = 1 << 20


@dataclass
class VerifiedArtifact:
    """An open, read-only descriptor of a cached file whose sha256 was computed from that descriptor."""

    path: Path
    sha256: str
    fd: int

    @property
    def load_path(self) -> str:
        """A path that opens this descriptor's file (Linux), whatever happened to `path` since."""
        return f"/proc/self/fd/{self.fd}" if os.path.isdir("/proc/self/fd") else str(self.path)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> VerifiedArtifact:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def fd_sha256(fd: int) -> str:
    """The digest of the file behind `fd`, read with pread so the descriptor's offset is left alone."""
    digest = hashlib.sha256()
    offset = 0
    while chunk := os.pread(fd, _CHUNK, offset):
        digest.update(chunk)
        offset += len(chunk)
    return digest.hexdigest()


def fsync_dir(path: Path) -> None:
    # A rename or a new file is durable only once its directory is; without this a power cut can lose it.
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def pin_key(model: str, namespace: str = "") -> str:
    """Pins are per namespace and model: two ModelDeployments of one name in two namespaces share a node."""
    return f"{namespace}/{model}" if namespace else model


class ArtifactCache:
    def __init__(
        self,
        root: Path | str,
        revisions_kept: int = 2,
        eviction_grace_s: float = 600.0,
        *,
        quarantine_max_files: int = 2,
        quarantine_max_bytes: int = 2 * 1024**3,
    ) -> None:
        if revisions_kept < 1:
            raise ValueError("revisions_kept must be >= 1")
        self.root = Path(root)
        self.revisions_kept = revisions_kept
        self.eviction_grace_s = eviction_grace_s
        self.quarantine_max_files = quarantine_max_files
        self.quarantine_max_bytes = quarantine_max_bytes
        self.blobs = self.root / "blobs" / "sha256"
        self.partial = self.root / "partial"
        self.quarantined = self.root / "quarantine"
        self.locks = self.root / "locks"
        for d in (self.blobs, self.partial, self.quarantined, self.locks):
            d.mkdir(parents=True, exist_ok=True)
        self._pins = self.root / "pins.json"

    def blob(self, sha256: str) -> Path:
        return self.blobs / sha256

    def partial_for(self, uri: str, sha256: str | None) -> Path:
        key = hashlib.sha256(f"{uri}\n{sha256 or ''}".encode()).hexdigest()[:32]
        return self.partial / f"{key}.part"

    @contextlib.contextmanager
    def fetch_lock(self, uri: str, sha256: str | None) -> Iterator[None]:
        """Held while one process looks up, downloads and commits an artifact; others wait for it."""
        key = sha256 or hashlib.sha256(uri.encode()).hexdigest()
        with (self.locks / f"{key[:32]}.lock").open("a") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                log.info("another process on this node is fetching %s; waiting for it", strip_url(uri))
                fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def quarantine(self, path: Path, label: str) -> Path:
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S.%f")
        target = self.quarantined / f"{label}.{stamp}"
        os.replace(path, target)
        os.utime(target)  # quarantine time, not download time, decides which files are the newest
        log.warning("quarantined %s as %s", path.name, target)
        self._trim_quarantine()
        return target

    def _trim_quarantine(self) -> None:
        """Keeps the newest files within both caps: a digest that never matches, retried every minute,
        must not fill the node's disk one download at a time."""
        entries = []
        for f in self.quarantined.iterdir():
            with contextlib.suppress(FileNotFoundError):
                st = f.stat()
                entries.append((st.st_mtime_ns, f.name, st.st_size, f))
        entries.sort(reverse=True)
        kept = kept_bytes = 0
        for _, _, size, f in entries:
            if kept < self.quarantine_max_files and kept_bytes + size <= self.quarantine_max_bytes:
                kept += 1
                kept_bytes += size
                continue
            log.info("deleting quarantined %s (%d bytes): over the quarantine's caps", f.name, size)
            f.unlink(missing_ok=True)

    def commit(self, partial: Path, sha256: str, fd: int | None = None) -> Path:
        if fd is None:
            with partial.open("rb") as fh:
                os.fsync(fh.fileno())
        else:
            os.fsync(fd)
        os.chmod(partial, 0o444)  # blobs are never written again; an in-place edit needs a chmod first
        target = self.blob(sha256)
        os.replace(partial, target)  # atomic: readers see no file or the whole verified file
        fsync_dir(self.blobs)
        return target

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        with (self.root / ".lock").open("a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _read_pins(self) -> dict[str, list[dict[str, Any]]]:
        try:
            data = json.loads(self._pins.read_text())
        except (FileNotFoundError, ValueError):
            return {}
        models = data.get("models", {}) if isinstance(data, dict) else {}
        if not isinstance(models, dict):
            return {}
        return {
            str(name): [r for r in revs if isinstance(r, dict) and isinstance(r.get("sha256"), str)]
            for name, revs in models.items()
            if isinstance(revs, list)
        }

    def pins(self, model: str = "default", namespace: str = "") -> list[dict[str, Any]]:
        return self._read_pins().get(pin_key(model, namespace), [])

    def pin(self, sha256: str, uri: str = "", model: str = "default", namespace: str = "") -> list[str]:
        """Records a verified, loaded revision of `model` in `namespace`; keeps its newest `revisions_kept`,
        and deletes blobs nothing on this node still pins (several models may share a node's cache dir)."""
        key = pin_key(model, namespace)
        with self._locked():
            models = self._read_pins()
            if namespace:
                # Runtimes before namespaced pins wrote the bare name; this model's own pins now replace it.
                models.pop(model, None)
            revisions = [r for r in models.get(key, []) if r["sha256"] != sha256]
            revisions.insert(0, {"sha256": sha256, "uri": uri, "pinned_at": datetime.now(UTC).isoformat()})
            models[key] = revisions[: self.revisions_kept]
            tmp = self._pins.with_suffix(".tmp")
            with tmp.open("w") as fh:
                fh.write(json.dumps({"models": models}, indent=2))
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self._pins)
            fsync_dir(self.root)
            kept = {r["sha256"] for revs in models.values() for r in revs}
            now = time.time()
            for blob in self.blobs.iterdir():
                # A fresh blob may be another process's download that is not loaded and pinned yet.
                if blob.name not in kept and now - blob.stat().st_mtime > self.eviction_grace_s:
                    log.info("evicting unpinned artifact %s", blob.name)
                    blob.unlink(missing_ok=True)
            return [r["sha256"] for r in models[key]]
