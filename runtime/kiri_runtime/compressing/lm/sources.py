"""A causal LM source, checked and turned into a Hugging Face checkpoint directory.

Two formats (`--format hf|gguf`):

- **hf**: a checkpoint directory (config.json, *.safetensors [+ model.safetensors.index.json], tokenizer.json,
  tokenizer_config.json, chat template) given as a directory (a path or file://) or as a tar of it (file://, http://,
  https://, s3://; fetched with the runtime's fetcher: retries, resume, S3 signing, sha256 check). The tar may hold
  the files at its root or under one top-level directory.
- **gguf**: one GGUF file (path, file://, http(s)://, s3://). transformers reads it (`gguf_file=`) and dequantises
  every tensor to fp32; the model is rebuilt from that config without its quantization_config, tied if the config
  says so, and saved with save_pretrained next to the tokenizer the GGUF describes (its EOS/BOS checked against the
  GGUF's own metadata and corrected where transformers picked another token). The GGUF's tensor types are recorded
  so that a variant can carry its quantized blocks instead of quantizing again.

Architectures (`SUPPORTED_ARCHITECTURES`, HF `config.architectures[0]`): those both onnxruntime-genai 0.18's model
builder and transformers 5.25's GGUF loader handle:

| architecture | hf source | gguf source (general.architecture) | tested here |
|---|---|---|---|
| LlamaForCausalLM (LLaMA 2/3, SmolLM/SmolLM2, TinyLlama) | yes | "llama" | yes: the tests' trained tiny LLaMA, hf and gguf |
| MistralForCausalLM | yes | "mistral"; llama.cpp writes Mistral 7B as "llama" (loads as LLaMA, same weights) | no |
| Qwen2ForCausalLM | yes | "qwen2" | no |
| Qwen3ForCausalLM | yes | "qwen3" | no |
| Phi3ForCausalLM (Phi-3/3.5 mini; LongRoPE too) | yes | "phi3" (fused qkv/gate_up split by transformers) | no |

"Not tested here" means: the builder and the loader both list the architecture, this module treats it exactly like
LLaMA, but no model of that family was run (the tests never download). SmolLM3, Gemma, Phi-1/2, OLMo, Granite and
the MoE/VL models are refused: the builder or the GGUF loader lacks them, or they were out of scope.

GGUF tensor types (`SUPPORTED_GGUF_TYPES`): F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 and the K-quants Q2_K..Q6_K.
The importance-matrix (IQ*), ternary (TQ*) and FP4 (MXFP4, NVFP4) types are refused: they have no MatMulNBits form
and no verified dequantisation path here.

Every bad source raises `CompressionError` with one line that names the source and the problem.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import shutil
import struct
import urllib.parse
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, cast

from kiri_runtime.compressing.errors import CompressionError
from kiri_runtime.compressing.lm import packing

LM_FORMATS = ("hf", "gguf")

SUPPORTED_ARCHITECTURES: frozenset[str] = frozenset(
    {"LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "Phi3ForCausalLM"}
)
# GGUF general.architecture -> what transformers builds from it.
GGUF_ARCHITECTURES: Mapping[str, str] = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "phi3": "Phi3ForCausalLM",
}
SUPPORTED_GGUF_TYPES: frozenset[str] = frozenset(
    {"F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"}
)
TOKENIZER_FILES = ("tokenizer.json",)
_CHUNK = 1 << 20


@dataclass(frozen=True)
class LmSource:
    hf_dir: Path  # HF checkpoint dir: config.json, *.safetensors, tokenizer.json(+config), chat template
    format: Literal["hf", "gguf"]
    architecture: str  # e.g. "LlamaForCausalLM"
    sha256: (
        str  # of the source as fetched: the tar, the gguf, or a directory's file listing (directory_sha256)
    )
    size_bytes: int  # bytes of the source as given: the gguf file; the checkpoint's weight files
    gguf_path: Path | None = None
    gguf_tensor_types: Mapping[str, str] = field(
        default_factory=dict
    )  # GGUF tensor name -> "Q4_1", "F32", ...


def load_source(uri: str, fmt: str, work: Path, sha256: str | None = None) -> LmSource:
    """Fetch, check and (for a GGUF) dequantise `uri`; files land under `work`. `sha256` is checked when given."""
    if fmt not in LM_FORMATS:
        raise CompressionError(f"--format {fmt!r}: language model sources are {', '.join(LM_FORMATS)}")
    work.mkdir(parents=True, exist_ok=True)
    if fmt == "gguf":
        return _load_gguf(uri, work, sha256)
    return _load_hf(uri, work, sha256)


# --- hf ------------------------------------------------------------------------------------------------------------


def _local_dir(uri: str) -> Path | None:
    parsed = urllib.parse.urlparse(uri)
    if parsed.scheme in ("", "file"):
        path = Path(urllib.parse.unquote(parsed.path) if parsed.scheme == "file" else uri)
        if path.is_dir():
            return path
    return None


def directory_sha256(root: Path) -> str:
    """sha256 of a directory's `sha256sum`-style listing ("<hex>  <relative path>\\n", sorted by path)."""
    lines = []
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        lines.append(f"{_file_sha256(path)}  {path.relative_to(root).as_posix()}\n")
    return hashlib.sha256("".join(lines).encode()).hexdigest()


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(_CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def _expected(sha256: str | None) -> str | None:
    return None if sha256 is None else sha256.lower().removeprefix("sha256:")


def _load_hf(uri: str, work: Path, sha256: str | None) -> LmSource:
    local = _local_dir(uri)
    if local is not None:
        digest = directory_sha256(local)
        if _expected(sha256) not in (None, digest):
            raise CompressionError(f"source {uri}: sha256 mismatch: expected {sha256}, got {digest}")
        hf_dir = local
    else:
        from kiri_runtime.compressing.exporting import fetch

        tar, digest = fetch(uri, work, expected_sha256=sha256, what="source")
        unpacked = work / "source"
        if unpacked.exists():
            shutil.rmtree(unpacked)
        try:
            packing.unpack(tar, unpacked)
        except CompressionError as e:
            raise CompressionError(f"source {uri}: {e}") from None
        hf_dir = _checkpoint_root(unpacked)
    architecture, size = check_hf_dir(hf_dir, uri)
    return LmSource(hf_dir=hf_dir, format="hf", architecture=architecture, sha256=digest, size_bytes=size)


def _checkpoint_root(unpacked: Path) -> Path:
    """The tar's root, or its one top-level directory when the files sit under it."""
    if (unpacked / "config.json").exists():
        return unpacked
    entries = list(unpacked.iterdir())
    if len(entries) == 1 and entries[0].is_dir():
        return entries[0]
    return unpacked


def check_hf_dir(hf_dir: Path, uri: str | None = None) -> tuple[str, int]:
    """(architecture, weight bytes) of a checkpoint directory, or a one-line CompressionError on what is wrong."""
    where = f"source {uri or hf_dir}"
    config_path = hf_dir / "config.json"
    if not config_path.is_file():
        raise CompressionError(f"{where}: no config.json: not a Hugging Face checkpoint directory")
    try:
        config = json.loads(config_path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise CompressionError(f"{where}: config.json is not valid JSON ({e})") from None
    archs = config.get("architectures") if isinstance(config, dict) else None
    if not archs or not isinstance(archs, list) or not isinstance(archs[0], str):
        raise CompressionError(f'{where}: config.json names no architecture ("architectures": [...])')
    architecture = archs[0]
    if architecture not in SUPPORTED_ARCHITECTURES:
        raise CompressionError(
            f"{where}: architecture {architecture} is not supported (supported: {', '.join(sorted(SUPPORTED_ARCHITECTURES))})"
        )
    missing = [name for name in TOKENIZER_FILES if not (hf_dir / name).is_file()]
    if missing:
        raise CompressionError(f"{where}: no tokenizer: {', '.join(missing)} is missing")
    weights = _weight_files(hf_dir, where)
    for path in weights:
        check_safetensors(path, where)
    return architecture, sum(p.stat().st_size for p in weights)


def _weight_files(hf_dir: Path, where: str) -> list[Path]:
    index = hf_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            names = sorted(set(cast(dict[str, str], weight_map).values()))
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise CompressionError(f"{where}: model.safetensors.index.json is malformed ({e})") from None
        absent = [n for n in names if not (hf_dir / n).is_file()]
        if absent:
            raise CompressionError(
                f"{where}: weight shard {absent[0]} is missing (listed in model.safetensors.index.json)"
            )
        return [hf_dir / n for n in names]
    found = sorted(hf_dir.glob("*.safetensors"))
    if found:
        return found
    if any(hf_dir.glob("*.bin")) or any(hf_dir.glob("*.pt")):
        raise CompressionError(f"{where}: weights are pickled (*.bin/*.pt); Kiri reads safetensors only")
    raise CompressionError(f"{where}: no weights (*.safetensors)")


def check_safetensors(path: Path, where: str = "source") -> None:
    """The file holds every byte its header describes (a truncated download fails here, not in the builder)."""
    size = path.stat().st_size
    with path.open("rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise CompressionError(f"{where}: {path.name} is truncated: {size} bytes, no safetensors header")
        (n,) = struct.unpack("<Q", head)
        if 8 + n > size:
            raise CompressionError(
                f"{where}: {path.name} is truncated: its header says {8 + n} bytes of header, the file has {size}"
            )
        try:
            header = json.loads(fh.read(n))
            ends = [int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"]
        except (ValueError, KeyError, TypeError, AttributeError, IndexError) as e:
            raise CompressionError(f"{where}: {path.name} has a corrupt safetensors header ({e})") from None
    expected = 8 + n + max(ends, default=0)
    if size < expected:
        raise CompressionError(
            f"{where}: {path.name} is truncated: its header says {expected} bytes, the file has {size}"
        )


# --- gguf ----------------------------------------------------------------------------------------------------------


def _load_gguf(uri: str, work: Path, sha256: str | None) -> LmSource:
    from kiri_runtime.compressing.exporting import fetch

    local, digest = fetch(uri, work, expected_sha256=sha256, what="source")
    where = f"source {uri}"
    meta = read_gguf(local, where)
    hf_dir = work / "hf"
    if hf_dir.exists():
        shutil.rmtree(hf_dir)
    _dequantise(local, hf_dir, meta, where)
    architecture, _ = check_hf_dir(hf_dir, uri)
    return LmSource(
        hf_dir=hf_dir,
        format="gguf",
        architecture=architecture,
        sha256=digest,
        size_bytes=local.stat().st_size,
        gguf_path=local,
        gguf_tensor_types=meta.tensor_types,
    )


@dataclass(frozen=True)
class GgufMeta:
    architecture: str  # general.architecture, e.g. "llama"
    tensor_types: Mapping[str, str]  # tensor name -> GGMLQuantizationType name
    tokens: tuple[str, ...]
    bos_token_id: int | None
    eos_token_id: int | None
    chat_template: str | None


class _Short(Exception):
    pass


# GGUF metadata value types -> byte size (8 string, 9 array are variable).
_GGUF_SCALAR_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}


def gguf_extent(path: Path, where: str = "source") -> int:
    """Bytes the GGUF's header says the file holds (header + aligned tensor data); CompressionError if it cannot."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    size = path.stat().st_size
    with path.open("rb") as fh:

        def take(n: int) -> bytes:
            b = fh.read(n)
            pos[0] += len(b)
            if len(b) < n:
                raise _Short
            return b

        def u32() -> int:
            return int(struct.unpack("<I", take(4))[0])

        def u64() -> int:
            return int(struct.unpack("<Q", take(8))[0])

        def string() -> str:
            return take(u64()).decode("utf-8", "replace")

        def skip_value(vtype: int) -> Any:
            if vtype == 8:
                return string()
            if vtype == 9:
                itype, n = u32(), u64()
                if itype in _GGUF_SCALAR_SIZES:
                    take(n * _GGUF_SCALAR_SIZES[itype])
                else:
                    for _ in range(n):
                        skip_value(itype)
                return None
            if vtype not in _GGUF_SCALAR_SIZES:
                raise CompressionError(f"{where}: GGUF is corrupt: unknown metadata value type {vtype}")
            raw = take(_GGUF_SCALAR_SIZES[vtype])
            return int.from_bytes(raw, "little") if vtype in (4, 10) else None

        pos = [0]
        try:
            if take(4) != b"GGUF":
                raise CompressionError(f"{where}: not a GGUF file (no GGUF magic)")
            version = u32()
            if version not in (2, 3):
                raise CompressionError(f"{where}: GGUF version {version} is not supported (2 or 3)")
            n_tensors, n_kv = u64(), u64()
            alignment = 32
            for _ in range(n_kv):
                key = string()
                value = skip_value(u32())
                if key == "general.alignment" and isinstance(value, int) and value > 0:
                    alignment = value
            end = 0
            for _ in range(n_tensors):
                name = string()
                dims = [u64() for _ in range(u32())]
                type_id, offset = u32(), u64()
                try:
                    block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(type_id)]
                except (ValueError, KeyError):
                    raise CompressionError(
                        f"{where}: GGUF tensor {name} has unknown type id {type_id}"
                    ) from None
                count = 1
                for d in dims:
                    count *= d
                end = max(end, offset + count // block * type_size)
            header = pos[0]
        except _Short:
            raise CompressionError(
                f"{where}: GGUF is truncated: its header ends early (the file has {size} bytes)"
            ) from None
    need = header + (-header % alignment) + end
    if need > size:
        raise CompressionError(
            f"{where}: GGUF is truncated: its header says {need} bytes, the file has {size}"
        )
    return need


def read_gguf(path: Path, where: str = "source") -> GgufMeta:
    """The GGUF's header, checked: complete, a supported architecture and supported tensor types."""
    import numpy as np
    from gguf import GGUFReader

    gguf_extent(path, where)
    try:
        reader = GGUFReader(str(path))
    except Exception as e:  # the reader raises ValueError, IndexError, struct errors... on a bad file
        text = " ".join(str(e).split()) or type(e).__name__
        raise CompressionError(f"{where}: GGUF is corrupt ({text})") from None

    def field_value(key: str) -> Any:
        f = reader.get_field(key)
        return None if f is None else f.contents()

    arch = field_value("general.architecture")
    if not isinstance(arch, str):
        raise CompressionError(f"{where}: GGUF has no general.architecture")
    if arch not in GGUF_ARCHITECTURES:
        raise CompressionError(
            f"{where}: GGUF architecture {arch!r} is not supported (supported: {', '.join(sorted(GGUF_ARCHITECTURES))})"
        )
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    bad = sorted((name, ttype) for name, ttype in types.items() if ttype not in SUPPORTED_GGUF_TYPES)
    if bad:
        name, ttype = bad[0]
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        raise CompressionError(
            f"{where}: GGUF tensor {name} has type {ttype}{more}, which Kiri cannot read "
            f"(supported: {', '.join(sorted(SUPPORTED_GGUF_TYPES))})"
        )
    tokens = field_value("tokenizer.ggml.tokens")
    if not isinstance(tokens, list) or not tokens:
        raise CompressionError(f"{where}: GGUF has no tokenizer (tokenizer.ggml.tokens)")

    def token_id(key: str) -> int | None:
        v = field_value(key)
        return int(v) if isinstance(v, int | np.integer) else None

    template = field_value("tokenizer.chat_template")
    return GgufMeta(
        architecture=arch,
        tensor_types=types,
        tokens=tuple(str(t) for t in tokens),
        bos_token_id=token_id("tokenizer.ggml.bos_token_id"),
        eos_token_id=token_id("tokenizer.ggml.eos_token_id"),
        chat_template=template if isinstance(template, str) else None,
    )


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """transformers prints progress bars and notices while it reads a GGUF; keep `kiri compress` output readable."""
    logger = logging.getLogger("transformers")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with (
            warnings.catch_warnings(),
            contextlib.redirect_stdout(io.StringIO()),
            contextlib.redirect_stderr(io.StringIO()),
        ):
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def _dequantise(gguf_path: Path, hf_dir: Path, meta: GgufMeta, where: str) -> None:
    """The GGUF as an fp32 HF checkpoint: weights, config, generation config, tokenizer, chat template."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    try:
        with _quiet():
            loaded = AutoModelForCausalLM.from_pretrained(
                str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32
            )
            tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    except Exception as e:  # transformers raises many types for a file it cannot map
        text = " ".join(str(e).split())[:300] or type(e).__name__
        raise CompressionError(f"{where}: transformers cannot load this GGUF: {text}") from None

    config = loaded.config
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    state = loaded.state_dict()
    with torch.device("meta"):
        model = type(loaded)(config)
    model.load_state_dict(state, strict=False, assign=True)
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    missing = [n for n, p in model.named_parameters() if p.is_meta]
    if missing:
        raise CompressionError(f"{where}: GGUF lacks weights for {missing[0]} ({len(missing)} missing)")
    del loaded

    # EOS/BOS as the GGUF states them (transformers' GGUF tokenizer and config may pick a default instead).
    fixes: dict[str, Any] = {}
    for role, token_id in (("eos", meta.eos_token_id), ("bos", meta.bos_token_id)):
        if token_id is None or not 0 <= token_id < len(meta.tokens):
            continue
        if getattr(tokenizer, f"{role}_token_id") != token_id:
            fixes[f"{role}_token"] = tokenizer.convert_ids_to_tokens(token_id)
        setattr(config, f"{role}_token_id", token_id)
    if fixes:
        tokenizer.add_special_tokens(fixes)
    if meta.chat_template and not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = meta.chat_template
    with _quiet():
        model.save_pretrained(hf_dir, safe_serialization=True)
        GenerationConfig(  # type: ignore[no-untyped-call]
            bos_token_id=config.bos_token_id,
            eos_token_id=config.eos_token_id,
            pad_token_id=getattr(config, "pad_token_id", None),
        ).save_pretrained(hf_dir)
        tokenizer.save_pretrained(hf_dir)
    # Drop what transformers records about this load (not the tokenizer's) and a limit that means "none".
    tc_path = hf_dir / "tokenizer_config.json"
    tc = json.loads(tc_path.read_text())
    for key in ("is_local", "local_files_only"):
        tc.pop(key, None)
    positions = getattr(config, "max_position_embeddings", None)
    if isinstance(positions, int) and tc.get("model_max_length", 0) > positions:
        tc["model_max_length"] = positions
    tc_path.write_text(json.dumps(tc, indent=2, sort_keys=True) + "\n")
    for role, token_id in (("eos", meta.eos_token_id), ("bos", meta.bos_token_id)):
        if token_id is not None and getattr(tokenizer, f"{role}_token_id") != token_id:
            raise CompressionError(
                f"{where}: the GGUF's {role} token id {token_id} could not be set on its tokenizer"
            )
