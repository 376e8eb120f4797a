"""A model directory as one artifact: an uncompressed, deterministic tar, and its safe unpacking.

`pack` writes the directory's regular files only (no directory entries, no links), sorted by relative path, each
with mtime 0, uid/gid 0, empty owner names and mode 0644, in POSIX (pax) format without extended headers unless a
name needs one, and ends with the two zero blocks of the format (no padding to tarfile's 10 KiB record: every
tar reader stops at those blocks, and the padding was up to 10 KiB of zeros in every artifact). The same files therefore give the same bytes, hence the same sha256, on every machine and every
run: the fetcher, cache, pins and resume treat the variant like any other artifact. Uncompressed because the
weights are already dense (int4 blocks compress by a few percent) and the edge can then unpack without inflating.

`unpack` refuses, with one `CompressionError` line, any member that is not a regular file or whose name is
absolute, contains '..', or is a link; nothing is written outside `dest`.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tarfile
from pathlib import Path, PurePosixPath

from kiri_runtime.compressing.errors import CompressionError

_CHUNK = 1 << 20


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


def pack(model_dir: Path, tar_path: Path) -> tuple[str, int]:
    """Write `model_dir`'s files into `tar_path`; return (sha256 hex, size in bytes) of the tar."""
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


def _open_tar(tar_path: Path) -> tarfile.TarFile:
    try:
        return tarfile.open(tar_path, "r:*")
    except (tarfile.TarError, OSError) as e:
        raise CompressionError(f"cannot read tar {tar_path.name}: {e}") from None


def unpack(tar_path: Path, dest: Path) -> Path:
    """Extract `tar_path` (any tar, compressed or not) into `dest`, refusing unsafe members; return `dest`."""
    with _open_tar(tar_path) as tar:
        try:
            members = tar.getmembers()
        except (tarfile.TarError, OSError, EOFError) as e:
            raise CompressionError(f"cannot read tar {tar_path.name}: truncated or corrupt ({e})") from None
        checked = [(m, _check_member(tar_path, m)) for m in members]
        dest.mkdir(parents=True, exist_ok=True)
        root = dest.resolve()
        for member, name in checked:
            if not member.isfile():
                continue
            target = root.joinpath(*name.parts)
            if root not in target.resolve().parents:
                raise CompressionError(
                    f"unsafe tar {tar_path.name}: member {member.name!r} escapes the directory"
                )
            target.parent.mkdir(parents=True, exist_ok=True)
            src = tar.extractfile(member)
            if src is None:  # pragma: no cover - isfile() members always have data
                raise CompressionError(f"cannot read tar {tar_path.name}: member {member.name!r} has no data")
            try:
                with src, target.open("wb") as out:
                    shutil.copyfileobj(src, out, _CHUNK)
            except (tarfile.TarError, OSError, EOFError) as e:
                raise CompressionError(
                    f"cannot read tar {tar_path.name}: member {member.name!r} is truncated ({e})"
                ) from None
            os.chmod(target, 0o644)
    return dest
