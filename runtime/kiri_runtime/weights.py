"""Model weights files: safetensors, which Kiri writes, and torch state dicts, which users may still give.

Kiri writes weights (the learning loop's initial and per-round global weights) as safetensors
(https://huggingface.co/docs/safetensors): a u64 little-endian header length, a JSON header naming each
tensor's dtype, shape and byte range, then the raw tensors. Reading one never runs code and needs no pickle.
A user's own `torch.save(model.state_dict())` file is still read, with `torch.load(weights_only=True)` so it
cannot run code either. The format is told by the `.safetensors` suffix or, whatever the name (a fetched file
may be named by its digest), by sniffing the header. Every failure is one `WeightsError` line that names the
file; nothing here prints a traceback. torch is imported only when a file is read or written.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

SUFFIX = ".safetensors"
TORCH_SUFFIX = ".pt"
HEADER_LENGTH_BYTES = 8  # safetensors: the header's length, u64 little-endian, comes first
MAX_HEADER_BYTES = 100 * 1000 * 1000  # the safetensors library's own limit
_ZIP_MAGIC = b"PK\x03\x04"  # torch.save's format since torch 1.6
_PICKLE_MAGIC = b"\x80"  # the legacy format: a pickle (protocol 2 or later)
# The convention for torch tensors: tells readers which framework wrote the file.
FORMAT_METADATA = {"format": "pt"}


class WeightsError(Exception):
    """A weights file that cannot be read or written. The message is one line and names the file."""


def _one_line(e: BaseException | str, limit: int = 300) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= limit else text[: limit - 1] + "…"


def is_safetensors_header(head: bytes, size: int) -> bool:
    """Whether the first bytes of a file of `size` bytes start a safetensors header: a length that fits, then `{`.

    A torch file starts with a zip (`PK`) or pickle (0x80) signature, which as a length is far too large.
    """
    if len(head) < HEADER_LENGTH_BYTES + 1:
        return False
    length = int.from_bytes(head[:HEADER_LENGTH_BYTES], "little")
    return 2 <= length <= min(MAX_HEADER_BYTES, size - HEADER_LENGTH_BYTES) and head[8:9] == b"{"


def is_safetensors(path: Path) -> bool:
    """By suffix, else by sniffing the header (an unreadable file is not safetensors; `load` then says why)."""
    if path.suffix == SUFFIX:
        return True
    try:
        with path.open("rb") as f:
            head = f.read(HEADER_LENGTH_BYTES + 1)
        return is_safetensors_header(head, path.stat().st_size)
    except OSError:
        return False


def suffix_for(data: bytes) -> str:
    """The file suffix for weights held in memory (a download): `.safetensors` or `.pt`."""
    return SUFFIX if is_safetensors_header(data[: HEADER_LENGTH_BYTES + 1], len(data)) else TORCH_SUFFIX


def load(path: Path) -> dict[str, torch.Tensor]:
    """The state dict in `path` (safetensors or a torch state dict), on the CPU."""
    if not path.is_file():
        raise WeightsError(f"weights file {path} does not exist")
    if is_safetensors(path):
        return _load_safetensors(path)
    return _load_torch(path)


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    import safetensors.torch

    try:
        # load_file maps the file rather than reading it into memory first; the library checks that the
        # header is bounded JSON and that the byte ranges tile the rest of the file exactly.
        state: dict[str, torch.Tensor] = safetensors.torch.load_file(path, device="cpu")
    except Exception as e:  # SafetensorError names what does not fit: header length, JSON, offsets, dtype
        raise WeightsError(f"weights {path}: not a valid safetensors file: {_one_line(e)}") from None
    return state


def _torch_failure(e: BaseException) -> str:
    """Why torch.load(weights_only=True) failed, in one line without torch's advice to load unsafely."""
    text = " ".join(str(e).split())
    marker = "WeightsUnpickler error:"
    if marker in text:
        detail = text.split(marker, 1)[1].strip().split(". ")[0].rstrip(".")
        return f"a torch file that holds more than tensors, refused (loading it could run code): {detail}"
    return f"not a readable torch state dict: {type(e).__name__}: {text.split('. ')[0].rstrip('.')}"


def _load_torch(path: Path) -> dict[str, torch.Tensor]:
    import torch

    try:
        with path.open("rb") as f:
            head = f.read(len(_ZIP_MAGIC))
    except OSError as e:
        raise WeightsError(f"weights {path}: cannot read: {_one_line(e)}") from None
    if not head.startswith((_ZIP_MAGIC, _PICKLE_MAGIC)):
        what = f"it starts with bytes {head.hex()}" if head else "it is empty"
        raise WeightsError(f"weights {path}: neither safetensors nor a torch state dict ({what})")
    try:
        state: Any = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, corrupt, or a pickle that would run code (weights_only refuses it)
        raise WeightsError(f"weights {path}: {_one_line(_torch_failure(e))}") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]  # a training checkpoint that nests the state dict
    if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
        raise WeightsError(
            f"weights {path}: holds a {type(state).__name__}, not a state dict (a mapping of names to tensors)"
        )
    return state


def _plain(state: Mapping[str, Any], path: Path) -> dict[str, torch.Tensor]:
    """Detached, contiguous CPU tensors with no shared storage: what safetensors can write.

    Tied weights (one parameter under two names) are written twice; loading fills both with the same values.
    """
    import torch

    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise WeightsError(f"weights {path}: {name!r} holds {type(value).__name__}, not a tensor")
        t = value.detach().cpu()
        ptr = t.untyped_storage().data_ptr()
        whole = t.is_contiguous() and t.numel() * t.element_size() == t.untyped_storage().nbytes()
        if ptr in seen or not whole:
            t = t.contiguous().clone()
        else:
            seen.add(ptr)
        out[name] = t
    return out


def save(state: Mapping[str, Any], path: Path, metadata: Mapping[str, str] | None = None) -> None:
    """Write `state` as safetensors, atomically: readers see the old file or the whole new one."""
    import safetensors.torch

    tensors = _plain(state, path)
    meta = {**FORMAT_METADATA, **(metadata or {})}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        safetensors.torch.save_file(tensors, tmp, metadata=meta)
        tmp.replace(path)
    except Exception as e:
        tmp.unlink(missing_ok=True)
        raise WeightsError(f"weights {path}: cannot write: {_one_line(e)}") from None
