"""A model directory as one artifact: a deterministic tar, optionally xz-compressed, and its safe unpacking.

`pack` writes the directory's regular files only (no directory entries, no links), sorted by relative path, each
with mtime 0, uid/gid 0, empty owner names and mode 0644, in POSIX (pax) format without extended headers unless a
name needs one, and ends with the two zero blocks of the format (no padding to tarfile's 10 KiB record: every
tar reader stops at those blocks, and the padding was up to 10 KiB of zeros in every artifact). The same files
therefore give the same bytes, hence the same sha256, on every machine and every run: the fetcher, cache, pins and
resume treat the variant like any other artifact (one file, one digest).

`compression="xz"` (the language-model variants, `<name>.tar.xz`) runs that tar through the standard library's
LZMA (.xz container, preset XZ_PRESET, CRC64 check; no timestamps or names in the format, so still deterministic).
Measured on the tiny test model (docs/benchmarks.md, "Artifact container"): the graph (model.onnx) and the
tokenizer compress 3.3-4.5x, the weights a little (4-bit blocks of a trained model 4.7 % for Q4_0-like, 5.6 % for
Q4_1; 8-bit blocks 3.3 %): a transcoded Q4_0 GGUF's artifact goes from 278 kB to 237 kB (GGUF 256 kB), Q4_1 from
321 kB to 261 kB (GGUF 282 kB). zlib (gzip) gave 2-3 % more bytes, bz2 6 % more; xz presets 6 and 9 the same bytes
(6: a 9 MiB decoder). The full fp32 model stays a plain tar (float32 weights gain little, and xz costs about
a second per few MB on the build node).

`unpack` reads either (plain or any compression tarfile knows: the runtime needs no flag) in one streaming pass,
into a staging directory beside `dest` that is moved into place only when every member was read: it refuses, with
one `CompressionError` line, any member that is not a regular file or whose name is absolute, contains '..', or is
a link, and a truncated or corrupt file; then nothing is written to `dest` and nothing outside it.
"""

from __future__ import annotations

import bz2
import gzip
import hashlib
import lzma
import os
import shutil
import tarfile
import tempfile
import zlib
from pathlib import Path, PurePosixPath
from typing import IO, cast

from kiri_runtime.compressing.errors import CompressionError

_CHUNK = 1 << 20
COMPRESSIONS = (None, "xz")
XZ_PRESET = 6  # 9 gave the same bytes on every LM artifact measured, with a 65 MiB decoder instead of 9 MiB
SUFFIXES = {None: ".tar", "xz": ".tar.xz"}


def _files(model_dir: Path) -> list[tuple[str, Path]]:
    if not model_dir.is_dir():
        raise CompressionError(f"cannot pack {model_dir}: not a directory")
    out: list[tuple[str, Path]] = []
    for path in model_dir.rglob("*"):
        if path.is_symlink():
            raise CompressionError(f"cannot pack {model_dir}: {path.relative_to(model_dir)} is a link")
        if path.is_file():
            out.append((path.relative_to(model_dir).as_posix(), path))
    if not out:
        raise CompressionError(f"cannot pack {model_dir}: no files")
    return sorted(out)


def pack(model_dir: Path, tar_path: Path, *, compression: str | None = None) -> tuple[str, int]:
    """Write `model_dir`'s files into `tar_path` (xz-compressed with compression="xz");
    return (sha256 hex, size in bytes) of the file written."""
    if compression not in COMPRESSIONS:
        raise CompressionError(f"unknown artifact compression {compression!r}; known: none, xz")
    tar_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tar_path.with_name(f".{tar_path.name}.partial")
    with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tar:
        for name, path in _files(model_dir):
            info = tarfile.TarInfo(name)
            info.size = path.stat().st_size
            info.mtime = 0
            info.mode = 0o644
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            info.type = tarfile.REGTYPE
            with path.open("rb") as fh:
                tar.addfile(info, fh)
        end = tar.offset + 2 * tarfile.BLOCKSIZE
    os.truncate(tmp, end)
    if compression == "xz":
        packed = tar_path.with_name(f".{tar_path.name}.xz-partial")
        try:
            with (
                tmp.open("rb") as src,
                lzma.open(
                    packed, "wb", format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC64, preset=XZ_PRESET
                ) as out,
            ):
                shutil.copyfileobj(src, out, _CHUNK)
        finally:
            tmp.unlink(missing_ok=True)
        tmp = packed
    os.replace(tmp, tar_path)
    h = hashlib.sha256()
    with tar_path.open("rb") as fh:
        for block in iter(lambda: fh.read(_CHUNK), b""):
            h.update(block)
    return h.hexdigest(), tar_path.stat().st_size


def _check_member(tar_path: Path, member: tarfile.TarInfo) -> PurePosixPath:
    name = PurePosixPath(member.name)
    where = f"unsafe tar {tar_path.name}: member {member.name!r}"
    if member.issym() or member.islnk():
        raise CompressionError(f"{where} is a link")
    if not member.isfile():
        if member.isdir():
            return name  # a directory entry: created implicitly by its files, ignored
        raise CompressionError(f"{where} is not a regular file")
    if name.is_absolute() or member.name.startswith(("/", "\\")):
        raise CompressionError(f"{where} has an absolute path")
    if ".." in name.parts or "\\" in member.name:
        raise CompressionError(f"{where} escapes the directory")
    if not name.parts or name.parts == (".",):
        raise CompressionError(f"{where} has an empty name")
    return name


_READ_ERRORS = (tarfile.TarError, OSError, EOFError, lzma.LZMAError, zlib.error)


def unpack(tar_path: Path, dest: Path) -> Path:
    """Extract `tar_path` (a tar, plain or compressed) into `dest`, refusing unsafe members; return `dest`.

    One streaming pass (a compressed artifact is inflated once) into a staging directory beside `dest`; its files
    move into `dest` only when the whole tar was read and every member was safe."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}.unpacking-", dir=dest.parent))
    try:
        _extract(tar_path, staging)
        if dest.exists():
            for child in staging.iterdir():
                target = dest / child.name
                if target.is_dir() and not target.is_symlink():
                    shutil.rmtree(target)
                os.replace(child, target)
        else:
            os.replace(staging, dest)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return dest


def _decompressed(tar_path: Path) -> IO[bytes]:
    """The file's bytes, inflated when its magic says xz, gzip or bzip2 (read to the end, these raise on a cut)."""
    with tar_path.open("rb") as fh:
        magic = fh.read(6)
    if magic.startswith(b"\xfd7zXZ\x00"):
        return lzma.open(tar_path, "rb")
    if magic.startswith(b"\x1f\x8b"):
        return cast(IO[bytes], gzip.open(tar_path, "rb"))
    if magic.startswith(b"BZh"):
        return bz2.open(tar_path, "rb")
    return tar_path.open("rb")


def _extract(tar_path: Path, root: Path) -> None:
    try:
        with _decompressed(tar_path) as stream, tarfile.open(fileobj=stream, mode="r|") as tar:
            for member in tar:
                name = _check_member(tar_path, member)
                if not member.isfile():
                    continue
                target = root.joinpath(*name.parts)
                target.parent.mkdir(parents=True, exist_ok=True)
                src = tar.extractfile(member)
                if src is None:  # pragma: no cover - isfile() members always have data
                    raise CompressionError(
                        f"cannot read tar {tar_path.name}: member {member.name!r} has no data"
                    )
                with src, target.open("wb") as out:
                    shutil.copyfileobj(src, out, _CHUNK)
                os.chmod(target, 0o644)
            # Read to the end of the file: a compressed stream's check and end marker come after the tar's last
            # block, and a file cut there must not pass for whole (tarfile's own stream mode does not look).
            while stream.read(_CHUNK):
                pass
    except _READ_ERRORS as e:
        raise CompressionError(f"cannot read tar {tar_path.name}: truncated or corrupt ({e})") from None
