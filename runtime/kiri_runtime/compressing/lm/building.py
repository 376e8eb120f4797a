"""Build an onnxruntime-genai model directory from a Hugging Face checkpoint: fp32, fp16, int8 or int4 (`build`).

The work is done by onnxruntime-genai's model builder (`python -m onnxruntime_genai.models.builder -e cpu`), run as a
child process so its noise (progress bars, prints, torch warnings) stays out of our output and a crash in it cannot
take the compressor down; a failure becomes one CompressionError line (the builder's own last error line).
The result holds model.onnx (+ model.onnx.data), genai_config.json and the tokenizer files.

OPTIONS (camelCase, as in ModelDeployment spec.edge.variants[].options), int4 and int8 only:
  blockSize      16|32|64|128|256, default 32: MatMulNBits block size along K.
  symmetric      bool, default True: signed weights and no zero points; False: unsigned with integer zero points.
  accuracyLevel  0..4, default 4: MatMulNBits' compute type on CPU (4: activations quantized to int8).
  algorithm      "rtn" (default; the builder's MLAS round-to-nearest) | "k_quant" (the builder's k-quant search) |
                 "hqq" (int4 only: onnxruntime's HQQ quantizer over the builder's fp32 graph; float zero points) |
                 "imatrix" (int4 only: per-block scales that minimise the activation-weighted error, importance
                 measured on the eval data; weighting.py; same bytes as rtn).
  int4 only:
  int8LmHead     bool, default False: lm_head at 8 bits.
  int8Layers     "none" (default) | "first-last" (every projection of the first and last decoder layer at 8 bits) |
                 "mixed" (llama.cpp's choice: first/last eighth of the layers and every third layer's qkv/down).
  int8Tensors    list of projection names, default []: these MatMuls at 8 bits, named "lm_head" or
                 "layers.N.attn.qkv_proj" (q_proj/k_proj/v_proj when fuseQkv is false), "layers.N.attn.o_proj",
                 "layers.N.mlp.gate_proj|up_proj|down_proj". What a size budget chooses (budgeting.py, `maxBytes`).
  int8Embeddings bool, default False: the token embedding stays out of 4 bits. onnxruntime's quantizer writes
                 GatherBlockQuantized at 4 bits only, so "not 4-bit" means a float Gather; this only changes models
                 that tie embeddings and lm_head (the builder shares one 4-bit table between them by default).
  fuseQkv        bool, default True: one q|k|v projection per layer (False: three; transcoding a GGUF needs them apart).
  halfScales     bool, default True: block scales (and float zero points) stored as float16, cast to float32 when
                 the session starts (compacting.py); the scales llama.cpp stores. False: float32 as the builder wrote.
  embeddingBits  4|8|32, default 8: a float token embedding (untied models, or int8Embeddings) stored as symmetric
                 8-bit (Q8_0-like) or 4-bit (Q4_0-like) blocks of 32, dequantised after the Gather; 32 keeps float32.
  Every precision:
  loraTargets    "q_proj,v_proj" (a comma-separated string or a list) of q_proj, k_proj, v_proj, o_proj, gate_proj,
                 up_proj, down_proj: the build is LoRA-ready (adapting.py): those projections take onnxruntime-genai
                 adapters at run time (`kiri serve --adapter`), and compute exactly as before without one.
                 Default: none.
  Every int4/int8 build also computes the rotary cos/sin tables in the graph instead of storing them and writes its
  JSON unindented (compacting.py).

Measured (tiny LLaMA: hidden 128, 2 layers, vocab 512, trained a few seconds; KL mean over 800 teacher-forced
positions against the HF fp32 model; sizes of the whole directory):
  - int4 route: the builder's int4 IS onnxruntime's MatMulNBitsQuantizer (the builder calls it on its own fp32 graph):
    builder int4 and MatMulNBitsQuantizer(block 32, symmetric, accuracy 4) over the builder's fp32 build gave the same
    KL (0.00686) and size (597 015 vs 595 918 bytes). So the builder is the route (one step, genai_config and
    tokenizer written, loads in onnxruntime-genai); the quantizer is used only for what the builder lacks: HQQ
    (KL 0.00486, 642 665 bytes: float zero points). Same model: asymmetric 0.00539 (605 421), k_quant 0.00559
    (605 190), int8 lm_head 0.00438 (629 783), block 16 0.00566 (642 072).
  - is_symmetric=false (onnxruntime-genai 0.18): loads and runs for a model with untied embeddings; with tied
    embeddings the builder's shared 4-bit GatherBlockQuantized table is uint4 and the graph does not load
    ("Type (tensor(uint8)) of output arg (/model/embed_tokens/Reshape/output_0) does not match ... float"). `build`
    therefore turns sharing off for asymmetric int4 (the embedding becomes a float Gather, lm_head its own 4-bit
    MatMulNBits); that model loads and runs.
  - int8: the builder's default for a tied model asks for Gather at 8 bits, which onnxruntime's quantizer refuses
    ("Gather only supports 4 bits quantization", logged, the Gather left float); `build` limits int8 to MatMul and
    turns sharing off, so the result is the same and says so. KL 0.00007, 777 241 bytes (fp32: 1 809 681).
  - fp16 with -e cpu: the builder writes it (fp16 weights, fp16 logits, MultiHeadAttention instead of
    GroupQueryAttention) and onnxruntime-genai loads it; one teacher-forced pass runs (KL 0.0000 vs fp32,
    976 694 bytes), but decoding fails at the second token: "Shape mismatch attempting to re-use buffer.
    {1,1,128} != {1,5,128}" in a Cast that onnxruntime's CPU provider inserts (it has no fp16 kernels for most of the
    graph). So an fp16 variant is not servable on a CPU node. `-p fp16 -e cuda` exports fine on a machine without a
    GPU, but the result needs onnxruntime-genai's CUDA build to load (not installed here, so not verified): fp16 is
    for GPU nodes only.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import shutil
import subprocess
import sys
import tempfile
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Literal, get_args

from kiri_runtime.compressing.errors import CompressionError

Precision = Literal["fp32", "fp16", "int8", "int4"]
PRECISIONS: tuple[str, ...] = get_args(Precision)
BLOCK_SIZES = (16, 32, 64, 128, 256)
ALGORITHMS = ("rtn", "k_quant", "hqq", "imatrix")
INT8_LAYERS = ("none", "first-last", "mixed")
INT_OPTIONS = {
    "blockSize",
    "symmetric",
    "accuracyLevel",
    "algorithm",
    "fuseQkv",
    "halfScales",
    "embeddingBits",
}
EMBEDDING_BITS = (4, 8, 32)
INT4_OPTIONS = INT_OPTIONS | {"int8LmHead", "int8Layers", "int8Embeddings", "int8Tensors"}
TENSOR_NAME = re.compile(
    r"^(?:lm_head|layers\.(\d+)\.(attn\.(?:qkv|q|k|v|o)_proj|mlp\.(?:gate|up|down)_proj))$"
)
KNOWN_OPTIONS: dict[str, set[str]] = {
    "fp32": {"fuseQkv", "loraTargets"},
    "fp16": {"fuseQkv", "loraTargets"},
    "int8": INT_OPTIONS | {"loraTargets"},
    "int4": INT4_OPTIONS | {"loraTargets"},
}
DEFAULTS: dict[str, Any] = {
    "blockSize": 32,
    "symmetric": True,
    "accuracyLevel": 4,
    "algorithm": "rtn",
    "int8LmHead": False,
    "int8Layers": "none",
    "int8Embeddings": False,
    "int8Tensors": [],
    "fuseQkv": True,
    "halfScales": True,
    "embeddingBits": 8,
}
BUILDER_TIMEOUT_S = 3600
PROJECTIONS = ("attn/o_proj", "mlp/gate_proj", "mlp/up_proj", "mlp/down_proj")


def resolve(precision: str, options: Mapping[str, Any] | None) -> dict[str, Any]:
    """The full option set of a build (defaults filled in), or a CompressionError naming the bad value."""
    if precision not in PRECISIONS:
        raise CompressionError(f"unknown precision {precision!r}; known: {', '.join(PRECISIONS)}")
    given = {k: v for k, v in (options or {}).items() if v is not None}
    known = KNOWN_OPTIONS[precision]
    unknown = sorted(set(given) - known)
    if unknown:
        raise CompressionError(f"{precision}: unknown options {unknown}; known: {sorted(known)}")
    merged = {k: DEFAULTS[k] for k in sorted(known) if k in DEFAULTS} | given
    if "loraTargets" in merged:
        merged["loraTargets"] = _lora_targets(precision, merged["loraTargets"])
    for key in ("symmetric", "int8LmHead", "int8Embeddings", "fuseQkv", "halfScales"):
        if key in merged and not isinstance(merged[key], bool):
            raise CompressionError(f"{precision}: {key} must be true or false, got {merged[key]!r}")
    checks: list[tuple[str, tuple[Any, ...]]] = [
        ("blockSize", BLOCK_SIZES),
        ("accuracyLevel", (0, 1, 2, 3, 4)),
        ("algorithm", ALGORITHMS if precision == "int4" else ("rtn", "k_quant")),
        ("int8Layers", INT8_LAYERS),
        ("embeddingBits", EMBEDDING_BITS),
    ]
    tensors = merged.get("int8Tensors", [])
    if not isinstance(tensors, list) or not all(isinstance(t, str) for t in tensors):
        raise CompressionError(f"{precision}: int8Tensors must be a list of tensor names, got {tensors!r}")
    bad = [t for t in tensors if not TENSOR_NAME.match(t)]
    if bad:
        raise CompressionError(
            f"{precision}: int8Tensors has unknown names {bad}; expected lm_head or layers.N.attn|mlp.<proj>"
        )
    for key, allowed in checks:
        value = merged.get(key)
        if key in merged and (isinstance(value, bool) or value not in allowed):
            shown = ", ".join(str(a) for a in allowed)
            raise CompressionError(f"{precision}: {key} must be one of {shown}, got {value!r}")
    return merged


def _lora_targets(precision: str, value: Any) -> list[str]:
    from kiri_runtime.compressing.lm.adapting import ATTENTION, MLP

    names = value.split(",") if isinstance(value, str) else value
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise CompressionError(
            f"{precision}: loraTargets must be a comma-separated string or a list of names"
        )
    targets = [n.strip() for n in names if n.strip()]
    bad = sorted(set(targets) - set(ATTENTION) - set(MLP))
    if bad or not targets:
        raise CompressionError(
            f"{precision}: loraTargets {bad or '(empty)'}: choose from {', '.join(ATTENTION + MLP)}"
        )
    return targets


def build(
    hf_dir: Path,
    out: Path,
    precision: Precision,
    options: Mapping[str, Any] | None = None,
    cache: Path | None = None,
    *,
    imatrix: tuple[Any, Mapping[str, Any]] | None = None,
    execution_provider: Literal["cpu", "cuda"] = "cpu",
) -> Path:
    """Build `out` (created; must not hold a model yet) from the HF checkpoint `hf_dir`; returns `out`.

    `execution_provider` "cuda" (fp16 only: the cloud tier's GPU pack): the builder's CUDA graph, written on
    this CPU machine; it loads only in onnxruntime-genai's CUDA build.

    `imatrix`: (the reference torch model, weighting.importance of it on the eval data), which
    `algorithm: imatrix` needs."""
    resolved = resolve(precision, options)
    if execution_provider == "cuda" and precision != "fp16":
        raise CompressionError(f"a CUDA build is fp16 here, not {precision}")
    if resolved.get("algorithm") == "imatrix":
        if imatrix is None:
            raise CompressionError(
                "algorithm imatrix needs the reference model and eval data (kiri compress gives them)"
            )
        from kiri_runtime.compressing.lm import weighting

        rtn_options = {**resolved, "algorithm": "rtn", "halfScales": False}
        build(hf_dir, out, precision, rtn_options, cache)
        weighting.requantize(
            out,
            imatrix[0],
            dict(imatrix[1]),
            half=resolved["halfScales"],
            accuracy_level=resolved["accuracyLevel"],
        )
        return out
    config = _hf_config(hf_dir)
    if (out / "model.onnx").exists():
        raise CompressionError(f"{out} already holds a model.onnx; build into an empty directory")
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="kiri-builder-") as tmp:
        cache_dir = cache if cache is not None else Path(tmp) / "cache"
        if resolved.get("algorithm") == "hqq":
            staged = Path(tmp) / "fp32"
            fp32_options = {"fuseQkv": resolved["fuseQkv"]}
            extra = _extra_options("fp32", fp32_options, config, unshare=True)
            _run_builder(hf_dir, staged, "fp32", extra, None, cache_dir)
            _hqq(staged, out, resolved, config)
        else:
            extra = _extra_options(precision, resolved, config)
            target = _target_options(precision, resolved, config)
            _run_builder(hf_dir, out, precision, extra, target, cache_dir, execution_provider)
    for name in ("model.onnx", "genai_config.json"):
        if not (out / name).is_file():
            raise CompressionError(f"model builder ({precision}) wrote no {name} in {out}")
    if precision in ("int4", "int8"):
        from kiri_runtime.compressing.lm import compacting

        bits = resolved["embeddingBits"]
        compacting.compact(
            out, half=resolved["halfScales"], embedding_bits=None if bits == 32 else bits, rotary=True
        )
    if resolved.get("loraTargets"):
        from kiri_runtime.compressing.lm.adapting import add_lora_inputs

        add_lora_inputs(out, resolved["loraTargets"])
    return out


def _hf_config(hf_dir: Path) -> dict[str, Any]:
    path = hf_dir / "config.json"
    try:
        config: dict[str, Any] = json.loads(path.read_text())
    except FileNotFoundError:
        raise CompressionError(
            f"{hf_dir} has no config.json: not a Hugging Face checkpoint directory"
        ) from None
    except (OSError, ValueError) as e:
        raise CompressionError(f"{path} is not readable JSON: {e}") from None
    return config


def _layers(config: Mapping[str, Any]) -> int:
    text = config.get("text_config")
    source = text if isinstance(text, Mapping) else config
    return int(source.get("num_hidden_layers", 0))


def _tied(config: Mapping[str, Any]) -> bool:
    return bool(config.get("tie_word_embeddings", False))


def _extra_options(
    precision: str, o: Mapping[str, Any], config: Mapping[str, Any], unshare: bool = False
) -> list[str]:
    """The builder's --extra_options; `unshare`: a float graph whose lm_head MatMul is quantized afterwards (hqq)."""
    extra = [] if o.get("fuseQkv", True) else ["fuse_qkv=false"]
    if precision in ("fp32", "fp16"):
        return extra + (["shared_embeddings=false"] if unshare and _tied(config) else [])
    extra += [
        f"block_size={o['blockSize']}",
        f"accuracy_level={o['accuracyLevel']}",
        f"is_symmetric={str(o['symmetric']).lower()}",
        f"algo_config={'default' if o['algorithm'] == 'rtn' else o['algorithm']}",
        "op_types_to_quantize=MatMul",
    ]
    share = precision == "int4" and o["symmetric"] and not o.get("int8Embeddings", False)
    if _tied(config):
        extra.append(f"shared_embeddings={str(share).lower()}")
    return extra


def _upgraded(o: Mapping[str, Any], config: Mapping[str, Any]) -> list[str]:
    """Names of the MatMul nodes that the options put at 8 bits (the builder's naming: /model/layers.N/...)."""
    names = ["/lm_head/MatMul"] if o.get("int8LmHead") else []
    for tensor in o.get("int8Tensors", []):
        name = node_name(tensor)
        if name not in names:
            names.append(name)
    layers = _layers(config)
    if o.get("int8Layers") == "first-last":
        chosen = sorted({0, layers - 1})
    elif o.get("int8Layers") == "mixed":  # builder's make_matmul_mixed_precision (llama.cpp's choice)
        chosen = [
            i
            for i in range(layers)
            if i < layers / 8 or i >= 7 * layers / 8 or (i - round(layers / 8)) % 3 == 2
        ]
    else:
        chosen = []
    qkv = ["attn/qkv_proj"] if o.get("fuseQkv", True) else ["attn/q_proj", "attn/k_proj", "attn/v_proj"]
    mixed = o.get("int8Layers") == "mixed"
    for i in chosen:
        parts = (*qkv, "mlp/down_proj") if mixed else (*qkv, *PROJECTIONS)
        names += [f"/model/layers.{i}/{part}/MatMul" for part in parts]
    return list(dict.fromkeys(names))


def node_name(tensor: str) -> str:
    """An int8Tensors name as the builder's MatMul node: layers.3.mlp.down_proj -> /model/layers.3/mlp/down_proj/MatMul."""
    if tensor == "lm_head":
        return "/lm_head/MatMul"
    match = TENSOR_NAME.match(tensor)
    if match is None or match.group(1) is None:
        raise CompressionError(f"not a projection name: {tensor!r}")
    return f"/model/layers.{match.group(1)}/{match.group(2).replace('.', '/')}/MatMul"


def _target_options(precision: str, o: Mapping[str, Any], config: Mapping[str, Any]) -> dict[str, Any] | None:
    """The builder's structured quant config, only when some MatMuls go to 8 bits (per-name overrides)."""
    if precision != "int4":
        return None
    names = _upgraded(o, config)
    if not names:
        return None
    overrides = [{"match": {"name": name}, "type": "int8"} for name in names]
    return {"quant_config": {"weights": {"overrides": overrides}}}


def _run_builder(
    hf_dir: Path,
    out: Path,
    precision: str,
    extra: list[str],
    target: Mapping[str, Any] | None,
    cache: Path,
    execution_provider: str = "cpu",
) -> None:
    cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf_dir), "-o", str(out)]
    cmd += ["-p", precision, "-e", execution_provider, "-c", str(cache)]
    if extra:
        cmd += ["--extra_options", *extra]
    if target is not None:
        cmd += ["--builder_config_version", "2", "--target_options", json.dumps(target)]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=BUILDER_TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired:
        raise CompressionError(
            f"model builder ({precision}) did not finish in {BUILDER_TIMEOUT_S} s"
        ) from None
    if done.returncode != 0:
        raise CompressionError(
            f"model builder ({precision}) failed: {builder_error(done.stdout + done.stderr)}"
        )


_ERROR_LINE = re.compile(r"^(?:[\w.]+\.)?(\w*(?:Error|Exception|Exit)\w*): ?(.*)$")


def builder_error(output: str) -> str:
    """The one line that says why the builder failed: its last 'SomeError: message' line, else its last line."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    for line in reversed(lines):
        match = _ERROR_LINE.match(line)
        if match:
            return f"{match.group(1)}: {match.group(2)}".strip().rstrip(":")
    return lines[-1][:500] if lines else "no output"


def _hqq(staged: Path, out: Path, o: Mapping[str, Any], config: Mapping[str, Any]) -> None:
    """onnxruntime's HQQ 4-bit quantizer over the builder's fp32 graph; the 8-bit nodes by its default quantizer."""
    import onnx
    from onnxruntime.quantization import matmul_nbits_quantizer as mnq

    with _quiet(mnq.__name__), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _hqq_quantize(onnx, mnq, staged, out, o, config)


@contextlib.contextmanager
def _quiet(logger_name: str) -> Iterator[None]:
    logger = logging.getLogger(logger_name)
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)


def _hqq_quantize(
    onnx: Any, mnq: Any, staged: Path, out: Path, o: Mapping[str, Any], config: Mapping[str, Any]
) -> None:
    model = onnx.load(str(staged / "model.onnx"))
    present = {n.name for n in model.graph.node if n.op_type == "MatMul"}
    upgraded = [name for name in _upgraded(o, config) if name in present]
    hqq = mnq.HQQWeightOnlyQuantConfig(block_size=o["blockSize"], bits=4, op_types_to_quantize=("MatMul",))
    quant = mnq.MatMulNBitsQuantizer(
        model,
        bits=4,
        block_size=o["blockSize"],
        accuracy_level=o["accuracyLevel"],
        nodes_to_exclude=upgraded,
        op_types_to_quantize=("MatMul",),
        algo_config=hqq,
    )
    quant.process()
    proto = quant.model.model
    if upgraded:
        eight = mnq.MatMulNBitsQuantizer(
            proto,
            bits=8,
            block_size=o["blockSize"],
            is_symmetric=True,
            accuracy_level=o["accuracyLevel"],
            nodes_to_include=upgraded,
            op_types_to_quantize=("MatMul",),
        )
        eight.process()
        proto = eight.model.model
    for path in staged.iterdir():
        if not path.name.startswith("model.onnx"):
            shutil.copy2(path, out / path.name)
    onnx.save_model(
        proto,
        str(out / "model.onnx"),
        save_as_external_data=True,
        location="model.onnx.data",
        size_threshold=0,
    )
