"""packing: a model directory as one deterministic tar (plain or xz); unpacking refuses unsafe members."""

from __future__ import annotations

import hashlib
import io
import lzma
import os
import tarfile
from pathlib import Path

import pytest

from kiri_runtime.compressing.errors import CompressionError
from kiri_runtime.compressing.lm.packing import pack, unpack

pytestmark = pytest.mark.timeout(20)


def _model_dir(root: Path) -> Path:
    d = root / "model"
    (d / "sub").mkdir(parents=True)
    (d / "model.onnx").write_bytes(b"onnx" * 1000)
    (d / "model.onnx.data").write_bytes(os.urandom(5000))
    (d / "genai_config.json").write_text('{"model": {}}\n')
    (d / "sub" / "tokenizer.json").write_text("{}\n")
    return d


def test_two_packs_of_the_same_files_have_the_same_bytes_and_sha256_despite_other_mtimes_and_modes(
    tmp_path: Path,
) -> None:
    d = _model_dir(tmp_path)
    sha1, size1 = pack(d, tmp_path / "a.tar")
    os.utime(d / "model.onnx", (1_000_000, 1_000_000))
    os.chmod(d / "genai_config.json", 0o600)
    sha2, size2 = pack(d, tmp_path / "b.tar")
    assert (sha1, size1) == (sha2, size2)
    assert (tmp_path / "a.tar").read_bytes() == (tmp_path / "b.tar").read_bytes()
    assert sha1 == hashlib.sha256((tmp_path / "a.tar").read_bytes()).hexdigest()
    assert size1 == (tmp_path / "a.tar").stat().st_size


def test_pack_writes_regular_files_only_sorted_with_zero_mtime_and_owner_and_mode_0644(
    tmp_path: Path,
) -> None:
    _, _ = pack(_model_dir(tmp_path), tmp_path / "m.tar")
    with tarfile.open(tmp_path / "m.tar") as tar:
        members = tar.getmembers()
    assert [m.name for m in members] == [
        "genai_config.json",
        "model.onnx",
        "model.onnx.data",
        "sub/tokenizer.json",
    ]
    assert {(m.type, m.mtime, m.mode, m.uid, m.gid, m.uname, m.gname) for m in members} == {
        (tarfile.REGTYPE, 0, 0o644, 0, 0, "", "")
    }


def test_pack_is_uncompressed_by_default(tmp_path: Path) -> None:
    pack(_model_dir(tmp_path), tmp_path / "m.tar")
    with tarfile.open(tmp_path / "m.tar", "r:") as tar:  # "r:" opens plain tars only
        assert tar.getnames()[0] == "genai_config.json"


def test_unpack_restores_every_file_byte_for_byte(tmp_path: Path) -> None:
    d = _model_dir(tmp_path)
    pack(d, tmp_path / "m.tar")
    out = unpack(tmp_path / "m.tar", tmp_path / "out")
    assert out == tmp_path / "out"
    for rel in ("model.onnx", "model.onnx.data", "genai_config.json", "sub/tokenizer.json"):
        assert (out / rel).read_bytes() == (d / rel).read_bytes()


def test_pack_refuses_a_directory_holding_a_link(tmp_path: Path) -> None:
    d = _model_dir(tmp_path)
    (d / "link").symlink_to(d / "model.onnx")
    with pytest.raises(CompressionError) as e:
        pack(d, tmp_path / "m.tar")
    assert str(e.value) == f"cannot pack {d}: link is a link"


def _tar_with(path: Path, info: tarfile.TarInfo, data: bytes = b"") -> Path:
    with tarfile.open(path, "w") as tar:
        ok = tarfile.TarInfo("config.json")
        ok.size = 2
        tar.addfile(ok, io.BytesIO(b"{}"))
        info.size = len(data) if info.type == tarfile.REGTYPE else 0
        tar.addfile(info, io.BytesIO(data) if data else None)
    return path


def _member(name: str, kind: bytes = tarfile.REGTYPE, linkname: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    return info


@pytest.mark.parametrize(
    ("member", "problem"),
    [
        (_member("/etc/evil"), "has an absolute path"),
        (_member("../evil"), "escapes the directory"),
        (_member("a/../../evil"), "escapes the directory"),
        (_member("link", tarfile.SYMTYPE, "/etc/passwd"), "is a link"),
        (_member("hard", tarfile.LNKTYPE, "config.json"), "is a link"),
        (_member("fifo", tarfile.FIFOTYPE), "is not a regular file"),
        (_member("dev", tarfile.CHRTYPE), "is not a regular file"),
    ],
    ids=["absolute", "dotdot", "nested-dotdot", "symlink", "hardlink", "fifo", "device"],
)
def test_unpack_refuses_an_unsafe_member_and_writes_nothing(
    tmp_path: Path, member: tarfile.TarInfo, problem: str
) -> None:
    tar = _tar_with(tmp_path / "bad.tar", member, b"x" if member.type == tarfile.REGTYPE else b"")
    with pytest.raises(CompressionError) as e:
        unpack(tar, tmp_path / "out")
    assert str(e.value) == f"unsafe tar bad.tar: member {member.name!r} {problem}"
    assert not (tmp_path / "out").exists()


def test_unpack_refuses_a_truncated_tar(tmp_path: Path) -> None:
    d = _model_dir(tmp_path)
    pack(d, tmp_path / "m.tar")
    data = (tmp_path / "m.tar").read_bytes()
    (tmp_path / "cut.tar").write_bytes(data[:3000])  # inside model.onnx's 4000 bytes
    with pytest.raises(CompressionError) as e:
        unpack(tmp_path / "cut.tar", tmp_path / "out")
    assert str(e.value) == "cannot read tar cut.tar: truncated or corrupt (unexpected end of data)"


def test_an_xz_pack_is_the_plain_tar_through_lzma_and_is_deterministic(tmp_path: Path) -> None:
    d = _model_dir(tmp_path)
    _, plain_size = pack(d, tmp_path / "m.tar")
    sha1, size1 = pack(d, tmp_path / "a.tar.xz", compression="xz")
    os.utime(d / "model.onnx", (1_000_000, 1_000_000))
    sha2, size2 = pack(d, tmp_path / "b.tar.xz", compression="xz")
    assert (sha1, size1) == (sha2, size2)
    packed = (tmp_path / "a.tar.xz").read_bytes()
    assert packed[:6] == b"\xfd7zXZ\x00"  # the .xz container's magic
    assert lzma.decompress(packed) == (tmp_path / "m.tar").read_bytes()
    assert sha1 == hashlib.sha256(packed).hexdigest() and size1 == len(packed)
    assert size1 < plain_size  # the 4000 bytes of "onnx" * 1000 and the tar headers compress
    assert tarfile.is_tarfile(tmp_path / "a.tar.xz")  # what the runtime's loader asks
    assert not list(tmp_path.glob(".*partial"))


def test_unpack_restores_an_xz_pack_byte_for_byte_into_an_existing_directory(tmp_path: Path) -> None:
    d = _model_dir(tmp_path)
    pack(d, tmp_path / "m.tar.xz", compression="xz")
    (tmp_path / "out").mkdir()  # the runtime's cache unpacks into a fresh mkdtemp directory
    out = unpack(tmp_path / "m.tar.xz", tmp_path / "out")
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()) == [
        "genai_config.json",
        "model.onnx",
        "model.onnx.data",
        "sub/tokenizer.json",
    ]
    for rel in ("model.onnx", "model.onnx.data", "genai_config.json", "sub/tokenizer.json"):
        assert (out / rel).read_bytes() == (d / rel).read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.tar.xz", "model", "out"]  # no staging left


@pytest.mark.parametrize("keep", [0.5, -8], ids=["cut-in-the-data", "cut-in-the-xz-check-after-the-tar"])
def test_unpack_refuses_a_truncated_xz_pack_and_writes_nothing(tmp_path: Path, keep: float) -> None:
    pack(_model_dir(tmp_path), tmp_path / "m.tar.xz", compression="xz")
    data = (tmp_path / "m.tar.xz").read_bytes()
    (tmp_path / "cut.tar.xz").write_bytes(data[: int(len(data) * keep)] if keep > 0 else data[: int(keep)])
    with pytest.raises(CompressionError) as e:
        unpack(tmp_path / "cut.tar.xz", tmp_path / "out")
    assert str(e.value).startswith("cannot read tar cut.tar.xz: truncated or corrupt (")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cut.tar.xz", "m.tar.xz", "model"]


def test_pack_refuses_an_unknown_compression(tmp_path: Path) -> None:
    with pytest.raises(CompressionError) as e:
        pack(_model_dir(tmp_path), tmp_path / "m.tar.gz", compression="gz")
    assert str(e.value) == "unknown artifact compression 'gz'; known: none, xz"
    assert not (tmp_path / "m.tar.gz").exists()
